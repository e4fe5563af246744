"""Our models, fed through a paged KV cache, against transformers' forward on the same tokens."""

from __future__ import annotations

import random

import pytest
import torch

from asyncllm.config import ModelConfig
from asyncllm.engine.kernel_paths import select_kernel_paths
from asyncllm.engine.layers.attention import AttentionMetadata
from asyncllm.engine.loader import load_hf_config, load_model, resolve_model
from asyncllm.engine.models import get_model_class, kv_cache_shape
from tests.tiny_models import ARCHITECTURES

BLOCK = 4


def load_ours(path: str, dtype=torch.float32, device: str = "cpu", backend: str = "torch"):
    resolved = resolve_model(path)
    cfg = load_hf_config(resolved)
    mc = ModelConfig(
        path=resolved.path,
        hf_config=cfg,
        dtype=dtype,
        device=torch.device(device),
        max_model_len=512,
        served_model_name="tiny",
        gguf_file=resolved.gguf_file,
    )
    return load_model(mc, kernels=select_kernel_paths(mc.device, dtype, backend)), cfg


def hf_logits(path: str, tokens: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


class PagedSeqs:
    """A minimal stand-in for the scheduler and model runner: per-sequence block tables from a
    shuffled free list, and one step's flattened metadata."""

    def __init__(self, cfg, num_blocks: int, seed: int, device: str = "cpu", dtype=torch.float32):
        layers, heads, dim = kv_cache_shape(cfg)
        shape = (2, num_blocks, BLOCK, heads, dim)
        self.device = torch.device(device)
        self.caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}

    def step(self, work: list[tuple[int, list[int], int]]):
        """work: (seq id, all tokens so far, number already computed) -> ids, positions, meta."""
        ids, pos, slots, qsl, lens, tables = [], [], [], [0], [], []
        for sid, tokens, done in work:
            table = self.tables.setdefault(sid, [])
            while len(table) * BLOCK < len(tokens):
                table.append(self.free.pop())
            ids += tokens[done:]
            pos += range(done, len(tokens))
            slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(done, len(tokens))]
            qsl.append(len(ids))
            lens.append(len(tokens))
            tables.append(table)
        width = max(len(t) for t in tables)
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(
                [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev
            ),
            max_query_len=max(b - a for a, b in zip(qsl[:-1], qsl[1:], strict=True)),
            max_seq_len=max(lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=lens,
            decode_only=all(b - a == 1 for a, b in zip(qsl[:-1], qsl[1:], strict=True)),
        )
        return torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), meta


SETUPS = [
    pytest.param("cpu", "torch", 1e-4, id="cpu-torch"),
    pytest.param("cuda", "torch", 1e-3, id="cuda-torch", marks=pytest.mark.gpu),
    pytest.param("cuda", "triton", 1e-3, id="cuda-triton", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("device,backend,tol", SETUPS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_paged_prefill_chunked_and_decode_match_transformers(
    arch, device, backend, tol, tiny_model_dirs
):
    path = tiny_model_dirs[arch]
    model, cfg = load_ours(path, device=device, backend=backend)
    rng = random.Random(arch)
    vocab = cfg.vocab_size
    # Three ragged prompts plus one whose prefill is split over two steps; then 4 decode tokens.
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (7, 12, 3, 9)]
    finals = [p + [rng.randrange(vocab) for _ in range(4)] for p in prompts]
    refs = [hf_logits(path, f) for f in finals]
    paged = PagedSeqs(cfg, num_blocks=40, seed=1, device=device)
    got: dict[int, dict[int, torch.Tensor]] = {i: {} for i in range(4)}

    def run(work):
        ids, pos, meta = paged.step(work)
        with torch.no_grad():
            logits = model.compute_logits(model(ids, pos, paged.caches, meta))
        assert logits.dtype == torch.float32 and logits.shape == (len(ids), vocab)
        row = 0
        for sid, tokens, done in work:
            for p in range(done, len(tokens)):
                got[sid][p] = logits[row].cpu()
                row += 1

    # Step 1: three whole prompts and the first 5 tokens of the fourth.
    run(
        [
            (0, finals[0][:7], 0),
            (1, finals[1][:12], 0),
            (2, finals[2][:3], 0),
            (3, finals[3][:5], 0),
        ]
    )
    # Step 2 (mixed): one decode token each for 0-2, the rest of the chunked prompt reading the
    # first chunk back from the cache.
    run(
        [
            (0, finals[0][:8], 7),
            (1, finals[1][:13], 12),
            (2, finals[2][:4], 3),
            (3, finals[3][:9], 5),
        ]
    )
    # Decode-only steps.
    lengths = [8, 13, 4, 9]
    for _ in range(4):
        work = []
        for sid in range(4):
            if lengths[sid] < len(finals[sid]):
                work.append((sid, finals[sid][: lengths[sid] + 1], lengths[sid]))
                lengths[sid] += 1
        run(work)

    for sid in range(4):
        assert sorted(got[sid]) == list(range(len(finals[sid])))
        ours = torch.stack([got[sid][p] for p in range(len(finals[sid]))])
        torch.testing.assert_close(ours, refs[sid], atol=tol, rtol=tol)


def test_bfloat16_model_is_close_to_float32(tiny_model_dirs):
    path = tiny_model_dirs["qwen3"]
    m32, cfg = load_ours(path)
    m16, _ = load_ours(path, torch.bfloat16)
    assert next(m16.parameters()).dtype == torch.bfloat16
    tokens = list(range(5, 25))
    out = []
    for m, dtype in ((m32, torch.float32), (m16, torch.bfloat16)):
        paged = PagedSeqs(cfg, 10, 0)
        paged.caches = [c.to(dtype) for c in paged.caches]
        ids, pos, meta = paged.step([(0, tokens, 0)])
        with torch.no_grad():
            out.append(m.compute_logits(m(ids, pos, paged.caches, meta)))
    assert out[1].dtype == torch.float32
    # Same ranking at the top for most positions; values within bf16 noise.
    agree = (out[0].argmax(-1) == out[1].argmax(-1)).float().mean().item()
    assert agree >= 0.8
    assert (out[0] - out[1]).abs().max().item() < 0.5 * out[0].abs().max().item()


def test_model_is_eval_without_grad(tiny_model_dir):
    model, _ = load_ours(tiny_model_dir)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_kv_cache_shape(tiny_model_dirs):
    assert kv_cache_shape(load_hf_config(resolve_model(tiny_model_dirs["llama"]))) == (2, 2, 16)
    # qwen3's head_dim is explicit (32), not hidden_size / heads (16).
    assert kv_cache_shape(load_hf_config(resolve_model(tiny_model_dirs["qwen3"]))) == (2, 2, 32)


def test_registry():
    assert get_model_class("MistralForCausalLM") is get_model_class("LlamaForCausalLM")
    assert get_model_class("Qwen3ForCausalLM").__name__ == "Qwen3ForCausalLM"
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen2ForCausalLM"):
        get_model_class("GPT2LMHeadModel")


def test_rope_settings_in_either_config_layout():
    """transformers 5 keeps rope in `rope_parameters`; older configs in rope_theta/rope_scaling."""
    from types import SimpleNamespace

    from asyncllm.engine.layers.rotary import RotaryEmbedding

    new = SimpleNamespace(
        rope_parameters={"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0}
    )
    old = SimpleNamespace(rope_theta=1000.0, rope_scaling={"type": "linear", "factor": 2.0})
    plain = SimpleNamespace(rope_theta=1000.0, rope_scaling=None)
    a, b, c = (RotaryEmbedding(16, 32, cfg) for cfg in (new, old, plain))
    assert torch.equal(a.cos, b.cos)
    # Linear scaling by 2: position 2p is rotated like position p unscaled.
    torch.testing.assert_close(a.cos[10], c.cos[5])
    with pytest.raises(ValueError, match="rope_type"):
        RotaryEmbedding(
            16, 32, SimpleNamespace(rope_parameters={"rope_type": "bogus", "rope_theta": 1.0})
        )


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gemma2", "gemma3", "phi3"])
def test_decode_forward_captures_in_a_cuda_graph(arch, tiny_model_dirs):
    """The forward has no host syncs or value-dependent Python: a decode step captured in a
    CUDA graph and replayed on new inputs equals the eager step."""
    model, cfg = load_ours(tiny_model_dirs[arch], torch.bfloat16, "cuda", "triton")
    rng = random.Random(0)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(n)] for n in (5, 9, 14)]
    paged = PagedSeqs(cfg, num_blocks=40, seed=2, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        ids, pos, meta = paged.step([(i, p, 0) for i, p in enumerate(prompts)])
        model(ids, pos, paged.caches, meta)
        seqs = [p + [rng.randrange(cfg.vocab_size)] for p in prompts]
        ids, pos, meta = paged.step([(i, s, len(s) - 1) for i, s in enumerate(seqs)])
        assert meta.decode_only
        # Static copies the graph reads; the eager reference runs on its own cache copy.
        static = (ids.clone(), pos.clone(), meta)
        eager_caches = [c.clone() for c in paged.caches]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (Triton compiles) outside the capture
                model(static[0], static[1], [c.clone() for c in paged.caches], meta)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(static[0], static[1], paged.caches, meta)
        # New tokens into the static inputs, then replay.
        new_ids = torch.tensor([rng.randrange(cfg.vocab_size) for _ in seqs], device="cuda")
        static[0].copy_(new_ids)
        graph.replay()
        want = model(new_ids, static[1], eager_caches, meta)
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(
            paged.caches[0].float(), eager_caches[0].float(), atol=1e-2, rtol=1e-2
        )
