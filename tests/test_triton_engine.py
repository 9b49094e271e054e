"""The engine end to end with the Triton backend (interpreted on the CPU) vs the torch one."""
import pytest
import torch

from engine import LLM, SamplingParams
from test_models_hf import PROMPTS, make_model
from test_triton_attention import interpreter_env  # skips this module without triton too


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    """TRITON_INTERPRET=1 without CUDA for this module's tests only (see interpreter_env)."""
    with interpreter_env():
        yield


@pytest.mark.parametrize("kind,kv", [("llama", "auto"), ("mistral-window", "auto"),
                                     ("llama", "int8"), ("mistral-window", "fp8_e4m3")])
def test_triton_backend_matches_torch_backend(kind, kv, tmp_path):
    """Also with a quantized cache: both backends store the same codes and scales (the
    Triton store is bit-exact with the reference's) and read them back in attention."""
    make_model(kind, tmp_path)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        # a 7-token budget makes chunked prefill and mixed prefill/decode steps happen
        llm = LLM(model=str(tmp_path), dtype="float32", device="cpu", block_size=16,
                  num_kv_blocks=32, max_num_batched_tokens=7, attention_backend=backend,
                  kv_cache_dtype=kv)
        assert llm.engine.config.attention_backend == backend
        outs = llm.generate(PROMPTS[:4], params, use_tqdm=False)
        tokens[backend] = [o.outputs[0].token_ids for o in outs]
    assert tokens["triton"] == tokens["torch"]


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    make_model("llama", tmp_path)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        LLM(model=str(tmp_path), device="cpu", attention_backend="triton", num_kv_blocks=8)


def test_speculative_verification_on_the_triton_backend(tmp_path):
    """Drafts make several query tokens per decoding sequence: the Triton path routes such a
    batch to its prefill kernel; greedy output must equal plain decoding on it."""
    make_model("mistral-window", tmp_path)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    kw = dict(model=str(tmp_path), dtype="float32", device="cpu", block_size=16,
              num_kv_blocks=32, attention_backend="triton")
    prompts = [[3, 4, 5, 3, 4, 5, 3, 4], PROMPTS[2]]
    plain = LLM(**kw).generate(prompts, params, use_tqdm=False)
    spec = LLM(**kw, speculative_config={"method": "draft_model", "model": str(tmp_path),
                                         "num_speculative_tokens": 3, "adaptive": False})
    outs = spec.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    assert spec.engine.stats["spec_decode_num_accepted_tokens"] > 0
