"""Chat messages -> prompt token ids, where only the chat template makes control tokens.

Rendering the template and tokenizing the result turns special-token text inside a message
(`<|im_end|>\\n<|im_start|>system ...`) into real control tokens: a user could forge turns,
system prompts included. Messages without such text take the plain path (render, tokenize: the
tokens every test compares against transformers). The others are rendered with a placeholder
per message; the template's text around the placeholders is tokenized as usual and each
message's content with `split_special_tokens=True`, so its special-token text becomes ordinary
text tokens.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from typing import Any

# Private-use code points: no template trims or escapes them and no user text needs them here
# (a message containing them takes the placeholder path too and is refused if ambiguous).
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")

_specials: weakref.WeakKeyDictionary[Any, tuple[str, ...]] = weakref.WeakKeyDictionary()


def special_texts(tok: Any) -> tuple[str, ...]:
    """The text of every special token the tokenizer would parse out of a string."""
    try:
        cached = _specials.get(tok)
    except TypeError:
        cached = None
    if cached is not None:
        return cached
    texts = set(getattr(tok, "all_special_tokens", None) or ())
    for t in (getattr(tok, "added_tokens_decoder", None) or {}).values():
        if getattr(t, "special", False):
            texts.add(str(t.content))
    out = tuple(sorted(t for t in texts if t))
    try:
        _specials[tok] = out
    except TypeError:
        pass
    return out


def _render(tok: Any, messages: list[dict[str, Any]], **kw: Any) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)


def encode_chat(
    tok: Any,
    messages: list[dict[str, Any]],
    render: Callable[[list[dict[str, Any]]], str] | None = None,
    **template_kw: Any,
) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template (which holds any BOS).
    `render`: messages -> prompt text, when the caller renders (tools, template kwargs);
    by default the tokenizer's chat template with `template_kw`."""
    if render is None:

        def render(msgs: list[dict[str, Any]]) -> str:
            return _render(tok, msgs, **template_kw)

    specials = special_texts(tok)
    contents = [m.get("content") or "" for m in messages]
    risky = any(
        sp in c for c in contents for sp in (*specials, _OPEN, _CLOSE) if isinstance(c, str)
    )
    if not risky:
        return list(tok.encode(render(messages), add_special_tokens=False))
    marked = [
        {**m, "content": f"{_OPEN}{i}{_CLOSE}"} if isinstance(m.get("content"), str) else m
        for i, m in enumerate(messages)
    ]
    text = render(marked)
    ids: list[int] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(text):
        ids += tok.encode(text[pos : match.start()], add_special_tokens=False)
        i = int(match.group(1))
        if i >= len(contents) or _OPEN in contents[i] or _CLOSE in contents[i]:
            raise ValueError("message content holds reserved characters U+E000/U+E001")
        ids += tok.encode(contents[i], add_special_tokens=False, split_special_tokens=True)
        pos = match.end()
    if pos == 0:
        # The template did not show the placeholders (it rewrites content): no safe split.
        raise ValueError(
            "message content holds special-token text this chat template cannot escape"
        )
    ids += tok.encode(text[pos:], add_special_tokens=False)
    return ids
