"""Tool calls on /v1/chat/completions: `tools` and `tool_choice` as OpenAI has them.

With tool_choice "required" or a named function, the output is generated under a JSON schema
built from the functions, so the arguments always follow the function's `parameters`:
  - named: the output is the arguments object itself;
  - required: {"name": <one of the functions>, "arguments": <that function's parameters>}
    (an anyOf with one branch per function; one call per choice, no parallel calls).
The response carries it as message.tool_calls (content null, finish_reason "tool_calls"),
and a stream sends it as OpenAI streams tool calls: the call's id and function name first,
then the arguments in fragments as they are generated.

tool_choice "auto" (OpenAI's default when tools are given) lets the model choose between text
and calls in its own tool-call format, so it needs a chat template that has one kvserve can
read. One is known: Hermes / Qwen2.5 / Qwen3's, where the model writes, after any text, zero or
more blocks `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`; a template that
mentions `<tool_call>` and renders `tools` is taken to use it (template_tool_format). The
output is free text under an xgrammar structural tag (the engine's `structural_tag`
constraint): once the model writes `<tool_call>`, the rest of the block must be a call of one
of the functions with arguments that follow its parameters' schema, then `</tool_call>`
(with parallel_tool_calls false, nothing but the end may follow the first call). HermesCalls
reads the output back: the text outside blocks is message.content (null when it is only
whitespace), each block one entry of message.tool_calls, and finish_reason "tool_calls" when
there was a call and the model stopped by itself. A block that is not a whole call (cut by
max_tokens or a stop string) stays text. A stream sends the text as content deltas, holding
back a tail that may be the start of `<tool_call>` (and text that is only whitespace so far),
and each call as one delta (index, id, type, name and all its arguments) when its block
closes. With a template that has no such format (SmolLM2's), "auto" is a 400 that says to use
"required", a named function or "none", as vLLM answers without a tool parser.

A conversation that goes on after a call sends the call back (an assistant message with
tool_calls, content null) and the tool's answer (role "tool"). A template with a tool-call
format gets them as Hugging Face's templates expect (tool_calls with arguments as an object,
the tool message with its tool_call_id) and renders them its own way; for templates without
tool support the call becomes the text of the assistant's turn (calls_text), as they render
only content.

tool_choice "none" answers in text and ignores the tools.
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


HERMES = "hermes"  # the one tool-call format read here (Hermes 2/3, Qwen2.5, Qwen3)
TRIGGER, CLOSE = "<tool_call>", "</tool_call>"


def template_tool_format(chat_template) -> str | None:
    """The tool-call format a chat template (text, or HF's {name: text}) uses, if kvserve
    reads it: HERMES for a template that renders `tools` and writes `<tool_call>` blocks."""
    texts = chat_template.values() if isinstance(chat_template, dict) else [chat_template]
    for text in texts:
        if isinstance(text, str) and TRIGGER in text and re.search(r"\btools\b", text):
            return HERMES
    return None


def tool_mode(tools: list[Tool] | None, choice: ToolChoice | None,
              tool_format: str | None = None, parallel: bool = True
              ) -> "ToolCalls | HermesCalls | None":
    """How the request calls tools: None for a text answer. tool_format: the chat template's
    (template_tool_format), which "auto" needs; parallel: parallel_tool_calls. Raises
    ParamError for a tool_choice that cannot be served."""
    if not tools:
        if choice is None or choice in ("none", "auto"):
            return None
        raise ParamError("tool_choice", "tool_choice needs tools")
    if choice == "none":
        return None
    functions = {t.function.name: t.function for t in tools}
    if len(functions) != len(tools):
        raise ParamError("tools", "tools: two functions have the same name")
    if choice is None or choice == "auto":
        if tool_format != HERMES:
            raise ParamError("tool_choice", 'tool_choice "auto" (the default when tools are '
                                            'given) is not supported for this model: its chat '
                                            'template has no tool-call format kvserve parses '
                                            '(Hermes/Qwen <tool_call> blocks); use "required", '
                                            'a named function ({"type": "function", '
                                            '"function": {"name": ...}}), or "none"')
        return HermesCalls(list(functions.values()), parallel)
    if choice == "required":
        return ToolCalls(list(functions.values()), named=False)
    if choice.function.name not in functions:
        raise ParamError("tool_choice", f"tool_choice names {choice.function.name!r}, which is "
                                        f"not among the tools")
    return ToolCalls([functions[choice.function.name]], named=True)


def _parameters(fn: FunctionDef) -> dict:
    return fn.parameters if fn.parameters is not None else EMPTY_PARAMETERS


class ToolCalls:
    """One request's tool calling under "required" or a named function: its constraint, and
    its outputs as tool calls."""
    first_content = None  # a stream's first delta: the answer is a call, not text

    def __init__(self, functions: list[FunctionDef], named: bool):
        self.functions, self.named = functions, named
        self.ids: dict[int, str] = {}      # choice index -> its call's id
        self.sent_args: dict[int, int] = {}  # choice index -> argument characters sent
        self.opened: set[int] = set()      # choices whose call header (id, name) was sent

    def constraint(self) -> dict:
        """StructuredOutputsParams' arguments."""
        return {"json": self.schema()}

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
    def finish_reason(index: int, reason: str | None) -> str | None:
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


# ---------------------------------------------------------------- "auto": Hermes <tool_call> blocks

# strict=False: a control character inside a string is read (xgrammar's JSON lets one through
# unescaped); the arguments go out re-encoded, escaped
_JSON = json.JSONDecoder(strict=False)
_SPACE = re.compile(r"\s*")


def _read_call(text: str, at: int) -> tuple[str, dict, int] | bool | None:
    """The block whose TRIGGER starts at text[at]: (name, arguments, where it ends) for a
    whole call, False for a block that cannot be one, None while more text may decide (a
    block that never parses is decided only at the end of the output, as text)."""
    start = _SPACE.match(text, at + len(TRIGGER)).end()
    if start == len(text):
        return None
    if text[start] != "{":
        return False
    try:
        obj, end = _JSON.raw_decode(text, start)
    except ValueError:  # cut short, or not JSON
        return None
    close = _SPACE.match(text, end).end()
    if not text.startswith(CLOSE, close):
        return None if CLOSE.startswith(text[close:]) else False
    if not isinstance(obj, dict):
        return False
    arguments = obj.get("arguments", {})
    if not (isinstance(obj.get("name"), str) and isinstance(arguments, dict)):
        return False
    return obj["name"], arguments, close + len(CLOSE)


def _trigger_tail(text: str, start: int) -> int:
    """How many characters at the end of text[start:] may begin a TRIGGER."""
    for k in range(min(len(TRIGGER) - 1, len(text) - start), 0, -1):
        if text.endswith(TRIGGER[:k]):
            return k
    return 0


def parse_hermes(text: str, start: int = 0, final: bool = True, max_calls: int | None = None,
                 calls: int = 0) -> tuple[list, int]:
    """Reads text[start:] as Hermes output: ([text pieces (str) and calls ((name, arguments)),
    in order], where the reading stopped). Until `final`, what may still turn out a call (a
    block not yet closed, a tail that may start TRIGGER) is left unread. After max_calls
    calls (counting `calls` already read), the rest is text."""
    items: list = []
    pos = start
    while True:
        done = max_calls is not None and calls >= max_calls
        at = -1 if done else text.find(TRIGGER, pos)
        if at < 0:
            end = len(text) if final or done else len(text) - _trigger_tail(text, pos)
            if end > pos:
                items.append(text[pos:end])
            return items, end
        if at > pos:
            items.append(text[pos:at])
        got = _read_call(text, at)
        if got is None and not final:
            return items, at
        if not got:  # not a call: its trigger is text, and reading goes on after it
            items.append(TRIGGER)
            pos = at + len(TRIGGER)
            continue
        name, arguments, pos = got
        items.append((name, arguments))
        calls += 1


def _join_text(items: list) -> str:
    return "".join(item for item in items if isinstance(item, str))


class _Stream:
    """One choice's progress through a stream."""
    def __init__(self):
        self.pos = 0          # output characters read
        self.calls = 0        # calls sent
        self.held = ""        # content held back while it is only whitespace
        self.talking = False  # some content was sent


class HermesCalls:
    """One request's tool calling under "auto" with a Hermes-format template: the structural
    tag that constrains its outputs, and its outputs as content and tool calls."""
    first_content = ""  # text or calls: not known yet

    def __init__(self, functions: list[FunctionDef], parallel: bool = True):
        self.functions, self.parallel = functions, parallel
        self.max_calls = None if parallel else 1
        self.ids: dict[tuple[int, int], str] = {}  # (choice, call) -> its id
        self.num_calls: dict[int, int] = {}         # choice -> calls in its output
        self.streams: dict[int, _Stream] = {}

    def constraint(self) -> dict:
        """StructuredOutputsParams' arguments: free text in which each TRIGGER must go on as
        a whole call of one of the functions."""
        tags = [{"type": "tag",
                 "begin": f'{TRIGGER}\n{{"name": {json.dumps(fn.name)}, "arguments": ',
                 # at most one blank in a row: a small model sampling freely would otherwise
                 # spend its tokens on whitespace inside the object
                 "content": {"type": "json_schema", "json_schema": _parameters(fn),
                             "max_whitespace_cnt": 1},
                 "end": f"}}\n{CLOSE}"} for fn in self.functions]
        return {"structural_tag": {"type": "structural_tag", "format": {
            "type": "triggered_tags", "triggers": [TRIGGER], "tags": tags,
            "stop_after_first": not self.parallel}}}

    def _call(self, index: int, k: int, name: str, arguments: dict) -> dict:
        call_id = self.ids.setdefault((index, k), f"call_{uuid.uuid4().hex[:24]}")
        return {"id": call_id, "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments,
                                                                   ensure_ascii=False)}}

    def finish_reason(self, index: int, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.num_calls.get(index) else reason

    def message(self, index: int, text: str) -> dict:
        """The chat message of a finished choice."""
        items, _ = parse_hermes(text, max_calls=self.max_calls)
        calls = [self._call(index, k, *item)
                 for k, item in enumerate(i for i in items if isinstance(i, tuple))]
        self.num_calls[index] = len(calls)
        content = _join_text(items)
        message = {"role": "assistant", "content": content if content.strip() else None}
        if calls:
            message["tool_calls"] = calls
        return message

    def delta(self, index: int, text: str, finished: bool) -> dict:
        """The stream delta of choice `index` whose output is now `text` (all of it so far)."""
        st = self.streams.setdefault(index, _Stream())
        items, st.pos = parse_hermes(text, st.pos, finished, self.max_calls, st.calls)
        delta: dict = {}
        st.held += _join_text(items)
        if st.held and (st.talking or st.held.strip()):
            delta["content"], st.held, st.talking = st.held, "", True
        for item in items:
            if isinstance(item, tuple):
                delta.setdefault("tool_calls", []).append(
                    {"index": st.calls, **self._call(index, st.calls, *item)})
                st.calls += 1
        self.num_calls[index] = st.calls
        return delta


def template_arguments(arguments: str):
    """A call's arguments (JSON text) as chat templates take them: the object, or the text
    as it came where it is not a JSON object."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


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
