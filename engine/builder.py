"""Building an engine from what a user asks for: resolve the model, device, dtype, attention
backend and weight format, load and quantize the weights, size the KV pool. `LLMEngine.from_args`
is this with the engine made from the parts."""
from __future__ import annotations

import logging
import os
import time
from typing import NamedTuple

import torch

from engine import tp
from engine.capacity import blocks_for_budget, plan_for_config, resolve_max_model_len
from engine.config import EngineConfig, resolve_device, resolve_dtype
from engine.loader import GGUFFile, hf_config, hf_weights, resolve_model
from engine.models import CausalLM
from engine.quant import int4_dtype, quantize_model, resolve_quantization
from engine.spec_decode import SpeculativeConfig
from engine.tokenizer import Tokenizer, load_tokenizer
from kernels import cpu as cpu_kernels
from kernels import kvquant

logger = logging.getLogger("kvserve.engine")


def kv_saving(config: EngineConfig) -> str:
    """', int8: 11,880 B per token against 23,040 B in bfloat16 (1.94x the tokens per byte)'
    for the startup log (the capacity plan's numbers); empty for an unquantized cache."""
    if config.kv_cache_dtype == "auto":
        return ""
    plan = plan_for_config(config)
    return (f", {config.kv_cache_dtype}: {plan.kv_bytes_per_token:,} B per token against "
            f"{plan.unquantized_kv_bytes_per_token:,} B in "
            f"{str(config.dtype).removeprefix('torch.')} ({plan.kv_quant_saving:.2f}x the tokens "
            f"per byte)")


class EngineParts(NamedTuple):
    config: EngineConfig
    model: CausalLM
    tokenizer: Tokenizer | None
    model_name: str


def build(model: str | None = None, dtype: str | torch.dtype = "auto", device: str = "auto",
          block_size: int = 16, num_kv_blocks: int | None = None, max_num_seqs: int = 64,
          max_num_batched_tokens: int = 2048, prefill_chunk: int = 512,
          max_model_len: int | None = None, enable_prefix_caching: bool = True,
          attention_backend: str = "auto", load_format: str = "auto",
          kv_cache_memory: int | str | None = None, seed: int = 0,
          quantization: str | None = None, enforce_eager: bool = False,
          speculative_config: dict | str | None = None,
          kv_cache_dtype: str | None = "auto", tensor_parallel_size: int = 1,
          tp_rank: int | None = None, tp_port: int | None = None) -> EngineParts:
    """Everything an LLMEngine is made of, from the arguments users give (`LLM(...)`,
    `kvserve serve`): the model found and loaded, the dtype, device, attention backend and
    weight format resolved, the KV pool sized.

    tensor_parallel_size > 1 (engine/tp.py): this process is rank 0 and spawns the other ranks
    on 127.0.0.1, unless torchrun-style variables (RANK, WORLD_SIZE, MASTER_ADDR/PORT) say a
    launcher started them; each rank loads only its part of the weights. tp_rank / tp_port:
    set by a spawned rank for itself."""
    tp_world, tp_spawn = tensor_parallel_size, False
    if tp_rank is None:
        launched = tp.env_world()
        if launched is not None and launched[1] > 1:
            if tensor_parallel_size not in (1, launched[1]):
                raise ValueError(f"tensor_parallel_size {tensor_parallel_size} but WORLD_SIZE="
                                 f"{launched[1]}: they must agree")
            tp_rank, tp_world = launched
        else:
            tp_rank, tp_spawn = 0, tensor_parallel_size > 1
    speculative = SpeculativeConfig.parse(speculative_config)
    kv_cache_dtype = kvquant.resolve_kv_cache_dtype(kv_cache_dtype)
    source = resolve_model(model)
    dev = resolve_device(device)
    auto_quant = quantization == "auto"
    quantization = None if auto_quant else resolve_quantization(quantization)
    dt = int4_dtype(dtype, dev) if quantization == "int4" else resolve_dtype(dtype, dev)
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be auto or dummy, got {load_format!r}")
    if attention_backend == "auto":
        attention_backend = "triton" if dev.type == "cuda" else \
            "cpu" if cpu_kernels.supports(dt) and cpu_kernels.available() else "torch"
    if attention_backend == "cpu":
        if dev.type != "cpu" or not cpu_kernels.supports(dt):
            raise ValueError("attention_backend='cpu' runs float32 or bfloat16 on the CPU")
        if not cpu_kernels.available():
            raise ValueError(f"attention_backend='cpu' needs kvserve's CPU kernels, which "
                             f"could not be built: {cpu_kernels.unavailable_reason()}")
    if attention_backend == "triton" and dev.type != "cuda" \
            and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("attention_backend='triton' on the CPU needs TRITON_INTERPRET=1 in "
                         "the environment (slow; for tests); use 'torch' on the CPU")
    gguf = GGUFFile(source.path) if source.kind == "gguf" else None
    model_cfg = gguf.config() if gguf else hf_config(source.path)
    shard = None
    if tp_world > 1:
        shard = tp.Shard.of(model_cfg, tp_rank, tp_world)  # errors name the numbers
        if quantization is not None:
            raise ValueError(f"quantization={quantization!r} runs in the fused CPU step, which "
                             f"tensor parallelism does not use; leave it unset")
        auto_quant, quantization, enforce_eager = False, None, True
    # int8 weights live in the fused CPU step (decode and short prefill chunks); longer
    # prefill chunks keep the model's own weights and torch's GEMMs.
    int8_ok = (dev.type == "cpu" and cpu_kernels.supports(dt) and not enforce_eager
               and cpu_kernels.available() and cpu_kernels.int8_shapes_ok(model_cfg))
    if auto_quant:  # `kvserve serve`'s default: packed step weights where VNNI runs them
        # (a Q4 file's own 4-bit blocks, int8 elsewhere), unless float32 was asked for (it
        # stays equal to transformers)
        quantization = "gguf" if (int8_ok and cpu_kernels.has_vnni()
                                  and (dtype == "auto" or dt != torch.float32)) else None
        logger.info("quantization auto -> %s", quantization or "none")
    elif quantization in ("int8", "gguf") and not int8_ok:
        raise ValueError(f"quantization={quantization!r} is the fused CPU step's weight "
                         "format: it needs "
                         "device='cpu', dtype float32 or bfloat16, no enforce_eager, GEMM "
                         "dimensions divisible by 32 (fused QKV rows by 16) and kvserve's "
                         "CPU kernels"
                         + (f" (not built: {cpu_kernels.unavailable_reason()})"
                            if not cpu_kernels.available() else ""))
    max_positions = max_model_len or model_cfg.max_position_embeddings
    # the pool is sized before the weights load, so that other ranks get the same numbers
    kv_cfg = shard.local_config(model_cfg) if shard else model_cfg  # a rank's KV heads
    num_blocks = num_kv_blocks or blocks_for_budget(kv_cfg, dt, dev, block_size,
                                                    kv_cache_memory, kv_cache_dtype)
    max_model_len = resolve_max_model_len(model_cfg, num_blocks, block_size, max_model_len)
    if tp_spawn:
        port = tp.free_port()
        tp.start_workers(tp_world, port, dict(
            model=model, dtype=dtype, device=device, block_size=block_size,
            num_kv_blocks=num_blocks, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, prefill_chunk=prefill_chunk,
            max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
            attention_backend=attention_backend, load_format=load_format, seed=seed,
            kv_cache_dtype=kv_cache_dtype, tensor_parallel_size=tp_world))
        tp_port = port
    if shard:
        tp.init(tp_rank, tp_world, dev, "127.0.0.1" if tp_port else None, tp_port)
        logger.info("tensor parallel rank %d of %d: query heads %d-%d, KV heads %d-%d, MLP "
                    "columns %d-%d", tp_rank, tp_world, shard.first_head,
                    shard.first_head + shard.num_heads - 1, shard.first_kv_head,
                    shard.first_kv_head + shard.num_kv_heads - 1,
                    tp_rank * shard.intermediate, (tp_rank + 1) * shard.intermediate - 1)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(dev):
        net = CausalLM(model_cfg, max_positions, dev, shard)
    if load_format == "dummy":
        for p in net.parameters():
            p.normal_(0, 0.02)
    else:
        weights = gguf.weights(model_cfg) if gguf else hf_weights(source.path)
        net.load_weights(tp.shard_weights(weights, model_cfg, shard) if shard else weights)
    num_params = sum(p.numel() for p in net.parameters())
    if quantization == "int4":
        quantize_model(net)  # from the float32 weights
    net = net.to(dt)
    net.rope.to(torch.float32)
    if dtype == "auto" and quantization != "int4":
        logger.info("dtype auto -> %s on %s%s", str(dt).removeprefix("torch."), dev.type,
                    " (the CPU has native bf16; --dtype float32 matches transformers "
                    "exactly)" if dt == torch.bfloat16 and dev.type == "cpu" else "")
    logger.info("loaded %s (%s, %.0fM params%s) in %.1fs", source.name,
                model_cfg.architecture, num_params / 1e6,
                f", {quantization}" if quantization else "", time.perf_counter() - t0)
    config = EngineConfig(model=model_cfg, dtype=dt, device=dev, block_size=block_size,
                          num_kv_blocks=num_blocks, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens,
                          prefill_chunk=prefill_chunk,
                          max_model_len=max_model_len,
                          enable_prefix_caching=enable_prefix_caching,
                          attention_backend=attention_backend,
                          enforce_eager=enforce_eager, quantization=quantization,
                          speculative=speculative, kv_cache_dtype=kv_cache_dtype,
                          tensor_parallel_size=tp_world)
    if shard:
        try:
            tp.check_agreement({
                "model": model_cfg, "dtype": str(dt), "block_size": block_size,
                "num_kv_blocks": num_blocks, "max_model_len": max_model_len,
                "kv_cache_dtype": kv_cache_dtype, "attention_backend": attention_backend})
        except ValueError:
            tp.leave()  # before exiting: a group torn down at exit can abort (std::terminate)
            raise
    logger.info("KV cache: %d blocks × %d tokens = %d tokens, %.1f MiB%s%s", num_blocks,
                block_size, num_blocks * block_size, config.kv_cache_bytes / 2**20,
                kv_saving(config),
                f" on each of {tp_world} ranks (its {shard.num_kv_heads} of "
                f"{model_cfg.num_kv_heads} KV heads)" if shard else "")
    return EngineParts(config, net, load_tokenizer(source), source.name)
