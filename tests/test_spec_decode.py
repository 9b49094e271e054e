"""Speculative decoding (n-gram prompt lookup): the output is the target model's, token for token
when greedy or seeded and in distribution when not, with the KV cache left as without it."""
import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from engine.errors import ParamError
from engine.spec_decode import SpeculativeConfig, ngram_propose
from test_models_hf import ARCHS, COMMON

ALWAYS = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
          "prompt_lookup_max": 3, "adaptive": False}  # every lookup hit becomes drafts


def test_ngram_lookup_takes_the_latest_longest_match():
    t = np.array([5, 1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 1, 2, 3])
    # "1 2 3" occurred at 1 and 6: the latest is followed by 7 8 4
    assert ngram_propose(t, 3, 1, 3) == [7, 8, 4]
    assert ngram_propose(t, 10, 1, 3) == [7, 8, 4, 1, 2, 3]       # up to the end
    assert ngram_propose(np.array([4, 5, 6]), 2, 1, 3) == []       # no earlier occurrence
    assert ngram_propose(np.array([1, 2, 1, 3, 9, 2]), 2, 2, 3) == []   # "9 2" is new
    assert ngram_propose(np.array([1, 2, 1, 3, 9, 2]), 2, 1, 3) == [1, 3]  # "2" alone
    assert ngram_propose(np.array([7, 7, 7]), 4, 1, 2) == [7]     # a run proposes itself


def _lookup_by_windows(tokens, k, lo, hi):
    """The lookup's definition, window by window: the longest suffix first, its latest match."""
    n_tok = len(tokens)
    for n in range(min(hi, n_tok - 1), lo - 1, -1):
        for s in range(n_tok - n - 1, -1, -1):
            if list(tokens[s:s + n]) == list(tokens[n_tok - n:]):
                return list(tokens[s + n:s + n + k])
    return []


def test_ngram_lookup_equals_its_definition_on_random_text():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        n_tok = int(rng.integers(1, 40))
        t = rng.integers(0, int(rng.integers(1, 6)), n_tok)  # few symbols: many repeats
        lo = int(rng.integers(1, 4))
        hi = int(rng.integers(lo, 6))
        k = int(rng.integers(1, 6))
        assert ngram_propose(t, k, lo, hi) == _lookup_by_windows(t, k, lo, hi), (t, k, lo, hi)


@pytest.mark.parametrize("bad", [{"method": "eagle"}, {"num_speculative_tokens": 0},
                                 {"prompt_lookup_min": 3, "prompt_lookup_max": 2},
                                 {"nope": 1}, "not json", "[1]", {"method": "draft_model"},
                                 {"method": "ngram", "model": "/x"}])
def test_a_bad_speculative_config_is_a_param_error(bad):
    with pytest.raises(ParamError) as e:
        SpeculativeConfig.parse(bad)
    assert e.value.param == "speculative_config"


def test_speculative_config_from_json_text():
    cfg = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3}')
    assert cfg.num_speculative_tokens == 3 and cfg.prompt_lookup_max == 4


# ---------------------------------------------------------------- tiny random models

# repetitive prompts over a 32-token vocabulary: the lookup finds drafts, the random model
# takes some (~10%) and refuses the rest
PROMPTS = [[3, 4, 5, 6] * 5, [7, 8, 9] * 3 + [10, 11], list(range(1, 31)),
           [1, 2, 1, 2, 1, 3] * 4, [12]]


def tiny(tmp_path_factory, kind, vocab_size=32):
    import transformers
    config_cls, model_cls, extra = ARCHS[kind]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, "vocab_size": vocab_size})
    path = tmp_path_factory.mktemp(kind)
    getattr(transformers, model_cls)(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=[("llama", 48), ("mistral-window", 48),
                                        ("mistral-window", 400)], ids=str)
def tiny_pair(request, tmp_path_factory):
    """The same tiny model with and without speculation; block size 4, so drafts cross block
    boundaries; a pool of 48 blocks preempts (and evicts cached blocks), one of 400 keeps the
    prefix cache of a window model."""
    kind, blocks = request.param
    path = tiny(tmp_path_factory, kind)
    kw = dict(model=path, dtype="float32", device="cpu", block_size=4, num_kv_blocks=blocks,
              max_num_batched_tokens=64)
    spec = LLM(**kw, speculative_config=ALWAYS)
    spec.kw = kw
    return LLM(**kw), spec


def tokens(outs):
    return [list(o.token_ids) for out in outs for o in out.outputs]


def check_pool_empty(llm):
    pool = llm.engine.kv.pool
    assert pool.num_used == 0, "blocks leaked"
    pool.check_integrity([])


def test_greedy_equals_plain_decoding_on_tiny_models(tiny_pair):
    plain, spec = tiny_pair
    p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = tokens(plain.generate(PROMPTS, p, use_tqdm=False))
    before = dict(spec.engine.stats)
    got = tokens(spec.generate(PROMPTS, p, use_tqdm=False))
    assert got == want
    stats = spec.engine.stats
    drafted = stats["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
    accepted = (stats["spec_decode_num_accepted_tokens"]
                - before["spec_decode_num_accepted_tokens"])
    assert accepted >= 10 and drafted > accepted, (drafted, accepted)  # both kinds happened
    check_pool_empty(spec)
    # again: the prompts and outputs come from the prefix cache (published from accepted
    # tokens only), and a prompt that is a whole earlier output continues the same way
    again = tokens(spec.generate(PROMPTS, p, use_tqdm=False))
    assert again == want
    longer = [pr + out[:30] for pr, out in zip(PROMPTS, want)]
    p10 = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    assert tokens(spec.generate(longer, p10, use_tqdm=False)) == \
        tokens(plain.generate(longer, p10, use_tqdm=False))
    if spec.engine.config.num_kv_blocks > 100:
        assert spec.engine.kv.prefix_hits > 0
    elif spec.engine.config.model.sliding_window is None:  # (a window bounds the blocks)
        assert spec.engine.stats["num_preemptions"] > 0
    check_pool_empty(spec)


@pytest.mark.parametrize("params", [
    dict(temperature=0.8, top_p=0.9, seed=5),
    dict(temperature=1.0, top_k=20, min_p=0.02, seed=11, n=2),
    # penalties and min_tokens look at the drafts before the row (the sampler's offsets)
    dict(temperature=1.0, seed=3, repetition_penalty=1.3, frequency_penalty=0.4,
         presence_penalty=0.3, min_tokens=30, stop_token_ids=[5, 9]),
    dict(temperature=0, frequency_penalty=0.5, logprobs=2),
])
def test_seeded_sampling_equals_plain_decoding(tiny_pair, params):
    """A seeded row draws from (seed, output position): with or without drafts, every
    position draws the same, so the outputs are equal (and so are their logprobs)."""
    plain, spec = tiny_pair
    p = SamplingParams(max_tokens=40, **params)
    want = plain.generate(PROMPTS, p, use_tqdm=False)
    got = spec.generate(PROMPTS, p, use_tqdm=False)
    assert tokens(got) == tokens(want)
    if p.logprobs:
        for g, w in zip(got, want):
            for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
                assert a.keys() == b.keys()
                for t in a:
                    assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4)
    check_pool_empty(spec)


def test_stops_inside_an_accepted_run_are_exact(tiny_pair):
    plain, spec = tiny_pair
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = tokens(plain.generate(PROMPTS[:1], greedy, use_tqdm=False))[0]
    stop = ref[17]  # a token the output reaches in the middle of a run of drafts
    first = ref.index(stop)
    for p in (SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop])):
        want = tokens(plain.generate(PROMPTS[:1], p, use_tqdm=False))[0]
        got = spec.generate(PROMPTS[:1], p, use_tqdm=False)[0].outputs[0]
        assert list(got.token_ids) == want
        assert len(want) == (13 if p.max_tokens == 13 else first + 1)
    check_pool_empty(spec)


def test_unseeded_sampling_has_the_target_distribution(tmp_path_factory):
    """Chi-square: the tokens at the positions drafts cover, sampled with speculation, follow
    the same distribution as plain sampling's (a 6-token vocabulary)."""
    from scipy.stats import chi2_contingency
    path = tiny(tmp_path_factory, "llama", vocab_size=6)
    kw = dict(model=str(path), dtype="float32", device="cpu", block_size=4, num_kv_blocks=512,
              max_num_seqs=128)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]    # the lookup proposes "3 1 2 ..."
    p = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True)
    counts = []
    for spec_cfg in (None, ALWAYS):
        llm = LLM(**kw, speculative_config=spec_cfg)
        outs = tokens(llm.generate([prompt] * 1500, p, use_tqdm=False))
        # each position's token, and the pair of the first two (their joint law)
        table = np.zeros((4, 6), dtype=np.int64)
        for out in outs:
            for pos, t in enumerate(out[:3]):
                table[pos, t] += 1
        counts.append(table)
        if spec_cfg is not None:
            stats = llm.engine.stats
            assert stats["spec_decode_num_draft_tokens"] > 1500
            assert 0 < stats["spec_decode_num_accepted_tokens"] \
                < stats["spec_decode_num_draft_tokens"]
    for pos in range(3):
        table = np.stack([counts[0][pos], counts[1][pos]])
        table = table[:, table.sum(0) > 0]
        assert chi2_contingency(table).pvalue > 1e-3, (pos, table)


def drafts_over(steps: int, accept: bool, n: int, token_cost: float = 0.1) -> int:
    """SpecDecoder driven as the engine drives it, on n sequences whose lookup always finds
    drafts, steps timed as c0 + c1 * tokens (c1 / c0 = token_cost); drafts all accepted or
    all rejected. Returns the draft tokens proposed."""
    from engine.sequence import Sequence
    from engine.spec_decode import SpecDecoder
    spec = SpecDecoder(SpeculativeConfig(**{**ALWAYS, "adaptive": True}), max_model_len=10**6)
    seqs = [Sequence(f"r{i}", 0, list(range(1, 8)) * 3, SamplingParams(max_tokens=10**5))
            for i in range(n)]
    total = 0
    for _ in range(steps):
        for s in seqs:
            s.num_computed_tokens = s.num_tokens - 1
        spec.propose(seqs)
        tokens = 0
        for s in seqs:
            k = len(s.spec_token_ids)
            spec.record(s, k, k if accept else 0)
            total += k
            tokens += 1 + k
            for _ in range(1 + (k if accept else 0)):  # the cycle goes on
                s.token_ids.append(s.token_ids[-7])
        spec.end_step(seqs, tokens, 1.0 + token_cost * tokens, decode_only=True)
    return total


def test_adaptive_speculation_backs_off_when_drafts_fail():
    # one stream, a token ~0.1 of a step's fixed cost (a CPU's): good drafts go on, rejected
    # ones stop but for rare probes, which cost under 3% of the time
    assert drafts_over(400, accept=True, n=1) > 0.9 * 400 * 4
    assert drafts_over(400, accept=False, n=1) * 0.1 / 400 < 0.03
    # 16 streams: a token costs a larger share of a step, so good drafts are rationed more
    # than for one stream, and rejected ones stop as well
    assert drafts_over(100, accept=False, n=16) * 0.1 / (100 * (1 + 0.1 * 16)) < 0.03
    assert drafts_over(100, accept=True, n=16, token_cost=0.2) < \
        drafts_over(100, accept=True, n=16, token_cost=0.0)


def test_adaptive_speculation_keeps_the_tokens(tiny_pair):
    plain, always = tiny_pair
    adaptive = LLM(**always.kw, speculative_config={**ALWAYS, "adaptive": True})
    p = SamplingParams(temperature=1.0, seed=1, max_tokens=30, ignore_eos=True)
    assert tokens(adaptive.generate(PROMPTS, p, use_tqdm=False)) == \
        tokens(plain.generate(PROMPTS, p, use_tqdm=False))
    check_pool_empty(adaptive)


# ---------------------------------------------------------------- draft model


@pytest.mark.parametrize("kind", ["llama", "mistral-window"])
def test_draft_model_speculation_equals_plain_decoding(tmp_path_factory, kind):
    """A draft model (the target itself: drafts always right; another random model: nearly
    always wrong) changes no token, greedy or seeded, and leaves both KV pools empty; a
    small pool preempts on the way."""
    target = tiny(tmp_path_factory, kind)
    torch.manual_seed(1)
    import transformers
    config_cls, model_cls, extra = ARCHS[kind]
    other = tmp_path_factory.mktemp(kind + "-draft")
    getattr(transformers, model_cls)(getattr(transformers, config_cls)(
        **{**COMMON, **extra, "vocab_size": 32})).save_pretrained(other)
    kw = dict(model=target, dtype="float32", device="cpu", block_size=4, num_kv_blocks=40,
              max_num_batched_tokens=64)
    plain = LLM(**kw)
    for draft, kept in ((target, 0.9), (str(other), None)):
        spec = LLM(**kw, speculative_config={"method": "draft_model", "model": draft,
                                             "num_speculative_tokens": 4, "adaptive": False})
        for p in (SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                  SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)):
            assert tokens(spec.generate(PROMPTS, p, use_tqdm=False)) == \
                tokens(plain.generate(PROMPTS, p, use_tqdm=False))
            if p.temperature == 0:  # greedy drafts of the target itself: all taken
                stats = spec.engine.stats
                rate = (stats["spec_decode_num_accepted_tokens"]
                        / stats["spec_decode_num_draft_tokens"])
                assert rate > kept if kept else rate < 0.5, rate
        stats = spec.engine.stats
        check_pool_empty(spec)
        assert spec.engine.spec.draft.kv.pool.num_used == 0 and not spec.engine.spec.draft.shadows
        if kind == "llama":
            assert stats["num_preemptions"] > 0


def test_a_draft_model_of_another_vocabulary_is_refused(tmp_path_factory):
    target, draft = tiny(tmp_path_factory, "llama"), tiny(tmp_path_factory, "llama", 64)
    with pytest.raises(ParamError, match="tokenizer"):
        LLM(model=target, dtype="float32", device="cpu", num_kv_blocks=16,
            speculative_config={"method": "draft_model", "model": draft})


# ---------------------------------------------------------------- SmolLM2, over HTTP

PARAGRAPH = ("The committee met on Tuesday to review the annual budget. After a long discussion, "
             "the members agreed to increase funding for the library, reduce spending on "
             "travel, and postpone the decision about the new parking lot.")
MESSAGES = [[{"role": "user", "content": "Copy the following text exactly:\n\n" + PARAGRAPH}],
            [{"role": "user", "content": "Repeat after me: one two three, one two three, "
                                         "one two three."}],
            [{"role": "user", "content": "What is the capital of France?"}]]


def test_a_server_with_speculation_answers_as_plain_greedy_smollm2(smollm):
    """`kvserve serve --speculative-config`: SmolLM2's greedy answers, whole and streamed,
    equal the offline engine's without speculation; /metrics counts the drafts."""
    import json

    from server_utils import InProcessServer
    from test_structured import outputs
    cfg = json.dumps({"method": "ngram", "num_speculative_tokens": 4})
    want = [o.outputs[0].text for o in
            smollm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=60), use_tqdm=False)]
    with InProcessServer("--speculative-config", cfg, "--max-num-seqs", "4",
                         "--max-model-len", "512") as srv, srv.client() as http:
        for stream in (False, True):
            got = [outputs(http, "/v1/chat/completions",
                           {"messages": m, "temperature": 0, "max_tokens": 60},
                           stream)[0][0] for m in MESSAGES]
            assert got == want
        # constrained requests decode without drafts beside the others
        (text, _), = outputs(http, "/v1/chat/completions",
                             {"messages": MESSAGES[2], "max_tokens": 5,
                              "structured_outputs": {"choice": ["Paris", "Lyon"]}}, False)
        assert text in ("Paris", "Lyon")
        metrics = http.get("/metrics").text
    values = {line.split(" ")[0].split("{")[0]: float(line.split(" ")[-1])
              for line in metrics.splitlines() if line.startswith("kvserve:spec_decode")}
    assert values["kvserve:spec_decode_num_accepted_tokens_total"] > 20
    assert values["kvserve:spec_decode_num_draft_tokens_total"] \
        >= values["kvserve:spec_decode_num_accepted_tokens_total"]
    assert values["kvserve:spec_decode_num_drafts_total"] > 0
    assert "kvserve:spec_decode_num_accepted_tokens_per_pos_total" in values


def test_a_bad_speculative_config_stops_the_server_with_its_reason():
    from server_utils import InProcessServer
    with pytest.raises(ParamError, match="num_speculative_tokens"):
        InProcessServer("--speculative-config", '{"method": "ngram", '
                                                '"num_speculative_tokens": 99}')


def bench_code() -> str:
    """bench/speculative.py's code-edit input (the benchmark found the near tie on it)."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "speculative.py")
    spec = importlib.util.spec_from_file_location("bench_speculative", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CODE


def test_greedy_equals_plain_decoding_with_the_default_quantized_step():
    """`kvserve serve`'s default weights (int8/int4 step, int8 activations where VNNI runs
    them) and 8 drafts: the verification rows must get the numbers a decode gets (the CPU
    attention scores up to 17 query tokens of a sequence token by token, as a decode), else
    near ties flip (this prompt's 15th token did, 0.017 apart in logprob)."""
    kw = dict(quantization="auto", kv_cache_memory="256MiB", max_num_seqs=4)
    plain = LLM(**kw)
    spec = LLM(**kw, speculative_config={**ALWAYS, "num_speculative_tokens": 8})
    p = SamplingParams(temperature=0, max_tokens=48)
    messages = [[{"role": "user", "content": "Add a docstring to this function. Reply with the "
                                             "full code.\n\n" + bench_code()}],
                [{"role": "user", "content": "Copy the following text exactly:\n\n"
                                             + PARAGRAPH}]]
    want = [o.outputs[0].token_ids for o in plain.chat(messages, p, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in spec.chat(messages, p, use_tqdm=False)]
    assert got == want
    assert spec.engine.stats["spec_decode_num_accepted_tokens"] > 20
