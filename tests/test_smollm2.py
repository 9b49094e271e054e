"""The default model (real SmolLM2 weights from the GGUF) against transformers on the same file."""
import pytest
import torch

from conftest import engine_logits, hf_greedy
from engine import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village nestled between two mountains, there lived an old "
    "clockmaker who",
    "1, 2, 3, 4,",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Hi",
    "The three laws of thermodynamics are the foundation of physics. The first law states that "
    "energy cannot be created or destroyed, only transformed. The second law says",
]
TEXTS = PROMPTS + ["naïve café — 東京 🚀 tokens", "  leading spaces\n\ttabs", ""]


def test_tokenizer_matches_transformers(smollm, hf_tokenizer):
    tok = smollm.get_tokenizer()
    for text in TEXTS:
        assert tok.encode(text) == hf_tokenizer(text).input_ids, text
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is a KV cache?"},
                {"role": "assistant", "content": "A store of keys and values."},
                {"role": "user", "content": "Why page it?"}]
    for conv in (messages[1:2], messages):
        expected = hf_tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert tok.apply_chat_template(conv) == list(expected)


def test_logits_match_transformers(smollm, hf_smollm, hf_tokenizer):
    for prompt in PROMPTS[:4]:
        ids = hf_tokenizer(prompt).input_ids
        ours = engine_logits(smollm.engine, ids)
        with torch.inference_mode():
            ref = hf_smollm(torch.tensor([ids])).logits[0].float()
        diff = (ours - ref).abs().max().item()
        print(f"max |logit diff| = {diff:.2e} over {len(ids)} tokens")
        assert diff < 2e-3
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_greedy_batch_matches_transformers(smollm, hf_smollm, hf_tokenizer):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = smollm.generate(PROMPTS, params, use_tqdm=False)  # one batch, lengths 1..36
    for prompt, out in zip(PROMPTS, outs):
        ids = hf_tokenizer(prompt).input_ids
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == hf_greedy(hf_smollm, ids, 32), prompt
        assert out.outputs[0].finish_reason == "length"


def test_batch_invariance(smollm):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [f"Item {i}: the most interesting fact about the number {i * 7} is" for i in range(16)]
    batch = smollm.generate(prompts, params, use_tqdm=False)
    for i in (0, 5, 15):
        alone = smollm.generate(prompts[i], params, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == batch[i].outputs[0].token_ids


def test_text_and_eos(smollm, hf_tokenizer):
    out = smollm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8),
                          use_tqdm=False)[0].outputs[0]
    assert out.text.startswith(" Paris")
    assert out.text == hf_tokenizer.decode(out.token_ids, skip_special_tokens=True)
    chat = smollm.chat([{"role": "user", "content": "Say hello."}],
                       SamplingParams(temperature=0, max_tokens=200), use_tqdm=False)[0].outputs[0]
    assert chat.finish_reason == "stop" and chat.token_ids[-1] == 2  # <|im_end|> ends the turn
    assert "<|im_end|>" not in chat.text and chat.text.strip()


def test_seeded_sampling_is_reproducible(smollm):
    p = SamplingParams(temperature=0.8, seed=1234, max_tokens=16, ignore_eos=True)
    a = smollm.generate("Tell me a story", p, use_tqdm=False)[0].outputs[0].token_ids
    mixed = smollm.generate(["Tell me a story", "Other prompt", "And another one here"],
                            [p, SamplingParams(temperature=1.0, max_tokens=20), SamplingParams(temperature=0)],
                            use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == a
    other = smollm.generate("Tell me a story", SamplingParams(temperature=0.8, seed=99, max_tokens=16,
                                                               ignore_eos=True), use_tqdm=False)
    assert other[0].outputs[0].token_ids != a


def test_bfloat16_on_cpu(smollm, hf_tokenizer):
    llm = LLM(dtype="bfloat16", device="cpu", num_kv_blocks=64)
    ids = hf_tokenizer("The capital of France is").input_ids
    bf = engine_logits(llm.engine, ids)
    fp = engine_logits(smollm.engine, ids)
    assert bf.dtype == torch.float32 and llm.engine.runner.kv_cache.dtype == torch.bfloat16
    assert torch.equal(bf[-1].argmax(), fp[-1].argmax())
    assert (torch.log_softmax(bf[-1], -1) - torch.log_softmax(fp[-1], -1)).abs().max() < 1.0
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert out.outputs[0].text.startswith(" Paris")
