"""kvserve's C++ CPU kernels (kernels/cpu.py) against the torch reference and transformers.

- paged attention: the reference's semantics (GQA, windows, multi-token queries, chunked
  long sequences), never reading freed blocks (NaN-poisoned), fp32 and bf16;
- the small-M linear layer against F.linear;
- the fused decoder forward against transformers' logits for every architecture, and the
  engine's greedy tokens through it.
"""
import pytest
import torch
import torch.nn.functional as F

from kernels import cpu
from kernels.reference import paged_attention_ref

pytestmark = pytest.mark.skipif(not cpu.available(),
                                reason=f"CPU kernels unavailable: {cpu.unavailable_reason()}")


def _case(gen, dtype, hq, hkv, d, bs, seq_lens, q_lens, window, poison=True):
    """A paged cache with shuffled tables; blocks no query may see are filled with NaN."""
    num_blocks = sum((s + bs - 1) // bs for s in seq_lens) + 3
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(dtype)
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    width = max((s + bs - 1) // bs for s in seq_lens) + 1
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = set()
    for s, (length, ql) in enumerate(zip(seq_lens, q_lens)):
        nb = (length + bs - 1) // bs
        tables[s, :nb] = torch.tensor(perm[:nb], dtype=torch.int32)
        perm = perm[nb:]
        first_live = max(0, length - ql - (window or 10**9) + 1)  # first key any query sees
        for b in range(nb):
            if (b + 1) * bs > first_live:
                used.add(int(tables[s, b]))
        tables[s, nb:] = 0  # unused entries point at block 0
    if poison:
        for b in range(num_blocks):
            if b not in used:
                k_cache[b] = float("nan")
                v_cache[b] = float("nan")
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hq, d, generator=gen).to(dtype)
    return q, k_cache, v_cache, tables, cu, torch.tensor(seq_lens, dtype=torch.int32)


CASES = [  # hq, hkv, d, block size, seq lens, query lens, window
    (9, 3, 64, 16, [1, 37, 100, 300], [1, 5, 1, 20], None),      # decode + chunks, GQA 3
    (8, 2, 128, 16, [40, 41, 700], [1, 1, 1], 7),                # window < block
    (4, 4, 64, 32, [90, 33], [1, 33], 40),                       # MHA, window > block
    (12, 1, 64, 16, [600, 1], [1, 1], None),                     # MQA, 3 key chunks + 1 key
    (16, 2, 32, 8, [2000, 10, 10], [1, 1, 10], 1500),            # a long window, 8 chunks
    (4, 2, 80, 16, [50, 17], [3, 17], None),                     # head_dim 80: 5 vectors
    (2, 1, 24, 16, [33, 70], [2, 1], None),                      # head_dim 24: a partial one
    # prefill chunks run in tiles of query rows: few tiles split their keys in chunks
    (9, 3, 64, 16, [2000, 64, 5], [20, 64, 1], None),            # 4 key chunks; a full tile
    (2, 1, 24, 8, [300], [40], 50),                              # head_dim 24, window, 2 tiles
    (8, 2, 128, 16, [1500], [100], 1000),                        # head_dim 128, window
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_attention_matches_reference(case, dtype):
    hq, hkv, d, bs, seq_lens, q_lens, window = case
    gen = torch.Generator().manual_seed(hash((hq, d, bs)) % 1000)
    q, kc, vc, tables, cu, lens = _case(gen, dtype, hq, hkv, d, bs, seq_lens, q_lens, window)
    out = cpu.paged_attention(q, kc, vc, tables, cu, lens, d ** -0.5, window)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "read a block that no query may see"
    clean = [torch.nan_to_num(c.float(), nan=0.0) for c in (kc, vc)]
    ref = paged_attention_ref(q.float(), *clean, tables, cu, lens, d ** -0.5, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.float() - ref).abs().max().item() < tol


def test_attention_window_changes_the_output():
    """The test above can fail: the same case without its window gives other numbers."""
    gen = torch.Generator().manual_seed(0)
    q, kc, vc, tables, cu, lens = _case(gen, torch.float32, 8, 2, 64, 16, [200], [1], 16,
                                        poison=False)
    a = cpu.paged_attention(q, kc, vc, tables, cu, lens, 0.125, 16)
    b = cpu.paged_attention(q, kc, vc, tables, cu, lens, 0.125, None)
    assert (a - b).abs().max().item() > 1e-2


def test_attention_cost_follows_each_sequence():
    """A long sequence beside short ones: the short ones' outputs are the same as alone."""
    gen = torch.Generator().manual_seed(1)
    q, kc, vc, tables, cu, lens = _case(gen, torch.float32, 9, 3, 64, 16, [3000, 20, 21],
                                        [1, 1, 1], None)
    both = cpu.paged_attention(q, kc, vc, tables, cu, lens, 0.125)
    alone = cpu.paged_attention(q[1:], kc, vc, tables[1:, :2], cu[:3] - 0, lens[1:], 0.125)
    assert torch.equal(both[1:], alone)


def _rows_decoded_alone(q, kc, vc, tables, length, window):
    """Each of the query tokens (the last len(q) positions of one sequence) as a decode step."""
    nq = q.shape[0]
    return torch.cat([cpu.paged_attention(q[t:t + 1], kc, vc, tables,
                                          torch.tensor([0, 1], dtype=torch.int32),
                                          torch.tensor([length - nq + t + 1], dtype=torch.int32),
                                          q.shape[-1] ** -0.5, window) for t in range(nq)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,length,nq,window", [
    (9, 3, 700, 9, None),   # SmolLM2's heads, 3 key chunks, 1 + 8 drafts
    (16, 1, 300, 17, None),  # 16 heads per KV head: the tokens take several items
    (8, 2, 400, 6, 100),     # a window: each token starts at its own key
    (4, 2, 40, 5, None),
])
def test_verification_rows_equal_decoding_each_token(dtype, hq, hkv, length, nq, window):
    """A sequence's few query tokens (speculative verification) share work items, and each
    row's numbers are bit for bit those of decoding that token alone: greedy speculation
    depends on it (int8 activations turn tiny differences into flipped near ties)."""
    gen = torch.Generator().manual_seed(length)
    q, kc, vc, tables, _, _ = _case(gen, dtype, hq, hkv, 64, 16, [length], [nq], window,
                                    poison=False)
    cu = torch.tensor([0, nq], dtype=torch.int32)
    out = cpu.paged_attention(q, kc, vc, tables, cu, torch.tensor([length], dtype=torch.int32),
                              64 ** -0.5, window)
    assert torch.equal(out, _rows_decoded_alone(q, kc, vc, tables, length, window))


def test_prefill_tiles_are_not_bitwise_decodes():
    """The check above can fail: more query tokens go to the tiles, which sum in another
    order, and their rows differ from decodes in the last bits."""
    gen = torch.Generator().manual_seed(3)
    q, kc, vc, tables, _, _ = _case(gen, torch.float32, 9, 3, 64, 16, [700], [20], None,
                                    poison=False)
    out = cpu.paged_attention(q, kc, vc, tables, torch.tensor([0, 20], dtype=torch.int32),
                              torch.tensor([700], dtype=torch.int32), 64 ** -0.5)
    alone = _rows_decoded_alone(q, kc, vc, tables, 700, None)
    assert not torch.equal(out, alone)
    assert (out - alone).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 96, 64), (7, 33, 576), (8, 64, 40), (9, 17, 100),
                                   (17, 960, 576)])
def test_linear_matches_torch(dtype, m, n, k):
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    ref = F.linear(x.float(), w.float(), b.float())
    y = cpu.linear(x, w, b, out_fp32=True)
    assert y.dtype == torch.float32
    assert (y - ref).abs().max().item() < 1e-3 * k ** 0.5
    y_t = cpu.linear(x, w)
    assert y_t.dtype == dtype
    assert (y_t.float() - F.linear(x.float(), w.float())).abs().max().item() \
        < (1e-3 if dtype == torch.float32 else 0.05) * k ** 0.5


# ------------------------------------------------------------------ the fused forward


@pytest.fixture(scope="module", params=["llama", "mistral-window", "qwen2", "qwen3"])
def tiny(request, tmp_path_factory):
    from test_models_hf import make_model
    path = tmp_path_factory.mktemp("fast-" + request.param)
    return request.param, path, make_model(request.param, path)


def _fast_logits(engine, ids):
    """All-position logits of one prompt through the runner's fused forward."""
    from engine.sampling_params import SamplingParams
    from engine.sequence import Sequence
    runner = engine.runner
    seq = Sequence("fast", 0, ids, SamplingParams())
    engine.kv.allocate(seq, len(ids))
    try:
        with torch.inference_mode():
            input_ids, positions, meta, _ = runner.prepare([seq], [len(ids)])
            hidden = runner.fast(runner.model.embed_tokens(input_ids), positions,
                                 meta.slot_mapping, meta.block_tables, meta.cu_seqlens_q,
                                 meta.seq_lens)
            return runner.model.compute_logits(hidden)
    finally:
        engine.kv.free(seq)


def test_fused_forward_matches_transformers(tiny):
    from engine import LLM
    from test_models_hf import PROMPTS
    kind, path, hf = tiny
    llm = LLM(model=str(path), dtype="float32", device="cpu", num_kv_blocks=64)
    assert llm.engine.runner.fast is not None, "the fused forward is the default on the CPU"
    assert llm.engine.config.attention_backend == "cpu"
    for ids in PROMPTS:
        with torch.inference_mode():
            ref = hf(torch.tensor([ids])).logits[0]
        diff = (_fast_logits(llm.engine, ids) - ref).abs().max().item()
        assert diff < 1e-4, f"{kind}: max |logit diff| {diff:.2e} at length {len(ids)}"


def test_enforce_eager_and_torch_backend_are_the_old_path(tiny):
    from engine import LLM, SamplingParams
    from test_models_hf import PROMPTS
    _, path, _ = tiny
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    eager = LLM(model=str(path), dtype="float32", device="cpu", num_kv_blocks=64,
                enforce_eager=True, attention_backend="torch")
    assert eager.engine.runner.fast is None
    fast = LLM(model=str(path), dtype="float32", device="cpu", num_kv_blocks=64)
    a = [o.outputs[0].token_ids for o in eager.generate(PROMPTS, params, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in fast.generate(PROMPTS, params, use_tqdm=False)]
    assert a == b


needs_threads = pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2+ torch threads")


@needs_threads
def test_torch_on_one_thread_keeps_the_pool_size_and_restores():
    n = torch.get_num_threads()
    with cpu.torch_on_one_thread():
        assert (torch.get_num_threads(), cpu.num_threads()) == (1, n)
        with cpu.torch_on_one_thread():  # nests
            assert (torch.get_num_threads(), cpu.num_threads()) == (1, n)
        assert (torch.get_num_threads(), cpu.num_threads()) == (1, n)
        with cpu.torch_on_all_threads():
            assert (torch.get_num_threads(), cpu.num_threads()) == (n, n)
        assert torch.get_num_threads() == 1
    assert (torch.get_num_threads(), cpu.num_threads()) == (n, n)
    with pytest.raises(KeyError):
        with cpu.torch_on_one_thread():
            raise KeyError
    assert (torch.get_num_threads(), cpu.num_threads()) == (n, n)
    with cpu.torch_on_all_threads():  # outside: nothing to hand back
        assert torch.get_num_threads() == n


@needs_threads
def test_fused_steps_run_torch_on_one_thread(tiny, monkeypatch):
    """While a step runs the fused forward, torch's own ops (the sampler's) get one thread
    and the kernels every thread: torch's idle OpenMP workers spin on the cores the pool
    needs otherwise (kernels.cpu.torch_on_one_thread). A step that runs the torch model gets
    every thread for it. The counts are back after each step."""
    from engine import LLM, SamplingParams
    from test_models_hf import PROMPTS
    _, path, _ = tiny
    n = torch.get_num_threads()
    llm = LLM(model=str(path), dtype="float32", device="cpu", num_kv_blocks=64)
    engine, runner = llm.engine, llm.engine.runner
    seen = {"sampler": set(), "kernels": set(), "model": set()}
    sample, model_forward = engine.sampler.__call__, runner.model.forward

    def record_sampler(*a, **kw):
        seen["sampler"].add(torch.get_num_threads())
        seen["kernels"].add(cpu.num_threads())
        return sample(*a, **kw)

    def record_model(*a, **kw):
        seen["model"].add(torch.get_num_threads())
        return model_forward(*a, **kw)

    monkeypatch.setattr(engine, "sampler", record_sampler)
    monkeypatch.setattr(runner.model, "forward", record_model)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=4, ignore_eos=True)
    llm.generate(PROMPTS[:2], params, use_tqdm=False)
    assert seen == {"sampler": {1}, "kernels": {n}, "model": set()}
    assert torch.get_num_threads() == n
    monkeypatch.setattr(runner, "fast_max", 1)  # prompts through the torch model
    llm.generate(PROMPTS[:2], params, use_tqdm=False)
    assert seen["model"] == {n} and seen["sampler"] == {1}
    assert torch.get_num_threads() == n


def test_bf16_fused_forward_stays_close_to_fp32(tiny):
    """bf16 through the fused forward: same argmax as fp32 at nearly every position."""
    from engine import LLM
    from test_models_hf import PROMPTS
    _, path, _ = tiny
    f32 = LLM(model=str(path), dtype="float32", device="cpu", num_kv_blocks=64)
    b16 = LLM(model=str(path), dtype="bfloat16", device="cpu", num_kv_blocks=64)
    assert b16.engine.runner.fast is not None
    agree = total = 0
    for ids in PROMPTS:
        a = _fast_logits(f32.engine, ids).argmax(-1)
        b = _fast_logits(b16.engine, ids).argmax(-1)
        agree += int((a == b).sum())
        total += len(ids)
    assert agree / total > 0.9


def test_q8_layout_is_the_documented_one():
    """pack_q8: code + 128 of row 16 t + l, element g * 32 + s * 4 + j sits at [t, g, s, l, j];
    scales at [t, g, l]; unpack_q8 inverts it."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 96, generator=gen)
    codes, scales = cpu.quantize_int8(w)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127
    assert scales.shape == (32, 3)
    deq = (codes.float().reshape(32, 3, 32) * scales[..., None]).reshape(32, 96)
    assert (deq - w).abs().max() <= scales.max() / 2 + 1e-6
    packed, lane_scales = cpu.pack_q8(w)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 8, 16, 4)
    for n, k in [(0, 0), (17, 45), (31, 95), (5, 64)]:
        t, lane, g, rest = n // 16, n % 16, k // 32, k % 32
        assert int(packed[t, g, rest // 4, lane, rest % 4]) == int(codes[n, k]) + 128
        assert float(lane_scales[t, g, lane]) == float(scales[n, g])
    assert torch.equal(cpu.unpack_q8(packed, lane_scales), deq)
    for bad in ((33, 96), (32, 80)):
        with pytest.raises(ValueError, match="int8"):
            cpu.pack_q8(torch.randn(*bad))


@pytest.mark.parametrize("m,n,k", [(1, 96, 64), (5, 48, 576), (17, 960, 576), (70, 32, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_the_quantized_product(m, n, k, dtype):
    """W8A8: the kernel's result is exactly (to fp32 rounding) the product of the int8-rounded
    activations (per group of 32) and the int8 weights; both close to the float product."""
    gen = torch.Generator().manual_seed(m + n)
    x = torch.randn(m, k, generator=gen).to(dtype)
    x[0, :32] = 0  # an all-zero group quantizes to zeros, not NaN
    w = torch.randn(n, k, generator=gen) * 0.05
    packed, scales = cpu.pack_q8(w)
    bias = torch.randn(n, generator=gen).to(dtype)
    y = cpu.linear(x, packed, bias=bias, out_fp32=True, w_scale=scales)
    exact = cpu.quantize_act_q8(x).double() @ cpu.unpack_q8(packed, scales).double().T \
        + bias.double()
    assert (y - exact).abs().max().item() < 1e-5 * exact.abs().max().item()
    full = x.double() @ w.double().T + bias.double()
    assert (y - full).abs().max().item() < 0.03 * full.abs().max().item()
    assert cpu.linear(x, packed, bias=bias, w_scale=scales).dtype == dtype
    with pytest.raises(ValueError, match="pack_q8"):
        cpu.linear(x, packed.reshape(n, k), out_fp32=True, w_scale=scales)


def test_int8_step_weights(tiny):
    """quantization='int8': every fused step reads int8 weights (groups of 32) with int8
    activations, close to the model's own numbers, in float32 and bfloat16; eager is refused."""
    from engine import LLM, SamplingParams
    from test_models_hf import PROMPTS
    kind, path, _ = tiny
    for dtype in ("bfloat16", "float32"):
        ref = LLM(model=str(path), dtype=dtype, device="cpu", num_kv_blocks=64)
        i8 = LLM(model=str(path), dtype=dtype, quantization="int8", device="cpu",
                 num_kv_blocks=64)
        assert i8.engine.runner.fast.weights == "int8"
        assert i8.engine.config.dtype == ref.engine.config.dtype
        agree = total = 0
        for ids in PROMPTS:
            a = _fast_logits(ref.engine, ids)
            b = _fast_logits(i8.engine, ids)
            assert (a - b).abs().max() > 0, "int8 weights must change the numbers a little"
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += len(ids)
        assert agree / total > 0.85, (kind, dtype)
        # the vocab projection reads the int8 head: close to the model's head's logits
        hidden = torch.randn(3, i8.engine.config.model.hidden_size).to(i8.engine.config.dtype)
        want = hidden.float() @ i8.engine.runner.model.lm_head.weight.float().T
        got = i8.engine.runner.logits(hidden)
        assert got.dtype == torch.float32 and (got - want).abs().max() < 0.05 * want.abs().max()
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        outs = i8.generate(PROMPTS, params, use_tqdm=False)
        ref_outs = ref.generate(PROMPTS, params, use_tqdm=False)
        same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids
                   for a, b in zip(outs, ref_outs))
        assert same >= len(PROMPTS) // 2, f"{kind} {dtype}: {same}/{len(PROMPTS)} greedy as ref"
    with pytest.raises(ValueError, match="int8"):
        LLM(model=str(path), quantization="int8", device="cpu", num_kv_blocks=64,
            enforce_eager=True)


def test_quantization_auto_picks_packed_weights_unless_float32_is_asked_for(tiny):
    """`kvserve serve`'s default, quantization='auto': packed step weights ('gguf': int4 where
    the weights are 4-bit already, int8 elsewhere) where VNNI runs them, with dtype auto or
    bfloat16; an explicit float32 keeps its exact weights."""
    from engine import LLM
    _, path, _ = tiny
    want = "gguf" if cpu.has_vnni() else None
    for dtype, expect in (("auto", want), ("bfloat16", want), ("float32", None)):
        llm = LLM(model=str(path), dtype=dtype, quantization="auto", device="cpu",
                  num_kv_blocks=64)
        assert llm.engine.config.quantization == expect, dtype
        assert llm.engine.runner.fast.weights == expect


def test_q4_layout_is_the_documented_one():
    """pack_q4: codes of row 16 t + l, group g: element s * 4 + j in the low nibble and
    16 + s * 4 + j in the high nibble of [t, g, s, l, j]; d and m (float16) at [t, g, 0|1, l]."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(32, 96, generator=gen)
    q, d, m = cpu.quantize_int4(w)
    assert q.dtype == torch.uint8 and int(q.max()) == 15 and int(q.min()) == 0
    assert d.dtype == m.dtype == torch.float16 and d.shape == (32, 3)
    codes, params = cpu.pack_q4(w)
    assert codes.shape == (2, 3, 4, 16, 4) and params.shape == (2, 3, 2, 16)
    for n, k in [(0, 0), (17, 45), (31, 95), (5, 80), (9, 50)]:
        t, lane, g, r = n // 16, n % 16, k // 32, k % 32
        byte = int(codes[t, g, (r % 16) // 4, lane, r % 4])
        assert (byte >> 4 if r >= 16 else byte & 15) == int(q[n, k])
        assert float(params[t, g, 0, lane]) == float(d[n, g])
        assert float(params[t, g, 1, lane]) == float(m[n, g])
    deq = (q.float().reshape(32, 3, 32) * d.float()[..., None] + m.float()[..., None])
    assert torch.equal(cpu.unpack_q4(codes, params), deq.reshape(32, 96))
    assert (deq.reshape(32, 96) - w).abs().max() <= d.float().max() / 2 + 1e-3


@pytest.mark.parametrize("m,n,k", [(1, 96, 64), (5, 48, 576), (17, 960, 576), (70, 32, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_is_the_quantized_product(m, n, k, dtype):
    """W4A8: exactly the int8-rounded activations times the 4-bit weights (d * q + m)."""
    gen = torch.Generator().manual_seed(m * n)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen) * 0.05 + 0.01
    codes, params = cpu.pack_q4(w)
    y = cpu.linear(x, codes, out_fp32=True, w_scale=params)
    exact = cpu.quantize_act_q8(x).double() @ cpu.unpack_q4(codes, params).double().T
    assert (y - exact).abs().max().item() < 1e-5 * exact.abs().max().item()
    with pytest.raises(ValueError, match="pack_q4"):
        cpu.linear(x, codes, out_fp32=True, w_scale=params.float())


def test_int4_exact_finds_weights_already_on_a_4bit_grid():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 128, generator=gen) * 0.05
    assert not cpu.int4_exact(w)
    snapped = cpu.unpack_q4(*cpu.pack_q4(w))
    for t in (snapped, snapped.bfloat16()):
        assert cpu.int4_exact(t)
        codes, params = cpu.pack_q4(t)  # the same grid comes back
        assert (cpu.unpack_q4(codes, params) - snapped).abs().max() <= 0.1 * params[:, :, 0].float().max()


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    """A tiny llama whose linear weights lie on a 4-bit grid, as a Q4_1 file's do."""
    from test_models_hf import make_model
    path = tmp_path_factory.mktemp("q4-llama")
    hf = make_model("llama", path)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(cpu.unpack_q4(*cpu.pack_q4(p)))
    hf.save_pretrained(path)
    return path, hf


def test_gguf_step_weights_run_4bit_grids_as_int4(tiny_q4):
    """quantization='gguf' (the auto default with VNNI): weights on a 4-bit grid run as int4
    (their exact codes), the rest (here the head) as int8; logits stay close to float32."""
    from engine import LLM, SamplingParams
    from test_models_hf import PROMPTS
    path, _ = tiny_q4
    ref = LLM(model=str(path), dtype="float32", device="cpu", num_kv_blocks=64)
    q4 = LLM(model=str(path), dtype="float32", quantization="gguf", device="cpu",
             num_kv_blocks=64)
    fast = q4.engine.runner.fast
    assert fast.weights == "gguf" and fast.formats == {"int4"}
    assert fast.lm_head_packed[1].dtype == torch.float32  # the random head: int8
    i8 = LLM(model=str(path), dtype="float32", quantization="int8", device="cpu",
             num_kv_blocks=64)
    assert i8.engine.runner.fast.formats == {"int8"}
    err4 = err8 = 0.0
    for ids in PROMPTS:
        a = _fast_logits(ref.engine, ids)
        err4 = max(err4, (_fast_logits(q4.engine, ids) - a).abs().max().item())
        err8 = max(err8, (_fast_logits(i8.engine, ids) - a).abs().max().item())
    # exact weights: only the activations' rounding is left, less than int8 weights add
    assert 0 < err4 < err8, (err4, err8)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = q4.generate(PROMPTS, params, use_tqdm=False)
    ref_outs = ref.generate(PROMPTS, params, use_tqdm=False)
    same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(outs, ref_outs))
    assert same >= len(PROMPTS) // 2


def test_float32_tiles():
    """pack_f32: w[n, k] at [n // 16, k, n % 16]; the tile GEMM equals the float product, and a
    float32 model's fused step reads its weights in tiles (same greedy tokens: see
    test_fused_forward_matches_transformers)."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(48, 40, generator=gen)
    tiles = cpu.pack_f32(w)
    assert tiles.shape == (3, 40, 16) and float(tiles[2, 7, 5]) == float(w[37, 7])
    for m in (1, 7, 20):
        x = torch.randn(m, 40, generator=gen)
        y = cpu.linear(x, tiles, out_fp32=True)
        assert (y - x.double() @ w.double().T).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="pack_f32"):
        cpu.linear(x.bfloat16(), tiles)
    with pytest.raises(ValueError, match="16"):
        cpu.pack_f32(torch.randn(40, 48))


def test_float32_model_steps_on_tiles(tiny):
    from engine import LLM
    _, path, _ = tiny
    llm = LLM(model=str(path), dtype="float32", device="cpu", num_kv_blocks=64)
    assert llm.engine.runner.fast.formats == {"float32 tiles"}
    b16 = LLM(model=str(path), dtype="bfloat16", device="cpu", num_kv_blocks=64)
    assert b16.engine.runner.fast.formats == {"bfloat16"}


def test_row_stats_are_log_sum_exp_and_rank():
    """Teacher-forced scoring's per-row statistics, against torch (ties count as not above;
    a vocabulary that is not a multiple of 16 has a scalar tail)."""
    gen = torch.Generator().manual_seed(3)
    for vocab in (49152, 1000, 7):
        logits = torch.randn(37, vocab, generator=gen) * 4
        logits[0, :] = 1.0  # all tied: rank 1
        target = torch.randint(0, vocab, (37,), generator=gen)
        lse, rank = cpu.row_stats(logits, target)
        assert torch.allclose(lse, torch.logsumexp(logits, -1), atol=1e-4, rtol=1e-6)
        chosen = logits.gather(1, target[:, None])
        assert torch.equal(rank, (logits > chosen).sum(-1) + 1)
        assert rank[0] == 1
    with pytest.raises(ValueError, match="target"):
        cpu.row_stats(torch.zeros(2, 10), torch.tensor([0, 10]))
