"""The models' float Linear layer: nn.Linear (same parameters, same state_dict) with the CPU fast paths.

Its forward is `quantization.ops.fast_linear`: for bf16/fp16 weights on the CPU, the C GEMV for decode and
small batches (each weight read once, at memory speed), and an fp32 matmul for prefill on CPUs that have no
native half-precision GEMM; plain F.linear with autograd (training) or on other devices.
"""

from __future__ import annotations

import torch
from torch import nn

from quantization.ops import fast_linear


class Linear(nn.Linear):
    """nn.Linear with the CPU fast paths (isinstance(nn.Linear) holds: quantization, PEFT, accelerate)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_linear(x, self.weight, self.bias)
