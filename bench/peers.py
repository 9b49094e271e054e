"""kvserve against llama.cpp's server, same model, same `kvserve bench` workloads.

    .venv/bin/python bench/peers.py                 # build llama-server once, then both runs
    .venv/bin/python bench/peers.py --build-only    # just the llama.cpp build (cached)
    .venv/bin/python bench/peers.py --streams 16 --prompts-per-stream 4 --save peers.json

llama.cpp's `llama-server` is built from the source vendored in the llama-cpp-python==0.3.36
sdist (`pip download --no-binary :all:`), cmake target `llama-server`, into a cache outside
the repo (~/.cache/kvserve/llama.cpp, or $KVSERVE_CACHE). The build takes several minutes on
2 cores and happens once. Both servers serve the same SmolLM2-135M-Instruct Q4_1 GGUF. For
each workload (N concurrent streams, random 128-token prompts, 128 output tokens, ignore_eos)
a fresh llama-server with N slots and then a fresh kvserve run the same `kvserve bench`; the
table prints output throughput, median TTFT and median ITL, with the throughput ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/kernels.py would shadow the `kernels` package: put the repository root first.
sys.path.insert(0, str(ROOT))

from bench.serve import Server, kvserve_cmd  # noqa: E402

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
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
                            "--no-deps", "--no-build-isolation", LLAMA_CPP_PYTHON,
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


def kvserve_peer_cmd(port: int, dtype: str, max_num_seqs: int,
                     quantization: str | None) -> list[str]:
    # kvserve's fastest CPU settings (README): bfloat16 on CPUs with AVX-512 BF16, a batch
    # as wide as the streams, optionally int4 weights.
    return kvserve_cmd(port, dtype, ["--max-num-seqs", str(max_num_seqs),
                                     "--served-model-name", MODEL_ALIAS]
                       + (["--quantization", quantization] if quantization else []))


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
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", help="kvserve's --dtype")
    p.add_argument("--quantization", default=None, help="kvserve's --quantization (int4)")
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
    ctx_per_slot = 2 * (args.input_len + args.output_len) + 64
    # Each workload gets fresh servers sized for it (llama-server's slots = streams, its
    # fastest setting for that many streams), and the two servers alternate workload by
    # workload so a noisy spell on the machine hits both.
    peers = {
        "llama.cpp": lambda port, n: llama_cpp_cmd(binary, gguf, port, n, ctx_per_slot,
                                                   args.threads),
        "kvserve": lambda port, n: kvserve_peer_cmd(port, args.dtype, max(n, 16), args.quantization),
    }
    if args.only:
        peers = {args.only: peers[args.only]}
    results: dict[str, dict[int, dict]] = {}
    for n in args.streams:
        num = max(args.min_prompts, n * args.prompts_per_stream)
        for name, make_cmd in peers.items():
            server = Server(lambda port: make_cmd(port, n), name)
            try:
                log(f"{name}: {n} streams, {num} prompts x {args.output_len} tokens")
                results.setdefault(name, {})[n] = run_bench(
                    server.url, n, num, args.input_len, args.output_len, args.seed)
            finally:
                server.stop()
    print(format_table(results, args))
    if args.save:
        Path(args.save).write_text(json.dumps({"config": vars(args), "results": results},
                                              indent=1, default=str))
    return 0


def _row(r: dict) -> tuple[float, float, float]:
    """(output tok/s, median TTFT ms, median ITL ms) from a `kvserve bench --save-result`."""
    m = r["metrics"]
    if m["failed"] or not m["token_counts_from_usage"]:
        raise SystemExit(f"a run had {m['failed']} failed requests or no usage counts: "
                         f"{r.get('errors')}")
    return (m["output_throughput"], m["ttft_ms"]["median"], m["itl_ms"]["median"])


def format_table(results: dict[str, dict[int, dict]], args) -> str:
    lines = [f"machine: {platform.machine()} {os.cpu_count()} cpus, {platform.processor() or ''}"
             f" python {platform.python_version()}; input {args.input_len} tokens, output "
             f"{args.output_len}, ignore_eos, kvserve --dtype {args.dtype}"
             + (f" --quantization {args.quantization}" if args.quantization else ""),
             "",
             "| streams | llama.cpp tok/s | kvserve tok/s | ratio | llama.cpp TTFT p50 ms | "
             "kvserve TTFT p50 ms | llama.cpp ITL p50 ms | kvserve ITL p50 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for n in args.streams:
        a = results.get("llama.cpp", {}).get(n)
        b = results.get("kvserve", {}).get(n)
        fa = _row(a) if a else (float("nan"),) * 3
        fb = _row(b) if b else (float("nan"),) * 3
        ratio = fb[0] / fa[0] if a and b and fa[0] else float("nan")
        lines.append(f"| {n} | {fa[0]:.1f} | {fb[0]:.1f} | {ratio:.2f}x | {fa[1]:.0f} | "
                     f"{fb[1]:.0f} | {fa[2]:.1f} | {fb[2]:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
