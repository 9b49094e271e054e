"""Frozen configuration: what the model is (ModelConfig) and how the engine runs it (EngineConfig)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from kernels import kvquant
from kernels.cpu import cpu_flags

if TYPE_CHECKING:
    from engine.spec_decode import SpeculativeConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_scaling: tuple[tuple[str, object], ...] | None = None  # frozen dict items
    layer_windows: tuple[int | None, ...] = ()  # sliding window per layer, None = full
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if len(self.layer_windows) != self.num_layers:
            raise ValueError("layer_windows must have one entry per layer")

    @cached_property
    def sliding_window(self) -> int | None:
        """The window when every layer shares one (what KV eviction may rely on), else None."""
        windows = set(self.layer_windows)
        return windows.pop() if len(windows) == 1 else None

    def attention_span(self, attention_cost: float = 1.0) -> float:
        """Keys whose attention costs a token as much as its linear layers: those are
        H(Hq + 2Hkv)D + HqDH + 3HI multiply-adds per layer, attention 2HqD per key (QK and
        PV). attention_cost: the time of an attention multiply-add over a GEMM's."""
        h, d = self.hidden_size, self.head_dim
        linear = (h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h
                  + 3 * h * self.intermediate_size)
        return linear / (2 * self.num_heads * d) / attention_cost

    def kv_bytes_per_token(self, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
        # The lecture's formula: 2 (K and V) x head_dim x n_kv_heads x n_layers x bytes;
        # a quantized cache stores 1 byte per value, int8 plus a fp16 scale per head.
        per_value = kvquant.storage_dtype(kv_cache_dtype, dtype).itemsize
        return 2 * self.num_layers * (self.head_dim * self.num_kv_heads * per_value
                                      + kvquant.scale_bytes_per_token(kv_cache_dtype,
                                                                      self.num_kv_heads))

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        arch = (cfg.get("architectures") or [""])[0]
        num_heads = cfg["num_attention_heads"]
        num_layers = cfg["num_hidden_layers"]
        rope = dict(cfg.get("rope_parameters") or {})  # transformers >= 5
        scaling = cfg.get("rope_scaling") or None     # transformers 4
        if scaling:
            rope.update(scaling)
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"unsupported rope scaling {rope_type!r} (supported: llama3)")
        window = cfg.get("sliding_window")
        if arch.startswith("Qwen") and not cfg.get("use_sliding_window", False):
            window = None
        layer_types = cfg.get("layer_types")
        if layer_types and window:
            windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        elif arch.startswith("Qwen") and window:
            first = cfg.get("max_window_layers", num_layers)
            windows = tuple(window if i >= first else None for i in range(num_layers))
        else:
            windows = (window,) * num_layers
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            rope_scaling=tuple(sorted(rope.items())) if rope_type == "llama3" else None,
            layer_windows=windows,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos,
        )


_SIZE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(value: int | float | str) -> int:
    """'2GiB' / '512MiB' / '1.5G' / 1073741824 -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"cannot parse memory size {value!r} (e.g. 2GiB, 512MiB)")
    unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(unit or " "))


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """The CPU computes bf16 dot products natively (AVX-512 BF16 or AMX): bf16 weights then
    run ~1.7x faster than float32 here and read half the bytes (bench/RESULTS.md)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on CUDA and on CPUs with native bf16 arithmetic, float32 elsewhere
    (float32 is also what matches transformers exactly: pass it to compare)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    dtype: torch.dtype
    device: torch.device
    block_size: int = 16
    num_kv_blocks: int = 0            # resolved capacity (blocks)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    prefill_chunk: int = 512          # prompt tokens per step beside decodes (0: no limit)
    max_model_len: int = 2048
    enable_prefix_caching: bool = True
    attention_backend: str = "torch"  # resolved: "torch" | "cpu" | "triton"
    enforce_eager: bool = False       # no fused decode forward (kernels.cpu.Forward)
    quantization: str | None = None   # "int4": torch int4 linears; "int8": fused-step weights
    speculative: SpeculativeConfig | None = None  # engine/spec_decode.py; None: off
    kv_cache_dtype: str = "auto"      # kernels/kvquant.py: auto | int8 | fp8_e4m3 | fp8_e5m2
    tensor_parallel_size: int = 1     # engine/tp.py: ranks, each with 1/N of layers and KV

    def __post_init__(self):
        for name in ("block_size", "num_kv_blocks", "max_num_seqs", "max_num_batched_tokens",
                     "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attention_backend not in ("torch", "cpu", "triton"):
            raise ValueError(f"attention_backend must be torch, cpu, triton or auto, "
                             f"got {self.attention_backend!r}")

    @cached_property
    def kv_cache_bytes(self) -> int:
        """One rank's pool: under tensor parallelism it holds that rank's KV heads only."""
        m, n = self.model, self.tensor_parallel_size
        if n > 1:  # rank 0's part (every rank holds as many KV heads)
            from engine.tp import Shard  # engine.tp imports this module
            m = Shard.of(m, 0, n).local_config(m)
        return (m.kv_bytes_per_token(self.dtype, self.kv_cache_dtype)
                * self.num_kv_blocks * self.block_size)

    @property
    def kv_dtype(self) -> torch.dtype:
        """The cache tensors' dtype: the model's, or int8 / fp8 codes."""
        return kvquant.storage_dtype(self.kv_cache_dtype, self.dtype)
