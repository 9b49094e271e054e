"""Tool calls on /v1/chat/completions, in process against the real engine and model: with
tool_choice "required" or a named function the arguments are generated under the function's
parameter schema, so every call validates (jsonschema) at temperature 1.0 with n > 1, in the
response's message.tool_calls and reassembled from OpenAI's streamed tool-call deltas, over
raw HTTP and through the OpenAI SDK. tool_choice "auto": a 400 on SmolLM2 (no tool-call format
in its template); on a tiny model with a Hermes-style template of our own (make_tool_model),
the model's own <tool_call> blocks come back as validated tool_calls; the Hermes parser and
its stream on fixed strings."""
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


# a conversation that goes on after a call: the assistant's call, then the tool's answer
AFTER_CALL = MESSAGES + [
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 degrees"}]


def rendered(client, messages: list[dict]) -> str:
    """The prompt the server makes of a conversation (its chat template), as text."""
    r = client.post("/tokenize", json={"messages": messages})
    assert r.status_code == 200, r.text
    return client.post("/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]


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
    messages = AFTER_CALL
    prompt = rendered(client, messages)
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


# ---------------------------------------------------------------- tool_choice "auto"
#
# SmolLM2's chat template has no tool-call format: "auto" is a 400 there. A model whose
# template has one (Hermes / Qwen2.5 <tool_call> blocks) is made here: tiny, random, with
# SmolLM2's tokenizer and a template of our own.

TOOL_TEMPLATE = """\
{%- set sys = messages[0].content if messages and messages[0].role == 'system' else '' -%}
{%- if tools -%}
<|im_start|>system
{% if sys %}{{ sys }}

{% endif %}Functions you may call, one JSON object each:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
To call one, write <tool_call>
{"name": "<function name>", "arguments": {<its arguments>}}
</tool_call><|im_end|>
{% elif sys -%}
<|im_start|>system
{{ sys }}<|im_end|>
{% endif -%}
{%- for m in messages -%}
{%- if m.role == 'system' and loop.first -%}
{%- elif m.role == 'tool' -%}
<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% elif m.role == 'assistant' -%}
<|im_start|>assistant
{% if m.content %}{{ m.content }}{% endif %}
{%- for call in m.tool_calls or [] %}
{%- if not loop.first or m.content %}
{% endif -%}
<tool_call>
{"name": {{ call.function.name | tojson }}, "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% else -%}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}
"""


def make_tool_model(path) -> None:
    """A tiny random Llama that always wants to call a tool, saved as an HF directory:
    SmolLM2's tokenizer with `<tool_call>` and `</tool_call>` added as (non-special) tokens,
    as Qwen's have them, and TOOL_TEMPLATE. Its residual stream's first dimension is the
    constant 1 (every embedding has it, no layer writes to it) and the lm_head row of
    `<tool_call>` reads only that dimension, so `<tool_call>` outscores every other token by
    far wherever it may come. Which function it calls, and with what arguments, it samples
    under the constraint like any model."""
    import torch
    import transformers

    from engine.loader import resolve_model
    from engine.tokenizer import load_tokenizer
    tok = load_tokenizer(resolve_model(None)).hf
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    tok.chat_template = TOOL_TEMPLATE
    tok.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = transformers.LlamaForCausalLM(config).eval()
    trigger = tok.convert_tokens_to_ids("<tool_call>")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.lm_head.weight[trigger] = 0.0
        model.lm_head.weight[trigger, 0] = 4.0
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    from server_utils import InProcessServer
    path = tmp_path_factory.mktemp("tool-model")
    make_tool_model(path)
    with InProcessServer("--model", str(path), "--max-model-len", "1024") as srv:
        yield srv


@pytest.fixture(scope="module")
def tool_client(tool_server):
    with tool_server.client(timeout=120.0) as c:
        yield c


def test_auto_without_a_tool_call_format_is_a_400(client):
    """SmolLM2's template has no tool-call format kvserve reads: "auto", given or by default,
    is refused in OpenAI's error shape, naming tool_choice and saying what works instead."""
    for extra in ({}, {"tool_choice": "auto"}, {"tool_choice": "auto", "stream": True}):
        r = client.post("/v1/chat/completions", json={**BASE, **extra})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["param"] == "tool_choice" and error["type"] == "invalid_request_error"
        assert "chat template" in error["message"] and '"required"' in error["message"]


def test_the_tool_call_format_comes_from_the_template(client):
    from server.tools import HERMES, template_tool_format
    smollm2 = client.get("/tokenizer_info").json()["chat_template"]
    assert smollm2 and template_tool_format(smollm2) is None
    assert template_tool_format(TOOL_TEMPLATE) == HERMES
    assert template_tool_format({"default": smollm2, "tool_use": TOOL_TEMPLATE}) == HERMES
    assert template_tool_format("{{ tools }} <call>") is None  # tools, but no format we read
    assert template_tool_format(None) is None


@pytest.mark.parametrize("read", [whole, streamed], ids=["whole", "stream"])
def test_auto_calls_a_function_with_valid_arguments(tool_client, read):
    """The model opens a call itself; the structural tag makes the rest of the block a call
    of one of the tools whose arguments validate. parallel_tool_calls false: one call."""
    choices = read(tool_client, {**BASE, "tool_choice": "auto", "parallel_tool_calls": False,
                                 "n": 4})
    assert len(choices) == 4
    for c in choices:
        assert c["finish_reason"] == "tool_calls", c
        assert c["message"]["content"] is None, c
        (call,) = c["message"]["tool_calls"]
        assert_call(call, set(PARAMETERS))
    ids = [c["message"]["tool_calls"][0]["id"] for c in choices]
    assert len(set(ids)) == 4


def test_auto_makes_parallel_calls_and_a_cut_call_stays_text(tool_client):
    """parallel_tool_calls (default true): the model calls again after each call until
    max_tokens cuts one; the whole calls are tool_calls, the cut one is left as text, and
    finish_reason says length. Whole and streamed answers agree (greedy)."""
    body = {**BASE, "temperature": 0, "n": 1, "max_tokens": 120}
    (c,) = whole(tool_client, body)
    (s,) = streamed(tool_client, body)
    assert c["finish_reason"] == s["finish_reason"] == "length", c
    calls = c["message"]["tool_calls"]
    assert len(calls) >= 2, c
    for call in calls:
        assert_call(call, set(PARAMETERS))
    assert c["message"]["content"].startswith("<tool_call>"), c  # the cut call
    assert s["message"]["content"] == c["message"]["content"]
    assert [x["function"] for x in s["message"]["tool_calls"]] == [x["function"] for x in calls]


def test_none_leaves_the_models_call_as_text(tool_client):
    (c,) = whole(tool_client, {**BASE, "tool_choice": "none", "n": 1, "max_tokens": 3})
    assert c["message"]["content"] == "<tool_call>" * 3 and c["finish_reason"] == "length"
    assert c["message"].get("tool_calls") is None


def test_earlier_calls_go_through_the_templates_own_format(tool_client):
    """On a template with a tool-call format, an assistant's tool_calls and the tool's answer
    reach the template as HF templates take them (arguments as an object) and it renders them
    its way: <tool_call> blocks and a <tool_response>, not calls_text's lines."""
    messages = AFTER_CALL
    prompt = rendered(tool_client, messages)
    call = ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris", "unit": "celsius"}}\n</tool_call><|im_end|>\n')
    answer = "<|im_start|>user\n<tool_response>\nsunny, 21 degrees\n</tool_response><|im_end|>"
    assert call in prompt and answer in prompt and prompt.index(call) < prompt.index(answer)
    (c,) = whole(tool_client, {**BASE, "messages": messages, "n": 1,
                               "parallel_tool_calls": False})
    assert c["finish_reason"] == "tool_calls", c


def test_auto_through_the_openai_sdk(tool_server):
    import openai
    from openai import OpenAI
    client = OpenAI(base_url=tool_server.url + "/v1", api_key="x", max_retries=0,
                    http_client=tool_server.client(timeout=120.0))
    model = client.models.list().data[0].id
    r = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS,
                                       parallel_tool_calls=False, max_tokens=200)
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0].message
    (call,) = r.choices[0].message.tool_calls
    assert_call(call.model_dump(), set(PARAMETERS))
    with client.beta.chat.completions.stream(model=model, messages=MESSAGES, tools=TOOLS,
                                             parallel_tool_calls=False, max_tokens=200) as s:
        events = [event.type for event in s]
        final = s.get_final_completion().choices[0]
    assert "tool_calls.function.arguments.done" in events, events
    assert final.finish_reason == "tool_calls"
    (call,) = final.message.tool_calls
    assert_call(call.model_dump(), set(PARAMETERS))
    assert openai  # the SDK's own types parsed both


# ---------------------------------------------------------------- the Hermes parser


def _hermes(parallel: bool = True):
    from server.protocol import ChatCompletionRequest
    body = ChatCompletionRequest.model_validate({**BASE, "parallel_tool_calls": parallel})
    body.use_tool_format("hermes")
    return body.tool_calls()


def _block(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


W_ARGS = '{"city": "Paris </tool_call>", "unit": "celsius"}'  # an end tag inside a string
A_ARGS = '{"a": 2, "b": 3}'
TWO_CALLS = "Let me look.\n" + _block("get_weather", W_ARGS) + "\n" + _block("add", A_ARGS) + "\n"


@pytest.mark.parametrize("text,content,calls,reason", [
    (TWO_CALLS, "Let me look.\n\n\n", [("get_weather", W_ARGS), ("add", A_ARGS)], "tool_calls"),
    (_block("add", A_ARGS) + "\n ", None, [("add", A_ARGS)], "tool_calls"),  # whitespace: null
    ("No tools needed < <tool call>", "No tools needed < <tool call>", [], "stop"),
    # malformed (a trailing comma), not an object, no name, junk before the end tag: text
    ("A " + _block("add", '{"a": 2,}'), "A " + _block("add", '{"a": 2,}'), [], "stop"),
    ("<tool_call>[1]</tool_call>", "<tool_call>[1]</tool_call>", [], "stop"),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>',
     [], "stop"),
    ('<tool_call>{"name": "now"} x </tool_call>' + _block("now", "{}"),
     '<tool_call>{"name": "now"} x </tool_call>', [("now", "{}")], "tool_calls"),
    # a raw control character in a string (xgrammar's JSON allows it): read, sent escaped
    (_block("get_weather", '{"city": "a\x17b", "unit": "celsius"}'), None,
     [("get_weather", '{"city": "a\\u0017b", "unit": "celsius"}')], "tool_calls"),
])
def test_hermes_output_reads_as_content_and_calls(text, content, calls, reason):
    tc = _hermes()
    message = tc.message(0, text)
    assert message["content"] == content, message
    got = [(c["function"]["name"], c["function"]["arguments"])
           for c in message.get("tool_calls", [])]
    assert got == [(name, json.dumps(json.loads(args))) for name, args in calls]
    assert all(c["id"].startswith("call_") for c in message.get("tool_calls", []))
    assert tc.finish_reason(0, "stop") == reason


def test_a_call_cut_by_max_tokens_stays_text():
    cut = TWO_CALLS[:-30]  # the second call, without its end
    tc = _hermes()
    message = tc.message(0, cut)
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert message["content"] == "Let me look.\n\n" + cut[cut.rindex("<tool_call>"):]
    assert tc.finish_reason(0, "length") == "length"


def test_without_parallel_calls_the_first_call_is_the_only_one():
    message = _hermes(parallel=False).message(0, TWO_CALLS)
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]


def _stream(tc, pieces: list[str]) -> tuple[list[dict], str | None, list]:
    """Feed the output grown piece by piece: (the deltas, the content they add up to, the
    calls they carry)."""
    deltas, text = [], ""
    for i, piece in enumerate(pieces):
        text += piece
        deltas.append(tc.delta(0, text, finished=i == len(pieces) - 1))
    content = "".join(d.get("content", "") for d in deltas) or None
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    return deltas, content, calls


def test_a_stream_holds_back_what_may_start_a_call():
    head = "Hi <tool"
    rest = TWO_CALLS[len("Let me look.\n<tool_call>\n"):]
    deltas, content, calls = _stream(_hermes(), [head, "_call>\n", rest])
    assert deltas[0] == {"content": "Hi "}  # "<tool" waits
    assert deltas[1] == {}                   # a call has begun: nothing to send yet
    assert content == "Hi \n\n" and [c["index"] for c in calls] == [0, 1]
    deltas, content, calls = _stream(_hermes(), [head, "box> is", " here"])
    assert [d.get("content") for d in deltas] == ["Hi ", "<toolbox> is", " here"]
    assert not calls
    deltas, content, _ = _stream(_hermes(), ["\n", " ", "<tool", "_cal"])  # cut: all text
    assert deltas[:3] == [{}, {}, {}] and deltas[3] == {"content": "\n <tool_cal"}


@pytest.mark.parametrize("text", [TWO_CALLS, TWO_CALLS[:-30], "Plain <tool text",
                                  _block("now", "{}") + " ok",
                                  "A " + _block("add", '{"a": 2,}') + _block("now", "{}")])
def test_streamed_content_and_calls_add_up_to_the_whole_answer(text):
    """Grown one character at a time (every split point), the stream's content deltas add up
    to the whole message's content and its call deltas to its calls, each call one delta
    with index, id, type, name and arguments."""
    want = _hermes().message(0, text)
    tc = _hermes()
    _, content, calls = _stream(tc, list(text))
    assert content == want["content"]
    assert [c["index"] for c in calls] == list(range(len(calls)))
    assert [c["function"] for c in calls] == [c["function"] for c in want.get("tool_calls", [])]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert tc.finish_reason(0, "stop") == ("tool_calls" if calls else "stop")
