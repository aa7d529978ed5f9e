"""One loader for every backend, shared by all demos and servers: devices, dtypes, threads, P-Tuning prefixes.

    from chatglm.backends import load_model_and_tokenizer   # also importable from utils, as before
    model, tokenizer = load_model_and_tokenizer("/models/chatglm3-6b", device="auto", quantization_bit=4)

Backends: CUDA (fp16 / bf16 / fp32, INT8 / INT4), CPU (bf16 where the CPU runs it fast, else fp32; INT8 / INT4
on the C kernels), Apple MPS (fp16; quantized models run on the CPU kernels), and several GPUs through accelerate
(`num_gpus` with the original split, or `device_map` as a dict or "auto"; chatglm/device_map.py). The command-line
flags and environment variables that feed it are utils.add_model_args.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import torch

from kernels import native_half_gemm
from quantization import OUTPUT_LAYER_MODES, QuantizedLinear, set_output_layer

from .adapters import apply_lora, read_adapter
from .config import VERSIONS, ChatGLMConfig, require_directory
from .device_map import OFFLOADED, auto_configure_device_map, dispatch, infer_device_map
from .loading import load_model, read_shard, settle_on_cpu, weight_files
from .loading import resolve_dtype as _parse_dtype
from .static_decode import check_mode, check_model
from .tokenizer import ChatGLMTokenizer

logger = logging.getLogger("chatglm.backends")

NAMES = {"v1": "ChatGLM-6B", "v2": "ChatGLM2-6B", "v3": "ChatGLM3-6B"}
PREFIX = "transformer.prefix_encoder."
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


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
    lora=None,
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
    lora: a LoRA adapter directory in PEFT's format, applied on top (chatglm/adapters.py).
    """
    bits = _check_bits(quantization_bit)
    if output_layer not in ("auto", *OUTPUT_LAYER_MODES):
        raise ValueError(f"output layer must be auto, {', '.join(OUTPUT_LAYER_MODES)}; got {output_layer!r}")
    check_mode(decode)
    num_gpus = int(num_gpus or 1)
    path = _model_path(model_path, tiny_version)
    tok_path = require_directory(tokenizer_path or path, "tokenizer directory", " (--tokenizer-path / TOKENIZER_PATH)")
    config = ChatGLMConfig.from_checkpoint(path)  # a directory that is no checkpoint says so first
    tokenizer = ChatGLMTokenizer.from_pretrained(tok_path)  # before the weights: a wrong one fails in seconds
    check_tokenizer(config, tokenizer, tok_path)
    prefix = None
    if ptuning_checkpoint:
        prefix = read_ptuning_checkpoint(ptuning_checkpoint, pre_seq_len, config.chatglm_version)
    elif pre_seq_len:
        logger.warning("--pre-seq-len %s without --ptuning-checkpoint is ignored", pre_seq_len)
    overrides = {} if prefix is None else {"pre_seq_len": prefix[1], "prefix_projection": prefix[2]}

    if lora:
        read_adapter(lora)  # a wrong path or a broken adapter fails before the model loads
    if device_map is not None or num_gpus > 1:
        if lora:
            raise ValueError(
                "--lora is for a model on one device: merge the adapter first (python -m chatglm.adapters)"
            )
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
        model = load_model(path, dtype=torch_dtype, quantization_bit=bits, **overrides)
        set_output_layer(model, output_layer)
        if prefix is not None:
            load_prefix_encoder(model, prefix[0])
        if lora:
            apply_lora(model, lora)
        model = _place(model, device)
        if kind == "cpu":
            settle_on_cpu(model)
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


def check_tokenizer(config: ChatGLMConfig, tokenizer, tok_path: str) -> None:
    """ValueError (one line) when the tokenizer is not one the model can read: another generation's (whose chat
    format the model does not know) or one with more tokens than the model has embedding rows (an id past them
    fails at the first message, deep in the forward)."""
    version, rows = config.chatglm_version, getattr(config, "padded_vocab_size", None) or config.vocab_size
    if tokenizer.chatglm_version != version:
        raise ValueError(f"the tokenizer in {tok_path} is {NAMES[tokenizer.chatglm_version]}'s and the model "
                         f"{NAMES[version]}: point --tokenizer-path at the model's own tokenizer")  # fmt: skip
    if len(tokenizer) > rows:
        raise ValueError(f"the tokenizer in {tok_path} has {len(tokenizer)} tokens, more than the model's {rows} "
                         "embedding rows: point --tokenizer-path at the model's own tokenizer")  # fmt: skip


def _model_path(model_path, tiny_version: str) -> str:
    if model_path:
        return require_directory(model_path, "model directory", ": set --model-path / MODEL_PATH to a local "
                                 "checkpoint directory (only local checkpoints are loaded)")  # fmt: skip
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


def read_ptuning_checkpoint(path, pre_seq_len=None, model_version=None) -> tuple[dict, int, bool]:
    """(prefix encoder state without the `transformer.prefix_encoder.` prefix, pre_seq_len, prefix_projection).
    model_version: the generation it is for; a checkpoint whose config.json names another is refused (ChatGLM2 and
    ChatGLM3 have the same shapes, so nothing else would notice)."""
    path = require_directory(path, "P-Tuning checkpoint directory",
                             " (--ptuning-checkpoint / PTUNING_CHECKPOINT / PT_PATH)")  # fmt: skip
    try:
        files = weight_files(path)
    except FileNotFoundError:
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ValueError(
                f"{path!r} is a PEFT adapter (adapter_config.json), not a P-Tuning v2 checkpoint: pass it as "
                "--lora (LORA_PATH)"
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
    trained = saved.get("chatglm_version")
    if model_version and trained and trained != model_version:
        raise ValueError(f"the P-Tuning checkpoint {path!r} was trained on {NAMES[trained]} ({trained}); the model "
                         f"is {NAMES[model_version]} ({model_version}): use a checkpoint trained on this model")  # fmt: skip
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


# --- several devices -----------------------------------------------------------------------------------------


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
    model = load_model(path, config=config, dtype=torch_dtype, quantization_bit=bits)
    if prefix is not None:
        load_prefix_encoder(model, prefix[0])
    return dispatch(model, device_map)
