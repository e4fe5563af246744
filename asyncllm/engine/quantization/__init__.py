"""Quantized checkpoint formats: each is a `QuantizationConfig` handing out linear methods
(asyncllm.engine.layers.linear). `get_quant_config` reads `quantization_config` from the
model's config.json, or the format the user names (`EngineArgs.quantization`); "fp8" on a float
checkpoint quantizes it at load. GGUF files are not here: the loader dequantizes them."""

from __future__ import annotations

from typing import Any

from asyncllm.engine.layers.linear import QuantizationConfig

# EngineArgs.quantization's choices: the checkpoint formats, and "fp8" (also online).
QUANTIZATIONS = ("fp8", "gptq", "awq", "compressed-tensors")


def _from_checkpoint(method: str, cfg: dict[str, Any]) -> QuantizationConfig:
    from asyncllm.engine.quantization.fp8 import CompressedTensorsFp8Config, Fp8Config
    from asyncllm.engine.quantization.int4 import AWQConfig, GPTQConfig

    if method == "gptq":
        return GPTQConfig(cfg)
    if method == "awq":
        return AWQConfig(cfg)
    if method == "fp8":
        return Fp8Config(cfg)
    if method == "compressed-tensors":
        return CompressedTensorsFp8Config(cfg)
    raise ValueError(
        f"the checkpoint's quantization {method!r} is not supported (supported: "
        f"{', '.join(QUANTIZATIONS)}; GGUF files load through the GGUF path)"
    )


def get_quant_config(hf_config: Any, quantization: str | None = None) -> QuantizationConfig | None:
    """The format of this checkpoint: its config's `quantization_config`, checked against
    `quantization` when both are given; `quantization="fp8"` alone quantizes a float checkpoint
    at load; None for a dense float checkpoint."""
    cfg = getattr(hf_config, "quantization_config", None)
    if cfg is not None and not isinstance(cfg, dict):
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if not cfg:
        if quantization is None:
            return None
        if quantization != "fp8":
            raise ValueError(
                f"quantization={quantization!r} was asked for, but the checkpoint has no "
                "quantization_config (only 'fp8' quantizes a float checkpoint at load)"
            )
        from asyncllm.engine.quantization.fp8 import Fp8Config

        return Fp8Config(online=True)
    method = str(cfg.get("quant_method", "")).lower()
    if quantization is not None and quantization != method:
        raise ValueError(
            f"quantization={quantization!r} was asked for, but the checkpoint is {method!r}"
        )
    return _from_checkpoint(method, cfg)
