"""What generate() returns (vLLM's shapes, so users know them)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.StrEnum):
    """Why an output ended (OpenAI's finish_reason). A str: `== "stop"` and json hold."""
    STOP = "stop"          # EOS, a stop token id or a stop string
    LENGTH = "length"      # max_tokens, or the context is full
    ABORT = "abort"        # cancelled (client gone, shutdown, pruned beam)
    TIMEOUT = "timeout"    # the server's --request-timeout


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None          # 1 = the most likely token
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None = None  # per output token, when asked for
    finish_reason: FinishReason | None = None   # None while running
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # first entry None
    first_scheduled_time: float | None = None   # time.monotonic() when it first ran
