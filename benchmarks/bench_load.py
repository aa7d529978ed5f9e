"""Peak resident memory of loading a full-size ChatGLM checkpoint, float and quantized while loading.

    python benchmarks/bench_load.py --config ../shared/models/chatglm2-6b/config.json --workdir /tmp/glm2-random

Builds (once) a checkpoint with random fp16 weights from the real config.json, in the original layout
(pytorch_model-0000N-of-0000M.bin shards of about 2 GB with their index), then loads it in fresh processes
and reports each one's load time and peak RSS after one forward pass (which touches every weight):
  - ours, fp16
  - ours, INT8 / INT4 quantized shard by shard while loading (load_model(..., quantization_bit=N))
  - the original's order: load the whole fp16 model, then quantize (from_pretrained(...).quantize(N))
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def build_checkpoint(config_path: str, out: str, shard_bytes: int = 2_000_000_000, layers: int | None = None) -> None:
    """Random fp16 weights in the original layout (shards + index, the config and tokenizer files beside them);
    `layers` cuts the block count (config.json says so). Norms are ones and rotary inv_freq the real values, so
    every engine that computes them itself (chatglm.cpp, llama.cpp) runs the same model."""
    from chatglm import ChatGLMConfig
    from chatglm.loading import model_class

    if os.path.isfile(os.path.join(out, "pytorch_model.bin.index.json")):
        return
    os.makedirs(out, exist_ok=True)
    src = os.path.dirname(os.path.abspath(config_path))
    for name in ("tokenizer_config.json", "tokenizer.model", "ice_text.model"):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), out)
    with open(os.path.join(src, "config.json")) as f:
        raw = json.load(f)
    if layers:
        raw["num_layers"] = layers
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    config = ChatGLMConfig.from_checkpoint(out)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in model_class(config)(config, dtype=torch.float16).state_dict().items()}
    # Group keys into shards of about shard_bytes, then write each shard with fresh random fp16 tensors.
    groups, current, size = [], [], 0
    for key, shape in shapes.items():
        n = torch.Size(shape).numel() * 2
        if current and size + n > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(key)
        size += n
    groups.append(current)
    g = torch.Generator().manual_seed(0)

    def tensor(key):
        shape = shapes[key]
        if key.endswith("inv_freq"):  # 1 / 10000^(2i / d), as the original computes it
            dim = 2 * shape[0]
            return (1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)).half()
        if "layernorm" in key and key.endswith("weight"):
            return torch.ones(shape, dtype=torch.float16)
        return (torch.randn(shape, generator=g) * 0.02).half()

    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"pytorch_model-{i + 1:05d}-of-{len(groups):05d}.bin"
        shard = {k: tensor(k) for k in keys}
        torch.save(shard, os.path.join(out, name))
        weight_map.update({k: name for k in keys})
        del shard
        print(f"  wrote {name}", flush=True)
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    with open(os.path.join(out, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


CHILD = """
import resource, sys, time, torch
sys.path.insert(0, {repo!r})
from chatglm import load_model
t = time.perf_counter()
mode, bits = {mode!r}, {bits}
if mode == "while":
    model = load_model({path!r}, dtype=torch.float16, quantization_bit=bits or None)
else:
    model = load_model({path!r}, dtype=torch.float16).quantize(bits)
dt = time.perf_counter() - t
with torch.no_grad():  # touch every weight once, so lazily mapped pages count too
    model(torch.tensor([[1, 2, 3]]))
size = sum(p.numel() * p.element_size() for p in model.parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(f"{{dt:.1f}} {{size / 2**30:.2f}} {{peak:.2f}}")
"""


def measure(path: str, mode: str, bits: int) -> tuple[float, float, float]:
    code = CHILD.format(repo=REPO, path=path, mode=mode, bits=bits)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ,
                         CHATGLM_NO_PROGRESS="1"))  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    dt, size, peak = map(float, out.stdout.split()[-3:])
    return dt, size, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "..", "shared", "models", "chatglm2-6b", "config.json"))
    parser.add_argument("--workdir", required=True, help="where the random checkpoint is written (about 12.5 GB)")
    parser.add_argument("--modes", nargs="+", default=["fp16", "int8-while", "int4-while", "int4-after"])
    args = parser.parse_args()
    t = time.perf_counter()
    build_checkpoint(args.config, args.workdir)
    print(f"# checkpoint ready in {time.perf_counter() - t:.0f} s: {args.workdir}")
    print(f"# bench_load: torch {torch.__version__}, {os.cpu_count()} cpus, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, config {args.config}")  # fmt: skip
    print(f"{'mode':<14} {'load s':>7} {'weights GiB':>12} {'peak RSS GiB':>13}")
    for mode in args.modes:
        bits = {"fp16": 0, "int8-while": 8, "int4-while": 4, "int4-after": 4, "int8-after": 8}[mode]
        dt, size, peak = measure(args.workdir, "after" if mode.endswith("after") else "while", bits)
        print(f"{mode:<14} {dt:7.1f} {size:12.2f} {peak:13.2f}", flush=True)


if __name__ == "__main__":
    main()
