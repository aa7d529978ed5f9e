"""Weight-only INT8/INT4 quantization as a module swap, in THUDM's checkpoint layout.

- `quantize(model, bits)`: float Linear layers of the transformer blocks become QuantizedLinear, in place.
- `prepare_for_quantized_checkpoint(model, bits)`: swap empty QuantizedLinear layers in (on the meta device)
  before loading a checkpoint that is already quantized, or that is quantized shard by shard while loading.
Both are one recursive walk. As the original, the layers inside the blocks are quantized (attention
query_key_value and dense, both MLP matrices); embeddings, the output layer and norms stay float unless
`quantize_embeddings=True` (the int4-qe release's choice).
"""

from __future__ import annotations

from torch import nn

from .linear import QuantizedEmbedding, QuantizedLinear
from .ops import dequantize, fast_linear, pack_int4, quantize_weight, unpack_int4

BLOCK_CLASS = "GLMBlock"  # the transformer block class of both architectures
OUTPUT_NAMES = ("lm_head", "output_layer")


def _swap(module: nn.Module, make_linear, make_embedding, in_block: bool, embeddings: bool) -> None:
    for name, child in module.named_children():
        inside = in_block or type(child).__name__ == BLOCK_CLASS
        if isinstance(child, nn.Linear) and (inside or (embeddings and name in OUTPUT_NAMES)):
            setattr(module, name, make_linear(child))
        elif isinstance(child, nn.Embedding) and embeddings and name == "word_embeddings":
            setattr(module, name, make_embedding(child))
        else:
            _swap(child, make_linear, make_embedding, inside, embeddings)


def quantize(model: nn.Module, bits: int, quantize_embeddings: bool = False) -> nn.Module:
    """Quantize a float model in place and return it."""
    if bits not in (4, 8):
        raise ValueError(f"quantization bits must be 4 or 8, got {bits}")
    if getattr(model.config, "quantization_bit", 0):
        raise ValueError(f"the model is already quantized to INT{model.config.quantization_bit}")
    _swap(model, lambda m: QuantizedLinear.from_linear(m, bits),
          lambda m: QuantizedEmbedding.from_embedding(m, bits), False, quantize_embeddings)  # fmt: skip
    model.config.quantization_bit = bits
    if quantize_embeddings:
        model.config.quantization_embeddings = True
    return model


def prepare_for_quantized_checkpoint(model: nn.Module, bits: int, quantize_embeddings: bool = False) -> nn.Module:
    """Replace the quantizable layers with empty (meta) QuantizedLinear layers of the same shapes."""
    if bits not in (4, 8):
        raise ValueError(f"quantization bits must be 4 or 8, got {bits}")

    def linear(m):
        return QuantizedLinear(m.in_features, m.out_features, bits, m.bias is not None, "meta", m.weight.dtype)

    def embedding(m):
        return QuantizedEmbedding(m.num_embeddings, m.embedding_dim, bits, "meta", m.weight.dtype)

    _swap(model, linear, embedding, False, quantize_embeddings)
    model.config.quantization_bit = bits
    return model


__all__ = [
    "QuantizedEmbedding",
    "QuantizedLinear",
    "dequantize",
    "fast_linear",
    "pack_int4",
    "prepare_for_quantized_checkpoint",
    "quantize",
    "quantize_weight",
    "unpack_int4",
]
