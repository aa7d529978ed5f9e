"""The CPU kernels as PyTorch custom operators, for torch.compile.

A ctypes call reads raw pointers, which torch.compile cannot trace: a compiled graph would break around every
kernel call or, as `get_cpu_kernel` did before, leave the kernels out. Registered as operators
(`torch.ops.chatglm.*`), each kernel is one opaque node of the graph with a shape-only ("fake") version for
tracing, so a compiled decode step keeps them.

`CompiledKernel` has the methods of `kernels.CpuKernel` that the model calls, each going through its
operator; `kernels.get_cpu_kernel()` returns it while torch.compile traces, once `register()` has run (the
compiled decode step runs it; call it before compiling the model yourself). Eager code keeps calling the
ctypes wrapper directly (an operator costs a few microseconds of dispatch per call).
"""

from __future__ import annotations

import threading

import torch
from torch.library import custom_op


def _kernel():
    from . import get_cpu_kernel

    kernel = get_cpu_kernel()
    if kernel is None:
        raise RuntimeError("the CPU kernels are not available")
    return kernel


registered = False
_register_lock = threading.Lock()


def register() -> None:
    """Define the operators (once per process). Called before torch.compile builds a decode step; not at
    import, because defining operators loads torch.compile's machinery (and triton, where installed)."""
    global registered
    with _register_lock:
        if registered:
            return
        _define()
        registered = True


def _define() -> None:
    @custom_op("chatglm::cpu_linear", mutates_args=())
    def cpu_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int,
                   bias: torch.Tensor | None, packed: bool = False) -> torch.Tensor:  # fmt: skip
        return _kernel().linear(x, weight, scale, bits, bias, packed=packed)

    @cpu_linear.register_fake
    def _(x, weight, scale, bits, bias, packed=False):
        return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)

    @custom_op("chatglm::cpu_float_linear", mutates_args=())
    def cpu_float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _kernel().float_linear(x, weight, bias)

    @cpu_float_linear.register_fake
    def _(x, weight, bias):
        return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)

    @custom_op("chatglm::cpu_rms_norm", mutates_args=())
    def cpu_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return _kernel().rms_norm(x, weight, eps)

    @cpu_rms_norm.register_fake
    def _(x, weight, eps):
        return torch.empty_like(x)

    @custom_op("chatglm::cpu_rotary_", mutates_args=("x",))
    def cpu_rotary_(
        x: torch.Tensor, rows: int, row_stride: int, heads: int, head_dim: int, cos_sin: torch.Tensor
    ) -> None:
        _kernel().rotary_(x, rows, row_stride, heads, head_dim, cos_sin)

    @cpu_rotary_.register_fake
    def _(x, rows, row_stride, heads, head_dim, cos_sin):
        return None

    @custom_op("chatglm::cpu_silu_mul", mutates_args=())
    def cpu_silu_mul(h: torch.Tensor) -> torch.Tensor:
        return _kernel().silu_mul(h)

    @cpu_silu_mul.register_fake
    def _(h):
        return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)


class CompiledKernel:
    """The CpuKernel methods the model calls, through the operators above (see the module docstring)."""

    def attention_decode(self, q, k, v, heads, scale, lengths=None):
        # Not an operator: it reads strided cache views. The fixed-shape decode step (what gets compiled) runs
        # SDPA with a mask instead; this is the same arithmetic in PyTorch ops for anything else compiled.
        b, groups, t, d = k.shape
        q, k, v = q.float(), k.float(), v.float()  # as the kernel: bf16 read as it is, computed in fp32
        qg = q[:, : heads * d].reshape(b, groups, heads // groups, d)
        scores = torch.matmul(qg, k.transpose(-1, -2)) * scale
        if lengths is not None:
            hidden = torch.arange(t) >= lengths[:, None].long()  # [b, t]
            scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
        return torch.matmul(scores.softmax(dim=-1), v).reshape(b, heads * d)

    @property
    def packed_layout(self) -> bool:
        """The compiled library's (get_cpu_kernel hands out this object while tracing, so it is not asked)."""
        from . import _cpu_kernel

        return _cpu_kernel is not None and _cpu_kernel.packed_layout

    def linear(self, x, weight, scale_f32, bits, bias=None, packed=False):
        return torch.ops.chatglm.cpu_linear(x.contiguous(), weight, scale_f32, bits, bias, packed)

    def float_linear(self, x, weight, bias=None):
        return torch.ops.chatglm.cpu_float_linear(x.contiguous(), weight, bias)

    def rms_norm(self, x, weight, eps):
        return torch.ops.chatglm.cpu_rms_norm(x, weight, eps)

    def rotary_(self, x, rows, row_stride, heads, head_dim, cos_sin):
        torch.ops.chatglm.cpu_rotary_(x, rows, row_stride, heads, head_dim, cos_sin.contiguous())
        return x

    def silu_mul(self, h):
        return torch.ops.chatglm.cpu_silu_mul(h)


COMPILED = CompiledKernel()
