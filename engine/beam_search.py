"""Beam search inside the engine: every live beam of a request is a sequence in the batch.

After each step where all live beams of a request have their next-token log-probabilities,
the candidates (the top 2B tokens of every beam) are ranked by cumulative log-probability;
an EOS candidate ranked within the top B closes a hypothesis, the best B others become the
new beams.  A beam that continues keeps its sequence (and KV blocks); a beam with several
continuations is forked (shared blocks, copy-on-write); a beam with none is freed.

Finished hypotheses are ranked by the lecture's length normalization
    score = log P(seq) / ((5 + |seq|) ** a / (5 + 1) ** a),   a = length_penalty,
with |seq| the number of generated tokens (EOS included), as in GNMT (Wu et al., 2016) where
the formula comes from.  The search ends when every beam has finished, or when B hypotheses
are done and the best live beam, scored at its current length, cannot beat the worst of them
(the usual heuristic: with a > 0 a longer beam could in principle still overtake).

Beam search scores the raw log-probabilities: temperature, top-k/p, min-p, penalties and seed
do not apply to it.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.sequence import Sequence


def normalized_score(cumulative_logprob: float, length: int, length_penalty: float) -> float:
    return cumulative_logprob / ((5 + length) ** length_penalty / 6 ** length_penalty)


@dataclass
class Hypothesis:
    token_ids: list[int]          # generated tokens
    cumulative_logprob: float
    finish_reason: str
    logprobs: list | None = None

    def score(self, length_penalty: float) -> float:
        return normalized_score(self.cumulative_logprob, len(self.token_ids), length_penalty)


@dataclass
class Candidate:
    beam: Sequence
    token: int
    logprob: float
    score: float                  # the beam's cumulative log-prob + logprob


class BeamSearchState:
    """The beams and finished hypotheses of one request."""

    def __init__(self, first: Sequence):
        self.params = first.params
        self.width = first.params.beam_width
        self.live: list[Sequence] = [first]
        self.finished: list[Hypothesis] = []
        self.done = False
        self._indices = 1

    def next_index(self) -> int:
        self._indices += 1
        return self._indices - 1

    def ready(self) -> bool:
        """Every live beam has its candidates for the next token."""
        return all(s.beam_candidates is not None for s in self.live)

    def rank(self, classify) -> tuple[list[Candidate], list[Candidate]]:
        """(continuations, closing candidates): the best B candidates that classify(beam,
        token) says "keep" over all beams, and those it says "close" ranked within the top B;
        "drop" candidates are neither."""
        cands = [Candidate(beam, t, lp, beam.cumulative_logprob + lp)
                 for beam in self.live for t, lp in zip(*beam.beam_candidates)]
        cands.sort(key=lambda c: c.score, reverse=True)
        keep, close = [], []
        for rank, c in enumerate(cands):
            kind = classify(c.beam, c.token)
            if kind == "close" and rank < self.width:
                close.append(c)
            if kind != "keep":
                continue
            keep.append(c)
            if len(keep) == self.width:
                break
        return keep, close

    def should_stop(self) -> bool:
        if not self.live:
            return True
        if len(self.finished) < self.width:
            return False
        a = self.params.length_penalty
        worst = min(h.score(a) for h in self.finished)
        best_live = max(normalized_score(s.cumulative_logprob, s.num_output_tokens, a)
                        for s in self.live)
        return best_live <= worst

    def best(self, n: int) -> list[Hypothesis]:
        a = self.params.length_penalty
        return sorted(self.finished, key=lambda h: h.score(a), reverse=True)[:n]
