"""kvserve against llama.cpp's server, same model, same `kvserve bench` workloads.

    .venv/bin/python bench/peers.py                 # build llama-server once, then both runs
    .venv/bin/python bench/peers.py --build-only    # just the llama.cpp build (cached)
    .venv/bin/python bench/peers.py --streams 16 --prompts-per-stream 4 --save peers.json
    .venv/bin/python bench/peers.py --input-lens 32 --kvserve-args "--dtype bfloat16"

llama.cpp's `llama-server` is built from the source vendored in the llama-cpp-python==0.3.36
sdist (`pip download --no-binary llama-cpp-python`), cmake target `llama-server`, into a cache
outside the repo (~/.cache/kvserve/llama.cpp, or $KVSERVE_CACHE). The build takes about ten
minutes on 2 cores and happens once. Both servers serve the same SmolLM2-135M-Instruct Q4_1
GGUF. A workload is (input length, N concurrent streams): random prompts of --input-lens tokens
(default 32, where decode dominates, and 128, where llama.cpp's slow 4-bit prefill shows), 128
output tokens, ignore_eos, for each of --streams (default 1, 4, 16). For each workload a fresh
llama-server with N slots and then a fresh kvserve run the same `kvserve bench`; the table
prints output throughput, median TTFT and median ITL, with the throughput ratio.

kvserve runs with the default `kvserve serve` settings plus --max-num-seqs max(N, 16), unless
--dtype, --quantization or --kvserve-args (extra flags, shell-quoted, appended) say otherwise;
the table's header line names the flags used.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/kernels.py would shadow the `kernels` package: put the repository root first.
sys.path.insert(0, str(ROOT))

from bench.serve import Server  # noqa: E402

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
SDIST_DIR_NAME = "llama_cpp_python-0.3.36"
MODEL_ALIAS = "SmolLM2-135M-Instruct"
CACHE = Path(os.environ.get("KVSERVE_CACHE", Path.home() / ".cache" / "kvserve")) / "llama.cpp"


def log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def llama_server_binary() -> Path:
    return CACHE / "build" / "bin" / "llama-server"


def build_llama_server(jobs: int | None = None) -> Path:
    """The cached llama-server binary; downloads the sdist and builds it the first time."""
    binary = llama_server_binary()
    if binary.exists():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    src = CACHE / SDIST_DIR_NAME / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").exists():
        tarballs = sorted(CACHE.glob(f"{SDIST_DIR_NAME}.tar.gz"))
        if not tarballs:
            log(f"downloading the {LLAMA_CPP_PYTHON} sdist (source only) into {CACHE}")
            # Source only for llama-cpp-python itself; pip (26+) still prepares its metadata,
            # so its build backend (scikit-build-core) comes as wheels in an isolated env.
            subprocess.run([sys.executable, "-m", "pip", "download",
                            "--no-binary", "llama-cpp-python", "--no-deps", LLAMA_CPP_PYTHON,
                            "-d", str(CACHE)], check=True)
            tarballs = sorted(CACHE.glob(f"{SDIST_DIR_NAME}.tar.gz"))
        with tarfile.open(tarballs[0]) as tf:
            tf.extractall(CACHE, filter="data")
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise SystemExit(f"building llama-server needs {tool!r} on PATH")
    build = CACHE / "build"
    # Release, native CPU flags (llama.cpp's default), no web UI download, no TLS, no tests.
    configure = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
                 "-DBUILD_SHARED_LIBS=OFF"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    log("configuring llama.cpp: " + " ".join(configure))
    subprocess.run(configure, check=True)
    jobs = jobs or os.cpu_count() or 2
    log(f"building llama-server with {jobs} jobs (several minutes on 2 cores)")
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server",
                    "-j", str(jobs)], check=True)
    if not binary.exists():
        raise SystemExit(f"the build finished but {binary} is missing")
    return binary


def llama_cpp_cmd(binary: Path, gguf: str, port: int, slots: int, ctx_per_slot: int,
                  threads: int) -> list[str]:
    # llama-server's documented throughput settings for many streams: one slot per stream
    # (-np), a context of slots x per-slot length, continuous batching (its default), flash
    # attention where supported (auto), all cores, no web UI.
    return [str(binary), "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
            "-t", str(threads), "-np", str(slots), "-c", str(slots * ctx_per_slot),
            "-cb", "-fa", "auto", "--no-webui", "-a", MODEL_ALIAS]


def kvserve_flags(dtype: str | None, quantization: str | None, extra: list[str]) -> list[str]:
    """kvserve's settings beyond the defaults (and beyond --max-num-seqs): what was asked for."""
    return ((["--dtype", dtype] if dtype else [])
            + (["--quantization", quantization] if quantization else []) + extra)


def kvserve_peer_cmd(port: int, max_num_seqs: int, flags: list[str]) -> list[str]:
    # The default `kvserve serve` (its own dtype, attention backend, ...) with a batch at least
    # as wide as the streams; `flags` (kvserve_flags) come last, so they win.
    return [sys.executable, "-m", "server.cli", "--log-level", "WARNING", "serve",
            "--port", str(port), "--max-num-seqs", str(max_num_seqs),
            "--served-model-name", MODEL_ALIAS, *flags]


def run_bench(url: str, streams: int, num_prompts: int, input_len: int, output_len: int,
              seed: int) -> dict:
    """One `kvserve bench` run (the real CLI, as a user runs it); returns its saved result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "server.cli", "bench", "--base-url", url,
               "--model", MODEL_ALIAS, "--endpoint", "completions", "--dataset", "random",
               "--num-prompts", str(num_prompts), "--input-len", str(input_len),
               "--output-len", str(output_len), "--ignore-eos", "--seed", str(seed),
               "--max-concurrency", str(streams), "--request-rate", "inf",
               "--warmup", str(min(streams, 4)), "--save-result", str(out)]
        subprocess.run(cmd, cwd=ROOT, check=True)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--prompts-per-stream", type=int, default=3,
                   help="requests per workload = streams x this (at least --min-prompts)")
    p.add_argument("--min-prompts", type=int, default=8)
    p.add_argument("--input-lens", "--input-len", dest="input_lens", type=int, nargs="+",
                   default=[32, 128], help="prompt lengths in tokens; each x each --streams "
                   "is a workload (32: decode dominates; 128: prefill shows too)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default=None,
                   help="kvserve's --dtype (default: none passed, the server picks)")
    p.add_argument("--quantization", default=None, help="kvserve's --quantization (int4)")
    p.add_argument("--kvserve-args", default="",
                   help='extra `kvserve serve` flags, one shell-quoted string, appended '
                        '(e.g. "--attention-backend torch")')
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                   help="llama-server -t")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["llama.cpp", "kvserve"], default=None)
    p.add_argument("--save", default=None, help="write all results as JSON here")
    args = p.parse_args(argv)
    binary = build_llama_server()
    log(f"llama-server: {binary}")
    if args.build_only:
        return 0
    from engine.loader import default_gguf_path
    gguf = default_gguf_path()
    # One llama-server context per slot, sized for the longest prompt (with room for a
    # tokenizer that counts the random prompts longer than kvserve's does).
    ctx_per_slot = 2 * (max(args.input_lens) + args.output_len) + 64
    flags = kvserve_flags(args.dtype, args.quantization, shlex.split(args.kvserve_args))
    # Each workload gets fresh servers sized for it (llama-server's slots = streams, its
    # fastest setting for that many streams), and the two servers alternate workload by
    # workload so a noisy spell on the machine hits both.
    peers = {
        "llama.cpp": lambda port, n: llama_cpp_cmd(binary, gguf, port, n, ctx_per_slot,
                                                   args.threads),
        "kvserve": lambda port, n: kvserve_peer_cmd(port, max(n, 16), flags),
    }
    if args.only:
        peers = {args.only: peers[args.only]}
    results: dict[tuple[int, int], dict[str, dict]] = {}
    for input_len in args.input_lens:
        for n in args.streams:
            num = max(args.min_prompts, n * args.prompts_per_stream)
            for name, make_cmd in peers.items():
                server = Server(lambda port: make_cmd(port, n), name)
                try:
                    log(f"{name}: {n} streams, {num} prompts, {input_len}-token prompts x "
                        f"{args.output_len} tokens")
                    results.setdefault((input_len, n), {})[name] = run_bench(
                        server.url, n, num, input_len, args.output_len, args.seed)
                finally:
                    server.stop()
    print(format_table(results, args, flags))
    if args.save:
        workloads = [{"input_len": i, "streams": n, **r} for (i, n), r in results.items()]
        Path(args.save).write_text(json.dumps(
            {"config": {**vars(args), "kvserve_flags": flags}, "workloads": workloads},
            indent=1, default=str))
    return 0


def _row(r: dict) -> tuple[float, float, float]:
    """(output tok/s, median TTFT ms, median ITL ms) from a `kvserve bench --save-result`."""
    m = r["metrics"]
    if m["failed"] or not m["token_counts_from_usage"]:
        raise SystemExit(f"a run had {m['failed']} failed requests or no usage counts: "
                         f"{r.get('errors')}")
    return (m["output_throughput"], m["ttft_ms"]["median"], m["itl_ms"]["median"])


def format_table(results: dict[tuple[int, int], dict[str, dict]], args,
                 flags: list[str]) -> str:
    kv = " ".join(["kvserve serve --max-num-seqs max(streams,16)", *map(shlex.quote, flags)])
    lines = [f"machine: {platform.machine()} {os.cpu_count()} cpus, {platform.processor() or ''}"
             f" python {platform.python_version()}; random prompts of `input` tokens, output "
             f"{args.output_len}, ignore_eos; {kv}"
             + ("" if flags else " (server defaults otherwise)")
             + f"; llama-server -t {args.threads} -np streams",
             "",
             "| input | streams | llama.cpp tok/s | kvserve tok/s | ratio | "
             "llama.cpp TTFT p50 ms | kvserve TTFT p50 ms | llama.cpp ITL p50 ms | "
             "kvserve ITL p50 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (input_len, n), r in results.items():
        a, b = r.get("llama.cpp"), r.get("kvserve")
        fa = _row(a) if a else (float("nan"),) * 3
        fb = _row(b) if b else (float("nan"),) * 3
        ratio = fb[0] / fa[0] if a and b and fa[0] else float("nan")
        lines.append(f"| {input_len} | {n} | {fa[0]:.1f} | {fb[0]:.1f} | {ratio:.2f}x | "
                     f"{fa[1]:.0f} | {fb[1]:.0f} | {fa[2]:.1f} | {fb[2]:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
