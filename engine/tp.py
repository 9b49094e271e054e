"""Tensor parallelism over torch.distributed: N ranks each hold 1/N of every decoder layer and
of the KV cache; rank 0 also holds the embedding and the vocab projection, the scheduler and the
sampler.

Sharding (Megatron-style, as vLLM and nano-vllm do it): the fused qkv and gate_up projections
are split by output rows (each rank: its query heads, its KV heads, its slice of the MLP), o_proj
and down_proj by input columns, each followed by one all-reduce of its partial sums. KV heads
are split across ranks, so each rank's paged cache holds only its heads (KV bytes per rank
divide by N); when N exceeds the KV heads, each KV head is replicated on N / n_kv_heads ranks,
as vLLM does. Weights are sliced as the checkpoint is read, one tensor at a time, so no rank
holds the whole model.

One step: rank 0 schedules and embeds the flat batch, broadcasts the embedded tokens and the
attention metadata (positions, slot mapping, block tables, cu_seqlens, seq lens, copy-on-write
copies) in one header and two payload broadcasts, every rank runs its layers, and rank 0
computes the logits from the (replicated) final hidden states.

Ranks come from `init()`: worker processes spawned by the engine on 127.0.0.1 (`spawn_workers`),
or torchrun-style environment variables (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK) where a
launcher started every rank; rank 0 serves HTTP, the others run `worker_loop`. The process
group is gloo on the CPU, nccl on CUDA.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from engine.config import ModelConfig

logger = logging.getLogger("kvserve.engine")

CMD_STEP, CMD_STOP = 1, 2
HEADER = 8  # int64s: command, tokens, seqs, table width, copies, model dtype code
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INIT_TIMEOUT = timedelta(seconds=120)


@dataclass(frozen=True)
class Shard:
    """Which part of the model one rank holds."""
    rank: int
    world: int
    num_heads: int         # query heads on this rank
    num_kv_heads: int      # KV heads on this rank
    first_head: int        # its first query head
    first_kv_head: int     # its first KV head (of the model's)
    intermediate: int      # MLP width on this rank

    @classmethod
    def of(cls, cfg: ModelConfig, rank: int, world: int) -> "Shard":
        check_divisible(cfg, world)
        heads = cfg.num_heads // world
        if cfg.num_kv_heads % world == 0:
            kv = cfg.num_kv_heads // world
            first_kv = rank * kv
        else:  # world is a multiple of the KV heads: each is replicated on world / Hkv ranks
            kv, first_kv = 1, rank // (world // cfg.num_kv_heads)
        return cls(rank, world, heads, kv, rank * heads, first_kv,
                   cfg.intermediate_size // world)

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        return dataclasses.replace(cfg, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                   intermediate_size=self.intermediate)


def check_divisible(cfg: ModelConfig, world: int) -> None:
    """Startup errors that name the numbers (vLLM's rules)."""
    if world < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {world}")
    if cfg.num_heads % world:
        raise ValueError(f"tensor_parallel_size {world} does not divide the model's "
                         f"{cfg.num_heads} attention heads")
    if cfg.num_kv_heads % world and world % cfg.num_kv_heads:
        raise ValueError(f"tensor_parallel_size {world} and the model's {cfg.num_kv_heads} KV "
                         f"heads: one must divide the other")
    if cfg.intermediate_size % world:
        raise ValueError(f"tensor_parallel_size {world} does not divide the MLP width "
                         f"{cfg.intermediate_size}")


def shard_weights(weights: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig, shard: Shard
                  ) -> Iterable[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors (HF names, [out, in]) cut to this rank's part: q/k/v and
    gate/up rows, o_proj and down_proj columns; the embedding and vocab projection only on
    rank 0; norms whole. One tensor at a time."""
    d = cfg.head_dim
    for name, t in weights:
        part = name.split(".")[-2] if name.count(".") >= 1 else ""
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            if shard.rank == 0:
                yield name, t
            continue
        if part == "q_proj":
            t = t.narrow(0, shard.first_head * d, shard.num_heads * d)
        elif part in ("k_proj", "v_proj"):
            t = t.narrow(0, shard.first_kv_head * d, shard.num_kv_heads * d)
        elif part in ("gate_proj", "up_proj"):
            t = t.narrow(0, shard.rank * shard.intermediate, shard.intermediate)
        elif part == "o_proj" and name.endswith("weight"):
            t = t.narrow(1, shard.first_head * d, shard.num_heads * d)
        elif part == "down_proj" and name.endswith("weight"):
            t = t.narrow(1, shard.rank * shard.intermediate, shard.intermediate)
        yield name, t.contiguous()


# ---------------------------------------------------------------- the process group

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_world() -> tuple[int, int] | None:
    """(rank, world) from torchrun-style variables, or None when they are not set."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise ValueError(f"RANK={os.environ['RANK']!r} and WORLD_SIZE="
                         f"{os.environ['WORLD_SIZE']!r} must be integers") from None


def init(rank: int, world: int, device: torch.device, addr: str | None = None,
         port: int | None = None) -> None:
    """Join the group: every rank calls this with the same address (MASTER_ADDR/PORT by
    default). The port is bound by rank 0's store: a taken port is a clear error there."""
    if dist.is_initialized():
        raise ValueError("this process already runs a tensor-parallel engine: shut it down "
                         "(LLM.shutdown()) before starting another")
    addr = addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = port or int(os.environ.get("MASTER_PORT", "29500"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    try:
        store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=INIT_TIMEOUT,
                              wait_for_workers=False)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"tensor parallel rank {rank}: cannot "
                         f"{'listen on' if rank == 0 else 'reach'} {addr}:{port} ({e}); is "
                         f"the port taken or the address wrong? Set MASTER_ADDR / "
                         f"MASTER_PORT") from None
    store.set(f"joined{rank}", "1")
    if rank == 0:  # wait for the others, but not for one that has already died
        deadline = time.monotonic() + INIT_TIMEOUT.total_seconds()
        keys = [f"joined{r}" for r in range(1, world)]
        while not store.check(keys):  # polled: the store's own wait cannot watch processes
            if (why := worker_failure()) is not None:
                raise ValueError(f"tensor parallel: {why} before joining")
            if time.monotonic() > deadline:
                raise ValueError(f"tensor parallel: not every rank of {world} reached "
                                 f"{addr}:{port} within {INIT_TIMEOUT}")
            time.sleep(0.05)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=INIT_TIMEOUT)


def check_agreement(summary: dict) -> None:
    """Every rank must run the same engine (a launcher may start them with different flags):
    compare what shapes the steps, rank 0's against each other's."""
    summaries = [None] * dist.get_world_size()
    dist.all_gather_object(summaries, summary)
    for other, theirs in enumerate(summaries):
        diff = {k: (summaries[0].get(k), theirs.get(k)) for k in summary
                if theirs.get(k) != summaries[0].get(k)}
        if diff:
            raise ValueError(f"tensor parallel rank {other} was started with other settings "
                             f"than rank 0 (rank 0's, rank {other}'s): {diff}; give every rank "
                             f"the same flags")


# ---------------------------------------------------------------- one step, broadcast

def send_step(x: torch.Tensor, positions: torch.Tensor, meta, copies) -> None:
    """Rank 0: the step's embedded tokens and metadata to every other rank."""
    num_seqs, width = meta.block_tables.shape
    copies = torch.tensor(list(zip(*copies)) if copies else [[], []], dtype=torch.int64)
    header = torch.tensor([CMD_STEP, x.shape[0], num_seqs, width, copies.shape[1],
                           DTYPES.index(x.dtype), 0, 0], dtype=torch.int64)
    dist.broadcast(header, 0)
    ints = torch.cat([positions.long(), meta.slot_mapping.long(),
                      meta.block_tables.long().flatten(), meta.cu_seqlens_q.long(),
                      meta.seq_lens.long(), copies.flatten()])
    dist.broadcast(ints, 0)
    dist.broadcast(x.contiguous(), 0)


def send_stop() -> None:
    dist.broadcast(torch.tensor([CMD_STOP] + [0] * (HEADER - 1), dtype=torch.int64), 0)


def recv_step(backend: str, hidden: int):
    """Other ranks: (x, positions, meta, copies) of the next step, or None to stop."""
    from engine.attention import AttentionMetadata
    header = torch.empty(HEADER, dtype=torch.int64)
    dist.broadcast(header, 0)
    cmd, t, s, width, n_copies, dt = header[:6].tolist()
    if cmd == CMD_STOP:
        return None
    ints = torch.empty(2 * t + s * width + (s + 1) + s + 2 * n_copies, dtype=torch.int64)
    dist.broadcast(ints, 0)
    x = torch.empty(t, hidden, dtype=DTYPES[dt])
    dist.broadcast(x, 0)
    positions, slots, tables, cu, lens, copies = ints.split(
        [t, t, s * width, s + 1, s, 2 * n_copies])
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables.view(s, width).int(),
                             cu_seqlens_q=cu.int(), seq_lens=lens.int(), backend=backend)
    copies = list(zip(*copies.view(2, n_copies).tolist())) if n_copies else []
    return x, positions, meta, copies


def worker_loop(runner) -> None:
    """A rank > 0: run the layers of every step rank 0 broadcasts, until it says stop."""
    backend, hidden = runner.config.attention_backend, runner.model.config.hidden_size
    with torch.inference_mode():
        while (step := recv_step(backend, hidden)) is not None:
            x, positions, meta, copies = step
            runner.copy_blocks(copies)
            runner.model.decoder(x, positions, runner.kv_caches, meta)


# ---------------------------------------------------------------- spawned workers

WORKERS: "Workers | None" = None  # rank 0's spawned ranks (one tensor-parallel engine a process)


def start_workers(world: int, port: int, build_kwargs: dict) -> None:
    global WORKERS
    WORKERS = Workers(world, port, build_kwargs)


def worker_failure() -> str | None:
    """Why a spawned rank is gone, or None while all are alive."""
    return WORKERS.dead if WORKERS is not None else None


def leave() -> None:
    """Leave the process group now (a rank that will not step): its gloo threads are joined
    here instead of in the interpreter's exit, where one still running aborts the process."""
    if dist.is_initialized():
        dist.destroy_process_group()


def shutdown() -> None:
    """Rank 0: tell every rank to stop, wait for spawned ones, leave the group."""
    global WORKERS
    if WORKERS is not None:
        WORKERS.stopping = True  # their exits from here on are expected
    if dist.is_initialized():
        if WORKERS is None or WORKERS.dead is None:
            try:
                send_stop()
            except RuntimeError:  # a rank is gone: the others see the closed connection
                pass
        if WORKERS is not None:
            WORKERS.stop()
        dist.destroy_process_group()
    elif WORKERS is not None:
        WORKERS.stop()
    WORKERS = None


def _worker_main(argv: list[str]) -> None:
    """`python -m engine.tp RANK WORLD PORT KWARGS_JSON`: one spawned rank."""
    rank, world, port, kwargs = int(argv[0]), int(argv[1]), int(argv[2]), json.loads(argv[3])
    logging.basicConfig(level=kwargs.pop("log_level", logging.INFO),
                        format=f"%(asctime)s %(levelname)s tp{rank}: %(message)s")
    if sys.platform == "linux":  # no orphans: this rank ends when rank 0 does, however it ends
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from engine.builder import build
    from engine.model_runner import ModelRunner
    config, model, _, _ = build(**kwargs, tp_rank=rank, tp_port=port)
    worker_loop(ModelRunner(config, model))
    dist.destroy_process_group()


class Workers:
    """Ranks 1..N-1 as child processes of rank 0 (`python -m engine.tp`: a fresh interpreter
    that imports nothing of the caller's script), watched by threads: one that exits before
    it is told to is logged with its exit code, and `dead` says so."""

    def __init__(self, world: int, port: int, build_kwargs: dict):
        kwargs = json.dumps({**build_kwargs,
                             "log_level": logging.getLogger().getEffectiveLevel()})
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        self.procs = [subprocess.Popen([sys.executable, "-m", "engine.tp", str(r), str(world),
                                        str(port), kwargs], env=env)
                      for r in range(1, world)]
        self.dead: str | None = None
        self.on_death: list[Callable[[str], None]] = []
        self.stopping = False
        for r, p in enumerate(self.procs, 1):
            threading.Thread(target=self._watch, args=(r, p), name=f"kvserve-tp{r}-watch",
                             daemon=True).start()

    def _watch(self, rank: int, p: subprocess.Popen) -> None:
        code = p.wait()
        if self.stopping or self.dead is not None:
            return
        self.dead = f"tensor-parallel rank {rank} (pid {p.pid}) exited with code {code}"
        logger.error("%s: the engine cannot step without it", self.dead)
        for fn in self.on_death:
            fn(self.dead)

    def stop(self, timeout: float = 10.0) -> None:
        """After send_stop(): wait for the workers, then make sure none is left (at once when
        one died: the others cannot finish a step without it)."""
        self.stopping = True
        for p in self.procs:
            try:
                p.wait(0.01 if self.dead else timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def run_launched_rank(build_kwargs: dict) -> int:
    """`kvserve serve` as rank > 0 of a launcher's group (RANK, WORLD_SIZE, ...): build this
    rank's part and run steps until rank 0 stops; exit 0 then, 1 if rank 0 went away."""
    from engine.builder import build
    from engine.model_runner import ModelRunner
    config, model, _, _ = build(**build_kwargs)
    rank = model.shard.rank

    # A supervisor stopping the group signals every rank at once (Kubernetes deletes all its
    # pods): dying here would fail the steps rank 0 is draining. This rank follows rank 0:
    # it ends when rank 0 stops the group or goes away.
    def on_term(signum, frame):
        logger.info("tensor parallel rank %d: %s: waiting for rank 0 to stop the group", rank,
                    signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, on_term)
    logger.info("tensor parallel rank %d of %d ready; waiting for rank 0's steps", rank,
                model.shard.world)
    try:
        worker_loop(ModelRunner(config, model))
    except RuntimeError as e:  # rank 0 is gone: its connections closed
        logger.error("tensor parallel rank %d: lost the group (%s); exiting", rank, e)
        return 1
    dist.destroy_process_group()
    logger.info("tensor parallel rank %d: rank 0 stopped the group; exiting", rank)
    return 0


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
