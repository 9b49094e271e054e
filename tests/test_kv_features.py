"""The KV cache features end to end, with real forward passes: sliding-window eviction against
transformers, prefix caching (SmolLM2 and tiny models), n > 1 sharing blocks with copy-on-write."""
import pytest
import torch

from conftest import hf_greedy
from engine import LLM, SamplingParams
from engine.block_manager import NULL_BLOCK
from engine.sequence import SequenceStatus
from test_models_hf import make_model

W, BS = 32, 8
KV_DTYPES = ["auto", "int8"]  # the features hold with int8 blocks and their scales beside them
LIVE_BOUND = -(-(W - 1) // BS) + 1  # 5 blocks whatever the length


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """A tiny random Mistral with a 32-token window, saved as an HF directory."""
    import transformers
    path = tmp_path_factory.mktemp("mistral-w32")
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.2, sliding_window=W, tie_word_embeddings=False)
    hf = transformers.MistralForCausalLM(config).eval()
    hf.save_pretrained(path)
    return path, hf


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_model("llama", path)
    return path


def live(seq) -> int:
    return sum(1 for b in seq.block_ids if b != NULL_BLOCK)


def run_checked(llm, requests, on_step=None):
    """Drive the engine step by step, checking pool integrity after every step."""
    engine = llm.engine
    for rid, (prompt, params) in enumerate(requests):
        engine.add_request(str(rid), prompt, params)
    seqs = [s for r in engine.requests.values() for s in r.seqs]
    results, steps = {}, 0
    while engine.has_unfinished_requests():
        steps += 1
        assert steps < 5000, "no progress"
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out
        live_tables = [s.block_ids for s in seqs if not s.is_finished]
        engine.kv.pool.check_integrity(live_tables)
        if on_step:
            on_step(engine, seqs)
    return [results[str(i)] for i in range(len(requests))]


def assert_pool_empty(engine):
    pool = engine.kv.pool
    pool.check_integrity([])
    assert pool.num_used == 0 and pool.num_free == pool.num_usable


# ------------------------------------------------------------------ sliding window


def test_window_model_generates_4w_tokens_from_a_pool_smaller_than_one_sequence(mistral):
    path, hf = mistral
    prompts = [[(11 * i + 5 * j) % 500 + 1 for j in range(n)] for i, n in enumerate([20, 45, 3])]
    new = 4 * W
    # 10 blocks = 9 usable = 72 tokens, while each sequence reaches 131..173 tokens
    llm = LLM(model=str(path), dtype="float32", device="cpu", block_size=BS, num_kv_blocks=10,
              max_num_batched_tokens=64)
    assert llm.engine.config.model.sliding_window == W
    assert all(len(p) + new > 9 * BS for p in prompts)
    peak = {}

    def bounded(engine, seqs):
        for s in engine.scheduler.running:
            peak[s.seq_id] = max(peak.get(s.seq_id, 0), live(s))
            if s.num_computed_tokens >= s.num_prompt_tokens:  # decoding from here on
                assert live(s) <= LIVE_BOUND, (s, s.block_ids)

    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    outs = run_checked(llm, [(p, params) for p in prompts], bounded)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, new), f"prompt length {len(p)}"
    assert max(peak.values()) <= LIVE_BOUND + 64 // BS  # a 64-token prefill chunk at most
    assert_pool_empty(llm.engine)


def test_window_eviction_frees_blocks_between_prefill_chunks_and_on_abort(mistral):
    path, _ = mistral
    llm = LLM(model=str(path), dtype="float32", device="cpu", block_size=BS, num_kv_blocks=12,
              max_num_batched_tokens=16)
    engine = llm.engine
    engine.add_request("long", list(range(1, 201)), SamplingParams(max_tokens=50, ignore_eos=True))
    seq = engine.requests["long"].seqs[0]
    for _ in range(8):  # 8 chunks of 16 tokens: 128 computed, far past the window
        engine.step()
    assert seq.num_computed_tokens == 128
    assert seq.block_ids[:12] == [NULL_BLOCK] * 12  # blocks 0..11 end at 95 <= 128 - 32
    assert live(seq) <= LIVE_BOUND + 16 // BS
    engine.abort_request("long")
    assert_pool_empty(engine)


def test_window_eviction_with_int8_blocks_never_reads_a_freed_block(mistral):
    """int8 codes and scales: a pool small enough that window-evicted blocks are handed to
    other sequences at once gives the tokens of a pool where nothing is reused (a read of a
    freed block would see another sequence's codes), live blocks stay bounded."""
    path, _ = mistral
    prompts = [[(11 * i + 5 * j) % 500 + 1 for j in range(n)] for i, n in enumerate([20, 45, 3])]
    params = SamplingParams(temperature=0, max_tokens=3 * W, ignore_eos=True)
    roomy = LLM(model=str(path), dtype="float32", device="cpu", block_size=BS,
                num_kv_blocks=200, kv_cache_dtype="int8")
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    tight = LLM(model=str(path), dtype="float32", device="cpu", block_size=BS, num_kv_blocks=10,
                max_num_batched_tokens=64, kv_cache_dtype="int8")

    def bounded(engine, seqs):
        for s in engine.scheduler.running:
            if s.num_computed_tokens >= s.num_prompt_tokens:
                assert live(s) <= LIVE_BOUND, (s, s.block_ids)

    outs = run_checked(tight, [(p, params) for p in prompts], bounded)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert_pool_empty(tight.engine)


def test_window_engine_rejects_a_pool_smaller_than_the_window(mistral):
    path, _ = mistral
    with pytest.raises(ValueError, match="sliding window"):
        LLM(model=str(path), dtype="float32", device="cpu", block_size=BS, num_kv_blocks=4)


# ------------------------------------------------------------------ prefix caching


def test_shared_200_token_prefix_computes_only_new_tokens_smollm(smollm, hf_smollm):
    engine = smollm.engine
    engine.kv.pool.reset_prefix_cache()
    tok = smollm.get_tokenizer()
    text = " ".join(f"Fact {i}: the number {i} squared is {i * i}." for i in range(40))
    prefix = tok.encode(text)[:200]
    a = prefix + tok.encode(" Question: what is 3 squared? Answer:")
    b = prefix + tok.encode(" Question: what is 7 squared? Answer:")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    before = engine.stats
    smollm.generate([a], params, use_tqdm=False)
    mid = engine.stats
    out_b = smollm.generate([b], params, use_tqdm=False)[0]
    after = engine.stats

    bs = engine.config.block_size
    shared = 200 // bs * bs  # 192: the full blocks of the common prefix
    assert after["prefix_cache_queries"] - mid["prefix_cache_queries"] == len(b)
    assert after["prefix_cache_hits"] - mid["prefix_cache_hits"] == shared
    # b's prompt computed only past the shared blocks, then one token per decode step
    assert after["computed_tokens"] - mid["computed_tokens"] == len(b) - shared + 7
    assert mid["computed_tokens"] - before["computed_tokens"] == len(a) + 7
    assert out_b.outputs[0].token_ids == hf_greedy(hf_smollm, b, 8)


@pytest.mark.parametrize("kv", KV_DTYPES)
def test_prefix_cache_outputs_equal_uncached_under_eviction_pressure(llama_path, kv):
    """Shared prefixes, a pool that must evict cached blocks, and preemption: the tokens
    equal an uncached engine's, the pool stays consistent and ends empty."""
    prefixes = [[(3 * k + j) % 400 + 5 for j in range(n)] for k, n in enumerate([24, 17, 40])]
    requests = []
    for i in range(12):
        suffix = [(13 * i + j) % 300 + 100 for j in range(1 + i % 5)]
        params = SamplingParams(temperature=0, max_tokens=6 + i % 4, ignore_eos=True)
        requests.append((prefixes[i % 3] + suffix, params))
    plain = LLM(model=str(llama_path), dtype="float32", device="cpu",
                kv_cache_dtype=kv, block_size=8,
                num_kv_blocks=64, enable_prefix_caching=False)
    want = [o.outputs[0].token_ids for o in
            plain.generate([r[0] for r in requests], [r[1] for r in requests], use_tqdm=False)]
    assert plain.engine.stats["prefix_cache_hits"] == 0

    cached = LLM(model=str(llama_path), dtype="float32", device="cpu",
                 kv_cache_dtype=kv, block_size=8,
                 num_kv_blocks=16, max_num_seqs=4)
    outs = run_checked(cached, requests[:6])
    outs += run_checked(cached, requests[6:])  # again: hits on blocks freed into the cache
    assert [o.outputs[0].token_ids for o in outs] == want
    stats = cached.engine.stats
    assert stats["prefix_cache_hits"] > 0 and stats["prefix_cache_evictions"] > 0
    assert_pool_empty(cached.engine)


@pytest.mark.parametrize("kv", KV_DTYPES)
def test_preempted_sequence_recomputes_from_its_own_cached_blocks(llama_path, kv):
    llm = LLM(model=str(llama_path), dtype="float32", device="cpu",
              kv_cache_dtype=kv, block_size=8,
              num_kv_blocks=9, max_num_seqs=8)
    prompts = [[(7 * i + j) % 400 + 3 for j in range(30)] for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    solo = LLM(model=str(llama_path), dtype="float32", device="cpu",
               kv_cache_dtype=kv, block_size=8,
               num_kv_blocks=64, enable_prefix_caching=False)
    want = [solo.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    outs = run_checked(llm, [(p, params) for p in prompts])
    assert [o.outputs[0].token_ids for o in outs] == want
    stats = llm.engine.stats
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert_pool_empty(llm.engine)


# ------------------------------------------------------------------ n > 1, copy-on-write


@pytest.mark.parametrize("kv", KV_DTYPES)
def test_n4_shares_the_prompt_blocks_and_each_child_equals_its_seed_alone(llama_path, kv):
    llm = LLM(model=str(llama_path), dtype="float32", device="cpu",
              kv_cache_dtype=kv, block_size=8,
              num_kv_blocks=64, enable_prefix_caching=False)
    engine = llm.engine
    prompt = [(5 * j) % 400 + 7 for j in range(20)]  # 2 full blocks + 4 tokens
    params = SamplingParams(n=4, temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    engine.add_request("fork", prompt, params)
    seqs = engine.requests["fork"].seqs
    assert [s.status for s in seqs[1:]] == [SequenceStatus.PENDING] * 3

    engine.step()  # prefill once, fork, four first tokens
    pool = engine.kv.pool
    assert all(s.status is SequenceStatus.RUNNING for s in seqs)
    assert len({tuple(s.block_ids) for s in seqs}) == 1 and len(seqs[0].block_ids) == 3
    assert pool.num_used == 3  # the prompt's blocks, once
    assert all(pool.ref_counts[b] == 4 for b in seqs[0].block_ids)
    assert engine.stats["computed_tokens"] == len(prompt)

    engine.step()  # everyone writes token 20 into the shared partial block
    full, partial = seqs[0].block_ids[:2], [s.block_ids[2] for s in seqs]
    assert all(s.block_ids[:2] == full for s in seqs)
    assert all(pool.ref_counts[b] == 4 for b in full)
    assert len(set(partial)) == 4 and pool.num_used == 2 + 4  # 3 copies, 1 written in place
    while engine.has_unfinished_requests():
        out = engine.step()
    assert_pool_empty(engine)

    forked = [c.token_ids for c in sorted(out[0].outputs, key=lambda c: c.index)]
    alone = [llm.generate([prompt], SamplingParams(temperature=1.0, seed=1234 + i,
                                                   max_tokens=10, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids for i in range(4)]
    assert forked == alone
    assert len({tuple(t) for t in forked}) > 1  # they really sampled differently


def test_n_greedy_children_are_identical_and_abort_frees_pending_children(llama_path):
    llm = LLM(model=str(llama_path), dtype="float32", device="cpu", block_size=8,
              num_kv_blocks=64)
    prompt = list(range(3, 40))
    out = llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=5,
                                                ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs) == 3 and len({tuple(c.token_ids) for c in out.outputs}) == 1
    engine = llm.engine
    engine.add_request("x", prompt, SamplingParams(n=3, max_tokens=5))
    res = engine.abort_request("x")  # before the parent ever ran: children still pending
    assert [c.finish_reason for c in res.outputs] == ["abort"] * 3
    assert not engine.has_unfinished_requests() and not engine.scheduler.has_unfinished()
    assert_pool_empty(engine)
