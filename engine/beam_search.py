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

import torch

from engine.outputs import FinishReason
from engine.sampler import compute_logprobs
from engine.sequence import Sequence


def normalized_score(cumulative_logprob: float, length: int, length_penalty: float) -> float:
    return cumulative_logprob / ((5 + length) ** length_penalty / 6 ** length_penalty)


@dataclass
class Hypothesis:
    token_ids: list[int]          # generated tokens
    cumulative_logprob: float
    finish_reason: FinishReason
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
    """The beams, their next-token candidates and the finished hypotheses of one request."""

    def __init__(self, first: Sequence):
        self.params = first.params
        self.width = first.params.beam_width
        self.live: list[Sequence] = [first]
        self.candidates: dict[int, tuple[list[int], list[float]]] = {}  # seq_id -> top 2B
        self.finished: list[Hypothesis] = []
        self.done = False
        self._indices = 1

    def next_index(self) -> int:
        self._indices += 1
        return self._indices - 1

    def ready(self) -> bool:
        """Every live beam has its candidates for the next token."""
        return all(s.seq_id in self.candidates for s in self.live)

    def rank(self, classify) -> tuple[list[Candidate], list[Candidate]]:
        """(continuations, closing candidates): the best B candidates that classify(beam,
        token) says "keep" over all beams, and those it says "close" ranked within the top B;
        "drop" candidates are neither."""
        cands = [Candidate(beam, t, lp, beam.cumulative_logprob + lp)
                 for beam in self.live for t, lp in zip(*self.candidates[beam.seq_id])]
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


class BeamSearch:
    """Beam search's part of every engine step: the beams' rows of the logits become
    candidates; once all of a request's beams have theirs, the request advances one token
    (forks, prunes and closes beams through the scheduler, appends tokens through the output
    processor, by the same stop rules as sampled tokens)."""

    def __init__(self, scheduler, output):
        self.scheduler = scheduler   # engine.scheduler.Scheduler
        self.output = output         # engine.output_processor.OutputProcessor
        self.stop = output.stop

    def take_candidates(self, seqs: list[Sequence], logits: torch.Tensor,
                        states: dict[str, BeamSearchState]):
        """Give every beam row its top 2B next tokens (more if it asked for more logprobs);
        return the other rows and their logits."""
        beam = [i for i, s in enumerate(seqs) if s.params.use_beam_search]
        rest = [i for i, s in enumerate(seqs) if not s.params.use_beam_search]
        k = max(max(2 * seqs[i].params.beam_width, seqs[i].params.logprobs or 0) for i in beam)
        lp = compute_logprobs(logits[torch.tensor(beam, device=logits.device)])
        top_lp, top_ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
        for row, i in enumerate(beam):
            seq = seqs[i]
            # a grammar's masked tokens (-inf) are no candidates
            ids, lps = zip(*[(t, x) for t, x in zip(top_ids[row], top_lp[row])
                             if x != float("-inf")])
            states[seq.request_id].candidates[seq.seq_id] = (list(ids), list(lps))
        if not rest:
            return [], None
        return [seqs[i] for i in rest], logits[torch.tensor(rest, device=logits.device)]

    def step(self, st: BeamSearchState) -> None:
        """One token for every beam of a ready request: rank, close, fork, prune, append."""
        p = st.params

        def classify(beam: Sequence, token: int) -> str:  # "keep", "close" or "drop"
            # a stop token before min_tokens is a candidate nobody takes, as the sampler
            # masks it for a sampled token
            if not self.stop.is_stop_token(p, token):
                return "keep"
            return "close" if self.stop.may_stop(p, beam.num_output_tokens + 1) else "drop"

        keep, close = st.rank(classify)
        for c in close:
            st.finished.append(Hypothesis(c.beam.output_token_ids + [c.token], c.score,
                                          FinishReason.STOP,
                                          self._logprobs(st, c.beam, c.token, c.logprob)))
        kids: dict[int, list[Candidate]] = {}
        for c in keep:
            kids.setdefault(c.beam.seq_id, []).append(c)
        live = []
        for beam in st.live:
            mine = kids.get(beam.seq_id, [])
            if not mine:
                self.scheduler.finish(beam, FinishReason.ABORT)  # pruned: its blocks go back
                continue
            for c in mine[1:]:  # fork before the beam itself moves on
                child = Sequence(beam.request_id, st.next_index(),
                                 beam.token_ids[:beam.num_prompt_tokens], p, beam.arrival_time)
                self.scheduler.fork(beam, child)
                live.append((child, c))
            live.append((beam, mine[0]))
        st.live = []
        for seq, c in live:
            accepted = self.output.append_token(seq, c.token, c.logprob,
                                                self._top(st, c.beam, c.token))
            reason = self.stop.length_reason(seq)
            if seq.grammar is not None and (not accepted or seq.grammar.is_terminated()):
                # its grammar took its end (EOS kept under ignore_eos) or had no way on
                reason = FinishReason.STOP if accepted else FinishReason.ABORT
            if reason:
                st.finished.append(Hypothesis(seq.output_token_ids, seq.cumulative_logprob,
                                              reason, seq.logprobs))
                self.scheduler.finish(seq, reason)
            else:
                st.live.append(seq)
        st.candidates.clear()  # every beam's candidates are consumed
        if st.should_stop():
            for seq in st.live:
                self.scheduler.finish(seq, FinishReason.LENGTH)
            st.live, st.done = [], True

    @staticmethod
    def _top(st: BeamSearchState, beam: Sequence, token: int):
        """(rank, top ids, top logprobs) of token among beam's candidates, for logprobs."""
        if beam.logprobs is None:
            return None
        ids, lps = st.candidates[beam.seq_id]
        k = beam.params.logprobs
        return ids.index(token) + 1, ids[:k], lps[:k]

    def _logprobs(self, st: BeamSearchState, beam: Sequence, token: int, logprob: float):
        if beam.logprobs is None:
            return None
        return beam.logprobs + [self.output.entry(token, logprob, self._top(st, beam, token))]
