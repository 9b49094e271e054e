"""The checks of a request against the model that the engine and the server share: token ids
within the vocabulary, a prompt that leaves room in the context. One definition, one message."""
from __future__ import annotations

from engine.errors import ParamError


def check_token_ids(ids, vocab_size: int, param: str = "prompt",
                    what: str = "prompt token ids") -> None:
    """Every id in [0, vocab_size); `what` names them in the message."""
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):  # C-speed scans of a long prompt
        bad = sorted({t for t in ids if not 0 <= t < vocab_size})
        raise ParamError(param, f"{what} must be in [0, {vocab_size}) (the model's "
                                f"vocabulary), got {bad[:8]}")


def check_prompt(ids: list[int], vocab_size: int, max_model_len: int) -> None:
    """A prompt the engine can take: not empty, known ids, shorter than the context."""
    if not ids:
        raise ParamError("prompt", "the prompt is empty")
    check_token_ids(ids, vocab_size)
    fit_max_tokens(len(ids), None, max_model_len)


def fit_max_tokens(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                   param: str = "max_tokens") -> int:
    """max_tokens for a prompt of this length: all the context leaves when None; an explicit
    value must fit beside the prompt (OpenAI's messages, which clients match on)."""
    if num_prompt_tokens >= max_model_len:
        raise ParamError("prompt", f"This model's maximum context length is {max_model_len} "
                                   f"tokens. However, your prompt has {num_prompt_tokens} "
                                   f"tokens.")
    if max_tokens is None:
        return max_model_len - num_prompt_tokens
    if max_tokens < 1:
        raise ParamError(param, f"{param} must be >= 1, got {max_tokens}")
    if num_prompt_tokens + max_tokens > max_model_len:
        raise ParamError(param, f"This model's maximum context length is {max_model_len} "
                                f"tokens. However, you requested "
                                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} "
                                f"in the prompt, {max_tokens} in the completion). Please "
                                f"reduce the length of the prompt or completion.")
    return max_tokens
