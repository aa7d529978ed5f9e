"""LoRA adapters in PEFT's own format, on our models, without PEFT at run time.

An adapter directory is what PEFT writes: `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules,
...) and `adapter_model.safetensors` (or `adapter_model.bin`) whose keys are `base_model.model.<module>.lora_A.weight`
and `...lora_B.weight`. ChatGLM3's finetune_demo writes that for LoRA, and so does ptuning/ here; what we write
loads with `peft.PeftModel.from_pretrained(model, dir)`. (ChatGLM3's finetune_demo "PREFIX_TUNING" is the model's
own P-Tuning v2 prefix, saved as a whole checkpoint with pre_seq_len in its config.json: load that directory as
the model, or as --ptuning-checkpoint.)

`apply_lora(model, path)` gives each target Linear two small Linear submodules, `lora_A` [r, in] and `lora_B`
[out, r], and a forward hook adding `scale * lora_B(lora_A(x))` (scale = lora_alpha / r, or / sqrt(r) with
use_rslora) to what the layer computes, so any kind of layer (bf16 through our kernels, INT8/INT4) keeps its own
forward. `merge_lora(model)` folds them into float weights, W + scale * B @ A, and takes them off: the model is a
plain one again (`python -m chatglm.adapters` writes it as a checkpoint in the original layout).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
from torch import nn

from .config import require_directory

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
# LoRA options whose non-default values change what the adapter computes and are not implemented here
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
               "layer_replication": None, "alpha_pattern": {}, "rank_pattern": {}, "lora_bias": False}  # fmt: skip


def is_adapter(path) -> bool:
    return os.path.isfile(os.path.join(str(path), ADAPTER_CONFIG))


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, {"<module>.lora_A.weight" / ".lora_B.weight": tensor}) of a PEFT LoRA directory."""
    path = require_directory(path, "LoRA adapter directory", " (--lora / LORA_PATH)")
    if not is_adapter(path):
        raise ValueError(f"{path!r} is not a PEFT adapter: it has no {ADAPTER_CONFIG}")
    try:
        with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:
        raise ValueError(f"{os.path.join(path, ADAPTER_CONFIG)} is not valid JSON: {e}") from None
    kind = config.get("peft_type")
    if kind == "PREFIX_TUNING":
        raise ValueError(f"{path!r} is a PEFT prefix-tuning adapter; load P-Tuning v2 prefixes with "
                         "--ptuning-checkpoint (ChatGLM3's finetune_demo saves them as a whole checkpoint)")  # fmt: skip
    if kind != "LORA":
        raise ValueError(f"{path!r}: only LoRA adapters are supported, this one is peft_type {kind!r}")
    for key, default in UNSUPPORTED.items():
        value = config.get(key)
        if value is not None and value != default and value not in ({}, []):
            raise ValueError(f"{path!r}: LoRA option {key}={config[key]!r} is not supported here (merge it with "
                             "PEFT first)")  # fmt: skip
    files = [os.path.join(path, name) for name in ADAPTER_WEIGHTS if os.path.isfile(os.path.join(path, name))]
    if not files:
        raise FileNotFoundError(f"{path!r} has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}")
    if files[0].endswith(".safetensors"):
        from safetensors.torch import load_file

        raw = load_file(files[0])
    else:
        raw = torch.load(files[0], map_location="cpu", weights_only=True)
    state = {}
    for key, value in raw.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        if not (name.endswith(".lora_A.weight") or name.endswith(".lora_B.weight")):
            raise ValueError(f"{path!r}: unexpected tensor {key!r} in a LoRA adapter")
        state[name] = value
    if not state:
        raise ValueError(f"{path!r} holds no LoRA weights")
    return config, state


def _add_delta(module, inputs, output):
    x = inputs[0]
    delta = module.lora_B(module.lora_A(x.to(module.lora_A.weight.dtype))) * module.lora_scale
    return output + delta.to(output.dtype)


def apply_lora(model: nn.Module, path) -> nn.Module:
    """Put the LoRA adapter at `path` on the model (in place; returns it). Every module the adapter names must
    exist with matching shapes, and nothing else is changed."""
    config, state = read_adapter(path)
    modules = dict(model.named_modules())
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    for name in targets:
        module = modules.get(name)
        a, b = state.get(f"{name}.lora_A.weight"), state.get(f"{name}.lora_B.weight")
        if module is None or a is None or b is None:
            raise ValueError(f"{path!r} does not fit this model: {name!r} is missing from the model or the adapter")
        if getattr(module, "lora_A", None) is not None:
            raise ValueError(f"{name!r} already has a LoRA adapter: merge it first")
        out_f, in_f = _shape(module)
        rank = a.shape[0]
        if tuple(a.shape) != (rank, in_f) or tuple(b.shape) != (out_f, rank):
            raise ValueError(f"{path!r} does not fit this model: {name} is {out_f}x{in_f}, the adapter has A "
                             f"{tuple(a.shape)} and B {tuple(b.shape)}")  # fmt: skip
        device = next(module.parameters()).device
        module.lora_A = nn.Linear(in_f, rank, bias=False, device=device, dtype=torch.float32)
        module.lora_B = nn.Linear(rank, out_f, bias=False, device=device, dtype=torch.float32)
        with torch.no_grad():
            module.lora_A.weight.copy_(a)
            module.lora_B.weight.copy_(b)
        alpha = float(config.get("lora_alpha", rank))
        module.lora_scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        module._lora_hook = module.register_forward_hook(_add_delta)
    model.lora_adapter = str(path)
    return model


def _shape(module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or a QuantizedLinear."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.out_features, module.in_features
    raise ValueError(f"LoRA targets Linear layers; {type(module).__name__} is not one")


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its layer's weights (W + scale * B @ A, in fp32, stored in W's dtype) and take
    the adapter off. Needs float weights: an INT8/INT4 layer cannot take the update."""
    for name, module in model.named_modules():
        if getattr(module, "lora_A", None) is None:
            continue
        weight = getattr(module, "weight", None)
        if weight is None or not weight.is_floating_point():
            raise ValueError(f"{name} is quantized: merge the adapter into the float model (load without --quantize)")
        with torch.no_grad():
            update = (module.lora_B.weight.float() @ module.lora_A.weight.float()) * module.lora_scale
            weight.copy_((weight.float() + update.to(weight.device)).to(weight.dtype))
        module._lora_hook.remove()
        del module.lora_A, module.lora_B, module.lora_scale, module._lora_hook
    model.__dict__.pop("lora_adapter", None)
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m chatglm.adapters",
        description="Fold a LoRA adapter into its base model and write a plain checkpoint in the original layout "
        "(weights, config.json, tokenizer), loadable without the adapter.",
    )
    parser.add_argument("--model-path", required=True, help="the base checkpoint directory")
    parser.add_argument("--lora", required=True, help="the LoRA adapter directory (adapter_config.json)")
    parser.add_argument("--output", required=True, help="new checkpoint directory (must not exist, or --force)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                        help="weights of the written checkpoint (default auto: the base checkpoint's torch_dtype)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)
    try:
        merge_to_checkpoint(args.model_path, args.lora, args.output, args.dtype, args.force)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {args.output}: {args.model_path} with {args.lora} folded in")


def merge_to_checkpoint(model_path: str, lora: str, output: str, dtype: str = "auto", force: bool = False) -> None:
    from . import load_model, load_tokenizer

    if os.path.exists(output) and os.listdir(output) and not force:
        raise FileExistsError(f"{output!r} is not empty: choose a new directory, or pass --force to replace it")
    read_adapter(lora)  # a broken adapter fails before the base model loads
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    model = load_model(model_path, dtype=dtypes.get(dtype))
    merge_lora(apply_lora(model, lora))
    model.save_pretrained(output)
    load_tokenizer(model_path).save_pretrained(output)


if __name__ == "__main__":
    main()
