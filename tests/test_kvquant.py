"""Quantized KV cache (kv_cache_dtype int8 / fp8_e4m3 / fp8_e5m2): what a stored value is
(kernels/kvquant.py), the CPU kernels against the torch reference on quantized caches, the
fused step against the torch path, capacity, and SmolLM2's greedy tokens against the
unquantized cache. The KV features with int8 blocks (prefix caching, forks, preemption,
window eviction) are in tests/test_kv_features.py."""
import pytest
import torch

from engine import LLM, SamplingParams
from engine.capacity import plan_capacity
from kernels import cpu, kvquant
from kernels.reference import paged_attention_ref, store_kv_ref

FORMATS = ["int8", "fp8_e4m3", "fp8_e5m2"]
# fused vs eager logprobs: measured 3e-6 unquantized; a quantized cache can store a code one
# step apart where the paths' float32 noise straddles a rounding boundary (measured: int8
# 0.0067 at one of 48 positions here, fp8 < 1e-4)
TOL = {"auto": 1e-4, "int8": 0.02, "fp8_e4m3": 0.02, "fp8_e5m2": 0.02}  # logprob, fused vs eager
needs_kernels = pytest.mark.skipif(not cpu.available(),
                                   reason=f"CPU kernels unavailable: {cpu.unavailable_reason()}")


def _spread(n: int, d: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes (1e-4 .. 1e3), one of them all zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * torch.logspace(-4, 3, n)[:, None]
    x[n // 2] = 0
    return x.to(dtype)


# ------------------------------------------------------------------ what a stored value is

def test_int8_round_trip_is_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(400, 1, 64, generator=gen)  # [T, Hkv, D], rows of 1e-2 .. 1e3
         * torch.logspace(-2, 3, 400)[:, None, None])
    x[200] = 0
    codes, scale = kvquant.quantize(x, torch.int8)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16
    assert codes.abs().max() <= 127
    back = kvquant.dequantize(codes, scale)
    step = scale.float()[..., None]
    assert ((back - x).abs() <= step / 2 * (1 + 1e-6)).all()
    # each row's largest value is code +-127 and keeps its magnitude up to the fp16
    # rounding of the scale (max / 127): 2^-11 relative
    top = x.abs().argmax(-1, keepdim=True)
    assert (codes.gather(-1, top).abs()[x.abs().amax(-1) > 0] == 127).all()
    err = (back - x).abs().gather(-1, top)
    assert (err <= x.abs().gather(-1, top) * 2 ** -11 * (1 + 1e-3)).all()
    assert (back[200] == 0).all() and (scale[200] == 0).all()


@pytest.mark.parametrize("fmt,mantissa", [("fp8_e4m3", 3), ("fp8_e5m2", 2)])
def test_fp8_round_trip_is_within_half_an_ulp(fmt, mantissa):
    dtype = kvquant.STORAGE[fmt]
    x = _spread(300, 64)[:, None, :].clamp(-400, 400)
    head = torch.tensor([2.0])
    codes, none = kvquant.quantize(x, dtype, head)
    assert none is None and codes.dtype == dtype
    back = kvquant.dequantize(codes, head)
    normal = (x / 2).abs() >= (2.0 ** -6 if mantissa == 3 else 2.0 ** -14)
    rel = ((back - x).abs() / x.abs().clamp_min(1e-30))[normal]
    assert rel.max() <= 2.0 ** -(mantissa + 1) * (1 + 1e-6)
    # beyond the largest finite value it saturates instead of overflowing
    big, _ = kvquant.quantize(torch.full((1, 1, 4), 1e9), dtype, torch.tensor([1.0]))
    assert torch.isfinite(big.float()).all() and big.float().max() == kvquant.FP8_MAX[dtype]


def test_unknown_kv_cache_dtype_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="int8, fp8_e4m3, fp8_e5m2"):
        kvquant.resolve_kv_cache_dtype("int4")
    assert kvquant.resolve_kv_cache_dtype("fp8") == "fp8_e4m3"  # vLLM's spelling


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_step_quantizes_exactly_as_the_reference(dtype, fmt):
    """The C++ store (used by the fused forward) writes the reference's codes and scales bit
    for bit: fp16 rounding of the scale, division, round half to even, fp8 saturation."""
    cache_dtype = kvquant.STORAGE[fmt]
    x = _spread(500, 64, dtype, seed=1)
    heads = torch.rand(500, generator=torch.Generator().manual_seed(2)) + 0.5
    codes, scales = cpu.quantize_rows(x, cache_dtype, heads)
    if fmt == "int8":
        want, want_scale = kvquant.quantize(x[:, None, :], cache_dtype)
        assert torch.equal(scales, want_scale[:, 0])
        assert torch.equal(codes, want[:, 0])
    else:
        limit = kvquant.FP8_MAX[cache_dtype]
        want = (x.float() / heads[:, None]).clamp(-limit, limit).to(cache_dtype)
        assert torch.equal(codes.view(torch.uint8), want.view(torch.uint8))


# ------------------------------------------------------------------ attention on codes

def _quantized_case(fmt, seq_lens, q_lens, window, q_dtype, hq=9, hkv=3, d=64, bs=16, seed=0):
    """A paged cache of random K/V stored through store_kv_ref (codes + scales), shuffled
    tables; blocks no query may see are poisoned: NaN scales (int8) or NaN codes (fp8)."""
    gen = torch.Generator().manual_seed(seed)
    cache_dtype = kvquant.STORAGE[fmt]
    num_blocks = sum(-(-s // bs) for s in seq_lens) + 3
    k_cache = torch.zeros(num_blocks, bs, hkv, d, dtype=cache_dtype)
    v_cache = torch.zeros(num_blocks, bs, hkv, d, dtype=cache_dtype)
    scales = kvquant.new_scales(fmt, 1, num_blocks, bs, hkv, "cpu")[0]
    if fmt != "int8":
        scales[:] = torch.rand(2, hkv, generator=gen) + 0.5  # per-head scales, not just 1.0
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    width = max(-(-s // bs) for s in seq_lens) + 1
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = set()
    for s, (length, ql) in enumerate(zip(seq_lens, q_lens)):
        nb = -(-length // bs)
        tables[s, :nb] = torch.tensor(perm[:nb], dtype=torch.int32)
        perm = perm[nb:]
        slots = (tables[s, :nb].long()[:, None] * bs + torch.arange(bs)).flatten()[:length]
        store_kv_ref(torch.randn(length, hkv, d, generator=gen).to(q_dtype),
                     torch.randn(length, hkv, d, generator=gen).to(q_dtype),
                     k_cache, v_cache, slots, scales[0], scales[1])
        first_live = max(0, length - ql - (window or 10**9) + 1)
        used |= {int(tables[s, b]) for b in range(nb) if (b + 1) * bs > first_live}
    for b in set(range(num_blocks)) - used:
        if fmt == "int8":
            scales[:, b] = float("nan")
        else:
            k_cache.view(torch.uint8)[b] = 0x7F  # NaN in both fp8 formats
            v_cache.view(torch.uint8)[b] = 0x7F
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hq, d, generator=gen).to(q_dtype)
    return q, k_cache, v_cache, scales, tables, cu, torch.tensor(seq_lens, dtype=torch.int32)


CASES = [  # seq lens, query lens, window
    ([1, 37, 100, 300], [1, 5, 1, 20], None),   # decodes, a verification-size chunk, tiles
    ([600, 40], [9, 1], None),                  # 3 key chunks, 1 + 8 drafts
    ([300, 90], [1, 30], 40),                   # a window: out-of-window blocks are NaN
    ([700], [64], 100),                         # a prefill chunk in tiles, window
]


@needs_kernels
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", CASES)
def test_cpu_attention_reads_quantized_caches(case, fmt, q_dtype):
    seq_lens, q_lens, window = case
    q, kc, vc, sc, tables, cu, lens = _quantized_case(fmt, seq_lens, q_lens, window, q_dtype)
    out = cpu.paged_attention(q, kc, vc, tables, cu, lens, 0.125, window, sc[0], sc[1])
    assert out.dtype == q_dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "read a block that no query may see"
    # the reference gathers padded rows too: it gets the cache without the poison
    clean = [torch.nan_to_num(c.float()).to(c.dtype) for c in (kc, vc, sc[0], sc[1])]
    ref = paged_attention_ref(q.float(), clean[0], clean[1], tables, cu, lens, 0.125, window,
                              clean[2], clean[3])
    tol = 1e-5 if q_dtype == torch.float32 else 2e-2
    assert (out.float() - ref).abs().max().item() < tol


@needs_kernels
def test_quantized_attention_is_not_the_unquantized_one():
    """The check above can fail: the codes really are what is read (the int8 output differs
    from attention over the unrounded K/V by more than float32 noise, but not by much)."""
    gen = torch.Generator().manual_seed(5)
    hkv, d, bs, n = 3, 64, 16, 200
    k, v = torch.randn(n, hkv, d, generator=gen), torch.randn(n, hkv, d, generator=gen)
    slots = torch.arange(bs, bs + n)
    tables = torch.arange(1, 1 + -(-n // bs), dtype=torch.int32)[None]
    q = torch.randn(1, 9, d, generator=gen)
    args = (tables, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([n], dtype=torch.int32),
            0.125)
    full = [torch.zeros(16, bs, hkv, d) for _ in range(2)]
    store_kv_ref(k, v, *full, slots)
    codes = [torch.zeros(16, bs, hkv, d, dtype=torch.int8) for _ in range(2)]
    sc = kvquant.new_scales("int8", 1, 16, bs, hkv, "cpu")[0]
    store_kv_ref(k, v, *codes, slots, sc[0], sc[1])
    diff = (cpu.paged_attention(q, *codes, *args, None, sc[0], sc[1])
            - cpu.paged_attention(q, *full, *args)).abs().max().item()
    assert 1e-4 < diff < 0.02


# ------------------------------------------------------------------ the engine

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from test_models_hf import make_model
    path = tmp_path_factory.mktemp("llama-kvq")
    make_model("llama", path)
    return path


@needs_kernels
@pytest.mark.parametrize("fmt", ["auto"] + FORMATS)
def test_fused_step_equals_the_torch_path_on_a_quantized_cache(tiny_llama, fmt):
    """The fused CPU forward (C++ store and attention) and the eager torch path (reference
    store and attention) give the same greedy tokens and nearly the same logprobs: as close as
    unquantized (auto) up to codes one step apart where float32 noise in K/V straddles a
    rounding boundary."""
    prompts = [[(7 * i + j) % 400 + 3 for j in range(5 + 9 * i)] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    outs = {}
    for eager in (False, True):
        llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu", num_kv_blocks=64,
                  kv_cache_dtype=fmt, enforce_eager=eager,
                  attention_backend="torch" if eager else "auto")
        assert (llm.engine.runner.fast is None) == eager
        outs[eager] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    for fused, eager in zip(outs[False], outs[True]):
        assert fused.token_ids == eager.token_ids
        lp = [abs(a[t].logprob - b[t].logprob) for a, b, t in
              zip(fused.logprobs, eager.logprobs, fused.token_ids)]
        assert max(lp) < TOL[fmt], max(lp)


def test_kv_cache_memory_buys_2x_bf16_and_4x_float32_blocks():
    from engine.capacity import read_model_config
    _, m = read_model_config(None)  # SmolLM2: head_dim 64, 3 KV heads, 30 layers
    blocks = {(dt, kv): plan_capacity(m, dt, "cpu", kv_cache_memory="256MiB",
                                      kv_cache_dtype=kv, seq_len=1024).num_kv_blocks
              for dt in ("float32", "bfloat16") for kv in ("auto", "int8", "fp8_e4m3")}
    assert blocks["bfloat16", "int8"] / blocks["bfloat16", "auto"] >= 1.9   # 128 B vs 66 B
    assert blocks["float32", "int8"] / blocks["float32", "auto"] >= 3.8     # 256 B vs 66 B
    assert blocks["bfloat16", "fp8_e4m3"] == 2 * blocks["bfloat16", "auto"]
    plan = plan_capacity(m, "bfloat16", "cpu", kv_cache_memory="256MiB", kv_cache_dtype="int8",
                         seq_len=1024)
    assert plan.kv_bytes_per_token == 2 * 30 * 3 * (64 + 2)
    text = plan.format()
    assert "64 head_dim × 1 B + a 2 B fp16 scale" in text and "1.94× the tokens" in text
    assert plan.to_dict()["kv_cache_dtype"] == "int8"
    # the alias `kvserve info --kv-cache-dtype fp8` offers sizes the pool as fp8_e4m3
    alias = plan_capacity(m, "bfloat16", "cpu", kv_cache_memory="256MiB", kv_cache_dtype="fp8")
    assert alias.kv_cache_dtype == "fp8_e4m3"
    assert alias.num_kv_blocks == blocks["bfloat16", "fp8_e4m3"]


def test_engine_allocates_codes_and_scales(tiny_llama):
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu", kv_cache_memory="4MiB",
              kv_cache_dtype="int8")
    runner, config = llm.engine.runner, llm.engine.config
    assert runner.kv_cache.dtype == torch.int8 and runner.kv_scales.dtype == torch.float16
    allocated = runner.kv_cache.numel() + runner.kv_scales.numel() * 2
    assert allocated == config.kv_cache_bytes <= 4 * 2**20
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(model=str(tiny_llama), dtype="float32", device="cpu", num_kv_blocks=8,
            kv_cache_dtype="q4_0")


SMOLLM_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                  "Explain photosynthesis in one paragraph.", "List three prime numbers."]
GREEDY = SamplingParams(temperature=0, max_tokens=48, logprobs=2, ignore_eos=True)


def _smollm2_greedy(kv_cache_dtype: str):
    llm = LLM(dtype="float32", num_kv_blocks=300, kv_cache_dtype=kv_cache_dtype)
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}])
               for p in SMOLLM_PROMPTS]
    return [o.outputs[0] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def smollm2_unquantized():
    return _smollm2_greedy("auto")


@pytest.mark.parametrize("fmt,max_dlogprob", [("int8", 0.2), ("fp8_e4m3", 0.5)])
def test_smollm2_greedy_with_a_quantized_cache_follows_the_unquantized_one(
        smollm2_unquantized, fmt, max_dlogprob):
    """SmolLM2, float32 weights (so only the cache differs): greedy tokens equal the
    unquantized cache's until a near tie (the unquantized top-2 margin below 0.5 nats where
    they part), and the chosen tokens' logprobs stay within max_dlogprob (measured: int8
    <= 0.14, fp8_e4m3 <= 0.25 over these 192 tokens)."""
    agreed = 0
    for ref, got in zip(smollm2_unquantized, _smollm2_greedy(fmt)):
        for i, (a, b) in enumerate(zip(ref.token_ids, got.token_ids)):
            if a != b:
                top = sorted((p.logprob for p in ref.logprobs[i].values()), reverse=True)
                assert top[0] - top[1] < 0.5, f"parted at a clear choice (position {i})"
                break
            assert abs(ref.logprobs[i][a].logprob - got.logprobs[i][b].logprob) < max_dlogprob
            agreed += 1
    if fmt == "int8":
        assert agreed == 4 * 48  # measured: int8 never parts from these prompts
