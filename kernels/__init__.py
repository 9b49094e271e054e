"""Paged causal attention over the KV cache.

`paged_attention` / `store_kv` are the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1);
`kernels.reference` holds the plain-torch versions with the same signatures.
Triton is imported lazily so that `import kernels` works without it.
"""
from kernels.reference import paged_attention_ref, store_kv_ref


def paged_attention(*args, **kwargs):
    from kernels.triton_attention import paged_attention as impl
    return impl(*args, **kwargs)


def store_kv(*args, **kwargs):
    from kernels.triton_attention import store_kv as impl
    return impl(*args, **kwargs)


__all__ = ["paged_attention", "store_kv", "paged_attention_ref", "store_kv_ref"]
