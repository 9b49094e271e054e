"""Typed results: frozen dataclasses over the JSON the server sends, each keeping it as `.raw`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _raw():
    return field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def parse(cls, d: dict | None) -> Usage | None:
        if not d:
            return None
        prompt, completion = int(d.get("prompt_tokens") or 0), int(d.get("completion_tokens") or 0)
        return cls(prompt, completion, int(d.get("total_tokens") or prompt + completion))


@dataclass(frozen=True)
class CompletionChoice:
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict | None = None
    stop_reason: int | str | None = None

    @classmethod
    def parse(cls, d: dict) -> CompletionChoice:
        return cls(d.get("index", 0), d.get("text") or "", d.get("finish_reason"),
                   d.get("logprobs"), d.get("stop_reason"))


@dataclass(frozen=True)
class Completion:
    """A /v1/completions response; `.text` is the first choice's."""
    id: str
    model: str
    created: int
    choices: tuple[CompletionChoice, ...]
    usage: Usage | None
    raw: dict[str, Any] = _raw()

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @classmethod
    def parse(cls, d: dict) -> Completion:
        return cls(d.get("id", ""), d.get("model", ""), d.get("created", 0),
                   tuple(CompletionChoice.parse(c) for c in d.get("choices") or ()),
                   Usage.parse(d.get("usage")), d)


@dataclass(frozen=True)
class Message:
    role: str
    content: str | None


@dataclass(frozen=True)
class ChatChoice:
    index: int
    message: Message
    finish_reason: str | None
    logprobs: dict | None = None

    @classmethod
    def parse(cls, d: dict) -> ChatChoice:
        m = d.get("message") or {}
        return cls(d.get("index", 0), Message(m.get("role", "assistant"), m.get("content")),
                   d.get("finish_reason"), d.get("logprobs"))


@dataclass(frozen=True)
class ChatCompletion:
    """A /v1/chat/completions response; `.content` is the first choice's message text."""
    id: str
    model: str
    created: int
    choices: tuple[ChatChoice, ...]
    usage: Usage | None
    raw: dict[str, Any] = _raw()

    @property
    def content(self) -> str:
        return (self.choices[0].message.content or "") if self.choices else ""

    @classmethod
    def parse(cls, d: dict) -> ChatCompletion:
        return cls(d.get("id", ""), d.get("model", ""), d.get("created", 0),
                   tuple(ChatChoice.parse(c) for c in d.get("choices") or ()),
                   Usage.parse(d.get("usage")), d)


@dataclass(frozen=True)
class CompletionDelta:
    """New text of one choice in a stream chunk; finish_reason is set on its last delta."""
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict | None = None
    stop_reason: int | str | None = None


@dataclass(frozen=True)
class CompletionChunk:
    """One event of a streamed completion. The last chunk before the end may have no choices
    and carry only `usage` (stream_options.include_usage)."""
    id: str
    model: str
    choices: tuple[CompletionDelta, ...]
    usage: Usage | None
    raw: dict[str, Any] = _raw()

    @property
    def text(self) -> str:
        """All new text of this chunk (for n == 1: the delta)."""
        return "".join(c.text for c in self.choices)

    @classmethod
    def parse(cls, d: dict) -> CompletionChunk:
        choices = tuple(CompletionDelta(c.get("index", 0), c.get("text") or "",
                                        c.get("finish_reason"), c.get("logprobs"),
                                        c.get("stop_reason"))
                        for c in d.get("choices") or ())
        return cls(d.get("id", ""), d.get("model", ""), choices, Usage.parse(d.get("usage")), d)


@dataclass(frozen=True)
class ChatDelta:
    """New content of one choice; `role` is set on the first delta, finish_reason on the last."""
    index: int
    content: str
    role: str | None
    finish_reason: str | None
    logprobs: dict | None = None


@dataclass(frozen=True)
class ChatChunk:
    """One event of a streamed chat completion (see CompletionChunk)."""
    id: str
    model: str
    choices: tuple[ChatDelta, ...]
    usage: Usage | None
    raw: dict[str, Any] = _raw()

    @property
    def content(self) -> str:
        return "".join(c.content for c in self.choices)

    @classmethod
    def parse(cls, d: dict) -> ChatChunk:
        choices = []
        for c in d.get("choices") or ():
            delta = c.get("delta") or {}
            choices.append(ChatDelta(c.get("index", 0), delta.get("content") or "",
                                     delta.get("role"), c.get("finish_reason"),
                                     c.get("logprobs")))
        return cls(d.get("id", ""), d.get("model", ""), tuple(choices),
                   Usage.parse(d.get("usage")), d)
