"""Speculative decoding: draft tokens proposed before a step, verified by the target model in
the same flat batch as every other sequence's tokens, kept while they agree.

A decoding sequence with drafts d_1..d_k is scheduled 1 + k tokens: its last token and the
drafts. The forward writes all their K/V and gives a logits row at each of the k + 1
positions. Row j is sampled as if d_1..d_j had been generated (the sampler's `offsets`: the
min_tokens count, the penalties' counts and the seeded draw of that position), and the tokens
are appended in order while each equals its draft; the first that differs, or the bonus row
after the last draft, is appended and ends the run. So a step yields 1..k+1 tokens.

Lossless: the drafts here are deterministic (the n-gram lookup's), i.e. a proposal q that puts
all its mass on d. The standard rule (accept with min(1, p/q), else draw from the normalized
residual max(0, p - q)) then accepts d with probability p(d) and otherwise draws from p without
d, renormalized; drawing x ~ p and accepting iff x = d does exactly that, so every appended
token follows the target distribution, with temperature, top-k/top-p/min-p, penalties and
min_tokens applied as without speculation. A seeded row draws from its own generator seeded by
(seed, output position), so a seeded request's output is the same with or without speculation,
whatever was proposed. Greedy rows accept while the argmax equals the draft: token for token
the output of plain decoding.

KV: only the last token and the accepted drafts count as computed (Scheduler.accept_drafts);
the rejected drafts' slots hold stale K/V past `num_computed_tokens`, which the next tokens
overwrite; blocks allocated past what is computed go back to the pool. Prefix-cache hashes
are published only for computed (so accepted) tokens, and the sliding window evicts by
computed tokens only, so a rejected draft never costs a block a later query needs.

Adaptive (never much slower than plain decoding): each sequence keeps a decayed count of
drafts proposed and accepted, an estimate a of the chance a draft is accepted; draft i (1-based)
is worth proposing when a^i, the chance it is reached and kept, exceeds the step's marginal
cost of a token relative to its cost per sequence, theta = c1 * N / (c0 + c1 * N) for N
decoding sequences, with the step time modelled as c0 + c1 * tokens (a decayed least-squares
fit of the engine's own decode steps, drafting included; PRIOR_TOKEN_COST until it has
data). One stream on a CPU: theta ~ 0.1, drafts are cheap; 16 streams: theta ~ 0.6, only
sure drafts go in. Counts
decay each step toward the prior (ACCEPT_DECAY), and a sequence given no drafts for
PROBE_EVERY steps gets one, so a sequence whose drafts stopped (or started) being accepted is
found out.

Proposers: "ngram" (below) and "draft_model" (engine/draft_model.py: a smaller model of the
same vocabulary drafts greedily, with its own paged KV). Not speculated: beam search and
grammar-constrained (structured output) sequences; they decode one token a step beside the
others.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from engine.errors import ParamError
from engine.sequence import Sequence

METHODS = ("ngram", "draft_model")
PRIOR_TOKEN_COST = 0.1   # c1 / c0 before the step-time fit has data (a 2-core CPU's is ~0.1)
COST_DECAY = 0.9         # per step, of the step-time fit's sums
# per step, of a sequence's acceptance counts above the prior: after rejections the estimate
# climbs back to where one draft is tried again in ~80 steps at theta 0.1
ACCEPT_DECAY = 0.98
PRIOR_ACCEPT = (1.0, 2.0)  # pseudo-counts (accepted, proposed): a = 0.5 for a new sequence
PROBE_EVERY = 32         # steps without drafts after which a sequence gets one to test


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    model: str | None = None  # draft_model: a smaller model with the target's vocabulary
    adaptive: bool = True    # False: always propose what the lookup finds (tests, benchmarks)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ParamError("speculative_config", f"speculative_config: method must be one of "
                                                   f"{', '.join(METHODS)}, got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ParamError("speculative_config", "speculative_config: num_speculative_tokens "
                                                   "must be in [1, 16]")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max <= 64:
            raise ParamError("speculative_config", "speculative_config: need 1 <= "
                                                   "prompt_lookup_min <= prompt_lookup_max <= 64")
        if (self.method == "draft_model") != (self.model is not None):
            raise ParamError("speculative_config", "speculative_config: model (a path) goes "
                                                   "with method draft_model, and only with it")

    @classmethod
    def parse(cls, value: "SpeculativeConfig | dict | str | None") -> "SpeculativeConfig | None":
        """From what users pass: a dict (LLM(speculative_config=...)), JSON text (the CLI),
        or None (off)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ParamError("speculative_config", f"speculative_config: not JSON: {e}") \
                    from None
        if not isinstance(value, dict):
            raise ParamError("speculative_config", "speculative_config must be an object")
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ParamError("speculative_config", f"speculative_config: unknown keys {unknown}"
                                                   f" (method, num_speculative_tokens, "
                                                   f"prompt_lookup_min, prompt_lookup_max, "
                                                   f"model, adaptive)")
        return cls(**value)


def ngram_propose(tokens: np.ndarray, k: int, lo: int, hi: int) -> list[int]:
    """Prompt lookup: the k tokens that followed the latest earlier occurrence of the longest
    suffix of `tokens` (hi down to lo tokens long) that occurs before; [] if none does.

    One pass over the tokens finds where the last token occurred before; only those places
    are extended backwards, a token at a time (3-13 us a lookup over 100-2000 tokens, against
    65-180 us comparing every window of every length)."""
    n_tok = len(tokens)
    last = tokens[n_tok - 1] if n_tok else None
    ends = np.flatnonzero(tokens[:n_tok - 1] == last)   # occurrences end here (not the suffix)
    if not len(ends):
        return []
    length = np.ones(len(ends), dtype=np.int64)         # matched suffix length at each end
    for j in range(1, hi):
        live = np.flatnonzero((length == j) & (ends >= j))
        if not len(live):
            break
        same = tokens[ends[live] - j] == tokens[n_tok - 1 - j]
        length[live[same]] += 1
    best = int(length.max())
    if best < lo:
        return []
    start = int(ends[np.flatnonzero(length == best)[-1]]) + 1
    return tokens[start:start + k].tolist()


class _StepCost:
    """Step time ~ c0 + c1 * tokens, fitted by decayed least squares over decode steps."""

    def __init__(self):
        self.s = np.zeros(5)  # weight, sum T, sum T^2, sum t, sum T t

    def add(self, tokens: int, seconds: float) -> None:
        self.s = self.s * COST_DECAY + np.array([1.0, tokens, tokens * tokens, seconds,
                                            tokens * seconds])

    def theta(self, n: int) -> float:
        """A decoding step's marginal cost of one more token over its cost per sequence."""
        w, st, stt, sy, sty = self.s
        var = stt * w - st * st
        if w < 3 or var <= 1e-9 * max(1.0, stt * w):
            c1_over_c0 = PRIOR_TOKEN_COST
        else:
            c1 = (sty * w - st * sy) / var
            c0 = (sy - c1 * st) / w
            c1_over_c0 = max(c1, 0.0) / c0 if c0 > 0 else 1.0
        return c1_over_c0 * n / (1 + c1_over_c0 * n)


class SpecDecoder:
    """Proposes each step's drafts and keeps the acceptance counts (engine metrics read them)."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int, draft=None):
        self.config = config
        self.max_model_len = max_model_len
        self.draft = draft             # engine/draft_model.py's DraftProposer (draft_model)
        self.cost = _StepCost()
        self.num_drafts = 0            # sequences that were given drafts, summed over steps
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * config.num_speculative_tokens
        # seq_id -> [accepted, proposed] (decayed), steps since it last had drafts
        self._stats: dict[int, list[float]] = {}

    def propose(self, running: list[Sequence]) -> None:
        """Set seq.spec_token_ids for the running sequences that decode next step."""
        cfg = self.config
        decoding = [s for s in running if s.num_tokens - s.num_computed_tokens == 1]
        theta = self.cost.theta(len(decoding))
        wants = []
        for seq in decoding:
            seq.spec_token_ids = []
            p = seq.params
            if p.use_beam_search or seq.grammar is not None or seq.pending_children:
                continue  # (children fork from the table as it is: no draft blocks in it)
            k = cfg.num_speculative_tokens
            if p.max_tokens is not None:  # the bonus token is one of them
                k = min(k, p.max_tokens - seq.num_output_tokens - 1)
            k = min(k, self.max_model_len - seq.num_tokens - 1)
            if cfg.adaptive:
                st = self._stats.setdefault(seq.seq_id, [*PRIOR_ACCEPT, 0])
                a = st[0] / st[1]
                # draft i is reached and kept with chance a^i: worth it while a^i > theta
                worth = int(math.log(theta) / math.log(a)) if 0 < a < 1 and theta > 0 else k
                # else a probe now and then: the estimate only learns from drafts
                k = min(k, worth if worth > 0 or st[2] < PROBE_EVERY else 1)
            if k <= 0:
                continue
            if self.draft is not None:
                wants.append((seq, k))
                continue
            tokens = np.asarray(seq.token_ids, dtype=np.int64)
            seq.spec_token_ids = ngram_propose(tokens, k, cfg.prompt_lookup_min,
                                               cfg.prompt_lookup_max)
        if wants:
            self.draft.propose(wants)

    def record(self, seq: Sequence, proposed: int, accepted: int) -> None:
        """After verifying seq's `proposed` drafts, of which the first `accepted` were kept."""
        if proposed == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        for i in range(accepted):
            self.accepted_per_pos[i] += 1
        st = self._stats.setdefault(seq.seq_id, [*PRIOR_ACCEPT, 0])
        # a draft after a rejected one was never tested: count those up to the first reject
        st[0] += accepted
        st[1] += min(proposed, accepted + 1)
        st[2] = 0

    def end_step(self, running: list[Sequence], tokens: int, seconds: float,
                 decode_only: bool) -> None:
        """Decay the counts toward the prior, fit the step's cost, forget finished sequences."""
        if decode_only:
            self.cost.add(tokens, seconds)
        live = {s.seq_id for s in running}
        if self.draft is not None:
            self.draft.forget(live)
        for sid in list(self._stats):
            if sid not in live:
                del self._stats[sid]
                continue
            st = self._stats[sid]
            st[0] = PRIOR_ACCEPT[0] + (st[0] - PRIOR_ACCEPT[0]) * ACCEPT_DECAY
            st[1] = PRIOR_ACCEPT[1] + (st[1] - PRIOR_ACCEPT[1]) * ACCEPT_DECAY
            st[2] += 1

    @property
    def stats(self) -> dict:
        return {"spec_decode_num_drafts": self.num_drafts,
                "spec_decode_num_draft_tokens": self.num_draft_tokens,
                "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
                "spec_decode_num_accepted_tokens_per_pos": list(self.accepted_per_pos)}
