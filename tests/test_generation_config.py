"""generation_config.json (vLLM's --generation-config): the loader's reading of it, and the
gateway's merge of its defaults under a request's own values."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from asyncllm.engine.loader import load_generation_config
from asyncllm.gateway.engine_io import EngineIO
from asyncllm.gateway.metrics import Metrics
from asyncllm.gateway.settings import GatewaySettings
from asyncllm.protocol import GenParams


def _write(folder, data) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps(data))
    return str(folder)


def test_modes(tmp_path):
    model = _write(
        tmp_path / "m",
        {"eos_token_id": [2, 77], "temperature": 0.6, "top_p": 0.9, "do_sample": True},
    )
    other = _write(tmp_path / "o", {"eos_token_id": 5, "top_k": 20, "max_new_tokens": 64})
    auto = load_generation_config(model)
    assert auto.defaults == {"temperature": 0.6, "top_p": 0.9}
    assert auto.eos_token_ids == [2, 77]
    assert load_generation_config(model, "vllm").defaults == {}
    assert load_generation_config(model, "vllm").eos_token_ids == [2, 77]
    folder = load_generation_config(model, other)
    assert folder.defaults == {"top_k": 20, "max_tokens": 64}
    assert folder.eos_token_ids == [2, 77]  # EOS ids are the model's own
    assert load_generation_config(str(tmp_path / "none")).defaults == {}
    with pytest.raises(ValueError, match="neither"):
        load_generation_config(model, str(tmp_path / "missing"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "generation_config.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read"):
        load_generation_config(str(tmp_path / "bad"))


def test_gateway_request_values_win_over_the_files():
    """max_new_tokens is the gateway's own max_tokens_default (read from the same file);
    the other sampling values come through the model config."""
    model_config = SimpleNamespace(
        generation_defaults={"temperature": 0.6, "top_k": 20, "max_tokens": 50},
        max_model_len=128,
        served_model_name="tiny",
    )
    io = EngineIO(SimpleNamespace(model_config=model_config), GatewaySettings(), Metrics())
    sp = io.sampling_params(GenParams(temperature=0.1), default_max_tokens=16)
    assert (sp.temperature, sp.top_k, sp.max_tokens) == (0.1, 20, 16)
    sp = io.sampling_params(GenParams(max_tokens=3), default_max_tokens=16)
    assert (sp.temperature, sp.max_tokens) == (0.6, 3)
