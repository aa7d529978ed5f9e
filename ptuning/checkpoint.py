"""Loading the base model for tuning or inference, with a P-Tuning v2 prefix or LoRA matrices on top.

A P-Tuning checkpoint is DIR/pytorch_model.bin holding only `transformer.prefix_encoder.*` tensors, plus
DIR/config.json (with pre_seq_len and prefix_projection), exactly as the original ptuning/ wrote it:

    model = chatglm.load_model(base, pre_seq_len=128)
    model.load_state_dict(torch.load("DIR/pytorch_model.bin"), strict=False)
"""

from __future__ import annotations

import json
import os

import torch

PREFIX = "transformer.prefix_encoder."
LORA_TARGETS = ["query_key_value"]  # the attention input projection of every layer (both architectures)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_weights(ckpt_dir: str) -> dict[str, torch.Tensor]:
    for name in ("pytorch_model.bin", "model.safetensors"):
        path = os.path.join(ckpt_dir, name)
        if os.path.isfile(path):
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(path)
            return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no pytorch_model.bin in checkpoint directory {ckpt_dir!r}")


def prefix_settings(ckpt_dir: str, pre_seq_len: int | None, prefix_projection: bool) -> tuple[int, bool]:
    """pre_seq_len / prefix_projection for a checkpoint: its config.json fills what is not given, and must agree.

    prefix_projection is the checkpoint's own (the weights decide it), so evaluate.sh need not repeat it.
    """
    saved = _read_json(os.path.join(ckpt_dir, "config.json"))
    prefix_projection = saved.get("prefix_projection", prefix_projection)
    if pre_seq_len is None:
        pre_seq_len = saved.get("pre_seq_len")
    if pre_seq_len is None:
        raise ValueError(f"{ckpt_dir!r} has no config.json with pre_seq_len: pass --pre_seq_len")
    if saved.get("pre_seq_len") not in (None, pre_seq_len):
        raise ValueError(f"{ckpt_dir!r} was trained with pre_seq_len={saved['pre_seq_len']}, not {pre_seq_len}")
    return int(pre_seq_len), bool(prefix_projection)


def load_prefix(model, ckpt_dir: str) -> None:
    """Put a P-Tuning checkpoint's prefix encoder weights into `model` (built with the same pre_seq_len)."""
    state = {k[len(PREFIX) :]: v for k, v in read_weights(ckpt_dir).items() if k.startswith(PREFIX)}
    if not state:
        raise ValueError(f"{ckpt_dir!r} holds no {PREFIX}* weights: is it a P-Tuning checkpoint?")
    encoder = model.transformer.prefix_encoder
    try:
        encoder.load_state_dict({k: v.to(encoder.embedding.weight.dtype) for k, v in state.items()})
    except RuntimeError as e:
        raise ValueError(f"{ckpt_dir!r} does not fit (same --pre_seq_len / --prefix_projection?): {e}") from e


def add_lora(model, rank: int, alpha: float = 32.0, dropout: float = 0.1, ckpt_dir: str | None = None):
    """Wrap every query_key_value in LoRA (PEFT) and train only the LoRA matrices."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise RuntimeError("LoRA needs PEFT: pip install -r ptuning/requirements.txt") from e
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS)
    try:
        model = inject_adapter_in_model(config, model)
    except ValueError as e:  # PEFT does not know our QuantizedLinear
        raise ValueError(
            f"LoRA cannot wrap this model ({e}); LoRA works on a float model (no --quantization_bit)"
        ) from e
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    model.peft_config = {"default": config}
    if ckpt_dir:
        load_lora_weights(model, ckpt_dir, rank)
    return model


def load_lora_weights(model, ckpt_dir: str, rank=None) -> None:
    """Put a LoRA checkpoint's matrices into a model wrapped by add_lora: PEFT's own files (adapter_model.*, what
    ptuning/ writes now and ChatGLM3's finetune_demo writes), or the pytorch_model.bin of earlier versions."""
    from chatglm.adapters import ADAPTER_WEIGHTS, read_adapter

    if any(os.path.isfile(os.path.join(ckpt_dir, name)) for name in ADAPTER_WEIGHTS):
        _, saved = read_adapter(ckpt_dir)  # "<module>.lora_A.weight": the injected model names it ".lora_A.default"
        state = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
                 for k, v in saved.items()}  # fmt: skip
    else:
        state = read_weights(ckpt_dir)
    result = model.load_state_dict(state, strict=False)
    lora_keys = {k for k, _ in model.named_parameters() if "lora_" in k}
    if result.unexpected_keys or lora_keys - set(state):
        raise ValueError(f"{ckpt_dir!r} is not a LoRA checkpoint{f' of rank {rank}' if rank else ''} for this model")


def save_lora(model, out_dir: str) -> None:
    """What PEFT's save_pretrained writes: adapter_model.safetensors (keys base_model.model.<module>.lora_A.weight,
    ...) and adapter_config.json, so peft.PeftModel.from_pretrained and `--lora` read it."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from chatglm.adapters import PEFT_PREFIX

    state = get_peft_model_state_dict(model)
    save_file({PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()},
              os.path.join(out_dir, "adapter_model.safetensors"))  # fmt: skip
    for config in model.peft_config.values():
        config.save_pretrained(out_dir)


def model_dtype(name: str, tuning: bool):
    if name == "auto":  # as the original: a half base model under a float prefix on GPU; fp32 on CPU
        return torch.float16 if tuning and torch.cuda.is_available() else torch.float32
    return name


def load_model_and_tokenizer(model_name_or_path: str, ptuning_checkpoint: str | None = None,
                             pre_seq_len: int | None = None, prefix_projection: bool = False,
                             quantization_bit: int | None = None, lora_rank: int | None = None,
                             lora_alpha: float = 32.0, lora_dropout: float = 0.1, lora_checkpoint: str | None = None,
                             dtype: str = "auto", device=None, training: bool = True):  # fmt: skip
    """The base model with a (fresh or loaded) prefix encoder or LoRA; only those weights require grad."""
    import chatglm

    if ptuning_checkpoint:
        pre_seq_len, prefix_projection = prefix_settings(ptuning_checkpoint, pre_seq_len, prefix_projection)
    if lora_checkpoint and lora_rank is None:
        lora_rank = _read_json(os.path.join(lora_checkpoint, "adapter_config.json")).get("r")
    if pre_seq_len and lora_rank:
        raise ValueError("choose P-Tuning (--pre_seq_len) or LoRA (--lora_rank), not both")
    if training and quantization_bit and not pre_seq_len:
        raise ValueError("--quantization_bit trains with P-Tuning (--pre_seq_len) only: int weights cannot train")
    tokenizer = chatglm.load_tokenizer(model_name_or_path)
    extra = {"pre_seq_len": pre_seq_len, "prefix_projection": prefix_projection} if pre_seq_len else {}
    model = chatglm.load_model(
        model_name_or_path,
        dtype=model_dtype(dtype, bool(pre_seq_len or lora_rank)),
        quantization_bit=quantization_bit,
        **extra,
    )
    if pre_seq_len:
        model.transformer.prefix_encoder.float()  # the trained weights stay fp32 under a half model
        if ptuning_checkpoint:
            load_prefix(model, ptuning_checkpoint)
    elif lora_rank:
        model = add_lora(model, lora_rank, lora_alpha, lora_dropout, lora_checkpoint)
    if device is not None:
        model.to(device)
    return model, tokenizer
