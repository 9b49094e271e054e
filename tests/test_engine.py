"""Engine behaviour on a tiny random Llama: aborts, stop conditions, validation, capacity."""
import logging

import pytest
import torch

from engine import LLM, LLMEngine, SamplingParams
from engine.config import ModelConfig, parse_size
from engine.loader import resolve_model
from test_models_hf import make_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", path)
    return str(path)


@pytest.fixture()
def engine(tiny_dir):
    return LLMEngine.from_args(model=tiny_dir, dtype="float32", device="cpu", block_size=4,
                               num_kv_blocks=40, max_num_batched_tokens=16)


def _run(engine):
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        engine.kv.pool.check_integrity([s.block_ids for s in engine.scheduler.running])
    return finished


def test_abort_at_any_time_frees_everything(engine):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i, n in enumerate([3, 40, 9, 12]):
        engine.add_request(f"r{i}", list(range(1, n + 1)), params)
    engine.step()                          # r0 admitted whole, r1 gets a chunk of its prefill
    aborted = engine.abort_request("r1")  # mid-prefill
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    for _ in range(4):
        engine.step()
    engine.abort_request("r0")            # decoding
    engine.abort_request("r3")            # wherever it is
    assert engine.abort_request("nope") is None
    done = _run(engine)
    assert list(done) == ["r2"] and len(done["r2"].outputs[0].token_ids) == 30
    pool = engine.kv.pool
    assert pool.num_free == pool.num_usable and not engine.scheduler.running
    pool.check_integrity([])


def test_stop_token_ids_max_tokens_and_model_len(engine):
    free_run = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine.add_request("a", [5, 6, 7], free_run)
    tokens = _run(engine)["a"].outputs[0].token_ids
    stop_at = tokens[4]
    first = tokens.index(stop_at)
    engine.add_request("b", [5, 6, 7], SamplingParams(temperature=0, max_tokens=12,
                                                       stop_token_ids=[stop_at]))
    out = _run(engine)["b"].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == tokens[:first + 1]
    engine.add_request("c", [5, 6, 7], SamplingParams(temperature=0, max_tokens=12,
                                                       stop_token_ids=[stop_at], min_tokens=first + 1))
    assert len(_run(engine)["c"].outputs[0].token_ids) > first + 1
    max_len = engine.config.max_model_len
    engine.add_request("d", list(range(1, max_len - 2)), SamplingParams(max_tokens=50, ignore_eos=True))
    out = _run(engine)["d"].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_eos_ends_unless_ignored(tiny_dir):
    engine = LLMEngine.from_args(model=tiny_dir, dtype="float32", device="cpu", num_kv_blocks=32)
    engine.add_request("probe", [9, 8, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    tokens = _run(engine)["probe"].outputs[0].token_ids
    engine.stop_rules.eos_token_ids = frozenset({tokens[2]})  # pretend EOS is the third token
    engine.add_request("eos", [9, 8, 7], SamplingParams(temperature=0, max_tokens=6))
    engine.add_request("ign", [9, 8, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    done = _run(engine)
    first = tokens.index(tokens[2])
    assert done["eos"].outputs[0].token_ids == tokens[:first + 1]
    assert done["eos"].outputs[0].finish_reason == "stop"
    assert done["ign"].outputs[0].token_ids == tokens


def test_bad_requests_raise_clear_errors(engine):
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.add_request("t", "text prompt")
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("e", [])
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        engine.add_request("v", [1, 512])
    with pytest.raises(ValueError, match="maximum context length"):
        engine.add_request("l", [1] * engine.config.max_model_len)
    engine.add_request("dup", [1, 2])
    with pytest.raises(ValueError, match="already"):
        engine.add_request("dup", [1, 2])
    for bad in (dict(temperature=-1), dict(top_p=0), dict(n=0), dict(max_tokens=0),
                dict(top_k=0), dict(stop=[""]), dict(temperature=float("nan"))):
        field = next(iter(bad))
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)


def test_kv_capacity_follows_the_formula(tiny_dir, caplog):
    cfg = resolve_model(tiny_dir)
    with caplog.at_level(logging.INFO, logger="kvserve.engine"):
        engine = LLMEngine.from_args(model=tiny_dir, dtype="float32", device="cpu",
                                     kv_cache_memory="1MiB", block_size=16)
    m = engine.config.model
    per_token = 2 * m.head_dim * m.num_kv_heads * m.num_layers * 4  # lecture: 2 x D x H x L x bytes
    assert m.kv_bytes_per_token(torch.float32) == per_token == 2 * 8 * 2 * 2 * 4
    assert engine.config.num_kv_blocks == 2**20 // (per_token * 16)
    assert engine.runner.kv_cache.numel() * 4 == engine.config.kv_cache_bytes
    assert any(f"KV cache: {engine.config.num_kv_blocks} blocks × 16 tokens" in r.message
               for r in caplog.records)
    assert cfg.kind == "hf"


def test_model_resolution_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        resolve_model("meta-llama/Llama-3-8B")
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("512MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="memory size"):
        parse_size("lots")
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelConfig.from_hf(dict(architectures=["GPT2LMHeadModel"], vocab_size=8, hidden_size=8,
                                 intermediate_size=8, num_hidden_layers=1, num_attention_heads=1))


def test_dummy_weights_and_generate_api(tiny_dir):
    llm = LLM(model=tiny_dir, load_format="dummy", device="cpu", num_kv_blocks=32)
    outs = llm.generate([[1, 2, 3], [4, 5]], [SamplingParams(max_tokens=3, ignore_eos=True),
                                              SamplingParams(max_tokens=5, ignore_eos=True, n=2)],
                        use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [1, 2]
    assert [len(c.token_ids) for c in outs[1].outputs] == [5, 5]
    assert outs[0].prompt_token_ids == [1, 2, 3]
    with pytest.raises(ValueError, match="SamplingParams for 2 prompts"):
        llm.generate([[1], [2]], [SamplingParams()] * 3)


@pytest.mark.parametrize("fork", ["beam", "n"])
def test_forks_never_exceed_max_num_seqs(tiny_dir, fork):
    """A beam request holds beam_width seats from admission (its beams are forked later), an
    n > 1 request n: the running batch never exceeds max_num_seqs (beams used to take one seat
    and fork past the limit). A request wider than the limit is refused up front."""
    engine = LLMEngine.from_args(model=tiny_dir, dtype="float32", device="cpu", block_size=4,
                                 num_kv_blocks=200, max_num_seqs=4)
    wide = SamplingParams(max_tokens=6, ignore_eos=True, use_beam_search=True, beam_width=3) \
        if fork == "beam" else SamplingParams(max_tokens=6, ignore_eos=True, n=3, seed=1)
    engine.add_request("wide", [5, 6, 7, 8], wide)
    for i in range(4):
        engine.add_request(f"r{i}", [9 + i, 3, 4], SamplingParams(max_tokens=8, ignore_eos=True))
    peak = 0
    finished = set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished.add(out.request_id)
        peak = max(peak, len(engine.scheduler.running))
        assert len(engine.scheduler.running) <= 4
    assert finished == {"wide", "r0", "r1", "r2", "r3"}
    assert peak == 4  # the limit is used, not just respected
    too_wide = SamplingParams(use_beam_search=True, beam_width=5) if fork == "beam" \
        else SamplingParams(n=5)
    with pytest.raises(ValueError, match="beam_width|n "):
        engine.add_request("x", [1, 2], too_wide)


def test_a_long_prompt_does_not_stall_a_generating_stream(tiny_dir):
    """A 400-token prompt that arrives while a stream generates is fed over several steps
    (prefill_chunk token-equivalents each), each of which gives the stream its next token (it
    used to be one 400-token step: on a real model, seconds without a token for everyone)."""
    assert LLMEngine.from_args(model=tiny_dir, device="cpu",
                               num_kv_blocks=8).config.prefill_chunk == 512
    engine = LLMEngine.from_args(model=tiny_dir, dtype="float32", device="cpu",
                                 num_kv_blocks=64, prefill_chunk=128)
    engine.add_request("gen", [1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    engine.add_request("long", list(range(5, 405)), SamplingParams(max_tokens=1, ignore_eos=True))
    steps = 0
    while "long" in engine.requests:
        outs = {o.request_id: o for o in engine.step()}
        steps += 1
        assert "gen" in outs and len(outs["gen"].outputs[0].token_ids) == steps + 1
    assert steps >= 4
    engine.abort_request("gen")
    assert engine.kv.pool.num_free == engine.kv.pool.num_usable
