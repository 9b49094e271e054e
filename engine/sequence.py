"""A sequence being generated: progress is counters over its token list."""
from __future__ import annotations

import enum
import itertools
import time

import torch

from engine.outputs import FinishReason
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    PENDING = "pending"    # a child of n > 1 waiting for its parent's prompt to fork from
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    """One output being generated. Its fields are grouped by the one component that writes
    them; everyone else only reads."""

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, arrival_time: float | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index                    # which of the request's n outputs
        self.params = params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        # tokens: the prompt, then what the output processor (or beam search) appends
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        # the scheduler: place, progress, forks (engine/scheduler.py)
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_computed_tokens = 0          # tokens whose K/V are in the cache
        self.num_preemptions = 0
        # speculative decoding: this step's draft tokens (engine/spec_decode.py proposes, the
        # scheduler cuts them to what fits; they follow token_ids in the forward)
        self.spec_token_ids: list[int] = []
        self.first_scheduled_time: float | None = None  # time.monotonic() at first admission
        self.pending_children: list[Sequence] = []  # n > 1: forked at this seq's first sample
        # the KV cache manager: the block table (engine/block_manager.py)
        self.block_ids: list[int] = []         # block table; NULL_BLOCK where evicted
        self.block_hashes: list[int] = []      # chained hash of each full block of token_ids
        self.num_cached_blocks = 0             # leading blocks published to the prefix cache
        self.num_evicted_blocks = 0            # leading blocks freed by the sliding window
        # the runner: the prompt's teacher-forced scores, [None] first (engine/model_runner.py)
        self.prompt_logprobs: list | None = [None] if params.prompt_logprobs is not None else None
        # the output processor: text and stops (engine/output_processor.py)
        self.detok = None                      # IncrementalDetokenizer, made on first token
        self.stop_reason: int | str | None = None   # the stop token id or stop string
        self.stop_text_end: int | None = None  # where a matched stop string starts in the text
        # structured output: the grammar matcher (engine/structured_output.py masks the
        # logits by it, the output processor advances it, a fork copies it)
        self.grammar = None
        # the sampler: seeded draws and penalty counts (engine/sampler.py)
        self.generators: list[torch.Generator] = []   # seeded rows' (one per draft position)
        self.sampler_state: object | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}#{self.index}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})")
