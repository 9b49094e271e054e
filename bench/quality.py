"""Output quality of kvserve engine settings against float32, through the engine's own steps.

Each candidate (a comma list of `LLM` kwargs, e.g. `dtype=bfloat16,quantization=int4`) and the
float32 reference see the same token ids (8 passages: prose, code, a list, dialogue, numbers,
science, instructions, a chat exchange; 666 SmolLM2 tokens), and three things are compared:

  * prefill, teacher forced: each passage is one prompt run by `LLMEngine.step()`; the hidden
    states of every position are kept as the runner's forward returns them (whichever path it
    took: torch model or fused CPU kernels), and the model's own `compute_logits` (quantized
    head included) turns them into full next-token distributions.
  * decode, teacher forced: the passages' first tokens are prompts, all in one batch, and every
    later token is fed back one engine step at a time (the decode path: one query per sequence
    against the paged KV cache). The engine's sampler still runs; a wrapper only replaces the
    token it picked with the passage's next token, and keeps the logits it was given.
  * greedy: 8 chat prompts, 64 greedy tokens each (ignore_eos), compared token by token.

Per mode: top-1 agreement (argmax equal), mean and max KL(p_fp32 || p_candidate) in nats over
all positions, and the mean NLL of the passage tokens (the float32 one for scale). The
reference is float32 through the plain torch path (torch attention, no fused forward where the
engine has that switch), so `--candidates dtype=float32` checks the fast float32 kernels.
The "reference decode vs prefill" row checks the harness itself (expect KL ~1e-8).

    python bench/quality.py [--candidates "dtype=bfloat16" "dtype=bfloat16,quantization=int4"]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import inspect
import os
import platform
import subprocess
import sys
import time

import torch

# bench/kernels.py would shadow the `kernels` package: put the repository root first.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine import LLM, SamplingParams  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.loader import resolve_model  # noqa: E402
from engine.sampler import compute_logprobs  # noqa: E402
from engine.tokenizer import load_tokenizer  # noqa: E402

DEFAULT_CANDIDATES = ["dtype=bfloat16", "dtype=bfloat16,quantization=int4"]
BASE = {"device": "cpu", "enable_prefix_caching": False}  # every engine, unless overridden

PASSAGES = {
    "prose": (
        "The lighthouse had stood on the northern cliff for almost two hundred years. Every "
        "evening, just before the sun slipped beneath the grey water, the keeper climbed the "
        "hundred and twelve steps to light the lamp. Ships that passed in the night never saw "
        "him, but they trusted the steady beam that swept across the waves."),
    "code": (
        "def fibonacci(n: int) -> list[int]:\n"
        "    \"\"\"Return the first n Fibonacci numbers.\"\"\"\n"
        "    result = [0, 1]\n"
        "    while len(result) < n:\n"
        "        result.append(result[-1] + result[-2])\n"
        "    return result[:n]\n\n\n"
        "if __name__ == \"__main__\":\n"
        "    for i, value in enumerate(fibonacci(10)):\n"
        "        print(f\"{i}: {value}\")\n"),
    "list": (
        "Shopping list for the weekend:\n"
        "1. Two loaves of sourdough bread\n"
        "2. A dozen free-range eggs\n"
        "3. Fresh basil, garlic and cherry tomatoes\n"
        "4. Olive oil (the good one, not the cheap one)\n"
        "5. Coffee beans, dark roast\n"
        "6. Something for dessert, maybe dark chocolate"),
    "dialogue": (
        "\"Are you sure this is the right road?\" Maria asked, peering at the map.\n"
        "\"Absolutely,\" said Tom. \"We turn left at the old mill, then follow the river.\"\n"
        "\"You said that an hour ago.\"\n"
        "\"And I was right an hour ago, too. The mill just moved.\"\n"
        "She laughed despite herself and folded the map away."),
    "numbers": (
        "In 2023 the company reported revenue of $4.7 billion, up 12% from $4.2 billion in "
        "2022. Operating margin rose from 18.5% to 21.3%, while headcount grew by 1,250 to "
        "roughly 9,800 employees. The board approved a dividend of $0.85 per share, payable "
        "on March 15, 2024, to shareholders of record as of February 28."),
    "science": (
        "Photosynthesis converts light energy into chemical energy. In the chloroplasts of "
        "plant cells, chlorophyll absorbs mostly blue and red light, and that energy is used "
        "to split water molecules, releasing oxygen. The resulting energy carriers, ATP and "
        "NADPH, then drive the Calvin cycle, which fixes carbon dioxide into sugars."),
    "instructions": (
        "To reset your router, first unplug it from the power outlet and wait at least thirty "
        "seconds. Then plug it back in and wait for the status light to turn solid green. If "
        "the light keeps blinking orange, press and hold the reset button on the back for ten "
        "seconds, release it, and set up the network again from the admin page."),
}
CHAT = [  # the eighth passage, through the model's chat template
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of Australia, and why isn't it Sydney?"},
    {"role": "assistant", "content": "The capital of Australia is Canberra. When the colonies "
     "federated in 1901, Sydney and Melbourne both wanted to be the capital, so a compromise "
     "was reached: a new city would be built between them."},
    {"role": "user", "content": "When did the parliament move there?"},
    {"role": "assistant", "content": "Parliament first sat in Canberra in 1927; before that it "
     "met in Melbourne."},
]
GREEDY_PROMPTS = [
    "Write a short poem about the sea.",
    "Explain how a hash table works in three sentences.",
    "List four tips for sleeping better.",
    "What is 17 multiplied by 23? Show your working.",
    "Write a Python function that reverses a string.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue?",
]


def default_reference() -> str:
    """float32 through the plainest path this engine has: torch attention and, where the engine
    has the option, no fused CPU forward (enforce_eager), so optimized kernels are measured
    against the torch oracle rather than against themselves."""
    spec = "dtype=float32,attention_backend=torch"
    if "enforce_eager" in inspect.signature(LLMEngine.from_args).parameters:
        spec += ",enforce_eager=true"
    return spec


def parse_kwargs(spec: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"candidate setting {item!r} is not key=value (in {spec!r})")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        elif low == "none":
            out[key] = None
        else:
            try:
                out[key] = int(value)
            except ValueError:
                out[key] = value
    return out


def encode_inputs(model: str | None) -> tuple[dict[str, list[int]], list[list[int]]]:
    """The token ids every engine gets (the reference model's tokenizer, loaded once)."""
    tok = load_tokenizer(resolve_model(model))
    passages = {name: tok.encode(text) for name, text in PASSAGES.items()}
    passages["chat"] = tok.apply_chat_template(CHAT, add_generation_prompt=False)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in GREEDY_PROMPTS]
    return passages, prompts


def _drain(engine, rids: set[str]) -> dict:
    done = {}
    try:
        while len(done) < len(rids):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
    except BaseException:
        for rid in rids:
            engine.abort_request(rid)
        raise
    return done


@contextlib.contextmanager
def capture_hidden(runner):
    """Collects the hidden states [T, hidden] of every forward the runner makes, whichever path
    makes them: the runner's own `forward` (torch model or fused CPU kernels) where it has one,
    else the torch model's (a forward hook)."""
    hidden: list[torch.Tensor] = []
    if callable(getattr(runner, "forward", None)):
        inner = runner.forward

        def forward(*args, **kwargs):
            out = inner(*args, **kwargs)
            hidden.append(out.detach().clone())
            return out
        runner.forward = forward
        try:
            yield hidden
        finally:
            del runner.forward  # back to the class's method
    else:
        handle = runner.model.register_forward_hook(
            lambda mod, args, out: hidden.append(out.detach().clone()))
        try:
            yield hidden
        finally:
            handle.remove()


@torch.inference_mode()
def prefill_logprobs(llm: LLM, passages: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Per passage: [n - 1, V] log-probabilities of positions 0..n-2, from one prefill step."""
    engine = llm.engine
    result = {}
    with capture_hidden(engine.runner) as hidden:
        for name, ids in passages.items():
            hidden.clear()
            rid = f"quality-prefill-{name}"
            engine.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=1))
            _drain(engine, {rid})
            h = torch.cat(hidden)  # the prompt's forward(s), chunks in order, and nothing else
            assert h.shape[0] == len(ids), (name, h.shape, len(ids))
            logits = engine.runner.model.compute_logits(h[:len(ids) - 1])
            result[name] = compute_logprobs(logits).cpu()
    return result


class ForcingSampler:
    """Runs the engine's sampler, then swaps each picked token for the passage's next one and
    keeps the logits the engine sampled from."""

    def __init__(self, inner, targets: dict[str, list[int]]):
        self.inner, self.targets = inner, targets
        self.rows: dict[str, list[torch.Tensor]] = {rid: [] for rid in targets}

    def __call__(self, logits: torch.Tensor, seqs, offsets=None):
        out = self.inner(logits, seqs, offsets)
        lp = compute_logprobs(logits)
        forced = []
        for i, seq in enumerate(seqs):
            rows = self.rows[seq.request_id]
            assert seq.num_tokens == len(rows) + 1, (seq, len(rows))  # position = num_tokens - 1
            rows.append(lp[i].cpu())
            forced.append(self.targets[seq.request_id][seq.num_tokens])
        tokens = torch.tensor(forced, dtype=out.tokens.dtype, device=out.tokens.device)
        return dataclasses.replace(out, tokens=tokens, logprobs=lp.gather(1, tokens[:, None])[:, 0])

    def __getattr__(self, name):  # anything else the engine reads off its sampler
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


@torch.inference_mode()
def decode_logprobs(llm: LLM, passages: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Per passage: [n - 1, V] log-probabilities, one decode step per token, all in one batch."""
    engine = llm.engine
    targets = {f"quality-decode-{name}": ids for name, ids in passages.items()}
    forcer = ForcingSampler(engine.sampler, targets)
    engine.sampler = forcer
    try:
        for rid, ids in targets.items():
            engine.add_request(rid, ids[:1], SamplingParams(
                temperature=0, max_tokens=len(ids) - 1, ignore_eos=True))
        outs = _drain(engine, set(targets))
    finally:
        engine.sampler = forcer.inner
    result = {}
    for rid, ids in targets.items():
        assert list(outs[rid].outputs[0].token_ids) == ids[1:], rid
        result[rid.removeprefix("quality-decode-")] = torch.stack(forcer.rows[rid])
    return result


def greedy(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def run_setting(spec: str, passages, prompts, greedy_tokens: int) -> dict:
    kwargs = {**BASE, "max_num_seqs": max(len(passages), len(prompts)), **parse_kwargs(spec)}
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = {"prefill": prefill_logprobs(llm, passages), "decode": decode_logprobs(llm, passages),
           "greedy": greedy(llm, prompts, greedy_tokens)}
    res["seconds"] = (load, time.perf_counter() - t0)
    cfg = llm.engine.config
    fused = "on" if getattr(llm.engine.runner, "fast", None) is not None else "off"
    res["path"] = (f"{str(cfg.dtype).removeprefix('torch.')}, attention {cfg.attention_backend}, "
                   f"fused CPU forward {fused}")
    print(f"  {spec} ({res['path']}): loaded in {load:.1f}s, measured in "
          f"{res['seconds'][1]:.1f}s", file=sys.stderr)
    del llm
    return res


def compare_distributions(ref: dict[str, torch.Tensor], cand: dict[str, torch.Tensor],
                          passages: dict[str, list[int]]) -> dict:
    kls, agree, nll_ref, nll_cand = [], [], [], []
    for name, ids in passages.items():
        p, q = ref[name].double(), cand[name].double()  # [n - 1, V] log-probs
        assert p.shape == q.shape, (name, p.shape, q.shape)
        prob = p.exp()
        kl = torch.where(prob > 0, prob * (p - q), torch.zeros_like(p)).sum(-1)
        kls.append(kl.clamp_min(0))  # rounding can make a near-zero KL a hair negative
        agree.append(p.argmax(-1) == q.argmax(-1))
        target = torch.tensor(ids[1:])[:, None]
        nll_ref.append(-p.gather(1, target)[:, 0])
        nll_cand.append(-q.gather(1, target)[:, 0])
    kl, agree = torch.cat(kls), torch.cat(agree)
    return {"positions": kl.numel(), "top1": agree.double().mean().item(),
            "kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "nll_ref": torch.cat(nll_ref).mean().item(), "nll": torch.cat(nll_cand).mean().item()}


def compare_greedy(ref: list[list[int]], cand: list[list[int]]) -> dict:
    prefixes = []
    for a, b in zip(ref, cand):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefixes.append(n)
    return {"identical": sum(a == b for a, b in zip(ref, cand)) / len(ref),
            "prefix_mean": sum(prefixes) / len(prefixes), "prefixes": prefixes,
            "length": max(len(a) for a in ref)}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return (f"{platform.platform()}, {cpu}, {os.cpu_count()} cpus, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), python {platform.python_version()}"
            + (f", kvserve {commit}" if commit else ""))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidates", nargs="+", default=DEFAULT_CANDIDATES,
                    help="each a comma list of LLM kwargs, e.g. dtype=bfloat16,quantization=int4")
    ap.add_argument("--reference", default=None,
                    help="the reference setting; default: " + default_reference())
    ap.add_argument("--greedy-tokens", type=int, default=64)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    args.reference = args.reference or default_reference()
    print(f"reference {args.reference}", file=sys.stderr)
    passages, prompts = encode_inputs(parse_kwargs(args.reference).get("model"))
    ref = run_setting(args.reference, passages, prompts, args.greedy_tokens)
    paths = [(args.reference, ref["path"])]
    rows = [("reference decode vs prefill", compare_distributions(ref["prefill"], ref["decode"],
                                                                  passages), None)]
    for spec in args.candidates:
        cand = run_setting(spec, passages, prompts, args.greedy_tokens)
        paths.append((spec, cand["path"]))
        for mode in ("prefill", "decode"):
            g = compare_greedy(ref["greedy"], cand["greedy"]) if mode == "decode" else None
            rows.append((f"{spec} [{mode}]",
                         compare_distributions(ref[mode], cand[mode], passages), g))
        del cand

    n_tokens = sum(len(ids) for ids in passages.values())
    print(f"\n## kvserve quality vs {args.reference} "
          f"({datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')})\n")
    print(f"machine: {machine()}\n")
    for spec, path in paths:
        print(f"- `{spec}`: {path}")
    print()
    print(f"teacher forcing over {len(passages)} passages ({n_tokens} tokens, "
          f"{rows[0][1]['positions']} scored positions; prefill = one forward per passage, "
          f"decode = one engine step per token, {len(passages)} sequences batched); greedy = "
          f"{len(prompts)} chat prompts x {args.greedy_tokens} tokens, ignore_eos. "
          f"KL(p_ref || p_cand) in nats; NLL = mean -log p(passage token) "
          f"(reference: {rows[0][1]['nll_ref']:.4f} prefill).\n")
    print("| setting [path] | positions | top-1 agree | mean KL | max KL | NLL | "
          "greedy identical | greedy common prefix |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, d, g in rows:
        greedy_cells = (f"{round(g['identical'] * len(prompts))}/{len(prompts)} | "
                        f"{g['prefix_mean']:.1f}/{g['length']}") if g else " | "
        print(f"| {name} | {d['positions']} | {d['top1']:.4f} | {d['kl_mean']:.2e} | "
              f"{d['kl_max']:.2e} | {d['nll']:.4f} | {greedy_cells} |")
    for name, d, g in rows:
        if g:
            print(f"\n{name.removesuffix(' [decode]')}: greedy common prefix per prompt "
                  f"{g['prefixes']}")
    print(f"\ntotal time {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
