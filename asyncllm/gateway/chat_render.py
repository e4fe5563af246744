"""Chat messages (with tool calls and tool results) and tool definitions -> the prompt text,
through the model's chat template.

A template that renders tools itself (Qwen, Llama 3, Mistral, Hermes...) gets them as
transformers' `apply_chat_template(tools=...)` does, and assistant tool calls with their arguments
as objects. A template that knows nothing of tools (SmolLM2's) gets the Hermes tool prompt in the
system message, assistant calls as `<tool_call>` text and results as `<tool_response>` text, so
the model sees the same conversation and the `hermes` parser reads its answer.
"""

from __future__ import annotations

import json
from typing import Any

from asyncllm.tools import tools_system_prompt


def template_renders_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in (template if isinstance(template, str) else str(template))


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    extra = dict(template_kwargs or {})
    extra.pop("tokenize", None)  # always text here; the caller encodes
    extra.setdefault("add_generation_prompt", True)
    if template_renders_tools(tokenizer):
        msgs = [_with_object_arguments(m) for m in messages]
        kw: dict[str, Any] = {}
        extra.pop("tools", None)
        if tools:
            kw["tools"] = [{"type": "function", "function": t} for t in tools]
        return tokenizer.apply_chat_template(msgs, tokenize=False, **kw, **extra)
    msgs = [_as_text(m) for m in messages]
    if tools:
        prompt = tools_system_prompt(tools)
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {"role": "system", "content": msgs[0]["content"] + "\n\n" + prompt}
        else:
            msgs.insert(0, {"role": "system", "content": prompt})
    return tokenizer.apply_chat_template(msgs, tokenize=False, **extra)


def _with_object_arguments(m: dict[str, Any]) -> dict[str, Any]:
    calls = m.get("tool_calls")
    if not calls:
        return m
    out = dict(m)
    out["tool_calls"] = []
    for c in calls:
        fn = dict(c["function"])
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except (ValueError, TypeError):
            pass  # templates print a string as it is
        out["tool_calls"].append({**c, "function": fn})
    return out


def _as_text(m: dict[str, Any]) -> dict[str, str]:
    content = m["content"]
    if m.get("tool_calls"):
        parts = [content] if content else []
        for c in m["tool_calls"]:
            fn = c["function"]
            try:
                args = json.loads(fn["arguments"])
            except (ValueError, TypeError):
                args = fn["arguments"]
            call = json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False)
            parts.append(f"<tool_call>\n{call}\n</tool_call>")
        content = "\n".join(parts)
    if m["role"] == "tool":
        content = f"<tool_response>\n{content}\n</tool_response>"
    return {"role": m["role"], "content": content}
