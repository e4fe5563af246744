"""`asyncllm chat` in a real terminal (a pty): Ctrl-C during an answer stops that answer and the
prompt comes back with the conversation kept; Ctrl-C at the prompt quits; /system and /reset.

The engine's steps are slowed (20 ms each, as a bigger model's would take) so that an answer is
still streaming when the Ctrl-C comes."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest

# The chat, its engine slowed, and every conversation it sends to the engine printed to stderr.
CHAT = """
import sys, time
from asyncllm.engine.async_engine import AsyncLLMEngine
from asyncllm.engine.llm_engine import LLMEngine

step = LLMEngine.step
LLMEngine.step = lambda self: (time.sleep(0.02), step(self))[1]
chat = AsyncLLMEngine.chat

def logged(self, messages, *a, **k):
    print("MESSAGES", [(m["role"], m["content"][:12]) for m in messages], file=sys.stderr)
    return chat(self, messages, *a, **k)

AsyncLLMEngine.chat = logged
from asyncllm.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Terminal:
    def __init__(self, argv: list[str]):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True, start_new_session=True
        )
        os.close(slave)
        self.out = ""

    def read_until(self, pattern: str, timeout: float = 60, start: int = 0) -> str:
        """Everything read so far, once `pattern` (a regex) appears in it after `start`."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.out[start:]):
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and not self._readable(0.1)):
                raise AssertionError(f"no {pattern!r} in the terminal:\n{self.out[-3000:]}")
            self._read(min(left, 0.2))
        return self.out

    def _read(self, t: float) -> None:
        if self._readable(t):
            try:
                self.out += os.read(self.master, 65536).decode(errors="replace")
            except OSError:  # the child closed the terminal
                time.sleep(t)

    def _readable(self, t: float) -> bool:
        return bool(select.select([self.master], [], [], t)[0])

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def ctrl_c(self) -> None:
        # as the terminal does for ^C: SIGINT to the foreground process group
        os.killpg(self.proc.pid, signal.SIGINT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pty")
def test_ctrl_c_stops_the_answer_and_a_second_at_the_prompt_quits(tiny_model_dir):
    env_argv = [sys.executable, "-c", CHAT, "chat", tiny_model_dir]
    argv = env_argv + ["--max-tokens", "400", "--temperature", "0", "--num-kv-blocks", "64"]
    argv += ["--max-model-len", "512", "--system", "Be brief."]
    term = Terminal(argv)
    try:
        term.read_until(r"Ctrl-C stops an answer.*\n.*> ")
        term.type("Hello there\n")
        term.read_until(r"MESSAGES \[\('system', 'Be brief.'\), \('user', 'Hello there'\)\]")
        # some of the answer (400 tokens at 20 ms: 8 s of it), then Ctrl-C in the middle of it
        term.read_until(r"[\s\S]{20}", start=len(term.out))
        term.ctrl_c()
        out = term.read_until(r"\[stopped\][\s\S]*> ")
        assert term.proc.poll() is None, "Ctrl-C during an answer must not quit"
        assert "Traceback" not in out, out
        # the conversation went on: the stopped answer and the question are kept
        term.type("And then?\n")
        term.read_until(
            r"MESSAGES \[\('system', 'Be brief.'\), \('user', 'Hello there'\), "
            r"\('assistant', '[^']*'\), \('user', 'And then\?'\)\]"
        )
        term.read_until(r"[\s\S]{20}", start=len(term.out))
        term.ctrl_c()  # stops this answer as well
        term.read_until(r"\[stopped\][\s\S]*\[stopped\][\s\S]*> ")
        term.type("/system Be kind.\n")
        term.read_until(r"\[system prompt: Be kind.\]")
        term.type("/reset\n")
        term.read_until(r"\[the chat is cleared\][\s\S]*> ")
        term.type("Hi\n")
        term.read_until(r"MESSAGES \[\('system', 'Be kind.'\), \('user', 'Hi'\)\]")
        term.read_until(r"[\s\S]{20}", start=len(term.out))
        term.ctrl_c()
        term.read_until(r"\[stopped\][\s\S]*\[stopped\][\s\S]*\[stopped\][\s\S]*> ")
        time.sleep(0.2)
        term.ctrl_c()  # at the prompt: quit
        assert term.proc.wait(30) == 0
        term.read_until(r"$", 1)
        assert "Traceback" not in term.out, term.out
    finally:
        term.close()
