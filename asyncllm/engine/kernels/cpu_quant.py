"""Linear layers on GGUF-quantized weights on the CPU, without a float32 copy of the weights.

`GGUFWeight.from_blocks` splits a tensor's llama.cpp blocks (Q4_0, Q4_1, Q8_0: 32 weights per
block, an f16 scale, for Q4_1 an f16 minimum) into plain arrays: the quants as in the file, the
scales as float32 (4-bit: 0.75 byte per weight, 8-bit: 1.125, against float32's 4).
`gguf_linear(x, w)` is y = x W^T through the C kernel `cpu_quant.c` (built at first use by
asyncllm.engine.kernels._cpu_build), float32 activations and sums: each thread expands a panel
of 4 weight rows into L1 and multiplies every row of x with it. At a few rows (x with at most
`w.int8_rows` rows: ASYNCLLM_CPU_INT8_ROWS, where the CPU has AVX512-VNNI) the kernel instead
quantizes x per block of 32 to int8, as llama.cpp's q8 activations (dx = max|x| / 127), and takes
integer dot products on the blocks' quants: the result is exactly W (xq dx), so it differs from
W x by at most sum_k |w_k| dx_k / 2 (plus float32 rounding of the scales and sums). x and y stay
float32 at the boundary.

Why a kernel of ours (measured on the 2-core AMD EPYC VM, one thread, SmolLM2-135M shapes,
ops/bench/NOTES.md "CPU"): torch's own `_weight_int4pack_mm_for_cpu` (group-wise int4: Q4_1 maps
onto it exactly, scale=d, zero=m+8d) and `_weight_int8pack_mm` ran 10-80x slower than the
oneDNN float32 product at every M from 1 to 64 in this torch build.

`available()`: the library built (no compiler or a failed build: logged once, and the loader
keeps the float32 path).
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from asyncllm import envs
from asyncllm.engine.kernels import _cpu_build

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_quant.c")

# GGML type ids (gguf.GGMLQuantizationType) this kernel reads, and their block bytes.
Q4_0, Q4_1, Q8_0 = 2, 3, 8
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}
TYPE_NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0"}


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    for fn in (lib.asyncllm_gguf_linear_f32, lib.asyncllm_gguf_linear_i8):
        fn.argtypes = [p, i64, i64, p, p, p, i32, i64, i64, p, i64]
        fn.restype = ctypes.c_int
    lib.asyncllm_gguf_int8_act.argtypes = []
    lib.asyncllm_gguf_int8_act.restype = ctypes.c_int


_library = _cpu_build.CLibrary(SOURCE, "CPU GGUF linear kernel", _declare, logger)


def available() -> bool:
    return _library.load() is not None


def reset() -> None:
    _library.reset()


def int8_available() -> bool:
    """Whether the library has the int8-activation path (built where the compiler targets
    AVX512-VNNI: -march=native on such a CPU)."""
    lib = _library.load()
    return lib is not None and lib.asyncllm_gguf_int8_act() == 1


def default_int8_rows() -> int:
    """The `GGUFWeight.int8_rows` a weight gets at load: ASYNCLLM_CPU_INT8_ROWS where the path
    exists, else 0."""
    rows = envs.cpu_int8_rows()
    return rows if rows and int8_available() else 0


@dataclass
class GGUFWeight:
    """One weight matrix [out_features, in_features] in a GGUF block type's parts."""

    qtype: int
    qs: Tensor  # 4-bit: uint8 [N, K/2] (two weights a byte); 8-bit: int8 [N, K]
    d: Tensor  # float32 [N, K/32]
    m: Tensor | None  # float32 [N, K/32] (4-bit only: Q4_0's is -8d)
    out_features: int
    in_features: int
    # x of at most this many rows is quantized to int8 per block inside the kernel (0: never;
    # the float32-activation path is the exact one)
    int8_rows: int = 0
    # (qs, d, m, kernel kind) as the C call takes them, fixed at construction (the tensors are
    # never replaced in place)
    pointers: tuple[int, int, int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.pointers = (
            self.qs.data_ptr(),
            self.d.data_ptr(),
            0 if self.m is None else self.m.data_ptr(),
            8 if self.qtype == Q8_0 else 4,
        )

    @classmethod
    def from_blocks(cls, qtype: int, blocks: Tensor, in_features: int) -> GGUFWeight:
        """`blocks`: uint8 [N, K/32 * block bytes], a tensor's rows as the file holds them."""
        if qtype not in BLOCK_BYTES:
            raise ValueError(f"no compact CPU kernel for GGML type {qtype}")
        if in_features % 32:
            raise ValueError(f"in_features {in_features} is not a multiple of 32")
        n = blocks.shape[0]
        nb = in_features // 32
        b = blocks.contiguous().view(n, nb, BLOCK_BYTES[qtype])
        d = b[..., :2].contiguous().view(torch.float16).float().reshape(n, nb)
        if qtype == Q8_0:
            qs = b[..., 2:].contiguous().view(torch.int8).reshape(n, in_features)
            return cls(qtype, qs, d.contiguous(), None, n, in_features, default_int8_rows())
        head = 4 if qtype == Q4_1 else 2
        qs = b[..., head:].contiguous().reshape(n, in_features // 2)
        if qtype == Q4_1:
            m = b[..., 2:4].contiguous().view(torch.float16).float().reshape(n, nb)
        else:
            m = d * -8.0
        return cls(qtype, qs, d.contiguous(), m.contiguous(), n, in_features, default_int8_rows())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def dequantize(self) -> Tensor:
        """float32 [N, K] (tests: the kernel against x @ W^T)."""
        n, k = self.out_features, self.in_features
        if self.qtype == Q8_0:
            q = self.qs.float().view(n, k // 32, 32)
            return (q * self.d[..., None]).view(n, k)
        qs = self.qs.view(n, k // 32, 16)
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()
        assert self.m is not None
        return torch.addcmul(self.m[..., None], q, self.d[..., None]).view(n, k)


def gguf_linear(x: Tensor, w: GGUFWeight, bias: Tensor | None = None) -> Tensor:
    """x [..., K] float32 (CPU) -> [..., N]."""
    lib = _library.load()
    if lib is None:
        raise RuntimeError("the CPU GGUF linear kernel is not available")
    if x.dtype != torch.float32 or not x.is_cpu:
        raise ValueError(f"gguf_linear takes float32 CPU activations, got {x.dtype} {x.device}")
    k = w.in_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k}")
    # A decode step calls this ~4 times a layer at 1 row: the 2-D case skips the reshapes
    # (~2 us of the ~9 us a call cost on the 2-core VM)
    lead = None if x.dim() == 2 else x.shape[:-1]
    x2 = x if lead is None else x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    n = w.out_features
    y = torch.empty(m, n, dtype=torch.float32)
    if m:
        fn = lib.asyncllm_gguf_linear_i8 if m <= w.int8_rows else lib.asyncllm_gguf_linear_f32
        qs, d, mins, kind = w.pointers
        rc = fn(x2.data_ptr(), x2.stride(0), m, qs, d, mins, kind, n, k, y.data_ptr(), n)
        if rc == -3:
            raise RuntimeError(
                "the CPU GGUF linear kernel was built without the int8-activation path "
                "(AVX512-VNNI): this weight's int8_rows must be 0"
            )
        if rc != 0:
            raise RuntimeError(f"the CPU GGUF linear kernel failed ({rc})")
    if bias is not None:
        y += bias
    return y if lead is None else y.view(*lead, n)
