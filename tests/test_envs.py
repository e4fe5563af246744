"""asyncllm/envs.py is the one list of ASYNCLLM_* variables, each read when its function is
called (so a test's monkeypatch takes effect)."""

from __future__ import annotations

import re
from pathlib import Path

from asyncllm import envs

ROOT = Path(__file__).resolve().parents[1]


def test_every_variable_in_the_source_is_in_envs():
    used: set[str] = set()
    for d in ("asyncllm", "ops", "examples"):
        for f in (ROOT / d).rglob("*.py"):
            used |= set(re.findall(r"ASYNCLLM_[A-Z][A-Z0-9_]*[A-Z0-9]", f.read_text()))
    assert used and used <= set(envs.VARIABLES), sorted(used - set(envs.VARIABLES))
    for fn in envs.VARIABLES.values():
        assert fn.__doc__ and fn.__doc__.startswith("ASYNCLLM_")


def test_read_when_called(monkeypatch, tmp_path):
    monkeypatch.delenv("ASYNCLLM_CPU_FUSED", raising=False)
    assert envs.cpu_fused() is True
    monkeypatch.setenv("ASYNCLLM_CPU_FUSED", "0")
    assert envs.cpu_fused() is False
    monkeypatch.setenv("ASYNCLLM_CPU_ATTENTION", "TORCH")
    assert envs.cpu_attention() == "torch"
    monkeypatch.setenv("ASYNCLLM_KERNEL_CACHE", str(tmp_path))
    assert envs.kernel_cache() == tmp_path
    monkeypatch.setenv("ASYNCLLM_API_KEYS", " a, ,b ")
    assert envs.api_keys() == ("a", "b")
    monkeypatch.setenv("ASYNCLLM_BENCH_THREADS", "3")
    assert envs.bench_threads() == 3


def test_switch_interval_default_and_bad_values(monkeypatch):
    import pytest

    monkeypatch.delenv("ASYNCLLM_SWITCH_INTERVAL_MS", raising=False)
    assert envs.switch_interval_ms() == 0.5
    monkeypatch.setenv("ASYNCLLM_SWITCH_INTERVAL_MS", "5")
    assert envs.switch_interval_ms() == 5.0
    for bad in ("fast", "0", "-1", "5000"):
        monkeypatch.setenv("ASYNCLLM_SWITCH_INTERVAL_MS", bad)
        with pytest.raises(ValueError, match="ASYNCLLM_SWITCH_INTERVAL_MS"):
            envs.switch_interval_ms()
