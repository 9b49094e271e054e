"""Quantized KV cache: what a stored K/V value is, for every backend (the oracle's semantics).

`kv_cache_dtype`:
- "auto": K/V in the model dtype, no scales (what kvserve always did).
- "int8": symmetric int8 codes with one scale per token per KV head, stored beside the blocks
  in the same paged layout: codes `[num_blocks, block_size, Hkv, D]` int8, scales
  `[num_blocks, block_size, Hkv]` float16 (the slot's row, like the codes'). A head's row of D
  values x is stored as s = fp16(max|x| / 127), q = round_half_even(x / s) clamped to ±127
  (q = 0 where s = 0); it reads back as q * s. Per value: 1 byte + 2 / D bytes of scale
  (llama.cpp's q8_0 is 1 + 2 / 32: a fp16 scale per 32 values).
- "fp8_e4m3" / "fp8_e5m2": torch's float8_e4m3fn / float8_e5m2 codes `[num_blocks, block_size,
  Hkv, D]` and one float32 scale per KV head per layer, `[Hkv]` (vLLM's fp8 KV semantics:
  stored = fp8(x / scale), read = stored * scale; its default scale is 1.0 when a checkpoint
  carries none, and so is ours). Values beyond the format's largest finite value saturate.

K/V are quantized from the values the model dtype would have stored (x rounded to the model
dtype first), so every backend and the fused CPU step quantize the same numbers.
"""
from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3", "fp8_e5m2")
STORAGE = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
INT8_MAX = 127
# the kernels' code of each quantized cache dtype (the C++ KvFormat, Triton's KV_QUANT); the
# model's own dtype is 0
FORMAT_CODES = {torch.int8: 1, torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}


def resolve_kv_cache_dtype(name: str | None) -> str:
    name = "auto" if name is None else str(name)
    aliases = {"fp8": "fp8_e4m3", "fp8_e4m3fn": "fp8_e4m3"}  # vLLM accepts "fp8" for e4m3
    name = aliases.get(name, name)
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)} "
                         f"(or fp8 = fp8_e4m3), got {name!r}")
    return name


def storage_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache tensors' dtype for a kv_cache_dtype."""
    return model_dtype if name == "auto" else STORAGE[name]


def is_quantized(cache: torch.Tensor) -> bool:
    return cache.dtype in FORMAT_CODES


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as uint8 (torch's CPU index_copy_/index_select skip fp8), others as they are."""
    return t.view(torch.uint8) if t.dtype in FP8_MAX else t


def scale_bytes_per_token(name: str, num_kv_heads: int) -> int:
    """Bytes of scales one token's K or V adds in one layer (int8: a fp16 per head)."""
    return 2 * num_kv_heads if name == "int8" else 0


def new_scales(name: str, num_layers: int, num_blocks: int, block_size: int,
               num_kv_heads: int, device) -> torch.Tensor | None:
    """The scales beside a pool: int8 [layers, 2 (K, V), blocks, block_size, Hkv] float16
    (zeros: an unwritten slot reads as 0), fp8 [layers, 2, Hkv] float32 ones, auto None."""
    if name == "int8":
        return torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads,
                           dtype=torch.float16, device=device)
    if name in ("fp8_e4m3", "fp8_e5m2"):
        return torch.ones(num_layers, 2, num_kv_heads, dtype=torch.float32, device=device)
    return None


def quantize(x: torch.Tensor, dtype: torch.dtype, head_scale: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [..., Hkv, D] -> (codes of `dtype` [..., Hkv, D], int8: fp16 scales [..., Hkv];
    fp8: None, the per-head `head_scale` [Hkv] is used as given)."""
    xf = x.float()
    if dtype == torch.int8:
        scale = (xf.abs().amax(-1) / INT8_MAX).to(torch.float16)
        s = scale.float()[..., None]
        q = torch.where(s > 0, torch.round(xf / torch.where(s > 0, s, 1.0)), 0.0)
        return q.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale
    limit = FP8_MAX[dtype]
    return (xf / head_scale.float()[:, None]).clamp_(-limit, limit).to(dtype), None


def dequantize(codes: torch.Tensor, scale: torch.Tensor, out_dtype=torch.float32) -> torch.Tensor:
    """codes [..., Hkv, D] with int8 scales [..., Hkv] or fp8 head scales [Hkv] -> values."""
    return (codes.float() * scale.float()[..., None]).to(out_dtype)
