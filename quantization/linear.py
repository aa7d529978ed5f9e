"""QuantizedLinear: THUDM's parameter names (`weight` int8, `weight_scale` fp16, `bias`), one forward."""

from __future__ import annotations

import torch
from torch import nn

from . import ops


class QuantizedLinear(nn.Module):
    """A weight-only INT8/INT4 linear layer. The weight is int8 [out, in] (INT8) or packed [out, in/2]
    (INT4); activations and the output keep the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True, device=None,
                 dtype=torch.float16):  # fmt: skip
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.in_features, self.out_features, self.weight_bit_width = in_features, out_features, bits
        cols = in_features // 2 if bits == 4 else in_features
        self.weight = nn.Parameter(torch.empty(out_features, cols, dtype=torch.int8, device=device), False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float16, device=device), False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> QuantizedLinear:
        q = cls(linear.in_features, linear.out_features, bits, linear.bias is not None, device="meta")
        weight, scale = ops.quantize_weight(linear.weight.data, bits)
        q.weight = nn.Parameter(weight, requires_grad=False)
        q.weight_scale = nn.Parameter(scale, requires_grad=False)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.quantized_linear(x, self.weight, self.weight_scale, self.weight_bit_width, self.bias, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.weight_bit_width}"


class QuantizedEmbedding(nn.Module):
    """Embedding rows stored like QuantizedLinear weights (the int4-qe release's option)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, device=None, dtype=torch.float16):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.weight_bit_width = num_embeddings, embedding_dim, bits
        self.dtype = dtype
        cols = embedding_dim // 2 if bits == 4 else embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, cols, dtype=torch.int8, device=device), False)
        self.weight_scale = nn.Parameter(torch.empty(num_embeddings, dtype=torch.float16, device=device), False)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int) -> QuantizedEmbedding:
        q = cls(emb.num_embeddings, emb.embedding_dim, bits, device="meta", dtype=emb.weight.dtype)
        weight, scale = ops.quantize_weight(emb.weight.data, bits)
        q.weight = nn.Parameter(weight, requires_grad=False)
        q.weight_scale = nn.Parameter(scale, requires_grad=False)
        return q

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[ids.flatten()]
        out = ops.dequantize(rows, self.weight_scale[ids.flatten()], self.weight_bit_width, dtype=self.dtype)
        return out.view(*ids.shape, self.embedding_dim)
