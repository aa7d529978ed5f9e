"""What every entry script shares: the model flags with their environment variables, loading from them with a
one-line error, and the original's multi-GPU helpers. The loader itself is chatglm/backends.py
(`load_model_and_tokenizer`, re-exported here); device maps are chatglm/device_map.py.

    from utils import load_model_and_tokenizer
    model, tokenizer = load_model_and_tokenizer("/models/chatglm3-6b", device="auto", quantization_bit=4)

Every demo reads the same settings:

    flag                   environment                 default
    --model-path           MODEL_PATH                  the built-in tiny random model (answers are noise)
    --tokenizer-path       TOKENIZER_PATH              the model path
    --device               DEVICE                      auto: cuda, else mps, else cpu
    --dtype                DTYPE                       fp16 on CUDA and MPS; bf16 on CPUs fast at it, else fp32
    --quantize             QUANTIZE                    0 (none); 4 or 8 = weight-only INT4 / INT8
    --output-layer         OUTPUT_LAYER                auto: int8 for a quantized model on the CPU, else float
    --num-gpus             NUM_GPUS                    1
    --ptuning-checkpoint   PTUNING_CHECKPOINT, PT_PATH none
    --pre-seq-len          PRE_SEQ_LEN                 read from the P-Tuning checkpoint
    --tiny-version         CHATGLM_TINY_VERSION        v3

`auto_configure_device_map` and `load_model_on_gpus` keep the signatures and the split of THUDM's utils.py
(ChatGLM-6B and ChatGLM2-6B), for either architecture's module names.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import chatglm
from chatglm.backends import (  # noqa: F401  (re-exported: the loader's public names, as before the move)
    NAMES,
    PREFIX,
    _check_bits,
    _load_dispatched,
    _warn_quantized_cuda,
    configure_cpu_threads,
    cpu_has_fast_bf16,
    cuda_device_count,
    default_dtype,
    load_model_and_tokenizer,
    load_prefix_encoder,
    mps_available,
    read_ptuning_checkpoint,
    resolve_device,
    resolve_dtype,
    tiny_notice,
)
from chatglm.config import VERSIONS, require_directory
from chatglm.device_map import (  # noqa: F401
    auto_configure_device_map,
    check_device_map,
    device_map_problems,
    dispatch,
    infer_device_map,
)
from chatglm.static_decode import MODES
from quantization import OUTPUT_LAYER_MODES

# --- command line and environment ---------------------------------------------------------------------------


def _env(*names: str, default=None):
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return value
    return default


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the model flags every demo shares; each defaults to its environment variable."""
    g = parser.add_argument_group("model", "which checkpoint and backend (each flag falls back to the variable shown)")
    g.add_argument(
        "--model-path",
        default=_env("MODEL_PATH"),
        help="checkpoint directory (MODEL_PATH); without one the built-in tiny random model runs",
    )
    g.add_argument(
        "--tokenizer-path",
        default=_env("TOKENIZER_PATH"),
        help="tokenizer directory (TOKENIZER_PATH; default: the model path)",
    )
    g.add_argument(
        "--device",
        default=_env("DEVICE", default="auto"),
        help="auto, cuda, cuda:N, cpu or mps (DEVICE; default auto: CUDA, else MPS, else CPU)",
    )
    g.add_argument(
        "--dtype",
        default=_env("DTYPE"),
        choices=["auto", "fp16", "bf16", "fp32"],
        help="weights and activations (DTYPE; default: fp16 on CUDA/MPS, bf16 or fp32 on CPU)",
    )
    g.add_argument(
        "--quantize",
        type=int,
        default=_env("QUANTIZE", default="0"),
        choices=[0, 4, 8],
        help="weight-only quantization bits while loading: 0 (none), 8 or 4 (QUANTIZE)",
    )
    g.add_argument(
        "--output-layer",
        default=_env("OUTPUT_LAYER", default="auto"),
        choices=["auto", *OUTPUT_LAYER_MODES],
        help="the output layer, read whole at every token (OUTPUT_LAYER): auto (default: int8 for a quantized "
        "model on the CPU, a quarter of fp32's bytes, logits within about 1%%; else as the model), float (as "
        "the model, like the original's .float().quantize(N)), bf16 (CPU), int8",
    )
    g.add_argument(
        "--num-gpus",
        type=int,
        default=_env("NUM_GPUS", default="1"),
        help="split the layers over this many GPUs, as the original utils.py (NUM_GPUS)",
    )
    g.add_argument(
        "--ptuning-checkpoint",
        default=_env("PTUNING_CHECKPOINT", "PT_PATH"),
        help="P-Tuning v2 checkpoint directory with the prefix encoder (PTUNING_CHECKPOINT or PT_PATH)",
    )
    g.add_argument(
        "--pre-seq-len",
        type=int,
        default=_env("PRE_SEQ_LEN"),
        help="P-Tuning prefix length (PRE_SEQ_LEN; default: read from the checkpoint)",
    )
    g.add_argument(
        "--lora",
        default=_env("LORA_PATH"),
        help="a LoRA adapter directory in PEFT's format (adapter_config.json) applied on top (LORA_PATH); "
        "python -m chatglm.adapters folds one into a plain checkpoint",
    )
    g.add_argument(
        "--decode",
        default=_env("DECODE", default="eager"),
        choices=list(MODES),
        help="decode steps: eager, cuda_graph (one CUDA graph replay per token), compile (torch.compile) or "
        "static (DECODE; the model on one device; see docs/benchmarks.md for which is faster where)",
    )
    g.add_argument(
        "--tiny-version",
        default=_env("CHATGLM_TINY_VERSION", default="v3"),
        choices=list(VERSIONS),
        help="the built-in tiny random model used when no model path is given (CHATGLM_TINY_VERSION)",
    )
    return parser


LOAD_ERRORS = (OSError, ValueError, RuntimeError, NotImplementedError)


def load_or_exit(args):
    """`load_from_args` for entry scripts: a wrong path or a broken checkpoint is one line on stderr (no
    traceback) and exit status 2."""
    try:
        return load_from_args(args)
    except LOAD_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


TINY_MAX_NEW_TOKENS = 256  # the tiny model's replies are noise: the demos and servers keep them short


def load_from_args(args):
    """(model, tokenizer) from a namespace parsed with `add_model_args`; sets args.tiny when no model path was given."""
    try:
        args.tiny = not getattr(args, "model_path", None)
    except AttributeError:  # a read-only namespace
        pass
    model, tokenizer = load_model_and_tokenizer(
        model_path=getattr(args, "model_path", None),
        tokenizer_path=getattr(args, "tokenizer_path", None),
        device=getattr(args, "device", None) or "auto",
        dtype=getattr(args, "dtype", None),
        quantization_bit=getattr(args, "quantize", None) or None,
        num_gpus=getattr(args, "num_gpus", None) or 1,
        ptuning_checkpoint=getattr(args, "ptuning_checkpoint", None),
        pre_seq_len=getattr(args, "pre_seq_len", None),
        tiny_version=getattr(args, "tiny_version", None) or "v3",
        decode=getattr(args, "decode", None) or "eager",
        output_layer=getattr(args, "output_layer", None) or "auto",
        lora=getattr(args, "lora", None),
    )
    if not getattr(args, "model_path", None):
        model.default_max_new_tokens = TINY_MAX_NEW_TOKENS  # read by the servers (serving/requests.py)
        model.tiny_notice = tiny_notice(model.config.chatglm_version)  # shown by the pages
        print(f"Note: the tiny model's replies are kept to {TINY_MAX_NEW_TOKENS} tokens unless a request or option asks "
              "for another length.", file=sys.stderr, flush=True)  # fmt: skip
    return model, tokenizer


# --- the demos' length rules ---------------------------------------------------------------------------------


def max_length_error(model, max_length) -> str | None:
    """The one line every demo refuses a --max-length past the model's context with (None: it fits)."""
    from serving.requests import context_length

    limit = context_length(model)
    if max_length is not None and max_length > limit:
        return f"--max-length must be at most {limit} (the model's context), got {max_length}"
    return None


def turn_max_length(model, tokenizer, query, history, past, max_length: int, clear: str) -> tuple[int, str | None]:
    """For the web demos: the max_length a turn generates under, or (0, a message for the chat) when the
    conversation leaves no room for a reply. The prompt is the whole conversation, or with `past` (a ChatGLM2/3
    cache of the earlier turns) the new round only, as stream_chat builds it; either way what the cache holds, the
    prompt and the reply stay within the model's context. `clear` names the page's clear-history button."""
    from chatglm.kv_cache import cache_length
    from serving.requests import context_length

    limit = context_length(model)
    held = 0 if past is None else cache_length(past) - (model.config.pre_seq_len or 0)  # positions of earlier turns
    version = model.config.chatglm_version
    n = int(model._chat_inputs(tokenizer, version, query, list(history), "user", past)["input_ids"].shape[-1])
    if held + n >= limit:
        return 0, (f"This conversation is {held + n} tokens with your message, and the model's context is {limit} "
                   f"tokens: there is no room left for a reply. Click {clear} to start a new conversation.")  # fmt: skip
    if n >= max_length:
        what = "The conversation with your message" if past is None else "Your message"
        return 0, (f"{what} is {n} tokens: a maximum length of {max_length} leaves no room for a reply. Raise the "
                   f"maximum length, or click {clear} to start a new conversation.")  # fmt: skip
    return min(max_length, limit - held), None


# --- the original's multi-GPU helper ------------------------------------------------------------------------


def load_model_on_gpus(checkpoint_path, num_gpus: int = 2, device_map=None, **kwargs):
    """The original helper: fp16 on one GPU (`num_gpus < 2`), else split over `num_gpus` GPUs with
    `auto_configure_device_map` (or the `device_map` given: a dict or "auto"). kwargs go to chatglm.load_model
    (dtype, quantization_bit, pre_seq_len, ...); transformers-only ones (trust_remote_code) are ignored."""
    for ignored in ("trust_remote_code", "low_cpu_mem_usage", "revision"):
        kwargs.pop(ignored, None)
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None) or torch.float16
    bits = _check_bits(kwargs.pop("quantization_bit", None))
    if num_gpus < 2 and device_map is None:
        device = resolve_device("cuda", 1)
        if bits:
            _warn_quantized_cuda(bits)
        return chatglm.load_model(
            str(checkpoint_path), dtype=resolve_dtype(dtype, device), device=device, quantization_bit=bits, **kwargs
        )
    model_path = str(checkpoint_path)
    require_directory(model_path, "model directory")
    return _load_dispatched(model_path, device_map, num_gpus, dtype, bits, kwargs, None)
