"""Structured output through the HTTP API, in process: OpenAI's response_format, vLLM's
structured_outputs and guided_* fields, and the OpenAI SDK's parse(), against the real engine
and model. Every output is checked as the client would check it (json.loads + jsonschema,
re.fullmatch, membership), sampled at temperature 1.0 with n > 1, whole and streamed.

Schemas keep strings and numbers bounded so a well-formed output fits in max_tokens on a CPU
(SmolLM2-135M at temperature 1.0 writes long strings when nothing bounds them)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from clients.sse import iter_sse
from server_utils import InProcessServer

MAX_TOKENS = 250


def _obj(properties: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": False}


SHORT = {"type": "string", "maxLength": 12}
SCHEMAS = {
    "nested": _obj({"name": SHORT,
                    "address": _obj({"city": SHORT,
                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                                    ["city", "zip"])}, ["name", "address"]),
    "array_bounds": _obj({"tags": {"type": "array", "items": SHORT, "minItems": 1,
                                   "maxItems": 3},
                          "scores": {"type": "array", "minItems": 2, "maxItems": 2,
                                     "items": {"type": "integer", "minimum": 0,
                                               "maximum": 9}}}, ["tags", "scores"]),
    "enum_and_range": _obj({"color": {"enum": ["red", "green", "blue"]},
                            "count": {"type": "integer", "minimum": -5, "maximum": 10}},
                           ["color", "count"]),
    "pattern": _obj({"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                     "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}},
                    ["date", "code"]),
    "any_of": _obj({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                                        {"type": "boolean"},
                                        _obj({"unit": {"enum": ["kg", "m"]}}, ["unit"])]}},
                   ["value"]),
    "optional_fields": _obj({"id": {"type": "integer", "minimum": 1, "maximum": 1000},
                             "note": SHORT, "done": {"type": "boolean"}}, ["id"]),
}


def chat(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def outputs(client, path: str, body: dict, stream: bool) -> list[tuple[str, str]]:
    """(text, finish_reason) per choice, in index order; a stream is reassembled."""
    is_chat = path.endswith("chat/completions")
    if not stream:
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text
        return [(c["message"]["content"] if is_chat else c["text"], c["finish_reason"])
                for c in r.json()["choices"]]
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        data = list(iter_sse(r.iter_lines()))
    assert data[-1] == "[DONE]"
    for event in map(json.loads, data[:-1]):
        assert "error" not in event, event
        for c in event["choices"]:
            piece = (c["delta"].get("content") or "") if is_chat else c["text"]
            texts[c["index"]] = texts.get(c["index"], "") + piece
            if c["finish_reason"]:
                reasons[c["index"]] = c["finish_reason"]
    return [(texts[i], reasons.get(i)) for i in sorted(texts)]


def assert_error(r, param: str) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    return err


# ---------------------------------------------------------------- JSON schemas


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_outputs_validate(client, name, stream):
    schema = SCHEMAS[name]
    body = {"messages": chat(f"Reply with a JSON object for: {name.replace('_', ' ')}."),
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": name, "schema": schema,
                                                "strict": True}},
            "n": 3, "temperature": 1.0, "max_tokens": MAX_TOKENS}
    outs = outputs(client, "/v1/chat/completions", body, stream)
    assert len(outs) == 3
    for text, reason in outs:
        assert reason == "stop", (text, reason)
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_completions_take_every_spelling(client, stream):
    """The same schema as response_format, structured_outputs.json (an object or its text)
    and guided_json, on /v1/completions."""
    schema = SCHEMAS["enum_and_range"]
    base = {"prompt": "A color and a count as JSON:", "n": 2, "temperature": 1.0,
            "max_tokens": MAX_TOKENS}
    for extra in ({"response_format": {"type": "json_schema", "json_schema": {
                      "name": "c", "schema": schema}}},
                  {"structured_outputs": {"json": schema}},
                  {"structured_outputs": {"json": json.dumps(schema)}},
                  {"guided_json": schema}):
        for text, reason in outputs(client, "/v1/completions", {**base, **extra}, stream):
            assert reason == "stop", (extra, text, reason)
            jsonschema.validate(json.loads(text), schema)


def test_json_object(client):
    # Any object is allowed, and at temperature 0.7 SmolLM2 loops inside one past 300 tokens
    # in ~40% of samples (seeds 1-8 measured): these seeds' samples end, and must parse.
    body = {"messages": chat("Describe a cat as a JSON object with two short fields."),
            "response_format": {"type": "json_object"}, "n": 2, "temperature": 0.7,
            "max_tokens": 300, "seed": 5}
    for text, reason in outputs(client, "/v1/chat/completions", body, False):
        assert reason == "stop", text
        assert isinstance(json.loads(text), dict)
    body = {"prompt": "JSON:", "structured_outputs": {"json_object": True},
            "temperature": 0.7, "max_tokens": 300, "seed": 2}
    ((text, reason),) = outputs(client, "/v1/completions", body, True)
    assert reason == "stop" and isinstance(json.loads(text), dict), text


# ---------------------------------------------------------------- regex, choice, grammar


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_regex(client, stream):
    date = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    body = {"prompt": "Today's date is", "guided_regex": date, "n": 3, "temperature": 1.0,
            "max_tokens": 30}
    for text, reason in outputs(client, "/v1/completions", body, stream):
        assert reason == "stop" and re.fullmatch(date, text), (text, reason)
    phone = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"
    body = {"messages": chat("What is your phone number?"), "n": 3, "temperature": 1.0,
            "structured_outputs": {"regex": phone}, "max_tokens": 30}
    for text, reason in outputs(client, "/v1/chat/completions", body, stream):
        assert reason == "stop" and re.fullmatch(phone, text), (text, reason)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_structural_tag(client, stream):
    """vLLM's structured_outputs.structural_tag: free text, and whatever follows a trigger
    is its tag's (here: forced at once, a date between <date> and </date>)."""
    tag = {"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": ["<date>"], "at_least_one": True,
        "stop_after_first": True, "tags": [{
            "type": "tag", "begin": "<date>", "end": "</date>",
            "content": {"type": "regex", "pattern": "20[0-9]{2}-[01][0-9]"}}]}}
    body = {"prompt": "Today's date is", "structured_outputs": {"structural_tag": tag},
            "n": 2, "temperature": 1.0, "max_tokens": 30}
    for text, reason in outputs(client, "/v1/completions", body, stream):
        assert reason == "stop" and re.fullmatch(r"<date>20[0-9]{2}-[01][0-9]</date>", text), \
            (text, reason)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_choice(client, stream):
    choices = ["yes", "no", "it depends on the weather"]
    for path, body in [
            ("/v1/chat/completions", {"messages": chat("Is the sky blue?"),
                                      "structured_outputs": {"choice": choices}}),
            ("/v1/completions", {"prompt": "Q: Is water wet? A:", "guided_choice": choices})]:
        outs = outputs(client, path, {**body, "n": 4, "temperature": 1.0, "max_tokens": 20},
                       stream)
        assert len(outs) == 4
        for text, reason in outs:
            assert reason == "stop" and text in choices, (text, reason)


GRAMMAR = """
root ::= answer | answer "," answer | answer "," answer "," answer
answer ::= "yes" | "no"
"""
ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-") term){0,3}
term ::= [1-9] [0-9]? | "(" [1-9] ([+-] [1-9]){0,2} ")"
"""


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_grammar(client, stream):
    body = {"prompt": "Three answers, comma-separated:", "guided_grammar": GRAMMAR, "n": 3,
            "temperature": 1.0, "max_tokens": 20}
    for text, reason in outputs(client, "/v1/completions", body, stream):
        assert reason == "stop" and re.fullmatch(r"(yes|no)(,(yes|no)){0,2}", text), text
    body = {"messages": chat("Write a sum."), "structured_outputs": {"grammar": ARITHMETIC},
            "n": 3, "temperature": 1.0, "max_tokens": 60}
    for text, reason in outputs(client, "/v1/chat/completions", body, stream):
        assert reason == "stop", (text, reason)
        # the grammar's language, checked by evaluating it: digits, + - and balanced parens
        assert re.fullmatch(r"[0-9+\-()]+", text) and text.count("(") == text.count(")"), text
        eval(compile(text, "<grammar output>", "eval"), {"__builtins__": {}})  # parses


# ---------------------------------------------------------------- the OpenAI SDK


def test_openai_sdk_parse_and_response_format(server):
    from typing import Annotated, Literal

    from openai import OpenAI
    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: Annotated[str, Field(max_length=12)]
        kind: Literal["cat", "dog", "fish"]
        legs: Annotated[int, Field(ge=0, le=8)]

    client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                    http_client=server.client(timeout=120.0))
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    done = parse(model="SmolLM2-135M-Instruct", messages=chat("Describe a pet."),
                 response_format=Pet, n=2, temperature=1.0, max_tokens=MAX_TOKENS)
    assert len(done.choices) == 2
    for c in done.choices:
        assert c.finish_reason == "stop" and isinstance(c.message.parsed, Pet), c
        assert c.message.parsed == Pet.model_validate_json(c.message.content)

    # the SDK's streaming helper parses the reassembled stream the same way
    with client.beta.chat.completions.stream(
            model="SmolLM2-135M-Instruct", messages=chat("Describe a pet."), response_format=Pet,
            temperature=1.0, max_tokens=MAX_TOKENS) as s:
        events = [event.type for event in s]
        final = s.get_final_completion()
    assert "content.delta" in events and isinstance(final.choices[0].message.parsed, Pet)

    schema = SCHEMAS["nested"]
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=chat("Where do you live?"), temperature=1.0,
        max_tokens=MAX_TOKENS, response_format={"type": "json_schema", "json_schema": {
            "name": "where", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)

    import openai
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=chat("x"),
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "bad", "schema": {"type": "nonsense"}}})
    assert e.value.body["param"] == "response_format"


# ---------------------------------------------------------------- bad input


CMPL = {"prompt": "Hello", "max_tokens": 5}
# a schema as JSON text nested deeper than Python's recursion limit: json.loads raises
# RecursionError (no ValueError), which once escaped to the engine thread and killed it
DEEP_TEXT = '{"type": "array", "items": ' * 5000 + '{"type": "integer"}' + "}" * 5000


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "{}"}}},
     "response_format"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["ok", ""]}, "guided_choice"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs"),
    ({"guided_regex": 5}, "guided_regex"),
    ({"guided_regex": "a\ud800"}, "guided_regex"),
])
def test_bad_requests_name_the_field(client, extra, param):
    for path, base in [("/v1/completions", CMPL),
                       ("/v1/chat/completions", {"messages": chat("Hi"), "max_tokens": 5})]:
        raw = json.dumps({**base, **extra})  # ASCII escapes: a lone surrogate as "\ud800"
        assert_error(client.post(path, content=raw,
                                 headers={"content-type": "application/json"}), param)


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, "response_format"),
    ({"structured_outputs": {"json": {"type": "object", "properties": {"a": {"$ref": "#/no"}}}}},
     "structured_outputs"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": DEEP_TEXT}, "guided_json"),
    ({"structured_outputs": {"json": DEEP_TEXT}}, "structured_outputs"),
    ({"guided_regex": "("}, "guided_regex"),
    ({"structured_outputs": {"regex": "[z-a]"}}, "structured_outputs"),
    ({"guided_grammar": "root ::= "}, "guided_grammar"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs"),
    ({"guided_grammar": "start ::= \"a\""}, "guided_grammar"),  # no root rule
    ({"structured_outputs": {"structural_tag": {"type": "structural_tag",
                                                "format": {"type": "nope"}}}},
     "structured_outputs"),
])
def test_constraints_the_engine_cannot_compile(client, extra, param):
    """Rejected before any compute (most when the engine compiles them): a 400 naming the
    field the client sent, streamed or not, and the server keeps answering."""
    for stream in (False, True):
        err = assert_error(client.post("/v1/completions", json={**CMPL, **extra,
                                                                "stream": stream}), param)
        assert err["message"]
    r = client.post("/v1/completions", json=CMPL)
    assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text


def test_openapi_documents_the_fields(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for request in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[request]["properties"]
        assert {"response_format", "structured_outputs", "guided_json", "guided_regex",
                "guided_choice", "guided_grammar"} <= set(props), request
    assert set(schemas["StructuredOutputs"]["properties"]) == {
        "json", "regex", "choice", "grammar", "json_object", "structural_tag"}
    assert schemas["ResponseFormat"]["properties"]["type"]["enum"] == [
        "text", "json_object", "json_schema"]
    assert "schema" in schemas["JsonSchemaSpec"]["properties"]


def test_a_constraint_that_allows_nothing_is_no_engine_fault():
    """A constraint whose language is empty (no token, not even the end, may come first): a
    400 or a finished output, and the engine keeps serving. Its own server: the failure it
    guards against stops the engine."""
    empty = [{"guided_regex": "[^\\s\\S]"},
             {"guided_json": {"type": "string", "pattern": "[^\\s\\S]"}},
             {"guided_grammar": "root ::= [^\\x00-\\U0010FFFF]"},
             {"guided_grammar": "root ::= root"}]
    with InProcessServer("--max-num-seqs", "4", "--max-model-len", "256") as srv, \
            srv.client(timeout=120.0) as c:
        for extra in empty:
            r = c.post("/v1/completions", json={**CMPL, **extra})
            assert r.status_code in (200, 400), (extra, r.text)
            assert c.get("/health").status_code == 200, extra


# Schemas whose every output under the keywords xgrammar enforces breaks one it ignores, so
# the outputs can only validate if the keyword is enforced, or be refused (400)
IGNORED_KEYWORDS = {
    "uniqueItems": {"type": "array", "items": {"const": 1}, "minItems": 2, "maxItems": 2,
                    "uniqueItems": True},
    "not": {"enum": [1], "not": {"const": 1}},
    "contains": {"type": "array", "items": {"const": 1}, "maxItems": 1,
                 "contains": {"const": 2}},
    "oneOf": {"oneOf": [{"const": 1}, {"enum": [1]}]},
    "required_but_not_allowed": {"type": "object", "required": ["a"],
                                 "additionalProperties": False},
}


@pytest.mark.parametrize("name", list(IGNORED_KEYWORDS))
def test_a_schema_keyword_the_backend_ignores_is_refused(client, name):
    schema = IGNORED_KEYWORDS[name]
    r = client.post("/v1/completions", json={**CMPL, "guided_json": schema, "n": 2,
                                             "max_tokens": 20})
    if r.status_code == 400:
        assert r.json()["error"]["param"] == "guided_json"
        return
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        jsonschema.validate(json.loads(c["text"]), schema)


def test_logprobs_of_masked_tokens_are_finite_json(client):
    """A choice of 3 with 5 top logprobs: the masked tokens in the top 5 have logprob -inf,
    which JSON cannot carry (it was a 500); they go out as -9999.0, as vLLM sends them."""
    chat = {"messages": [{"role": "user", "content": "Pick a colour."}], "max_tokens": 5,
            "guided_choice": ["red", "green", "blue"], "logprobs": True, "top_logprobs": 5}
    cmpl = {**CMPL, "guided_choice": ["red", "green", "blue"], "logprobs": 5}
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", cmpl)):
        for stream in (False, True):
            r = client.post(path, json={**body, "stream": stream})
            assert r.status_code == 200, (path, stream, r.text[:300])
            assert "-9999.0" in r.text and "Infinity" not in r.text
