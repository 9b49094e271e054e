"""Tensor parallelism over torch.distributed (gloo on this CPU): N ranks, each with 1/N of every
layer and of the KV cache (engine/tp.py). Greedy tokens equal one rank's; launches by the engine
and by torchrun-style variables; a rank that dies fails the server (503, exit 1), SIGTERM leaves
no process behind."""
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from engine import LLM, SamplingParams
from engine.tp import Shard, check_divisible
from server_utils import DEFAULT_ARGS, REPO_ROOT, ServerProcess, free_port
from test_models_hf import PROMPTS, make_model


def _tokens(outs):
    return [[list(c.token_ids) for c in o.outputs] for o in outs]


def _children(pid: int) -> list[int]:
    """Live child processes of pid (from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(entry))
    return kids


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := cond()):
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout}s")


# ------------------------------------------------------------------ sharding arithmetic

def test_shards_split_heads_and_replicate_kv_heads_beyond_their_count():
    from engine.capacity import read_model_config
    _, m = read_model_config(None)  # SmolLM2: 9 query heads, 3 KV heads, MLP 1536
    shards = [Shard.of(m, r, 3) for r in range(3)]
    assert [(s.first_head, s.num_heads, s.first_kv_head, s.num_kv_heads) for s in shards] == \
        [(0, 3, 0, 1), (3, 3, 1, 1), (6, 3, 2, 1)]
    assert all(s.intermediate == 512 for s in shards)
    import dataclasses
    wide = dataclasses.replace(m, num_heads=12, num_kv_heads=2, intermediate_size=1536)
    assert [Shard.of(wide, r, 4).first_kv_head for r in range(4)] == [0, 0, 1, 1]  # replicated
    with pytest.raises(ValueError, match="does not divide the model's 9 attention heads"):
        check_divisible(m, 2)
    with pytest.raises(ValueError, match="3 KV heads: one must divide the other"):
        check_divisible(dataclasses.replace(m, num_heads=12), 4)


# ------------------------------------------------------------------ engines

@pytest.fixture
def smollm2_pair():
    """SmolLM2 float32 on 1 rank and on 3, the same small pool (preemption) and prefix cache."""
    kw = dict(dtype="float32", block_size=16, num_kv_blocks=10, max_num_seqs=4,
              max_num_batched_tokens=256)
    one = LLM(**kw)
    three = LLM(**kw, tensor_parallel_size=3)
    yield one, three
    three.shutdown()


def test_three_ranks_equal_one_on_smollm2(smollm2_pair):
    """Greedy and seeded tokens, with prefix-cache hits, preemption and an n = 2 fork."""
    one, three = smollm2_pair
    assert three.engine.runner.kv_cache.shape[-2] == 1  # each rank: its 1 of 3 KV heads
    assert three.engine.config.kv_cache_bytes * 3 == one.engine.config.kv_cache_bytes
    tok = one.get_tokenizer()
    prefix = tok.encode("The history of the printing press begins in the fifteenth century, "
                        "when a goldsmith in Mainz combined movable metal type, oil-based ink "
                        "and a screw press adapted from winemaking. ") * 2
    prompts = [prefix + tok.encode(" In short,"), prefix + tok.encode(" Its effects were"),
               tok.encode("def fibonacci(n):"), tok.encode("The capital of France is")]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    forked = SamplingParams(n=2, temperature=0.8, seed=11, max_tokens=8, ignore_eos=True)
    results = {}
    for name, llm in (("one", one), ("three", three)):
        llm.generate(prompts[:1], greedy, use_tqdm=False)  # the prefix lands in the cache
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        outs += llm.generate(prompts[2:3], forked, use_tqdm=False)
        results[name] = (_tokens(outs), llm.engine.stats)
    assert results["three"][0] == results["one"][0]
    for _, stats in results.values():
        assert stats["prefix_cache_hits"] > 0 and stats["num_preemptions"] > 0


@pytest.mark.parametrize("kind", ["llama", "mistral-window", "qwen2", "qwen3"])
def test_two_ranks_equal_one_on_tiny_models(kind, tmp_path):
    make_model(kind, tmp_path)
    kw = dict(model=str(tmp_path), dtype="float32", device="cpu", block_size=16,
              num_kv_blocks=32, max_num_batched_tokens=7)  # chunked prefill, mixed steps
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = _tokens(LLM(**kw).generate(PROMPTS[:4], params, use_tqdm=False))
    two = LLM(**kw, tensor_parallel_size=2)
    try:
        assert _tokens(two.generate(PROMPTS[:4], params, use_tqdm=False)) == want
    finally:
        two.shutdown()


def test_startup_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="does not divide the model's 9 attention heads"):
        LLM(dtype="float32", tensor_parallel_size=2, num_kv_blocks=8)
    make_model("llama", tmp_path)
    with pytest.raises(ValueError, match="quantization='int8'.*tensor parallelism"):
        LLM(model=str(tmp_path), quantization="int8", tensor_parallel_size=2, num_kv_blocks=8)
    import socket
    with socket.socket() as taken:  # rank 0 of a launched group, its MASTER_PORT in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"),
                            ("MASTER_PORT", str(taken.getsockname()[1]))):
            monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=r"cannot listen on 127\.0\.0\.1:\d+.*port taken"):
            LLM(model=str(tmp_path), dtype="float32", num_kv_blocks=8)
    with pytest.raises(ValueError, match="tensor_parallel_size 3 but WORLD_SIZE=2"):
        LLM(model=str(tmp_path), dtype="float32", num_kv_blocks=8, tensor_parallel_size=3)


# ------------------------------------------------------------------ servers

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp-llama")
    make_model("llama", path)
    return path


def _completion(url: str, max_tokens: int = 8) -> list:
    r = httpx.post(url + "/v1/completions", timeout=60,
                   json={"prompt": PROMPTS[3], "max_tokens": max_tokens, "temperature": 0,
                         "ignore_eos": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def test_torchrun_style_launch_serves_from_rank_0(tiny_llama):
    """Two `kvserve serve` processes with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, as
    a launcher (torchrun, a LeaderWorkerSet) starts them: rank 0 serves, rank 1 computes; the
    tokens equal one process's. Stopping the group signals both (as Kubernetes does): rank 1
    keeps computing until rank 0 has drained, then both exit 0."""
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    args = ["--model", str(tiny_llama), "--num-kv-blocks", "32",
            *[x for kv in DEFAULT_ARGS.items() for x in kv]]  # what ServerProcess adds
    worker = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", *args],
                              cwd=REPO_ROOT, env={**os.environ, **env, "RANK": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        with ServerProcess(*args, env={**env, "RANK": "0"}) as leader:
            got = _completion(leader.url)
            worker.send_signal(signal.SIGTERM)
            assert _completion(leader.url) == got  # rank 1 still computes its part
            assert leader.stop() == 0
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    with ServerProcess(*args) as alone:
        assert _completion(alone.url) == got


def test_ranks_started_with_other_flags_are_refused(tiny_llama):
    """A launcher that gives rank 1 another dtype: both ranks stop with the difference named,
    instead of exchanging tensors of other sizes."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(tiny_llama),
           "--num-kv-blocks", "32", "--port", str(free_port())]
    procs = [subprocess.Popen(cmd + ["--dtype", dt], cwd=REPO_ROOT, env={**env, "RANK": r},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r, dt in (("0", "float32"), ("1", "bfloat16"))]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [2, 2]
    for out in outs:
        assert "rank 1 was started with other settings than rank 0" in out
        assert "'dtype': ('torch.float32', 'torch.bfloat16')" in out


def test_sigterm_stops_every_rank(tiny_llama):
    args = ["--model", str(tiny_llama), "--num-kv-blocks", "32", "--tensor-parallel-size", "2"]
    with ServerProcess(*args) as srv:
        workers = _children(srv.proc.pid)
        assert len(workers) == 1
        _completion(srv.url)
        assert srv.stop() == 0
    _wait(lambda: _gone(workers[0]), 10, "the worker did not exit")


def test_a_dead_rank_turns_health_503_and_the_server_exits_1(tiny_llama):
    from engine import tp
    from server_utils import InProcessServer
    args = ["--model", str(tiny_llama), "--num-kv-blocks", "32", "--tensor-parallel-size", "2"]
    with InProcessServer(*args) as srv, srv.client() as c:  # idle when the rank dies
        assert c.get("/health").status_code == 200
        tp.WORKERS.procs[0].kill()
        r = _wait(lambda: (r := c.get("/health")).status_code == 503 and r, 30,
                  "/health did not turn 503")
        assert "tensor-parallel rank 1" in r.json()["error"]["message"]
        assert c.post("/v1/completions", json={"prompt": PROMPTS[3], "max_tokens": 2}
                      ).status_code == 503
    assert tp.WORKERS is None  # stopped with the server

    with ServerProcess(*args) as srv:  # a real server exits 1, with the reason in its log
        os.kill(_children(srv.proc.pid)[0], signal.SIGKILL)
        assert srv.proc.wait(timeout=30) == 1
        log = srv.log()
        assert "tensor-parallel rank 1" in log and "exited with code -9" in log
        assert "exit code 1" in log
