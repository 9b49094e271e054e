"""One request inside the engine: the sequences it runs as and what its output is made of."""
from __future__ import annotations

from engine.beam_search import BeamSearchState
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, SequenceStatus


class Request:
    """n > 1: one sequence computes the prompt and the others fork from it (sharing its
    blocks) when it samples its first token; until then they are its `pending_children`.
    Beam search: the live beams, which come and go as the search forks and prunes."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, arrival_time: float | None = None, grammar=None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        width = 1 if params.use_beam_search else params.n
        self._seqs = [Sequence(request_id, i, prompt_token_ids, params, arrival_time)
                      for i in range(width)]
        self.first = self._seqs[0]  # the sequence that computes the prompt
        self.first.grammar = grammar  # structured output: n > 1 children and beams fork it
        self.beam = BeamSearchState(self.first) if params.use_beam_search else None
        for child in self._seqs[1:]:
            child.status = SequenceStatus.PENDING
        self.first.pending_children = self._seqs[1:]
        # the runner's raw rows for the prompt ([None] first), formatted once complete
        self.prompt_logprobs = self.first.prompt_logprobs
        self.formatted_prompt_logprobs: list | None = None

    @property
    def seqs(self) -> list[Sequence]:
        """The sequences that hold blocks or may still run."""
        return self.beam.live if self.beam is not None else self._seqs

    @property
    def finished(self) -> bool:
        if self.beam is not None:
            return self.beam.done
        return all(s.is_finished for s in self._seqs)
