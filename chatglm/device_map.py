"""Device maps for several devices: the original split of THUDM's utils.py, accelerate's "auto", and checks.

`auto_configure_device_map` keeps the signature and the split of THUDM's utils.py (ChatGLM-6B and ChatGLM2-6B), for
either architecture's module names; utils.py re-exports it beside the original's `load_model_on_gpus`.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import weakref

import torch

from .config import VERSIONS, ChatGLMConfig
from .loading import model_class
from .loading import resolve_dtype as _parse_dtype

logger = logging.getLogger("chatglm.device_map")

OFFLOADED = ("cpu", "disk")  # accelerate's device_map values that are not an execution device


def _describe(config_or_version):
    """(version, num_layers, has_prefix_encoder, has_final_layernorm) of a version name, config, model or path."""
    if isinstance(config_or_version, str) and config_or_version in VERSIONS:
        return config_or_version, 28, False, True  # the 6B releases
    config = getattr(config_or_version, "config", config_or_version)
    if isinstance(config_or_version, (str, os.PathLike)):
        config = ChatGLMConfig.from_checkpoint(str(config_or_version))
    if not hasattr(config, "num_layers") or not hasattr(config, "chatglm_version"):
        raise ValueError(
            f"expected 'v1', 'v2', 'v3', a ChatGLMConfig, a model or a checkpoint directory, got {config_or_version!r}"
        )
    version = config.chatglm_version
    final_norm = version == "v1" or getattr(config, "post_layer_norm", True)
    return version, config.num_layers, getattr(config, "pre_seq_len", None) is not None, final_norm


def auto_configure_device_map(num_gpus: int, config_or_version="v3") -> dict[str, int]:
    """The original split: the layers spread evenly over `num_gpus`, counting the embedding and the final norm +
    output layer as one layer each, all three (and rotary, prefix encoder) on GPU 0.

    They stay on GPU 0 because the inputs are put on model.device (the embedding's device) and the original
    saw "Expected all tensors to be on the same device" otherwise. Layer count and names follow the version
    ("v1" ChatGLM-6B names, "v2"/"v3" ChatGLM2/3 names), a config, a model, or a checkpoint directory.
    """
    version, num_layers, prefix, final_norm = _describe(config_or_version)
    if int(num_gpus) < 1:
        raise ValueError(f"num_gpus must be at least 1, got {num_gpus}")
    if version == "v1":
        first = ["transformer.word_embeddings", "transformer.final_layernorm", "lm_head"]
        layer = "transformer.layers"
    else:
        first = [
            "transformer.embedding.word_embeddings",
            "transformer.encoder.final_layernorm",
            "transformer.output_layer",
            "transformer.rotary_pos_emb",
        ]
        if not final_norm:
            first.remove("transformer.encoder.final_layernorm")
        layer = "transformer.encoder.layers"
    if prefix:
        first.append("transformer.prefix_encoder")
    device_map = dict.fromkeys(first, 0)
    per_gpu_layers = (num_layers + 2) / num_gpus  # 30 / num_gpus for the 28-layer releases
    used, gpu = 2, 0  # GPU 0 already holds the embedding and the final norm + output layer
    for i in range(num_layers):
        if used >= per_gpu_layers:
            gpu, used = gpu + 1, 0
        device_map[f"{layer}.{i}"] = min(gpu, num_gpus - 1)
        used += 1
    return device_map


def device_map_problems(model, device_map: dict) -> list[str]:
    """What is wrong with a device map: every parameter and buffer must be placed exactly once, every key must
    name a module, and tied weights must share a device. Empty when the map is right."""
    modules = dict(model.named_modules())
    problems = [f"{k!r} names no module of the model" for k in device_map if k != "" and k not in modules]
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    placed = {}
    for name, tensor in tensors:
        owners = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
        if not owners:
            problems.append(f"no device for {name}")
        elif len(owners) > 1:
            problems.append(f"{name} is placed {len(owners)} times (by {', '.join(map(repr, owners))})")
        else:
            placed.setdefault(id(tensor), []).append((name, device_map[owners[0]]))
    for shared in placed.values():
        if len({str(d) for _, d in shared}) > 1:
            problems.append("tied weights on different devices: " + ", ".join(f"{n} -> {d}" for n, d in shared))
    return problems


def check_device_map(model, device_map: dict) -> None:
    problems = device_map_problems(model, device_map)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"the device map does not fit this {type(model).__name__}: {shown}")


def infer_device_map(
    config_or_model, num_gpus: int, max_memory: dict | None = None, dtype=torch.float16, quantization_bit=None
) -> dict:
    """device_map="auto": accelerate's infer_auto_device_map over `num_gpus` GPUs balanced by get_balanced_memory
    (per-GPU limits from `max_memory`, default the free memory of each GPU, the rest on the CPU)."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    model = config_or_model
    if isinstance(config_or_model, ChatGLMConfig):
        config = copy.deepcopy(config_or_model)
        config.quantization_bit = 0
        with torch.device("meta"):
            model = model_class(config)(config, dtype=_parse_dtype(dtype))
        if quantization_bit:
            from quantization import prepare_for_quantized_checkpoint

            prepare_for_quantized_checkpoint(model, int(quantization_bit))
    if max_memory is None:
        available = get_max_memory()
        max_memory = {i: available[i] for i in range(num_gpus) if i in available}
        max_memory["cpu"] = available.get("cpu", 0)
    no_split = list(getattr(model, "_no_split_modules", ["GLMBlock"]))
    balanced = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split)
    device_map = dict(infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split))
    if any(d in OFFLOADED for d in device_map.values()):
        logger.warning("the model does not fit on %d GPU(s): some layers are offloaded to the CPU (slow)", num_gpus)
    return device_map


def dispatch(model, device_map: dict, offload_dir: str | None = None):
    """accelerate's dispatch_model after checking the map; "disk" entries get a temporary offload folder."""
    from accelerate import dispatch_model

    check_device_map(model, device_map)
    main = next((d for d in device_map.values() if d not in OFFLOADED), "cpu")
    if "disk" in device_map.values() and offload_dir is None:
        offload_dir = tempfile.mkdtemp(prefix="chatglm-offload-")
        weakref.finalize(model, shutil.rmtree, offload_dir, True)
    # KV caches stay on their layer's device instead of travelling to the main device and back every step.
    return dispatch_model(
        model, device_map=device_map, main_device=main, offload_dir=offload_dir, skip_keys=["past_key_values"]
    )
