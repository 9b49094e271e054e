"""Structured output: a grammar matcher per constrained sequence and, each step, its row of the
logits masked to the tokens the grammar allows next (EOS only where the grammar may end).

The grammar work is xgrammar's (JSON schema, regex, EBNF compiled against the tokenizer's
vocabulary; no automaton code of our own). Why xgrammar: on the project's 2-core EPYC with
SmolLM2's 49152-token vocabulary, the mask of a JSON-schema row while generating a 47-token
object took ~2 us median (96 us worst) with xgrammar 0.2.9 against ~21 us median (7 ms on the
first call) with llguidance 1.9.1; compiling the schema took 8 ms (0.1 ms from the cache); and
xgrammar's matchers fork, which n > 1 and beam search need. (Both validated the same output.)

A structural tag (xgrammar's, vLLM's `structural_tag`) is free text in which a trigger string
opens a tag whose content follows its own format: tool_choice "auto" for a model that writes
Hermes-style `<tool_call>` blocks constrains each call's arguments to its function's schema
this way (server/tools.py builds the tag). Its JSON schemas meet the same checks as `json`.

JSON is generated compactly (`", "` and `": "` separators, no free whitespace): a small model
sampling at temperature 1 would otherwise spend its tokens on blank lines.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections import OrderedDict

import torch

from engine.errors import ParamError
from engine.sampling_params import StructuredOutputsParams
from engine.sequence import Sequence
from kernels import cpu as cpu_kernels

logger = logging.getLogger("kvserve.engine")

CACHE_SIZE = 256  # compiled grammars kept (least recently used dropped)


class StructuredOutputs:
    """Compiles constraints (cached by value) and masks the constrained rows of a step."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._compiler = None              # made at the first constrained request
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._bitmask: torch.Tensor | None = None
        self.num_compiles = 0              # cache misses (tests and logs read this)

    # ---------------------------------------------------------------- compile

    def matcher(self, spec: StructuredOutputsParams):
        """A fresh matcher for spec; ParamError("structured_outputs") if spec is invalid or
        something the backend cannot express."""
        import xgrammar as xgr
        try:
            return xgr.GrammarMatcher(self._compiled(spec))
        except RecursionError:  # a schema nested past Python's limit (json, jsonschema)
            raise ParamError("structured_outputs", "structured_outputs: the constraint nests "
                                                   "too deeply") from None

    def _compiled(self, spec: StructuredOutputsParams):
        key = _key(spec)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        compiler = self._get_compiler()
        t0 = time.perf_counter()
        try:
            compiled = _compile(compiler, spec)
        except ParamError:
            raise
        except Exception as e:  # noqa: BLE001 - xgrammar's errors: a bad schema/regex/grammar
            # its C++ messages start "[hh:mm:ss] /path/file.cc:123: "
            reason = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e).strip()) or type(e).__name__
            raise ParamError("structured_outputs", f"structured_outputs: the {spec.kind} "
                                                   f"constraint cannot be used: {reason}") from None
        import xgrammar as xgr
        probe = xgr.allocate_token_bitmask(1, self.vocab_size)
        xgr.GrammarMatcher(compiled).fill_next_token_bitmask(probe, 0)
        if not probe.any():  # an empty language: no token, not even the end, may come first
            raise ParamError("structured_outputs", f"structured_outputs: the {spec.kind} "
                                                   f"constraint allows no output at all")
        self.num_compiles += 1
        logger.debug("compiled a %s constraint in %.1f ms", spec.kind,
                     (time.perf_counter() - t0) * 1e3)
        self._cache[key] = compiled
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return compiled

    def _get_compiler(self):
        if self._compiler is None:
            if self.tokenizer is None:
                raise ParamError("structured_outputs", "structured outputs need the model's "
                                                       "tokenizer; this model has none")
            try:
                import xgrammar as xgr
            except ImportError as e:
                raise ParamError("structured_outputs", f"structured outputs need the xgrammar "
                                                       f"package ({e})") from None
            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer.hf, vocab_size=self.vocab_size,
                stop_token_ids=self.eos_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler

    # ---------------------------------------------------------------- one step

    @torch.inference_mode()  # the runner's logits are inference tensors
    def apply(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Mask, in place, the logits rows of constrained sequences to what their grammar
        allows next. logits: [len(seqs), V] float32, row i is seqs[i]'s."""
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if not rows:
            return
        import xgrammar as xgr
        if self._bitmask is None or self._bitmask.shape[0] < len(seqs):
            self._bitmask = xgr.allocate_token_bitmask(max(len(seqs), 16), self.vocab_size)
        bitmask = self._bitmask[:len(seqs)]
        for i in rows:
            if seqs[i].grammar.is_terminated():  # nothing may follow: a row of no tokens (a
                bitmask[i] = 0                   # sequence should have ended; never a crash)
            else:
                seqs[i].grammar.fill_next_token_bitmask(bitmask, i)
        if logits.device.type == "cpu" and logits.dtype == torch.float32 \
                and logits.is_contiguous() and cpu_kernels.available():
            # kvserve's own pass on its thread pool: xgrammar's CPU kernel took ~1.6 ms for 16
            # rows right after a fused step (0.2 ms alone), this ~0.1 ms (bench/structured.py)
            allowed = cpu_kernels.apply_bitmask(logits, bitmask, rows)
        else:
            allowed = bitmask[rows].ne(0).any(dim=1).tolist()
            xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size,
                                            indices=rows)
        # a grammar can reach a state no token leads on from (e.g. a length the tokenizer
        # cannot spell): such a row keeps only EOS, and the output processor ends it when
        # the grammar refuses that (finish_reason "abort")
        for i, n in zip(rows, allowed):
            if not n:
                logits[i, self.eos_token_ids] = 0.0


def _key(spec: StructuredOutputsParams) -> tuple:
    value = getattr(spec, spec.kind)
    if spec.kind in ("json", "structural_tag"):  # an object or its text: the same key
        try:
            value = json.dumps(json.loads(value) if isinstance(value, str) else value,
                               sort_keys=True)
        except ValueError:
            pass  # not JSON: refused by _compile, and not cached
    elif spec.kind == "choice":
        value = tuple(value)
    return spec.kind, value


def _json_object(value, field: str, what: str) -> dict:
    """A constraint given as an object or as JSON text: the object, or a ParamError."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ParamError("structured_outputs",
                             f"structured_outputs: {field} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ParamError("structured_outputs", f"structured_outputs: {what} must be an object")
    return value


def _compile(compiler, spec: StructuredOutputsParams):
    kind = spec.kind
    if kind == "json":
        schema = _json_object(spec.json, "json", "a JSON schema")
        _check_schema(schema)
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    if kind == "json_object":
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
    if kind == "structural_tag":
        tag = _json_object(spec.structural_tag, "structural_tag", "a structural tag")
        for schema in _tag_schemas(tag):
            if isinstance(schema, dict):
                _check_schema(schema)
        return compiler.compile_structural_tag(json.dumps(tag))
    if kind == "regex":
        return compiler.compile_regex(spec.regex)
    if kind == "grammar":
        return compiler.compile_grammar(spec.grammar)
    # choice: one of the strings exactly, as an EBNF alternation of quoted literals
    alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
    return compiler.compile_grammar(f"root ::= {alternatives}")


# JSON-schema keywords xgrammar 0.2.9 compiles without enforcing (measured: outputs break
# them), refused instead of silently weakened. `allOf` is taken with one member only.
UNSUPPORTED_KEYWORDS = frozenset({
    "not", "oneOf", "if", "then", "else", "contains", "minContains", "maxContains",
    "uniqueItems", "multipleOf", "minProperties", "maxProperties", "propertyNames",
    "dependentRequired", "dependentSchemas", "dependencies", "unevaluatedProperties",
    "unevaluatedItems"})


def _check_schema(schema: dict) -> None:
    """A schema that is not a valid JSON schema, or uses what the backend would ignore, is
    refused by name rather than compiled into something weaker."""
    try:
        import jsonschema
    except ImportError:  # the compiler's own checks still apply
        jsonschema = None
    if jsonschema is not None:
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.exceptions.SchemaError as e:
            raise ParamError("structured_outputs", f"structured_outputs: not a valid JSON "
                                                   f"schema: {e.message}") from None
    for node in _subschemas(schema):
        bad = sorted(UNSUPPORTED_KEYWORDS & node.keys())
        if len(node.get("allOf", ())) > 1:
            bad.append("allOf with more than one member")
        if bad:
            raise ParamError("structured_outputs", f"structured_outputs: the JSON schema uses "
                                                   f"{', '.join(bad)}, which kvserve's grammar "
                                                   f"backend cannot enforce")
        required, props = node.get("required", ()), node.get("properties", {})
        if node.get("additionalProperties") is False:
            missing = [name for name in required if name not in props]
            if missing:
                raise ParamError("structured_outputs", f"structured_outputs: required "
                                                       f"{missing} are not in properties and "
                                                       f"additionalProperties is false: no "
                                                       f"object can satisfy it")


def _tag_schemas(tag):
    """The JSON schemas inside a structural tag: its json_schema formats' (and the legacy
    form's `structures[].schema`)."""
    stack = [tag]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if node.get("type") == "json_schema" and "json_schema" in node:
                yield node["json_schema"]
            elif "schema" in node and "begin" in node:
                yield node["schema"]
            stack.extend(v for k, v in node.items() if k not in ("json_schema", "schema"))


def _subschemas(schema):
    """Every schema object in a JSON schema, walked by structure (a property named "not" is
    a name, not a keyword)."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        yield node
        for key in ("properties", "patternProperties", "$defs", "definitions",
                    "dependentSchemas"):
            if isinstance(node.get(key), dict):
                stack.extend(node[key].values())
        for key in ("items", "additionalProperties", "not", "contains", "if", "then", "else",
                    "propertyNames", "unevaluatedItems", "unevaluatedProperties"):
            stack.append(node.get(key))
        for key in ("anyOf", "allOf", "oneOf", "prefixItems", "items"):
            if isinstance(node.get(key), list):
                stack.extend(node[key])
