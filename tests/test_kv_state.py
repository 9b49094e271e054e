"""GET /v1/kv/state and what it is made of: the KVSnapshot of the pool and tables
(engine/kv_state.py, model-free), the engine thread that takes it between two steps
(server/async_engine.py, around a scripted engine), and the route on a real server: the
counts add up in every snapshot under concurrent load with clients that hang up, the
capacity plan is the engine's, bad input is a 400, the key guards it and no prompt text
leaves the server. The page that draws it is tested in a browser in test_kv_inspector.py."""
from __future__ import annotations

import asyncio
import json
import random
import threading

import httpx
import pytest

from engine.block_manager import KVCacheManager
from engine.kv_state import KVSnapshot
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from server.async_engine import EngineDead
from test_async_engine import Scripted, launch  # tests/ is on sys.path under pytest
from test_models_hf import make_model

KEY = "kv-state-key"
SEQ_FIELDS = {"request_id", "index", "status", "num_prompt_tokens", "num_tokens",
              "num_computed_tokens", "num_cached_blocks", "num_evicted_blocks",
              "num_preemptions", "block_table"}


def check_state(body: dict) -> None:
    """What every snapshot must satisfy (engine/block_pool.py's check_integrity, as the JSON
    tells it): free + cached-free + used = total usable; each block's ref count equals the
    number of running tables holding it; cached-free blocks are in the prefix cache, free
    ones not; block 0 is the null block and tables show it as null."""
    blocks, n = body["blocks"], body["num_blocks"]
    state, hashed, shared = blocks["state"], blocks["hashed"], blocks["shared"]
    assert len(state) == len(hashed) == n and set(state) <= set("nfcu")
    assert state[0] == "n" and "n" not in state[1:] and hashed[0] == "0"
    counts = body["counts"]
    assert counts["total"] == n - 1
    assert counts["free"] + counts["cached_free"] + counts["used"] == counts["total"]
    assert (counts["free"], counts["cached_free"], counts["used"]) == \
        (state.count("f"), state.count("c"), state.count("u"))
    assert counts["shared"] == len(shared) and all(r > 1 for r in shared.values())
    assert body["usage"] == pytest.approx(counts["used"] / counts["total"])
    holders = [0] * n
    for seq in body["sequences"]:
        assert set(seq) == SEQ_FIELDS  # ids and counts only: no tokens, no text
        table = seq["block_table"]
        if seq["status"] == "waiting":
            assert table == [], seq  # a waiting (or preempted) sequence holds nothing
        assert 0 not in table, "the null block is shown as null"
        assert table.count(None) <= seq["num_evicted_blocks"]
        for b in table:
            if b is not None:
                holders[b] += 1
    for b in range(n):
        ref = shared.get(str(b), 1 if state[b] == "u" else 0)
        assert holders[b] == ref, f"block {b}: ref count {ref}, {holders[b]} tables hold it"
        if state[b] == "c":
            assert hashed[b] == "1", f"cached-free block {b} is not in the prefix cache"
        if state[b] == "f":
            assert hashed[b] == "0", f"free block {b} is still in the prefix cache"
    assert body["num_running"] == sum(s["status"] != "waiting" for s in body["sequences"])


# ---------------------------------------------------------------- the snapshot, model-free


def run_step(sched: Scheduler) -> None:
    """One step without a model: schedule, record the computed tokens, and give each
    sequence whose tokens are all computed one more, as sampling would."""
    out = sched.schedule()
    sched.update(out, [])
    for seq in out.seqs:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)


def test_snapshot_of_shared_cached_and_free_blocks():
    kv = KVCacheManager(num_blocks=24, block_size=4, enable_prefix_caching=True)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    prefix = list(range(1, 13))  # 3 full blocks
    a = Sequence("a", 0, prefix + [50], SamplingParams())
    gone = Sequence("gone", 0, [90 + i for i in range(9)], SamplingParams())
    for seq in (a, gone):
        sched.add(seq)
    run_step(sched)
    sched.finish(gone, "abort")  # its 2 full blocks stay behind, cached for reuse
    b = Sequence("b", 0, prefix + [60], SamplingParams())
    sched.add(b)
    run_step(sched)  # b's prefix is a's 3 blocks: shared
    body = KVSnapshot.take(kv, sched, num_steps=2, number=5).to_dict()
    check_state(body)
    assert body["snapshot"] == 5 and body["num_steps"] == 2 and body["num_blocks"] == 24
    assert {s["request_id"]: s["block_table"][:3] for s in body["sequences"]} == \
        {"a": a.block_ids[:3], "b": a.block_ids[:3]}
    assert body["blocks"]["shared"] == {str(i): 2 for i in a.block_ids[:3]}
    assert body["counts"] == {"total": 23, "used": 5, "shared": 3, "cached_free": 2,
                              "free": 16}
    assert body["prefix_cache"] == {"queries": 13 + 9 + 13, "hits": 12,
                                    "hit_rate": 12 / 35, "evictions": 0}
    # a copy: the pool moves on, the snapshot does not
    snap = KVSnapshot.take(kv, sched)
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    assert snap.to_dict()["counts"]["used"] == 5
    assert json.loads(json.dumps(snap.to_dict())) == snap.to_dict()  # plain JSON


def test_window_evicted_entries_are_null_and_waiting_sequences_hold_nothing():
    kv = KVCacheManager(num_blocks=12, block_size=4, sliding_window=6)
    sched = Scheduler(kv, max_num_seqs=1, max_num_batched_tokens=64)
    long = Sequence("long", 0, list(range(1, 30)), SamplingParams())
    queued = Sequence("queued", 0, [1, 2, 3], SamplingParams())
    sched.add(long)
    sched.add(queued)  # max_num_seqs 1: it waits
    run_step(sched)
    body = KVSnapshot.take(kv, sched).to_dict()
    check_state(body)
    (running, waiting) = body["sequences"]
    assert running["status"] == "decode" and waiting["status"] == "waiting"
    dead = kv.num_dead_blocks(29)
    assert dead > 0 and running["num_evicted_blocks"] == dead
    assert running["block_table"] == [None] * dead + long.block_ids[dead:]
    assert waiting["block_table"] == [] and body["num_waiting"] == 1
    assert body["sliding_window"] == 6


# ---------------------------------------------------------------- the engine thread


class Inspected(Scripted):
    """The scripted engine with a kv_state that says where and when it was taken, and an
    event set when a step begins."""

    def __init__(self, fail_at: int | None = None):
        super().__init__(fail_at)
        self.in_step = threading.Event()

    def step(self):
        self.in_step.set()
        return super().step()

    def kv_state(self, number: int = 0) -> dict:
        return {"number": number, "steps": self.steps,
                "thread": threading.current_thread().name}


def test_the_engine_thread_answers_between_steps_and_wakes_when_idle():
    engine = Inspected()
    aengine = launch(engine)
    try:
        async def run():
            idle = await aengine.kv_state()  # the thread sleeps on its inbox: woken
            assert idle == {"number": 1, "steps": 0, "thread": "kvserve-engine"}
            engine.hold.clear()  # the first step blocks inside step()
            stream = await aengine.add_request("r", [1], SamplingParams(max_tokens=10 ** 9))
            assert await asyncio.to_thread(engine.in_step.wait, 30)
            queries = [asyncio.ensure_future(aengine.kv_state()) for _ in range(5)]
            await asyncio.sleep(0.05)  # every chance to be answered mid-step: none may be
            assert not any(q.done() for q in queries)
            engine.hold.set()
            snaps = await asyncio.gather(*queries)
            # after the step, all five at the thread's next look at its inbox: one copy
            assert [s["steps"] for s in snaps] == [1] * 5
            assert len({s["number"] for s in snaps}) == 1
            assert snaps[0]["thread"] == "kvserve-engine"
            stream.abort()
        asyncio.run(run())
    finally:
        aengine.stop()

    async def after_stop():
        with pytest.raises(EngineDead):
            await aengine.kv_state()
    asyncio.run(after_stop())


def test_a_failed_engine_answers_with_engine_dead():
    aengine = launch(Inspected(fail_at=1))

    async def run():
        stream = await aengine.add_request("r", [1], SamplingParams(max_tokens=5))
        with pytest.raises(EngineDead):
            async for _ in stream:
                pass
        with pytest.raises(EngineDead):
            await aengine.kv_state()
    try:
        asyncio.run(run())
    finally:
        aengine.stop()


# ---------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("kv-state-llama")
    make_model("llama", path, max_position_embeddings=1024)
    return str(path)


def test_counts_add_up_under_load_with_aborts(llama_dir):
    """24 concurrent requests (streamed or not, n = 2 forks, prompts sharing prefixes) on a
    pool too small for them all (preemption), a third of them dropped by their client,
    while /v1/kv/state is polled: every snapshot adds up; at the end nothing is held."""
    from server_utils import InProcessServer
    rng = random.Random(0)
    prefixes = [[rng.randrange(1, 500) for _ in range(40)] for _ in range(3)]
    snapshots = []

    async def one(client, i):
        body = {"prompt": prefixes[i % 3] + [rng.randrange(1, 500) for _ in range(5 + i)],
                "max_tokens": 40 + 3 * i, "ignore_eos": True, "temperature": 0.8,
                "seed": i, "n": 2 if i % 5 == 0 else 1}
        if i % 2:  # streamed; every third of these hangs up after a few chunks
            hangs_up = i % 3 == 1
            if hangs_up:  # long: the server is still generating when the client goes
                body["max_tokens"] = 150
            async with client.stream("POST", "/v1/completions",
                                     json={**body, "stream": True}) as r:
                assert r.status_code == 200
                chunks = 0
                async for line in r.aiter_lines():
                    chunks += line.startswith("data:")
                    if hangs_up and chunks == 4:
                        return  # leaving the block closes the connection: an abort
        elif i % 3 == 0:  # collected, but the client gives up (cancel: the connection goes)
            task = asyncio.ensure_future(client.post("/v1/completions", json=body))
            for _ in range(3000):  # until the poller sees requests running (30 s at most)
                if any(s["num_running"] for s in snapshots[-1:]):
                    break
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text

    async def poll(client, until: asyncio.Future):
        while not until.done():
            r = await client.get("/v1/kv/state")
            assert r.status_code == 200, r.text
            snapshots.append(r.json())
            check_state(snapshots[-1])

    async def main(url):
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
            work = asyncio.ensure_future(asyncio.gather(*(one(client, i) for i in range(24))))
            await asyncio.gather(work, poll(client, work))
            # aborts reach the engine on its thread: wait (with a deadline) until idle
            for _ in range(500):
                last = (await client.get("/v1/kv/state")).json()
                check_state(last)
                if not last["sequences"]:
                    return last
                await asyncio.sleep(0.02)
            raise AssertionError(f"requests still held blocks: {last['sequences']}")

    with InProcessServer("--model", llama_dir, "--num-kv-blocks", "40", "--block-size", "8",
                         "--max-num-seqs", "8", "--api-key", KEY) as srv:
        with srv.listening() as url:
            final = asyncio.run(main(url))
        aborted = srv.aengine.metrics.registry.get_sample_value(
            "kvserve:request_success_total",
            {"finished_reason": "abort", "model_name": final["model"]})
    print(f"{len(snapshots)} snapshots, {aborted} aborted, {final['num_preemptions']} "
          f"preemptions, up to {max(s['counts']['shared'] for s in snapshots)} shared")
    # 4 hung up mid-stream; 4 cancelled, which may go before the server takes them
    assert aborted >= 4
    assert len(snapshots) >= 10
    assert any(s["counts"]["shared"] for s in snapshots), "no snapshot saw a shared block"
    assert final["counts"]["used"] == 0 and final["num_waiting"] == 0
    assert final["counts"]["cached_free"] > 0  # full blocks stay for reuse
    assert final["num_preemptions"] > 0  # 16 sequences of ~100 tokens > 39 blocks of 8
    assert final["prefix_cache"]["hits"] > 0


@pytest.fixture(scope="module")
def keyed(llama_dir):
    from server_utils import InProcessServer
    with InProcessServer("--model", llama_dir, "--num-kv-blocks", "64",
                         "--api-key", KEY) as srv:
        yield srv


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_the_key_guards_the_state_not_the_page(keyed):
    with keyed.client() as c:
        assert error_of(c.get("/v1/kv/state"), 401)["type"] == "authentication_error"
        page = c.get("/kv")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_capacity_is_the_engines_plan_and_bad_seq_len_is_a_400(keyed):
    engine = keyed.aengine.engine
    with keyed.client(headers={"Authorization": f"Bearer {KEY}"}) as c:
        body = c.get("/v1/kv/state").json()
        check_state(body)
        assert body["capacity"] == engine.capacity().to_dict()
        assert body["num_blocks"] == engine.config.num_kv_blocks == 64
        assert body["model"] == engine.model_name and body["block_size"] == 16
        assert c.get("/v1/kv/state", params={"seq_len": 100}).json()["capacity"] == \
            engine.capacity(100).to_dict()
        for bad in ("0", "-3", "ten", "1.5", str(engine.config.max_model_len + 1)):
            err = error_of(c.get("/v1/kv/state", params={"seq_len": bad}), 400)
            assert err["param"] == "seq_len" and err["type"] == "invalid_request_error", bad


def test_no_prompt_text_in_the_state(server):
    """A request runs while the state is read: its text is nowhere in the JSON (the
    session's SmolLM2 server, which tokenizes text)."""
    marker = "Zanzibar-quokka-7391"

    async def run():
        async with server.async_client(timeout=120) as c:
            gen = asyncio.ensure_future(c.post("/v1/completions", json={
                "prompt": f"{marker} says hello to {marker}", "max_tokens": 24,
                "ignore_eos": True}))
            seen = []
            while not gen.done():
                r = await c.get("/v1/kv/state")
                seen.append(r.text)
                await asyncio.sleep(0)
            assert (await gen).status_code == 200
            return seen
    texts = asyncio.run(run())
    assert any('"sequences":[{' in t for t in texts), "never saw the request running"
    for text in texts:
        assert marker not in text and "hello" not in text
        check_state(json.loads(text))
