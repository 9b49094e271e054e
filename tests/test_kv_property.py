"""Random workloads on tiny KV pools: the scheduler and KV cache manager driven as the engine
drives them (fake sampler, no model), checked after every step against a shadow of what each
KV slot holds.  Covers prefix caching, sliding windows, n > 1 forks with copy-on-write,
chunked prefill, preemption, aborts in every state and speculative decoding's drafts (written,
then kept or rolled back)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings, strategies as st

from engine.block_manager import NULL_BLOCK, BlockPool, KVCacheManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus

VOCAB = 3  # few distinct tokens, so that blocks of different requests coincide


@dataclass(frozen=True)
class Config:
    num_blocks: int
    block_size: int
    window: int | None
    prefix_caching: bool
    budget: int
    max_num_seqs: int
    watermark: float
    spec: int = 0  # drafts proposed per decode (speculative decoding), at most

    @property
    def capacity(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    @property
    def max_model_len(self) -> int:
        # as LLMEngine.from_args: the pool bounds a sequence, unless a window bounds its KV
        return 3 * self.capacity if self.window else self.capacity

    def dead_blocks(self, num_computed: int) -> int:
        """Leading blocks whose every position p satisfies p <= num_computed - W."""
        if self.window is None:
            return 0
        return max(0, (num_computed - self.window + 1) // self.block_size)

    @property
    def decode_blocks(self) -> int:
        """The most blocks a decoding sequence holds under the window."""
        return -(-(self.window - 1) // self.block_size) + 1


@dataclass(frozen=True)
class Request:
    arrival: int
    prompt: tuple[int, ...]
    max_tokens: int
    n: int
    abort_at: int | None  # step at which the whole request is aborted


def fake_token(seq: Sequence, k: int) -> int:
    """The k-th output token of seq: deterministic, differs between a request's n outputs."""
    return 1 + (int(seq.request_id[1:]) + 2 * seq.index + k) % VOCAB


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Sim:
    """Scheduler + KV cache manager stepped as LLMEngine.step steps them, with a shadow KV cache:
    `slots[block][i]` is the identity (hash of the whole token prefix) of the token whose K/V
    the slot holds, so a read of a wrong, stale or never-written slot is caught."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.kv = KVCacheManager(cfg.num_blocks, cfg.block_size, cfg.watermark,
                                 sliding_window=cfg.window,
                                 enable_prefix_caching=cfg.prefix_caching)
        self.pool = self.kv.pool
        self.sched = Scheduler(self.kv, cfg.max_num_seqs, cfg.budget)
        self.requests: list[tuple[Request, list[Sequence]]] = []
        self.slots: dict[int, list[int | None]] = {}
        self.prefix_ids: dict[int, list[int]] = {}  # seq_id -> identity of each position
        self.queries = self.hits = 0
        self.num_steps = 0

    # ------------------------------------------------------------ requests

    def add(self, req: Request) -> None:
        rid = f"r{len(self.requests)}"
        params = SamplingParams(n=req.n, max_tokens=req.max_tokens)
        seqs = [Sequence(rid, i, list(req.prompt), params) for i in range(req.n)]
        for child in seqs[1:]:
            child.status = SequenceStatus.PENDING
        seqs[0].pending_children = seqs[1:]
        self.requests.append((req, seqs))
        self.sched.add(seqs[0])

    def abort(self, seqs: list[Sequence]) -> None:
        for seq in seqs:  # LLMEngine.abort_request: in index order, so a parent goes first
            if seq.is_finished:
                continue
            state = seq.status.value
            if seq.status is SequenceStatus.RUNNING:
                decoding = seq.num_output_tokens and seq.num_computed_tokens == seq.num_tokens - 1
                state = "decoding" if decoding else "prefilling"
            event(f"abort {state}{' with pending children' * bool(seq.pending_children)}")
            self.sched.finish(seq, "abort")
        self.check_pool()

    def expected_outputs(self, req: Request) -> int:
        return min(req.max_tokens, self.cfg.max_model_len - len(req.prompt))

    def live(self) -> list[Sequence]:
        return [s for _, seqs in self.requests for s in seqs if not s.is_finished]

    def check_pool(self) -> None:
        self.pool.check_integrity([s.block_ids for s in self.live()])
        self.check_seats()

    def check_seats(self) -> None:
        running = self.sched.running
        seats = len(running) + sum(len(s.pending_children) for s in running)
        assert seats <= self.cfg.max_num_seqs, \
            f"{seats} sequences running or forking from running parents, max_num_seqs " \
            f"{self.cfg.max_num_seqs}"

    def identity(self, seq: Sequence, p: int) -> int:
        ids = self.prefix_ids.setdefault(seq.seq_id, [])
        while len(ids) <= p:
            ids.append(hash((ids[-1] if ids else None, seq.token_ids[len(ids)])))
        return ids[p]

    # ------------------------------------------------------------ one engine step

    def draft_identity(self, seq: Sequence, p: int) -> int:
        """The identity of position p of seq's tokens followed by its drafts."""
        if p < seq.num_tokens:
            return self.identity(seq, p)
        return hash((self.draft_identity(seq, p - 1), seq.spec_token_ids[p - seq.num_tokens]))

    def propose(self) -> None:
        """Drafts as SpecDecoder.propose sets them (within max_tokens and max_model_len): a
        deterministic mix of right tokens (the ones that will be sampled) and a wrong one."""
        for seq in self.sched.running:
            if seq.num_tokens - seq.num_computed_tokens != 1 or seq.pending_children:
                continue
            k = min((seq.seq_id + self.num_steps) % (self.cfg.spec + 1),
                    seq.params.max_tokens - seq.num_output_tokens - 1,
                    self.cfg.max_model_len - seq.num_tokens - 1)
            right = (7 * seq.seq_id + self.num_steps) % (k + 1) if k > 0 else 0
            out = seq.num_output_tokens
            seq.spec_token_ids = [fake_token(seq, out + i) for i in range(right)] + \
                [fake_token(seq, out + i) % VOCAB + 1 for i in range(right, max(k, 0))]

    def step(self) -> None:
        cfg, kv, pool, bs = self.cfg, self.kv, self.pool, self.cfg.block_size
        if cfg.spec:
            self.propose()
        running_before = list(self.sched.running)
        waiting_before = list(self.sched.waiting)
        cached_before, evictions_before = set(pool.cached_free), pool.num_evictions
        out = self.sched.schedule()
        if pool.num_evictions > evictions_before:
            event("cached block evicted")
        self.num_steps += 1
        assert out, "unfinished work but nothing scheduled"
        assert out.total_tokens <= cfg.budget
        assert len({id(s) for s in out.seqs}) == len(out.seqs), "a sequence scheduled twice"
        if not running_before:  # a prompt that fits the empty pool is admitted alone
            assert out.seqs[0] is waiting_before[0]
        if out.preempted:
            event("preempted")
            assert all(s in running_before for s in out.seqs), "admitted in a preempting step"
            assert out.preempted == running_before[::-1][:len(out.preempted)], "not the newest"
            assert list(self.sched.waiting)[:len(out.preempted)] == out.preempted[::-1]
            for victim in out.preempted:
                assert victim.block_ids == [] and victim.num_computed_tokens == 0
                assert victim.status is SequenceStatus.WAITING
        if out.copies:
            event("copy-on-write")
        self.check_pool()

        for seq, n in zip(out.seqs, out.num_tokens):
            nc = seq.num_computed_tokens
            assert n > 0 and seq.status is SequenceStatus.RUNNING
            assert nc + n <= seq.num_tokens + len(seq.spec_token_ids)
            assert not seq.spec_token_ids or nc + n == seq.num_tokens + len(seq.spec_token_ids)
            if seq.spec_token_ids:
                event("drafts")
            if seq not in running_before:  # admitted now: nc counts prefix-cache hits
                assert seq in waiting_before
                assert nc % bs == 0 and nc <= seq.num_tokens - 1
                assert cfg.prefix_caching or nc == 0
                if cfg.prefix_caching:
                    self.queries += seq.num_tokens
                    self.hits += nc
                if nc:
                    event("prefix hit")
                if cached_before & set(seq.block_ids):
                    event("cached-free block revived")
                if cfg.dead_blocks(nc):
                    event("prefix hit partly out of the window")
            dead = cfg.dead_blocks(nc)
            table = seq.block_ids
            assert len(table) == cdiv(nc + n, bs), (seq, n, table)
            assert all(b == NULL_BLOCK for b in table[:dead]), f"window blocks not freed {table}"
            assert all(b != NULL_BLOCK for b in table[dead:]), f"live blocks are null {table}"
            if cfg.window and n == 1:
                assert len(table) - dead <= cfg.decode_blocks, table
        assert (kv.prefix_queries, kv.prefix_hits) == (self.queries, self.hits)

        scheduled = {id(s) for s in out.seqs}
        dsts = [dst for _, dst in out.copies]
        assert len(set(dsts)) == len(dsts)
        for src, dst in out.copies:
            assert src != dst and NULL_BLOCK not in (src, dst)
            assert pool.ref_counts[dst] == 1
            owners = [s for s in self.live() if dst in s.block_ids]
            assert len(owners) == 1 and id(owners[0]) in scheduled
            seq = owners[0]
            pos = seq.num_computed_tokens
            assert pos % bs and seq.block_ids[pos // bs] == dst and src not in seq.block_ids

        self.forward(out)

        sampling = [seq for seq, n in zip(out.seqs, out.num_tokens)
                    if seq.num_computed_tokens + n == seq.num_tokens + len(seq.spec_token_ids)]
        forks = [(seq, child) for seq in sampling for child in seq.pending_children]
        sampled, _ = self.sched.update(out, sampling)  # computed, published, forked
        for b in pool.hash_to_block.values():
            assert None not in self.slots[b], f"published block {b} is not full"
        for parent, child in forks:
            assert child.block_ids == parent.block_ids and child in sampled
            event("fork")
        for seq in sampled:  # as LLMEngine._sample: tokens while they equal the drafts
            drafts, accepted = seq.spec_token_ids, 0
            for j in range(len(drafts) + 1):
                token = fake_token(seq, seq.num_output_tokens)
                seq.token_ids.append(token)
                done = seq.num_output_tokens >= seq.params.max_tokens \
                    or seq.num_tokens >= cfg.max_model_len
                if done:
                    self.sched.finish(seq, "length")
                if j == len(drafts) or token != drafts[j] or done:
                    break
                accepted += 1
            if drafts:
                event("drafts rejected" if accepted < len(drafts) else "drafts all taken")
                self.sched.accept_drafts(seq, accepted)
                if not seq.is_finished:
                    assert len(seq.block_ids) == cdiv(seq.num_computed_tokens, bs), \
                        f"blocks past the computed tokens: {seq}"
                    assert seq.num_computed_tokens == seq.num_tokens - 1, \
                        f"drafts counted wrong: {seq}"
        self.check_pool()

    def forward(self, out) -> None:
        """Copies, then every scheduled token's K/V written, then every visible one read."""
        bs, pool, window = self.cfg.block_size, self.pool, self.cfg.window
        moved = [list(self.slots.get(src, [None] * bs)) for src, _ in out.copies]
        for (_, dst), content in zip(out.copies, moved):
            self.slots[dst] = content
        written = set()
        for seq, n in zip(out.seqs, out.num_tokens):
            nc = seq.num_computed_tokens
            for p in range(nc, nc + n):
                b = seq.block_ids[p // bs]
                assert pool.ref_counts[b] == 1, f"write into shared block {b} of {seq}"
                assert pool.block_hash[b] is None, f"write into published block {b} of {seq}"
                assert (b, p % bs) not in written, f"two writes into slot {p % bs} of block {b}"
                written.add((b, p % bs))
                self.slots.setdefault(b, [None] * bs)[p % bs] = self.draft_identity(seq, p)
        for seq, n in zip(out.seqs, out.num_tokens):
            nc = seq.num_computed_tokens
            lo = 0 if window is None else max(0, nc - window + 1)
            for p in range(lo, nc + n):
                b = seq.block_ids[p // bs]
                assert b != NULL_BLOCK and self.slots.get(b, [None] * bs)[p % bs] \
                    == self.draft_identity(seq, p), f"{seq} reads a wrong K/V at position {p}"

    # ------------------------------------------------------------ a whole workload

    def run(self, reqs: list[Request]) -> None:
        arrivals: dict[int, list[Request]] = {}
        for r in reqs:
            arrivals.setdefault(r.arrival, []).append(r)
        aborts: dict[int, list[int]] = {}
        last_event = max(r.arrival for r in reqs)
        # Every step the oldest running sequence computes >= 1 token and is never preempted,
        # so a sequence is oldest for at most prompt + max_tokens steps.
        bound = sum(r.n * (len(r.prompt) + r.max_tokens) for r in reqs)
        t = 0
        while t <= last_event or self.sched.has_unfinished():
            for r in arrivals.get(t, []):
                self.add(r)
                if r.abort_at is not None:
                    aborts.setdefault(t + r.abort_at, []).append(len(self.requests) - 1)
                    last_event = max(last_event, t + r.abort_at)
            for j in aborts.get(t, []):
                self.abort(self.requests[j][1])
            if self.sched.has_unfinished():
                self.step()
                assert self.num_steps <= bound, "the scheduler made no progress"
            t += 1

        for req, seqs in self.requests:
            k = self.expected_outputs(req)
            for seq in seqs:
                assert seq.is_finished and seq.block_ids == [], seq
                expected = [fake_token(seq, i) for i in range(k)]
                if seq.finish_reason == "abort":
                    assert seq.output_token_ids == expected[:seq.num_output_tokens]
                else:
                    assert seq.finish_reason == "length" and seq.output_token_ids == expected
        pool = self.pool
        assert pool.num_free == pool.num_usable and not any(pool.ref_counts)
        assert len(pool.free_ids) + pool.num_cached_free == pool.num_usable
        pool.check_integrity([])


# ---------------------------------------------------------------- strategies


@st.composite
def configs(draw, window: bool | None = None, spec: bool | None = None) -> Config:
    bs = draw(st.integers(1, 4))
    num_blocks = draw(st.integers(6, 24))
    usable = num_blocks - 1
    if window is None:
        window = draw(st.booleans())
    # LLMEngine.from_args: a window needs ceil((W - 1) / B) + 1 blocks
    widest = (usable - 1) * bs + 1
    w = draw(st.integers(1, min(widest, 3 * bs)) | st.integers(1, widest)) if window else None
    max_num_seqs = draw(st.integers(1, 6))
    return Config(num_blocks=num_blocks, block_size=bs, window=w,
                  prefix_caching=draw(st.booleans()),
                  budget=draw(st.integers(1, 8) | st.integers(1, 4 * usable * bs)),
                  max_num_seqs=max_num_seqs,
                  watermark=draw(st.sampled_from([0.0, 0.1, 0.25])),
                  spec=draw(st.integers(1, 4)) if (draw(st.booleans()) if spec is None
                                                   else spec) else 0)


@st.composite
def workloads(draw, window: bool | None = None,
              spec: bool | None = None) -> tuple[Config, list[Request]]:
    cfg = draw(configs(window, spec))
    longest = cfg.max_model_len - 1  # LLMEngine._validate_prompt: len < max_model_len
    tokens = st.integers(1, VOCAB)
    short = min(longest, 4 * cfg.block_size)
    prefixes = draw(st.lists(st.lists(tokens, max_size=short) | st.lists(tokens, max_size=longest),
                             min_size=1, max_size=3))
    reqs = []
    for arrival in sorted(draw(st.lists(st.integers(0, 12), min_size=1, max_size=8))):
        prefix = draw(st.sampled_from(prefixes))
        prompt = prefix[:draw(st.just(len(prefix)) | st.integers(0, len(prefix)))]
        prompt += draw(st.lists(tokens, min_size=0 if prompt else 1, max_size=6))
        prompt = prompt[:longest]
        reqs.append(Request(
            arrival=arrival, prompt=tuple(prompt),
            max_tokens=draw(st.integers(1, 6) | st.integers(1, cfg.max_model_len)),
            n=draw(st.integers(1, min(3, cfg.max_num_seqs))),
            abort_at=draw(st.none() | st.integers(0, 4) | st.integers(0, 40))))
    return cfg, reqs


def check_workload(workload: tuple[Config, list[Request]]) -> None:
    cfg, reqs = workload
    event("window" if cfg.window else "full attention")
    Sim(cfg).run(reqs)


test_random_workloads_keep_the_kv_cache_consistent = settings(
    max_examples=1000, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)(given(workloads())(check_workload))


# ---------------------------------------------------------------- found by the property


def test_pending_children_of_a_running_parent_hold_their_seats():
    """max_num_seqs counts the children a running parent forks at its first sample, so a
    newcomer must not take their seats (else running grows past max_num_seqs)."""
    cfg = Config(num_blocks=16, block_size=2, window=None, prefix_caching=False, budget=16,
                 max_num_seqs=2, watermark=0.0)
    sim = Sim(cfg)
    sim.add(Request(arrival=0, prompt=(1, 2, 3), max_tokens=2, n=2, abort_at=None))
    sim.add(Request(arrival=0, prompt=(3,), max_tokens=2, n=1, abort_at=None))
    parent, newcomer = sim.requests[0][1][0], sim.requests[1][1][0]
    out = sim.sched.schedule()
    assert out.seqs == [parent] and list(sim.sched.waiting) == [newcomer]


# ---------------------------------------------------------------- the checker has teeth


_free = BlockPool.free


def _free_leaks_a_reference_to_shared_blocks(self, ids):
    """BlockPool.free, except that a shared block loses no reference."""
    _free(self, [i for i in ids if self.ref_counts[i] < 2])


def _accept_every_draft(self, seq, num_accepted):
    """Scheduler.accept_drafts, except that rejected drafts count as computed too."""
    _accept_drafts(self, seq, len(seq.spec_token_ids))


_accept_drafts = Scheduler.accept_drafts


@pytest.mark.parametrize("target, broken, window, spec, caught", [
    (BlockPool, ("free", _free_leaks_a_reference_to_shared_blocks), None, None,
     "reference counts differ"),
    (KVCacheManager, ("evict_out_of_window", lambda self, seq: 0), True, None,
     "window blocks not freed"),
    (KVCacheManager, ("_cow_index", lambda self, seq: None), None, None,
     "write into shared block"),
    (KVCacheManager, ("_key", lambda self, seq, i: tuple(seq.token_ids[  # hashes not chained
        i * self.block_size:(i + 1) * self.block_size])), None, None, "reads a wrong K/V"),
    (KVCacheManager, ("trim", lambda self, seq: None), None, True,
     "blocks past the computed tokens"),
    (Scheduler, ("accept_drafts", _accept_every_draft), None, True, "drafts counted wrong"),
])
def test_the_checker_catches_a_broken_kv_cache(monkeypatch, target, broken, window, spec,
                                               caught):
    monkeypatch.setattr(target, *broken)
    monkeypatch.setattr(Sim, "check_seats", lambda self: None)  # not what is tested here
    run = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                   phases=[Phase.generate],
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                   )(given(workloads(window, spec))(check_workload))
    with pytest.raises(AssertionError, match=caught):
        run()
