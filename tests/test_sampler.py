"""The batched sampler without a model: distributions (chi-square), greedy equivalences, seeds,
penalties and their incremental counts, min_tokens, raw logprobs."""
import copy
import math
from collections import Counter

import numpy as np
import pytest
import torch

from engine.sampler import Sampler, SamplerOutput, compute_logprobs
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.stop_rules import StopRules

V = 40
DRAWS = 40_000
Z_1E4 = 3.719  # upper 1e-4 quantile of the standard normal


def spread_logits(seed: int = 7, vocab: int = V, scale: float = 1.5) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, scale, vocab)


# ---------------------------------------------------------------- the definition, one row at a time

def expected_probs(logits, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0,
                   truncate_crossing=False) -> np.ndarray:
    """vLLM's filtered softmax, written out plainly: temperature, min_p, top_k, top_p.
    truncate_crossing gives the token that crosses top_p only the mass up to top_p (wrong)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    ratio = p / p.max()
    assert min_p == 0 or np.abs(ratio[ratio < 1] - min_p).min() > 1e-3, "min_p at a token"
    order = [i for i in sorted(range(len(z)), key=lambda i: -z[i]) if ratio[i] >= min_p]
    if top_k != -1:
        order = order[:top_k]
    q = p[order] / p[order].sum()
    out = np.zeros(len(z))
    mass = 0.0
    for i, qi in zip(order, q):
        if mass >= top_p:
            break
        assert top_p == 1 or abs(mass - top_p) > 1e-3, "top_p too close to a cumulative mass"
        out[i] = min(qi, top_p - mass) if truncate_crossing else qi
        mass += qi
    return out / out.sum()


def chi2_threshold(df: int, z: float = Z_1E4) -> float:
    """Upper quantile of chi-square(df), Wilson-Hilferty approximation."""
    if df == 0:  # one bin: the statistic is 0
        return 0.0
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom; bins expecting fewer than 5 draws are pooled.
    A draw where the distribution says 0 makes the statistic infinite."""
    n = counts.sum()
    if counts[probs == 0].any():
        return math.inf, 1
    exp, obs = n * probs[probs > 0], counts[probs > 0]
    small = exp < 5
    if small.any():
        exp = np.append(exp[~small], exp[small].sum())
        obs = np.append(obs[~small], obs[small].sum())
    return float(((obs - exp) ** 2 / exp).sum()), len(exp) - 1


def rejects(counts, probs) -> bool:
    stat, df = chi2(counts, probs)
    return stat > chi2_threshold(df)


# ---------------------------------------------------------------- helpers

def seq(params: SamplingParams, prompt=(1, 2, 3), outputs=(), index=0, rid="r") -> Sequence:
    s = Sequence(rid, index, list(prompt), params)
    s.token_ids += list(outputs)
    return s


def draw_counts(logits, params: SamplingParams, n: int = DRAWS, seed: int = 0) -> np.ndarray:
    """n draws of one row, made in one call by repeating the row n times."""
    torch.manual_seed(seed)
    row = torch.as_tensor(logits, dtype=torch.float32)
    out = Sampler()(row.expand(n, -1).contiguous(), [seq(params) for _ in range(n)])
    return np.bincount(out.tokens.numpy(), minlength=row.numel())


# ---------------------------------------------------------------- distributions

CASES = {
    "temperature 1": dict(),
    "temperature 0.6": dict(temperature=0.6),
    "temperature 1.7": dict(temperature=1.7),
    "top_k 6": dict(top_k=6),
    "top_p 0.77": dict(top_p=0.77),
    "top_p 0.25, flat (redraw rounds)": dict(top_p=0.25, temperature=3.0),
    "min_p 0.12": dict(min_p=0.12),
    "top_k+top_p+temperature": dict(top_k=9, top_p=0.83, temperature=0.8),
    "min_p+top_p+temperature": dict(min_p=0.03, top_p=0.9, temperature=1.3),
    "all four": dict(temperature=1.2, min_p=0.05, top_k=12, top_p=0.72),
}


@pytest.fixture(params=["kernels", "torch"])
def path(request, monkeypatch):
    """The sampler's row passes on the CPU kernels (kernels/cpu.py), or torch's everywhere (as
    on a GPU, or without a compiler)."""
    import engine.sampler
    if request.param == "torch":
        monkeypatch.setattr(engine.sampler, "_cpu", lambda x: False)
    elif not engine.sampler._cpu(torch.zeros(1)):
        pytest.skip("no CPU kernels")
    return request.param


@pytest.mark.parametrize("case", list(CASES))
def test_draws_follow_the_filtered_softmax(case, path):
    kw = CASES[case]
    logits = spread_logits()
    probs = expected_probs(logits, **kw)
    counts = draw_counts(logits, SamplingParams(**kw))
    assert not counts[probs == 0].any(), "a filtered-out token was drawn"
    stat, df = chi2(counts, probs)
    assert df >= 2 and stat <= chi2_threshold(df), (stat, df)


@pytest.mark.parametrize("kw", [dict(), dict(top_p=0.65, temperature=1.3), dict(top_k=300),
                                dict(top_k=280, top_p=0.9, min_p=0.02)])
def test_draws_across_blocks(kw, path):
    # V = 1000: the draw picks one of four 256-entry blocks, then an entry in it. 60 tokens,
    # spread over every block, carry most of the mass; the rest share a thin tail.
    rng = np.random.default_rng(5)
    logits = np.full(1000, -2.0) + rng.normal(0, 0.3, 1000)
    logits[rng.choice(1000, 60, replace=False)] = rng.normal(2.5, 1.0, 60)
    probs = expected_probs(logits, **kw)
    counts = draw_counts(logits, SamplingParams(**kw))
    assert not rejects(counts, probs)
    for block in range(4):   # every block is drawn from as often as it should be
        mass = probs[block * 256:(block + 1) * 256].sum()
        got = counts[block * 256:(block + 1) * 256].sum() / DRAWS
        assert abs(got - mass) < 5 * math.sqrt(mass * (1 - mass) / DRAWS) + 1e-9, block


def test_flat_distribution_with_a_tiny_nucleus():
    # Near-uniform logits: the first draw is almost always outside a 3% nucleus.
    logits = np.linspace(0.3, 0.0, 50)
    probs = expected_probs(logits, top_p=0.03)
    assert (probs > 0).sum() == 2
    counts = draw_counts(logits, SamplingParams(top_p=0.03), n=20_000)
    assert not rejects(counts, probs)


def test_chi_square_has_teeth():
    """The real draws must be rejected against subtly wrong definitions, so the test above
    catches a sampler that implements one of them."""
    logits = spread_logits()
    kw = dict(top_k=9, top_p=0.83, temperature=0.8)
    right = expected_probs(logits, **kw)
    kept = np.flatnonzero(right)
    ranked = np.argsort(-logits)

    def top(n):  # the softmax at temperature 0.8 over the n most likely tokens
        return expected_probs(np.where(np.isin(np.arange(V), ranked[:n]), logits, -np.inf), 0.8)

    assert np.allclose(top(len(kept)), right)
    wrong = {
        "top_p keeps one token too few": top(len(kept) - 1),
        "top_p keeps one token too many": top(len(kept) + 1),
        "crossing token cut at top_p": expected_probs(logits, **kw, truncate_crossing=True),
        "top_p before top_k": expected_probs(
            np.where(expected_probs(logits, temperature=0.8, top_p=0.83) > 0, logits, -np.inf),
            temperature=0.8, top_k=9),
        "temperature +8%": expected_probs(logits, **{**kw, "temperature": 0.864}),
    }
    counts = draw_counts(logits, SamplingParams(**kw))
    assert not rejects(counts, right)
    for name, probs in wrong.items():
        assert not np.allclose(probs, right), name
        assert rejects(counts, probs), name
    counts = draw_counts(logits, SamplingParams(top_k=6))
    assert not rejects(counts, expected_probs(logits, top_k=6))
    for k in (5, 7):
        assert rejects(counts, expected_probs(logits, top_k=k)), k
    counts = draw_counts(logits, SamplingParams(min_p=0.12))
    assert not rejects(counts, expected_probs(logits, min_p=0.12))
    for min_p in (0.11, 0.126):  # each moves the threshold past one token
        assert rejects(counts, expected_probs(logits, min_p=min_p)), min_p


def test_strong_filters_never_draw_outside():
    logits = spread_logits(seed=3)
    for kw in (dict(top_k=2), dict(top_p=0.3), dict(min_p=0.5), dict(min_p=1.0)):
        counts = draw_counts(logits, SamplingParams(**kw), n=5000)
        allowed = expected_probs(logits, **kw) > 0
        assert counts[~allowed].sum() == 0 and counts[allowed].all(), kw


# ---------------------------------------------------------------- greedy

def test_top_k_1_and_temperature_0_are_greedy():
    torch.manual_seed(1)
    logits = torch.randn(6, 500) * 3
    pens = dict(repetition_penalty=1.4, frequency_penalty=0.7, presence_penalty=0.3)
    for kw in (dict(temperature=0), dict(top_k=1), dict(top_k=1, temperature=1.9, top_p=0.2),
               dict(temperature=0, **pens), dict(top_k=1, **pens)):
        seqs = [seq(SamplingParams(**kw), prompt=[int(logits[i].argmax())], outputs=[7, 7])
                for i in range(6)]
        ref = [seq(SamplingParams(temperature=0, **{k: v for k, v in kw.items() if k in pens}),
                   prompt=[int(logits[i].argmax())], outputs=[7, 7]) for i in range(6)]
        for _ in range(3):
            assert torch.equal(Sampler()(logits, seqs).tokens, Sampler()(logits, ref).tokens)
    plain = [seq(SamplingParams(top_k=1, temperature=1.5)) for _ in range(6)]
    assert torch.equal(Sampler()(logits, plain).tokens, logits.argmax(-1))


def test_greedy_fast_path_equals_general_path():
    torch.manual_seed(2)
    logits = torch.randn(8, 300) * 2
    fast = Sampler()(logits, [seq(SamplingParams(temperature=0)) for _ in range(8)])
    assert fast.top_ids is None and fast.ranks is None
    # One row with logprobs and one sampling row send the batch down the general path.
    mixed = [seq(SamplingParams(temperature=0, logprobs=2))] + \
            [seq(SamplingParams(temperature=0)) for _ in range(6)] + [seq(SamplingParams())]
    general = Sampler()(logits, mixed)
    assert torch.equal(fast.tokens[:7], general.tokens[:7])
    torch.testing.assert_close(fast.logprobs[:7], general.logprobs[:7])
    assert torch.equal(fast.tokens, logits.argmax(-1))
    assert fast.tokens.dtype == torch.int64 and fast.logprobs.dtype == torch.float32


# ---------------------------------------------------------------- seeds

def mixed_batch(target: SamplingParams, outputs=()) -> tuple[list[Sequence], int]:
    others = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_k=400),
              SamplingParams(top_k=3, repetition_penalty=1.3, logprobs=4),
              SamplingParams(seed=99, min_p=0.2), SamplingParams(min_tokens=5, stop_token_ids=[0])]
    seqs = [seq(p, outputs=outputs, rid=f"o{i}") for i, p in enumerate(others)]
    seqs.insert(3, seq(target, outputs=outputs))
    return seqs, 3


def run_steps(sampler, logits_per_step, seqs, row) -> list[int]:
    tokens = []
    for logits in logits_per_step:
        out = sampler(logits, seqs)
        for s, t in zip(seqs, out.tokens.tolist()):
            s.token_ids.append(t)
        tokens.append(int(out.tokens[row]))
    return tokens


@pytest.mark.parametrize("kw", [dict(top_k=50), dict(top_p=0.9, min_p=0.01)])
def test_seeded_row_does_not_depend_on_the_batch(kw):
    gen = torch.Generator().manual_seed(5)
    steps = [torch.randn(7, 600, generator=gen) * 2 for _ in range(12)]
    target = SamplingParams(seed=1234, temperature=0.9, presence_penalty=0.5, **kw)
    alone = run_steps(Sampler(), [s[3:4] for s in steps], [seq(target)], 0)
    torch.manual_seed(0)
    seqs, row = mixed_batch(target)
    batched = run_steps(Sampler(), steps, seqs, row)
    torch.manual_seed(1)  # another global RNG state and another Sampler: same tokens
    seqs, row = mixed_batch(target)
    again = run_steps(Sampler(StopRules({0})), steps, seqs, row)
    assert alone == batched == again
    other_seed = run_steps(Sampler(), [s[3:4] for s in steps],
                           [seq(SamplingParams(seed=1235, temperature=0.9, presence_penalty=0.5,
                                               **kw))], 0)
    assert other_seed != alone
    # the n outputs of one request use seed + index: they differ from each other
    second = run_steps(Sampler(), [s[3:4] for s in steps], [seq(target, index=1)], 0)
    assert second != alone


# ---------------------------------------------------------------- penalties

def greedy_pick(logits_row, params, prompt, outputs) -> int:
    kw = {k: getattr(params, k) for k in ("repetition_penalty", "frequency_penalty",
                                          "presence_penalty")}
    s = seq(SamplingParams(temperature=0, **kw), prompt=prompt, outputs=outputs)
    return int(Sampler()(torch.tensor([logits_row]), [s]).tokens[0])


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    # token 0 (seen in the prompt) at 2.0 against token 1 (unseen) at 1.55:
    # 2.0 / 1.28 = 1.5625 still wins, 2.0 / 1.30 = 1.538 loses.
    row = [2.0, 1.55, -5.0]
    assert greedy_pick(row, SamplingParams(repetition_penalty=1.28), [0], []) == 0
    assert greedy_pick(row, SamplingParams(repetition_penalty=1.30), [0], []) == 1
    # negative: token 0 (seen as an output) at -1.0 against -1.25: -1.2 wins, -1.3 loses.
    row = [-1.0, -1.25, -5.0]
    assert greedy_pick(row, SamplingParams(repetition_penalty=1.2), [2], [0]) == 0
    assert greedy_pick(row, SamplingParams(repetition_penalty=1.3), [2], [0]) == 1
    # a penalty below 1 rewards seen tokens
    assert greedy_pick([1.0, 1.2], SamplingParams(repetition_penalty=0.8), [0], []) == 0


def test_frequency_and_presence_count_outputs_only():
    # token 0 seen 3 times as output, token 1 once, token 2 only in the prompt.
    # freq 0.5, presence 0.2: token 0 -= 1.7, token 1 -= 0.7, token 2 untouched.
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.2)
    prompt, outputs = [2, 2, 2], [0, 1, 0, 0]
    assert greedy_pick([3.0, 0.0, 1.29, 1.305], p, prompt, outputs) == 3   # 3.0 - 1.7 = 1.3
    assert greedy_pick([3.0, 0.0, 1.29, 1.295], p, prompt, outputs) == 0
    assert greedy_pick([0.0, 2.0, 1.29, 1.295], p, prompt, outputs) == 1   # 2.0 - 0.7 = 1.3
    assert greedy_pick([0.0, 2.0, 1.31, 1.295], p, prompt, outputs) == 2   # prompt-only: 1.31
    # negative presence/frequency encourage repeats
    q = SamplingParams(frequency_penalty=-0.5, presence_penalty=-0.2)
    assert greedy_pick([1.0, 1.0, 1.5, 2.0], q, prompt, outputs) == 0     # 1.0 + 1.7


def test_penalised_distribution_is_exact():
    # Sampling rows see the same penalised logits: compare all tokens at once by chi-square.
    logits = spread_logits(seed=11, vocab=12, scale=1.0)
    prompt, outputs = [0, 1, 1, 5], [1, 3, 3, 3, 7, 0]
    rep, freq, pres = 1.6, 0.4, -0.3
    z = logits.copy()
    for t in set(prompt + outputs):
        z[t] = z[t] / rep if z[t] > 0 else z[t] * rep
    for t, c in Counter(outputs).items():
        z[t] -= freq * c + pres
    params = SamplingParams(repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)
    torch.manual_seed(3)
    n = 30_000
    seqs = [seq(params, prompt=prompt, outputs=outputs) for _ in range(n)]
    out = Sampler()(torch.tensor(logits, dtype=torch.float32).expand(n, -1).contiguous(), seqs)
    counts = np.bincount(out.tokens.numpy(), minlength=12)
    assert not rejects(counts, expected_probs(z))
    assert rejects(counts, expected_probs(logits))


def seen_counts(s: Sequence) -> tuple[dict, set]:
    st = s.sampler_state
    ids, counts = st.ids.tolist(), st.counts.tolist()
    return {t: c for t, c in zip(ids, counts) if c}, set(ids)


def test_counts_are_incremental_and_equal_a_recount():
    gen = torch.Generator().manual_seed(8)
    params = SamplingParams(temperature=0.8, frequency_penalty=0.3, presence_penalty=0.2,
                            repetition_penalty=1.1, seed=5)
    prompt = [3, 4, 4, 9]
    live = seq(params, prompt=prompt)
    sampler = Sampler()
    for step in range(20):
        logits = torch.randn(1, 60, generator=gen)
        before = live.sampler_state
        token = int(sampler(logits, [live]).tokens[0])
        assert before is None or live.sampler_state is before   # kept, not rebuilt
        live.token_ids.append(token)
        if step % 5 == 4:  # a resumed sequence can come back with several new tokens
            live.token_ids += [token, 59]
    sampler(torch.randn(1, 60, generator=gen), [live])          # counts the last tokens
    outputs = live.output_token_ids
    want = {t: float(c) for t, c in Counter(outputs).items()}
    assert seen_counts(live) == (want, set(prompt) | set(outputs))
    assert live.sampler_state.num_counted == len(outputs)
    # a fresh Sequence with the same tokens (a forked child) counts the same and samples the same
    child = seq(params, prompt=prompt, outputs=outputs)
    logits = torch.randn(1, 60, generator=gen)
    a, b = sampler(logits, [live]), sampler(logits, [child])
    assert seen_counts(child) == seen_counts(live) and torch.equal(a.tokens, b.tokens)


def test_a_copied_sequence_does_not_share_counts():
    params = SamplingParams(temperature=0, frequency_penalty=1.0)
    parent = seq(params, prompt=[1], outputs=[2])
    Sampler()(torch.zeros(1, 8), [parent])
    twin = copy.copy(parent)                         # shares sampler_state by reference
    twin.token_ids = parent.token_ids + [5]
    parent.token_ids.append(6)
    Sampler()(torch.zeros(2, 8), [parent, twin])
    assert seen_counts(parent)[0] == {2: 1.0, 6: 1.0}
    assert seen_counts(twin)[0] == {2: 1.0, 5: 1.0}
    # fewer outputs than counted (tokens taken back): recounted from scratch
    parent.token_ids = parent.token_ids[:2]
    Sampler()(torch.zeros(1, 8), [parent])
    assert seen_counts(parent)[0] == {2: 1.0}


def test_rows_without_penalties_keep_no_state():
    s = seq(SamplingParams(temperature=0.5, top_k=3), outputs=[1, 1])
    Sampler()(torch.randn(1, 10), [s])
    assert s.sampler_state is None


# ---------------------------------------------------------------- min_tokens

def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    eos, stop = 7, 3
    logits = torch.full((1, 10), -30.0)
    logits[0, eos], logits[0, stop], logits[0, 5] = 9.0, 8.0, 1.0   # eos > stop > 5 >> rest
    sampler = Sampler(StopRules({eos}))
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=3)):
        p = SamplingParams(min_tokens=3, stop_token_ids=[stop], **kw)
        s = seq(p)
        for _ in range(3):
            assert int(sampler(logits, [s]).tokens[0]) == 5
            s.token_ids.append(5)
        if kw["temperature"] == 0:
            assert int(sampler(logits, [s]).tokens[0]) == eos
    torch.manual_seed(0)
    many = [seq(SamplingParams(min_tokens=2, stop_token_ids=[stop])) for _ in range(2000)]
    drawn = sampler(logits.expand(2000, -1).contiguous(), many).tokens
    assert not ((drawn == eos) | (drawn == stop)).any()
    ignore = seq(SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[stop],
                                ignore_eos=True))
    assert int(sampler(logits, [ignore]).tokens[0]) == eos
    logits[0, stop] = 10.0                          # stop ids stay masked even with ignore_eos
    assert int(sampler(logits, [ignore]).tokens[0]) == eos


# ---------------------------------------------------------------- logprobs

def test_logprobs_are_raw_whatever_the_processing():
    torch.manual_seed(4)
    logits = torch.randn(5, 100) * 2
    params = [SamplingParams(temperature=0.5, top_k=5, repetition_penalty=1.5, logprobs=3),
              SamplingParams(logprobs=0, top_p=0.3, presence_penalty=2.0),
              SamplingParams(),                               # did not ask
              SamplingParams(temperature=0, frequency_penalty=2.0, logprobs=5, min_p=0.3),
              SamplingParams(min_p=0.2, logprobs=1, min_tokens=4, stop_token_ids=[0, 1])]
    seqs = [seq(p, prompt=list(range(0, 100, 3)), outputs=[int(logits[i].argmax())] * 2)
            for i, p in enumerate(params)]
    out = Sampler(StopRules({2}))(logits.clone(), seqs)
    ref = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.tokens[:, None])[:, 0])
    assert torch.equal(compute_logprobs(logits), ref)
    assert out.top_ids.shape == (5, 5) and out.top_logprobs.shape == (5, 5)
    top_vals, top_ids = ref.topk(5, dim=-1)
    for i in (0, 1, 3, 4):
        assert torch.equal(out.top_ids[i], top_ids[i])
        torch.testing.assert_close(out.top_logprobs[i], top_vals[i])
        chosen = ref[i, out.tokens[i]]
        assert int(out.ranks[i]) == 1 + int((ref[i] > chosen).sum())
    assert (out.top_ids[2] == -1).all() and int(out.ranks[2]) == 0
    # the penalties made row 3 (greedy) pick something other than the raw argmax: rank > 1
    assert int(out.ranks[3]) > 1


def test_no_logprobs_asked_means_none():
    out = Sampler()(torch.randn(3, 20), [seq(SamplingParams(top_p=0.9)) for _ in range(3)])
    assert isinstance(out, SamplerOutput)
    assert out.top_ids is None and out.top_logprobs is None and out.ranks is None
    assert out.tokens.shape == (3,) and out.logprobs.shape == (3,)


def test_kernel_and_torch_paths_draw_the_same_tokens(monkeypatch):
    """Seeded rows of a 49k vocabulary (every filter, ties of -inf and +inf logits included):
    the CPU kernels' weights differ from torch's by float rounding only, so the same uniforms
    pick the same tokens, and the logprobs agree."""
    import engine.sampler
    if not engine.sampler._cpu(torch.zeros(1)):
        pytest.skip("no CPU kernels")
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(48, 49152, generator=gen) * 3
    logits[5, :100] = -math.inf
    logits[6, 7] = math.inf
    kinds = [dict(), dict(temperature=0.7, top_p=0.9), dict(min_p=0.05, temperature=1.3),
             dict(top_k=40, top_p=0.8), dict(temperature=0.2, top_p=0.5, min_p=0.02),
             dict(repetition_penalty=1.3, top_p=0.95)]
    seqs = [seq(SamplingParams(seed=i, **kinds[i % len(kinds)]), rid=str(i)) for i in range(48)]
    out = {}
    for name in ("kernels", "torch"):
        if name == "torch":
            monkeypatch.setattr(engine.sampler, "_cpu", lambda x: False)
        out[name] = Sampler()(logits.clone(), [copy.deepcopy(s) for s in seqs])
    assert out["kernels"].tokens.tolist() == out["torch"].tokens.tolist()
    assert torch.allclose(out["kernels"].logprobs, out["torch"].logprobs, atol=1e-5,
                          equal_nan=True)  # (a +inf logit: NaN either way)
