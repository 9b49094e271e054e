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
               k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
               sliding_window: int | None) -> torch.Tensor:
        # q: [T, Hq, D]; k, v: [T, Hkv, D]; caches: [N, B, Hkv, D] -> [T, Hq, D]
        attention, store = BACKENDS[self.backend]
        store(k, v, k_cache, v_cache, self.slot_mapping)
        return attention(q, k_cache, v_cache, self.block_tables, self.cu_seqlens_q,
                         self.seq_lens, scale, sliding_window)
