"""Tool calls on /v1/chat/completions: `tools` and `tool_choice` as OpenAI has them.

With tool_choice "required" or a named function, the output is generated under a JSON schema
built from the functions, so the arguments always follow the function's `parameters`:
  - named: the output is the arguments object itself;
  - required: {"name": <one of the functions>, "arguments": <that function's parameters>}
    (an anyOf with one branch per function; one call per choice, no parallel calls).
The response carries it as message.tool_calls (content null, finish_reason "tool_calls"),
and a stream sends it as OpenAI streams tool calls: the call's id and function name first,
then the arguments in fragments as they are generated.

A conversation that goes on after a call sends the call back (an assistant message with
tool_calls, content null) and the tool's answer (role "tool"); the call becomes the text of the
assistant's turn (calls_text), as chat templates without tool support render only content.

tool_choice "none" answers in text and ignores the tools. "auto" (OpenAI's default when
tools are given) would need the model to decide between text and a call in its own tool-call
format, which nothing here parses (SmolLM2's chat template has none): it is a 400 that says
to use "required" or a named function.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Literal, Union

from pydantic import BaseModel, Field

from engine.errors import ParamError
from server.fields import REQUEST
from server.structured import JsonSchema

EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
# what a "required" output starts with, up to its arguments (JSON from the engine is compact,
# but any whitespace is read)
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*')
_CALL_TAIL = re.compile(r"\s*\}?\s*$")  # held back until the end: it may close the call


class FunctionDef(BaseModel):
    model_config = REQUEST
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: JsonSchema | None = Field(None, description="a JSON schema of the arguments "
                                                            "(none: no arguments)")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")


class Tool(BaseModel):
    model_config = REQUEST
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    model_config = REQUEST
    name: str


class NamedToolChoice(BaseModel):
    model_config = REQUEST
    type: Literal["function"]
    function: FunctionName


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


# ---------------------------------------------------------------- responses (documentation)


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments, a JSON object as text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


# ---------------------------------------------------------------- the request's side


def tool_mode(tools: list[Tool] | None, choice: ToolChoice | None) -> "ToolCalls | None":
    """How the request calls tools: None for a text answer. Raises ParamError for a
    tool_choice that cannot be served."""
    if not tools:
        if choice is None or choice in ("none", "auto"):
            return None
        raise ParamError("tool_choice", "tool_choice needs tools")
    if choice == "none":
        return None
    if choice is None or choice == "auto":
        raise ParamError("tool_choice", 'tool_choice "auto" (the default when tools are given) '
                                        'is not supported: this server does not parse a '
                                        'model\'s own tool-call format; use "required" or a '
                                        'named function ({"type": "function", "function": '
                                        '{"name": ...}}), or "none"')
    functions = {t.function.name: t.function for t in tools}
    if len(functions) != len(tools):
        raise ParamError("tools", "tools: two functions have the same name")
    if choice == "required":
        return ToolCalls(list(functions.values()), named=False)
    if choice.function.name not in functions:
        raise ParamError("tool_choice", f"tool_choice names {choice.function.name!r}, which is "
                                        f"not among the tools")
    return ToolCalls([functions[choice.function.name]], named=True)


def _parameters(fn: FunctionDef) -> dict:
    return fn.parameters if fn.parameters is not None else EMPTY_PARAMETERS


class ToolCalls:
    """One request's tool calling: its constraint, and its outputs as tool calls."""

    def __init__(self, functions: list[FunctionDef], named: bool):
        self.functions, self.named = functions, named
        self.ids: dict[int, str] = {}      # choice index -> its call's id
        self.sent_args: dict[int, int] = {}  # choice index -> argument characters sent
        self.opened: set[int] = set()      # choices whose call header (id, name) was sent

    def schema(self) -> dict:
        """The JSON schema every output follows."""
        if self.named:
            return _parameters(self.functions[0])
        branches = [{"type": "object", "properties": {"name": {"const": fn.name},
                                                      "arguments": _parameters(fn)},
                     "required": ["name", "arguments"], "additionalProperties": False}
                    for fn in self.functions]
        return branches[0] if len(branches) == 1 else {"anyOf": branches}

    def _split(self, text: str, final: bool) -> tuple[str | None, str]:
        """(the function's name, or None while it is not known; the arguments so far). Until
        `final`, a tail that may close the call object is held back."""
        if self.named:
            return self.functions[0].name, text
        head = _CALL_HEAD.match(text)
        if head is None:
            return None, ""
        rest = text[head.end():]
        if not final:
            return head.group(1), rest[:_CALL_TAIL.search(rest).start()]
        try:  # a whole call ends with its own "}" after the arguments
            json.loads(text)
        except ValueError:  # cut short (max_tokens): the arguments as far as they got
            return head.group(1), rest
        return head.group(1), re.sub(r"\s*\}\s*$", "", rest, count=1)

    def _id(self, index: int) -> str:
        return self.ids.setdefault(index, f"call_{uuid.uuid4().hex[:24]}")

    @staticmethod
    def finish_reason(reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" else reason

    def message(self, index: int, text: str) -> dict:
        """The chat message of a finished choice."""
        name, args = self._split(text, final=True)
        if name is None:  # cut off before the function's name: what there is, as text
            return {"role": "assistant", "content": text}
        call = {"id": self._id(index), "type": "function",
                "function": {"name": name, "arguments": args}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}

    def delta(self, index: int, text: str, finished: bool) -> dict:
        """The stream delta of choice `index` whose output is now `text` (all of it so far)."""
        name, args = self._split(text, final=finished)
        if name is None:
            return {"content": text} if finished and text else {}
        call: dict = {"index": 0}
        if index not in self.opened:
            self.opened.add(index)
            call.update(id=self._id(index), type="function", function={"name": name,
                                                                       "arguments": ""})
        start = self.sent_args.get(index, 0)
        if len(args) > start:
            call.setdefault("function", {})["arguments"] = args[start:]
            self.sent_args[index] = len(args)
        elif "id" not in call:
            return {}
        return {"tool_calls": [call]}


def calls_text(calls: list[ToolCall]) -> str:
    """An assistant message's earlier tool calls as the text of its turn, for chat templates
    that render only content (SmolLM2's): one {"name", "arguments"} object per line, the shape
    "required" generates."""
    lines = []
    for call in calls:
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:  # not JSON: as the client sent it
            arguments = call.function.arguments
        lines.append(json.dumps({"name": call.function.name, "arguments": arguments},
                                ensure_ascii=False))
    return "\n".join(lines)
