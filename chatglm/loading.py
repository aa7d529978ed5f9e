"""Reading and writing checkpoints in the original layout.

The model is built on the meta device and filled shard by shard (`load_state_dict(assign=True)`), so peak
memory stays near the size of the weights plus one shard. Shards are `pytorch_model-*.bin` or
`*.safetensors`, found through their `*.index.json`, or single files.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import sys

import torch

from kernels.settings import settings

from .atomic import replacing_directory
from .config import ChatGLMConfig, parameter_count, read_json_object, require_directory
from .generation_config import load_generation_config
from .hugepages import move_to_huge_pages

logger = logging.getLogger(__name__)

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
DTYPES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}  # fmt: skip


def resolve_dtype(dtype, config: ChatGLMConfig | None = None) -> torch.dtype:
    """None / "auto" -> the checkpoint's dtype (config torch_dtype), else float16 as the releases ship."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        saved = getattr(config, "dtype", None)
        if isinstance(saved, torch.dtype):
            return saved
        return DTYPES.get(str(saved).replace("torch.", ""), torch.float16)
    if str(dtype).replace("torch.", "") not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of fp16, bf16, fp32")
    return DTYPES[str(dtype).replace("torch.", "")]


def model_class(config: ChatGLMConfig):
    if config.arch == 1:
        from .modeling_glm import ChatGLMForConditionalGeneration
    else:
        from .modeling_glm2 import ChatGLMForConditionalGeneration
    return ChatGLMForConditionalGeneration


WEIGHT_SHARD = re.compile(r"^(pytorch_model|model)-\d+-of-\d+\.(bin|safetensors)$")
FORMATS = {"safetensors": ("model.safetensors.index.json", "model.safetensors"),
           "bin": ("pytorch_model.bin.index.json", "pytorch_model.bin")}  # fmt: skip


def is_weight_file(name: str) -> bool:
    """A file name of the weights of either format (index, single file, shard)."""
    return name in INDEX_FILES or name in SINGLE_FILES or WEIGHT_SHARD.match(name) is not None


def _index_files(path: str, index: str) -> list[str]:
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index}: no 'weight_map' object of tensor names to file names")
    files = list(dict.fromkeys(weight_map.values()))
    for f in files:
        parts = f.replace("\\", "/").split("/")
        if os.path.isabs(f) or ".." in parts or not f.strip():
            raise ValueError(f"{index}: shard {f!r} lies outside the checkpoint directory; refused")
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(sorted(missing))}")
    return [os.path.join(path, f) for f in files]


def _weight_set(path: str, fmt: str) -> list[str] | None:
    """The files of the checkpoint's complete weight set in one format, or None."""
    index, single = FORMATS[fmt]
    if os.path.isfile(os.path.join(path, index)):
        return _index_files(path, os.path.join(path, index))
    return [os.path.join(path, single)] if os.path.isfile(os.path.join(path, single)) else None


def weight_files(path: str) -> list[str]:
    """The checkpoint's shard files, in index order. With both formats (THUDM's chatglm3-6b ships both), they
    must hold the same weights: two different sets are an error naming both, never a silent choice."""
    found = {fmt: files for fmt in FORMATS if (files := _weight_set(path, fmt))}
    if not found:
        raise FileNotFoundError(f"no weights in {path!r}: expected one of {', '.join(INDEX_FILES + SINGLE_FILES)}")
    if len(found) == 2:
        entries = [i if os.path.isfile(os.path.join(path, i)) else f for i, f in FORMATS.values()]
        _check_same_weights(found["safetensors"], found["bin"], f"{path!r} holds two different weight sets, "
                            f"{entries[0]} and {entries[1]}")  # fmt: skip
    return found.get("safetensors") or found["bin"]


def _check_same_weights(st_files: list[str], bin_files: list[str], problem: str, sample: int = 4) -> None:
    """The tensor names of both sets, and the values of the few smallest tensors (cheap: safetensors and
    mmap-loaded .bin read only what is touched), must agree."""
    from safetensors import safe_open

    shapes, where = {}, {}
    for file in st_files:
        with safe_open(file, "pt") as f:
            for key in f.keys():
                shapes[key], where[key] = f.get_slice(key).get_shape(), file
    bin_tensors = {}
    for file in bin_files:
        bin_tensors.update(read_shard(file))
    if set(bin_tensors) != set(shapes):
        raise ValueError(f"{problem} (not the same tensor names): remove the stale one")
    smallest = sorted(shapes, key=lambda k: (math.prod(shapes[k]), k))[:sample]
    for key in smallest:
        with safe_open(where[key], "pt") as f:
            a = f.get_tensor(key)
        if not torch.equal(a, bin_tensors[key]):
            raise ValueError(f"{problem} ({key!r} differs): remove the stale one")


def _check_fits(config, files: list[str], path: str) -> None:
    """The sizes in config.json must fit the weight files (a num_layers of 10**9 would otherwise build a model
    until memory runs out before any weight is read)."""
    disk = sum(os.path.getsize(f) for f in files)
    params = parameter_count(config)
    if params // 2 > 2 * disk + 2**20:  # INT4 (half a byte per parameter) is the densest layout there is
        raise ValueError(
            f"{os.path.join(path, 'config.json')}: its sizes (num_layers={config.num_layers}, "
            f"hidden_size={config.hidden_size}) describe {params:,} parameters, more than its weight files "
            f"({disk:,} bytes) can hold"
        )


def read_shard(file: str) -> dict[str, torch.Tensor]:
    try:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(file)
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # a truncated or corrupt download
        raise RuntimeError(
            f"could not read weight shard {file!r} ({type(e).__name__}: {e}); the file may be truncated or "
            "corrupt, download it again"
        ) from e


def _show_progress() -> bool:
    return sys.stderr.isatty() and settings.progress


def load_model(path: str, config: ChatGLMConfig | None = None, dtype=None, device=None, quantization_bit=None,
               **config_overrides):  # fmt: skip
    """Build the model of the right generation for the checkpoint at `path` and load its weights.

    `quantization_bit` (4 or 8) quantizes a float checkpoint shard by shard while it loads; a checkpoint
    saved quantized (config.json `quantization_bit`) loads as it is.
    """
    path = require_directory(path, "model directory", " (only local checkpoints are loaded)")
    if config is None:
        config = ChatGLMConfig.from_checkpoint(path, **config_overrides)
    else:
        for k, v in config_overrides.items():
            setattr(config, k, v)
    saved_bits = config.quantization_bit or 0
    if quantization_bit and saved_bits and quantization_bit != saved_bits:
        raise ValueError(
            f"{path!r} is already an INT{saved_bits} checkpoint; it cannot be loaded as INT{quantization_bit}"
        )
    bits = quantization_bit or saved_bits
    torch_dtype = resolve_dtype(dtype, config)
    files = weight_files(path)
    _check_fits(config, files, path)
    config.quantization_bit = 0  # the model is built float, then its layers are swapped
    with torch.device("meta"):
        model = model_class(config)(config, dtype=torch_dtype)
    output_bits = int(getattr(config, "quantization_output_bit", 0) or 0) if bits else 0  # INT8 output layer
    if bits:
        from quantization import prepare_for_quantized_checkpoint

        prepare_for_quantized_checkpoint(model, bits, getattr(config, "quantization_embeddings", False), output_bits)
    quantized = _quantized_modules(model) if bits else {}
    expected = set(model.state_dict().keys())
    loaded: set[str] = set()
    bar = None
    if len(files) > 1 and _show_progress():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), desc="Loading checkpoint shards")
    for file in files:
        shard = read_shard(file)
        if quantized:  # quantize float weights as they are read: memory stays near the quantized size
            shard = _quantize_shard(shard, quantized)
        shard = {k: _cast(k, v, torch_dtype) for k, v in shard.items() if k in expected}
        model.load_state_dict(shard, strict=False, assign=True)
        loaded.update(shard)
        big = sum(v.numel() * v.element_size() for v in shard.values()) > 2**27
        del shard
        if big:  # release a large shard's memory before reading the next (skip the cost on small ones)
            gc.collect()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    # Buffers the original recomputes (rotary inv_freq), the tied v1 lm_head, and a fresh prefix encoder.
    optional = {k for k in expected if k.endswith("inv_freq") or k == "lm_head.weight"}
    optional |= {k for k in expected if k.startswith("transformer.prefix_encoder.")}
    if output_bits and "lm_head.weight" in expected and "lm_head.weight" not in loaded:  # v1, tied: from the embedding
        from quantization import quantize_weight

        emb = model.transformer.word_embeddings.weight
        loaded_head = dict(zip(("lm_head.weight", "lm_head.weight_scale"), quantize_weight(emb, output_bits)))
        model.load_state_dict(loaded_head, strict=False, assign=True)
        loaded.update(loaded_head)
    missing = sorted(expected - loaded - optional)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise RuntimeError(f"checkpoint {path!r} does not match its config.json: missing weights {shown}")
    _materialize(model, torch_dtype, init_prefix=not any(k.startswith("transformer.prefix_encoder.") for k in loaded))
    config.quantization_bit = bits
    model.eval()
    if device is not None:
        model.to(device)
    if device is not None and torch.device(device).type == "cpu":
        settle_on_cpu(model)
    model.name_or_path = path
    model.generation_config = load_generation_config(path, config)
    return model


def settle_on_cpu(model) -> None:
    """A model that runs on the CPU, arranged for it: the quantized layers' weights in the kernels' layout
    (quantization.pack_for_cpu), then the large tensors in huge pages (move_to_huge_pages); the heap memory
    this freed goes back to the system (release_free_heap)."""
    from quantization import pack_for_cpu

    pack_for_cpu(model)
    move_to_huge_pages(model)
    release_free_heap()


def release_free_heap() -> bool:
    """Hand the free memory of the C heap back to the system (glibc's malloc_trim); False where there is none.

    Loading frees gigabytes: the fp16 shards' tensors once quantized, each weight's copy before it was rearranged
    or moved into huge pages. glibc keeps freed blocks below its mmap threshold (which grows to 32 MiB as large
    blocks are freed, so most of a model's tensors) in its heap: a 28-block INT4 model stayed at 5.0-5.5 GiB
    resident after loading, 3.8 GiB after this (and 4.05 after a 512-token prompt and decode steps)."""
    gc.collect()
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS; Windows has no CDLL(None))
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def _quantized_modules(model) -> dict:
    from quantization import QuantizedEmbedding, QuantizedLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}


def _quantize_shard(shard: dict, quantized: dict) -> dict:
    from quantization import quantize_weight

    out = {}
    for key, value in shard.items():
        module = key.rsplit(".", 1)[0] if key.endswith(".weight") else None
        if module in quantized and value.is_floating_point():
            out[key], out[module + ".weight_scale"] = quantize_weight(value, quantized[module].weight_bit_width)
        else:
            # A copy of its own: a tensor left pointing into the shard's mmap would keep the whole shard
            # (every page the quantizer touched) resident for the life of the model.
            out.setdefault(key, value.clone())
    return out


def _cast(key: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # int8 weights stay int8 and scales stay fp16 (the THUDM layout); float weights take the model dtype.
    if not value.is_floating_point() or key.endswith("weight_scale"):
        return value
    return value.to(dtype)


def _materialize(model, dtype, init_prefix: bool):
    """Give real storage to whatever is still on the meta device, then recompute derived buffers."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                module.register_buffer(name, torch.empty(buf.shape, dtype=buf.dtype), persistent=True)
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                module.register_parameter(
                    name, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
                )
    model._reset_buffers()
    prefix = getattr(model.transformer, "prefix_encoder", None)
    if prefix is not None and init_prefix:
        for m in prefix.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def save_model(model, save_directory: str, max_shard_size: int | str = "2GB", safe_serialization: bool = True,
               num_shards: int | None = None):  # fmt: skip
    """Write config.json and the weights (sharded, with an index) in the original layout; `num_shards` asks for
    that many files instead of a size (as near as the tensors allow: never more).

    All at once: the files are written into a new directory beside the target which then replaces it, so the
    target holds either the old checkpoint or the new one (chatglm/atomic.py). The old weights of either format
    go; its other files (the tokenizer, a README) stay.
    """
    if num_shards is not None and (isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1):
        raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}")
    with replacing_directory(save_directory, keep=lambda name: not is_weight_file(name)) as out:
        _write_checkpoint(model, out, max_shard_size, safe_serialization, num_shards)


def _pack(sizes: list[int], limit: int) -> list[int]:
    """Greedy shards in order: the index of the shard of each tensor (a new shard once `limit` would be passed)."""
    where, shard, size = [], 0, 0
    for n in sizes:
        if size and size + n > limit:
            shard, size = shard + 1, 0
        where.append(shard)
        size += n
    return where


def _write_checkpoint(model, save_directory: str, max_shard_size, safe_serialization: bool, num_shards=None) -> None:
    # generation_config.json, as transformers writes it; first, since transformers refuses an inconsistent one
    model.generation_config.save_pretrained(save_directory)
    # Clone so tied / shared tensors (v1 lm_head) become separate entries, as the originals store them.
    state = {k: _cast(k, v.detach().to("cpu"), v.dtype).contiguous().clone() for k, v in model.state_dict().items()}
    state = {k: (v.half() if k.endswith("weight_scale") else v) for k, v in state.items()}
    sizes = [v.numel() * v.element_size() for v in state.values()]
    if num_shards is None:
        limit = _parse_size(max_shard_size)
    else:  # the smallest size limit that needs no more than num_shards files (the count falls as the limit grows)
        lo, hi = max(sizes), sum(sizes)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if _pack(sizes, mid)[-1] < num_shards else (mid + 1, hi)
        limit = lo
    where = _pack(sizes, limit)
    shards = [{} for _ in range(where[-1] + 1)]
    for (k, v), i in zip(state.items(), where):
        shards[i][k] = v
    ext, prefix = ("safetensors", "model") if safe_serialization else ("bin", "pytorch_model")
    names = [f"{prefix}.{ext}"] if len(shards) == 1 else [
        f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))
    ]  # fmt: skip
    for name, shard in zip(names, shards):
        target = os.path.join(save_directory, name)
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(shard, target, metadata={"format": "pt"})
        else:
            torch.save(shard, target)
    if len(shards) > 1:
        total = sum(v.numel() * v.element_size() for v in state.values())
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        with open(os.path.join(save_directory, f"{prefix}.{ext}.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = model.config
    config.architectures = ["ChatGLMModel"]
    config.dtype = next(model.parameters()).dtype
    config.save_pretrained(save_directory)


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = str(size).strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


class ChatGLMLoadingMixin:
    """from_pretrained / save_pretrained with the transformers signatures, on our loader."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *args,
        config=None,
        torch_dtype=None,
        dtype=None,
        device_map=None,
        trust_remote_code=None,
        **kwargs,
    ):
        for ignored in ("low_cpu_mem_usage", "revision", "local_files_only", "cache_dir", "_from_auto",
                        "_commit_hash", "adapter_kwargs", "resume_download", "use_safetensors"):  # fmt: skip
            kwargs.pop(ignored, None)
        device = kwargs.pop("device", None)
        if isinstance(device_map, (str, torch.device)) and device_map not in ("auto", "balanced", "sequential"):
            device = device_map
        elif device_map is not None:
            raise NotImplementedError("device_map over several devices: use utils.load_model_on_gpus")
        return load_model(
            pretrained_model_name_or_path, config=config, dtype=dtype or torch_dtype, device=device, **kwargs
        )

    def save_pretrained(self, save_directory, max_shard_size="2GB", safe_serialization=True, **kwargs):
        save_model(self, save_directory, max_shard_size=max_shard_size, safe_serialization=safe_serialization)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    def quantize(self, bits: int | None, **kwargs):
        """Weight-only INT8/INT4 quantization in place; returns the model (chains like `.quantize(4).half()`)."""
        if not bits:
            return self
        from quantization import quantize

        return quantize(self, bits, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
