"""Weight-only INT8/INT4 quantization as a module swap, in THUDM's checkpoint layout.

- `quantize(model, bits)`: float Linear layers of the transformer blocks become QuantizedLinear, in place.
- `prepare_for_quantized_checkpoint(model, bits)`: swap empty QuantizedLinear layers in (on the meta device)
  before loading a checkpoint that is already quantized, or that is quantized shard by shard while loading.
Both are one recursive walk. As the original, the layers inside the blocks are quantized (attention
query_key_value and dense, both MLP matrices); embeddings, the output layer and norms stay float unless
`quantize_embeddings=True` (the int4-qe release's choice).
- `set_output_layer(model, "int8" | "bf16" | "float")`: the output layer alone, which a quantized model's decode
  reads whole at every token (chatglm2-6b: 65024 x 4096, 1.07 GB in fp32). Not the original's: `.float()
  .quantize(4)` keeps it fp32. INT8 reads a quarter of those bytes (logits within about 1% of the float ones,
  tests/test_quantization.py), bf16 half (about 0.2%). config.quantization_output_bit records INT8, so a saved
  model loads back the same way.
"""

from __future__ import annotations

import torch
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


def prepare_for_quantized_checkpoint(model: nn.Module, bits: int, quantize_embeddings: bool = False,
                                     output_bits: int = 0) -> nn.Module:  # fmt: skip
    """Replace the quantizable layers with empty (meta) QuantizedLinear layers of the same shapes; with
    `output_bits` (8) the output layer too."""
    if bits not in (4, 8):
        raise ValueError(f"quantization bits must be 4 or 8, got {bits}")

    def linear(m, bits=bits):
        return QuantizedLinear(m.in_features, m.out_features, bits, m.bias is not None, "meta", m.weight.dtype)

    def embedding(m):
        return QuantizedEmbedding(m.num_embeddings, m.embedding_dim, bits, "meta", m.weight.dtype)

    _swap(model, linear, embedding, False, quantize_embeddings)
    model.config.quantization_bit = bits
    if output_bits:
        _replace_output(model, linear(model.output_head(), _check_output_bits(output_bits)))
        model.config.quantization_output_bit = output_bits
    return model


def pack_for_cpu(model: nn.Module) -> int:
    """Every QuantizedLinear's weight into the CPU kernels' layout where they have one (QuantizedLinear.pack_for_cpu,
    ops.lanes16_takes); returns how many were rearranged. Loading a model for the CPU calls it."""
    return sum(m.pack_for_cpu() for m in model.modules() if isinstance(m, QuantizedLinear))


OUTPUT_LAYER_MODES = ("float", "bf16", "int8")


def _check_output_bits(bits) -> int:
    if bits != 8:
        raise ValueError(f"the output layer is quantized to INT8 only, got {bits!r} (INT4 logits are 15% off)")
    return bits


def _replace_output(model: nn.Module, new: nn.Module) -> None:
    head = model.output_head()
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is head:
                setattr(parent, name, new)
                return
    raise ValueError("the model's output layer was not found")


def set_output_layer(model: nn.Module, mode: str) -> nn.Module:
    """The output layer as `mode`: "int8" (a QuantizedLinear, INT8 weights with fp16 scales), "bf16" (its weights
    in bf16, on the CPU) or "float" (left as it is). In place; returns the model."""
    if mode not in OUTPUT_LAYER_MODES:
        raise ValueError(f"output layer must be one of {', '.join(OUTPUT_LAYER_MODES)}, got {mode!r}")
    head = model.output_head()
    if mode == "float" or isinstance(head, QuantizedLinear):
        return model
    if mode == "int8":
        # v1's lm_head shares its weight with the word embeddings: the INT8 copy is its own, the embedding stays
        _replace_output(model, QuantizedLinear.from_linear(head, 8))
        model.config.quantization_output_bit = 8
    elif head.weight.device.type == "cpu":  # bf16: our CPU kernel reads bf16 weights with fp32 accumulation
        head.weight = nn.Parameter(head.weight.detach().to(torch.bfloat16), requires_grad=False)
    return model


__all__ = [
    "OUTPUT_LAYER_MODES",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "dequantize",
    "fast_linear",
    "pack_for_cpu",
    "pack_int4",
    "prepare_for_quantized_checkpoint",
    "quantize",
    "set_output_layer",
    "quantize_weight",
    "unpack_int4",
]
