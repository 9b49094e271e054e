"""Scheduler on the CPU: the engine's step is simulated, no model runs."""
from __future__ import annotations

import pytest

from engine.block_manager import KVCacheManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus


def fake_token(seq: Sequence, k: int) -> int:
    """The k-th output token of `seq`: deterministic, distinct per sequence."""
    return 10_000 + 100 * seq.seq_id + k


class Sim:
    """A scheduler stepped as the engine steps it, with a fake model and sampler."""

    def __init__(self, *, num_blocks=64, block_size=4, max_num_seqs=8,
                 max_num_batched_tokens=8, watermark=0.0, **chunking):
        self.kv = KVCacheManager(num_blocks, block_size, watermark)
        self.pool = self.kv.pool
        self.sched = Scheduler(self.kv, max_num_seqs, max_num_batched_tokens, **chunking)
        self.seqs: list[Sequence] = []
        self.targets: dict[int, int] = {}
        self.sampled: list[Sequence] = []  # who sampled in the last step

    def add(self, prompt_len: int, max_tokens: int = 4) -> Sequence:
        seq = Sequence(f"r{len(self.seqs)}", 0, list(range(1, prompt_len + 1)),
                       SamplingParams(max_tokens=max_tokens), arrival_time=float(len(self.seqs)))
        self.seqs.append(seq)
        self.targets[seq.seq_id] = max_tokens
        self.sched.add(seq)
        return seq

    def live_tables(self) -> list[list[int]]:
        return [s.block_ids for s in self.seqs if not s.is_finished]

    def step(self) -> SchedulerOutput:
        self.running_before = list(self.sched.running)
        out = self.sched.schedule()
        if out.preempted:  # a step that preempts admits nobody
            assert all(s in self.running_before for s in out.seqs)
        assert out.total_tokens <= self.sched.max_num_batched_tokens
        assert len(self.sched.running) <= self.sched.max_num_seqs
        assert len({id(s) for s in out.seqs}) == len(out.seqs), "a seq scheduled twice"
        sampling = []
        for seq, n in zip(out.seqs, out.num_tokens):
            assert n > 0 and seq.status is SequenceStatus.RUNNING
            assert seq.num_computed_tokens + n <= seq.num_tokens
            assert len(seq.block_ids) * self.kv.block_size >= seq.num_computed_tokens + n
            if seq.num_computed_tokens + n == seq.num_tokens:
                sampling.append(seq)
        self.sampled, _ = self.sched.update(out, sampling)  # the engine's bookkeeping
        for seq in self.sampled:
            seq.token_ids.append(fake_token(seq, seq.num_output_tokens))
            if seq.num_output_tokens >= self.targets[seq.seq_id]:
                self.sched.finish(seq, "length")
        self.pool.check_integrity(self.live_tables())
        return out

    def run(self, max_steps: int = 500) -> list[SchedulerOutput]:
        outs = []
        while self.sched.has_unfinished():
            assert len(outs) < max_steps, "scheduler made no progress"
            outs.append(self.step())
        return outs

    def assert_all_done(self) -> None:
        for seq in self.seqs:
            assert seq.is_finished and seq.finish_reason == "length", seq
            k = self.targets[seq.seq_id]
            assert seq.output_token_ids == [fake_token(seq, i) for i in range(k)], seq
            assert seq.block_ids == []
        assert self.pool.num_free == self.pool.num_usable
        self.pool.check_integrity([])


def scheduled(out: SchedulerOutput) -> dict[Sequence, int]:
    return dict(zip(out.seqs, out.num_tokens))


# ------------------------------------------------------------ chunked prefill


def test_long_prompt_is_prefilled_in_budget_sized_chunks():
    sim = Sim(max_num_batched_tokens=8)
    seq = sim.add(prompt_len=20, max_tokens=3)
    chunks, computed, sampled = [], [], []
    for _ in range(3):
        out = sim.step()
        assert out.seqs == [seq]
        chunks.append(out.num_tokens[0])
        computed.append(seq.num_computed_tokens)
        sampled.append(seq in sim.sampled)
    assert chunks == [8, 8, 4]
    assert computed == [8, 16, 20]
    assert sampled == [False, False, True]
    assert seq.num_tokens == 21 and seq.num_output_tokens == 1
    assert len(seq.block_ids) == 5

    out = sim.step()  # now a decode: one token
    assert scheduled(out) == {seq: 1} and seq in sim.sampled
    sim.run()
    sim.assert_all_done()


def test_decodes_go_before_new_prefills_and_budget_holds():
    sim = Sim(max_num_batched_tokens=8)
    a, b = sim.add(prompt_len=3, max_tokens=10), sim.add(prompt_len=3, max_tokens=10)
    out = sim.step()
    assert scheduled(out) == {a: 3, b: 3}
    c = sim.add(prompt_len=20, max_tokens=2)
    out = sim.step()
    assert out.seqs == [a, b, c]           # running decodes first, then the newcomer
    assert out.num_tokens == [1, 1, 6]     # the prefill gets what the decodes left
    assert out.total_tokens == 8
    assert c.num_computed_tokens == 6 and c not in sim.sampled
    for _ in range(3):
        out = sim.step()
        assert out.seqs[:2] == [a, b] and out.num_tokens[:2] == [1, 1]
    sim.run()
    sim.assert_all_done()


def test_budget_exhausted_by_running_prefills_admits_nobody():
    sim = Sim(max_num_batched_tokens=8)
    a = sim.add(prompt_len=30, max_tokens=1)
    sim.step()
    b = sim.add(prompt_len=2, max_tokens=1)
    out = sim.step()
    assert scheduled(out) == {a: 8}
    assert b.status is SequenceStatus.WAITING and b.block_ids == []
    sim.run()
    sim.assert_all_done()


def test_max_num_seqs_caps_the_running_set():
    sim = Sim(max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [sim.add(prompt_len=2, max_tokens=3) for _ in range(5)]
    out = sim.step()
    assert out.seqs == seqs[:2]
    assert sim.sched.running == seqs[:2] and list(sim.sched.waiting) == seqs[2:]
    assert all(s.block_ids == [] for s in seqs[2:])
    sim.step()
    out = sim.step()                       # the first two finish here
    assert all(s.is_finished for s in seqs[:2])
    out = sim.step()
    assert out.seqs == seqs[2:4]           # freed slots go to the next in line
    outs = sim.run()
    assert all(len(o.seqs) <= 2 for o in outs)
    sim.assert_all_done()


# ----------------------------------------------------------------- mixed step


def test_mixed_step_shares_budget_between_decode_and_prefill_chunk():
    sim = Sim(max_num_batched_tokens=8)
    d = sim.add(prompt_len=4, max_tokens=5)
    sim.step()                              # d prefilled, first token sampled
    p = sim.add(prompt_len=12, max_tokens=1)
    out = sim.step()
    assert scheduled(out) == {d: 1, p: 7}
    assert sim.sampled == [d]               # the decode samples, the partial prefill does not
    out = sim.step()
    assert scheduled(out) == {d: 1, p: 5}
    assert set(sim.sampled) == {d, p} and p.is_finished
    sim.run()
    sim.assert_all_done()


def test_beside_decodes_prompts_share_prefill_chunk_and_it_shrinks_deep_into_a_prompt():
    """While a stream generates, a long prompt gets prefill_chunk token-equivalents per step
    (a token after s others costs 1 + s / attention_span), so every step stays short and the
    stream gets a token each step; alone, a prompt gets the whole budget."""
    sim = Sim(num_blocks=200, max_num_batched_tokens=64, prefill_chunk=8, attention_span=16)
    d = sim.add(prompt_len=4, max_tokens=200)
    sim.step()
    p = sim.add(prompt_len=100, max_tokens=1)
    chunks = []
    while p not in sim.sampled:
        start = p.num_computed_tokens
        out = sim.step()
        assert scheduled(out)[d] == 1 and d in sim.sampled  # the stream never waits
        n = scheduled(out)[p]
        assert n * (1 + start / 16) <= 8 or n == 1
        assert n == min(100 - start, max(1, int(8 / (1 + start / 16))))  # and uses its share
        chunks.append(n)
    assert chunks[0] == 8 and chunks[-1] == 1 and sum(chunks) == 100
    assert chunks == sorted(chunks, reverse=True)
    sim.run()
    q = sim.add(prompt_len=100, max_tokens=1)  # nobody generating: the whole budget
    assert scheduled(sim.step()) == {q: 64}
    sim.run()
    sim.assert_all_done()


def test_new_prompts_beside_decodes_split_one_prefill_chunk():
    sim = Sim(num_blocks=200, max_num_batched_tokens=64, prefill_chunk=8)
    d = sim.add(prompt_len=4, max_tokens=30)
    sim.step()
    a, b, c = (sim.add(prompt_len=6, max_tokens=2) for _ in range(3))
    out = sim.step()
    assert scheduled(out) == {d: 1, a: 6, b: 2}  # c waits for the next step
    assert c.status is SequenceStatus.WAITING
    out = sim.step()
    assert scheduled(out) == {d: 1, a: 1, b: 4, c: 4}  # a decodes; b and c share the chunk
    sim.run()
    sim.assert_all_done()
    with pytest.raises(ValueError, match="prefill_chunk"):
        Scheduler(sim.kv, 8, 8, prefill_chunk=-1)


# ----------------------------------------------------------------- preemption


def test_preemption_under_tiny_pool_recomputes_newest_and_everyone_finishes():
    # 6 usable blocks of 2 tokens; each seq grows to 4 + 4 - 1 = 7 tokens = 4 blocks.
    sim = Sim(num_blocks=7, block_size=2, max_num_seqs=4, max_num_batched_tokens=16)
    seqs = [sim.add(prompt_len=4, max_tokens=4) for _ in range(3)]
    preemptions = 0
    for _ in range(200):
        out = sim.step()
        if out.preempted:
            preemptions += len(out.preempted)
            # victims are taken from the newest end of the running list
            assert out.preempted == sim.running_before[::-1][:len(out.preempted)]
            head = list(sim.sched.waiting)[:len(out.preempted)]
            assert head == out.preempted[::-1]   # back at the head, oldest first
            for victim in out.preempted:
                assert victim.status is SequenceStatus.WAITING
                assert victim.num_computed_tokens == 0 and victim.block_ids == []
                assert victim.num_preemptions >= 1
                assert victim not in out.seqs and victim not in sim.sched.running
            assert not any(s in sim.sched.waiting for s in out.seqs)
        if not sim.sched.has_unfinished():
            break
    assert not sim.sched.has_unfinished()
    assert preemptions > 0 and sim.sched.num_preemptions == preemptions
    assert seqs[-1].num_preemptions >= 1
    sim.assert_all_done()


def test_prefill_chunk_shrinks_to_the_free_blocks_instead_of_preempting():
    # 6 usable blocks of 2 tokens, budget 6: a decodes, b prefills in chunks.
    sim = Sim(num_blocks=7, block_size=2, max_num_batched_tokens=6)
    a, b = sim.add(prompt_len=4, max_tokens=8), sim.add(prompt_len=10, max_tokens=1)
    assert scheduled(sim.step()) == {a: 4, b: 2}
    assert sim.pool.num_free == 3
    out = sim.step()  # a takes 1 block; b's next 5 tokens need 3 blocks, 2 are left
    assert scheduled(out) == {a: 1, b: 4} and not out.preempted
    assert sim.pool.num_free == 0
    sim.run()
    sim.assert_all_done()


def test_decode_that_cannot_grow_preempts_itself_and_nobody_is_admitted():
    sim = Sim(num_blocks=4, block_size=2, max_num_batched_tokens=8)  # 3 usable blocks
    a, b = sim.add(prompt_len=3, max_tokens=3), sim.add(prompt_len=2, max_tokens=3)
    c = sim.add(prompt_len=1, max_tokens=1)
    assert scheduled(sim.step()) == {a: 3, b: 2}  # no block left for c
    out = sim.step()  # a's token 3 fits its block; b's token 2 needs one: b is the newest
    assert scheduled(out) == {a: 1} and out.preempted == [b]
    assert b.num_computed_tokens == 0 and b.block_ids == [] and b.num_output_tokens == 1
    assert list(sim.sched.waiting) == [b, c] and sim.sched.running == [a]
    assert sim.pool.num_free == 1  # c would fit now, but not in the step that preempted b
    sim.run()
    sim.assert_all_done()


@pytest.mark.parametrize("num_blocks, block_size, budget, lens", [
    (5, 2, 4, [(3, 4), (5, 2), (2, 6), (6, 3)]),
    (4, 4, 16, [(4, 5), (7, 2), (1, 8)]),
    (9, 1, 3, [(4, 3), (2, 4), (3, 3), (1, 5)]),
])
def test_everything_finishes_when_demand_exceeds_pool(num_blocks, block_size, budget, lens):
    sim = Sim(num_blocks=num_blocks, block_size=block_size, max_num_seqs=4,
              max_num_batched_tokens=budget)
    capacity = (num_blocks - 1) * block_size
    for prompt_len, max_tokens in lens:
        assert prompt_len + max_tokens - 1 <= capacity  # each fits alone
        sim.add(prompt_len, max_tokens)
    assert sum(p + m - 1 for p, m in lens) > capacity
    outs = sim.run()
    assert any(o.preempted for o in outs)
    sim.assert_all_done()


# ---------------------------------------------------------------------- abort


def test_abort_waiting_prefilling_and_decoding_seqs():
    sim = Sim(max_num_seqs=2, max_num_batched_tokens=8)
    dec, pre, wait = sim.add(4, max_tokens=8), sim.add(20, max_tokens=8), sim.add(4)
    sim.step()
    assert dec.num_computed_tokens == 4 and dec.num_tokens == 5       # decoding
    assert 0 < pre.num_computed_tokens < pre.num_tokens               # mid-prefill
    assert wait.status is SequenceStatus.WAITING and wait.block_ids == []

    for seq in (wait, pre, dec):
        free_before, held = sim.pool.num_free, len(seq.block_ids)
        sim.sched.finish(seq, "abort")
        assert seq.is_finished and seq.finish_reason == "abort"
        assert seq.block_ids == [] and sim.pool.num_free == free_before + held
        assert seq not in sim.sched.running and seq not in sim.sched.waiting
        sim.pool.check_integrity(sim.live_tables())
    assert not sim.sched.has_unfinished()
    assert sim.pool.num_free == sim.pool.num_usable
    assert not sim.sched.schedule()


def test_abort_mid_run_lets_the_rest_finish():
    sim = Sim(num_blocks=7, block_size=2, max_num_batched_tokens=6)
    b = [sim.add(4, max_tokens=4) for _ in range(3)][1]
    sim.step()
    assert 0 < b.num_computed_tokens < b.num_tokens and b.block_ids  # mid-prefill
    sim.sched.finish(b, "abort")
    sim.seqs.remove(b)  # assert_all_done checks the others
    sim.run()
    sim.assert_all_done()
    assert b.finish_reason == "abort" and b.output_token_ids == [] and b.block_ids == []


def test_prompt_that_fits_empty_pool_is_not_starved_by_watermark():
    # The engine's defaults: watermark 0.01 -> 3 of 300 blocks; 299 usable * 16 = 4784 tokens,
    # so max_model_len is 4784 and a 4770-token prompt (299 blocks) passes validation.
    sim = Sim(num_blocks=300, block_size=16, max_num_batched_tokens=8192, watermark=0.01)
    seq = sim.add(prompt_len=4770, max_tokens=1)
    assert sim.kv.blocks_needed(seq, seq.num_tokens) == sim.pool.num_usable == sim.pool.num_free
    sim.run(max_steps=10)  # nothing runs, so no decode needs the reserve
    assert sim.pool.num_free == sim.pool.num_usable
