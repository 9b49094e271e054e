"""Continuous batching: every step hands out token counts within a budget.

There is no prefill or decode phase: a sequence has `num_computed_tokens` out of
`num_tokens`, and each step it gets up to the remaining count (decode = 1, prefill = a
chunk).  Running sequences go first; waiting ones are admitted with what budget is left.
When blocks run out the newest running sequence is preempted by recompute.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import KVCacheManager
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
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv  # the admission watermark applies only while others run, else a prompt
        # that fits the empty pool would wait forever
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
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
            for seq in self.running:  # also those the budget does not reach this step
                self.kv.evict_out_of_window(seq)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            want = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if want == 0:  # a beam waiting for its siblings to catch up: nothing to compute
                i += 1
                continue
            # a prefill chunk shrinks to the free blocks; with none, preempt the newest
            while (n := min(want, self.kv.max_new_tokens(seq))) == 0:
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.kv.allocate(seq, n)
                out.add(seq, n)
                budget -= n
                i += 1
        if not out.preempted:  # else no room for newcomers this step
            self._admit(out, budget)
        out.copies = self.kv.take_copies()
        return out

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
            n = min(seq.num_tokens - cached, budget)
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
            seats += width

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
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def _preempt(self, seq: Sequence) -> None:
        # Recompute: drop the KV, keep the tokens; it re-enters at the head of the queue.
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence wherever it is (done, aborted, timed out) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        for child in seq.pending_children:  # children that were never forked
            child.status = SequenceStatus.FINISHED
            child.finish_reason = reason
        seq.pending_children = []
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
