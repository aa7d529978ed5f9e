"""End-to-end generation speed on a full-width ChatGLM with random weights (a first cut of issue 9's suite).

    python benchmarks/bench_generate.py --layers 4 --modes bf16 int8 int4 --threads 2

Builds the model from a real config.json (../shared/models/chatglm2-6b by default) with `--layers` layers at
full width, random weights, nothing downloaded. Per mode: prefill time of a `--prompt`-token prompt and decode
ms/token at batch 1 over `--new` tokens (greedy, through model.generate), the same scaled to the real layer
count (the embedding/output layer are counted once), and the bandwidth floor: weight bytes read per token
divided by the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.bench_gemv import bandwidth  # noqa: E402
from chatglm import ChatGLMConfig  # noqa: E402
from chatglm.loading import model_class  # noqa: E402


def build(config_dir: str, layers: int, dtype, bits: int | None):
    config = ChatGLMConfig.from_checkpoint(config_dir)
    real_layers = config.num_layers
    config.num_layers = layers
    torch.manual_seed(0)
    model = model_class(config)(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model._reset_buffers()
    model = model.to(dtype).eval()
    if bits:
        model.quantize(bits)
    return model, real_layers


def weight_bytes(model) -> tuple[int, int]:
    """(bytes in the blocks, bytes outside them read per token: the output layer; embeddings are one row)."""
    blocks = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".layers." in n)
    head = model.output_head().weight
    return blocks, head.numel() * head.element_size()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "..", "shared", "models", "chatglm2-6b"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=["bf16", "int8", "int4"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bw = bandwidth()
    print(f"# bench_generate: torch {torch.__version__}, threads {args.threads}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, copy bandwidth {bw:.1f} GB/s, config {args.config}, "
          f"{args.layers} layers at full width, prompt {args.prompt}, {args.new} new tokens, batch 1")  # fmt: skip
    print(f"{'mode':<6} {'prefill s':>9} {'decode ms/tok':>13} {'scaled prefill s':>16} {'scaled ms/tok':>13} "
          f"{'floor ms/tok':>12} {'achieved/floor':>14}")  # fmt: skip
    for mode in args.modes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16, "int4": torch.bfloat16}[mode]
        bits = {"int8": 8, "int4": 4}.get(mode)
        model, real_layers = build(args.config, args.layers, dtype, bits)
        vocab = model.config.padded_vocab_size if hasattr(model.config, "padded_vocab_size") else 20000
        ids = torch.randint(100, min(vocab, 60000), (1, args.prompt))
        with torch.no_grad():
            t = time.perf_counter()
            model(ids, return_last_logit=True)
            prefill = time.perf_counter() - t
            model.generate(ids[:, :8], do_sample=False, max_new_tokens=4, eos_token_id=[-1])  # warm up
            t = time.perf_counter()
            model.generate(ids[:, :8], do_sample=False, max_new_tokens=args.new, eos_token_id=[-1])
            decode = (time.perf_counter() - t) / args.new
        blocks, head = weight_bytes(model)
        scale = real_layers / args.layers
        floor = (blocks * scale + head) / (bw * 1e9)
        # split the measured decode time into per-layer and head parts in proportion to bytes
        per_layer_share = blocks / (blocks + head)
        scaled = decode * (per_layer_share * scale + (1 - per_layer_share))
        scaled_prefill = prefill * (per_layer_share * scale + (1 - per_layer_share))
        print(f"{mode:<6} {prefill:9.2f} {decode * 1e3:13.1f} {scaled_prefill:16.2f} {scaled * 1e3:13.1f} "
              f"{floor * 1e3:12.1f} {floor / scaled:14.0%}", flush=True)  # fmt: skip
        del model


if __name__ == "__main__":
    main()
