"""The engine end to end on a GPU: Triton backend, prefix caching, sliding-window eviction,
copy-on-write forks and the sampler on CUDA, against the torch backend on the CPU.

Needs only torch, transformers and safetensors (what the lent GPU machine has): the models
are tiny random Llama / Mistral directories made here.  Without CUDA it runs the same checks
with the torch backend on the CPU (to test this script).

    python bench/gpu_engine.py
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LLM, SamplingParams  # noqa: E402


def make(kind: str, path: str) -> None:
    import transformers
    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                  initializer_range=0.2, tie_word_embeddings=False)
    if kind == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=32)
        model = transformers.MistralForCausalLM(cfg)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    model.save_pretrained(path)


def main() -> None:
    cuda = torch.cuda.is_available()
    dev, backend = ("cuda", "triton") if cuda else ("cpu", "torch")
    print(f"device: {torch.cuda.get_device_name() if cuda else 'CPU (no CUDA)'}; "
          f"torch {torch.__version__}")
    prompts = [[(7 * i + 3 * j) % 500 + 1 for j in range(n)] for i, n in
               enumerate([1, 5, 17, 40, 90, 33, 64, 150])]
    greedy = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("llama", "mistral"):
            path = os.path.join(tmp, kind)
            make(kind, path)
            ref = LLM(model=path, dtype="float32", device="cpu", attention_backend="torch",
                      block_size=16, num_kv_blocks=256)
            want = [o.outputs[0].token_ids for o in ref.generate(prompts, greedy, use_tqdm=False)]
            for dtype in ("float32", "bfloat16"):
                llm = LLM(model=path, dtype=dtype, device=dev, attention_backend=backend,
                          block_size=16, num_kv_blocks=64 if kind == "mistral" else 256)
                t0 = time.perf_counter()
                got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy,
                                                                     use_tqdm=False)]
                dt = time.perf_counter() - t0
                same = sum(a == b for a, b in zip(got, want))
                agree = sum(x == y for a, b in zip(got, want) for x, y in zip(a, b)) \
                    / sum(len(b) for b in want)
                again = llm.generate(prompts, greedy, use_tqdm=False)  # prefix-cache hits
                hits = llm.engine.stats["prefix_cache_hits"]
                same_again = sum(o.outputs[0].token_ids == g for o, g in zip(again, got))
                fork = llm.generate([prompts[4]], SamplingParams(n=4, temperature=1.0, seed=5,
                                                                 max_tokens=24,
                                                                 ignore_eos=True),
                                    use_tqdm=False)[0].outputs
                alone = [llm.generate([prompts[4]], SamplingParams(temperature=1.0, seed=5 + i,
                                                                   max_tokens=24,
                                                                   ignore_eos=True),
                                      use_tqdm=False)[0].outputs[0].token_ids for i in range(4)]
                forks_ok = [c.token_ids for c in fork] == alone
                pool = llm.engine.kv.pool
                pool.check_integrity([])
                rows.append((kind, dtype, f"{same}/{len(prompts)}", f"{100 * agree:.1f}%",
                             f"{same_again}/{len(prompts)}", hits, forks_ok, pool.num_used,
                             f"{dt:.2f}s"))
    head = ("model", "dtype", "seqs = CPU", "tokens = CPU", "cached rerun =", "hit tokens",
            "n=4 forks = seeds alone", "blocks left", "time")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(str(x) for x in r))
    print("expect: float32 seqs all equal to the CPU run; bfloat16 close; cached rerun equal; "
          "forks True; blocks left 0")


if __name__ == "__main__":
    main()
