"""Tiny random models of each architecture, saved as HF directories: logits and greedy tokens
must match transformers, including chunked prefill and preemption under a tiny KV pool."""
import pytest
import torch

from conftest import engine_logits, hf_greedy
from engine import LLM, SamplingParams

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
              initializer_range=0.2, tie_word_embeddings=False)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict()),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=4, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32})),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
}

# lengths 1..40: longer than the window (8) and than a block (16); several blocks
PROMPTS = [[(7 * i + 3 * j) % 500 + 1 for j in range(n)] for i, n in enumerate([1, 5, 17, 40, 9, 33])]


def make_model(kind: str, path, **overrides) -> torch.nn.Module:
    """A tiny random model of `kind` saved at path (overrides: config fields)."""
    import transformers
    config_cls, model_cls, extra = ARCHS[kind]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_model(request.param, path)
    return request.param, path, hf


def test_logits_and_greedy_match(pair):
    kind, path, hf = pair
    llm = LLM(model=str(path), dtype="float32", device="cpu", block_size=16, num_kv_blocks=64)
    assert llm.get_tokenizer() is None  # token-id prompts only
    if kind == "mistral-window":
        assert llm.engine.config.model.sliding_window == 8
    for ids in PROMPTS:
        with torch.inference_mode():
            ref = hf(torch.tensor([ids])).logits[0]
        diff = (engine_logits(llm.engine, ids) - ref).abs().max().item()
        assert diff < 1e-4, f"{kind}: max |logit diff| {diff:.2e} at length {len(ids)}"
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for ids, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, ids, 20), f"{kind} len {len(ids)}"


@pytest.mark.parametrize("budget,blocks", [(7, 64), (2048, 9)])
def test_chunked_prefill_and_preemption_keep_tokens(pair, budget, blocks):
    """A tiny token budget splits prefills into chunks; a tiny pool forces preemption.
    Either way every request finishes with the tokens it gets when run alone."""
    kind, path, hf = pair
    if kind == "mistral-window" and blocks == 9:
        blocks = 4  # the window (8) keeps each sequence within 2 blocks: 9 would never preempt
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    roomy = LLM(model=str(path), dtype="float32", device="cpu", num_kv_blocks=64, block_size=8)
    solo = [roomy.generate([ids], params, use_tqdm=False)[0].outputs[0].token_ids for ids in PROMPTS]
    tight = LLM(model=str(path), dtype="float32", device="cpu", block_size=8,
                num_kv_blocks=blocks, max_num_batched_tokens=budget)
    outs = tight.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == solo
    if blocks == 9:
        assert tight.engine.scheduler.num_preemptions > 0
    pool = tight.engine.kv.pool
    pool.check_integrity([])
    assert pool.num_free == pool.num_usable
