"""examples/offline_batch.py runs as a script (the other examples are run by the tests of what
they show: app_stream.py in test_async_engine.py, bot.py in test_client.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from asyncllm import LLM, SamplingParams

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "offline_batch.py"), *args],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_offline_batch_prints_each_prompts_completion_in_order(tiny_model_dir, tmp_path):
    prompts = ["Hello world", "The sky is", "Once upon a time"]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n\n")
    proc = _run(str(f), "--model", tiny_model_dir, "--max-tokens", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = LLM(tiny_model_dir).generate(
        prompts, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False
    )
    expected = "".join(
        f"--- {p!r} [{o.outputs[0].finish_reason}, {len(o.outputs[0].token_ids)} tokens]\n"
        f"{o.outputs[0].text}\n"
        for p, o in zip(prompts, want, strict=True)
    )
    assert proc.stdout == expected
    assert "[3 prompts," in proc.stderr


def test_offline_batch_chat_mode(tiny_model_dir, tmp_path):
    f = tmp_path / "questions.txt"
    f.write_text("Hi\nWhat is the capital of France?\n")
    proc = _run(str(f), "--chat", "--model", tiny_model_dir, "--max-tokens", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("--- ") == 2 and "[2 prompts," in proc.stderr
