"""OpenAI-compatible request bodies (plus vLLM's extra sampling fields) and their mapping to
SamplingParams, and the response bodies the OpenAPI spec documents.

Unknown fields are ignored, as OpenAI's and vLLM's servers do; known fields are strict (no
"5" for 5, no 1.5 for an integer) and carry their bounds, so /openapi.json tells clients what
is accepted.  SamplingParams checks the same bounds again for the engine's own callers (its
module defines the numbers both use)."""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from engine import SamplingParams
from engine.errors import ParamError
from engine.sampling_params import (MAX_ABS_LENGTH_PENALTY, MAX_LOGPROBS, MAX_PENALTY,
                                    MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY,
                                    MIN_TEMPERATURE)
from server.fields import REQUEST, Text
from server.structured import ConstraintFields
from server.tools import (HermesCalls, Tool, ToolCall, ToolCalls, ToolChoice, calls_text,
                          template_arguments, tool_mode)

MAX_N = 64  # choices per request: more would let one request flood the batch


class StreamOptions(BaseModel):
    model_config = REQUEST
    include_usage: bool = False


class _Sampling(ConstraintFields):
    """Fields shared by completions and chat completions (those that constrain the output:
    server/structured.py)."""
    model_config = REQUEST

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    stop: Union[Text, list[Text], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY,
                                           allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY,
                                            allow_inf_nan=False)
    seed: int | None = Field(None, ge=-2 ** 63, lt=2 ** 63)  # int64, as vLLM takes it
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extra sampling parameters
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY,
                                             le=MAX_REPETITION_PENALTY, allow_inf_nan=False)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    use_beam_search: bool = False
    beam_width: int | None = Field(None, ge=1, le=MAX_N)
    length_penalty: float = Field(1.0, ge=-MAX_ABS_LENGTH_PENALTY, le=MAX_ABS_LENGTH_PENALTY,
                                  allow_inf_nan=False)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def sampling_params(self, max_tokens: int, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """Raises ParamError naming the field for values the engine rejects. prompt_logprobs:
        how many top entries to score the prompt with (default: the request's field)."""
        if self.logit_bias:
            raise ParamError("logit_bias", "logit_bias is not supported")
        if prompt_logprobs is None:
            prompt_logprobs = self.prompt_logprobs
        kw = dict(n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens,
                  stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                  seed=self.seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                  skip_special_tokens=self.skip_special_tokens,
                  use_beam_search=self.use_beam_search, length_penalty=self.length_penalty,
                  structured_outputs=self.structured_outputs_params())
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        if self.temperature is not None and self.temperature < MIN_TEMPERATURE:
            kw["temperature"] = 0.0
        if self.use_beam_search:
            kw["beam_width"] = self.beam_width or self.n
        return SamplingParams(**kw)


class CompletionRequest(_Sampling):
    prompt: Union[Text, list[Text], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=0)  # 0: only with echo, to score the prompt
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: Text | None = None


class TextPart(BaseModel):
    model_config = REQUEST
    type: str
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = REQUEST
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[Text, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None           # a tool's answer: to which call

    def text(self) -> str:
        """The message as a template without tool support renders it: its content (an
        assistant's earlier calls as text, calls_text)."""
        if self.tool_calls and not self.content:
            return calls_text(self.tool_calls)
        return self._content()

    def template_message(self, tools_aware: bool) -> dict:
        """The message for the chat template. tools_aware: a template with a tool-call format
        gets an assistant's calls and a tool answer's call id as Hugging Face's templates take
        them, and renders them itself."""
        if not tools_aware:
            return {"role": self.role, "content": self.text()}
        message: dict = {"role": self.role, "content": self._content()}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name,
                              "arguments": template_arguments(c.function.arguments)}}
                for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message

    def _content(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ParamError("messages", f"messages: content parts of type {part.type!r} "
                                             f"are not supported (text only)")
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = Field(
        None, description='with tool_choice "auto": false stops after the first call '
                          '("required" and named functions make one call per choice)')
    add_generation_prompt: bool = True
    _tool_format: str | None = PrivateAttr(None)  # the chat template's (server/tools.py)

    def use_tool_format(self, tool_format: str | None) -> None:
        """The model's chat template's tool-call format, which tool_choice "auto" needs."""
        self._tool_format = tool_format

    def tool_calls(self) -> ToolCalls | HermesCalls | None:
        """How this request calls tools (None: it answers in text); ParamError if it can't."""
        return tool_mode(self.tools, self.tool_choice, self._tool_format,
                         self.parallel_tool_calls is not False)

    def constraint_fields(self) -> list[str]:
        return super().constraint_fields() + (["tools"] if self.tool_calls() else [])

    def _params_kwargs(self, field: str) -> dict:
        return self.tool_calls().constraint() if field == "tools" else \
            super()._params_kwargs(field)


class TokenizeRequest(BaseModel):
    model_config = REQUEST
    model: str | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = REQUEST
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------- responses (documentation)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: int | None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """With echo the prompt's tokens come first; its first token has no logprob (null)."""
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None
    decoded_token: str | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = Field(
        None, description="vLLM's: per prompt token (the first is null), token id -> its "
                          "logprob and those of the top prompt_logprobs tokens")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """vLLM's /tokenizer_info: what a remote tokenizer (lm-evaluation-harness) reads, in the
    shape of tokenizer_config.json."""
    model_config = ConfigDict(extra="allow")
    tokenizer_class: str


class HealthResponse(BaseModel):
    status: str


class VersionResponse(BaseModel):
    version: str


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the errors a route can answer."""
    why = {400: "Bad request: the message names the field (param)", 401: "Missing or wrong API key",
           404: "Unknown model", 429: "Too many waiting requests (Retry-After)",
           503: "The engine failed or the server is shutting down"}
    return {code: {"model": ErrorResponse, "description": why[code]} for code in codes}
