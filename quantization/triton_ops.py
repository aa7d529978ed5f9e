"""Weight-only INT8/INT4 matmul kernels in Triton, in THUDM's checkpoint layout (see quantization/ops.py).

    INT8: weight int8 [N, K], scale fp16 [N]: y = x @ (weight * scale[:, None]).T + bias
    INT4: weight int8 [N, K/2], byte j of a row = column 2j in the HIGH nibble, column 2j+1 in the LOW nibble,
          both signed 4-bit two's complement.

Public functions: `available()`, `triton_quantized_linear(x, weight, scale, bits, bias=None, ...)` and
`triton_dequantize(weight, scale, bits, dtype=torch.float32, ...)`. They run on CUDA tensors, or on CPU tensors
under Triton's interpreter (TRITON_INTERPRET=1), which is how the tests run without a GPU.

Nothing here imports triton at module import time: the kernels are plain functions below, turned into Triton
kernels by `_kernels()` on first use (cached per value of TRITON_INTERPRET, because `triton.jit` decides between
the compiler and the interpreter when it runs). `tl` and `triton` are module globals that `_kernels()` fills in,
so the kernels' global lookups find them.

Interpreter notes (Triton 3.x): the kernels call only `tl` builtins (`tl.full`, not `tl.zeros`: the latter is a
@triton.jit helper of triton.language, compiled-mode only when triton was imported before TRITON_INTERPRET was
set). The interpreter's bf16 is raw uint16 in numpy: an int -> bf16 cast and a bf16 `tl.dot` give garbage and
fp32 -> bf16 truncates. So the weight goes int -> fp32 -> x's dtype (exact, and the safe route on GPUs too);
under the interpreter only, a bf16 x runs the dot in fp32 (the same math: bf16 products are exact in fp32) and
the bf16 dequant rounds to nearest even by hand. Compiled on a GPU, bf16 takes the native paths.

Kernel design (decode: x has few rows M, the weight is read once and the run is bound by memory bandwidth):
  - grid = (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), SPLIT_K). Each program owns BLOCK_N output columns (weight rows)
    times BLOCK_M rows of x, and one contiguous K range of `k_per_split` columns; it walks that range in BLOCK_K
    steps, loading each weight tile once as int8 (INT4: BLOCK_K/2 packed bytes per row), converting it to x's
    dtype in registers and accumulating in fp32 with `tl.dot`.
  - M is padded (by masking) to BLOCK_M = max(16, next_pow2(M)) <= 64, the smallest tile `tl.dot` takes, so the
    tensor cores do the multiply-adds; at M=1 most of that work is padding, but the kernel is memory bound and
    the dot keeps one code path for M in 1..64 (no M-by-M loop, no [M, N, K] broadcast in registers).
  - INT4 needs no interleave: the even columns of x (stride-2 pointers) meet the high nibbles and the odd columns
    meet the low nibbles, as two dots on the same [BLOCK_K/2, BLOCK_N] packed tile.
  - The per-row scale is applied once to the accumulator at the end (acc * scale[n]), then the bias.
  - SPLIT_K > 1 (when the N x M blocks alone would not fill the GPU, e.g. N=4096 at BLOCK_N=64 is 64 programs on
    a 132-SM H100) adds each program's scaled partial sum into a zeroed fp32 output with `tl.atomic_add` (so
    the last bits depend on the order of the adds); the bias is added by the K split 0 only.
  - Above `dequant_above` rows (prefill) the weight is dequantized to x's dtype by the Triton dequant kernel and
    multiplied with torch.matmul (cuBLAS): a compute-bound GEMM that cuBLAS does better than this kernel.
Block sizes are fixed with a small heuristic (no autotune): BLOCK_N 64, BLOCK_K 128 (INT8) / 256 (INT4, i.e.
128 packed bytes per row), both capped for small K; every load and store is masked, so N and K need not be
multiples of the blocks (K even for INT4).
A second kernel for one row of x (`gemv=True`, or CHATGLM_TRITON_GEMV=1): no tensor cores, each program
multiplies BLOCK_N weight rows elementwise with x in fp32 and reduces once at the end, reading the weight in
its stored layout. Which of the two is faster at batch 1 on a given GPU is for bench_gemv.py to say.
"""

from __future__ import annotations

import os

import torch

from kernels.settings import settings

triton = None  # filled in by _kernels()
tl = None
_add = None

_KERNEL_CACHE: dict = {}
_SM_COUNT: dict = {}

DEQUANT_ABOVE = 64  # more rows than this: dequantize + torch.matmul
MAX_BLOCK_M = 64


def available() -> bool:
    """True when `import triton` works (it may be absent, or broken by a mismatched install)."""
    try:
        import triton as _triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _interpret_key() -> str:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower()


def _interpreting() -> bool:
    """Whether `triton.jit` builds interpreted kernels now (triton's own setting; the env var without knobs)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:
        return _interpret_key() in ("1", "true", "on", "yes")


def _kernels():
    """The jitted kernels for the current TRITON_INTERPRET value, built on first use."""
    key = (_interpret_key(), _interpreting())
    built = _KERNEL_CACHE.get(key)
    if built is None:
        global triton, tl
        import triton as _triton
        import triton.language as _tl

        triton, tl = _triton, _tl
        global _add
        # tl.reduce's combine function for the GEMV kernel (a global there): tl.sum's own, which Triton's
        # interpreter runs as one numpy sum (any other combine goes element by element, ~100x slower).
        _add = getattr(getattr(_tl, "standard", None), "_sum_combine", None) or _triton.jit(_add_fn)
        built = {
            "linear": _triton.jit(_quantized_linear_kernel),
            "gemv": _triton.jit(_quantized_gemv_kernel),
            "dequantize": _triton.jit(_dequantize_kernel),
        }
        _KERNEL_CACHE[key] = built
    return built


def clear_kernel_cache() -> None:
    """Forget the built kernels (the next call rebuilds them for the current TRITON_INTERPRET)."""
    _KERNEL_CACHE.clear()


# ---------------------------------------------------------------------------------------------- kernels


def _quantized_linear_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_om,
    k_per_split,
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_rows = w_ptr + offs_n[None, :] * stride_wn  # the weight tile is loaded as [K, N] for the dot
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # builtins only: see the module docstring
    if BITS == 8:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(k_start, k_end, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < k_end
            xt = tl.load(x_rows + kk[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wt = tl.load(w_rows + kk[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0)
            wt = wt.to(tl.float32)  # int -> fp32 -> x's dtype: exact, and supported for bf16 on every target
            if FP32_DOT:
                acc = tl.dot(xt.to(tl.float32), wt, acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, wt.to(xt.dtype), acc)
    else:
        offs_j = tl.arange(0, BLOCK_K // 2)
        for k0 in range(k_start, k_end, BLOCK_K):  # k0 is even: k_per_split and BLOCK_K are
            jj = k0 // 2 + offs_j  # packed byte = unpacked columns 2jj (high nibble) and 2jj+1 (low)
            mask_j = jj * 2 < k_end
            mask_x = mask_m[:, None] & mask_j[None, :]
            x_even = tl.load(x_rows + (jj * 2)[None, :] * stride_xk, mask=mask_x, other=0.0)
            x_odd = tl.load(x_rows + (jj * 2 + 1)[None, :] * stride_xk, mask=mask_x, other=0.0)
            wp = tl.load(w_rows + jj[:, None], mask=mask_j[:, None] & mask_n[None, :], other=0).to(tl.int32)
            hi = (wp >> 4).to(tl.float32)  # arithmetic shifts on the sign-extended byte
            lo = ((wp << 28) >> 28).to(tl.float32)
            if FP32_DOT:
                acc = tl.dot(x_even.to(tl.float32), hi, acc, input_precision="ieee")
                acc = tl.dot(x_odd.to(tl.float32), lo, acc, input_precision="ieee")
            else:
                acc = tl.dot(x_even, hi.to(x_even.dtype), acc)
                acc = tl.dot(x_odd, lo.to(x_odd.dtype), acc)
    scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if SPLIT_K > 1:
            bias = bias * (pid_k == 0).to(tl.float32)
        acc += bias[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")


def _add_fn(a, b):
    return a + b


def _quantized_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    N,
    K,
    stride_xk,
    stride_wn,
    k_per_split,
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One row of x (decode at batch 1): BLOCK_N weight rows, read as stored (K contiguous), multiplied
    elementwise in fp32 and summed once at the end; no tensor-core tile, so no padding of the row to 16."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    if BITS == 8:
        acc = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(k_start, k_end, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < k_end
            xv = tl.load(x_ptr + kk * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
            wt = tl.load(w_rows + kk[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0)
            acc += wt.to(tl.float32) * xv[None, :]
    else:
        acc = tl.full((BLOCK_N, BLOCK_K // 2), 0.0, tl.float32)
        offs_j = tl.arange(0, BLOCK_K // 2)
        for k0 in range(k_start, k_end, BLOCK_K):  # k0 is even: k_per_split and BLOCK_K are
            jj = k0 // 2 + offs_j  # packed byte = columns 2jj (high nibble) and 2jj+1 (low)
            mask_j = jj * 2 < k_end
            x_even = tl.load(x_ptr + (jj * 2) * stride_xk, mask=mask_j, other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptr + (jj * 2 + 1) * stride_xk, mask=mask_j, other=0.0).to(tl.float32)
            wp = tl.load(w_rows + jj[None, :], mask=mask_n[:, None] & mask_j[None, :], other=0).to(tl.int32)
            hi = (wp >> 4).to(tl.float32)  # arithmetic shifts on the sign-extended byte
            lo = ((wp << 28) >> 28).to(tl.float32)
            acc += hi * x_even[None, :] + lo * x_odd[None, :]
    y = tl.reduce(acc, 1, _add)  # not tl.sum: a jit helper that the interpreter cannot call (see _kernels)
    y = y * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if SPLIT_K > 1:
            bias = bias * (pid_k == 0).to(tl.float32)
        y += bias
    if SPLIT_K == 1:
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.atomic_add(out_ptr + offs_n, y, mask=mask_n, sem="relaxed")


def _dequantize_kernel(
    w_ptr,
    s_ptr,
    out_ptr,
    N,
    KW,
    stride_wn,
    stride_on,
    BITS: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[n, k] = q[n, k] * scale[n], in fp32 then cast to out's dtype; BLOCK_K counts stored weight columns."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_c < KW)[None, :]
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_c[None, :], mask=mask, other=0).to(tl.int32)
    scale = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    out_rows = out_ptr + offs_n[:, None] * stride_on
    out_ty = out_ptr.dtype.element_ty
    if BITS == 8:
        val = w.to(tl.float32) * scale
        if BF16_BY_HAND:
            val = (val.to(tl.uint32, bitcast=True) + 0x7FFF + ((val.to(tl.uint32, bitcast=True) >> 16) & 1)) >> 16
            val = val.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(out_rows + offs_c[None, :], val.to(out_ty), mask=mask)
    else:
        hi = (w >> 4).to(tl.float32) * scale
        lo = ((w << 28) >> 28).to(tl.float32) * scale
        if BF16_BY_HAND:
            hi = (hi.to(tl.uint32, bitcast=True) + 0x7FFF + ((hi.to(tl.uint32, bitcast=True) >> 16) & 1)) >> 16
            hi = hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)
            lo = (lo.to(tl.uint32, bitcast=True) + 0x7FFF + ((lo.to(tl.uint32, bitcast=True) >> 16) & 1)) >> 16
            lo = lo.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(out_rows + (offs_c * 2)[None, :], hi.to(out_ty), mask=mask)
        tl.store(out_rows + (offs_c * 2 + 1)[None, :], lo.to(out_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _check_block(name: str, value: int, minimum: int) -> int:
    value = int(value)
    if value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value}")
    return value


def _check_weight(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> int:
    """The number of input features K of a quantized weight, after checking the layout."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if weight.dim() != 2 or weight.dtype != torch.int8:
        raise ValueError(f"weight must be a 2D int8 tensor, got {tuple(weight.shape)} {weight.dtype}")
    if scale.shape != (weight.shape[0],):
        raise ValueError(f"scale must have shape ({weight.shape[0]},), got {tuple(scale.shape)}")
    return weight.shape[1] * (2 if bits == 4 else 1)


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def triton_dequantize(
    weight: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    dtype: torch.dtype = torch.float32,
    *,
    block_n: int = 64,
    block_k: int = 128,
) -> torch.Tensor:
    """quantization.ops.dequantize as a Triton kernel: int8 [N, K] or packed [N, K/2] -> dtype [N, K]."""
    K = _check_weight(weight, scale, bits)
    N, KW = weight.shape
    block_n, block_k = _check_block("block_n", block_n, 1), _check_block("block_k", block_k, 1)
    weight, scale = weight.contiguous(), scale.contiguous()
    out = torch.empty(N, K, dtype=dtype, device=weight.device)
    if out.numel() == 0:
        return out
    grid = (_cdiv(N, block_n), _cdiv(KW, block_k))
    _kernels()["dequantize"][grid](
        weight,
        scale,
        out,
        N,
        KW,
        weight.stride(0),
        out.stride(0),
        BITS=bits,
        BF16_BY_HAND=dtype == torch.bfloat16 and _interpreting(),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out


def triton_quantized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    dequant_above: int = DEQUANT_ABOVE,
    gemv: bool | None = None,
) -> torch.Tensor:
    """y = x @ dequantize(weight, scale)^T + bias in x's dtype, for x [..., K] in fp16/bf16/fp32.

    Up to `dequant_above` rows of x: the fused weight-only kernel (fp32 accumulation). Above: dequantize with
    the Triton kernel, then torch.matmul. block_n / block_k / split_k override the heuristic (tests use small
    blocks to keep the interpreter fast); split_k defaults to 1 off CUDA. gemv=True runs one row of x through
    the GEMV kernel instead of the tensor-core one; None: when CHATGLM_TRITON_GEMV=1 and x has one row (the
    tensor-core kernel stays the default until a GPU run of benchmarks/bench_gemv.py, which times both,
    says otherwise)."""
    K = _check_weight(weight, scale, bits)
    N = weight.shape[0]
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the {bits}-bit weight {K}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0 or N == 0:
        y = torch.zeros(M, N, dtype=x.dtype, device=x.device)
        if bias is not None:
            y += bias.to(x.dtype)
        return y.view(*lead, N)
    if M > dequant_above and not gemv:
        w = triton_dequantize(weight, scale, bits, x.dtype)
        y = torch.matmul(x2, w.t())
        if bias is not None:
            y += bias.to(y.dtype)
        return y.view(*lead, N)

    weight, scale = weight.contiguous(), scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if gemv is None:
        gemv = M == 1 and settings.triton_gemv
    if gemv:
        if M != 1:
            raise ValueError(f"the GEMV kernel takes one row of x, got {M}")
        return _gemv(x2, weight, scale, bits, bias, block_n, block_k, split_k).view(*lead, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    min_k = 32 if bits == 4 else 16  # tl.dot needs 16 on the K side; INT4 runs it on BLOCK_K / 2
    if block_n is None:
        block_n = 64
    if block_k is None:
        block_k = min(256 if bits == 4 else 128, max(min_k, _next_pow2(K)))
    block_n = _check_block("block_n", block_n, 16)
    block_k = _check_block("block_k", block_k, min_k)
    block_m = min(MAX_BLOCK_M, max(16, _next_pow2(M)))
    n_blocks, m_blocks = _cdiv(N, block_n), _cdiv(M, block_m)
    split_k, k_per_split = _split_k(x, split_k, n_blocks * m_blocks, K, block_k)
    out = _output(x, M, N, split_k)
    grid = (n_blocks, m_blocks, split_k)
    _kernels()["linear"][grid](
        x2,
        weight,
        scale,
        bias if bias is not None else scale,
        out,
        M,
        N,
        K,
        x2.stride(0),
        x2.stride(1),
        weight.stride(0),
        out.stride(0),
        k_per_split,
        BITS=bits,
        HAS_BIAS=bias is not None,
        SPLIT_K=split_k,
        FP32_DOT=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _interpreting()),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
        num_stages=3,
    )
    return out.to(x.dtype).view(*lead, N)


def _split_k(x, split_k, programs, K, block_k):
    """(K splits, columns per split) for a launch of `programs` output blocks: by default enough splits for
    about two programs per SM on a GPU (at most 16), one elsewhere; never an empty split."""
    k_blocks = _cdiv(K, block_k)
    if split_k is None:
        split_k = 1
        target = 2 * _sm_count(x.device) if x.is_cuda else 0
        if programs < target:
            split_k = min(_cdiv(target, programs), k_blocks, 16)
    split_k = max(1, min(int(split_k), k_blocks))
    k_per_split = _cdiv(k_blocks, split_k) * block_k
    return _cdiv(K, k_per_split), k_per_split


def _output(x, M, N, split_k):
    """The kernels' output: x's dtype, or a zeroed fp32 one that the K splits add into."""
    if split_k == 1:
        return torch.empty(M, N, dtype=x.dtype, device=x.device)
    return torch.zeros(M, N, dtype=torch.float32, device=x.device)


def _gemv(x, weight, scale, bits, bias, block_n, block_k, split_k):
    """The GEMV kernel's launch for x [1, K]: BLOCK_N 32 weight rows per program, BLOCK_K 256 (INT8) / 512
    (INT4) columns per step, split-K to fill the GPU as the tensor-core kernel does."""
    N = weight.shape[0]
    K = x.shape[1]
    block_n = _check_block("block_n", 32 if block_n is None else block_n, 1)
    if block_k is None:
        block_k = min(512 if bits == 4 else 256, max(16, _next_pow2(K)))
    block_k = _check_block("block_k", block_k, 2 if bits == 4 else 1)
    n_blocks = _cdiv(N, block_n)
    split_k, k_per_split = _split_k(x, split_k, n_blocks, K, block_k)
    out = _output(x, 1, N, split_k)
    _kernels()["gemv"][(n_blocks, split_k)](
        x,
        weight,
        scale,
        bias if bias is not None else scale,
        out,
        N,
        K,
        x.stride(1),
        weight.stride(0),
        k_per_split,
        BITS=bits,
        HAS_BIAS=bias is not None,
        SPLIT_K=split_k,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return out.to(x.dtype)


__all__ = ["available", "clear_kernel_cache", "triton_dequantize", "triton_quantized_linear"]
