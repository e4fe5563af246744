"""`asyncllm chat`: a terminal chat on the engine, no server.

The main thread owns the terminal (input(), Ctrl-C) and the engine runs in an event loop on a
thread of its own (an anyio blocking portal). So Ctrl-C is an ordinary KeyboardInterrupt in the
main thread: during an answer it cancels that answer (leaving the `async for` aborts the request
in the engine) and the prompt comes back with the conversation kept; at the prompt it quits.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from asyncllm.config import EngineArgs

HELP = (
    "type a message; /system TEXT sets the system prompt (/system alone clears it), /reset "
    "clears the chat, Ctrl-C stops an answer, /exit, Ctrl-D or Ctrl-C at the prompt quits"
)


@dataclass
class Conversation:
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.history


@dataclass
class _Answer:
    """One answer in flight: its text so far and the scope that stops it."""

    parts: list[str] = field(default_factory=list)
    scope: Any = None  # anyio.CancelScope, set on the loop thread
    error: str | None = None
    stopped: bool = False


def run_chat(args: EngineArgs, max_tokens: int, temperature: float, system: str | None) -> None:
    from anyio.from_thread import start_blocking_portal

    from asyncllm.engine.async_engine import AsyncLLMEngine
    from asyncllm.sampling_params import RequestOutputKind, SamplingParams

    conv = Conversation(system=system)
    print("loading the model...", file=sys.stderr)
    with start_blocking_portal() as portal:
        engine = AsyncLLMEngine.from_engine_args(args)
        with portal.wrap_async_context_manager(engine):
            print(HELP, file=sys.stderr)
            while True:
                try:
                    line = input("> ").strip()
                except EOFError:
                    print()
                    return
                except KeyboardInterrupt:  # at the prompt: quit
                    print()
                    return
                if not line:
                    continue
                if line in ("/exit", "/quit"):
                    return
                if line == "/reset":
                    conv.history.clear()
                    print("[the chat is cleared]", file=sys.stderr)
                    continue
                if line == "/system" or line.startswith("/system "):
                    conv.system = line[len("/system") :].strip() or None
                    print(f"[system prompt: {conv.system or '(none)'}]", file=sys.stderr)
                    continue
                params = SamplingParams(
                    max_tokens=max_tokens,
                    temperature=temperature,
                    output_kind=RequestOutputKind.DELTA,
                )
                conv.history.append({"role": "user", "content": line})
                ans = _Answer()
                future = portal.start_task_soon(_answer, engine, conv.messages(), params, ans)
                try:
                    future.result()
                except KeyboardInterrupt:  # during the answer: stop it, back to the prompt
                    ans.stopped = True
                    portal.call(_cancel, ans)
                    future.result()
                print()
                if ans.error is not None:
                    print(f"[error: {ans.error}]", file=sys.stderr)
                    conv.history.pop()
                    continue
                if ans.stopped:
                    print("[stopped]", file=sys.stderr)
                # what was shown stays in the conversation, a stopped answer too
                conv.history.append({"role": "assistant", "content": "".join(ans.parts)})


async def _cancel(ans: _Answer) -> None:
    if ans.scope is not None:
        ans.scope.cancel()


async def _answer(engine: Any, messages: list[dict[str, str]], params: Any, ans: _Answer) -> None:
    import anyio

    with anyio.CancelScope() as scope:
        ans.scope = scope
        if ans.stopped:  # Ctrl-C came before the task started
            scope.cancel()
        try:
            async for out in engine.chat(messages, params):
                for c in out.outputs:
                    ans.parts.append(c.text)
                    print(c.text, end="", flush=True)
        except ValueError as e:  # e.g. the conversation outgrew the model
            ans.error = str(e)
