"""Capacity planning: parameters, KV bytes per token (the lecture's formula, with GQA and the
sliding window), KV blocks for a memory budget, and how many sequences fit at once.

Everything here is arithmetic on a ModelConfig: no weights are loaded.  (Over 300 lines: the
plan's numbers and the report that explains each of them, `kvserve info`, stay side by side.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from engine.block_manager import ADMISSION_WATERMARK, blocks_spanning
from engine.config import EngineConfig, ModelConfig, parse_size, resolve_device, resolve_dtype
from engine.loader import GGUFHeader, ModelSource, hf_config, resolve_model
from kernels import kvquant

DEFAULT_CPU_KV_MEMORY = "1GiB"
GPU_MEMORY_UTILIZATION = 0.9


# ---------------------------------------------------------------- budget -> blocks

def default_kv_budget(device: torch.device, reserved: int = 0) -> int:
    """The engine's KV budget when none is given: 1GiB on the CPU; on CUDA what is free beyond
    10% of the card, less `reserved` (the weights, when they are not loaded yet)."""
    if device.type != "cuda":
        return parse_size(DEFAULT_CPU_KV_MEMORY)
    if not torch.cuda.is_available():
        raise ValueError("no CUDA device here: give a KV budget (memory) or num_kv_blocks")
    free, total = torch.cuda.mem_get_info(device)
    return int(free - (1 - GPU_MEMORY_UTILIZATION) * total) - reserved


def blocks_for_budget(model: ModelConfig, dtype: torch.dtype, device: torch.device,
                      block_size: int, budget: int | str | None,
                      kv_cache_dtype: str = "auto") -> int:
    """KV blocks that fit the budget (bytes or '2GiB'; None = the device default), at least 2."""
    if budget is None:
        budget = default_kv_budget(device)
    per_block = model.kv_bytes_per_token(dtype, kv_cache_dtype) * block_size
    return max(2, math.floor(parse_size(budget) / per_block))


def resolve_max_model_len(model: ModelConfig, num_kv_blocks: int, block_size: int,
                          max_model_len: int | None) -> int:
    """The model's limit capped by the pool (block 0 excluded); an explicit value must fit.
    With a sliding window a sequence holds a bounded number of blocks, so only those must fit."""
    capacity = (num_kv_blocks - 1) * block_size
    if model.sliding_window is not None:
        need = blocks_spanning(model.sliding_window, block_size)
        if need > num_kv_blocks - 1:
            raise ValueError(f"the sliding window of {model.sliding_window} tokens needs {need} "
                             f"KV blocks, only {num_kv_blocks - 1} available")
        capacity = model.max_position_embeddings
    if max_model_len is None:
        return min(model.max_position_embeddings, capacity)
    if max_model_len > capacity:
        raise ValueError(f"max_model_len {max_model_len} needs more KV cache than the "
                         f"{capacity} tokens available; raise num_kv_blocks/kv_cache_memory")
    return max_model_len


# ---------------------------------------------------------------- parameters

def count_layer_parameters(m: ModelConfig) -> int:
    q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    attention = m.hidden_size * (q + 2 * kv) + q * m.hidden_size       # qkv, o
    attention += (q + 2 * kv) * m.qkv_bias + 2 * m.head_dim * m.qk_norm  # Qwen2 bias, Qwen3 norms
    mlp = 3 * m.hidden_size * m.intermediate_size                        # gate, up, down
    return attention + mlp + 2 * m.hidden_size                           # + 2 RMSNorms


def count_parameters(m: ModelConfig) -> int:
    """Parameters of the engine's CausalLM: embedding, layers, final norm, lm_head unless tied."""
    embedding = m.vocab_size * m.hidden_size
    lm_head = 0 if m.tie_word_embeddings else embedding
    return embedding + m.num_layers * count_layer_parameters(m) + m.hidden_size + lm_head


# ---------------------------------------------------------------- the plan

@dataclass(frozen=True)
class CapacityPlan:
    model: ModelConfig
    dtype: torch.dtype
    block_size: int
    num_kv_blocks: int
    max_model_len: int
    seq_len: int                    # the length asked about in "how many fit at once"
    max_num_batched_tokens: int     # the largest prefill chunk
    max_num_seqs: int | None = None
    kv_budget: int | None = None    # bytes the blocks were sized for; None if blocks were given
    model_name: str = "model"
    kv_cache_dtype: str = "auto"    # kernels/kvquant.py: the model dtype, int8 or fp8 codes

    def __post_init__(self):
        for name in ("block_size", "max_model_len", "seq_len", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks, got {self.num_kv_blocks}")
        if self.seq_len > self.max_model_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds max_model_len "
                             f"{self.max_model_len}; raise max_model_len (and the KV budget)")

    # parameters: the engine's CausalLM, counted from the config
    @property
    def params_per_layer(self) -> int:
        return count_layer_parameters(self.model)

    @property
    def embedding_params(self) -> int:
        return self.model.vocab_size * self.model.hidden_size

    @cached_property
    def num_params(self) -> int:
        return count_parameters(self.model)

    @cached_property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype.itemsize

    # KV per token: 2 (K and V) x head_dim x n_kv_heads x n_layers x bytes
    @cached_property
    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token(self.dtype, self.kv_cache_dtype)

    @property
    def kv_formula(self) -> str:
        """The lecture's formula with this plan's numbers, e.g. '2 (K,V) × 64 head_dim × 3 kv
        heads × 30 layers × 4 B = 46,080 B'; int8 counts its scales."""
        m = self.model
        head = f"{m.head_dim} head_dim × {m.num_kv_heads} kv heads"
        if self.kv_cache_dtype == "auto":
            formula = f"2 (K,V) × {head} × {m.num_layers} layers × {self.dtype.itemsize} B"
        elif self.kv_cache_dtype == "int8":
            formula = (f"2 (K,V) × {m.num_layers} layers × {m.num_kv_heads} kv heads × "
                       f"({m.head_dim} head_dim × 1 B + a 2 B fp16 scale)")
        else:
            formula = f"2 (K,V) × {head} × {m.num_layers} layers × 1 B ({self.kv_cache_dtype})"
        return f"{formula} = {self.kv_bytes_per_token:,} B"

    @cached_property
    def unquantized_kv_bytes_per_token(self) -> int:
        """The same in the model dtype (kv_cache_dtype auto)."""
        return self.model.kv_bytes_per_token(self.dtype)

    @property
    def kv_quant_saving(self) -> float:
        """Tokens per byte against the model dtype's cache (1.0 unquantized)."""
        return self.unquantized_kv_bytes_per_token / self.kv_bytes_per_token

    @cached_property
    def mha_kv_bytes_per_token(self) -> int:
        m = self.model  # every term of the formula scales with the KV heads
        return self.kv_bytes_per_token * m.num_heads // m.num_kv_heads

    @property
    def gqa_saving(self) -> int:
        return self.model.num_heads // self.model.num_kv_heads

    @property
    def window(self) -> int | None:
        return self.model.sliding_window

    # the pool
    @cached_property
    def bytes_per_block(self) -> int:
        return self.kv_bytes_per_token * self.block_size

    @property
    def usable_blocks(self) -> int:
        return self.num_kv_blocks - 1  # block 0 is the null block

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_kv_blocks * self.bytes_per_block

    @property
    def pool_tokens(self) -> int:
        return self.usable_blocks * self.block_size

    @property
    def watermark_blocks(self) -> int:
        return int(ADMISSION_WATERMARK * self.num_kv_blocks)

    # one sequence of seq_len tokens
    @property
    def kept_tokens(self) -> int:
        """Tokens of one sequence whose K/V the formula counts: all, or the last W."""
        return min(self.seq_len, self.window) if self.window else self.seq_len

    @property
    def kv_bytes_per_seq(self) -> int:
        return self.kept_tokens * self.kv_bytes_per_token

    @cached_property
    def blocks_per_seq(self) -> int:
        """Blocks a sequence holds at steady decode: all of them, or the window's bound."""
        full = -(-self.seq_len // self.block_size)
        return min(full, blocks_spanning(self.window, self.block_size)) if self.window else full

    @property
    def prefill_chunk(self) -> int:
        return min(self.max_num_batched_tokens, self.seq_len)

    @cached_property
    def prefill_blocks_per_seq(self) -> int:
        """Peak while a chunk of C tokens at s is computed: positions [s - W + 1, s + C - 1]."""
        full = -(-self.seq_len // self.block_size)
        if not self.window:
            return full
        return min(full, blocks_spanning(self.window + self.prefill_chunk - 1, self.block_size))

    @cached_property
    def seqs_at_once(self) -> int:
        return self.usable_blocks // self.blocks_per_seq

    @cached_property
    def seqs_admitted_at_once(self) -> int:
        """The same with the admission watermark (the first sequence is admitted without it)."""
        if self.seqs_at_once == 0:
            return 0
        return max(1, (self.usable_blocks - self.watermark_blocks) // self.blocks_per_seq)

    # ---------------------------------------------------------------- output

    def to_dict(self) -> dict:
        m = self.model
        names = ("num_params", "params_per_layer", "embedding_params", "weight_bytes",
                 "kv_cache_dtype", "kv_bytes_per_token", "kv_formula",
                 "unquantized_kv_bytes_per_token",
                 "kv_quant_saving", "mha_kv_bytes_per_token", "gqa_saving", "window",
                 "block_size", "bytes_per_block", "kv_budget", "num_kv_blocks", "usable_blocks",
                 "kv_cache_bytes", "pool_tokens", "max_model_len", "seq_len", "kept_tokens",
                 "kv_bytes_per_seq", "blocks_per_seq", "prefill_chunk", "prefill_blocks_per_seq",
                 "seqs_at_once", "watermark_blocks", "seqs_admitted_at_once", "max_num_seqs",
                 "max_num_batched_tokens")
        return {"model": self.model_name, "architecture": m.architecture,
                "dtype": _dtype_name(self.dtype), "num_layers": m.num_layers,
                "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads,
                "head_dim": m.head_dim, "hidden_size": m.hidden_size,
                "vocab_size": m.vocab_size, "tie_word_embeddings": m.tie_word_embeddings,
                **{name: getattr(self, name) for name in names}}

    def lines(self) -> list[str]:
        m, bs, b = self.model, self.block_size, self.dtype.itemsize
        n, kv = f"{self.seq_len:,}", f"{self.kv_bytes_per_token:,} B"
        lm_head = "lm_head tied to the embedding" if m.tie_word_embeddings else "own lm_head"
        windows = [w for w in m.layer_windows if w]
        if self.window:
            attention = f"sliding window W={self.window:,} on every layer"
        elif windows:
            attention = f"sliding window on {len(windows)} of {m.num_layers} layers (all KV kept)"
        else:
            attention = "full causal (no window)"
        rows = [
            ("model", f"{self.model_name} ({m.architecture}), {_dtype_name(self.dtype)}"),
            ("parameters", f"{self.num_params:,} ({self.num_params / 1e6:.1f}M), {lm_head}"),
            ("", f"= embedding {self.embedding_params:,} + {m.num_layers} layers × "
                 f"{self.params_per_layer:,} + norm {m.hidden_size:,}"
                 + ("" if m.tie_word_embeddings else f" + lm_head {self.embedding_params:,}")),
            ("weights", f"{format_bytes(self.weight_bytes)} ({self.num_params:,} × {b} B)"),
            ("attention", f"{m.num_heads} query heads, {m.num_kv_heads} kv heads, head_dim "
                          f"{m.head_dim}; {attention}"),
            ("KV per token", f"{self.kv_formula} ({format_bytes(self.kv_bytes_per_token)})"),
            *([("  quantized", f"{self.kv_cache_dtype}: {self.kv_quant_saving:.2f}× the tokens "
                               f"per byte of a {_dtype_name(self.dtype)} cache "
                               f"({self.unquantized_kv_bytes_per_token:,} B per token)")]
              if self.kv_cache_dtype != "auto" else []),
            ("  with MHA", (f"2 × {m.head_dim} × {m.num_heads} heads × {m.num_layers} × {b} B"
                            if self.kv_cache_dtype == "auto" else
                            f"the same with {m.num_heads} kv heads") + " = "
                           f"{self.mha_kv_bytes_per_token:,} B: GQA saves {self.gqa_saving}× "
                           f"({m.num_heads} / {m.num_kv_heads} heads)" if self.gqa_saving > 1
                           else "the same: every query head has its own kv head"),
            ("KV block", f"{bs} tokens × {kv} = {format_bytes(self.bytes_per_block)}"),
            ("KV blocks", (f"{self.num_kv_blocks:,} = floor({format_bytes(self.kv_budget)} / "
                           f"{format_bytes(self.bytes_per_block)})" if self.kv_budget is not None
                           else f"{self.num_kv_blocks:,}")
                          + f"; {self.usable_blocks:,} usable (block 0 is the null block)"),
            ("KV pool", f"{self.usable_blocks:,} × {bs} = {self.pool_tokens:,} tokens, "
                        f"{format_bytes(self.kv_cache_bytes)} allocated"),
            ("max model len", f"{self.max_model_len:,} tokens (model "
                              f"{m.max_position_embeddings:,}, pool {self.pool_tokens:,})"),
        ]
        if self.window:
            rows.append(("KV per sequence",
                         f"min({n}, W={self.window:,}) × {kv} = "
                         f"{format_bytes(self.kv_bytes_per_seq)}; holds <= "
                         f"{self.blocks_per_seq:,} blocks = min(ceil({n} / {bs}), "
                         f"ceil(({self.window:,} - 1) / {bs}) + 1)"))
        else:
            rows.append(("KV per sequence", f"{n} tokens × {kv} = "
                                            f"{format_bytes(self.kv_bytes_per_seq)} = "
                                            f"{self.blocks_per_seq:,} blocks"))
        rows += [
            ("prefill peak", f"{self.prefill_blocks_per_seq:,} blocks per sequence (chunks of "
                             f"{self.prefill_chunk:,} tokens)"),
            ("fit at once", f"{self.seqs_at_once:,} sequences of {n} tokens = floor("
                            f"{self.usable_blocks:,} / {self.blocks_per_seq:,})"),
            ("  admitted", f"{self.seqs_admitted_at_once:,} (admission keeps "
                           f"{self.watermark_blocks:,} blocks free)"
                           + (f"; max_num_seqs {self.max_num_seqs:,}" if self.max_num_seqs
                              else "")),
            (f"  KV of {self.seqs_at_once:,} seqs",
             f"{self.seqs_at_once:,} × {self.kept_tokens:,} tokens × {kv} = "
             f"{format_bytes(self.seqs_at_once * self.kv_bytes_per_seq)} of "
             f"{format_bytes(self.kv_cache_bytes)}"),
            ("memory", f"weights {format_bytes(self.weight_bytes)} + KV "
                       f"{format_bytes(self.kv_cache_bytes)} = "
                       f"{format_bytes(self.weight_bytes + self.kv_cache_bytes)}"),
        ]
        width = max(len(label) for label, _ in rows) + 2
        return [f"{label:<{width}}{text}" for label, text in rows]

    def format(self) -> str:
        return "\n".join(self.lines())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def format_bytes(n: int | float) -> str:
    """Binary units: 46080 -> '45.00 KiB'."""
    if abs(n) < 1024:
        return f"{n:,.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.2f} {unit}"


# ---------------------------------------------------------------- building a plan

def plan_capacity(model: ModelConfig, dtype: str | torch.dtype = "auto", device: str = "auto",
                  block_size: int = 16, num_kv_blocks: int | None = None,
                  kv_cache_memory: int | str | None = None, max_model_len: int | None = None,
                  seq_len: int | None = None, max_num_batched_tokens: int = 2048,
                  max_num_seqs: int | None = None, model_name: str = "model",
                  kv_cache_dtype: str = "auto") -> CapacityPlan:
    """The plan `LLMEngine.from_args` with these arguments would run under, before loading
    weights: on CUDA the default budget leaves room for them. seq_len defaults to max_model_len."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kv_cache_dtype = kvquant.resolve_kv_cache_dtype(kv_cache_dtype)  # (aliases: fp8)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    budget = None
    if num_kv_blocks is None:
        if kv_cache_memory is None:
            budget = default_kv_budget(dev, reserved=count_parameters(model) * dt.itemsize)
        else:
            budget = parse_size(kv_cache_memory)
        num_kv_blocks = blocks_for_budget(model, dt, dev, block_size, budget, kv_cache_dtype)
    elif num_kv_blocks < 2:
        raise ValueError(f"the KV pool needs at least 2 blocks, got {num_kv_blocks}")
    max_model_len = resolve_max_model_len(model, num_kv_blocks, block_size, max_model_len)
    seq_len = max_model_len if seq_len is None else seq_len
    return CapacityPlan(model, dt, block_size, num_kv_blocks, max_model_len, seq_len,
                        max_num_batched_tokens, max_num_seqs, budget, model_name,
                        kv_cache_dtype)


def plan_for_config(config: EngineConfig, seq_len: int | None = None,
                    model_name: str = "model") -> CapacityPlan:
    """The plan of a built engine's EngineConfig (what `LLMEngine.capacity` returns)."""
    seq_len = config.max_model_len if seq_len is None else seq_len
    return CapacityPlan(config.model, config.dtype, config.block_size, config.num_kv_blocks,
                        config.max_model_len, seq_len, config.max_num_batched_tokens,
                        config.max_num_seqs, model_name=model_name,
                        kv_cache_dtype=config.kv_cache_dtype)


def read_model_config(model: str | None) -> tuple[ModelSource, ModelConfig]:
    """The ModelConfig of a model (None = the default), without reading any weights."""
    source = resolve_model(model)
    if source.kind == "gguf":
        return source, GGUFHeader(source.path).config()
    return source, hf_config(source.path)
