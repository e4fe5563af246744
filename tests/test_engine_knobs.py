"""Engine knobs that must do what they say: EngineArgs.tokenizer (a tokenizer directory other than
the model's), trust_remote_code (config code shipped with the model), and
SamplingParams.spaces_between_special_tokens (refused, since it cannot be honoured)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from asyncllm import LLM, SamplingParams
from tests.tiny_models import CHAT_TEMPLATE

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPT = "The capital of France is"


def _without_tokenizer(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in TOKENIZER_FILES + ("chat_template.jinja",):
        (dst / f).unlink(missing_ok=True)
    return dst


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> list[int]:
    llm = LLM(tiny_model_dir, num_kv_blocks=16)
    return llm.generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_tokenizer_from_its_own_directory(tiny_model_dir, reference, tmp_path):
    from transformers import AutoTokenizer

    model = _without_tokenizer(tiny_model_dir, tmp_path / "model")
    tok_dir = tmp_path / "tok"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    marked = CHAT_TEMPLATE.replace("assistant", "helper")  # tells the two tokenizers apart
    tok.chat_template = marked
    tok.save_pretrained(tok_dir)
    assert not (tok_dir / "config.json").exists()

    with pytest.raises(ValueError, match="tokenizer"):  # the model's dir has none
        LLM(str(model), num_kv_blocks=16)
    llm = LLM(str(model), tokenizer=str(tok_dir), num_kv_blocks=16)
    assert llm.get_tokenizer().chat_template == marked
    out = llm.generate([PROMPT], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == reference
    assert out.prompt_token_ids == tok.encode(PROMPT)
    with pytest.raises(ValueError, match="tokenizer 'no/such-repo'"):
        LLM(str(model), tokenizer="no/such-repo", num_kv_blocks=16)


CUSTOM_CONFIG = """
from transformers import LlamaConfig


class CustomLlamaConfig(LlamaConfig):
    model_type = "asyncllm_test_llama"
"""


def test_trust_remote_code_runs_the_model_s_config_code(tiny_model_dirs, tmp_path):
    src = tiny_model_dirs["llama"]
    ref = LLM(src, num_kv_blocks=16).generate([PROMPT], GREEDY, use_tqdm=False)[0]
    model = tmp_path / "custom"
    shutil.copytree(src, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "asyncllm_test_llama"
    cfg["auto_map"] = {"AutoConfig": "configuration_custom.CustomLlamaConfig"}
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "configuration_custom.py").write_text(CUSTOM_CONFIG)

    with pytest.raises(ValueError, match="trust_remote_code"):
        LLM(str(model), num_kv_blocks=16)
    llm = LLM(str(model), trust_remote_code=True, num_kv_blocks=16)
    assert type(llm.llm_engine.model_config.hf_config).__name__ == "CustomLlamaConfig"
    out = llm.generate([PROMPT], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_spaces_between_special_tokens_is_refused_not_ignored(tiny_model_dir):
    with pytest.raises(ValueError, match="spaces_between_special_tokens"):
        SamplingParams(spaces_between_special_tokens=True)
    assert SamplingParams().spaces_between_special_tokens is False
    # What the detokenizer does instead: special tokens come out as they are, with no spaces.
    from transformers import AutoTokenizer

    from asyncllm.engine.detokenizer import IncrementalDetokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.encode("<|im_start|>user\nhi<|im_end|><|im_start|>")
    detok = IncrementalDetokenizer(tok, [], SamplingParams(skip_special_tokens=False))
    for t in ids:
        detok.add_tokens([t])
    detok.finish()
    assert detok.output_text == "<|im_start|>user\nhi<|im_end|><|im_start|>"
