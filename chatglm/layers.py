"""Layers both architectures share, with the CPU fast paths; parameters and state_dict as nn.Linear/LayerNorm.

- `Linear`: its forward is `quantization.ops.fast_linear`: for bf16/fp16 weights on the CPU, the C kernel
  (each weight read once per chunk of rows, fp32 accumulation) for decode, and for prefill too on CPUs with no
  native half-precision GEMM; plain F.linear with autograd (training) or on other devices.
- `compute_dtype`: on such a CPU, inference keeps the weights in bf16/fp16 (or INT8/INT4) but computes the
  activations, attention and KV cache in fp32, as CPU inference engines do: torch's emulated bf16 kernels
  (attention, norms, conversions around every GEMV) cost more there than the weights' memory traffic. The
  result is at least as accurate as bf16 arithmetic. CHATGLM_NO_CPU_KERNEL=1 turns this off with the kernels.
- `LayerNorm`: nn.LayerNorm that accepts activations of another dtype than its parameters.
- `cpu_kernel_for`: whether the C decode helpers may take an activation (fp32, CPU, no autograd).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import cpu_fast_paths, get_cpu_kernel, native_half_gemm
from quantization.ops import fast_linear

HALF = (torch.bfloat16, torch.float16)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the trunk computes in for hidden states `x` (the embedding output)."""
    if (
        x.dtype in HALF
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and cpu_fast_paths()
        and not native_half_gemm(x.dtype)
    ):
        return torch.float32
    return x.dtype


def cpu_kernel_for(x: torch.Tensor):
    """The CPU kernel library (kernels.CpuKernel) when x is an fp32 CPU activation of inference (autograd off):
    the decode helpers (norm, rotary, attention, activation) then replace several torch ops each. Else None."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled():
        return get_cpu_kernel()  # None when CHATGLM_NO_CPU_KERNEL=1 or no compiler
    return None


class Linear(nn.Linear):
    """nn.Linear with the CPU fast paths (isinstance(nn.Linear) holds: quantization, PEFT, accelerate)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_linear(x, self.weight, self.bias, self)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computing in the input's dtype whatever its parameters' dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)
