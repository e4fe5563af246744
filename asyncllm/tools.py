"""Tool calls (OpenAI `tools` / `tool_choice`), shared by the gateway's HTTP and WebSocket sides.
No torch here.

- `parse_tools`, `parse_tool_choice`: check the request's fields.
- `tool_constraint`: the grammar a `required` or named choice is enforced with (a JSON schema), so
  even a small model answers with a valid call.
- `ToolCallParser`s turn a model's own tool-call format into calls (`auto`): Hermes/Qwen
  `<tool_call>{json}</tool_call>`, Llama 3 JSON `{"name", "parameters"}`, Mistral
  `[TOOL_CALLS][{...}]`; `parser_for_model` picks one from the tokenizer and chat template.
- `ToolCallStream` turns one choice's text deltas into content deltas and tool-call deltas in the
  shape the `openai` SDK assembles (`index`, then `id`/`type`/`function.name` once, then pieces
  of `function.arguments`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

AUTO, NONE, REQUIRED = "auto", "none", "required"
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")


class ToolError(ValueError):
    """A bad `tools` / `tool_choice` field (the caller turns it into a 400 / error frame)."""


def parse_tools(obj: Any) -> list[dict[str, Any]] | None:
    """OpenAI `tools`: [{"type": "function", "function": {"name", "description"?,
    "parameters"?}}]. Returns the function objects (parameters defaulting to any object)."""
    if obj is None:
        return None
    if not isinstance(obj, list):
        raise ToolError("tools must be a list")
    out = []
    names: set[str] = set()
    for i, t in enumerate(obj):
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise ToolError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise ToolError(f"tools[{i}].function must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, _ . -")
        if name in names:
            raise ToolError(f"tools has two functions named {name!r}")
        names.add(name)
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolError(f"tools[{i}].function.description must be a string")
        f = {"name": name, "parameters": params}
        if desc is not None:
            f["description"] = desc
        out.append(f)
    return out or None


def parse_tool_choice(obj: Any, tools: list[dict[str, Any]] | None) -> str | None:
    """ "auto" | "none" | "required" | a function's name; None when there are no tools."""
    if obj is None:
        return AUTO if tools else None
    if isinstance(obj, str):
        if obj not in (AUTO, NONE, REQUIRED):
            raise ToolError("tool_choice must be 'auto', 'none', 'required' or a function")
        choice = obj
    elif isinstance(obj, dict) and isinstance(obj.get("function"), dict):
        choice = obj["function"].get("name")
        if not isinstance(choice, str):
            raise ToolError("tool_choice.function.name must be a string")
    else:
        raise ToolError("tool_choice must be 'auto', 'none', 'required' or a function")
    if choice == NONE:
        return NONE
    if not tools:
        raise ToolError(f"tool_choice {choice!r} needs tools")
    if choice not in (AUTO, REQUIRED) and choice not in {t["name"] for t in tools}:
        raise ToolError(f"tool_choice names {choice!r}, which is not in tools")
    return choice


def is_forced(choice: str | None) -> bool:
    return choice not in (None, AUTO, NONE)


def tool_constraint(tools: list[dict[str, Any]], choice: str) -> dict[str, Any]:
    """The JSON schema (a `structured_outputs.json`) that enforces a forced choice: a named
    function's arguments object, or for `required` a non-empty list of {name, parameters}."""
    if choice != REQUIRED:
        fn = next(t for t in tools if t["name"] == choice)
        return fn["parameters"]
    return {
        "type": "array",
        "minItems": 1,
        "items": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [t["name"]]},
                        "parameters": t["parameters"],
                    },
                    "required": ["name", "parameters"],
                }
                for t in tools
            ]
        },
    }


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """For chat templates that do not render tools themselves: the Hermes tool prompt."""
    lines = "\n".join(json.dumps({"type": "function", "function": t}) for t in tools)
    return (
        "You may call one or more functions to assist with the user query. Function "
        f"signatures:\n<tools>\n{lines}\n</tools>\nFor each function call, return a JSON object "
        "with the function name and arguments within <tool_call></tool_call> tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


# ---- parsers of a model's own tool-call format (tool_choice "auto") -----------------------------


def _call_from(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolCallParser:
    """Finds tool calls in a finished answer. `start` is the marker that begins the calls part
    (text before it is content, streamed as it comes)."""

    name = ""
    start = ""

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls); no calls (and all the text as content) when none parse."""
        raise NotImplementedError

    def start_index(self, text: str) -> int | None:
        """Where the calls begin in the text so far; -1: not (yet); None: cannot tell yet."""
        return text.find(self.start)

    def partial_tail(self, text: str) -> int:
        """How many trailing characters could be the start of the marker (held back)."""
        for k in range(min(len(self.start) - 1, len(text)), 0, -1):
            if self.start.startswith(text[-k:]):
                return k
        return 0


class HermesParser(ToolCallParser):
    name = "hermes"
    start = "<tool_call>"
    _re = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        i = text.find(self.start)
        if i < 0:
            return text, []
        calls = []
        for m in self._re.finditer(text, i):
            try:
                call = _call_from(json.loads(m.group(1)))
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        return text[:i].rstrip(), calls


class Llama3JsonParser(ToolCallParser):
    """Llama 3.x: the answer is `{"name": ..., "parameters": {...}}` (several separated by `;`),
    optionally after `<|python_tag|>`."""

    name = "llama3_json"
    start = "{"

    def start_index(self, text: str) -> int | None:
        stripped = text.lstrip()
        if not stripped or "<|python_tag|>".startswith(stripped):
            return None  # the first characters decide
        if stripped.startswith("<|python_tag|>") or stripped.startswith("{"):
            return len(text) - len(stripped)
        return -1

    def partial_tail(self, text: str) -> int:
        return 0  # only the answer's start can begin calls

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        dec = json.JSONDecoder()
        pos = 0
        while pos < len(body):
            try:
                obj, end = dec.raw_decode(body, pos)
            except ValueError:
                return text, []
            call = _call_from(obj)
            if call is None:
                return text, []
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \n\t;":
                pos += 1
        return "", calls


class MistralParser(ToolCallParser):
    name = "mistral"
    start = "[TOOL_CALLS]"

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        i = text.find(self.start)
        if i < 0:
            return text, []
        body = text[i + len(self.start) :].strip()
        try:
            obj, _ = json.JSONDecoder().raw_decode(body)
        except ValueError:
            return text, []
        objs = obj if isinstance(obj, list) else [obj]
        calls = [_call_from(o) for o in objs]
        if not calls or any(c is None for c in calls):
            return text, []
        return text[:i].rstrip(), [c for c in calls if c is not None]


_PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
}


def get_parser(name: str) -> ToolCallParser:
    if name not in _PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; known: {list(_PARSERS)}")
    return _PARSERS[name]()


def parser_for_model(tokenizer: Any) -> str:
    """Mistral's tokenizer has a [TOOL_CALLS] token; Llama 3's template speaks of ipython;
    everything else (Qwen, Hermes, SmolLM with our injected prompt) uses <tool_call> tags."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:
        vocab = {}
    if "[TOOL_CALLS]" in vocab:
        return "mistral"
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):
        template = str(template)
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


# ---- one choice's stream -------------------------------------------------------------------------


@dataclass
class StreamDelta:
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI delta shape


class ToolCallStream:
    """One choice's text -> content and tool-call deltas.

    Forced named choice: the text is the arguments; the first delta names the call, every
    later piece of text is a piece of `arguments`. `required`: the text is a JSON list of
    {name, parameters}, turned into calls when it ends. `auto`: text streams as content until
    the parser's start marker; from there it is held and parsed when the answer ends (content
    again if it does not parse)."""

    def __init__(self, choice: str | None, parser: ToolCallParser | None):
        self.choice = choice
        self.parser = parser
        self.calls: list[ToolCall] = []
        self.content: list[str] = []
        self._held: list[str] = []
        self._holding = False
        self._named: ToolCall | None = None

    @property
    def active(self) -> bool:
        return self.choice not in (None, NONE)

    def feed(self, text: str) -> StreamDelta:
        if not self.active or not text:
            return self._content(text)
        if self.choice == REQUIRED:
            self._held.append(text)
            return StreamDelta()
        if self.choice != AUTO:
            out = StreamDelta()
            if self._named is None:
                self._named = ToolCall(self.choice, "")
                self.calls.append(self._named)
                out.tool_calls.append(
                    {
                        "index": 0,
                        "id": self._named.id,
                        "type": "function",
                        "function": {"name": self.choice, "arguments": ""},
                    }
                )
            self._named.arguments += text
            out.tool_calls.append({"index": 0, "function": {"arguments": text}})
            return out
        if self._holding:
            self._held.append(text)
            return StreamDelta()
        assert self.parser is not None
        seen = "".join(self._held) + text
        i = self.parser.start_index(seen)
        if i is None:
            self._held = [seen]
            return StreamDelta()
        if i < 0:
            k = self.parser.partial_tail(seen)  # may be the marker's beginning: hold it
            self._held = [seen[len(seen) - k :]] if k else []
            return self._content(seen[: len(seen) - k])
        self._holding = True
        self._held = [seen[i:]]
        return self._content(seen[:i])

    def finish(self) -> StreamDelta:
        """The answer ended: parse what was held."""
        held = "".join(self._held)
        self._held = []
        if not self.active or self._named is not None or not held:
            return self._content(held)
        if self.choice == AUTO and not self._holding:
            return self._content(held)  # a partial marker that never completed
        calls: list[ToolCall] = []
        content = held
        if self.choice == REQUIRED:
            try:
                objs = json.loads(held)
                calls = [c for c in (_call_from(o) for o in objs) if c is not None]
            except (ValueError, TypeError):
                calls = []
            content = "" if calls else held
        elif self.parser is not None:
            content, calls = self.parser.parse(held)
        out = self._content(content)
        for k, c in enumerate(calls, start=len(self.calls)):
            out.tool_calls.append({"index": k, **c.to_openai()})
        self.calls.extend(calls)
        return out

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI says "tool_calls" when the answer is calls and ended by itself."""
        if self.calls and reason == "stop":
            return "tool_calls"
        return reason

    def _content(self, text: str) -> StreamDelta:
        if text:
            self.content.append(text)
        return StreamDelta(content=text)
