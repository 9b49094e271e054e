"""Tool calls on /v1/chat/completions, in process against the real engine and model: with
tool_choice "required" or a named function the arguments are generated under the function's
parameter schema, so every call validates (jsonschema) at temperature 1.0 with n > 1, in the
response's message.tool_calls and reassembled from OpenAI's streamed tool-call deltas, over
raw HTTP and through the OpenAI SDK."""
from __future__ import annotations

import json

import jsonschema
import pytest

from clients.sse import iter_sse

MODEL = "SmolLM2-135M-Instruct"


def _obj(properties: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": False}


def function(name: str, parameters: dict | None, description: str = "") -> dict:
    fn = {"name": name, "description": description}
    if parameters is not None:
        fn["parameters"] = parameters
    return {"type": "function", "function": fn}


WEATHER = function("get_weather", _obj({"city": {"type": "string", "maxLength": 16},
                                        "unit": {"enum": ["celsius", "fahrenheit"]}},
                                       ["city", "unit"]), "The weather in a city")
ADD = function("add", _obj({"a": {"type": "integer", "minimum": -100, "maximum": 100},
                            "b": {"type": "integer", "minimum": -100, "maximum": 100}},
                           ["a", "b"]), "Add two numbers")
TAGS = function("set_tags", _obj({"tags": {"type": "array", "minItems": 1, "maxItems": 3,
                                           "items": {"enum": ["red", "green", "blue"]}},
                                  "note": {"type": "string", "maxLength": 10}}, ["tags"]))
NOW = function("now", None, "The time now (no arguments)")
TOOLS = [WEATHER, ADD, TAGS, NOW]
PARAMETERS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object",
                                                                      "maxProperties": 0})
              for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What's the weather in Paris? Or add 2 and 3."}]
BASE = {"messages": MESSAGES, "tools": TOOLS, "n": 3, "temperature": 1.0, "max_tokens": 200}


def assert_call(call: dict, names: set[str]) -> None:
    assert call["type"] == "function" and call["id"].startswith("call_"), call
    name = call["function"]["name"]
    assert name in names, call
    jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS[name])


def whole(client, body: dict) -> list[dict]:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"]


def streamed(client, body: dict) -> list[dict]:
    """The stream's choices reassembled as the whole response has them: tool calls from their
    deltas (the first of a call carries id, type and name; the rest add arguments)."""
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        data = list(iter_sse(r.iter_lines()))
    assert data[-1] == "[DONE]"
    choices: dict[int, dict] = {}
    for event in map(json.loads, data[:-1]):
        assert "error" not in event, event
        for c in event["choices"]:
            choice = choices.setdefault(c["index"], {"content": None, "calls": {},
                                                     "finish_reason": None})
            delta = c["delta"]
            if delta.get("content"):
                choice["content"] = (choice["content"] or "") + delta["content"]
            for tc in delta.get("tool_calls") or []:
                if tc["index"] not in choice["calls"]:  # a new call: its header first
                    assert tc["id"] and tc["type"] == "function" and tc["function"]["name"]
                    choice["calls"][tc["index"]] = {"id": tc["id"], "type": "function",
                                                    "function": {"name": tc["function"]["name"],
                                                                 "arguments": ""}}
                else:
                    assert "id" not in tc and "name" not in tc.get("function", {})
                call = choice["calls"][tc["index"]]
                call["function"]["arguments"] += tc.get("function", {}).get("arguments", "")
            if c["finish_reason"]:
                assert choice["finish_reason"] is None, "finished twice"
                choice["finish_reason"] = c["finish_reason"]
    return [{"index": i, "finish_reason": ch["finish_reason"],
             "message": {"role": "assistant", "content": ch["content"],
                         "tool_calls": [ch["calls"][k] for k in sorted(ch["calls"])] or None}}
            for i, ch in sorted(choices.items())]


@pytest.mark.parametrize("read", [whole, streamed], ids=["whole", "stream"])
@pytest.mark.parametrize("name", ["get_weather", "add", "set_tags", "now"])
def test_named_function(client, read, name):
    choices = read(client, {**BASE, "tool_choice": {"type": "function",
                                                     "function": {"name": name}}})
    assert len(choices) == 3
    for c in choices:
        assert c["finish_reason"] == "tool_calls", c
        assert c["message"]["content"] is None
        (call,) = c["message"]["tool_calls"]
        assert_call(call, {name})
    assert len({c["message"]["tool_calls"][0]["id"] for c in choices}) == 3  # one id per call


@pytest.mark.parametrize("read", [whole, streamed], ids=["whole", "stream"])
def test_required(client, read):
    for tools in (TOOLS, [ADD]):
        choices = read(client, {**BASE, "tools": tools, "tool_choice": "required", "n": 4})
        assert len(choices) == 4
        for c in choices:
            assert c["finish_reason"] == "tool_calls" and c["message"]["content"] is None, c
            (call,) = c["message"]["tool_calls"]
            assert_call(call, {t["function"]["name"] for t in tools})


def test_none_answers_in_text(client):
    for read in (whole, streamed):
        for c in read(client, {**BASE, "tool_choice": "none", "max_tokens": 8}):
            assert c["message"].get("tool_calls") is None, c
            assert isinstance(c["message"]["content"], str) and c["message"]["content"]
            assert c["finish_reason"] in ("stop", "length")


def test_a_call_cut_short_says_length(client):
    """max_tokens ends the call mid-arguments: finish_reason "length", not "tool_calls"."""
    body = {**BASE, "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "max_tokens": 3, "n": 1}
    for read in (whole, streamed):
        (c,) = read(client, body)
        assert c["finish_reason"] == "length", c
        (call,) = c["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"


def test_earlier_calls_reach_the_prompt(client):
    """A conversation that goes on after a call: the assistant's tool_calls (content null)
    are the text of its turn, the tool's answer follows, and the model answers from there."""
    messages = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 degrees"}]
    r = client.post("/tokenize", json={"messages": messages})
    assert r.status_code == 200, r.text
    prompt = client.post("/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    call = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    assert call in prompt and prompt.index(call) < prompt.index("sunny, 21 degrees"), prompt
    (c,) = whole(client, {"messages": messages, "tools": TOOLS, "tool_choice": "none",
                          "max_tokens": 4})
    assert c["message"]["content"]


@pytest.mark.parametrize("named", [False, True], ids=["required", "named"])
def test_streamed_arguments_add_up_at_any_split(named):
    """ToolCalls on outputs as the engine writes them, grown one character at a time: the
    streamed header and argument fragments add up to the whole response's call, also when
    max_tokens ends the output right after the call's last brace (finish "length")."""
    from server.protocol import ChatCompletionRequest
    body = ChatCompletionRequest.model_validate({**BASE, "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}} if named else "required"})
    args = '{"city": "Paris {x}", "unit": "celsius"}'
    text = args if named else '{"name": "get_weather", "arguments": ' + args + "}"
    for cut in (len(text), len(text) - 1, len(text) - 5):
        calls, streamed = body.tool_calls(), ""
        for end in range(1, cut + 1):
            delta = calls.delta(0, text[:end], finished=end == cut)
            for tc in delta.get("tool_calls", []):
                streamed += tc["function"].get("arguments", "")
        (call,) = calls.message(0, text[:cut])["tool_calls"]
        assert call["function"]["name"] == "get_weather" and call["id"] == calls.ids[0]
        assert streamed == call["function"]["arguments"], (cut, streamed)
        head = 0 if named else len(text) - len(args) - 1  # where the arguments start
        whole_args = args if cut == len(text) else text[head:cut]
        assert streamed == whole_args, (cut, streamed)


@pytest.mark.parametrize("extra,param", [
    ({}, "tool_choice"),                                       # "auto" by default
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "tools"),
    ({"tools": [function("bad name!", None)], "tool_choice": "required"}, "tools"),
    ({"tools": [function("f", {"type": "nonsense"})], "tool_choice": "required"}, "tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tools"),
    ({"tool_choice": "required", "guided_regex": "a"}, "tools"),
])
def test_bad_tool_requests(client, extra, param):
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json={**BASE, **extra, "stream": stream})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.json()
    assert whole(client, {"messages": MESSAGES, "max_tokens": 2})  # still answering


def test_openai_sdk(server):
    import openai
    from openai import OpenAI
    from pydantic import BaseModel, Field

    client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                    http_client=server.client(timeout=120.0))
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, n=2, temperature=1.0, max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        (call,) = c.message.tool_calls
        assert_call(call.model_dump(), {"get_weather"})

    calls: dict[int, dict] = {}
    for chunk in client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required",
            temperature=1.0, max_tokens=200, stream=True):
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": tc.id, "type": "function",
                                                   "function": {"name": tc.function.name,
                                                                "arguments": ""}})
                call["function"]["arguments"] += tc.function.arguments or ""
            if c.finish_reason:
                assert c.finish_reason == "tool_calls"
    (call,) = calls.values()
    assert_call(call, set(PARAMETERS))

    class Add(BaseModel):
        """Add two numbers."""
        a: int = Field(ge=-100, le=100)
        b: int = Field(ge=-100, le=100)

    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    done = parse(model=MODEL, messages=MESSAGES, tools=[openai.pydantic_function_tool(Add)],
                 tool_choice="required", temperature=1.0, max_tokens=100)
    (call,) = done.choices[0].message.tool_calls
    assert call.function.name == "Add" and isinstance(call.function.parsed_arguments, Add)
    with client.beta.chat.completions.stream(  # the SDK's helper reassembles the stream
            model=MODEL, messages=MESSAGES, tools=[openai.pydantic_function_tool(Add)],
            tool_choice="required", temperature=1.0, max_tokens=100) as s:
        events = [event.type for event in s]
        final = s.get_final_completion().choices[0]
    assert "tool_calls.function.arguments.delta" in events and final.finish_reason == "tool_calls"
    (call,) = final.message.tool_calls
    assert call.function.name == "Add" and isinstance(call.function.parsed_arguments, Add)

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS)
    assert e.value.body["param"] == "tool_choice"


def test_openapi_documents_tools(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    props = schemas["ChatCompletionRequest"]["properties"]
    assert props["tools"]["anyOf"][0]["items"] == {"$ref": "#/components/schemas/Tool"}
    assert {"tools", "tool_choice", "parallel_tool_calls"} <= set(props)
    assert set(schemas["FunctionDef"]["properties"]) >= {"name", "description", "parameters"}
    assert "tool_calls" in schemas["AssistantMessage"]["properties"]
    assert "tool_calls" in schemas["ChatMessage"]["properties"]
