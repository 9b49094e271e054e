"""Structured output in the engine (offline API): every sampled output of a constrained
request is in its language, constrained and free rows share a batch, forks keep their own
grammar state, compilation is cached, and bad constraints are refused by name."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from engine import SamplingParams, StructuredOutputsParams as SO
from engine.errors import ParamError
from engine.sequence import Sequence

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["red", "green"]},
                                  "minItems": 1, "maxItems": 3}},
          "required": ["name", "age", "tags"]}


@pytest.fixture(scope="module")
def llm():
    from engine import LLM
    return LLM(max_num_seqs=16, kv_cache_memory="256MiB")


@pytest.fixture(scope="module")
def prompt(llm):
    return llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "Describe a person."}], True)


def texts(llm, prompt, **kw) -> list:
    return llm.generate([prompt], SamplingParams(**kw), use_tqdm=False)[0].outputs


def test_unconstrained_output_is_not_json_but_constrained_output_validates(llm, prompt):
    free = texts(llm, prompt, temperature=0, max_tokens=40)[0].text
    with pytest.raises(ValueError):  # the model answers in prose: the constraint has work to do
        json.loads(free)
    outs = texts(llm, prompt, n=4, temperature=1.0, seed=3, max_tokens=160,
                 structured_outputs=SO(json=PERSON))
    for out in outs:
        assert out.finish_reason == "stop", out
        jsonschema.validate(json.loads(out.text), PERSON)
    assert len({o.text for o in outs}) > 1  # forks sample on their own grammar state


def test_regex_choice_grammar_and_json_object(llm, prompt):
    for out in texts(llm, prompt, n=3, temperature=1.0, seed=1, max_tokens=20,
                     structured_outputs=SO(regex=r"\d{4}-\d{2}-\d{2}")):
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", out.text), out.text
    for out in texts(llm, prompt, n=3, temperature=1.0, seed=2, max_tokens=10,
                     structured_outputs=SO(choice=["yes", "no", "it \"depends\""])):
        assert out.text in ("yes", "no", 'it "depends"'), out.text
    grammar = 'root ::= item (", " item)*\nitem ::= [0-9]+ " " ("apples" | "pears")'
    for out in texts(llm, prompt, n=3, temperature=1.0, seed=4, max_tokens=40,
                     structured_outputs=SO(grammar=grammar)):
        if out.finish_reason == "stop":
            assert re.fullmatch(r"[0-9]+ (apples|pears)(, [0-9]+ (apples|pears))*", out.text)
    for out in texts(llm, prompt, n=2, temperature=1.0, seed=5, max_tokens=120,
                     structured_outputs=SO(json_object=True)):
        assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict)


def test_constrained_and_free_rows_share_a_batch(llm, prompt):
    alone = texts(llm, prompt, temperature=0, max_tokens=24)[0].token_ids
    outs = llm.generate([prompt, prompt], [
        SamplingParams(temperature=0, max_tokens=24),
        SamplingParams(temperature=0, max_tokens=160, structured_outputs=SO(json=PERSON))],
        use_tqdm=False)
    assert outs[0].outputs[0].token_ids == alone  # the free row is not masked
    jsonschema.validate(json.loads(outs[1].outputs[0].text), PERSON)


def test_beam_search_keeps_every_beam_in_the_language(llm, prompt):
    outs = texts(llm, prompt, n=2, use_beam_search=True, beam_width=3, max_tokens=100,
                 structured_outputs=SO(json=PERSON))
    for out in outs:
        jsonschema.validate(json.loads(out.text), PERSON)


def test_the_grammar_ends_the_output_even_with_ignore_eos_and_min_tokens(llm, prompt):
    out = texts(llm, prompt, temperature=0, max_tokens=30, ignore_eos=True, min_tokens=5,
                structured_outputs=SO(choice=["yes", "no"]))[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop"


def test_compilation_is_cached_by_value(llm, prompt):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    before = llm.engine.structured.num_compiles
    for _ in range(3):  # the same schema, as an object and as text: compiled once
        texts(llm, prompt, temperature=0, max_tokens=20, structured_outputs=SO(json=schema))
    texts(llm, prompt, temperature=0, max_tokens=20,
          structured_outputs=SO(json=json.dumps(schema)))
    assert llm.engine.structured.num_compiles == before + 1


@pytest.mark.parametrize("bad, words", [
    (SO(json={"type": "nonsense"}), "not a valid JSON schema"),
    (SO(json="{"), "not valid JSON"),
    (SO(regex="("), "regex constraint cannot be used"),
    (SO(grammar="root ::= "), "grammar constraint cannot be used"),
    (SO(structural_tag="{"), "structural_tag is not valid JSON"),
    (SO(structural_tag={"type": "structural_tag", "format": {"type": "nonsense"}}),
     "structural_tag constraint cannot be used"),
    (SO(structural_tag={"type": "structural_tag", "format": {  # a schema keyword not enforced
        "type": "triggered_tags", "triggers": ["<a>"], "tags": [{
            "type": "tag", "begin": "<a>", "end": "</a>",
            "content": {"type": "json_schema", "json_schema": {"not": {"type": "null"}}}}]}}),
     "uses not"),
])
def test_bad_constraints_are_refused_before_anything_runs(llm, bad, words):
    engine = llm.engine
    with pytest.raises(ParamError, match=words) as e:
        engine.add_request("bad", [1, 2, 3], SamplingParams(structured_outputs=bad))
    assert e.value.param == "structured_outputs"
    assert not engine.has_unfinished_requests()


def test_the_params_need_exactly_one_constraint():
    for kw in ({}, {"json": {}, "regex": "a"}, {"choice": []}, {"regex": ""}):
        with pytest.raises(ParamError) as e:
            SO(**kw)
        assert e.value.param == "structured_outputs"


def test_the_cpu_bitmask_kernel_equals_xgrammars():
    import torch
    import xgrammar as xgr

    from kernels import cpu
    if not cpu.available():
        pytest.skip(f"CPU kernels unavailable: {cpu.unavailable_reason()}")
    vocab = 49157  # not a multiple of 32: the last word is partial
    gen = torch.Generator().manual_seed(0)
    for rows in ([0, 3, 5], list(range(8))):
        logits = torch.randn(8, vocab, generator=gen)
        ref = logits.clone()
        bitmask = torch.randint(-2**31, 2**31 - 1, (8, (vocab + 31) // 32), dtype=torch.int32,
                                generator=gen)
        bitmask[1] = -1  # every token allowed
        bitmask[2] = 0   # none (a stuck grammar)
        allowed = cpu.apply_bitmask(logits, bitmask, rows)
        xgr.apply_token_bitmask_inplace(ref, bitmask, vocab_size=vocab, indices=rows)
        assert torch.equal(logits, ref)
        assert allowed == [int(ref[r].isfinite().sum()) for r in rows]
        assert (logits == float("-inf")).any()


def test_a_schema_nested_past_the_recursion_limit_is_a_param_error(llm):
    deep = {"type": "object"}
    for _ in range(5000):
        deep = {"type": "array", "items": deep}
    for spec in (SO(json=deep), SO(json='{"a":' * 5000 + "1" + "}" * 5000)):
        with pytest.raises(ParamError) as e:
            llm.engine.add_request("deep", [1, 2, 3], SamplingParams(structured_outputs=spec))
        assert e.value.param == "structured_outputs"
    assert not llm.engine.has_unfinished_requests()


def test_an_empty_language_is_refused_and_a_dead_end_ends_the_output(llm, prompt):
    for spec in (SO(regex="[^\\s\\S]"), SO(grammar="root ::= root")):
        with pytest.raises(ParamError, match="allows no output"):
            llm.engine.add_request("empty", [1, 2, 3], SamplingParams(structured_outputs=spec))
    # a string that no text matches: the grammar opens the quote, then has no way on
    dead = SO(json={"type": "string", "pattern": "[^\\s\\S]"})
    out = texts(llm, prompt, temperature=1.0, max_tokens=20, ignore_eos=True,
                structured_outputs=dead)[0]
    assert out.finish_reason == "abort" and out.text == '"'
    assert texts(llm, prompt, temperature=0, max_tokens=3)[0].finish_reason == "length"


def test_a_template_that_renders_tools_gets_them(llm):
    import copy

    from engine.tokenizer import Tokenizer
    hf = copy.deepcopy(llm.get_tokenizer().hf)
    hf.chat_template = ("{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}"
                        "{% for m in messages %}{{ m.content }}{% endfor %}")
    tok = Tokenizer(hf)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    with_tools = tok.decode(tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                    tools=tools))
    assert "[tool get_weather]" in with_tools and with_tools.endswith("hi")
    assert "[tool" not in tok.decode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))


def test_a_stop_string_still_ends_a_constrained_output(llm, prompt):
    out = texts(llm, prompt, temperature=0, max_tokens=20, stop=["-"],
                structured_outputs=SO(choice=["abc-def"]))[0]
    assert (out.text, out.finish_reason, out.stop_reason) == ("abc", "stop", "-")


CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"], "additionalProperties": False}
CALL_HEAD = '<tool_call>\n{"name": "get_weather", "arguments": '


def call_tag(at_least_one: bool) -> dict:
    """A Hermes-style tool call as a structural tag: free text, and after `<tool_call>` a
    call whose arguments follow CITY (as server/tools.py builds it for tool_choice auto)."""
    return {"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": ["<tool_call>"], "at_least_one": at_least_one,
        "tags": [{"type": "tag", "begin": CALL_HEAD, "end": "}\n</tool_call>",
                  "content": {"type": "json_schema", "json_schema": CITY}}]}}


def test_a_structural_tag_constrains_what_follows_its_trigger(llm):
    """at_least_one makes SmolLM2 open a call at once; whatever it samples after the trigger
    is a call whose arguments validate, closed by the end tag; text may follow it."""
    prompt = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "What is the weather in Paris?"}], True)
    before = llm.engine.structured.num_compiles
    outs = texts(llm, prompt, n=2, temperature=1.0, seed=1, max_tokens=56,
                 structured_outputs=SO(structural_tag=call_tag(True)))
    for out in outs:
        assert out.text.startswith(CALL_HEAD), out.text
        call, end = json.JSONDecoder().raw_decode(out.text, out.text.index("{"))
        assert call["name"] == "get_weather", out.text
        jsonschema.validate(call["arguments"], CITY)
        assert out.text[end:].startswith("\n</tool_call>"), out.text
    # as text (the same value): no new compile; without at_least_one the model answers in
    # prose, which the tag leaves free
    free = texts(llm, prompt, temperature=0, max_tokens=12)[0].text
    tagged = texts(llm, prompt, temperature=0, max_tokens=12,
                   structured_outputs=SO(structural_tag=json.dumps(call_tag(False))))[0].text
    assert tagged == free and "<tool_call>" not in free
    assert llm.engine.structured.num_compiles == before + 2


def test_beam_search_with_ignore_eos_ends_where_the_grammar_ends(llm):
    """ignore_eos makes EOS an ordinary candidate for beams, but a grammar that took EOS has
    ended: the beam closes there (the soak found the engine crashing on the next mask)."""
    so = SO(choice=["red", "green", "blue"])
    out = llm.generate("Pick a color:", SamplingParams(
        use_beam_search=True, n=2, beam_width=2, temperature=0, max_tokens=10, ignore_eos=True,
        structured_outputs=so), use_tqdm=False)[0]
    assert {o.text for o in out.outputs} <= {"red", "green", "blue"}
    assert all(o.finish_reason == "stop" for o in out.outputs)


def test_a_terminated_grammar_row_is_masked_to_eos_not_a_crash(llm):
    import torch
    engine = llm.engine
    seq = Sequence("t", 0, [1, 2], SamplingParams())
    seq.grammar = engine.structured.matcher(SO(choice=["a"]))
    tok = llm.get_tokenizer()
    for t in tok.encode("a", add_special_tokens=False):
        assert seq.grammar.accept_token(t)
    eos = min(engine.eos_token_ids)
    assert seq.grammar.accept_token(eos) and seq.grammar.is_terminated()
    logits = torch.zeros(1, engine.config.model.vocab_size)
    engine.structured.apply([seq], logits)
    assert logits[0].isfinite().nonzero().flatten().tolist() == sorted(engine.eos_token_ids)
