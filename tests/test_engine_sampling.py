"""Sampling through the whole engine: greedy equivalences, seeds in mixed batches, stop strings
and ids, min_tokens, logprobs and prompt logprobs against transformers, penalties against
transformers' generate, and beam search (a hand-built bigram model and SmolLM2)."""
import math

import pytest
import torch

from engine import LLM, SamplingParams
from engine.beam_search import normalized_score
from engine.output_processor import OutputProcessor
from engine.sequence import Sequence

PROMPT = "The history of the printing press begins"


def run1(llm, prompt, **kw):
    return llm.generate([prompt], SamplingParams(**kw), use_tqdm=False)[0]


# ------------------------------------------------------------------ equivalences and seeds


def test_top_k_1_temperature_0_and_beam_width_1_equal_greedy(smollm):
    greedy = run1(smollm, PROMPT, temperature=0, max_tokens=12, ignore_eos=True)
    top1 = run1(smollm, PROMPT, temperature=1.3, top_k=1, max_tokens=12, ignore_eos=True)
    beam1 = run1(smollm, PROMPT, use_beam_search=True, beam_width=1, max_tokens=12,
                 ignore_eos=True)
    want = greedy.outputs[0].token_ids
    assert top1.outputs[0].token_ids == want
    assert beam1.outputs[0].token_ids == want
    assert beam1.outputs[0].cumulative_logprob == pytest.approx(
        greedy.outputs[0].cumulative_logprob, abs=1e-4)


def test_seeded_request_is_the_same_alone_and_in_a_mixed_batch(smollm):
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=7, max_tokens=16,
                            ignore_eos=True)
    alone = smollm.generate([PROMPT], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0, max_tokens=8),
              SamplingParams(temperature=1.0, min_p=0.1, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.7, repetition_penalty=1.2, presence_penalty=0.5,
                             max_tokens=12, logprobs=3),
              SamplingParams(use_beam_search=True, beam_width=3, max_tokens=6)]
    prompts = ["Hello there", PROMPT, "1, 2, 3,", "Cats are"]
    outs = smollm.generate(prompts[:2] + [PROMPT] + prompts[2:], others[:2] + [seeded] + others[2:],
                           use_tqdm=False)
    assert outs[2].outputs[0].token_ids == alone
    different = run1(smollm, PROMPT, temperature=0.9, top_p=0.9, top_k=50, seed=8,
                     max_tokens=16, ignore_eos=True)
    assert different.outputs[0].token_ids != alone


# ------------------------------------------------------------------ stopping


def test_stop_string_spanning_two_tokens_is_cut_from_the_text(smollm):
    full = run1(smollm, PROMPT, temperature=0, max_tokens=24, ignore_eos=True).outputs[0]
    tok = smollm.get_tokenizer()
    # a stop string made of the end of token 5's text and the start of token 6's
    upto5 = tok.decode(full.token_ids[:6])
    upto6 = tok.decode(full.token_ids[:7])
    cut = len(upto5)
    assert len(upto6) - cut >= 2 and cut >= 2
    stop = upto6[cut - 2:cut + 2]
    assert stop not in upto5 and full.text.find(stop) == cut - 2
    out = run1(smollm, PROMPT, temperature=0, max_tokens=24, ignore_eos=True,
               stop=["never appears", stop]).outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == upto6[:cut - 2]
    assert out.token_ids == full.token_ids[:7]


def test_stop_token_ids_and_min_tokens(smollm):
    full = run1(smollm, PROMPT, temperature=0, max_tokens=16, ignore_eos=True).outputs[0]
    stop_id = full.token_ids[3]
    first = full.token_ids.index(stop_id)
    out = run1(smollm, PROMPT, temperature=0, max_tokens=16, stop_token_ids=[stop_id]).outputs[0]
    assert out.token_ids == full.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # min_tokens: the stop id cannot be sampled (it is masked) before index 6
    out = run1(smollm, PROMPT, temperature=0, max_tokens=16, stop_token_ids=[stop_id],
               min_tokens=6).outputs[0]
    assert len(out.token_ids) >= 6 and stop_id not in out.token_ids[:6]


def test_min_tokens_masks_eos(smollm):
    chat = smollm.get_tokenizer().apply_chat_template([{"role": "user", "content": "Say OK."}])
    short = run1(smollm, chat, temperature=0, max_tokens=40).outputs[0]
    assert short.finish_reason == "stop" and len(short.token_ids) < 20
    eos = smollm.engine.eos_token_ids
    longer = run1(smollm, chat, temperature=0, max_tokens=40, min_tokens=25).outputs[0]
    assert len(longer.token_ids) >= 25
    assert not eos & set(longer.token_ids[:25])


def test_visible_text_holds_back_a_possible_stop_string():
    class Detok:
        text = ""
    seq = Sequence("r", 0, [1], SamplingParams(stop=["STOP", "xyz"]))
    seq.detok = Detok()
    for text, visible in [("abc", "abc"), ("abcS", "abc"), ("abcST", "abc"),
                          ("abcSTO", "abc"), ("abcSTx", "abcST"), ("abx", "ab"), ("abxy", "ab"),
                          ("S", "")]:
        seq.detok.text = text
        assert OutputProcessor.visible_text(seq) == visible, text


# ------------------------------------------------------------------ logprobs vs transformers


def test_logprobs_and_prompt_logprobs_equal_transformers(smollm, hf_smollm, hf_tokenizer):
    out = run1(smollm, PROMPT, temperature=0.8, seed=3, max_tokens=6, ignore_eos=True,
               logprobs=5, prompt_logprobs=2)
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    with torch.inference_mode():
        ref = torch.log_softmax(hf_smollm(torch.tensor([ids])).logits[0].float(), -1)
    n = len(out.prompt_token_ids)
    # output tokens: the chosen token's logprob and rank, and the top 5
    total = 0.0
    for i, (token, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        row = ref[n - 1 + i]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=2e-3)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        top = row.topk(5)
        ranked = sorted((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank <= 5
                        and (t != token or lp.rank == entry[token].rank))
        assert [t for _, t, _ in ranked][:5] == top.indices.tolist()
        assert [lp for *_, lp in ranked][:5] == pytest.approx(top.values.tolist(), abs=2e-3)
        total += row[token].item()
    assert out.outputs[0].cumulative_logprob == pytest.approx(total, abs=1e-2)
    # prompt tokens: teacher-forced scores
    plp = out.prompt_logprobs
    assert plp[0] is None and len(plp) == n
    for j in range(1, n):
        row = ref[j - 1]
        entry = plp[j]
        assert entry[ids[j]].logprob == pytest.approx(row[ids[j]].item(), abs=2e-3)
        assert entry[ids[j]].rank == int((row > row[ids[j]]).sum()) + 1
        assert set(entry) >= set(row.topk(2).indices.tolist())
    assert entry[ids[n - 1]].decoded_token == smollm.get_tokenizer().decode([ids[n - 1]], False)


def test_prompt_logprobs_survive_chunked_prefill(smollm):
    engine = smollm.engine
    long_prompt = " ".join(["chunked prefill keeps every prompt position scored"] * 30)
    whole = run1(smollm, long_prompt, max_tokens=1, prompt_logprobs=0).prompt_logprobs
    budget = engine.scheduler.max_num_batched_tokens
    engine.scheduler.max_num_batched_tokens = 64
    try:
        chunked = run1(smollm, long_prompt, max_tokens=1, prompt_logprobs=0).prompt_logprobs
    finally:
        engine.scheduler.max_num_batched_tokens = budget
    assert len(whole) == len(chunked) > 200
    for a, b in zip(whole[1:], chunked[1:]):
        (ta, la), = a.items()
        (tb, lb), = b.items()
        assert ta == tb and la.logprob == pytest.approx(lb.logprob, abs=1e-4)


def test_prompt_logprobs_beside_requests_without_them(smollm):
    """A scoring request batched with ordinary ones (how a busy server runs it) gets the
    same prompt logprobs as alone; the step used to fail on the rows without them."""
    alone = run1(smollm, PROMPT, max_tokens=1, prompt_logprobs=1).prompt_logprobs
    outs = smollm.generate(["Once upon a time", PROMPT, "Hello"],
                           [SamplingParams(max_tokens=3), SamplingParams(max_tokens=1,
                                                                         prompt_logprobs=1),
                            SamplingParams(max_tokens=2)], use_tqdm=False)
    mixed = outs[1].prompt_logprobs
    assert outs[0].prompt_logprobs is None and len(outs[0].outputs[0].token_ids) == 3
    assert len(mixed) == len(alone) and mixed[0] is None
    for a, b in zip(alone[1:], mixed[1:]):
        assert a.keys() == b.keys()
        for t in a:
            assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4)


# ------------------------------------------------------------------ penalties vs transformers


def test_repetition_penalty_greedy_equals_transformers_generate(smollm, hf_smollm, hf_tokenizer):
    prompt = "one two three one two three one two three one"
    ids = hf_tokenizer(prompt).input_ids
    out = run1(smollm, prompt, temperature=0, max_tokens=20, ignore_eos=True,
               repetition_penalty=1.5).outputs[0].token_ids
    with torch.inference_mode():
        ref = hf_smollm.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20,
                                 do_sample=False, repetition_penalty=1.5,
                                 pad_token_id=0)[0, len(ids):].tolist()
    assert out == ref
    plain = run1(smollm, prompt, temperature=0, max_tokens=20, ignore_eos=True).outputs[0]
    assert plain.token_ids != out  # the penalty really changed something


# ------------------------------------------------------------------ beam search

# A bigram model: the next token depends only on the current one.  From S, greedy takes A
# (0.6) and then one of three tokens at 1/3 each; the best sequence is S B C (0.4 * 0.95).
S, A, B, C, X1, X2, X3, EOS = range(8)
BIGRAM = {S: {A: 0.6, B: 0.4}, A: {X1: 1 / 3, X2: 1 / 3, X3: 1 / 3}, B: {C: 0.95, X1: 0.05},
          C: {EOS: 1.0}, X1: {EOS: 1.0}, X2: {EOS: 1.0}, X3: {EOS: 1.0}, EOS: {EOS: 1.0}}


@pytest.fixture(scope="module")
def bigram(tmp_path_factory):
    import transformers
    path = tmp_path_factory.mktemp("bigram")
    config = transformers.LlamaConfig(
        vocab_size=8, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=False, rms_norm_eps=1e-8, eos_token_id=EOS, bos_token_id=S)
    model = transformers.LlamaForCausalLM(config).eval()
    table = torch.full((8, 8), 1e-6)  # table[cur, next]
    for cur, row in BIGRAM.items():
        for nxt, p in row.items():
            table[cur, nxt] = p
    table /= table.sum(-1, keepdim=True)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight[:, :8] = torch.eye(8)  # one-hot residual stream
        model.model.norm.weight.fill_(1.0)
        for layer in model.model.layers:  # attention and MLP add nothing
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        # RMSNorm turns the one-hot e_cur into 4 * e_cur: logits[next] = log table[cur, next]
        model.lm_head.weight[:, :8] = table.log().t() / 4
    model.save_pretrained(path)
    return str(path), table.log()


def test_beam_search_finds_the_sequence_greedy_misses(bigram):
    path, logp = bigram
    llm = LLM(model=path, dtype="float32", device="cpu", num_kv_blocks=32)
    greedy = llm.generate([[S]], SamplingParams(temperature=0, max_tokens=8),
                          use_tqdm=False)[0].outputs[0]
    assert greedy.token_ids[:2] == [A, X1] and greedy.finish_reason == "stop"
    beam = llm.generate([[S]], SamplingParams(use_beam_search=True, beam_width=2, n=2,
                                              max_tokens=8, length_penalty=1.0),
                        use_tqdm=False)[0].outputs
    best = beam[0]
    assert best.token_ids == [B, C, EOS] and best.finish_reason == "stop"
    want = (logp[S, B] + logp[B, C] + logp[C, EOS]).item()
    assert best.cumulative_logprob == pytest.approx(want, abs=1e-4)
    assert greedy.cumulative_logprob == pytest.approx(
        (logp[S, A] + logp[A, X1] + logp[X1, EOS]).item(), abs=1e-4)
    assert best.cumulative_logprob > greedy.cumulative_logprob
    assert beam[1].token_ids[:2] == [A, X1] or beam[1].token_ids[0] == A
    pool = llm.engine.kv.pool
    pool.check_integrity([])
    assert pool.num_used == 0


def test_beam_search_keeps_min_tokens(bigram):
    """A stop token before min_tokens is no candidate, as the sampler masks it: S B C EOS
    (3 tokens) may not close a hypothesis when 5 are the minimum (beam search used to close
    it anyway). The same rule as sampling's: greedy with min_tokens does not stop early."""
    path, _ = bigram
    llm = LLM(model=path, dtype="float32", device="cpu", num_kv_blocks=32)
    params = dict(min_tokens=5, max_tokens=8)
    beams = llm.generate([[S]], SamplingParams(use_beam_search=True, beam_width=2, n=2,
                                               **params), use_tqdm=False)[0].outputs
    greedy = llm.generate([[S]], SamplingParams(temperature=0, **params),
                          use_tqdm=False)[0].outputs[0]
    for out in [*beams, greedy]:
        assert len(out.token_ids) >= 5, out.token_ids
        assert EOS not in out.token_ids[:5], out.token_ids
    assert llm.engine.kv.pool.num_used == 0


def test_length_normalization_formula():
    # score = log P / ((5 + |seq|) ** a / (5 + 1) ** a)
    assert normalized_score(-3.0, 3, 1.0) == pytest.approx(-3.0 / (8 / 6))
    assert normalized_score(-3.0, 10, 0.6) == pytest.approx(-3.0 / ((15 ** 0.6) / (6 ** 0.6)))
    assert normalized_score(-3.0, 7, 0.0) == -3.0
    # a longer hypothesis with a lower log P can win once lengths are normalized
    assert normalized_score(-4.0, 20, 1.0) > normalized_score(-2.0, 2, 1.0)


def test_beam_search_on_smollm_beats_greedy_normalized(smollm):
    a = 1.0
    for prompt in ["The capital of France is", "def add(a, b):"]:
        greedy = run1(smollm, prompt, temperature=0, max_tokens=12).outputs[0]
        beams = run1(smollm, prompt, use_beam_search=True, beam_width=4, n=4, max_tokens=12,
                     length_penalty=a).outputs
        assert len(beams) == 4
        scores = [normalized_score(b.cumulative_logprob, len(b.token_ids), a) for b in beams]
        assert scores == sorted(scores, reverse=True)
        g = normalized_score(greedy.cumulative_logprob, len(greedy.token_ids), a)
        assert scores[0] >= g - 1e-6, prompt
        assert all(math.isfinite(s) for s in scores)
    pool = smollm.engine.kv.pool
    assert not smollm.engine.has_unfinished_requests() and pool.num_used == 0
