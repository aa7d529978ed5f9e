"""The operations the models are built from, each a module whose forward is the torch reference, with the
version running our C kernels (kernels/quantization_kernels.c) beside it.

The model files build the references. `use_kernels(model)` swaps each for its kernel version (the class of the
module changes; parameters, names and state_dict stay), the way `quantize` swaps Linear for QuantizedLinear.
The models do it when they are built, unless `settings.cpu_kernels` is off (CHATGLM_NO_CPU_KERNEL=1);
`use_kernels(model, False)` swaps the references back. A kernel module runs its kernel only where the kernel
applies (fp32 activations on the CPU, no autograd, the layout the kernel reads) and its reference elsewhere
(CUDA, training, fp16), so a swapped model runs anywhere.

  reference    kernel version   the kernel
  Linear       CpuLinear        bf16/fp16 weights on the CPU: each weight read once per chunk of rows, fp32 sums
  RMSNorm      CpuRMSNorm       one pass per row
  Rotary       CpuRotary        q and k rotated in place in the projection's output
  Attention    CpuAttention     one query per row (decode) over the cache, KV groups shared, rows at own lengths
  SwiGLU       CpuSwiGLU        silu(gate) * up in one pass
  LayerNorm    -                (v1) computes in the input's dtype whatever its parameters' dtype

`compute_dtype`: on a CPU without native half-precision GEMM, inference keeps the weights in bf16/fp16 (or
INT8/INT4) but computes the activations, attention and KV cache in fp32, as CPU inference engines do: torch's
emulated bf16 kernels (attention, norms, conversions around every GEMV) cost more there than the weights' memory
traffic. An INT8/INT4 model does so on every CPU: its big matrices are our kernels, which take fp32 activations
(as the original's CPU path, `.float().quantize()`, computes), so bf16 activations would only add conversions and
torch's bf16 norms, rotary and per-row attention around them. The result is at least as accurate as bf16
arithmetic. Off with settings.cpu_kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import cpu_fast_paths, get_cpu_kernel, native_half_gemm
from quantization.ops import fast_linear, linear_reference

HALF = (torch.bfloat16, torch.float16)


def compute_dtype(x: torch.Tensor, quantized: bool = False) -> torch.dtype:
    """The dtype the trunk computes in for hidden states `x` (the embedding output) of a model whose linear layers
    are INT8/INT4 (`quantized`: fp32 where our kernels run them; without the kernels, the reference dequantizes
    into the activations' dtype) or not."""
    if (
        x.dtype in HALF
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and cpu_fast_paths()
        and ((quantized and get_cpu_kernel() is not None) or not native_half_gemm(x.dtype))
    ):
        return torch.float32
    return x.dtype


def cpu_kernel_for(x: torch.Tensor, *also: torch.dtype):
    """The CPU kernel library (kernels.CpuKernel) when x is an fp32 (or `also` dtype) CPU activation of inference
    (autograd off), else None (also when the library could not be built)."""
    if (x.dtype == torch.float32 or x.dtype in also) and x.device.type == "cpu" and not torch.is_grad_enabled():
        return get_cpu_kernel()
    return None


# --- Linear ---------------------------------------------------------------------------------------------------


class Linear(nn.Linear):
    """nn.Linear that accepts activations of another dtype than its weights (isinstance(nn.Linear) holds:
    quantization, PEFT, accelerate)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_reference(x, self.weight, self.bias)


class CpuLinear(Linear):
    """Linear through quantization.ops.fast_linear: the C kernel for bf16/fp16 weights on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_linear(x, self.weight, self.bias, self)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computing in the input's dtype whatever its parameters' dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


# --- RMSNorm --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x):
        if x.dtype == torch.float32:  # the same arithmetic in one fused op
            return F.rms_norm(x, (x.shape[-1],), self.weight.float(), self.eps)
        # Statistics in fp32 whatever the weights are (the original does the same).
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x * torch.rsqrt(variance + self.eps))).to(x.dtype)


class CpuRMSNorm(RMSNorm):
    def forward(self, x):
        kernel = cpu_kernel_for(x)
        if kernel is not None and x.is_contiguous() and self.weight.is_contiguous():
            return kernel.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


# --- Rotary (GLM2: pairs (x[2i], x[2i+1]) of the first dims of each head rotated) ------------------------------


def apply_rotary(x, rope):
    # x: [b, s, heads, d]; rope: [b, s, r/2, 2] (cos, sin); rotate pairs (x[2i], x[2i+1]) of the first r dims.
    r = rope.shape[-2] * 2
    xs = x[..., :r].unflatten(-1, (r // 2, 2))
    cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]  # [b, s, 1, r/2]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return torch.cat([out.flatten(-2), x[..., r:]], dim=-1)


class Rotary(nn.Module):
    """qk [b, s, heads, d] (q's and k's heads side by side), rope [b, s, r/2, 2] -> qk rotated."""

    def forward(self, qk, rope):
        return apply_rotary(qk, rope)


class CpuRotary(Rotary):
    """Rotates in place when qk is a view of rows of one contiguous buffer (the projection's output)."""

    def forward(self, qk, rope):
        kernel = cpu_kernel_for(qk)
        b, s, heads, d = qk.shape
        step = qk.stride(0) if s == 1 else qk.stride(1)  # floats from one row (token) to the next
        rows_in_place = qk.stride(3) == 1 and qk.stride(2) == d and (b == 1 or qk.stride(0) == s * step)
        if kernel is not None and rows_in_place and rope.dtype == torch.float32 and rope.is_contiguous():
            kernel.rotary_(qk, b * s, step, heads, d, rope.view(b * s, -1, 2))
            return qk
        return super().forward(qk, rope)


# --- Attention ------------------------------------------------------------------------------------------------


def decode_attention(q, k, v):
    """One query per row over the whole cache, KV groups shared by consecutive heads: two batched matmuls.
    On the CPU this is 2-4x faster than SDPA's flash kernel for a single query (300-8000 cached positions)."""
    b, heads, _, d = q.shape
    groups = k.shape[1]
    qg = q.reshape(b, groups, heads // groups, d)  # head h -> group h // (heads / groups)
    probs = (torch.matmul(qg, k.transpose(-1, -2)) * d**-0.5).softmax(dim=-1)
    return torch.matmul(probs, v).reshape(b, heads, 1, d)


class KeyLengths:
    """The mask of a decode step whose rows are at their own lengths (the engine's batch): row r's one query
    attends to its first lengths[r] keys. Attention computes each row with exactly those keys (decode_rows, or
    the kernel reading the lengths), so a row gets the same bits alone (no mask) or beside any other rows."""

    __slots__ = ("lengths", "_tensor")

    def __init__(self, lengths: tuple[int, ...]):
        self.lengths, self._tensor = tuple(lengths), None

    def tensor(self) -> torch.Tensor:
        """int32 [b] on the CPU (made once per step, shared by the layers)."""
        if self._tensor is None:
            self._tensor = torch.tensor(self.lengths, dtype=torch.int32)
        return self._tensor


def decode_rows(q, k, v, lengths=None):
    """One query per row, row r over its first lengths[r] keys (all of them when None), computed the same way
    whether the row is alone or in a batch: each row with exactly its own keys, no mask, no padding (torch's
    kernels round a row differently once padding or a mask is beside it). Rows of one length run as one call."""
    b, heads, _, d = q.shape
    groups = k.shape[1]

    def rows(qr, kr, vr):
        if qr.dtype == torch.float32 and qr.device.type == "cpu":
            return decode_attention(qr, kr, vr)
        qg = qr.reshape(qr.shape[0], groups, heads // groups, d)  # a group's heads as its rows: no repeated keys
        return F.scaled_dot_product_attention(qg, kr, vr).view(qr.shape[0], heads, 1, d)

    if lengths is None:
        return rows(q, k, v)
    return torch.cat([rows(q[r : r + 1], k[r : r + 1, :, :n], v[r : r + 1, :, :n]) for r, n in enumerate(lengths)])


class Attention(nn.Module):
    """q [b, heads, s, d], k and v [b, groups, keys, d] (head h reads KV group h // (heads / groups)), mask
    [b, 1, s, keys] bool (True = may attend), KeyLengths (s = 1) or None (causal) -> [b, heads, s, d], scaled by
    1/sqrt(d)."""

    def forward(self, q, k, v, mask):
        b, heads, s, d = q.shape
        groups = k.shape[1]
        if s == 1 and (mask is None or isinstance(mask, KeyLengths)):
            return decode_rows(q, k, v, None if mask is None else mask.lengths)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, enable_gqa=groups != heads)
        if s == 1:  # one query with a mask (fixed-span decode, padded batches): a group's heads as its rows,
            # so no kernel repeats the keys and values per head (what enable_gqa does once a mask is given)
            qg = q.reshape(b, groups, heads // groups, d)
            return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask).view(b, heads, 1, d)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups != heads)


class CpuAttention(Attention):
    """The decode step (one query a row, over all its keys or its KeyLengths) in one kernel call, reading q where
    the projection wrote it: fp32 activations and cache, or bf16 ones (a bf16 model on a CPU with native bf16
    matmuls: read as they are, computed in fp32; rows at their own lengths took one SDPA call each: at ChatGLM2's
    shape on a Zen 4, 8 rows x 300 keys 0.54 -> 0.37 ms a layer, 8 x 1000 1.50 -> 1.25, one row x 4000 even).
    Other dtypes (fp16) keep torch's attention."""

    def forward(self, q, k, v, mask):
        b, heads, s, d = q.shape
        decode = s == 1 and (mask is None or isinstance(mask, KeyLengths))
        kernel = cpu_kernel_for(q, torch.bfloat16) if decode else None
        if kernel is not None and q.stride(1) == d and q.stride(3) == 1 and k.stride() == v.stride():
            if k.stride(-1) == 1 and k.dtype == v.dtype == q.dtype:
                lengths = mask.tensor() if mask is not None else None
                out = kernel.attention_decode(q, k, v, heads, d**-0.5, lengths)
                return out.to(q.dtype).view(b, heads, 1, d)
        return super().forward(q, k, v, mask)


# --- SwiGLU ---------------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """h [..., 2f] ([gate | up]) -> silu(gate) * up [..., f]."""

    def forward(self, h):
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up


class CpuSwiGLU(SwiGLU):
    def forward(self, h):
        kernel = cpu_kernel_for(h) if h.is_contiguous() else None
        return kernel.silu_mul(h) if kernel is not None else super().forward(h)


# --- the swap -------------------------------------------------------------------------------------------------

KERNEL_VERSIONS = {Linear: CpuLinear, RMSNorm: CpuRMSNorm, Rotary: CpuRotary, Attention: CpuAttention,
                   SwiGLU: CpuSwiGLU}  # fmt: skip
REFERENCES = {kernel: reference for reference, kernel in KERNEL_VERSIONS.items()}


def use_kernels(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Swap every reference module of the model for its kernel version (enabled) or back; returns the model."""
    table = KERNEL_VERSIONS if enabled else REFERENCES
    for module in model.modules():
        swap = table.get(type(module))
        if swap is not None:
            module.__class__ = swap
    return model
