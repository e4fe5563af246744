"""The request fields that constrain what is generated, read from OpenAI and vLLM bodies and from
WebSocket `params`: `response_format` (text, json_object, json_schema), vLLM's
`structured_outputs` (json, regex, choice, grammar, json_object) and its older `guided_*` names,
`tools` / `tool_choice`, and `logit_bias`. Shared by the gateway and the client; no torch here.

`parse_constraint_fields` returns plain checked values for `GenParams`; `constraint_for` gives
the one constraint a request is generated under (a forced tool choice's schema, or the
structured output asked for), as a dict `SamplingParams.structured_outputs` takes.
"""

from __future__ import annotations

from typing import Any

from asyncllm.tools import ToolError, is_forced, parse_tool_choice, parse_tools, tool_constraint

CONSTRAINT_FIELDS = frozenset(
    {"response_format", "structured_outputs", "tools", "tool_choice", "logit_bias"}
    | {"guided_json", "guided_regex", "guided_choice", "guided_grammar"}
)
_SO_KEYS = ("json", "regex", "choice", "grammar", "json_object")


class ConstraintError(ValueError):
    pass


def _response_format(rf: Any) -> dict[str, Any] | None:
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise ConstraintError("response_format must be an object")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise ConstraintError("response_format.json_schema must be an object")
        schema = js.get("schema")
        if schema is None:
            schema = {"type": "object"}
        if not isinstance(schema, dict):
            raise ConstraintError("response_format.json_schema.schema must be a JSON schema")
        strict = js.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ConstraintError("response_format.json_schema.strict must be true or false")
        # strict or not, the schema is enforced: a grammar costs nothing more when it is exact.
        return {"json": schema}
    raise ConstraintError(
        f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}"
    )


def _structured_outputs(obj: dict[str, Any]) -> dict[str, Any] | None:
    so = obj.get("structured_outputs")
    guided = {
        k: obj[f"guided_{k}"]
        for k in ("json", "regex", "choice", "grammar")
        if obj.get(f"guided_{k}") is not None
    }
    if so is None and not guided:
        return None
    if so is not None and guided:
        raise ConstraintError("send structured_outputs or guided_*, not both")
    if so is None:
        so = guided
    if not isinstance(so, dict):
        raise ConstraintError("structured_outputs must be an object")
    unknown = sorted(k for k in so if k not in _SO_KEYS and so[k] is not None)
    if unknown:
        raise ConstraintError(f"unknown structured_outputs fields {unknown}; known: {_SO_KEYS}")
    out = {k: so[k] for k in _SO_KEYS if so.get(k) not in (None, False)}
    if len(out) != 1:
        raise ConstraintError(f"structured_outputs needs exactly one of {list(_SO_KEYS)}")
    ((key, value),) = out.items()
    if key == "json" and not isinstance(value, (dict, str)):
        raise ConstraintError("structured_outputs.json must be a JSON schema")
    if key in ("regex", "grammar") and (not isinstance(value, str) or not value):
        raise ConstraintError(f"structured_outputs.{key} must be a non-empty string")
    if key == "choice" and (
        not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value)
    ):
        raise ConstraintError("structured_outputs.choice must be a non-empty list of strings")
    if key == "json_object" and value is not True:
        raise ConstraintError("structured_outputs.json_object must be true")
    return out


def _logit_bias(obj: Any) -> dict[int, float] | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise ConstraintError("logit_bias must map token ids to numbers")
    out: dict[int, float] = {}
    for k, v in obj.items():
        try:
            tid = int(k)
        except (TypeError, ValueError):
            raise ConstraintError(f"logit_bias key {k!r} is not a token id") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise ConstraintError(f"logit_bias[{k}] must be a number in [-100, 100]")
        if tid < 0:
            raise ConstraintError(f"logit_bias key {k!r} is not a token id")
        out[tid] = float(v)
    return out or None


def parse_constraint_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """The constraint fields of a request body / params object, checked: keyword arguments for
    GenParams (structured_outputs, tools, tool_choice, logit_bias). ConstraintError on bad
    input."""
    try:
        tools = parse_tools(obj.get("tools"))
        choice = parse_tool_choice(obj.get("tool_choice"), tools)
    except ToolError as e:
        raise ConstraintError(str(e)) from None
    rf = _response_format(obj.get("response_format"))
    so = _structured_outputs(obj)
    if rf is not None and so is not None:
        raise ConstraintError("send response_format or structured_outputs, not both")
    so = so or rf
    if so is not None and is_forced(choice):
        raise ConstraintError(f"tool_choice {choice!r} cannot be combined with {so!r}")
    out: dict[str, Any] = {}
    if so is not None:
        out["structured_outputs"] = so
    if tools:
        out["tools"] = tools
        out["tool_choice"] = choice
    lb = _logit_bias(obj.get("logit_bias"))
    if lb:
        out["logit_bias"] = lb
    return out


def constraint_for(
    structured_outputs: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None,
    tool_choice: str | None,
) -> dict[str, Any] | None:
    """The constraint a request is generated under (a dict for SamplingParams)."""
    if tools and is_forced(tool_choice):
        assert tool_choice is not None
        return {"json": tool_constraint(tools, tool_choice)}
    return structured_outputs
