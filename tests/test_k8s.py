"""docker/k8s/: the Kubernetes manifests, checked without a cluster.

Every document validates against the Kubernetes schemas (kubernetes-validate, strict: unknown
fields fail), except the LeaderWorkerSet, whose own fields are checked here by hand and whose pod
templates validate as PodTemplates. Then the manifests are checked against what they run: the
image (compose's image name -> its Dockerfile: ENTRYPOINT, CMD, user), kvserve's own CLI (each
container's argv parsed by `server.cli.main` with `serve` replaced by a recorder, under the env
the pod gets, LWS's variables and the downward API resolved as the kubelet would), the server's
ports, probes, drain time and metric names (`server.metrics.Metrics`), the HPA's metric through
prometheus-adapter's rule, and the tensor-parallel group (size, ranks, torchrun variables).
Each checker returns a list of problems; the mutation tests show that each one can fail.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import logging
import math
import os
import re
from pathlib import Path
from typing import Callable, NamedTuple
from unittest import mock

import pytest
import yaml

from test_docker import DOCKER, ROOT, compose, exec_form, final_stage, healthcheck, \
    parse_dockerfile, run_commands, seconds

try:
    import kubernetes_validate
except ImportError:  # the `test` extra has it
    kubernetes_validate = None

needs_schemas = pytest.mark.skipif(
    kubernetes_validate is None,
    reason="kubernetes-validate is not installed (pip install kubernetes-validate): no "
           "Kubernetes schemas to validate the manifests against")

K8S = DOCKER / "k8s"
K8S_VERSION = "1.31"     # the schemas the manifests are validated against
LWS_API, LWS_KIND = "leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"
LWS_LABEL = "leaderworkerset.sigs.k8s.io/"
# the fields of LWS's v1 API (kubernetes-sigs/lws: api/leaderworkerset/v1/leaderworkerset_types.go)
LWS_SPEC_FIELDS = {"replicas", "leaderWorkerTemplate", "rolloutStrategy", "startupPolicy",
                   "networkConfig"}
LWS_TEMPLATE_FIELDS = {"leaderTemplate", "workerTemplate", "size", "restartPolicy",
                       "subGroupPolicy", "volumeClaimTemplates",
                       "persistentVolumeClaimRetentionPolicy"}
LWS_RESTART_POLICIES = {"Default", "None", "RecreateGroupOnPodRestart",
                        "RecreateGroupAfterStart"}
TORCHRUN = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
# what a kvserve process holds beyond its weights and KV pool (torch, the tokenizer, step
# buffers): measured 0.8-0.95 GiB for SmolLM2 with a 1 GiB pool (bf16 + gguf, and float32)
RUNTIME_OVERHEAD = 1 << 30
METRIC_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")   # no colon: a URL path segment


# --- loading -------------------------------------------------------------------------------

def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_manifests() -> list[tuple[str, dict]]:
    """(file, document) of every non-empty YAML document under docker/k8s/, freshly parsed."""
    return [(p.relative_to(K8S).as_posix(), doc) for p in manifest_files()
            for doc in yaml.safe_load_all(p.read_text()) if doc is not None]


def find(docs: list[tuple[str, dict]], kind: str, name: str | None = None) -> dict:
    found = [d for _, d in docs if d.get("kind") == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in docker/k8s/"
    return found[0]


class Stack(NamedTuple):
    """The single-pod deployment and what scales it."""
    deployment: dict
    service: dict
    hpa: dict
    adapter: dict


def stack(docs) -> Stack:
    deployment = find(docs, "Deployment", "kvserve")
    return Stack(deployment, find(docs, "Service", "kvserve"),
                 find(docs, "HorizontalPodAutoscaler"), find(docs, "ConfigMap"))


def lws_parts(docs) -> tuple[dict, dict]:
    lws = find(docs, LWS_KIND)
    return lws, find(docs, "Service", lws["metadata"]["name"] + "-api")


# --- schemas -------------------------------------------------------------------------------

def schema_problems(doc: dict, where: str = "") -> list[str]:
    """Strict validation against the Kubernetes schemas; [] when valid."""
    name = f"{where}{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{name}: {'.'.join(map(str, e.path)) or '(top)'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{name}: no schema ({e.message})"]
    return []


def as_pod_template(template: dict, name: str) -> dict:
    """A PodTemplateSpec inside a schema-known object, to validate it."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
            "template": template}


def lws_field_problems(lws: dict) -> list[str]:
    """The LeaderWorkerSet's own fields (kubernetes-validate has no schema for the CRD)."""
    problems = []
    if lws.get("apiVersion") != LWS_API or lws.get("kind") != LWS_KIND:
        problems.append(f"apiVersion/kind {lws.get('apiVersion')}/{lws.get('kind')}, "
                        f"not {LWS_API}/{LWS_KIND}")
    extra = set(lws) - {"apiVersion", "kind", "metadata", "spec"}
    if extra:
        problems.append(f"unknown top-level fields {sorted(extra)}")
    name = lws.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 50:
        problems.append(f"metadata.name {name!r}: a DNS label (pods are named after it)")
    spec = lws.get("spec", {})
    problems += [f"spec.{k}: unknown field" for k in sorted(set(spec) - LWS_SPEC_FIELDS)]
    lwt = spec.get("leaderWorkerTemplate", {})
    problems += [f"spec.leaderWorkerTemplate.{k}: unknown field"
                 for k in sorted(set(lwt) - LWS_TEMPLATE_FIELDS)]
    replicas = spec.get("replicas", 1)
    if not isinstance(replicas, int) or replicas < 1:
        problems.append(f"spec.replicas {replicas!r}: an integer >= 1")
    size = lwt.get("size", 1)
    if not isinstance(size, int) or size < 2:
        problems.append(f"size {size!r}: tensor parallelism needs an integer >= 2")
    policy = lwt.get("restartPolicy", "RecreateGroupOnPodRestart")
    if policy not in LWS_RESTART_POLICIES:
        problems.append(f"restartPolicy {policy!r}: not one of {sorted(LWS_RESTART_POLICIES)}")
    elif not policy.startswith("RecreateGroup"):
        problems.append(f"restartPolicy {policy}: a dead rank makes rank 0 exit 1 and the others "
                        f"lose the group; only recreating the whole group restarts it")
    startup = spec.get("startupPolicy", "LeaderCreated")
    if startup not in ("LeaderCreated", "LeaderReady"):
        problems.append(f"startupPolicy {startup!r}: LeaderCreated or LeaderReady")
    elif startup == "LeaderReady":
        problems.append("startupPolicy LeaderReady: the leader is ready only after every rank "
                        "has joined, so the workers would never start")
    for key in ("leaderTemplate", "workerTemplate"):
        if not isinstance(lwt.get(key), dict) or "spec" not in lwt[key]:
            problems.append(f"spec.leaderWorkerTemplate.{key}: a pod template is required "
                            f"(the leader serves HTTP, the workers do not)")
    return problems


# --- the image, the CLI, the server --------------------------------------------------------

@functools.cache
def image_dockerfiles() -> dict[str, Path]:
    """image name -> the Dockerfile that builds it, from the compose files."""
    out = {}
    for files in (("compose.yaml",), ("compose.yaml", "compose.cuda.yaml")):
        for svc in compose(*files)["services"].values():
            if "build" in svc and "image" in svc:
                out[svc["image"]] = (DOCKER / svc["build"]["context"]).resolve() / \
                    svc["build"]["dockerfile"]
    return out


class Image(NamedTuple):
    entrypoint: list[str]
    cmd: list[str]
    uid: int | None
    start_period: float   # the HEALTHCHECK's: how long the image takes to become healthy


@functools.cache
def image(name: str) -> Image | None:
    path = image_dockerfiles().get(name)
    if path is None:
        return None
    stage = final_stage(parse_dockerfile(path.read_text()))
    last = {i.keyword: i for i in stage}
    user = [i.args for i in stage if i.keyword == "USER"][-1].split(":")[0]
    uid = int(user) if user.isdigit() else None
    for c in run_commands(stage):
        if c[0] == "useradd" and c[-1] == user:
            for i, w in enumerate(c):
                if w in ("--uid", "-u"):
                    uid = int(c[i + 1])
                elif w.startswith("--uid="):
                    uid = int(w.split("=", 1)[1])
    opts, _ = healthcheck(stage)
    return Image(exec_form(last["ENTRYPOINT"].args), exec_form(last["CMD"].args), uid,
                 seconds(opts.get("start-period", "0s")))


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables only, $$ is a literal $."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def quantity(q) -> float:
    """A Kubernetes quantity ("4", "500m", "3Gi", "1.5G") as a number (bytes, cores)."""
    m = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(q))
    assert m, f"not a quantity: {q!r}"
    scale = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40}[m.group(2)]
    return float(m.group(1)) * scale


def resolve_env(container: dict, labels: dict[str, str],
                injected: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The container's environment as the kubelet builds it: `injected` first (what a
    controller such as LWS prepends), then each entry in order, $(VAR) expanded against the
    ones before it, downward-API labels and resource fields resolved."""
    env, problems = dict(injected), []
    resources = container.get("resources", {})
    for e in container.get("env", []):
        name, source = e["name"], e.get("valueFrom")
        if source is None:
            env[name] = expand(e.get("value", ""), env)
        elif "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            m = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
            if m and m.group(1) in labels:
                env[name] = labels[m.group(1)]
            elif m:
                problems.append(f"env {name}: the pod has no label {m.group(1)}")
            else:
                env[name] = f"<{path}>"
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            kind, _, res = ref["resource"].partition(".")
            if ref.get("containerName", container["name"]) != container["name"]:
                problems.append(f"env {name}: resources of container {ref['containerName']}")
            value = resources.get(kind, {}).get(res)
            if value is None:
                problems.append(f"env {name}: the container sets no {ref['resource']}")
                continue
            env[name] = str(math.ceil(quantity(value) / quantity(ref.get("divisor", "1"))))
        else:
            env[name] = f"<{sorted(source)[0]}>"
    return env, problems


class Launch(NamedTuple):
    mode: str          # "serve": rank 0 / single process, HTTP; "rank": a launched rank > 0
    engine: dict       # engine kwargs
    host: str | None
    port: int | None
    shutdown_timeout: float | None


def cli_launch(argv: list[str], env: dict[str, str]) -> Launch | str:
    """What `argv` does in a container with `env`, through kvserve's real CLI with the server
    and the launched rank replaced by recorders; a string is the CLI's complaint."""
    import server.cli
    import server.serve
    from engine import tp
    calls, signature = [], inspect.signature(server.serve.serve)

    def serve(*a, **kw):
        call = signature.bind(*a, **kw).arguments
        engine = next(v for v in call.values() if isinstance(v, dict))
        calls.append(Launch("serve", engine, call.get("host", "127.0.0.1"),
                            call.get("port", 8000), call.get("shutdown_timeout", 30.0)))
        return 0

    def rank(engine):
        calls.append(Launch("rank", engine, None, None, None))
        return 0

    full_env = {k: v for k, v in os.environ.items() if k not in TORCHRUN} | env
    err = io.StringIO()
    with mock.patch.object(server.serve, "serve", serve), \
            mock.patch.object(tp, "run_launched_rank", rank), \
            mock.patch.object(logging, "basicConfig"), \
            mock.patch.dict(os.environ, full_env, clear=True), contextlib.redirect_stderr(err):
        try:
            rc = server.cli.main(argv[1:])
        except SystemExit as e:
            rc = e.code
    if rc != 0 or len(calls) != 1:
        why = (err.getvalue().strip().splitlines() or [""])[-1]
        return f"`{' '.join(argv)}` fails in kvserve's CLI ({rc}): {why}"
    return calls[0]


@functools.cache
def exported_series() -> dict[str, str]:
    """series name -> metric type, for everything server.metrics.Metrics registers."""
    from server.metrics import Metrics
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                "summary": ["", "_sum", "_count"]}
    out = {}
    for family in Metrics("model", 2048).registry.collect():
        for s in suffixes.get(family.type, [""]):
            out[family.name + s] = family.type
        for sample in family.samples:
            out.setdefault(sample.name, family.type)
    return out


@functools.cache
def uvicorn_close_seconds() -> float:
    """What `kvserve serve` gives uvicorn to close after the drain (server/serve.py)."""
    m = re.search(r"timeout_graceful_shutdown=(\d+(?:\.\d+)?)",
                  (ROOT / "server" / "serve.py").read_text())
    assert m, "server/serve.py no longer passes timeout_graceful_shutdown to uvicorn"
    return float(m.group(1))


@functools.cache
def default_model():
    """The image's model (SmolLM2-135M, baked in): its ModelConfig, from the GGUF header."""
    from engine.capacity import read_model_config
    return read_model_config(None)[1]


def memory_needed(engine: dict) -> float | None:
    """Bytes a kvserve process with these engine flags needs at most (weights + KV pool +
    runtime), or None when unknown here (another model, a GPU)."""
    from engine.capacity import plan_capacity
    if engine.get("model") is not None or engine.get("device") not in (None, "auto", "cpu"):
        return None
    model = default_model()
    dtype = engine.get("dtype", "auto")
    plan = plan_capacity(model, dtype="float32" if dtype == "auto" else dtype, device="cpu",
                         block_size=engine.get("block_size", 16),
                         num_kv_blocks=engine.get("num_kv_blocks"),
                         kv_cache_memory=engine.get("kv_cache_memory"),
                         kv_cache_dtype=engine.get("kv_cache_dtype", "auto"))
    return plan.weight_bytes + plan.kv_cache_bytes + RUNTIME_OVERHEAD


# --- one pod -------------------------------------------------------------------------------

class Rank(NamedTuple):
    """A kvserve container as it runs in its pod."""
    container: dict
    image: Image
    argv: list[str]
    env: dict[str, str]
    launch: Launch


def kvserve_rank(template: dict, where: str, labels: dict[str, str] | None = None,
                 injected: dict[str, str] | None = None) -> tuple[Rank | None, list[str]]:
    """The pod's one kvserve container (a container of an image built in docker/), its argv
    (the image's ENTRYPOINT/CMD as the container's command/args override them), its env, and
    what kvserve's CLI makes of them."""
    spec = template.get("spec", {})
    labels = {**template.get("metadata", {}).get("labels", {}), **(labels or {})}
    ours = [c for c in spec.get("containers", []) if c.get("image") in image_dockerfiles()]
    if len(ours) != 1:
        images = [c.get("image") for c in spec.get("containers", [])]
        return None, [f"{where}: {len(ours)} containers of a kvserve image "
                      f"{sorted(image_dockerfiles())} (images: {images})"]
    c = ours[0]
    img = image(c["image"])
    env, problems = resolve_env(c, labels, injected or {})
    if "command" in c:
        argv = c["command"] + c.get("args", [])
    else:
        argv = img.entrypoint + c.get("args", img.cmd)
    argv = [expand(a, env) for a in argv]
    launch = cli_launch(argv, env)
    if isinstance(launch, str):
        return None, problems + [f"{where}: {launch}"]
    return Rank(c, img, argv, env, launch), [f"{where}: {p}" for p in problems]


def port_number(container: dict, port) -> int | None:
    """A probe's or Service's target port: a number, or the name of a container port."""
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return named[0] if named else None


def budget(probe: dict) -> float:
    """Seconds a probe lets pass before it acts: failures x period (+ initial delay)."""
    return probe.get("initialDelaySeconds", 0) + \
        probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def pre_stop_seconds(container: dict) -> float:
    hook = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    cmd = hook.get("exec", {}).get("command", [])
    return float(cmd[1]) if len(cmd) == 2 and Path(cmd[0]).name == "sleep" else 0.0


def pod_problems(rank: Rank, template: dict, where: str) -> list[str]:
    """Checks for every kvserve pod: it runs as the image's user, with memory for its flags."""
    c, spec, problems = rank.container, template["spec"], []
    if rank.argv[0] not in ("kvserve", "/usr/local/bin/kvserve"):
        problems.append(f"{where}: runs {rank.argv[0]}, not kvserve")
    if c["image"].endswith(":latest") or ":" not in c["image"]:
        problems.append(f"{where}: image {c['image']}: a pinned tag")
    uid = {**spec.get("securityContext", {}), **c.get("securityContext", {})}.get("runAsUser")
    if uid is not None and uid != rank.image.uid:
        problems.append(f"{where}: runAsUser {uid}, but the image's user (whose home holds the "
                        f"model's tokenizer and the CPU kernels) is uid {rank.image.uid}")
    need = memory_needed(rank.launch.engine)
    limit = c.get("resources", {}).get("limits", {}).get("memory")
    if limit is None:
        problems.append(f"{where}: no memory limit")
    elif need is not None and quantity(limit) < need:
        problems.append(f"{where}: memory limit {limit} < {need / 2 ** 30:.2f} GiB (weights + "
                        f"KV pool for these flags + {RUNTIME_OVERHEAD / 2 ** 30:.0f} GiB)")
    if "cpu" not in c.get("resources", {}).get("requests", {}):
        problems.append(f"{where}: no CPU request")
    return problems


def http_pod_problems(rank: Rank, template: dict, where: str, min_startup: float) -> list[str]:
    """A pod that serves the API: the port, the probes, the drain, the scrape annotations."""
    c, spec, launch = rank.container, template["spec"], rank.launch
    problems = pod_problems(rank, template, where)
    if launch.mode != "serve":
        return problems + [f"{where}: with RANK={rank.env.get('RANK')} kvserve does not serve "
                           f"HTTP"]
    port = launch.port
    if launch.host not in ("0.0.0.0", "::"):
        problems.append(f"{where}: --host {launch.host}: unreachable from outside the pod")
    if port not in [p["containerPort"] for p in c.get("ports", [])]:
        problems.append(f"{where}: no containerPort {port} (the server's --port)")
    probes = {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c}
    for k in ("readinessProbe", "livenessProbe"):
        if k not in probes:
            problems.append(f"{where}: no {k}")
    for k, probe in probes.items():
        get = probe.get("httpGet")
        if get is None or get.get("path") != "/health":
            problems.append(f"{where}: {k} is not GET /health")
            continue
        if port_number(c, get.get("port")) != port:
            problems.append(f"{where}: {k} port {get.get('port')!r} is not the server's port "
                            f"{port}")
        if get.get("scheme", "HTTP") != "HTTP":
            problems.append(f"{where}: {k} scheme {get['scheme']}: the server speaks HTTP")
        if probe.get("timeoutSeconds", 1) >= probe.get("periodSeconds", 10):
            problems.append(f"{where}: {k} timeout >= period")
    if "livenessProbe" in probes and budget(probes["livenessProbe"]) <= launch.shutdown_timeout:
        problems.append(f"{where}: livenessProbe fails after {budget(probes['livenessProbe'])} s, "
                        f"within a drain (503 for up to --shutdown-timeout "
                        f"{launch.shutdown_timeout:g} s): it would kill a draining server")
    start = probes.get("startupProbe") or probes.get("livenessProbe")
    if start is not None and budget(start) < min_startup:
        problems.append(f"{where}: the server gets {budget(start)} s to start (startup probe), "
                        f"less than {min_startup:g} s")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    stop = pre_stop_seconds(c) + launch.shutdown_timeout + uvicorn_close_seconds()
    if grace <= stop:
        problems.append(f"{where}: terminationGracePeriodSeconds {grace} <= {stop:g} s (preStop "
                        f"+ --shutdown-timeout {launch.shutdown_timeout:g} + uvicorn's close): "
                        f"SIGKILL before the drain ends")
    notes = template.get("metadata", {}).get("annotations", {})
    metrics_path = yaml.safe_load((DOCKER / "prometheus.yml").read_text())[
        "scrape_configs"][0].get("metrics_path", "/metrics")
    want = {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
            "prometheus.io/path": metrics_path}
    for k, v in want.items():
        if notes.get(k) != v:
            problems.append(f"{where}: annotation {k}={notes.get(k)!r}, not {v!r}")
    return problems


def service_problems(service: dict, pods: list[tuple[dict, Rank | None]]) -> list[str]:
    """The Service selects exactly the serving pods (labels, rank) and each of its ports
    reaches their server's port. A rank of None: a pod that serves no HTTP."""
    name, problems = service["metadata"]["name"], []
    selector = service["spec"].get("selector") or {}
    if not selector:
        return [f"Service {name}: no selector"]
    for labels, rank in pods:
        selected = all(labels.get(k) == v for k, v in selector.items())
        if rank is None and selected:
            problems.append(f"Service {name} selects a pod that serves no HTTP ({labels})")
        if rank is not None and not selected:
            problems.append(f"Service {name}: selector {selector} misses the pod ({labels})")
        if rank is None or not selected:
            continue
        for p in service["spec"]["ports"]:
            target = port_number(rank.container, p.get("targetPort", p["port"]))
            if target != rank.launch.port:
                problems.append(f"Service {name}: port {p['port']} -> targetPort "
                                f"{p.get('targetPort')!r} = {target}, not the server's port "
                                f"{rank.launch.port}")
    return problems


# --- the single-pod deployment, the adapter, the HPA ---------------------------------------

def deployment_problems(s: Stack) -> list[str]:
    d = s.deployment
    template, where = d["spec"]["template"], f"Deployment/{d['metadata']['name']}"
    labels = template["metadata"].get("labels", {})
    problems = [f"{where}: selector {k}={v} does not match the pod template's labels"
                for k, v in d["spec"]["selector"].get("matchLabels", {}).items()
                if labels.get(k) != v]
    rank, more = kvserve_rank(template, where)
    if rank is None:
        return problems + more
    problems += more + http_pod_problems(rank, template, where, rank.image.start_period)
    problems += service_problems(s.service, [(labels, rank)])
    return problems


def series_name(query: str) -> str | None:
    """The metric a prometheus-adapter seriesQuery selects: `name{...}` or
    `{__name__="name", ...}`; None for a pattern."""
    m = re.fullmatch(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{.*\})?\s*", query)
    if m:
        return m.group(1)
    m = re.search(r"__name__\s*=\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"", query)
    return m.group(1) if m else None


def adapter_rules(configmap: dict) -> list[dict]:
    return yaml.safe_load(configmap["data"]["config.yaml"]).get("rules", [])


def adapter_metrics(configmap: dict) -> tuple[dict[str, str], list[str]]:
    """custom metric name -> the kvserve series it serves, and the rules' problems."""
    out, problems = {}, []
    for i, rule in enumerate(adapter_rules(configmap)):
        where = f"adapter rule {i}"
        series = series_name(rule.get("seriesQuery", ""))
        if series not in exported_series():
            problems.append(f"{where}: seriesQuery {rule.get('seriesQuery')!r} names no series "
                            f"kvserve exports")
            continue
        overrides = rule.get("resources", {}).get("overrides", {})
        mapped = {v.get("resource") for v in overrides.values()}
        if not {"pod", "namespace"} <= mapped:
            problems.append(f"{where}: resources map {sorted(mapped)}: a Pods metric needs the "
                            f"pod and namespace labels mapped")
        name = rule.get("name", {})
        m = re.search(name.get("matches", ".*"), series)
        if m is None:
            problems.append(f"{where}: name.matches {name.get('matches')!r} does not match "
                            f"{series}")
            continue
        default = "$1" if m.re.groups == 1 else "$0"
        served = re.sub(r"\$\{?(\d+)\}?", lambda g: m.group(int(g.group(1))) or "",
                        name.get("as") or default)
        if not METRIC_NAME.fullmatch(served):
            problems.append(f"{where}: serves {served!r}, not a legal custom metric name")
        query = rule.get("metricsQuery", "")
        if not all(t in query for t in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>")):
            problems.append(f"{where}: metricsQuery {query!r} lacks <<.Series>>, "
                            f"<<.LabelMatchers>> or <<.GroupBy>>")
        out[served] = series
    return out, problems


def hpa_problems(s: Stack) -> list[str]:
    hpa, where = s.hpa, f"HorizontalPodAutoscaler/{s.hpa['metadata']['name']}"
    served, problems = adapter_metrics(s.adapter)
    spec, target = hpa["spec"], hpa["spec"]["scaleTargetRef"]
    want = {"apiVersion": s.deployment["apiVersion"], "kind": "Deployment",
            "name": s.deployment["metadata"]["name"]}
    if {k: target.get(k) for k in want} != want:
        problems.append(f"{where}: scales {target}, not {want}")
    if "replicas" in s.deployment["spec"]:
        problems.append(f"{where}: the Deployment sets replicas, which every apply would reset")
    if not 1 <= spec.get("minReplicas", 1) <= spec["maxReplicas"]:
        problems.append(f"{where}: minReplicas/maxReplicas")
    pods = [m for m in spec.get("metrics", []) if m["type"] == "Pods"]
    if not pods:
        problems.append(f"{where}: no Pods metric")
    for m in pods:
        name = m["pods"]["metric"]["name"]
        if name not in served:
            problems.append(f"{where}: metric {name} is not served by the adapter's rules "
                            f"({sorted(served)})")
            continue
        kind = exported_series()[served[name]]
        if kind != "gauge":
            problems.append(f"{where}: {name} comes from {served[name]}, a {kind}: an average "
                            f"per pod needs a gauge")
        if m["pods"]["target"].get("type") != "AverageValue":
            problems.append(f"{where}: a Pods metric's target is an AverageValue")
    return problems


# --- the tensor-parallel LeaderWorkerSet ---------------------------------------------------

def lws_problems(lws: dict, service: dict, namespace: str = "default") -> list[str]:
    """The group as LWS starts it: for each worker index, the pod's labels and LWS's env (as
    its webhook injects them, first in every container), then kvserve's CLI under that env."""
    problems = lws_field_problems(lws)
    if problems:
        return problems
    name, lwt = lws["metadata"]["name"], lws["spec"]["leaderWorkerTemplate"]
    size = lwt.get("size", 1)
    leader_addr = f"{name}-0.{name}.{namespace}"
    ranks, pods = [], []
    for index in range(size):
        role = "leader" if index == 0 else "worker"
        template = lwt[f"{role}Template"]
        labels = {**template.get("metadata", {}).get("labels", {}),
                  LWS_LABEL + "name": name, LWS_LABEL + "group-index": "0",
                  LWS_LABEL + "worker-index": str(index), LWS_LABEL + "group-key": "0123abcd"}
        injected = {"LWS_LEADER_ADDRESS": leader_addr, "LWS_GROUP_SIZE": str(size),
                    "LWS_WORKER_INDEX": str(index)}
        where = f"{LWS_KIND}/{name} rank {index}"
        rank, more = kvserve_rank(template, where, labels, injected)
        problems += more
        if rank is None:
            return problems
        ranks.append(rank)
        pods.append((labels, rank if index == 0 else None))
        env = rank.env
        for var in TORCHRUN[:4]:
            if var not in env:
                problems.append(f"{where}: no {var} in the env")
        if env.get("RANK") != str(index):
            problems.append(f"{where}: RANK={env.get('RANK')!r}, not its worker index {index}")
        if env.get("WORLD_SIZE") != str(size):
            problems.append(f"{where}: WORLD_SIZE={env.get('WORLD_SIZE')!r}, not the group size "
                            f"{size}")
        if env.get("MASTER_ADDR") != leader_addr and \
                not (index == 0 and env.get("MASTER_ADDR") in ("127.0.0.1", "localhost")):
            problems.append(f"{where}: MASTER_ADDR={env.get('MASTER_ADDR')!r}, not the leader's "
                            f"address (LWS_LEADER_ADDRESS, {leader_addr})")
        tp_size = rank.launch.engine.get("tensor_parallel_size")
        if tp_size != size:
            problems.append(f"{where}: --tensor-parallel-size {tp_size} != size {size}")
        if index == 0:
            problems += http_pod_problems(rank, template, where,
                                          rank.image.start_period + tp_init_seconds())
        else:
            problems += pod_problems(rank, template, where)
            if rank.launch.mode != "rank":
                problems.append(f"{where}: with RANK={env.get('RANK')!r} kvserve would serve "
                                f"HTTP, not compute as rank {index}")
            http = [k for k in ("startupProbe", "readinessProbe", "livenessProbe")
                    if "httpGet" in rank.container.get(k, {})]
            if http:
                problems.append(f"{where}: {http} probe HTTP, which a rank > 0 does not serve")
            notes = template.get("metadata", {}).get("annotations", {})
            if notes.get("prometheus.io/scrape") == "true":
                problems.append(f"{where}: scraped by Prometheus, but serves no /metrics")
    leader, leader_tmpl = ranks[0], lwt["leaderTemplate"]
    ports = [p["containerPort"] for p in leader.container.get("ports", [])]
    for index, rank in enumerate(ranks):
        where = f"{LWS_KIND}/{name} rank {index}"
        if rank.launch.engine != leader.launch.engine:
            diff = {k: (leader.launch.engine.get(k), v) for k, v in rank.launch.engine.items()
                    if leader.launch.engine.get(k) != v}
            problems.append(f"{where}: engine flags differ from rank 0's (rank 0's, its): {diff}")
        if rank.container["image"] != leader.container["image"]:
            problems.append(f"{where}: image {rank.container['image']}, rank 0 runs "
                            f"{leader.container['image']}")
        port = rank.env.get("MASTER_PORT", "")
        if not port.isdigit() or int(port) not in ports:
            problems.append(f"{where}: MASTER_PORT={port!r} is not a containerPort of the leader "
                            f"({ports})")
        if port != leader.env.get("MASTER_PORT"):
            problems.append(f"{where}: MASTER_PORT={port!r}, rank 0 listens on "
                            f"{leader.env.get('MASTER_PORT')!r}")
    # rank 0's drain needs the others: a worker outlives the leader's grace period
    leader_grace = leader_tmpl["spec"].get("terminationGracePeriodSeconds", 30)
    worker_tmpl = lwt["workerTemplate"]
    for index, rank in enumerate(ranks[1:], 1):
        wait = pre_stop_seconds(rank.container)
        if wait < leader_grace:
            problems.append(f"{LWS_KIND}/{name} rank {index}: preStop waits {wait:g} s, less "
                            f"than the leader's grace period ({leader_grace} s): a worker killed "
                            f"first cuts rank 0's drain short")
        if worker_tmpl["spec"].get("terminationGracePeriodSeconds", 30) <= wait:
            problems.append(f"{LWS_KIND}/{name} rank {index}: terminationGracePeriodSeconds "
                            f"<= its preStop wait")
    problems += service_problems(service, pods)
    engine = leader.launch.engine
    if engine.get("model") is None:  # the image's default model: the ranks must divide it
        from engine.tp import check_divisible
        try:
            check_divisible(default_model(), size)
        except ValueError as e:
            problems.append(f"{LWS_KIND}/{name}: size {size}: {e}")
    return problems


def tp_init_seconds() -> float:
    from engine.tp import INIT_TIMEOUT
    return INIT_TIMEOUT.total_seconds()


# --- tests ---------------------------------------------------------------------------------

def test_every_manifest_parses_and_names_itself():
    docs = load_manifests()
    assert {f for f, _ in docs} == {"kvserve.yaml", "hpa.yaml", "prometheus-adapter.yaml",
                                    "kvserve-tp.yaml"}
    for f, doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), f
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), f
    keys = [(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")) for _, d in docs]
    assert len(set(keys)) == len(keys), "two documents with the same kind and name"


@needs_schemas
def test_manifests_validate_against_the_kubernetes_schemas():
    problems, unknown = [], []
    for f, doc in load_manifests():
        if (doc["apiVersion"], doc["kind"]) == (LWS_API, LWS_KIND):
            unknown.append(doc)  # a CRD: checked by hand (test_lws_fields_and_pod_templates)
            continue
        problems += schema_problems(doc, f"{f}: ")
    assert not problems, "\n".join(problems)
    assert len(unknown) == 1


@needs_schemas
def test_lws_fields_and_pod_templates():
    lws, _ = lws_parts(load_manifests())
    assert lws_field_problems(lws) == []
    name = lws["metadata"]["name"]
    for key in ("leaderTemplate", "workerTemplate"):
        tmpl = lws["spec"]["leaderWorkerTemplate"][key]
        assert schema_problems(as_pod_template(tmpl, f"{name}-{key.lower()}")) == []


@needs_schemas
def test_schema_check_fails_on_unknown_fields_and_wrong_types():
    docs = load_manifests()
    d = copy.deepcopy(stack(docs).deployment)
    d["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo
    assert any("readinesProbe" in p for p in schema_problems(d))
    d = copy.deepcopy(stack(docs).deployment)
    d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    assert any("containerPort" in p for p in schema_problems(d))
    lws, _ = lws_parts(docs)
    worker = copy.deepcopy(lws["spec"]["leaderWorkerTemplate"]["workerTemplate"])
    worker["spec"]["containers"][0]["args"].append(8000)  # not a string
    assert schema_problems(as_pod_template(worker, "w"))
    assert schema_problems({"apiVersion": "v1", "kind": "Nope", "metadata": {"name": "x"}})


def test_deployment_runs_the_image_as_the_server_expects():
    assert deployment_problems(stack(load_manifests())) == []


def test_hpa_scales_on_a_series_kvserve_exports():
    s = stack(load_manifests())
    served, problems = adapter_metrics(s.adapter)
    assert problems == [] and hpa_problems(s) == []
    assert served["kvserve_num_requests_waiting"] == "kvserve:num_requests_waiting"
    assert s.hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == \
        "kvserve_num_requests_waiting"


def test_lws_group_is_one_tensor_parallel_engine():
    lws, service = lws_parts(load_manifests())
    assert lws_problems(lws, service) == []
    assert lws["spec"]["leaderWorkerTemplate"]["size"] >= 2


def test_readme_covers_every_manifest():
    readme = (K8S / "README.md").read_text()
    for p in manifest_files():
        rel = p.relative_to(K8S).as_posix()
        assert f"`{rel}`" in readme, rel
        assert re.search(rf"kubectl apply (-n \S+ )?-f docker/k8s/{re.escape(rel)}", readme), rel
    assert "prometheus-adapter" in readme and "LeaderWorkerSet" in readme


def _container(doc_path: list):
    def get(obj):
        for key in doc_path:
            obj = obj[key]
        return obj
    return get


DEPLOY_C = _container(["spec", "template", "spec", "containers", 0])
LEADER = ["spec", "leaderWorkerTemplate", "leaderTemplate"]
WORKER = ["spec", "leaderWorkerTemplate", "workerTemplate"]
LEADER_C = _container(LEADER + ["spec", "containers", 0])
WORKER_C = _container(WORKER + ["spec", "containers", 0])


def _set_env(container: dict, name: str, value: str) -> None:
    container["env"] = [e for e in container["env"] if e["name"] != name] + \
        [{"name": name, "value": value}]


def _args_set(container: dict, flag: str, value: str) -> None:
    args = container["args"] = list(container["args"])  # the YAML anchor's list is shared
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]


# (what is broken, how, the problem it must raise); mutate(stack, lws, lws_service)
MUTATIONS: list[tuple[str, Callable, str]] = [
    ("probe on the wrong port",
     lambda s, l, ls: DEPLOY_C(s.deployment)["readinessProbe"]["httpGet"].update(port=8080),
     "readinessProbe port 8080 is not the server's port 8000"),
    ("probe on a port name that does not exist",
     lambda s, l, ls: DEPLOY_C(s.deployment)["livenessProbe"]["httpGet"].update(port="api"),
     "livenessProbe port 'api'"),
    ("probe on another path",
     lambda s, l, ls: DEPLOY_C(s.deployment)["readinessProbe"]["httpGet"].update(path="/"),
     "readinessProbe is not GET /health"),
    ("server on another port than the containerPort",
     lambda s, l, ls: _args_set(DEPLOY_C(s.deployment), "--port", "9000"),
     "no containerPort 9000"),
    ("server on localhost",
     lambda s, l, ls: _args_set(DEPLOY_C(s.deployment), "--host", "127.0.0.1"),
     "--host 127.0.0.1"),
    ("a flag the CLI does not know",
     lambda s, l, ls: DEPLOY_C(s.deployment)["args"].append("--max-batch"),
     "fails in kvserve's CLI"),
    ("grace period shorter than the drain",
     lambda s, l, ls: s.deployment["spec"]["template"]["spec"].update(
         terminationGracePeriodSeconds=30),
     "terminationGracePeriodSeconds 30"),
    ("longer drain than the grace period",
     lambda s, l, ls: _args_set(DEPLOY_C(s.deployment), "--shutdown-timeout", "60"),
     "SIGKILL before the drain ends"),
    ("liveness kills a draining server",
     lambda s, l, ls: DEPLOY_C(s.deployment)["livenessProbe"].update(failureThreshold=2),
     "it would kill a draining server"),
    ("scrape annotation on another port",
     lambda s, l, ls: s.deployment["spec"]["template"]["metadata"]["annotations"].update(
         {"prometheus.io/port": "9090"}),
     "annotation prometheus.io/port='9090'"),
    ("Service to a wrong target port",
     lambda s, l, ls: s.service["spec"]["ports"][0].update(targetPort="metrics"),
     "targetPort 'metrics'"),
    ("Service selecting other pods",
     lambda s, l, ls: s.service["spec"]["selector"].update(app="other"),
     "misses the pod"),
    ("another user than the image's",
     lambda s, l, ls: s.deployment["spec"]["template"]["spec"]["securityContext"].update(
         runAsUser=1000),
     "runAsUser 1000"),
    ("a KV pool bigger than the memory limit",
     lambda s, l, ls: _args_set(DEPLOY_C(s.deployment), "--kv-cache-memory", "4GiB"),
     "memory limit 3Gi <"),
    ("HPA on a metric the adapter does not serve",
     lambda s, l, ls: s.hpa["spec"]["metrics"][0]["pods"]["metric"].update(
         name="kvserve:num_requests_waiting"),
     "is not served by the adapter"),
    ("adapter rule on a series kvserve does not export",
     lambda s, l, ls: s.adapter["data"].update({"config.yaml": s.adapter["data"][
         "config.yaml"].replace("kvserve:num_requests_waiting{", "kvserve:requests_waiting{")}),
     "names no series kvserve exports"),
    ("adapter serving a name with a colon",
     lambda s, l, ls: s.adapter["data"].update({"config.yaml": s.adapter["data"][
         "config.yaml"].replace("as: kvserve_num_requests_waiting", "as: ''")}),
     "not a legal custom metric name"),
    ("HPA on a counter",
     lambda s, l, ls: s.adapter["data"].update({"config.yaml": s.adapter["data"][
         "config.yaml"].replace("kvserve:num_requests_waiting{", "kvserve:num_preemptions_total{")
         .replace("^kvserve:num_requests_waiting$", "^kvserve:num_preemptions_total$")}),
     "a counter"),
    ("LWS size != --tensor-parallel-size",
     lambda s, l, ls: l["spec"]["leaderWorkerTemplate"].update(size=4),
     "--tensor-parallel-size 3 != size 4"),
    ("WORLD_SIZE != size",
     lambda s, l, ls: (_set_env(LEADER_C(l), "WORLD_SIZE", "2"),
                       _set_env(WORKER_C(l), "WORLD_SIZE", "2")),
     "WORLD_SIZE='2', not the group size 3"),
    ("a worker with other engine flags",
     lambda s, l, ls: _args_set(WORKER_C(l), "--kv-cache-memory", "512MiB"),
     "engine flags differ from rank 0's"),
    ("a worker with a fixed RANK",
     lambda s, l, ls: _set_env(WORKER_C(l), "RANK", "1"),
     "rank 2: RANK='1', not its worker index 2"),
    ("no MASTER_ADDR",
     lambda s, l, ls: WORKER_C(l).update(env=[e for e in WORKER_C(l)["env"]
                                              if e["name"] != "MASTER_ADDR"]),
     "no MASTER_ADDR in the env"),
    ("MASTER_PORT not exposed on the leader",
     lambda s, l, ls: (_set_env(LEADER_C(l), "MASTER_PORT", "29501"),
                       _set_env(WORKER_C(l), "MASTER_PORT", "29501")),
     "MASTER_PORT='29501' is not a containerPort of the leader"),
    ("workers on another image",
     lambda s, l, ls: WORKER_C(l).update(image="kvserve:cuda"),
     "image kvserve:cuda, rank 0 runs kvserve:cpu"),
    ("a group that is not restarted whole",
     lambda s, l, ls: l["spec"]["leaderWorkerTemplate"].update(restartPolicy="None"),
     "restartPolicy None"),
    ("workers waiting for a leader that waits for them",
     lambda s, l, ls: l["spec"].update(startupPolicy="LeaderReady"),
     "startupPolicy LeaderReady"),
    ("an unknown LWS field",
     lambda s, l, ls: l["spec"]["leaderWorkerTemplate"].update(groupSize=3),
     "leaderWorkerTemplate.groupSize: unknown field"),
    ("a worker probed over HTTP",
     lambda s, l, ls: WORKER_C(l).update(readinessProbe=LEADER_C(l)["readinessProbe"]),
     "which a rank > 0 does not serve"),
    ("a worker that dies before the leader drained",
     lambda s, l, ls: WORKER_C(l).pop("lifecycle"),
     "cuts rank 0's drain short"),
    ("a rank count that does not divide the heads",
     lambda s, l, ls: (l["spec"]["leaderWorkerTemplate"].update(size=2),
                       _args_set(LEADER_C(l), "--tensor-parallel-size", "2"),
                       _args_set(WORKER_C(l), "--tensor-parallel-size", "2"),
                       _set_env(LEADER_C(l), "WORLD_SIZE", "2"),
                       _set_env(WORKER_C(l), "WORLD_SIZE", "2")),
     "does not divide"),
    ("leader Service selecting workers",
     lambda s, l, ls: ls["spec"].update(selector={LWS_LABEL + "name": "kvserve-tp"}),
     "selects a pod that serves no HTTP"),
    ("leader readiness without a probe budget for the group to join",
     lambda s, l, ls: LEADER_C(l)["startupProbe"].update(failureThreshold=12),
     "to start (startup probe)"),
]


@pytest.mark.parametrize("what,mutate,expected", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_checks_catch_a_broken_manifest(what, mutate, expected):
    docs = load_manifests()
    s, (lws, lws_service) = stack(docs), lws_parts(docs)
    mutate(s, lws, lws_service)
    problems = deployment_problems(s) + hpa_problems(s) + lws_problems(lws, lws_service)
    assert any(expected in p for p in problems), f"{what}: {problems}"
