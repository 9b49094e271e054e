"""Constrained output, as requests ask for it: OpenAI's `response_format`, vLLM's
`structured_outputs` and its older top-level `guided_json` / `guided_regex` /
`guided_choice` / `guided_grammar` names. A request sends at most one of them; it becomes the
engine's StructuredOutputsParams, which the engine compiles when it takes the request.

The engine names every error about a constraint "structured_outputs"; `for_field` renames it
to the field this request actually sent, so the 400 points at what the client wrote."""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, Field

from engine import StructuredOutputsParams
from engine.errors import ParamError
from server.fields import REQUEST, Text

ENGINE_PARAM = "structured_outputs"  # the param of the engine's errors about a constraint
GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")

JsonSchema = dict[str, Any]


class JsonSchemaSpec(BaseModel):
    model_config = REQUEST
    name: str | None = None  # OpenAI requires a name; nothing here depends on it
    description: str | None = None
    schema_: JsonSchema | None = Field(None, alias="schema",
                                       description="the JSON schema every output follows")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")


class ResponseFormat(BaseModel):
    """OpenAI's: text (no constraint), any JSON object, or JSON under json_schema.schema."""
    model_config = REQUEST
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StructuredOutputs(BaseModel):
    """vLLM's: exactly one of these constrains each output."""
    model_config = REQUEST
    json_: Union[JsonSchema, Text, None] = Field(
        None, alias="json", description="a JSON schema (an object, or its JSON text)")
    regex: Text | None = Field(None, description="the whole output matches this regex")
    choice: list[Text] | None = Field(None, description="the output is one of these strings")
    grammar: Text | None = Field(None, description="an EBNF/GBNF grammar, root rule `root`")
    json_object: bool | None = Field(None, description="any JSON object")
    structural_tag: Union[dict[str, Any], Text, None] = Field(
        None, description="an xgrammar structural tag (an object, or its JSON text): free "
                          "text in which triggers open tags with constrained content")


class ConstraintFields(BaseModel):
    """The request fields that constrain the output (completions and chat)."""
    model_config = REQUEST
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: Union[JsonSchema, Text, None] = Field(
        None, description="vLLM's older name for structured_outputs.json")
    guided_regex: Text | None = Field(None, description="structured_outputs.regex")
    guided_choice: list[Text] | None = Field(None, description="structured_outputs.choice")
    guided_grammar: Text | None = Field(None, description="structured_outputs.grammar")

    def constraint_fields(self) -> list[str]:
        """The fields of this request that ask for a constraint (a text response_format
        asks for none)."""
        fields = []
        if self.response_format is not None and self.response_format.type != "text":
            fields.append("response_format")
        if self.structured_outputs is not None:
            fields.append("structured_outputs")
        return fields + [name for name in GUIDED if getattr(self, name) is not None]

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The request's constraint for SamplingParams, or None. Raises ParamError naming
        the field."""
        fields = self.constraint_fields()
        if len(fields) > 1:
            raise ParamError(fields[1], f"{' and '.join(fields)} each constrain the output; "
                                        f"send one of them")
        if not fields:
            return None
        field = fields[0]
        try:
            return StructuredOutputsParams(**self._params_kwargs(field))
        except ParamError as e:
            raise for_field(e, field) from None

    def _params_kwargs(self, field: str) -> dict:
        if field == "response_format":
            fmt = self.response_format
            if fmt.type == "json_object":
                return {"json_object": True}
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise ParamError("response_format", "response_format of type json_schema needs "
                                                    "json_schema.schema, a JSON schema object")
            return {"json": fmt.json_schema.schema_}
        if field == "structured_outputs":
            so = self.structured_outputs
            return {"json": so.json_, "regex": so.regex, "choice": so.choice,
                    "grammar": so.grammar, "json_object": bool(so.json_object),
                    "structural_tag": so.structural_tag}
        # a schema sent as text is parsed by the engine (engine/structured_output.py), which
        # refuses text that is not JSON or nests too deeply
        return {field.removeprefix("guided_"): getattr(self, field)}


def for_field(e: Exception, field: str | None) -> Exception:
    """An engine error about the constraint, as an error about `field` (the request's name
    for it); any other error as it is."""
    if not (isinstance(e, ParamError) and e.param == ENGINE_PARAM and field
            and field != ENGINE_PARAM):
        return e
    message = str(e)
    if message.startswith(ENGINE_PARAM):
        message = field + message[len(ENGINE_PARAM):]
    return ParamError(field, message)
