"""Continuous batching: every step hands out token counts within a budget.

There is no prefill or decode phase: a sequence has `num_computed_tokens` out of
`num_tokens`, and each step it gets up to the remaining count (decode = 1, prefill = a
chunk).  Running sequences go first; waiting ones are admitted with what budget is left.
When blocks run out the newest running sequence is preempted by recompute.  The scheduler
owns every sequence's place (waiting, running, finished) and, through the KVCacheManager, its
blocks: `schedule()` before the step, `update()` after it, `fork()` and `finish()` between.

While any running sequence is generating, the prompts computed in the same step share a
smaller budget, `prefill_chunk`, counted in token-equivalents: a prompt token after s earlier
ones costs 1 + s / attention_span (its attention grows with s, its linear layers do not). So a
long prompt is fed in chunks that shrink as it grows, and each step, hence every stream's
inter-token latency, stays about as long as a step of prefill_chunk tokens at a prompt's start.
With nobody generating, prompts get the whole max_num_batched_tokens.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import KVCacheManager
from engine.outputs import FinishReason
from engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)   # new tokens per scheduled seq
    preempted: list[Sequence] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # KV blocks to copy first

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 prefill_chunk: int = 0, attention_span: float = math.inf):
        self.kv = kv  # the admission watermark applies only while others run, else a prompt
        # that fits the empty pool would wait forever
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        if prefill_chunk < 0 or not attention_span > 0:
            raise ValueError(f"prefill_chunk must be >= 0 (0: no limit) and attention_span > 0, "
                             f"got {prefill_chunk} and {attention_span}")
        self.prefill_chunk = prefill_chunk
        self.attention_span = attention_span
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        if self.kv.sliding_window is not None:
            # update() evicted what the last step's tokens put out of the window; this catches
            # a sequence whose progress was recorded without it (tests drive the KV by hand)
            for seq in self.running:
                self.kv.evict_out_of_window(seq)
        # prompts' share of a step that also generates (module docstring)
        self._prefill_left = math.inf
        if self.prefill_chunk and any(s.num_tokens - s.num_computed_tokens == 1
                                      for s in self.running):
            self._prefill_left = float(self.prefill_chunk)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            left = seq.num_tokens - seq.num_computed_tokens
            if left == 1:  # a decode, with its drafts if it has any (speculative decoding)
                want = min(1 + len(seq.spec_token_ids), budget)
            else:
                want = self._prefill_share(seq.num_computed_tokens, min(left, budget))
            if want == 0:  # a beam waiting for its siblings to catch up: nothing to compute
                i += 1     # (or a prompt whose share of this step is spent)
                continue
            # a prefill chunk shrinks to the free blocks; with none, preempt the newest
            while (n := min(want, self.kv.max_new_tokens(seq))) == 0:
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                del seq.spec_token_ids[max(0, n - 1):]  # the drafts that fit
                self.kv.allocate(seq, n)
                out.add(seq, n)
                budget -= n
                if left > 1:
                    self._spend(seq.num_computed_tokens, n)
                i += 1
        if not out.preempted:  # else no room for newcomers this step
            self._admit(out, budget)
        out.copies = self.kv.take_copies()
        return out

    def update(self, out: SchedulerOutput,
               sampling: list[Sequence]) -> tuple[list[Sequence], list[int]]:
        """After the runner computed `out`: its tokens' K/V are in the cache (published to the
        prefix cache, evicted past the window), and a parent of n > 1 that sampled its first
        token forks its children now, sharing its blocks. `sampling`: the sequences the
        runner gave a logits row, in row order. Returns the sequences that sample this step
        and the logits row of each (a child shares its parent's)."""
        for seq, n in zip(out.seqs, out.num_tokens):
            # a sequence's drafts count as computed once verified (accept_drafts)
            self.kv.advance(seq, n - len(seq.spec_token_ids))
        if not any(seq.pending_children for seq in sampling):
            return sampling, list(range(len(sampling)))
        seqs, rows = [], []
        for row, seq in enumerate(sampling):
            seqs.append(seq)
            rows.append(row)
            for child in seq.pending_children:
                self.fork(seq, child)
                seqs.append(child)
                rows.append(row)
            seq.pending_children = []
        return seqs, rows

    def accept_drafts(self, seq: Sequence, num_accepted: int) -> None:
        """After verification: the first num_accepted drafts of seq (now in its token_ids)
        count as computed; the rest's K/V slots are stale and the blocks past what is
        computed go back to the pool."""
        seq.spec_token_ids = []
        if seq.status is SequenceStatus.RUNNING:
            self.kv.advance(seq, num_accepted)
            self.kv.trim(seq)

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        # With a sliding window a sequence's blocks are bounded: keep free what the running
        # ones may still grow to, so admitting never forces a preemption later.
        reserve = sum(self.kv.window_growth(s) for s in self.running)
        bs = self.kv.block_size
        # a parent of n > 1 brings its children at its first sample, a beam request forks up
        # to beam_width beams: they hold those seats from admission on; a lone request always
        # fits an empty batch
        seats = self.seats(self.running)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            width = self.seats([seq])
            if self.running and seats + width > self.max_num_seqs:
                break
            hits = self.kv.match_prefix(seq)
            cached = len(hits) * bs
            n = self._prefill_share(cached, min(seq.num_tokens - cached, budget))
            if n == 0:
                break
            if self.running:
                growth = self.kv.window_growth(seq, self.kv.blocks_held(cached, n))
                if n > self.kv.max_new_tokens(seq, True, hits, reserve + growth):
                    break
            else:  # alone, any progress beats none (a window model's prompt can be
                n = min(n, self.kv.max_new_tokens(seq, hits=hits))  # longer than the pool)
                if n == 0:
                    break
                growth = self.kv.window_growth(seq, self.kv.blocks_held(cached, n))
            reserve += growth
            self.waiting.popleft()
            self.kv.allocate(seq, n, hits)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            out.add(seq, n)
            budget -= n
            self._spend(cached, n)
            seats += width

    def _token_cost(self, start: int) -> float:
        """Cost of a prompt token after `start` others, in tokens at a prompt's start."""
        window = self.kv.sliding_window
        return 1.0 + (start if window is None else min(start, window)) / self.attention_span

    def _prefill_share(self, start: int, want: int) -> int:
        """How many of `want` prompt tokens from `start` fit what is left of this step's
        prompt share; the first prompt of a step always gets at least one."""
        if want <= 1 or self._prefill_left == math.inf:
            return want
        fits = int(self._prefill_left / self._token_cost(start))
        if self._prefill_left == self.prefill_chunk:
            fits = max(fits, 1)
        return min(want, fits)

    def _spend(self, start: int, n: int) -> None:
        if n > 1 and self._prefill_left != math.inf:
            self._prefill_left = max(0.0, self._prefill_left - n * self._token_cost(start))

    @staticmethod
    def seats(seqs) -> int:
        """Batch seats these sequences hold, counting the forks still to come: a beam
        request's group holds beam_width (its live beams never exceed it), an n > 1 parent
        1 + its pending children."""
        beam_groups, n = set(), 0
        for s in seqs:
            if s.params.use_beam_search:
                if s.request_id not in beam_groups:
                    beam_groups.add(s.request_id)
                    n += s.params.beam_width
            else:
                n += 1 + len(s.pending_children)
        return n

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Start child as a copy of parent sharing its KV blocks (n > 1, beam search)."""
        self.kv.fork(parent, child)
        child.token_ids = list(parent.token_ids)
        child.cumulative_logprob = parent.cumulative_logprob
        if parent.logprobs is not None:
            child.logprobs = list(parent.logprobs)
        if parent.grammar is not None:
            child.grammar = parent.grammar.fork()
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def _preempt(self, seq: Sequence) -> None:
        # Recompute: drop the KV, keep the tokens; it re-enters at the head of the queue.
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence wherever it is (done, aborted, timed out) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        for child in seq.pending_children:  # children that were never forked
            child.status = SequenceStatus.FINISHED
            child.finish_reason = reason
        seq.pending_children = []
        seq.spec_token_ids = []
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
