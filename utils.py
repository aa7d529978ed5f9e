"""One loader for every backend, shared by all demos and servers, and the original multi-GPU helpers.

    from utils import load_model_and_tokenizer
    model, tokenizer = load_model_and_tokenizer("/models/chatglm3-6b", device="auto", quantization_bit=4)

Backends: CUDA (fp16 / bf16 / fp32, INT8 / INT4), CPU (bf16 where the CPU runs it fast, else fp32; INT8 / INT4
on the C kernels), Apple MPS (fp16; quantized models run on the CPU kernels), and several GPUs through accelerate
(`num_gpus` with the original split, or `device_map` as a dict or "auto"). Every demo reads the same settings:

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
import copy
import json
import logging
import os
import shutil
import sys
import tempfile
import weakref

import torch

import chatglm
from chatglm import ChatGLMConfig
from chatglm.hugepages import move_to_huge_pages
from chatglm.loading import model_class, read_shard, weight_files
from chatglm.loading import resolve_dtype as _parse_dtype
from chatglm.static_decode import MODES, check_mode, check_model
from kernels import native_half_gemm
from quantization import OUTPUT_LAYER_MODES, QuantizedLinear, set_output_layer

logger = logging.getLogger("chatglm.utils")

VERSIONS = ("v1", "v2", "v3")
NAMES = {"v1": "ChatGLM-6B", "v2": "ChatGLM2-6B", "v3": "ChatGLM3-6B"}
PREFIX = "transformer.prefix_encoder."
OFFLOADED = ("cpu", "disk")  # accelerate's device_map values that are not an execution device
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


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
    )
    if not getattr(args, "model_path", None):
        model.default_max_new_tokens = TINY_MAX_NEW_TOKENS  # read by the servers (serving/requests.py)
        model.tiny_notice = tiny_notice(model.config.chatglm_version)  # shown by the pages
        print(f"Note: the tiny model's replies are kept to {TINY_MAX_NEW_TOKENS} tokens unless a request or option asks "
              "for another length.", file=sys.stderr, flush=True)  # fmt: skip
    return model, tokenizer


# --- devices, dtypes, threads -------------------------------------------------------------------------------


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | None = "auto", num_gpus: int = 1) -> str:
    """The device to run on: auto means cuda, else mps, else cpu. A clear error when it (or that many GPUs) is absent."""
    name = str(device or "auto").strip().lower()
    gpus = cuda_device_count()
    if name == "auto":
        name = "cuda" if gpus else "mps" if mps_available() else "cpu"
    elif name == "gpu":
        name = "cuda"
    try:
        parsed = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {device!r}: use auto, cuda, cuda:N, cpu or mps (--device / DEVICE)") from None
    if parsed.type == "cuda":
        if not gpus:
            why = "this PyTorch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU was found"
            raise RuntimeError(
                f"device {name!r} was asked for but CUDA is not available ({why}); "
                "use --device cpu (DEVICE=cpu) or --device auto"
            )
        if parsed.index is not None and parsed.index >= gpus:
            raise RuntimeError(f"device {name!r} was asked for but only {gpus} CUDA GPU(s) exist (cuda:0..{gpus - 1})")
    elif parsed.type == "mps":
        if not mps_available():
            raise RuntimeError(
                f"device {name!r} (Apple GPU) was asked for but MPS is not available: it needs Apple "
                "silicon, macOS 12.3+ and a PyTorch built with MPS; use --device cpu"
            )
    elif parsed.type != "cpu":
        raise ValueError(f"unsupported device {device!r}: use auto, cuda, cuda:N, cpu or mps")
    _check_num_gpus(num_gpus, gpus)
    if num_gpus > 1 and parsed.type != "cuda":
        raise RuntimeError(f"{num_gpus} GPUs were asked for (--num-gpus / NUM_GPUS) but the device is {name!r}")
    return name


def _check_num_gpus(num_gpus: int, gpus: int) -> None:
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be at least 1, got {num_gpus}")
    if num_gpus > 1 and num_gpus > gpus:
        raise RuntimeError(
            f"{num_gpus} GPUs were asked for (--num-gpus / NUM_GPUS) but only {gpus} CUDA GPU(s) are available"
        )


def cpu_has_fast_bf16() -> bool:
    """True where PyTorch's CPU matmuls run bf16 on native instructions (AVX512-BF16, AMX, ARM bf16): the one
    probe, kernels.native_half_gemm (AVX-512 without BF16 emulates bf16 and is not enough)."""
    return native_half_gemm(torch.bfloat16)


def default_dtype(device: str) -> torch.dtype:
    kind = torch.device(device).type
    if kind in ("cuda", "mps"):
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def resolve_dtype(dtype, device: str) -> torch.dtype:
    """The dtype to load in on `device`: the default per device, and the fallbacks for unsupported choices."""
    if dtype in (None, "", "auto"):
        return default_dtype(device)
    chosen = _parse_dtype(dtype)  # ValueError for an unknown name
    kind = torch.device(device).type
    if kind == "cpu" and chosen == torch.float16:
        fallback = default_dtype("cpu")
        _warn_once(
            "fp16-cpu",
            f"fp16 on the CPU is slow and some ops have no half kernels: using "
            f"{str(fallback).replace('torch.', '')} instead (--dtype bf16 or fp32)",
        )
        return fallback
    if kind == "cuda" and chosen == torch.bfloat16:
        try:
            supported = torch.cuda.is_bf16_supported()
        except Exception:  # a CUDA query failing: let the load itself say what is wrong
            supported = True
        if not supported:
            _warn_once("bf16-cuda", "this GPU does not support bf16: using fp16 instead")
            return torch.float16
    return chosen


def configure_cpu_threads() -> int:
    """Apply OMP_NUM_THREADS to torch when it is set (torch reads it only at start-up), and say what is used."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0 and torch.get_num_threads() != int(env):
        torch.set_num_threads(int(env))
    n = torch.get_num_threads()
    source = f"OMP_NUM_THREADS={env}" if env else "PyTorch's default; set OMP_NUM_THREADS to change it"
    logger.info("CPU inference on %d thread(s) (%s; %d CPU cores visible)", n, source, os.cpu_count() or 0)
    return n


def _check_bits(quantization_bit) -> int | None:
    if quantization_bit in (None, "", False, 0, "0"):
        return None
    try:
        bits = int(quantization_bit)
    except (TypeError, ValueError):
        bits = -1
    if bits not in (4, 8):
        raise ValueError(
            f"quantization must be 0 (none), 4 or 8 bits, got {quantization_bit!r} (--quantize / QUANTIZE)"
        )
    return bits


def _cuda_kernels_loaded() -> bool:
    from quantization.ops import cuda_kernels  # never raises: a triton that cannot import counts as absent

    return cuda_kernels()


def _warn_quantized_cuda(bits: int) -> None:
    if not _cuda_kernels_loaded():
        _warn_once(
            "quantized-cuda",
            f"INT{bits} on CUDA: the GPU kernels need Triton (pip install triton), so quantized layers "
            "run a PyTorch dequantize + matmul fallback that works but is slow; use fp16 "
            "(--quantize 0) if the GPU has the memory, or --device cpu for the CPU "
            "kernels",
        )


# --- the loader ---------------------------------------------------------------------------------------------


def load_model_and_tokenizer(
    model_path=None,
    tokenizer_path=None,
    device="auto",
    dtype=None,
    quantization_bit=None,
    num_gpus=1,
    device_map=None,
    ptuning_checkpoint=None,
    pre_seq_len=None,
    tiny_version="v3",
    decode="eager",
    output_layer="auto",
):
    """(model in eval mode on its device, tokenizer).

    device: auto | cuda | cuda:N | cpu | mps. dtype: fp16 | bf16 | fp32 (None: the device's default).
    quantization_bit: None / 0, 8 or 4 (quantized while loading). num_gpus > 1 splits the layers as the original
    utils.py; device_map (a dict of module name -> device, or "auto") dispatches with accelerate instead.
    ptuning_checkpoint: a P-Tuning v2 output directory whose prefix encoder is loaded on top of the model.
    model_path None or "": the built-in tiny random model of `tiny_version` (a notice says so on stderr).
    decode: how generation runs decode steps (chatglm/static_decode.py), kept as `model.decode_mode`.
    output_layer: auto (int8 for a quantized model on the CPU, else float), float (as the model: the original's
    choice), bf16 (CPU) or int8 (quantization.set_output_layer).
    """
    bits = _check_bits(quantization_bit)
    if output_layer not in ("auto", *OUTPUT_LAYER_MODES):
        raise ValueError(f"output layer must be auto, {', '.join(OUTPUT_LAYER_MODES)}; got {output_layer!r}")
    check_mode(decode)
    num_gpus = int(num_gpus or 1)
    path = _model_path(model_path, tiny_version)
    tok_path = str(tokenizer_path or path)
    if not os.path.isdir(tok_path):
        raise FileNotFoundError(f"tokenizer directory {tok_path!r} does not exist (--tokenizer-path / TOKENIZER_PATH)")
    prefix = None
    if ptuning_checkpoint:
        prefix = read_ptuning_checkpoint(ptuning_checkpoint, pre_seq_len)
    elif pre_seq_len:
        logger.info("pre_seq_len=%s without a P-Tuning checkpoint is ignored", pre_seq_len)
    overrides = {} if prefix is None else {"pre_seq_len": prefix[1], "prefix_projection": prefix[2]}

    if device_map is not None or num_gpus > 1:
        if output_layer not in ("auto", "float"):
            raise ValueError(f"--output-layer {output_layer} is for a model on one device")
        if device_map is None:
            resolve_device(device, num_gpus)  # --num-gpus 2 with --device cpu (or no GPU) is an error, not a guess
        model = _load_dispatched(path, device_map, num_gpus, dtype, bits, overrides, prefix)
    else:
        device = resolve_device(device, 1)
        kind = torch.device(device).type
        if bits and kind == "mps":  # the CUDA kernels do not exist on a Mac: the original runs INT4 on the CPU
            _warn_once(
                "quantized-mps",
                f"INT{bits} models run on the CPU kernels on a Mac: loading on cpu "
                "(use --quantize 0 to run fp16 on MPS)",
            )
            device, kind = "cpu", "cpu"
        torch_dtype = resolve_dtype(dtype, device)
        if bits and kind == "cuda":
            _warn_quantized_cuda(bits)
        if kind == "cpu":
            configure_cpu_threads()
        if output_layer == "auto":
            output_layer = "int8" if bits and kind == "cpu" else "float"
        if output_layer == "bf16" and kind != "cpu":
            raise ValueError("--output-layer bf16 is a CPU option (our CPU kernel reads bf16 weights)")
        if output_layer == "int8" and bits:  # quantized as the shards load, no float copy
            overrides["quantization_output_bit"] = 8
        model = chatglm.load_model(path, dtype=torch_dtype, quantization_bit=bits, **overrides)
        set_output_layer(model, output_layer)
        if prefix is not None:
            load_prefix_encoder(model, prefix[0])
        model = _place(model, device)
        if kind == "cpu":
            move_to_huge_pages(model)
    tokenizer = chatglm.load_tokenizer(tok_path)
    model.eval()
    check_model(model, decode)  # before the first chat: a split model, or cuda_graph off CUDA, is an error
    model.decode_mode = decode
    where = "several devices" if getattr(model, "hf_device_map", None) else str(model.device)
    logger.info(
        "loaded %s (%s) from %s on %s in %s%s",
        NAMES[model.config.chatglm_version],
        type(model).__name__,
        path,
        where,
        str(model.dtype).replace("torch.", ""),
        (f", INT{bits}" if bits else "")
        + (", output layer INT8" if isinstance(model.output_head(), QuantizedLinear) else ""),
    )
    return model, tokenizer


def _model_path(model_path, tiny_version: str) -> str:
    if model_path:
        path = str(model_path)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"model directory {path!r} does not exist: set --model-path / MODEL_PATH to a "
                "local checkpoint directory (only local checkpoints are loaded)"
            )
        return path
    if tiny_version not in VERSIONS:
        raise ValueError(f"tiny_version must be one of {VERSIONS}, got {tiny_version!r} (--tiny-version)")
    from chatglm.tiny import default_tiny_model

    path = default_tiny_model(tiny_version)
    print(f"Note: {tiny_notice(tiny_version)}", file=sys.stderr, flush=True)
    return path


def tiny_notice(version: str) -> str:
    """What the terminal and every page say when the built-in tiny random model runs."""
    return (f"No model path was given, so the built-in tiny random {NAMES[version]} model is used and its answers "
            "are random text; set MODEL_PATH or --model-path to a real checkpoint directory to chat for real.")  # fmt: skip


def _place(model, device: str):
    """Move a loaded model to its single device (MPS: the original `.half().to("mps")` once the dtype is set)."""
    return model.to(device)


# --- P-Tuning v2 --------------------------------------------------------------------------------------------


def read_ptuning_checkpoint(path, pre_seq_len=None) -> tuple[dict, int, bool]:
    """(prefix encoder state without the `transformer.prefix_encoder.` prefix, pre_seq_len, prefix_projection)."""
    path = str(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"P-Tuning checkpoint directory {path!r} does not exist "
            "(--ptuning-checkpoint / PTUNING_CHECKPOINT / PT_PATH)"
        )
    try:
        files = weight_files(path)
    except FileNotFoundError:
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise NotImplementedError(
                f"{path!r} is a PEFT adapter (adapter_config.json); only the original "
                "P-Tuning v2 checkpoints (pytorch_model.bin with transformer.prefix_encoder.* "
                "weights) are loaded"
            ) from None
        raise
    state = {}
    for file in files:
        state.update({k[len(PREFIX) :]: v for k, v in read_shard(file).items() if k.startswith(PREFIX)})
    if "embedding.weight" not in state:
        raise ValueError(f"{path!r} holds no P-Tuning prefix encoder (no {PREFIX}embedding.weight)")
    rows = state["embedding.weight"].shape[0]
    saved = {}
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            saved = json.load(f)
    wanted = int(pre_seq_len) if pre_seq_len else saved.get("pre_seq_len") or rows
    if wanted != rows:
        raise ValueError(
            f"pre_seq_len={wanted} does not match the P-Tuning checkpoint {path!r}, whose prefix "
            f"embedding has {rows} rows: use --pre-seq-len {rows} (PRE_SEQ_LEN={rows})"
        )
    projection = any(k.startswith("trans.") for k in state)
    if saved.get("prefix_projection") is not None and bool(saved["prefix_projection"]) != projection:
        raise ValueError(
            f"{path!r}: config.json says prefix_projection={saved['prefix_projection']} but the saved "
            f"prefix encoder {'has' if projection else 'has no'} projection layers"
        )
    return state, rows, projection


def load_prefix_encoder(model, state: dict) -> None:
    """Load the prefix encoder weights, kept in fp32 as the original P-Tuning inference does."""
    encoder = getattr(model.transformer, "prefix_encoder", None)
    if encoder is None:
        raise ValueError("the model was built without pre_seq_len, so it has no prefix encoder to load into")
    encoder.float()
    own = encoder.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong or set(state) != set(own):
        detail = "; ".join(wrong) or f"keys {sorted(state)} vs {sorted(own)}"
        raise ValueError(
            f"the P-Tuning checkpoint does not fit this {NAMES[model.config.chatglm_version]} model "
            f"(trained on another model?): {detail}"
        )
    encoder.load_state_dict(state)


# --- several devices ----------------------------------------------------------------------------------------


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


def _check_map_devices(device_map: dict) -> str:
    """Check that the map's devices exist; return the main (execution) device."""
    gpus = cuda_device_count()
    main = None
    for target in device_map.values():
        if target in OFFLOADED:
            continue
        parsed = torch.device(f"cuda:{target}" if isinstance(target, int) else target)
        if parsed.type == "cuda":
            if not gpus or (parsed.index is not None and parsed.index >= gpus):
                raise RuntimeError(f"the device map uses {target!r} but only {gpus} CUDA GPU(s) are available")
        elif parsed.type == "mps" and not mps_available():
            raise RuntimeError("the device map uses 'mps' but MPS is not available")
        main = main or str(parsed)
    return main or "cpu"


def _load_dispatched(path, device_map, num_gpus, dtype, bits, overrides, prefix):
    config = ChatGLMConfig.from_checkpoint(path, **overrides)
    gpus = cuda_device_count()
    if device_map is None or isinstance(device_map, str):
        if device_map not in (None, "auto", "balanced"):
            raise ValueError(f"device_map must be a dict, 'auto' or None, got {device_map!r}")
        _check_num_gpus(num_gpus, gpus)
        if not gpus:
            raise RuntimeError(f"device_map={device_map!r} needs CUDA GPUs but none is available")
        main = "cuda:0"
        torch_dtype = resolve_dtype(dtype, main)
        if device_map is None:
            device_map = auto_configure_device_map(num_gpus, config)
        else:
            n = num_gpus if num_gpus > 1 else gpus
            device_map = infer_device_map(config, n, dtype=torch_dtype, quantization_bit=bits)
    else:
        main = _check_map_devices(device_map)
        torch_dtype = resolve_dtype(dtype, main)
    kind = torch.device(main).type
    if bits and kind == "cuda":
        _warn_quantized_cuda(bits)
    if kind == "cpu" or "cpu" in device_map.values():
        configure_cpu_threads()
    model = chatglm.load_model(path, config=config, dtype=torch_dtype, quantization_bit=bits)
    if prefix is not None:
        load_prefix_encoder(model, prefix[0])
    return dispatch(model, device_map)


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
    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"model directory {model_path!r} does not exist")
    return _load_dispatched(model_path, device_map, num_gpus, dtype, bits, kwargs, None)
