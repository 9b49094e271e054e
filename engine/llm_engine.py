"""LLMEngine: requests in, one step at a time (schedule, run, update, sample), outputs back.

A step, file by file: Scheduler.schedule() picks the sequences and token counts and allocates
their KV blocks (engine/scheduler.py, engine/block_manager.py); ModelRunner.execute() runs the
flat batch through the model and attention (engine/model_runner.py, kernels/); Scheduler.update()
records what the step computed and forks n > 1 children; BeamSearch takes the beams' rows
(engine/beam_search.py), the Sampler picks the other rows' tokens (engine/sampler.py) and the
OutputProcessor appends them, stops sequences and builds each request's RequestOutput
(engine/output_processor.py).
"""
from __future__ import annotations

import functools
import itertools
import logging
import time

import torch

from engine import tp
from engine.beam_search import BeamSearch
from engine.block_manager import KVCacheManager
from engine.builder import build
from engine.capacity import CapacityPlan, plan_for_config
from engine.config import EngineConfig
from engine.errors import ParamError
from engine.kv_state import KVSnapshot
from engine.limits import check_prompt, check_token_ids
from engine.model_runner import ModelRunner
from engine.models import CausalLM
from engine.output_processor import OutputProcessor
from engine.outputs import FinishReason, RequestOutput
from engine.request import Request
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence
from engine.spec_decode import SpecDecoder
from engine.stop_rules import StopRules
from engine.structured_output import StructuredOutputs
from engine.tokenizer import Tokenizer

# The time of an attention multiply-add over a GEMM's, for the scheduler's prompt chunks
# beside decodes (engine/scheduler.py). CPU: kvserve's tiled attention runs ~125 GFLOP/s
# against ~400 for the fused step's packed GEMMs on a 2-core EPYC (SmolLM2; bench/RESULTS.md).
ATTENTION_COST = {"cpu": 3.0, "cuda": 1.0}

logger = logging.getLogger("kvserve.engine")


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
        self.requests: dict[str, Request] = {}
        eos = set(config.model.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.stop_rules = StopRules(eos, config.max_model_len)
        self.sampler = Sampler(self.stop_rules)
        self.output = OutputProcessor(tokenizer, self.stop_rules)
        self.beam_search = BeamSearch(self.scheduler, self.output)
        self.structured = StructuredOutputs(tokenizer, config.model.vocab_size,
                                            self.stop_rules.eos_token_ids)
        self.spec = None
        if config.speculative is not None:
            draft = None
            if config.speculative.method == "draft_model":
                from engine.draft_model import DraftProposer
                draft = DraftProposer(config.speculative.model, config)
            self.spec = SpecDecoder(config.speculative, config.max_model_len, draft)
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "computed_tokens": 0,
                         "steps": 0}

    @staticmethod
    @functools.wraps(build, assigned=("__module__",))  # inspect.signature shows build()'s
    def from_args(*args, **kwargs) -> "LLMEngine":
        """An engine built from what a user asks for: the arguments of engine.builder.build."""
        return LLMEngine(*build(*args, **kwargs))

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.stop_rules.eos_token_ids

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
                "prefix_cache_evictions": pool.num_evictions,
                **(self.spec.stats if self.spec is not None else {})}

    def kv_state(self, number: int = 0) -> KVSnapshot:
        """A copy of the KV cache's blocks and tables (the inspector's); take it between two
        steps, on the thread that steps."""
        return KVSnapshot.take(self.kv, self.scheduler, self.counters["steps"], number)

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
        vocab = self.config.model.vocab_size
        check_prompt(ids, vocab, self.config.max_model_len)
        check_token_ids(params.stop_token_ids, vocab, "stop_token_ids", "stop_token_ids")
        width = params.beam_width if params.use_beam_search else params.n
        if width > self.config.max_num_seqs:
            name = "beam_width" if params.use_beam_search else "n"
            raise ParamError(name, f"{name} ({width}) exceeds max_num_seqs "
                             f"({self.config.max_num_seqs}): its sequences could never run "
                             f"together")
        grammar = None
        if params.structured_outputs is not None:  # compiled (or refused) before anything runs
            grammar = self.structured.matcher(params.structured_outputs)
        req = Request(request_id, text, ids, params, arrival_time, grammar)
        self.requests[request_id] = req
        self.scheduler.add(req.first)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.ABORT)
        return self.output.request_output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def check_health(self) -> None:
        """Raises if the engine cannot step: a tensor-parallel rank is gone."""
        if self.runner.tp and (why := tp.worker_failure()) is not None:
            raise RuntimeError(why)

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do otherwise)."""
        if self.runner.tp:
            tp.shutdown()

    # ---------------------------------------------------------------- one step

    def step(self) -> list[RequestOutput]:
        self.check_health()
        with self.runner.threads():
            return self._step()

    def _step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()  # the step's cost, drafting included (the adaptive fit)
        if self.spec is not None:
            self.spec.propose(self.scheduler.running)  # drafts, cut by schedule() to what fits
        sched = self.scheduler.schedule()
        if not sched:
            return []
        decode_only = self.spec is not None and all(
            s.num_tokens - s.num_computed_tokens == 1 for s in sched.seqs)
        sampling, logits = self.runner.execute(sched.seqs, sched.num_tokens, sched.copies)
        elapsed = time.perf_counter() - t0
        seqs, rows = self.scheduler.update(sched, sampling)
        self._count(sched, seqs)
        if seqs:
            outputs = self._finish_step(seqs, rows, sampling, logits)
        else:
            outputs = []
        if self.spec is not None:
            self.spec.end_step(self.scheduler.running, sched.total_tokens, elapsed, decode_only)
        return outputs

    def _finish_step(self, seqs: list[Sequence], rows: list[int], sampling: list[Sequence],
                     logits: torch.Tensor) -> list[RequestOutput]:
        width = [1 + len(s.spec_token_ids) for s in sampling]  # logits rows of each
        if max(width) > 1:  # drafts to verify: a sequence's rows are consecutive
            first = [0, *itertools.accumulate(width)]
            idx = [i for r in rows for i in range(first[r], first[r + 1])]
            seqs = [seq for seq, r in zip(seqs, rows) for _ in range(width[r])]
            logits = logits[torch.tensor(idx, device=logits.device)]
        elif len(rows) > len(sampling):  # n > 1 children share their parent's row
            logits = logits[torch.tensor(rows, device=logits.device)]
        self.structured.apply(seqs, logits)  # constrained rows: what their grammar allows
        touched = {seq.request_id: self.requests[seq.request_id] for seq in seqs}
        if any(seq.params.use_beam_search for seq in seqs):
            beams = {rid: req.beam for rid, req in touched.items() if req.beam is not None}
            seqs, logits = self.beam_search.take_candidates(seqs, logits, beams)
        if seqs:
            self._sample(seqs, logits)
        outputs = []
        for req in touched.values():
            if req.beam is not None:  # a beam request moves once all its beams have scores
                if not req.beam.ready():
                    continue
                self.beam_search.step(req.beam)
                if not req.beam.done:
                    continue
            out = self.output.request_output(req)
            if out.finished:
                del self.requests[req.request_id]
            outputs.append(out)
        return outputs

    def _count(self, sched: SchedulerOutput, seqs: list[Sequence]) -> None:
        self.counters["steps"] += 1
        self.counters["computed_tokens"] += sched.total_tokens
        self.counters["generation_tokens"] += len(seqs)
        self.counters["prompt_tokens"] += sum(seq.num_prompt_tokens for seq in seqs
                                              if seq.num_output_tokens == 0 and seq.index == 0)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        # a sequence with k drafts has k + 1 consecutive rows (offsets 0..k)
        offsets = None
        if self.spec is not None:
            offsets = [0] * len(seqs)
            for i in range(1, len(seqs)):
                if seqs[i] is seqs[i - 1]:
                    offsets[i] = offsets[i - 1] + 1
        out = self.sampler(logits, seqs, offsets)
        tokens, logprobs = out.tokens.tolist(), out.logprobs.tolist()
        tops = None
        if out.top_ids is not None:
            tops = (out.ranks.tolist(), out.top_ids.tolist(), out.top_logprobs.tolist())
        row = 0
        while row < len(seqs):
            seq = seqs[row]
            drafts = seq.spec_token_ids
            accepted = 0  # the drafts taken: each appended token equal to its draft, in order
            for j in range(len(drafts) + 1):
                top = None
                if tops and seq.params.logprobs is not None:
                    k = seq.params.logprobs
                    top = (tops[0][row + j], tops[1][row + j][:k], tops[2][row + j][:k])
                token = tokens[row + j]
                if reason := self.output.append(seq, token, logprobs[row + j], top):
                    self.scheduler.finish(seq, reason)
                if j == len(drafts) or token != drafts[j]:
                    break
                accepted += 1
                if reason:
                    break
            if drafts:
                self.counters["generation_tokens"] += j  # _count counted one a sequence
                self.spec.record(seq, len(drafts), accepted)
                self.scheduler.accept_drafts(seq, accepted)
            row += len(drafts) + 1
