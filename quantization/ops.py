"""What a THUDM-quantized weight is, in plain PyTorch: the reference every kernel is checked against.

Symmetric per-output-row quantization with no zero point (the original quantization.py):
    weight_scale[o] = max_i |W[o, i]| / (2**(bits-1) - 1)        stored as fp16
    q[o, i]         = round(W[o, i] / weight_scale[o])            int8 in [-127, 127] or [-7, 7]
INT4 packs two values per byte, the even column in the HIGH nibble: byte = (q[2j] << 4) | (q[2j+1] & 0xF).
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F

from kernels import cpu_fast_paths, cpu_flags, cpu_isa, get_cpu_kernel, native_half_gemm
from kernels.settings import settings


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [out, in] -> (int8 [out, in] or packed int8 [out, in/2], fp16 scale [out]).

    Bit-identical to THUDM's `quantize()` on the fp16 model: the weights are cast to fp16 (as the original's
    `.half()` does, whatever they were), scale = max|w| / qmax and round(w / scale) are computed in fp16 (each
    quotient rounded to fp16 before it is rounded to an integer, ties to even). Dividing in fp32 instead gives
    other integers where the fp16 quotient lands on a .5 tie.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if bits == 4 and weight.shape[-1] % 2:
        raise ValueError(f"INT4 needs an even number of input features, got {weight.shape[-1]}")
    qmax = 2 ** (bits - 1) - 1
    scale = torch.empty(weight.shape[0], dtype=torch.float16, device=weight.device)
    q = torch.empty(weight.shape[0], weight.shape[1] // (2 if bits == 4 else 1), dtype=torch.int8, device=weight.device)
    for start in range(0, weight.shape[0], QUANTIZE_ROWS):  # row blocks: the temporaries stay small
        w = weight[start : start + QUANTIZE_ROWS].to(torch.float16)
        s = w.abs().amax(dim=-1) / qmax  # fp16 / int -> fp16, as the original
        # fp16 division (exactly what fp16 hardware gives: the fp32 quotient of two fp16 values has enough
        # bits that rounding it to fp16 is the correctly rounded fp16 quotient); an all-zero row stays zero.
        quotient = torch.where(s[:, None] > 0, w / s[:, None], torch.zeros((), dtype=w.dtype, device=w.device))
        block = torch.round(quotient).clamp_(-qmax, qmax).to(torch.int8)  # the clamp never binds: max|q| = qmax
        scale[start : start + QUANTIZE_ROWS] = s
        q[start : start + QUANTIZE_ROWS] = pack_int4(block) if bits == 4 else block
    return q, scale


QUANTIZE_ROWS = 2048


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [out, in] -> [out, in/2]: even column in the high nibble."""
    q = q.to(torch.int8)
    return ((q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[out, in/2] packed int8 -> [out, in] int8 in [-8, 7] (sign-extended nibbles)."""
    high = packed >> 4  # arithmetic shift keeps the sign
    low = (packed << 4) >> 4
    return torch.stack([high, low], dim=-1).flatten(-2)


# The AVX-512 VNNI and AVX2 kernels' weight layout ("lanes16"): per group of 16 rows, per 4 bytes of a row, the 16
# rows' 4 bytes one after the other. Their decode-batch kernel otherwise transposes each 16 rows x 64 columns it reads, in
# shuffles that take the cycles of its dot products (Zen 4, 2 threads, 8 rows: 4096 -> 27392 INT4 3.06 -> 2.30 ms,
# 4096 -> 65024 INT8 9.41 -> 7.20; one or two rows as fast or faster; docs/benchmarks.md). A permutation of THUDM's
# bytes, same shape: [n, kb] viewed [n/16, 16, kb/4, 4] with the middle dimensions swapped. The AVX2 build reads it
# too, as two 256-bit vectors of 8 rows (wq_rows_lanes2: the VNNI build's bits; THUDM's layout has other ones there):
# on a Zen 4 with the AVX2 build, four ChatGLM2 blocks' INT4 matrices at 1 / 4 / 8 rows took 13 / 18 / 34 ms against
# 15 / 36 / 59 in THUDM's layout, one block's at 512 rows 658 against 785, the INT8 output layer at 8 rows 17 / 23.
LANES = 16


def _swap_in_groups(weight: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Per group of LANES rows, the [LANES, kb/4] grid of 4-byte words transposed (inverse: from [kb/4, LANES]). The
    4 bytes move as one int32 (twice the speed of moving bytes: 1.4 against 0.6 GB/s)."""
    n, kb = weight.shape
    grid = (kb // 4, LANES) if inverse else (LANES, kb // 4)
    w = weight.contiguous().view(torch.int32).view(n // LANES, *grid)
    return w.transpose(1, 2).contiguous().view(torch.int8).view(n, kb)


def to_lanes16(weight: torch.Tensor) -> torch.Tensor:
    """THUDM's [n, kb] int8 (INT8, or INT4 packed) -> the same bytes in the lanes16 layout (a new tensor)."""
    return _swap_in_groups(weight, inverse=False)


def from_lanes16(weight: torch.Tensor) -> torch.Tensor:
    """The inverse of to_lanes16: THUDM's layout back (a new tensor)."""
    return _swap_in_groups(weight, inverse=True)


def lanes16_takes(weight: torch.Tensor, in_features: int) -> bool:
    """Whether a QuantizedLinear weight goes to the lanes16 layout: on the CPU, where the kernels are built for
    it (kernel.packed_layout: AVX-512 VNNI or AVX2, not AMX nor portable C), out features a multiple of 16, in
    features of 64, int8 activations (settings.cpu_float_activations off) and settings.cpu_packed_weights on."""
    if not (settings.cpu_packed_weights and not settings.cpu_float_activations and weight.device.type == "cpu"):
        return False
    if weight.dim() != 2 or weight.shape[0] % LANES or in_features % 64 or not cpu_fast_paths():
        return False
    kernel = get_cpu_kernel()
    return kernel is not None and kernel.packed_layout


def dequantize(weight: torch.Tensor, scale: torch.Tensor, bits: int, dtype=torch.float32) -> torch.Tensor:
    q = unpack_int4(weight) if bits == 4 else weight
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def quantized_linear_reference(x, weight, scale, bits, bias=None):
    """y = x @ dequantize(W)^T + b, in x's dtype: the original's 'dequantize then matmul'."""
    w = dequantize(weight, scale, bits, dtype=x.dtype)
    y = x @ w.t()
    return y + bias.to(y.dtype) if bias is not None else y


def cached_fp32(owner, name: str) -> torch.Tensor | None:
    """owner.<name> (a small parameter: a scale, a bias) as a contiguous fp32 tensor, kept on the module until
    the parameter is replaced or written in place, so that decode does not convert it at every call."""
    t = getattr(owner, name)
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    if torch.compiler.is_compiling():  # inside a compiled graph the conversion is one fused op, always fresh
        return t.float().contiguous()
    cache = owner.__dict__.setdefault("_fp32_cache", {})
    version = -1 if t.is_inference() else t._version  # inference tensors keep no version counter
    key = (t.data_ptr(), version, t.dtype, t.device)
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = cache[name] = (key, t.detach().float().contiguous())
    return hit[1]


def quantized_linear(x, weight, scale, bits, bias=None, owner=None):
    """The forward of QuantizedLinear: on the CPU the fused C kernel (decode, batches), and for GEMM_MIN_ROWS rows or
    more (prefill; LANES_GEMM_MIN_ROWS for our GEMM without AMX tiles: `gemm_min_rows`) a GEMM where this CPU has
    one (settings.cpu_quantized_gemm, `_gemm_path`): our INT8/INT4 GEMM on AVX-512 VNNI or AMX tiles (kernel.gemm),
    else on a CPU with native bf16 matmuls the weight dequantized to bf16 and torch's GEMM (`dequantized_gemm`); on
    CUDA the Triton kernels (fused for up to 64 rows, dequantize + cuBLAS above); else the reference. The CPU
    kernels quantize x to int8 per 64-column block (see kernels/quantization_kernels.c; ~0.3-0.5% relative error on
    the output) and beat "dequantize, then fp32 BLAS matmul" at every row count measured (92x at 1 row, 2.1x at
    512 rows, 4096x4096 INT4, 2 threads); CHATGLM_CPU_FLOAT_ACTIVATIONS=1 selects the exact fp32-activation ones (and no GEMM). `owner` (the
    QuantizedLinear) keeps the fp32 copies of the scale and bias that the C kernels take between calls."""
    packed = getattr(owner, "weight_layout", "thudm") == "lanes16"
    if x.device.type == "cpu":
        kernel = get_cpu_kernel()
        training = torch.is_grad_enabled() and x.requires_grad  # the C kernels have no backward
        rows = x.shape[:-1].numel()
        if kernel is not None and not training and rows > 0:
            if owner is not None:
                s, b = cached_fp32(owner, "weight_scale"), cached_fp32(owner, "bias")
            else:
                s, b = scale.float().contiguous(), bias
            if packed and kernel.packed_layout and not settings.cpu_float_activations:  # at every row count: as
                # fast as our GEMM from 128 to 512 rows (Zen 4, a ChatGLM2 block's INT4 matrices, 2 threads: 66.0 /
                # 71.9 ms at 128 rows, 282 / 289 at 512; INT8 alike), faster below
                return _by_row_chunks(x, lambda flat: kernel.linear(flat, weight, s, bits, b, packed=True))
            w = from_lanes16(weight) if packed else weight.contiguous()  # (a setting changed since the packing)
            path = _gemm_path(kernel) if rows >= GEMM_MIN_ROWS else None
            if path is not None and rows < gemm_min_rows(kernel, path):
                path = None
            if path == "int8" and x.shape[-1] % 64 == 0:
                return _by_row_chunks(x, lambda flat: kernel.gemm(flat, w, s, bits, b), GEMM_CHUNK_ROWS)
            if path == "bf16":
                return dequantized_gemm(kernel, x, w, s, bits, b)
            return _by_row_chunks(x, lambda flat: kernel.linear(flat, w, s, bits, b))
    if packed:  # the reference on the CPU (a move to another device puts THUDM's layout back first)
        weight = from_lanes16(weight)
    if x.device.type == "cuda" and not (torch.is_grad_enabled() and x.requires_grad) and cuda_kernels():
        from .triton_ops import triton_quantized_linear

        if torch.compiler.is_compiling():  # torch.compile: run the kernel launch as it is, between graphs
            return torch.compiler.disable(triton_quantized_linear)(x, weight, scale, bits, bias)
        return triton_quantized_linear(x, weight, scale, bits, bias)
    return quantized_linear_reference(x, weight, scale, bits, bias)


# Rows from which a quantized layer takes a GEMM (prefill). Measured, 2 threads, ms at 8 / 32 / 64 / 512 rows
# (benchmarks/bench_gemv.py --rows R; docs/benchmarks.md):
#   AMD EPYC (Zen 4; avx512_vnni, avx512_bf16, no AMX), 4096->27392 INT4: our INT8 GEMM 9.4 / 18.3 / 26.2 / 193,
#   the fused kernel 4.8 / 25.7 / 50.9 / 300, dequantize + torch's bf16 GEMM 19.4 / 36.6 / 56.5 / 311, torch's bf16
#   GEMM on bf16 weights 15.9 / 24.9 / 43.6 / 319; INT8 alike (about even with the fused kernel at 32 rows).
#   Intel Xeon (AMX), a block's four INT4 matrices at 16 / 32 / 64 rows: our GEMM on AMX tiles 10.9 / 14.2 / 22.2,
#   the fused kernel 14.7 / 28.4 / 59.4 (INT8 13.2 / 16.2 / 22.8 against 21.4 / 41.2 / 78.6). Decode batches below
#   these rows stay on the row kernels all the same, which give a row the bits it gets alone (and so does our GEMM).
GEMM_MIN_ROWS = 32
# The same on an AVX-512 VNNI build without AMX tiles, whose decode-batch ("lanes") kernel beats our GEMM up to
# about 60 rows (Zen 4, 2 threads, a ChatGLM2 block's four INT4 matrices, ms, lanes / GEMM: 32 rows 22.3 / 27.6,
# 48 38.4 / 45.7, 56 44.6 / 50.7, 64 45.2 / 43.8, 128 91.5 / 80.1; INT8 lanes still ahead at 96 rows: 88.4 / 96.1).
LANES_GEMM_MIN_ROWS = 64
# Rows per call of our GEMM: x and y in fp32 stay a few tens of MB for any prompt length.
GEMM_CHUNK_ROWS = 1024
# Most bytes of bf16 weight dequantized per block (a buffer kept by each thread that runs prefill): every block is
# one more GEMM call that packs all of x again, so blocks are few and even (16 MiB blocks cost 10-50% more than
# one; 64 MiB: chatglm2-6b's layers in 1, 4 (27392 x 4096) and 2 (4096 x 13696) blocks).
DEQUANT_GEMM_BLOCK_BYTES = 64 << 20
_scratch = threading.local()


def _gemm_path(kernel) -> str | None:
    """How GEMM_MIN_ROWS rows or more are computed on this CPU: "int8" (our INT8 GEMM, kernel.has_gemm: int8 dot
    products, on AMX int8 tiles where the build has them, kernel.gemm_tiles), "bf16" (a CPU with native bf16
    matmuls and no such kernel, or an AMX CPU whose tiles our build cannot use: dequantized_gemm), or None (the
    fused kernel at every row count: settings.cpu_quantized_gemm off, exact fp32 activations asked for, inside
    torch.compile, or neither). Measured at 512 rows, a block's four matrices, 2 threads: on a Zen 4 (no AMX) our
    VNNI GEMM 344 ms against 546 torch bf16; on a Xeon with AMX our tiles 138-141 ms against 154-162 dequantize +
    bf16 tiles and 262-275 our VNNI GEMM (at 32 / 128 rows 13 / 35 ms against 41 / 58 dequantize + bf16)."""
    if not settings.cpu_quantized_gemm or settings.cpu_float_activations or torch.compiler.is_compiling():
        return None
    if kernel.has_gemm and (kernel.gemm_tiles or not amx()):
        return "int8"
    return "bf16" if native_half_gemm(torch.bfloat16) else None


def gemm_min_rows(kernel, path: str | None = "int8") -> int:
    """Rows from which a quantized layer takes `path` (_gemm_path): LANES_GEMM_MIN_ROWS for our GEMM without AMX
    tiles, else GEMM_MIN_ROWS."""
    return LANES_GEMM_MIN_ROWS if path == "int8" and not kernel.gemm_tiles else GEMM_MIN_ROWS


@functools.cache
def amx() -> bool:
    """Whether this CPU has AMX bf16 tiles (and the kernels are built for it: CHATGLM_CPU_ISA=native), asked once."""
    return cpu_isa() == "native" and "amx_bf16" in cpu_flags()


def dequantized_gemm(kernel, x, weight, scale_f32, bits, bias=None):
    """y = x @ W^T (+ bias) for many rows of x: blocks of W's rows dequantized to bf16 (kernel.dequantize_bf16,
    exactly the reference's values rounded to bf16) into a reused buffer, each multiplied with every row of x by
    torch's bf16 GEMM (oneDNN: AMX tiles or AVX512-BF16, fp32 accumulation). x rounded to bf16 costs about as
    much precision as the fused kernel's int8 activations. The result has x's dtype."""
    k = x.shape[-1]
    n = weight.shape[0]
    flat = x.reshape(-1, k).to(torch.bfloat16)
    blocks = -(-n * k * 2 // DEQUANT_GEMM_BLOCK_BYTES)  # ceil
    block = -(-n // blocks)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < block * k:
        buf = _scratch.buf = torch.empty(block * k, dtype=torch.bfloat16)
    b = None if bias is None else bias.to(torch.bfloat16)
    if block == n:
        y = F.linear(flat, kernel.dequantize_bf16(weight, scale_f32, bits, out=buf), b)
    else:
        y = torch.empty(flat.shape[0], n, dtype=torch.bfloat16)
        for o in range(0, n, block):
            stop = min(n, o + block)
            w = kernel.dequantize_bf16(weight, scale_f32, bits, o, stop, out=buf)
            y[:, o:stop] = F.linear(flat, w, None if b is None else b[o:stop])
    return y.to(x.dtype).view(*x.shape[:-1], n)


def cuda_kernels() -> bool:
    """Whether quantized layers on CUDA run the Triton kernels (quantization/triton_ops.py): triton imports and
    settings.triton holds (CHATGLM_NO_TRITON unset). Otherwise they run the reference (dequantize, then
    matmul), with a warning from chatglm/backends.py. cpm_kernels, the original's CUDA kernels, carry no code for
    current GPUs (sm_90) and are not used."""
    return settings.triton and _triton_imports()


@functools.lru_cache(maxsize=1)
def _triton_imports() -> bool:
    """triton_ops.available(), asked once per process (a failing import is slow to repeat at every layer)."""
    from .triton_ops import available

    return available()


def _by_row_chunks(x, fn, chunk=None):
    """fn over the rows of x (flattened to 2D fp32) in chunks of `chunk` rows (CPU_CHUNK_ROWS), in x's dtype and
    shape."""
    chunk = chunk or CPU_CHUNK_ROWS
    if x.dtype == torch.float32 and x.is_contiguous() and x.numel() <= chunk * x.shape[-1]:
        y = fn(x.view(-1, x.shape[-1]))  # decode: no copies, no conversions
        return y.view(*x.shape[:-1], y.shape[-1])
    flat = x.reshape(-1, x.shape[-1]).float().contiguous()
    if flat.shape[0] <= chunk:
        y = fn(flat)
    else:  # long prompts: the activation block each weight row meets stays in cache
        y = torch.cat([fn(flat[i : i + chunk]) for i in range(0, flat.shape[0], chunk)])
    return y.to(x.dtype).view(*x.shape[:-1], -1)


# Rows of x per kernel call (prefill of long prompts is cut into chunks of this many tokens).
CPU_CHUNK_ROWS = 256


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, owner=None) -> torch.Tensor:
    """F.linear(x, weight, bias) with the CPU fast path (no autograd): the C kernel (kernel.float_linear), which
    reads each weight once per chunk of rows and accumulates in fp32, each row of x in one fixed order.
    - bf16/fp16 weights: for decode it runs at memory speed (torch's bf16 GEMV reaches a fraction of it); for
      prefill it matches an fp32 BLAS matmul without the fp32 copy of the weights. On a CPU with native
      half-precision GEMM (AVX512-BF16, AMX) torch's own matmul takes the prefill (more than FAST_LINEAR_MAX_ROWS
      rows).
    - fp32 weights and activations: up to FAST_LINEAR_MAX_ROWS rows (decode batches), so that a decode row gets
      the bits it gets alone (torch's sgemm rounds a row differently with other rows beside it, logits within
      about 1e-6); more rows (prefill), torch's sgemm. Zen 4, 2 threads, 4096 x 4096 fp32: ours 2.0 / 4.7 / 7.8
      ms at 1 / 8 / 16 rows against torch's 3.1 / 6.3 / 8.9, but 13.2 against 10.3 at 32.
    The result has x's dtype. Otherwise this is F.linear (weight and bias cast to x's dtype when they differ).
    `owner` (the module whose weight and bias these are) keeps the bias's fp32 copy between calls."""
    rows = x.shape[:-1].numel()
    if (
        x.device.type == "cpu"
        and weight.dim() == 2
        and rows > 0
        and cpu_fast_paths()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        kernel = get_cpu_kernel()
        if kernel is not None and _float_kernel_takes(x.dtype, weight.dtype, rows):
            w = weight.contiguous()
            b = cached_fp32(owner, "bias") if owner is not None else bias
            return _by_row_chunks(x, lambda flat: kernel.float_linear(flat, w, b))
        half = weight.dtype in (torch.bfloat16, torch.float16) and native_half_gemm(weight.dtype)
        if half and x.dtype == torch.float32 and rows > FAST_LINEAR_MAX_ROWS and not torch.is_grad_enabled():
            # fp32 activations (an INT8/INT4 model's trunk) against a half layer (its output layer), many rows, in
            # inference: torch's native half GEMM, not an fp32 copy of the weight at every call
            b = None if bias is None else bias.to(weight.dtype)
            return F.linear(x.to(weight.dtype), weight, b).to(x.dtype)
    return linear_reference(x, weight, bias)


def _float_kernel_takes(x_dtype: torch.dtype, w_dtype: torch.dtype, rows: int) -> bool:
    """Whether fast_linear gives `rows` rows of x_dtype against a w_dtype weight to the C kernel."""
    if w_dtype in (torch.bfloat16, torch.float16):
        return rows <= FAST_LINEAR_MAX_ROWS or not native_half_gemm(w_dtype)
    return w_dtype == torch.float32 and x_dtype == torch.float32 and rows <= FAST_LINEAR_MAX_ROWS


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear in x's dtype: weight and bias cast to it when they differ (the kernels accept mixed dtypes, so the
    reference does too)."""
    if weight.dtype != x.dtype:
        weight, bias = weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None
    return F.linear(x, weight, bias)


# Above this many rows torch's matmul takes over from our kernel: for fp32 weights always, for bf16/fp16 weights on
# a CPU with native half-precision GEMM. Decode batches of an engine with max_batch <= 16 stay on our kernel.
FAST_LINEAR_MAX_ROWS = 16
