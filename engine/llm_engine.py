"""LLMEngine: requests in, one step at a time (schedule, run, postprocess), outputs back."""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch

from engine.block_manager import KVCacheManager
from engine.config import EngineConfig, ModelConfig, parse_size, resolve_device, resolve_dtype
from engine.loader import GGUFFile, ModelSource, hf_config, hf_weights, resolve_model
from engine.model_runner import ModelRunner
from engine.models import CausalLM
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

logger = logging.getLogger("kvserve.engine")

DEFAULT_CPU_KV_MEMORY = "1GiB"
GPU_MEMORY_UTILIZATION = 0.9


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer | None] = field(default_factory=list)


class LLMEngine:
    def __init__(self, config: EngineConfig, model: CausalLM, tokenizer: Tokenizer | None,
                 model_name: str = "model"):
        self.config = config
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.runner = ModelRunner(config, model)
        self.kv = KVCacheManager(config.num_kv_blocks, config.block_size)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.requests: dict[str, _Request] = {}
        eos = set(config.model.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0}

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_args(cls, model: str | None = None, dtype: str | torch.dtype = "auto",
                  device: str = "auto", block_size: int = 16, num_kv_blocks: int | None = None,
                  max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                  max_model_len: int | None = None, enable_prefix_caching: bool = True,
                  attention_backend: str = "auto", load_format: str = "auto",
                  kv_cache_memory: int | str | None = None, seed: int = 0) -> "LLMEngine":
        source = resolve_model(model)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {load_format!r}")
        if attention_backend == "auto":
            attention_backend = "triton" if dev.type == "cuda" else "torch"
        if attention_backend == "triton" and dev.type != "cuda" \
                and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("attention_backend='triton' on the CPU needs TRITON_INTERPRET=1 in "
                             "the environment (slow; for tests); use 'torch' on the CPU")
        gguf = GGUFFile(source.path) if source.kind == "gguf" else None
        model_cfg = gguf.config() if gguf else hf_config(source.path)
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        max_positions = max_model_len or model_cfg.max_position_embeddings
        with torch.device(dev):
            net = CausalLM(model_cfg, max_positions, dev)
        if load_format == "dummy":
            for p in net.parameters():
                p.normal_(0, 0.02)
        else:
            net.load_weights(gguf.weights(model_cfg) if gguf else hf_weights(source.path))
        net = net.to(dt)
        net.rope.to(torch.float32)
        logger.info("loaded %s (%s, %.0fM params) in %.1fs", source.name, model_cfg.architecture,
                    sum(p.numel() for p in net.parameters()) / 1e6, time.perf_counter() - t0)
        num_blocks = num_kv_blocks or _blocks_for_budget(model_cfg, dt, dev, block_size,
                                                         kv_cache_memory)
        capacity = (num_blocks - 1) * block_size
        if max_model_len is None:
            max_model_len = min(model_cfg.max_position_embeddings, capacity)
        elif max_model_len > capacity:
            raise ValueError(f"max_model_len {max_model_len} needs more KV cache than the "
                             f"{capacity} tokens available; raise num_kv_blocks/kv_cache_memory")
        config = EngineConfig(model=model_cfg, dtype=dt, device=dev, block_size=block_size,
                              num_kv_blocks=num_blocks, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens,
                              max_model_len=max_model_len,
                              enable_prefix_caching=enable_prefix_caching,
                              attention_backend=attention_backend)
        logger.info("KV cache: %d blocks × %d tokens = %d tokens, %.1f MiB", num_blocks,
                    block_size, num_blocks * block_size, config.kv_cache_bytes / 2**20)
        return cls(config, net, load_tokenizer(source), model_name=source.name)

    # ---------------------------------------------------------------- requests

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None, arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass token ids as the prompt")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        self._validate_prompt(ids)
        if params.use_beam_search:
            raise ValueError("use_beam_search is not supported yet")
        seqs = [Sequence(request_id, i, ids, params, arrival_time) for i in range(params.n)]
        detoks = [IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
                  if self.tokenizer else None for _ in seqs]
        self.requests[request_id] = _Request(request_id, text, ids, params, seqs, detoks)
        for seq in seqs:
            self.scheduler.add(seq)

    def _validate_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.config.model.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.config.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, but this model's maximum "
                             f"context length is {self.config.max_model_len} tokens")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        return self._output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---------------------------------------------------------------- one step

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched:
            return []
        seqs, tokens, logprobs = self.runner.execute(sched.seqs, sched.num_tokens)
        for seq, n in zip(sched.seqs, sched.num_tokens):
            seq.num_computed_tokens += n
        self.stats["steps"] += 1
        self.stats["prompt_tokens"] += sched.total_tokens - len(seqs)
        self.stats["generation_tokens"] += len(seqs)
        touched: dict[str, _Request] = {}
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            seq.token_ids.append(token)
            seq.cumulative_logprob += logprob
            req = self.requests[seq.request_id]
            detok = req.detoks[seq.index]
            if detok is not None:
                detok.step(seq.output_token_ids)
            reason = self._finish_reason(seq, token)
            if reason:
                self.scheduler.finish(seq, reason)
            touched[seq.request_id] = req
        outputs = []
        for req in touched.values():
            out = self._output(req)
            if out.finished:
                del self.requests[req.request_id]
            outputs.append(out)
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if seq.num_output_tokens > p.min_tokens:  # token index >= min_tokens may stop
            if token in p.stop_token_ids:
                return "stop"
            if not p.ignore_eos and token in self.eos_token_ids:
                return "stop"
        if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            return "length"
        if seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    def _output(self, req: _Request) -> RequestOutput:
        outs = []
        for seq, detok in zip(req.seqs, req.detoks):
            outs.append(CompletionOutput(
                index=seq.index,
                text=detok.text if detok else "",
                token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob,
                finish_reason=seq.finish_reason,
            ))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs,
                             finished=all(s.is_finished for s in req.seqs))


def _blocks_for_budget(cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                       block_size: int, budget: int | str | None) -> int:
    if budget is None:
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            budget = int(free - (1 - GPU_MEMORY_UTILIZATION) * total)
        else:
            budget = DEFAULT_CPU_KV_MEMORY
    per_block = cfg.kv_bytes_per_token(dtype) * block_size
    return max(2, math.floor(parse_size(budget) / per_block))
