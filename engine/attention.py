"""Per-forward attention metadata and the swappable attention backend."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import kernels
from kernels import cpu
from kernels.reference import paged_attention_ref, store_kv_ref

BACKENDS: dict[str, tuple[Callable, Callable]] = {
    "torch": (paged_attention_ref, store_kv_ref),
    "cpu": (cpu.paged_attention, store_kv_ref),
    "triton": (kernels.paged_attention, kernels.store_kv),
}


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor   # [T] int64, cache slot of every new token
    block_tables: torch.Tensor   # [S, max_blocks] int32
    cu_seqlens_q: torch.Tensor   # [S + 1] int32
    seq_lens: torch.Tensor       # [S] int32, KV length incl. the new tokens
    backend: str = "torch"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_cache: tuple[torch.Tensor, ...], scale: float,
               sliding_window: int | None) -> torch.Tensor:
        # q: [T, Hq, D]; k, v: [T, Hkv, D]; kv_cache: the layer's (k_cache, v_cache) [N, B,
        # Hkv, D], and their scales when quantized (kernels/kvquant.py) -> [T, Hq, D]
        attention, store = BACKENDS[self.backend]
        k_cache, v_cache, *scales = kv_cache
        store(k, v, k_cache, v_cache, self.slot_mapping, *scales)
        return attention(q, k_cache, v_cache, self.block_tables, self.cu_seqlens_q,
                         self.seq_lens, scale, sliding_window, *scales)
