"""When a sequence ends, written once: the sampler masks what may not end it yet (min_tokens),
the output processor ends sampled sequences by it, and beam search closes or drops candidates
by it."""
from __future__ import annotations

from engine.outputs import FinishReason
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


class StopRules:
    def __init__(self, eos_token_ids=frozenset(), max_model_len: int | None = None):
        self.eos_token_ids = frozenset(eos_token_ids)  # the model's EOS and the tokenizer's
        self.max_model_len = max_model_len

    def stop_tokens(self, p: SamplingParams) -> set[int]:
        """The tokens that end an output of these params: its stop ids and, unless it ignores
        EOS, the EOS ids."""
        return set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)

    def is_stop_token(self, p: SamplingParams, token: int) -> bool:
        return token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)

    @staticmethod
    def may_stop(p: SamplingParams, num_output_tokens: int) -> bool:
        """An output of this many tokens (the new one included) may end: min_tokens holds."""
        return num_output_tokens > p.min_tokens

    def length_reason(self, seq: Sequence) -> FinishReason | None:
        """LENGTH once seq has max_tokens outputs or fills the context."""
        p = seq.params
        if (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) \
                or (self.max_model_len is not None and seq.num_tokens >= self.max_model_len):
            return FinishReason.LENGTH
        return None
