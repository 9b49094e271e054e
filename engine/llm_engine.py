"""LLMEngine: requests in, one step at a time (schedule, run, postprocess), outputs back."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from engine.beam_search import BeamSearchState, Hypothesis
from engine.block_manager import KVCacheManager
from engine.capacity import (CapacityPlan, blocks_for_budget, plan_for_config,
                             resolve_max_model_len)
from engine.config import EngineConfig, resolve_device, resolve_dtype
from engine.loader import GGUFFile, hf_config, hf_weights, resolve_model
from engine.model_runner import ModelRunner
from engine.models import CausalLM
from engine.output_processor import OutputProcessor
from engine.outputs import CompletionOutput, RequestOutput
from engine.quant import int4_dtype, quantize_model, resolve_quantization
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sampler import Sampler, compute_logprobs
from engine.sequence import Sequence, SequenceStatus
from engine.tokenizer import Tokenizer, load_tokenizer
from kernels import cpu as cpu_kernels

# The time of an attention multiply-add over a GEMM's, for the scheduler's prompt chunks
# beside decodes (engine/scheduler.py). CPU: kvserve's tiled attention runs ~125 GFLOP/s
# against ~400 for the fused step's packed GEMMs on a 2-core EPYC (SmolLM2; bench/RESULTS.md).
ATTENTION_COST = {"cpu": 3.0, "cuda": 1.0}

logger = logging.getLogger("kvserve.engine")


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]                 # beam search: the live beams
    beam: BeamSearchState | None = None
    first: Sequence | None = None        # the sequence that was scheduled first
    prompt_logprobs: list | None = None  # the runner's raw rows, [None] first
    formatted_prompt_logprobs: list | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig, model: CausalLM, tokenizer: Tokenizer | None,
                 model_name: str = "model"):
        self.config = config
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.runner = ModelRunner(config, model)
        self.kv = KVCacheManager(config.num_kv_blocks, config.block_size,
                                 sliding_window=config.model.sliding_window,
                                 enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.prefill_chunk,
            config.model.attention_span(ATTENTION_COST[config.device.type]))
        self.requests: dict[str, _Request] = {}
        eos = set(config.model.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.sampler = Sampler(frozenset(eos))
        self.output = OutputProcessor(tokenizer, frozenset(eos), config.max_model_len)
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "computed_tokens": 0,
                         "steps": 0}

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.output.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids) -> None:
        self.output.eos_token_ids = self.sampler.eos_token_ids = frozenset(ids)

    @property
    def stats(self) -> dict:
        """Counters since start plus the current state (the server exports these)."""
        kv, pool = self.kv, self.kv.pool
        return {**self.counters,
                "num_requests": len(self.requests),
                "num_running": len(self.scheduler.running),
                "num_waiting": len(self.scheduler.waiting),
                "num_preemptions": self.scheduler.num_preemptions,
                "kv_cache_usage": kv.usage,
                "kv_blocks_used": pool.num_used,
                "kv_blocks_cached_free": pool.num_cached_free,
                "kv_blocks_total": pool.num_usable,
                "prefix_cache_queries": kv.prefix_queries,
                "prefix_cache_hits": kv.prefix_hits,
                "prefix_cache_evictions": pool.num_evictions}

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_args(cls, model: str | None = None, dtype: str | torch.dtype = "auto",
                  device: str = "auto", block_size: int = 16, num_kv_blocks: int | None = None,
                  max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                  prefill_chunk: int = 512, max_model_len: int | None = None,
                  enable_prefix_caching: bool = True,
                  attention_backend: str = "auto", load_format: str = "auto",
                  kv_cache_memory: int | str | None = None, seed: int = 0,
                  quantization: str | None = None, enforce_eager: bool = False) -> "LLMEngine":
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
        num_blocks = num_kv_blocks or blocks_for_budget(model_cfg, dt, dev, block_size,
                                                        kv_cache_memory)
        max_model_len = resolve_max_model_len(model_cfg, num_blocks, block_size, max_model_len)
        config = EngineConfig(model=model_cfg, dtype=dt, device=dev, block_size=block_size,
                              num_kv_blocks=num_blocks, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens,
                              prefill_chunk=prefill_chunk,
                              max_model_len=max_model_len,
                              enable_prefix_caching=enable_prefix_caching,
                              attention_backend=attention_backend,
                              enforce_eager=enforce_eager, quantization=quantization)
        logger.info("KV cache: %d blocks × %d tokens = %d tokens, %.1f MiB", num_blocks,
                    block_size, num_blocks * block_size, config.kv_cache_bytes / 2**20)
        return cls(config, net, load_tokenizer(source), model_name=source.name)

    def capacity(self, seq_len: int | None = None) -> CapacityPlan:
        """Capacity planning numbers for this engine (what `kvserve info` prints)."""
        return plan_for_config(self.config, seq_len, self.model_name)

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
        vocab = self.config.model.vocab_size
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab}) (the model's vocabulary), "
                             f"got {sorted(params.stop_token_ids)}")
        width = params.beam_width if params.use_beam_search else params.n
        if width > self.config.max_num_seqs:
            name = "beam_width" if params.use_beam_search else "n"
            raise ValueError(f"{name} ({width}) exceeds max_num_seqs "
                             f"({self.config.max_num_seqs}): its sequences could never run "
                             f"together")
        if params.use_beam_search:
            seqs = [Sequence(request_id, 0, ids, params, arrival_time)]
            req = _Request(request_id, text, ids, params, seqs, BeamSearchState(seqs[0]))
        else:
            seqs = [Sequence(request_id, i, ids, params, arrival_time) for i in range(params.n)]
            req = _Request(request_id, text, ids, params, seqs)
        req.prompt_logprobs = seqs[0].prompt_logprobs
        req.first = seqs[0]
        self.requests[request_id] = req
        # n > 1: one sequence computes the prompt; the others fork from it (sharing its
        # blocks) when it samples its first token.
        for child in seqs[1:]:
            child.status = SequenceStatus.PENDING
        seqs[0].pending_children = seqs[1:]
        self.scheduler.add(seqs[0])

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
        seqs, logits = self.runner.execute(sched.seqs, sched.num_tokens, sched.copies)
        for seq, n in zip(sched.seqs, sched.num_tokens):
            seq.num_computed_tokens += n
            self.kv.cache_blocks(seq)
            self.kv.evict_out_of_window(seq)
        self.counters["steps"] += 1
        self.counters["computed_tokens"] += sched.total_tokens
        if not seqs:
            return []
        if any(seq.pending_children for seq in seqs):
            seqs, logits = self._fork(seqs, logits)
        self.counters["generation_tokens"] += len(seqs)
        for seq in seqs:
            if seq.num_output_tokens == 0 and seq.index == 0:
                self.counters["prompt_tokens"] += seq.num_prompt_tokens
        touched: dict[str, _Request] = {}
        if any(seq.params.use_beam_search for seq in seqs):
            seqs, logits = self._beam_candidates(seqs, logits, touched)
        if seqs:
            self._sample(seqs, logits, touched)
        outputs = []
        for req in touched.values():
            if req.beam is not None:
                if not req.beam.ready():
                    continue
                self._beam_step(req)
                if not req.beam.done:
                    continue
            res = self._output(req)
            if res.finished:
                del self.requests[req.request_id]
            outputs.append(res)
        return outputs

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor,
                touched: dict[str, _Request]) -> None:
        out = self.sampler(logits, seqs)
        tokens, logprobs = out.tokens.tolist(), out.logprobs.tolist()
        tops = None
        if out.top_ids is not None:
            tops = (out.ranks.tolist(), out.top_ids.tolist(), out.top_logprobs.tolist())
        for row, seq in enumerate(seqs):
            top = None
            if tops and seq.params.logprobs is not None:
                k = seq.params.logprobs
                top = (tops[0][row], tops[1][row][:k], tops[2][row][:k])
            reason = self.output.append(seq, tokens[row], logprobs[row], top)
            if reason:
                self.scheduler.finish(seq, reason)
            touched[seq.request_id] = self.requests[seq.request_id]

    # ---------------------------------------------------------------- beam search

    def _beam_candidates(self, seqs: list[Sequence], logits: torch.Tensor,
                         touched: dict[str, _Request]):
        """Give every beam row its top 2B next tokens; return the other rows."""
        beam = [i for i, s in enumerate(seqs) if s.params.use_beam_search]
        rest = [i for i, s in enumerate(seqs) if not s.params.use_beam_search]
        k = max(max(2 * seqs[i].params.beam_width, seqs[i].params.logprobs or 0) for i in beam)
        lp = compute_logprobs(logits[torch.tensor(beam, device=logits.device)])
        top_lp, top_ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
        for row, i in enumerate(beam):
            seq = seqs[i]
            seq.beam_candidates = (top_ids[row], top_lp[row])
            touched[seq.request_id] = self.requests[seq.request_id]
        if not rest:
            return [], None
        return [seqs[i] for i in rest], logits[torch.tensor(rest, device=logits.device)]

    def _beam_step(self, req: _Request) -> None:
        st, p = req.beam, req.params

        def classify(beam: Sequence, token: int) -> str:
            # the same rules as a sampled token's (OutputProcessor.append): a stop token
            # before min_tokens is a candidate nobody takes, as the sampler masks it
            if not self.output.stop_token(p, token):
                return "keep"
            return "close" if self.output.may_stop(p, beam.num_output_tokens + 1) else "drop"

        keep, close = st.rank(classify)
        for c in close:
            st.finished.append(Hypothesis(c.beam.output_token_ids + [c.token], c.score, "stop",
                                          self._beam_logprobs(c.beam, c.token, c.logprob)))
        kids: dict[int, list] = {}
        for c in keep:
            kids.setdefault(c.beam.seq_id, []).append(c)
        live = []
        for beam in st.live:
            mine = kids.get(beam.seq_id, [])
            if not mine:
                self.scheduler.finish(beam, "abort")  # pruned: its blocks go back
                continue
            for c in mine[1:]:  # fork before the beam itself moves on
                child = Sequence(req.request_id, st.next_index(), req.prompt_token_ids, p,
                                 beam.arrival_time)
                self.scheduler.fork(beam, child)
                live.append((child, c))
            live.append((beam, mine[0]))
        st.live = []
        for seq, c in live:
            top = self._beam_top(c.beam, c.token)
            self.output.append_token(seq, c.token, c.logprob, top)
            seq.beam_candidates = None
            if (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) \
                    or seq.num_tokens >= self.config.max_model_len:
                st.finished.append(Hypothesis(seq.output_token_ids, seq.cumulative_logprob,
                                              "length", seq.logprobs))
                self.scheduler.finish(seq, "length")
            else:
                st.live.append(seq)
        for seq in st.live:  # parents' candidates are consumed too
            seq.beam_candidates = None
        if st.should_stop():
            for seq in st.live:
                self.scheduler.finish(seq, "length")
            st.live, st.done = [], True
        req.seqs = st.live

    @staticmethod
    def _beam_top(beam: Sequence, token: int):
        """(rank, top ids, top logprobs) of token among beam's candidates, for logprobs."""
        if beam.logprobs is None:
            return None
        ids, lps = beam.beam_candidates
        k = beam.params.logprobs
        return ids.index(token) + 1, ids[:k], lps[:k]

    def _beam_logprobs(self, beam: Sequence, token: int, logprob: float):
        if beam.logprobs is None:
            return None
        return beam.logprobs + [self.output.entry(token, logprob, self._beam_top(beam, token))]

    def _fork(self, seqs: list[Sequence], logits: torch.Tensor):
        """Children of n > 1 start from their parent's prompt: shared blocks, same logits."""
        rows, out = [], []
        for row, seq in enumerate(seqs):
            rows.append(row)
            out.append(seq)
            for child in seq.pending_children:
                self.scheduler.fork(seq, child)
                rows.append(row)
                out.append(child)
            seq.pending_children = []
        return out, logits[torch.tensor(rows, device=logits.device)]

    def _output(self, req: _Request) -> RequestOutput:
        raw = req.prompt_logprobs
        if raw is not None and req.formatted_prompt_logprobs is None \
                and len(raw) == len(req.prompt_token_ids):
            req.formatted_prompt_logprobs = self.output.prompt_logprobs(raw)
        if req.beam is not None:
            skip = req.params.skip_special_tokens
            outs = [CompletionOutput(i, self.output.text(h.token_ids, skip), h.token_ids,
                                     h.cumulative_logprob, h.logprobs,
                                     h.finish_reason if req.beam.done else "abort")
                    for i, h in enumerate(req.beam.best(req.params.n))]
            return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs,
                                 finished=True, prompt_logprobs=req.formatted_prompt_logprobs,
                                 first_scheduled_time=req.first.first_scheduled_time)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids,
                             [self.output.completion(seq) for seq in req.seqs],
                             finished=all(s.is_finished for s in req.seqs),
                             prompt_logprobs=req.formatted_prompt_logprobs,
                             first_scheduled_time=req.first.first_scheduled_time)
