"""QuantizedLinear: THUDM's parameter names (`weight` int8, `weight_scale` fp16, `bias`), one forward."""

from __future__ import annotations

import torch
from torch import nn

from . import ops


class QuantizedLinear(nn.Module):
    """A weight-only INT8/INT4 linear layer. The weight is int8 [out, in] (INT8) or packed [out, in/2]
    (INT4); activations and the output keep the input's dtype.

    On a CPU whose kernels have their own layout (AVX-512 VNNI, AVX2), `pack_for_cpu()` rearranges the weight's bytes
    into it (weight_layout "lanes16", ops.to_lanes16; same shape and dtype): loading a model for the CPU does it.
    state_dict() gives THUDM's layout whatever the layout in memory, `thudm_weight()` too, and moving or casting
    the module (`.to()`, `.half()`) first puts THUDM's layout back."""

    weight_layout = "thudm"  # or "lanes16"

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

    def pack_for_cpu(self) -> bool:
        """The weight into the CPU kernels' lanes16 layout where they have one (ops.lanes16_takes); returns
        whether it was rearranged now."""
        if self.weight_layout != "thudm" or not ops.lanes16_takes(self.weight, self.in_features):
            return False
        self.weight.data = ops.to_lanes16(self.weight.data)
        self.weight_layout = "lanes16"
        return True

    def unpack(self) -> None:
        """THUDM's layout back in memory."""
        if self.weight_layout != "thudm":
            self.weight.data = ops.from_lanes16(self.weight.data)
            self.weight_layout = "thudm"

    def thudm_weight(self) -> torch.Tensor:
        """The weight in THUDM's layout (the parameter itself, or a rearranged copy)."""
        return ops.from_lanes16(self.weight.detach()) if self.weight_layout != "thudm" else self.weight

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight_layout != "thudm":
            destination[prefix + "weight"] = self.thudm_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        packed = self.weight_layout != "thudm"
        self.unpack()  # the checkpoint's bytes are THUDM's
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if packed:
            self.pack_for_cpu()

    def _apply(self, fn, recurse=True):
        if self.weight_layout != "thudm":  # a move or a cast (what fn makes of an empty slice): THUDM's bytes
            probe = self.weight.data[:0]
            if fn(probe) is not probe:
                self.unpack()
        return super()._apply(fn, recurse)

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
