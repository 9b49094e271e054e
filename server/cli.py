"""`kvserve` command line: serve (the HTTP API), generate (offline, one prompt), info (capacity),
bench (load-test a server)."""
from __future__ import annotations

import argparse
import logging
import sys

# kernels/kvquant.py's KV_CACHE_DTYPES and the fp8 alias (not imported: it loads torch,
# which `kvserve --help` does not need)
KV_CACHE_DTYPES = ["auto", "int8", "fp8", "fp8_e4m3", "fp8_e5m2"]


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="default: SmolLM2-135M-Instruct; or a .gguf file or a Hugging Face dir")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--kv-cache-memory", default=None, help="KV budget, e.g. 2GiB")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--prefill-chunk", type=int, default=512,
                   help="while any stream is generating, prompts get this many tokens per step "
                        "between them, fewer deep into a long prompt (its attention costs "
                        "more), so other streams keep their pace; 0: no limit (default 512)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "cpu", "triton"])
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    g.add_argument("--quantization", default="auto",
                   choices=["auto", "none", "gguf", "int8", "int4"],
                   help="auto (default): gguf where the fused CPU step runs on AVX-512 VNNI and "
                        "--dtype is not float32, else none; gguf: the fused step runs weights "
                        "already on a 4-bit grid (a Q4_0/Q4_1/Q4_K file's) as int4 with their "
                        "exact codes and the rest as int8, times int8-rounded activations "
                        "(llama.cpp's Q8 activations); int8: all int8; int4: weight-only int4 "
                        "linears (torch kernel, eager step)")
    g.add_argument("--kv-cache-dtype", default="auto",
                   choices=KV_CACHE_DTYPES,
                   help="KV cache storage: auto (the model dtype), int8 (a fp16 scale per token "
                        "and KV head: ~2x the tokens of bf16, ~4x of float32), fp8_e4m3 / "
                        "fp8_e5m2 (fp8 = fp8_e4m3; a scale per KV head, 1.0 as in vLLM)")
    g.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="ranks that each hold 1/N of every layer and of the KV cache, over "
                        "torch.distributed (gloo on CPU, nccl on CUDA): spawned on this machine, "
                        "or started by a launcher that sets RANK, WORLD_SIZE, MASTER_ADDR and "
                        "MASTER_PORT (rank 0 serves HTTP, the others only compute)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="run every step as eager torch ops (no fused CPU decode forward)")
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_min": 2, '
                        '"prompt_lookup_max": 4}\' (prompt lookup: drafts copied from the '
                        'context; lossless, backs off where drafts are rarely accepted)')


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(model=args.model, dtype=args.dtype, device=args.device,
                block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                prefill_chunk=args.prefill_chunk,
                max_model_len=args.max_model_len, attention_backend=args.attention_backend,
                load_format=args.load_format, quantization=args.quantization,
                enforce_eager=args.enforce_eager, speculative_config=args.speculative_config,
                kv_cache_dtype=args.kv_cache_dtype,
                tensor_parallel_size=args.tensor_parallel_size)


def cmd_generate(args: argparse.Namespace) -> int:
    from engine import LLMEngine, SamplingParams
    engine = LLMEngine.from_args(**engine_kwargs(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                            seed=args.seed, ignore_eos=args.ignore_eos)
    prompt = args.prompt
    if args.chat:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    else:
        sys.stdout.write(prompt)
    engine.add_request("cli", prompt, params)
    printed = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
    sys.stdout.write("\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from engine.capacity import plan_capacity, read_model_config
    source, model_cfg = read_model_config(args.model)
    plan = plan_capacity(model_cfg, dtype=args.dtype, device=args.device,
                         block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                         kv_cache_memory=args.memory, max_model_len=args.max_model_len,
                         seq_len=args.seq_len, max_num_batched_tokens=args.max_num_batched_tokens,
                         max_num_seqs=args.max_num_seqs, model_name=source.name,
                         kv_cache_dtype=args.kv_cache_dtype)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.format())
    return 0


def add_info_parser(sub) -> None:
    info = sub.add_parser("info", help="parameters, KV bytes per token, KV blocks for a budget "
                                       "and sequences that fit at once (loads no weights)")
    info.add_argument("--model", default=None,
                      help="default: SmolLM2-135M-Instruct; or a .gguf file or a Hugging Face dir")
    info.add_argument("--memory", "--kv-cache-memory", dest="memory", default=None,
                      help="KV budget, e.g. 2GiB (default: the engine's for the device)")
    info.add_argument("--num-kv-blocks", type=int, default=None, help="overrides --memory")
    info.add_argument("--max-model-len", type=int, default=None)
    info.add_argument("--seq-len", type=int, default=None,
                      help="sequence length for 'fit at once' (default: max model len)")
    info.add_argument("--block-size", type=int, default=16)
    info.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    info.add_argument("--device", default="auto", help="auto | cpu | cuda")
    info.add_argument("--max-num-batched-tokens", type=int, default=2048)
    info.add_argument("--max-num-seqs", type=int, default=64)
    info.add_argument("--kv-cache-dtype", default="auto",
                      choices=KV_CACHE_DTYPES)
    info.add_argument("--json", action="store_true", help="print the numbers as JSON")
    info.set_defaults(func=cmd_info)


def add_app_args(p: argparse.ArgumentParser) -> None:
    """`kvserve serve`'s options for the app and its engine thread (server.serve.build_server)."""
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (not on /health, /metrics)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="waiting requests beyond this get 429 + Retry-After")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds; a request past it ends with finish_reason 'timeout'")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="request bodies above this get 413 (default: 4 MiB)")


def app_options(args: argparse.Namespace) -> dict:
    return dict(api_key=args.api_key, max_queue=args.max_queue,
                request_timeout=args.request_timeout,
                served_model_name=args.served_model_name,
                max_request_bytes=args.max_request_bytes)


def cmd_serve(args: argparse.Namespace) -> int:
    from engine import tp
    launched = tp.env_world()
    if launched is not None and launched[0] > 0:  # a launcher's rank > 0: compute only
        return tp.run_launched_rank(engine_kwargs(args))
    from server.serve import serve
    return serve(engine_kwargs(args), host=args.host, port=args.port,
                 shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
                 **app_options(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvserve", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream the continuation of one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)
    add_info_parser(sub)
    from clients.bench import add_bench_parser  # stdlib only; httpx etc. load when it runs
    add_bench_parser(sub)
    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="seconds running requests get to finish after SIGTERM")
    add_app_args(srv)
    add_engine_args(srv)
    srv.set_defaults(func=cmd_serve)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"kvserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
