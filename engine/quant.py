"""Weight-only int4 on the CPU: the decoder's nn.Linear layers become groups of 4-bit codes
run by torch's int4 kernel (`aten._weight_int4pack_mm_for_cpu`), activations stay bfloat16.

Decode on the CPU is bound by the weight bytes read per step, and int4 reads ~a third of bf16
(codes plus a bf16 scale and zero per 32 weights). The kernel's arithmetic grows with the rows,
so many rows at once (a long prefill) run slower than bf16 (bench/quant.py).
The kernel dequantizes weight row n, column k of group g = k // group_size as

    w[n, k] = (q[n, k] - 8) * scales_and_zeros[g, n, 0] + scales_and_zeros[g, n, 1]

with q in 0..15, scales and zeros stored in bfloat16 and the arithmetic in float32
(aten/src/ATen/native/cpu/int4mm_kernel.cpp; pinned by tests/test_quant.py).
We quantize each group asymmetrically from its float32 min and max: scale = (max - min) / 15,
zero = the midpoint of the 16 codes' grid, each code the nearest grid point. The vocab
projection stays bf16 unless asked otherwise (quantize_model says why).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from engine.config import resolve_dtype

logger = logging.getLogger("kvserve.engine")

QUANTIZATIONS = ("int4", "int8", "gguf")
GROUP_SIZE = 32
_PACK_N = 16  # the kernel's packing wants out_features divisible by 16


def resolve_quantization(quantization: str | None) -> str | None:
    if quantization is None or quantization == "none":
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose from none, "
                         f"{', '.join(QUANTIZATIONS)}")
    return quantization


def int4_kernel_available() -> bool:
    return (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))


def int4_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The model dtype for int4: bfloat16 ('auto' resolves to it), on the CPU only."""
    if device.type != "cpu":
        raise ValueError("quantization='int4' is a CPU path for now (torch's CUDA int4 kernel "
                         "packs weights differently); use device='cpu' or no quantization")
    if not int4_kernel_available():
        raise ValueError(f"quantization='int4' needs torch's CPU int4 kernel "
                         f"(aten._weight_int4pack_mm_for_cpu), which torch {torch.__version__} "
                         f"does not have; upgrade torch or run without quantization")
    dt = torch.bfloat16 if dtype == "auto" else resolve_dtype(dtype, device)
    if dt != torch.bfloat16:
        raise ValueError(f"quantization='int4' computes in bfloat16 (torch's CPU int4 kernel is "
                         f"fast only for bfloat16 activations); pass dtype='bfloat16' or 'auto', "
                         f"not {dtype!r}")
    return dt


def quantize_int4(weight: torch.Tensor, group_size: int = GROUP_SIZE
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> codes int32 [N, K] in 0..15, scales_and_zeros bf16 [K/gs, N, 2]."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group_size, group_size)   # [N, G, gs]
    lo, hi = w.amin(-1), w.amax(-1)                                        # [N, G]
    scale = ((hi - lo) / 15).to(torch.bfloat16)
    # q = 7.5 sits at the middle of [lo, hi]: rounding the scale to bf16 then errs
    # symmetrically at both ends.
    zero = ((lo + hi) / 2 + scale.float() / 2).to(torch.bfloat16)
    # Codes are the nearest points of the grid the kernel will actually use (bf16 scale/zero).
    step = torch.where(scale == 0, 1.0, scale.float())
    q = torch.round((w - zero.float()[..., None]) / step[..., None]) + 8
    q = q.clamp_(0, 15).to(torch.int32).reshape(n, k)
    return q, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor,
                    group_size: int = GROUP_SIZE) -> torch.Tensor:
    """The kernel's weights, float32 [N, K], from codes [N, K] and scales_and_zeros [K/gs, N, 2]."""
    sz = scales_and_zeros.float().transpose(0, 1).repeat_interleave(group_size, dim=1)  # [N, K, 2]
    return (q.float() - 8) * sz[..., 0] + sz[..., 1]


class _WeightOnlyLinear(nn.Module):
    """y = x W^T + b for a quantized W: subclasses give `_mm(x2d)`; x, y bfloat16."""
    in_features: int
    out_features: int
    bias: torch.Tensor | None

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] bf16 -> [..., N] bf16
        out = self._mm(x.reshape(-1, self.in_features).contiguous())
        if self.bias is not None:
            out += self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def _bf16(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach().to(torch.bfloat16)


class Int4Linear(_WeightOnlyLinear):
    """W in int4 groups packed for the CPU kernel."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                 bias: torch.Tensor | None, group_size: int = GROUP_SIZE):
        super().__init__()
        self.out_features = packed.shape[0]
        self.in_features = scales_and_zeros.shape[0] * group_size
        self.group_size = group_size
        self.register_buffer("packed", packed)                     # uint8 [N, K/2]
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # bf16 [K/gs, N, 2]
        self.register_buffer("bias", bias)                         # bf16 [N] or None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    group_size: int = GROUP_SIZE) -> "Int4Linear":
        q, scales_and_zeros = quantize_int4(weight, group_size)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        return cls(packed, scales_and_zeros, _bf16(bias), group_size)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size,
                                                          self.scales_and_zeros)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class Int8Linear(_WeightOnlyLinear):
    """W = q * scale, q int8 and one symmetric bf16 scale per output row
    (aten._weight_int8pack_mm)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # int8 [N, K]
        self.register_buffer("scales", scales)  # bf16 [N]
        self.register_buffer("bias", bias)      # bf16 [N] or None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        w = weight.detach().float()
        scales = (w.abs().amax(1) / 127).to(torch.bfloat16)
        step = torch.where(scales == 0, 1.0, scales.float())
        q = torch.round(w / step[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q, scales, _bf16(bias))

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


LM_HEADS = ("bf16", "int8", "int4")


def quantizable(linear: nn.Linear, group_size: int = GROUP_SIZE) -> bool:
    return linear.in_features % group_size == 0 and linear.out_features % _PACK_N == 0


def quantize_model(model: nn.Module, group_size: int = GROUP_SIZE,
                   lm_head: str = "bf16") -> list[str]:
    """Swap every nn.Linear of the model for an Int4Linear built from its (float32) weights and
    drop the original. Layers whose shapes the kernel cannot take stay; their names are returned.

    The vocab projection `model.lm_head` becomes `lm_head`: "bf16" keeps it (for a tied head,
    the embedding table, so no extra memory), "int8" or "int4" swap in a quantized copy (the
    embedding keeps its table for lookups). On SmolLM2 an int4 head moves the next-token
    distribution ~20x more than int4 layers do (KL 0.05 vs 0.002 to bf16), and int8 is slower
    than bf16 from 8 rows on; see bench/quant.py."""
    if lm_head not in LM_HEADS:
        raise ValueError(f"lm_head must be one of {', '.join(LM_HEADS)}, got {lm_head!r}")
    head = getattr(model, "lm_head", None)
    kept, done, before, after = [], 0, 0, 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            kind = lm_head if child is head else "int4"
            if kind == "bf16":
                continue
            if kind == "int8":
                new = Int8Linear.from_weight(child.weight, child.bias)
            elif quantizable(child, group_size):
                new = Int4Linear.from_weight(child.weight, child.bias, group_size)
            else:
                kept.append(f"{name}.{child_name}" if name else child_name)
                continue
            setattr(module, child_name, new)
            done += 1
            before += child.weight.numel() * 2  # as bf16
            after += sum(b.numel() * b.element_size() for b in new.buffers())
    logger.info("int4: %d linear layers quantized (groups of %d, lm_head %s): %.1f MiB, "
                "%.1f MiB in bf16", done, group_size, lm_head, after / 2**20, before / 2**20)
    if kept:
        logger.info("int4: kept in bf16 (in_features not a multiple of %d or out_features not "
                    "a multiple of %d): %s", group_size, _PACK_N, ", ".join(kept))
    return kept
