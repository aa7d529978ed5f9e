"""GEMV (decode, batch 1) at ChatGLM's real layer shapes: effective GB/s of weight bytes per backend.

    python benchmarks/bench_gemv.py [--threads 1 2] [--rows 1]

For each shape and thread count: fp32 and bf16 matmul (PyTorch), INT8 and INT4 through our fused kernel,
PyTorch's own weight-only ops (aten._weight_int8pack_mm; aten._weight_int4pack_mm_for_cpu with the per-row scale
repeated per 256-column group), and the original's approach (dequantize the whole matrix, then matmul).
The ceiling is the machine's memory bandwidth, measured in the same run (a large tensor copy: bytes read
plus written per second).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import get_cpu_kernel  # noqa: E402
from quantization.ops import dequantize, quantize_weight, unpack_int4  # noqa: E402

SHAPES = [(4096, 12288), (4096, 4608), (4096, 27392), (13696, 4096), (4096, 16384), (16384, 4096)]  # (in, out)


def timeit(fn, min_time=0.3, max_reps=200):
    fn()
    reps, start = 0, time.perf_counter()
    while reps < max_reps and (reps < 3 or time.perf_counter() - start < min_time):
        fn()
        reps += 1
    return (time.perf_counter() - start) / reps


def bandwidth() -> float:
    a = torch.empty(2**27)  # 512 MiB
    b = torch.empty_like(a)
    a.fill_(1.0)
    dt = min(timeit(lambda: b.copy_(a), 0.5, 10) for _ in range(3))
    return 2 * a.numel() * 4 / dt / 1e9


def int4pack_for_torch(q4, scale, k, group=256):
    u = (unpack_int4(q4).to(torch.int32) + 8).contiguous()  # torch stores unsigned nibbles with a zero of 8
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    groups = k // group
    sz = torch.stack([scale.float(), torch.zeros_like(scale.float())], -1)  # [n, 2]
    return packed, sz.unsqueeze(0).expand(groups, -1, -1).contiguous(), group


def run(threads: int, rows: int) -> list[str]:
    torch.set_num_threads(threads)
    kernel = get_cpu_kernel()
    bw = bandwidth()
    lines = [f"threads={threads} rows={rows} measured copy bandwidth {bw:.1f} GB/s"]
    lines.append(f"{'in->out':>12} {'backend':<28} {'ms':>8} {'GB/s':>7} {'of bw':>6}")
    g = torch.Generator().manual_seed(0)
    for k, n in SHAPES:
        w = torch.randn(n, k, generator=g)
        x = torch.randn(rows, k, generator=g)
        q8, s8 = quantize_weight(w, 8)
        q4, s4 = quantize_weight(w, 4)
        wb, xb = w.bfloat16(), x.bfloat16()
        cases = [
            ("fp32 matmul", w.numel() * 4, lambda: x @ w.t()),
            ("bf16 matmul", w.numel() * 2, lambda: xb @ wb.t()),
        ]
        if kernel is not None:
            s8f, s4f = s8.float(), s4.float()
            cases += [
                ("int8 ours (fused)", q8.numel(), lambda: kernel.linear(x, q8, s8f, 8)),
                ("int4 ours (fused)", q4.numel(), lambda: kernel.linear(x, q4, s4f, 4)),
            ]
        s8b = s8.bfloat16()
        cases.append(
            ("int8 torch _weight_int8pack_mm", q8.numel(), lambda: torch.ops.aten._weight_int8pack_mm(xb, q8, s8b))
        )
        try:
            p4, sz, group = int4pack_for_torch(q4, s4, k)
            szb = sz.bfloat16()
            fn4 = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, p4, group, szb)  # noqa: E731
            fn4()
            cases.append(("int4 torch _weight_int4pack_mm", q4.numel(), fn4))
        except Exception as e:  # not in every torch build
            lines.append(f"{'':>12} int4 torch op unavailable: {type(e).__name__}")
        cases += [
            ("int8 original (dequant+mm)", q8.numel(), lambda: x @ dequantize(q8, s8, 8).t()),
            ("int4 original (dequant+mm)", q4.numel(), lambda: x @ dequantize(q4, s4, 4).t()),
        ]
        for name, nbytes, fn in cases:
            dt = timeit(fn)
            gbs = nbytes / dt / 1e9
            lines.append(f"{k:>5}->{n:<6} {name:<28} {dt * 1e3:8.3f} {gbs:7.1f} {gbs / bw:6.0%}")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, default=1, help="rows of x (batch x tokens)")
    args = parser.parse_args()
    print(f"# bench_gemv: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cpus")  # fmt: skip
    for t in args.threads:
        print("\n".join(run(t, args.rows)))
        print()


if __name__ == "__main__":
    main()
