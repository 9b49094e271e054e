"""Weight-only int4 (engine/quant.py): the CPU kernel's dequantization formula, the round trip,
SmolLM2 and a tiny Qwen2 (qkv bias) under quantization="int4", the errors and the CLI flag."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import engine_logits
from engine import LLM, LLMEngine, SamplingParams
from engine.quant import (GROUP_SIZE, Int4Linear, Int8Linear, dequantize_int4,
                          int4_kernel_available, quantize_int4, quantize_model)

pytestmark = pytest.mark.skipif(not int4_kernel_available(),
                                reason="this torch has no CPU int4 kernel")

BF16_EPS = 2.0 ** -8  # bf16 keeps 8 significant bits: relative rounding error <= 2^-9


def random_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :GROUP_SIZE] = 0.3            # a constant group: scale 0
    w[1, 5] = 2.0                      # an outlier stretching one group
    w[2] += 1.0                        # groups far from zero: the zero point matters
    return w


# ---------------------------------------------------------------- the kernel and the formula

def test_kernel_computes_x_times_dequantized_weight():
    """The kernel's weights are (q - 8) * scale + zero per group of 32 along K (not q * scale +
    zero, not zero - q * scale): its output equals x @ dequant(W)^T + b up to bf16 rounding,
    for 3-D input and a bias."""
    w, b = random_weight(80, 96), torch.randn(80) * 0.1
    layer = Int4Linear.from_weight(w, b)
    q, scales_and_zeros = quantize_int4(w)
    assert q.dtype == torch.int32 and q.shape == (80, 96) and 0 <= q.min() and q.max() <= 15
    assert scales_and_zeros.shape == (96 // GROUP_SIZE, 80, 2)
    assert scales_and_zeros.dtype == torch.bfloat16
    x = torch.randn(2, 3, 96).to(torch.bfloat16)
    out = layer(x)
    assert out.shape == (2, 3, 80) and out.dtype == torch.bfloat16
    ref = x.float() @ dequantize_int4(q, scales_and_zeros).t() + b.to(torch.bfloat16).float()
    # one rounding of the fp32 sum to bf16, one more after adding the bias
    tol = 2 * BF16_EPS * (ref.abs() + b.abs().max()) + 1e-4
    assert ((out.float() - ref).abs() <= tol).all(), (out.float() - ref).abs().max()
    # the other readings of scales_and_zeros are far off
    sz = scales_and_zeros.float().transpose(0, 1).repeat_interleave(GROUP_SIZE, 1)
    wrong = x.float() @ (q * sz[..., 0] + sz[..., 1]).t()
    assert (out.float() - wrong).abs().max() > 20 * (out.float() - ref).abs().max()


def test_int8_head_computes_x_times_q_scale():
    w = random_weight(64, 96)
    head = Int8Linear.from_weight(w)
    x = torch.randn(5, 96).to(torch.bfloat16)
    ref = x.float() @ (head.weight.float() * head.scales.float()[:, None]).t()
    assert ((head(x).float() - ref).abs() <= 2 * BF16_EPS * ref.abs() + 1e-4).all()
    assert ((head.weight.float() * head.scales.float()[:, None] - w).abs()
            <= head.scales.float()[:, None] * (0.5 + 127 * BF16_EPS)).all()


def test_round_trip_within_half_a_step():
    """|dequant(quant(w)) - w| <= scale / 2, plus the bf16 rounding of scale and zero."""
    w = random_weight(48, 128, seed=1)
    q, scales_and_zeros = quantize_int4(w)
    sz = scales_and_zeros.float().transpose(0, 1).repeat_interleave(GROUP_SIZE, 1)  # [N, K, 2]
    scale, zero = sz[..., 0], sz[..., 1]
    err = (dequantize_int4(q, scales_and_zeros) - w).abs()
    # bf16 rounding: zero by <= |zero| 2^-9, the scale by <= scale 2^-9 times 7.5 codes
    assert (err <= scale / 2 + BF16_EPS * (zero.abs() + 8 * scale) + 1e-7).all()
    assert err[0, :GROUP_SIZE].max() <= BF16_EPS * 0.3  # the constant group
    assert (scale[0, :GROUP_SIZE] == 0).all()


def test_shapes_the_kernel_cannot_take_stay_linear():
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 64), nn.Linear(64, 40))
    kept = quantize_model(model)
    assert isinstance(model[0], Int4Linear)
    assert kept == ["1", "2"] and isinstance(model[1], nn.Linear)  # K = 48; N = 40 (not /16)


# ---------------------------------------------------------------- SmolLM2

TEXTS = [
    "The history of the city begins in the twelfth century, when a small fishing village grew "
    "up around a natural harbour. Merchants from the south brought wine, salt and cloth, and by "
    "1300 the town had a market, a church and a wall. In the following centuries it became one "
    "of the busiest ports of the region, and its shipyards built vessels for the navy.",
    "import numpy as np\n\ndef moving_average(x, window):\n    \"\"\"Return the moving average "
    "of x over the given window.\"\"\"\n    if window < 1:\n        raise ValueError('window "
    "must be positive')\n    kernel = np.ones(window) / window\n    return np.convolve(x, "
    "kernel, mode='valid')\n",
    "Photosynthesis is the process by which green plants use sunlight to make food from carbon "
    "dioxide and water. It takes place mainly in the leaves, inside small structures called "
    "chloroplasts, which contain the green pigment chlorophyll.",
]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a"]


def bf16_engine(engine: LLMEngine, model: nn.Module) -> LLMEngine:
    """An engine like `engine` (bf16 KV cache, same tokenizer) around a bf16 copy of `model`."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    model.rope.to(torch.float32)
    config = dataclasses.replace(engine.config, dtype=torch.bfloat16, enable_prefix_caching=False)
    return LLMEngine(config, model, engine.tokenizer)


def dequantized(model: nn.Module, lm_head: str) -> nn.Module:
    """A float32 copy whose Linear weights are what quantize_model's kernels compute with."""
    model = copy.deepcopy(model)
    if model.config.tie_word_embeddings:  # untie: the embedding table stays exact
        model.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
        model.lm_head.weight = nn.Parameter(model.embed_tokens.weight.clone(), requires_grad=False)
    for mod in model.modules():
        if not isinstance(mod, nn.Linear):
            continue
        if mod is model.lm_head and lm_head == "int8":
            head = Int8Linear.from_weight(mod.weight)
            mod.weight.copy_(head.weight.float() * head.scales.float()[:, None])
        elif mod is not model.lm_head or lm_head == "int4":
            if mod.in_features % GROUP_SIZE == 0 and mod.out_features % 16 == 0:
                mod.weight.copy_(dequantize_int4(*quantize_int4(mod.weight)))
    return model


def compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(top-1 agreement, KL(b || a) per position, max |logit diff|) of [T, V] logits."""
    a, b = a.float(), b.float()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    kl = F.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True,
                  reduction="batchmean").item()
    return agree, kl, (a - b).abs().max().item()


@pytest.fixture(scope="module")
def int4(smollm_path):
    return LLM(quantization="int4", device="cpu", kv_cache_memory="64MiB")


@pytest.fixture(scope="module")
def bf16(smollm, int4):
    """SmolLM2 in bf16: the float32 fixture's weights, no second load."""
    return bf16_engine(int4.engine, smollm.engine.runner.model)


def test_smollm2_int4_layers_and_memory(int4):
    model = int4.engine.runner.model
    assert int4.engine.config.dtype == torch.bfloat16  # "auto" resolves to bf16 under int4
    assert not any(isinstance(m, nn.Linear) for m in model.layers.modules())
    assert isinstance(model.layers[0].self_attn.qkv_proj, Int4Linear)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.embed_tokens.weight  # the bf16 head: still tied
    layer_bytes = sum(b.numel() * b.element_size() for b in model.layers.buffers())
    layer_weights = sum(m.in_features * m.out_features for m in model.layers.modules()
                        if isinstance(m, Int4Linear))
    assert layer_bytes == 0.625 * layer_weights  # 4 bits + 2 bf16 per 32 weights (bf16: 2 bytes)


def test_smollm2_q4_1_groups_reproduced(smollm):
    """The GGUF stores the layers as Q4_1 (w = d q + m, blocks of 32 along K, full 0..15 range):
    min/max requantization finds the same codes, so what is left is the bf16 rounding of scale
    and zero (a few % of a step), never a different code (a whole step)."""
    worst, groups, steps = 0.0, 0, []
    for name, mod in smollm.engine.runner.model.layers.named_modules():
        if isinstance(mod, nn.Linear):
            w = mod.weight.float()
            q, sz = quantize_int4(w)
            err = (dequantize_int4(q, sz) - w).abs().reshape(w.shape[0], -1, GROUP_SIZE).amax(-1)
            rel = err / sz[..., 0].float().t()              # [N, G] in units of the step
            steps.append(rel.flatten())
            worst, groups = max(worst, rel.max().item()), groups + rel.numel()
    rel = torch.cat(steps)
    print(f"\nQ4_1 -> int4: {groups} groups, max |error| {worst:.3f} step, median "
          f"{rel.median():.4f} step, groups within 0.1 step {(rel < 0.1).float().mean():.4f}")
    assert worst < 0.1


@pytest.mark.parametrize("head", ["bf16", "int4"])
def test_smollm2_int4_matches_its_dequantized_reference(smollm, int4, bf16, head):
    """The int4 engine's logits are those of a bf16 model with the dequantized weights (up to
    bf16 activation noise, ~bf16 vs fp32, and near-ties): the kernels, the reshapes and the lm_head hook add
    nothing. head="int4": a tied head's int4 copy through compute_logits."""
    fp32 = smollm.engine.runner.model
    ref = bf16_engine(int4.engine, dequantized(fp32, lm_head=head))
    engine = int4.engine
    if head == "int4":
        model = copy.deepcopy(engine.runner.model)
        model.lm_head = Int4Linear.from_weight(fp32.embed_tokens.weight)
        engine = LLMEngine(engine.config, model, engine.tokenizer)
    for text in TEXTS:
        ids = engine.tokenizer.encode(text)
        logits = engine_logits(engine, ids)
        agree, kl, diff = compare(logits, engine_logits(ref, ids))
        agree16, kl16, _ = compare(logits, engine_logits(bf16, ids))
        print(f"\n{head} head, {len(ids)} tokens: vs dequantized reference top-1 {agree:.3f}, "
              f"KL {kl:.5f}, max |dlogit| {diff:.2f}; vs bf16 top-1 {agree16:.3f}, KL {kl16:.4f}")
        # bf16 logits near 20 are 0.125 apart: exact ties are common, and another order of a
        # sum flips them. Every flip must be a near-tie of the reference.
        ref_logits = engine_logits(ref, ids).float()
        top2 = ref_logits.topk(2, dim=-1).values
        flips = logits.float().argmax(-1) != ref_logits.argmax(-1)
        margins = (top2[:, 0] - top2[:, 1])[flips]
        assert agree >= 0.9 and kl < 0.005
        assert (margins <= 0.5).all(), f"a flip where the reference was sure: {margins.tolist()}"


def test_smollm2_int4_close_to_bf16(smollm, int4, bf16):
    """Teacher-forced over three texts: the int4 model's next-token choice agrees with bf16's."""
    tok = int4.engine.tokenizer
    agrees = []
    for text in TEXTS:
        ids = tok.encode(text)
        fp32 = engine_logits(smollm.engine, ids)
        agree, kl, diff = compare(engine_logits(int4.engine, ids), engine_logits(bf16, ids))
        agree32, kl32, _ = compare(engine_logits(bf16, ids), fp32)
        print(f"\nint4 vs bf16 ({len(ids)} tokens): top-1 {agree:.3f}, KL {kl:.4f}, max "
              f"|dlogit| {diff:.2f}; bf16 vs fp32: top-1 {agree32:.3f}, KL {kl32:.4f}")
        agrees.append(agree)
        assert kl < 0.01
    assert min(agrees) >= 0.9


def test_smollm2_int4_greedy(int4, bf16):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = int4.generate(PROMPTS, params, use_tqdm=False)
    for i, prompt in enumerate(PROMPTS):
        bf16.add_request(str(i), prompt, params)
    done = {}
    while bf16.has_unfinished_requests():
        done.update({o.request_id: o for o in bf16.step() if o.finished})
    ref = [done[str(i)].outputs[0].token_ids for i in range(len(PROMPTS))]
    same = []
    for out, r in zip(outs, ref):
        ids = out.outputs[0].token_ids
        assert len(ids) == 16
        same.append(next((i for i, (a, b) in enumerate(zip(ids, r)) if a != b), 16))
        print(f"\nint4: {out.outputs[0].text!r}")
    print(f"greedy tokens equal to bf16's before the first difference: {same}")
    assert "Paris" in outs[0].outputs[0].text
    assert sum(n >= 8 for n in same) >= 2


# ---------------------------------------------------------------- a tiny Qwen2 (qkv bias)

@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    import transformers
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.2, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("qwen2-int4")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen2_fp32(qwen2_dir):
    return LLM(model=str(qwen2_dir), dtype="float32", device="cpu", num_kv_blocks=64)


def test_qwen2_int4_bias_path(qwen2_dir, qwen2_fp32):
    """qkv bias through Int4Linear; down_proj (K = 48, not a multiple of 32) stays bf16, and so
    does the (untied) lm_head. Logits equal the dequantized reference's."""
    llm = LLM(model=str(qwen2_dir), quantization="int4", device="cpu", num_kv_blocks=64)
    model = llm.engine.runner.model
    qkv = model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Int4Linear) and qkv.bias is not None and qkv.bias.abs().max() > 0
    for kept in (model.layers[0].mlp.down_proj, model.lm_head):
        assert isinstance(kept, nn.Linear) and kept.weight.dtype == torch.bfloat16
    fp32 = qwen2_fp32.engine.runner.model
    ref = bf16_engine(llm.engine, dequantized(fp32, lm_head="bf16"))
    no_bias = bf16_engine(llm.engine, dequantized(fp32, lm_head="bf16"))
    for layer in no_bias.runner.model.layers:
        layer.self_attn.qkv_proj.bias.zero_()
    ids = [(7 * j) % 500 + 1 for j in range(40)]
    got = engine_logits(llm.engine, ids).float()
    want = engine_logits(ref, ids).float()
    scale = want.abs().max().item()
    assert (got - want).abs().max() < 0.05 * scale
    assert (got - engine_logits(no_bias, ids).float()).abs().max() > 0.1 * scale
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8


@pytest.mark.parametrize("head,cls", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_qwen2_quantized_lm_head(qwen2_fp32, head, cls):
    """An untied lm_head quantized to int8 / int4 runs through compute_logits' hook."""
    model = copy.deepcopy(qwen2_fp32.engine.runner.model)
    assert quantize_model(model, lm_head=head) == ["layers.0.mlp.down_proj",
                                                   "layers.1.mlp.down_proj"]
    assert isinstance(model.lm_head, cls)
    engine = bf16_engine(qwen2_fp32.engine, model)
    ref = bf16_engine(qwen2_fp32.engine, dequantized(qwen2_fp32.engine.runner.model, head))
    ids = [(5 * j) % 500 + 1 for j in range(24)]
    got, want = engine_logits(engine, ids).float(), engine_logits(ref, ids).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()


# ---------------------------------------------------------------- errors and the CLI

@pytest.mark.parametrize("kwargs,message", [
    (dict(device="cuda"), "CPU path"),
    (dict(device="cpu", dtype="float32"), "bfloat16"),
    (dict(device="cpu", dtype="float16"), "bfloat16"),
])
def test_int4_errors(qwen2_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(model=str(qwen2_dir), quantization="int4", num_kv_blocks=64, **kwargs)


def test_torch_without_the_kernel(qwen2_dir, monkeypatch):
    import engine.quant
    monkeypatch.setattr(engine.quant, "int4_kernel_available", lambda: False)
    with pytest.raises(ValueError, match="CPU int4 kernel"):
        LLM(model=str(qwen2_dir), quantization="int4", device="cpu", num_kv_blocks=64)


def test_unknown_quantization(qwen2_dir):
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        LLM(model=str(qwen2_dir), quantization="int3", device="cpu", num_kv_blocks=64)


def test_cli_generate_int4(smollm_path, capsys):
    from server.cli import main
    rc = main(["generate", "--quantization", "int4", "Hello", "--max-tokens", "4",
               "--kv-cache-memory", "64MiB", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("Hello") and len(out.strip()) > len("Hello")
    with pytest.raises(SystemExit):
        main(["generate", "--quantization", "int3", "Hello"])
