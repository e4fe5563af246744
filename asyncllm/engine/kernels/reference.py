"""Plain-torch references for the Triton kernels: slow, obvious, and computed in float32.

Tests compare every kernel against these on random inputs; nothing on the hot path calls them.
"""

from __future__ import annotations

import torch


def write_kv_cache_ref(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k/v [T,Hkv,D] into kv_cache [2,NB,BS,Hkv,D] at flat slots; slot -1 means skip."""
    _, nb, bs, h, d = kv_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    kv_cache[0].view(nb * bs, h, d)[slots] = k[keep].to(kv_cache.dtype)
    kv_cache[1].view(nb * bs, h, d)[slots] = v[keep].to(kv_cache.dtype)


def gather_context(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's first `seq_len` cached K and V, each [seq_len,Hkv,D]."""
    _, _, bs, h, d = kv_cache.shape
    n_blocks = -(-seq_len // bs)
    blocks = block_table[:n_blocks].long()
    k = kv_cache[0, blocks].reshape(-1, h, d)[:seq_len]
    v = kv_cache[1, blocks].reshape(-1, h, d)[:seq_len]
    return k, v


def paged_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: list[int],
    seq_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """Causal attention of q [T,Hq,D] over each sequence's paged context, in float32.

    The new tokens of sequence b are the last `query_len` positions of its `seq_lens[b]`; with a
    sliding window W, position i sees keys i-W+1..i; a soft cap c maps scores to c*tanh(s/c).
    Returns float32 [T,Hq,D]."""
    t, hq, d = q.shape
    hkv = kv_cache.shape[3]
    group = hq // hkv
    out = torch.zeros(t, hq, d, dtype=torch.float32, device=q.device)
    for b, seq_len in enumerate(seq_lens):
        a, e = query_start_loc[b], query_start_loc[b + 1]
        if e == a or seq_len == 0:
            continue
        k, v = gather_context(kv_cache, block_tables[b], seq_len)
        k = k.float().repeat_interleave(group, dim=1)  # [S,Hq,D]
        v = v.float().repeat_interleave(group, dim=1)
        qb = q[a:e].float()  # [L,Hq,D]
        scores = torch.einsum("lhd,shd->hls", qb, k) * scale
        qpos = torch.arange(seq_len - (e - a), seq_len, device=q.device)
        kpos = torch.arange(seq_len, device=q.device)
        if logits_soft_cap:
            scores = torch.tanh(scores / logits_soft_cap) * logits_soft_cap
        hidden = kpos[None, None, :] > qpos[None, :, None]
        if sliding_window:
            hidden |= kpos[None, None, :] <= qpos[None, :, None] - sliding_window
        scores = scores.masked_fill(hidden, float("-inf"))
        out[a:e] = torch.einsum("hls,shd->lhd", scores.softmax(-1), v)
    return out


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Mixture of experts in float32, expert by expert over the (token, slot) pairs routed to
    it: x [T,H], w13 [E,2I,H] (gate, then up rows), w2 [E,H,I], topk_weights/topk_ids [T,k] ->
    float32 [T,H]. Memory stays at one expert's weights (model shapes fit on the GPU)."""
    inter = w13.shape[1] // 2
    x32 = x.float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tokens, slots = (topk_ids == e).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        h = x32[tokens] @ w13[e].float().T
        h = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        y = h @ w2[e].float().T
        out.index_add_(0, tokens, y * topk_weights[tokens, slots].float()[:, None])
    return out


def int4_gemm_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """kernels.quant_gemm.int4_gemm in float32: unpack [K/8, N] words, (q - zero) * scale."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32).view(1, 8, 1)
    q = ((qweight.unsqueeze(1) >> shifts) & 0xF).reshape(-1, qweight.shape[1]).float()
    g = torch.arange(q.shape[0], device=q.device) // group_size
    w = (q - zeros.float()[g]) * scales.float()[g]
    return x.float() @ w


def fp8_block_gemm_ref(
    x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """kernels.quant_gemm.fp8_block_gemm in float32."""
    n, k = weight.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)
    return x.float() @ (weight.float() * s[:, :k]).t()


def per_token_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row e4m3 quantization: (x / scale) in fp8 and the float32 scale [M, 1]."""
    finfo = torch.finfo(torch.float8_e4m3fn)
    amax = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12)
    scale = amax / finfo.max
    q = (x.float() / scale).clamp(finfo.min, finfo.max).to(torch.float8_e4m3fn)
    return q, scale
