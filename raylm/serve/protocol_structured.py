"""Request fields that constrain the output, as OpenAI and vLLM spell them, and their one
engine form (`StructuredOutputsParams`): chat's `response_format` (json_object, json_schema),
vLLM's `structured_outputs` object and its older `guided_json` / `guided_regex` /
`guided_choice` / `guided_grammar` fields, on both endpoints. At most one may be given."""
from __future__ import annotations

import json
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, Strict

from raylm.sampling_params import StructuredOutputsParams

SStr = Annotated[str, Strict()]
SBool = Annotated[bool, Strict()]
JsonSchema = Union[Dict[str, Any], SStr]  # an object, or its JSON text
GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class JsonSchemaFormat(_Model):
    name: Optional[SStr] = None
    description: Optional[SStr] = None
    schema_: Optional[Dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[SBool] = None


class ResponseFormat(_Model):
    """OpenAI's chat `response_format`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class FunctionDef(_Model):
    name: Annotated[str, Strict(), Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: Optional[SStr] = None
    parameters: Optional[Dict[str, Any]] = None
    strict: Optional[SBool] = None


class ChatTool(_Model):
    """One entry of chat's `tools`."""

    type: Literal["function"] = "function"
    function: FunctionDef


class _FunctionName(_Model):
    name: SStr


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: _FunctionName


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class _CalledFunction(_Model):
    name: SStr
    arguments: SStr  # JSON text, as the API returned it


class MessageToolCall(_Model):
    """A call an earlier assistant turn made (in `messages`)."""

    id: Optional[SStr] = None
    type: Literal["function"] = "function"
    function: _CalledFunction

    def to_template_dict(self) -> Dict[str, Any]:
        """For chat templates, which write `arguments` out with `tojson`: a dict when the
        text is a JSON object (else the text, as given)."""
        try:
            args = json.loads(self.function.arguments)
        except ValueError:
            args = self.function.arguments
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name, "arguments": args}}


class StructuredOutputsField(_Model):
    """vLLM's `structured_outputs` request object (one of its constraints)."""

    json_: Optional[JsonSchema] = Field(default=None, alias="json")
    json_object: Optional[SBool] = None
    regex: Optional[SStr] = None
    choice: Optional[List[SStr]] = None
    grammar: Optional[SStr] = None


class StructuredFields(_Model):
    """Mixed into both request models."""

    structured_outputs: Optional[StructuredOutputsField] = None
    guided_json: Optional[JsonSchema] = None
    guided_regex: Optional[SStr] = None
    guided_choice: Optional[List[SStr]] = None
    guided_grammar: Optional[SStr] = None

    def structured_params(self, response_format: Optional[ResponseFormat] = None
                          ) -> Optional[StructuredOutputsParams]:
        """The one constraint given (None if none); a ValueError naming the field if more
        than one is given or one is incomplete."""
        found = {name: getattr(self, name) for name in ("structured_outputs",) + GUIDED
                 if getattr(self, name) is not None}
        if response_format is not None and response_format.type != "text":
            found["response_format"] = response_format
        if len(found) > 1:
            raise ValueError(f"{sorted(found)[0]}: give one output constraint, not "
                             f"{', '.join(sorted(found))}")
        if not found:
            return None
        (field, value), = found.items()
        kwargs = _constraint(field, value)
        return StructuredOutputsParams(**kwargs, field=field)


def _constraint(field: str, value: Any) -> Dict[str, Any]:
    if field == "response_format":
        if value.type == "json_object":
            return {"json_object": True}
        if value.json_schema is None or value.json_schema.schema_ is None:
            raise ValueError("response_format: json_schema needs a 'schema'")
        return {"json": value.json_schema.schema_}
    if field == "structured_outputs":
        return {"json": value.json_, "json_object": bool(value.json_object), "regex": value.regex,
                "choice": value.choice, "grammar": value.grammar}
    return {{"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
             "guided_grammar": "grammar"}[field]: value}
