"""kvserve's CPU kernels (kernels/csrc/cpu_kernels.cpp), built on first use and called via ctypes.

The source has no torch headers, so `c++ -O3 -march=native` builds it in seconds. The library
is cached under $KVSERVE_CACHE (default ~/.cache/kvserve)/cpu_kernels, keyed by a hash of the
source, the flags, the compiler and the CPU flags, so a second start loads it at once. The
kernels run on their own thread pool (the .cpp says why not OpenMP). Where no compiler is
found or the build fails, `available()` is False, the reason is logged once, and callers use
the torch paths.

Kernels (fp32 or bf16 tensors, CPU, contiguous):
- `paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, window)`:
  the signature and semantics of `kernels.reference.paged_attention_ref`, reading each live
  K/V row once straight from the paged cache; a sequence costs what its own keys cost.
- `linear(x, w, bias=None, out_fp32=False, w_scale=None)`: x @ w.T (+ bias) for the few-row
  case (decode); w may be `pack_q8`'s int8 weight (then x is quantized to int8 per group of 32
  and multiplied with AVX-512 VNNI).
- `Forward`: the whole decoder stack of a `CausalLM` for a small flat batch in one call.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from kernels import kvquant

logger = logging.getLogger("kvserve.kernels")

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
CFLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-pthread", "-fPIC", "-shared", "-std=c++17",
          "-fno-math-errno"]

_lock = threading.Lock()

# The pool's size while `torch_on_one_thread()` holds (None: torch's own thread count).
_pool_threads: int | None = None


def num_threads() -> int:
    """Threads the kernels run on: torch's count, kept while torch is held to one thread."""
    return _pool_threads or torch.get_num_threads()


@contextlib.contextmanager
def torch_on_one_thread():
    """Torch's own ops run on the calling thread alone while the kernels' pool keeps every
    thread: an engine step that runs its model through these kernels.

    Two pools that spin while idle must not share the cores. After each parallel op torch's
    OpenMP workers spin before they sleep (libgomp's default: 300,000 polls, ~6 ms on a 2-core
    EPYC), and a fused forward started meanwhile runs on the cores they hold: a verification
    step with 9 tokens took 16 ms instead of 11, and 16-stream decoding lost a third of its
    throughput (bench/RESULTS.md). The ops torch runs in such a step (the sampler, gathers of
    a few logits rows) are small enough for one thread. Nests; `torch_on_all_threads()` hands
    the threads back for a torch forward inside it."""
    global _pool_threads
    n = torch.get_num_threads()
    if _pool_threads is not None or n == 1:
        yield
        return
    _pool_threads = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _pool_threads = None
        torch.set_num_threads(n)


@contextlib.contextmanager
def torch_on_all_threads():
    """Inside `torch_on_one_thread()`: torch's ops on every thread again (a torch forward)."""
    n = _pool_threads
    if n is None:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(1)


_lib: ctypes.CDLL | None = None
_error: str | None = None

_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES = {
    "kvs_has_avx512_bf16": ([], ctypes.c_int),
    "kvs_has_vnni": ([], ctypes.c_int),
    "kvs_row_stats": ([_P, _I, _I, _P, _P, _P, ctypes.c_int], ctypes.c_int),
    "kvs_apply_bitmask": ([_P, _I, _P, _I, _P, _I, _P, ctypes.c_int], ctypes.c_int),
    "kvs_sample_weights": ([_P, _I, _I, _P, ctypes.c_float, ctypes.c_int], ctypes.c_int),
    "kvs_mass_above": ([_P, _I, _I, _P, _P, ctypes.c_int], ctypes.c_int),
    "kvs_linear": ([ctypes.c_int, _P, _P, _P, _I, _P, _P, _I, _I, _I, ctypes.c_int,
                    ctypes.c_int], ctypes.c_int),
    "kvs_paged_attention": ([ctypes.c_int, _P, _I, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _I,
                             _I, ctypes.c_float, _I, _P, ctypes.c_int, ctypes.c_int, _P, _P],
                            ctypes.c_int),
    "kvs_quantize_rows": ([ctypes.c_int, ctypes.c_int, _P, _I, _I, _P, _P], ctypes.c_int),
    "kvs_forward": ([ctypes.c_int, _P, _P, _P, _P, _P, _P, ctypes.c_float, _P, _P, _P, _P, _P,
                     _P, _I, _I, _P, ctypes.c_int], ctypes.c_int),
}
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
KV_FORMATS = kvquant.FORMAT_CODES  # the kernels' KvFormat of a cache dtype; the model's is 0


def cache_dir() -> Path:
    root = os.environ.get("KVSERVE_CACHE") or Path.home() / ".cache" / "kvserve"
    return Path(root) / "cpu_kernels"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") \
        or shutil.which("clang++")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def int8_shapes_ok(cfg) -> bool:
    """int8 step weights (pack_q8) need every layer GEMM's K (hidden, intermediate, q heads x
    head_dim) to be a multiple of 32 and its N (those and the fused QKV rows) of 16."""
    return not any(k % 32 for k in (cfg.hidden_size, cfg.intermediate_size,
                                    cfg.num_heads * cfg.head_dim)) \
        and not (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim % 16


def has_vnni() -> bool:
    """The kernels were built with AVX-512 VNNI, which int8 step weights need to be fast (the
    portable fallback is exact but slow)."""
    lib = library()
    return lib is not None and bool(lib.kvs_has_vnni())


def _build() -> ctypes.CDLL:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++, g++ or clang++) on PATH")
    src = SOURCE.read_bytes()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(src + " ".join(CFLAGS).encode() + version.encode()
                         + " ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]
    target = cache_dir() / f"libkvserve_cpu_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        logger.info("building the CPU kernels (%s, once; cached in %s)", cxx, target.parent)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            proc = subprocess.run([cxx, *CFLAGS, str(SOURCE), "-o", str(out)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
            os.replace(out, target)  # atomic: a concurrent process sees all or nothing
    lib = ctypes.CDLL(str(target))
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None where it cannot be built."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            if os.environ.get("KVSERVE_DISABLE_CPU_KERNELS") == "1":
                _error = "disabled by KVSERVE_DISABLE_CPU_KERNELS=1"
            else:
                try:
                    _lib = _build()
                except Exception as e:  # no compiler, failed build, unloadable library
                    _error = str(e)
            if _error:
                logger.warning("CPU kernels unavailable (%s); using the torch paths", _error)
    return _lib


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str | None:
    library()
    return _error


def supports(dtype: torch.dtype) -> bool:
    return dtype in DTYPE_CODES


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(rc: int, what: str) -> None:
    if rc == 2:
        raise ValueError(f"{what}: a position is beyond the model's rotary table")
    if rc != 0:
        raise ValueError(f"{what}: shape not supported by the CPU kernel (head_dim <= 256, "
                         f"at most 16 query heads per KV head)")


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float,
                    sliding_window: int | None = None, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    # q: [T, Hq, D]; caches: [N, B, Hkv, D] (fp32 or bf16, or int8 / fp8 codes with their
    # scales, kernels/kvquant.py) -> [T, Hq, D] in the cache dtype (q's for a quantized one)
    lib = library()
    num_tokens, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    kvfmt = KV_FORMATS.get(k_cache.dtype, 0)
    dtype = q.dtype if kvfmt else k_cache.dtype
    out = torch.empty(num_tokens, hq, d, dtype=dtype)
    if num_tokens == 0 or seq_lens.numel() == 0:
        return out
    qf = q.float().contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    cu = cu_seqlens_q.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    rc = lib.kvs_paged_attention(DTYPE_CODES[dtype], qf.data_ptr(), hq * d,
                                 k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                                 tables.shape[1], cu.data_ptr(), lens.data_ptr(), lens.numel(),
                                 num_tokens, hq, hkv, d, block_size, float(scale),
                                 int(sliding_window or 0), out.data_ptr(),
                                 num_threads(), kvfmt, _ptr(k_scale), _ptr(v_scale))
    _check(rc, "paged_attention")
    return out.to(q.dtype)


def quantize_rows(x: torch.Tensor, cache_dtype: torch.dtype,
                  head_scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x [n, D] (fp32 / bf16) as the fused step stores them in a quantized cache: codes
    [n, D] of cache_dtype and int8's fp16 scales [n] (fp8: head_scales [n] divide, returned)."""
    x = x.contiguous()
    n, d = x.shape
    codes = torch.empty(n, d, dtype=cache_dtype)
    scales = torch.empty(n, dtype=torch.float16) if cache_dtype == torch.int8 \
        else head_scales.float().contiguous()
    rc = library().kvs_quantize_rows(DTYPE_CODES[x.dtype], KV_FORMATS[cache_dtype], x.data_ptr(),
                                     n, d, codes.data_ptr(), scales.data_ptr())
    _check(rc, "quantize_rows")
    return codes, scales


def row_stats(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp [R], rank of target [R]) of fp32 logits [R, V]: one parallel pass each,
    no [R, V] temporaries (teacher-forced prompt scoring). rank 1 = the most likely."""
    logits = logits.float().contiguous()
    target = target.to(torch.int64).contiguous()
    rows, vocab = logits.shape
    lse = torch.empty(rows, dtype=torch.float32)
    rank = torch.empty(rows, dtype=torch.int64)
    if rows and library().kvs_row_stats(logits.data_ptr(), rows, vocab, target.data_ptr(),
                                        lse.data_ptr(), rank.data_ptr(), num_threads()):
        raise ValueError(f"row_stats: a target is outside [0, {vocab})")
    return lse, rank


def sample_weights_(z: torch.Tensor, min_p: list[float], cutoff: float) -> torch.Tensor:
    """In place, fp32 contiguous z [R, C] of tempered logits -> sampling weights: e^(z - max),
    0 where below e^cutoff or below min_p[r] (engine/sampler.py's _draw_filtered, the torch
    version of which it replaces: one parallel pass per row instead of seven torch passes)."""
    assert z.dtype == torch.float32 and z.is_contiguous() and len(min_p) == z.shape[0]
    mp = torch.tensor(min_p, dtype=torch.float32)
    library().kvs_sample_weights(z.data_ptr(), z.shape[0], z.shape[1], mp.data_ptr(),
                                 float(cutoff), num_threads())
    return z


def mass_above(w: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Per row of fp32 weights w [R, C]: the total (float64) of the weights strictly above
    w[r, pos[r]] (top-p: the mass ahead of a draw)."""
    assert w.dtype == torch.float32 and w.is_contiguous()
    pos = pos.to(torch.int64).contiguous()
    out = torch.empty(w.shape[0], dtype=torch.float64)
    if w.shape[0] and library().kvs_mass_above(w.data_ptr(), w.shape[0], w.shape[1],
                                               pos.data_ptr(), out.data_ptr(), num_threads()):
        raise ValueError(f"mass_above: a position is outside [0, {w.shape[1]})")
    return out


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> list[int]:
    """In place: -inf wherever a listed row's bitmask has a 0 bit (structured output; the
    layout of xgrammar's token bitmask, int32 [R, ceil(V / 32)]). fp32 contiguous logits.
    Returns how many tokens each listed row keeps."""
    assert logits.dtype == torch.float32 and logits.is_contiguous() and bitmask.is_contiguous()
    assert bitmask.dtype == torch.int32 and bitmask.shape[0] >= logits.shape[0]
    assert bitmask.shape[1] * 32 >= logits.shape[1]
    idx = torch.tensor(rows, dtype=torch.int64)
    allowed = torch.empty(len(rows), dtype=torch.int64)
    library().kvs_apply_bitmask(logits.data_ptr(), logits.shape[1], bitmask.data_ptr(),
                                bitmask.shape[1], idx.data_ptr(), len(rows), allowed.data_ptr(),
                                num_threads())
    return allowed.tolist()


def quantize_int8(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> int8 codes [N, K] and float32 scales [N, K / group], symmetric per group of
    `group` along K (max |w| of the group -> 127): llama.cpp's Q8_0 with fp32 scales."""
    n, k = w.shape
    wg = w.detach().float().reshape(n, k // group, group)
    scale = wg.abs().amax(dim=2).clamp_min(1e-12) / 127
    q = torch.round(wg / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(n, k).contiguous(), scale.contiguous()


def pack_q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> the kernel's int8 weight (N % 16 == 0, K % 32 == 0): `quantize_int8`'s codes
    + 128 as u8 in the "q8 tile" layout [N/16, K/32, 8, 16, 4] (lane l of each 64-byte vector
    holds 4 codes of row 16 t + l; cpu_kernels.cpp) and its scales as [N/16, K/32, 16]."""
    n, k = w.shape
    if n % 16 or k % 32:
        raise ValueError(f"int8 weights need out_features % 16 == 0 and in_features % 32 == 0, "
                         f"got {n} x {k}")
    codes, scales = quantize_int8(w)
    u8 = (codes.to(torch.int16) + 128).to(torch.uint8)
    tiles = u8.reshape(n // 16, 16, k // 32, 8, 4).permute(0, 2, 3, 1, 4)
    return tiles.contiguous(), scales.reshape(n // 16, 16, k // 32).permute(0, 2, 1).contiguous()


def unpack_q8(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """pack_q8's inverse, float32 [N, K] (the weights the kernel multiplies by)."""
    nt, g = packed.shape[:2]
    codes = packed.permute(0, 3, 1, 2, 4).reshape(nt * 16, g * 32).float() - 128
    return codes * scales.permute(0, 2, 1).reshape(nt * 16, g).repeat_interleave(32, dim=1)


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> codes uint8 [N, K] in 0..15, scales d and minimums m float16 [N, K / 32]:
    w ~ d * q + m per group of 32 (llama.cpp's Q4_1 grid; the d and m of a Q4_1 file come back
    exactly, since its groups span codes 0..15)."""
    n, k = w.shape
    wg = w.detach().float().reshape(n, k // 32, 32)
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)
    d = ((hi - lo) / 15).half()
    m = lo.half()
    step = torch.where(d == 0, torch.ones_like(d), d).float()
    q = torch.round((wg - m.float()[..., None]) / step[..., None]).clamp_(0, 15)
    return q.to(torch.uint8).reshape(n, k), d, m


def int4_exact(w: torch.Tensor) -> bool:
    """w already lies on a 4-bit grid per group of 32 (it came from a Q4_0 / Q4_1 / Q4_K file):
    quantize_int4 gives it back to within the rounding of w's own dtype (bf16: 2^-9 of |w|,
    under 0.03 steps), where other weights miss by up to half a step."""
    n, k = w.shape
    if n % 16 or k % 32:
        return False
    q, d, m = quantize_int4(w)
    back = q.float().reshape(n, k // 32, 32) * d.float()[..., None] + m.float()[..., None]
    err = (back - w.detach().float().reshape(n, k // 32, 32)).abs().amax(dim=2)
    return bool((err <= 0.1 * d.float() + 1e-12).all())


def pack_q4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> the kernel's int4 weight (N % 16 == 0, K % 32 == 0): quantize_int4's codes in
    the "q4 tile" layout [N/16, K/32, 4, 16, 4] (byte j of lane l in vector s: element
    s * 4 + j of the group in the low nibble, 16 + s * 4 + j in the high one, row 16 t + l) and
    float16 [N/16, K/32, 2, 16] (d, then m, of each lane's row)."""
    n, k = w.shape
    if n % 16 or k % 32:
        raise ValueError(f"int4 weights need out_features % 16 == 0 and in_features % 32 == 0, "
                         f"got {n} x {k}")
    q, d, m = quantize_int4(w)
    q = q.reshape(n // 16, 16, k // 32, 2, 4, 4)          # [t, l, g, half, s, j]
    byte = q[:, :, :, 0] | (q[:, :, :, 1] << 4)            # [t, l, g, s, j]
    codes = byte.permute(0, 2, 3, 1, 4).contiguous()       # [t, g, s, l, j]
    params = torch.stack([d, m], dim=-1).reshape(n // 16, 16, k // 32, 2).permute(0, 2, 3, 1)
    return codes, params.contiguous()


def unpack_q4(codes: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """pack_q4's inverse, float32 [N, K] (the weights the kernel multiplies by)."""
    nt, g = codes.shape[:2]
    lo, hi = (codes & 15).float(), (codes >> 4).float()    # [t, g, s, l, j]
    q = torch.stack([lo, hi], dim=2)                       # [t, g, half, s, l, j]
    q = q.permute(0, 4, 1, 2, 3, 5).reshape(nt * 16, g, 32)
    d = params[:, :, 0].permute(0, 2, 1).reshape(nt * 16, g, 1).float()
    m = params[:, :, 1].permute(0, 2, 1).reshape(nt * 16, g, 1).float()
    return (q * d + m).reshape(nt * 16, g * 32)


def quantize_act_q8(x: torch.Tensor) -> torch.Tensor:
    """What the kernel multiplies an int8 weight by: x [M, K] rounded to int8 per group of 32
    (max |x| -> 127, round half to even), as float32."""
    m, k = x.shape
    xg = x.float().reshape(m, k // 32, 32)
    amax = xg.abs().amax(dim=2, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return (torch.round(xg * inv) * (amax / 127)).reshape(m, k)


def pack_f32(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] float32 -> the kernel's float32 tiles [N/16, K, 16] (N % 16 == 0): 16 rows'
    weights of one k side by side, for a broadcast-FMA GEMM without horizontal sums."""
    n, k = w.shape
    if n % 16:
        raise ValueError(f"float32 tiles need out_features % 16 == 0, got {n}")
    return w.detach().float().reshape(n // 16, 16, k).transpose(1, 2).contiguous()


def _w_bits(w: torch.Tensor, w_scale: torch.Tensor | None) -> int:
    """The kernel's WFormat of a weight: 0 (x's dtype, [N, K]), 8 (pack_q8), 4 (pack_q4),
    32 (pack_f32)."""
    if w_scale is None:
        return 32 if w.dim() == 3 and w.dtype == torch.float32 else 0
    return 4 if w_scale.dtype == torch.float16 else 8


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           out_fp32: bool = False, w_scale: torch.Tensor | None = None) -> torch.Tensor:
    # x: [M, K] fp32/bf16; w: [N, K] of x's dtype, pack_f32's tiles (fp32 x), or pack_q8's /
    # pack_q4's codes with w_scale (then x is quantized to int8 per group of 32 inside)
    # -> [M, N] (fp32 if out_fp32)
    lib = library()
    x, w = x.contiguous(), w.contiguous()
    m, k = x.shape
    bits = _w_bits(w, w_scale)
    n = w.shape[0] * 16 if bits else w.shape[0]
    if bits == 32:
        shape_ok = x.dtype == torch.float32 and tuple(w.shape) == (n // 16, k, 16)
    elif bits:
        shape_ok = w.dtype == torch.uint8 and tuple(w.shape) == (
            n // 16, k // 32, 8 if bits == 8 else 4, 16, 4) and tuple(w_scale.shape) == (
            (n // 16, k // 32, 16) if bits == 8 else (n // 16, k // 32, 2, 16))
    else:
        shape_ok = w.dtype == x.dtype and w.dim() == 2 and w.shape[1] == k
    if not shape_ok:
        raise ValueError(f"linear: x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}, "
                         f"w_scale {None if w_scale is None else tuple(w_scale.shape)}: int8 / "
                         f"int4 weights are pack_q8's / pack_q4's, float32 tiles pack_f32's "
                         f"(float32 x), others [N, K] of x's dtype")
    y = torch.empty(m, n, dtype=torch.float32 if out_fp32 else x.dtype)
    rc = lib.kvs_linear(DTYPE_CODES[x.dtype], x.data_ptr(), w.data_ptr(), _ptr(w_scale), bits,
                        _ptr(bias), y.data_ptr(), m, n, k, int(out_fp32), num_threads())
    if rc != 0:
        raise ValueError("int8 / int4 weights need in_features % 32 == 0")
    return y


WEIGHT_FORMATS = ("int8", "gguf")
FORMAT_NAMES = {4: "int4", 8: "int8", 32: "float32 tiles"}


def pack_weight(w: torch.Tensor, weights: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear weight as the fused step reads it. weights None: float32 as pack_f32's tiles
    (where N % 16 == 0), bf16 as is; "int8": pack_q8; "gguf": pack_q4 where w is already on a
    4-bit grid (a Q4_0 / Q4_1 / Q4_K file's blocks, exact) and pack_q8 elsewhere."""
    if weights is None:
        if w.dtype == torch.float32 and w.shape[0] % 16 == 0:
            return pack_f32(w), None
        return w, None
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown fused-step weights {weights!r}")
    return pack_q4(w) if weights == "gguf" and int4_exact(w) else pack_q8(w)


class Forward:
    """A CausalLM's decoder stack as one kernel call: embeddings in, final-norm hidden out.

    Binds the model's weights and the KV cache once (pointers; they must stay put). Each call
    takes the flat batch the runner prepared. Built only for plain fp32/bf16 linear weights
    (`Forward.supported(model)`); quantized layers keep the torch path.
    """

    def __init__(self, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int, weights: str | None = None):
        self.lib = library()
        cfg = model.config
        self.dtype = model.embed_tokens.weight.dtype
        self.code = DTYPE_CODES[self.dtype]
        self.eps = float(cfg.rms_norm_eps)
        self.hidden = cfg.hidden_size
        self.block_size = block_size
        self.weights = weights
        self._keep = []  # tensors whose pointers the kernel holds
        self.formats: set[str] = set()  # the layer weights' formats, for the startup log

        # int8 / gguf / float32 tiles: every fused step reads the packed weights (pack_weight);
        # the model's own weights stay for the torch path (longer prefill chunks).
        self.tiles = int8_shapes_ok(cfg)  # every GEMM's rows come in tiles of 16
        self.kvfmt = KV_FORMATS.get(kv_caches[0][0].dtype, 0)
        self.layer_ptrs = self._layer_ptrs(model, kv_caches, weights)
        self.windows = torch.tensor([w or 0 for w in cfg.layer_windows], dtype=torch.int64)
        self.final_norm = model.norm.weight
        self.lm_head = model.lm_head.weight
        self.lm_head_packed = pack_weight(model.lm_head.weight, weights) \
            if self.tiles and model.lm_head.weight.shape[0] % 16 == 0 else None
        if self.lm_head_packed is not None and self.lm_head_packed[1] is None \
                and self.lm_head_packed[0].dtype != torch.float32:
            self.lm_head_packed = None  # bf16 as is: the [N, K] kernel reads it directly
        self.head_format = FORMAT_NAMES.get(_w_bits(*self.lm_head_packed), "?") \
            if self.lm_head_packed is not None else str(self.dtype).removeprefix("torch.")
        self.cos = model.rope.cos.float().contiguous()
        self.sin = model.rope.sin.float().contiguous()
        self.max_positions = self.cos.shape[0]
        self.dims_base = [cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                          cfg.head_dim, cfg.intermediate_size, block_size]

    def _layer_ptrs(self, model, kv_caches, weights: str | None) -> torch.Tensor:
        ptrs = []
        for layer, cache in zip(model.layers, kv_caches):
            kc, vc = cache[:2]
            ks, vs = cache[2:] if len(cache) == 4 else (None, None)  # quantized: scales
            attn, mlp = layer.self_attn, layer.mlp
            mats = [pack_weight(lin.weight, weights) if self.tiles else (lin.weight, None)
                    for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            (wqkv, sqkv), (wo, so), (wgu, sgu), (wdown, sdown) = mats
            tensors = [layer.input_layernorm.weight, wqkv, attn.qkv_proj.bias,
                       attn.q_norm.weight if attn.qk_norm else None,
                       attn.k_norm.weight if attn.qk_norm else None,
                       wo, layer.post_attention_layernorm.weight, wgu, wdown, kc, vc,
                       sqkv, so, sgu, sdown]
            for t in tensors + [ks, vs]:
                if t is not None:
                    assert t.is_contiguous(), t.shape
                    assert t.dtype in (self.dtype, torch.uint8, torch.float32, torch.float16,
                                       *KV_FORMATS), t.dtype
                    self._keep.append(t)
            ptrs += [_ptr(t) or 0 for t in tensors] + [_w_bits(*mat) for mat in mats] \
                + [_ptr(ks) or 0, _ptr(vs) or 0]
            self.formats.update(FORMAT_NAMES.get(_w_bits(*mat), str(self.dtype).removeprefix(
                "torch.")) for mat in mats)
        return torch.tensor(ptrs, dtype=torch.int64)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] model dtype -> float32 [N, vocab]
        if self.lm_head_packed is not None:
            codes, scales = self.lm_head_packed
            return linear(hidden, codes, out_fp32=True, w_scale=scales)
        return linear(hidden, self.lm_head, out_fp32=True)

    @staticmethod
    def supported(model, weights: str | None = None) -> bool:
        from torch import nn
        dtype = model.embed_tokens.weight.dtype
        if weights in WEIGHT_FORMATS and not int8_shapes_ok(model.config):
            return False
        if dtype not in DTYPE_CODES or model.embed_tokens.weight.device.type != "cpu":
            return False
        cfg = model.config
        if cfg.head_dim > 256 or cfg.num_heads // cfg.num_kv_heads > 16 or cfg.head_dim % 2:
            return False
        for layer in model.layers:
            for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                        layer.mlp.gate_up_proj, layer.mlp.down_proj):
                if type(lin) is not nn.Linear or lin.weight.dtype != dtype:
                    return False
        head = model.lm_head
        return type(head) is nn.Linear and head.weight.dtype == dtype \
            and head.weight.is_contiguous()

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 seq_lens: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] embeddings (model dtype) -> [T, hidden] after the final norm
        num_tokens = x.shape[0]
        out = torch.empty(num_tokens, self.hidden, dtype=self.dtype)
        x = x.contiguous()
        positions = positions.to(torch.int64).contiguous()
        slots = slot_mapping.to(torch.int64).contiguous()
        tables = block_tables.to(torch.int32).contiguous()
        cu = cu_seqlens_q.to(torch.int32).contiguous()
        lens = seq_lens.to(torch.int32).contiguous()
        dims = torch.tensor(self.dims_base + [tables.shape[1], self.max_positions, self.kvfmt],
                            dtype=torch.int64)
        rc = self.lib.kvs_forward(self.code, dims.data_ptr(), self.layer_ptrs.data_ptr(),
                                  self.windows.data_ptr(), self.final_norm.data_ptr(),
                                  self.cos.data_ptr(), self.sin.data_ptr(), self.eps,
                                  x.data_ptr(), positions.data_ptr(), slots.data_ptr(),
                                  tables.data_ptr(), cu.data_ptr(), lens.data_ptr(), num_tokens,
                                  lens.numel(), out.data_ptr(), num_threads())
        _check(rc, "forward")
        return out
