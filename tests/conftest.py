from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.tiny_models import ARCHITECTURES, build_model  # noqa: E402


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    """Every async test runs under asyncio and trio."""
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    """One tiny random model per supported architecture, built once per test session."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: str(build_model(arch, root / arch)) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_dirs) -> str:
    return tiny_model_dirs["llama"]


@pytest.fixture(autouse=True)
def _release_gpu_memory(request):
    """After a GPU test, free what its engines held: an engine sized from free memory must not
    see the previous test's KV cache (engines hold reference cycles, so only gc frees them)."""
    yield
    if "gpu" in request.keywords:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
