"""GEMV (decode, batch 1) at ChatGLM2-6B's real layer shapes: effective GB/s of weight bytes per backend.

    python benchmarks/bench_gemv.py [--threads 1 2] [--rows 1] [--no-original] [--no-interplay]

For each shape and thread count: fp32 and bf16 matmul (PyTorch), our bf16/fp16 GEMV (kernels half_linear, what
quantization.fast_linear calls), our INT8 and INT4 kernels (default: activations rounded to int8 per 64 columns;
"f32 x": the fp32-activation kernels), PyTorch's own weight-only ops (aten._weight_int8pack_mm;
aten._weight_int4pack_mm_for_cpu with the per-row scale repeated per group), and the original's approach
(dequantize the whole matrix, then matmul). The ceiling is the machine's memory bandwidth, measured in the same
run (a 512 MiB tensor copy: bytes read plus written per second). Last, the thread interplay check: a loop of
[our GEMV, a torch op] pairs against the two timed alone (OpenMP spin-waiting would show as a slower pair).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels  # noqa: E402
from kernels import get_cpu_kernel  # noqa: E402
from quantization.ops import dequantize, quantize_weight, unpack_int4  # noqa: E402

# (in, out): qkv, dense, h_to_4h, 4h_to_h of a ChatGLM2-6B block; the bf16 output layer
SHAPES = [(4096, 4608), (4096, 4096), (4096, 27392), (13696, 4096)]
OUTPUT_LAYER = (4096, 65024)


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


def int4pack_for_torch(q4, scale, k):
    group = next(g for g in (256, 128, 64, 32) if k % g == 0)
    u = (unpack_int4(q4).to(torch.int32) + 8).contiguous()  # torch stores unsigned nibbles with a zero of 8
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    sz = torch.stack([scale.float(), torch.zeros_like(scale.float())], -1)  # [n, 2]
    return packed, sz.unsqueeze(0).expand(k // group, -1, -1).contiguous(), group


def cases_for(k, n, rows, kernel, original, g):
    w = torch.randn(n, k, generator=g)
    x = torch.randn(rows, k, generator=g)
    wb, xb, wh = w.bfloat16(), x.bfloat16(), w.half()
    out = [
        ("fp32 mm", w.numel() * 4, lambda: x @ w.t()),
        ("bf16 mm", w.numel() * 2, lambda: xb @ wb.t()),
    ]
    if kernel is not None:
        out += [
            ("bf16 ours", w.numel() * 2, lambda: kernel.half_linear(x, wb)),
            ("fp16 ours", w.numel() * 2, lambda: kernel.half_linear(x, wh)),
        ]
    if (k, n) == OUTPUT_LAYER:
        return out
    q8, s8 = quantize_weight(w, 8)
    q4, s4 = quantize_weight(w, 4)
    s8f, s4f, s8b = s8.float(), s4.float(), s8.bfloat16()
    if kernel is not None:
        out += [
            ("INT8 ours", q8.numel(), lambda: kernel.linear(x, q8, s8f, 8, quantize_activations=True)),
            ("INT8 ours f32 x", q8.numel(), lambda: kernel.linear(x, q8, s8f, 8, quantize_activations=False)),
            ("INT4 ours", q4.numel(), lambda: kernel.linear(x, q4, s4f, 4, quantize_activations=True)),
            ("INT4 ours f32 x", q4.numel(), lambda: kernel.linear(x, q4, s4f, 4, quantize_activations=False)),
        ]
    out.append(("INT8 torch op", q8.numel(), lambda: torch.ops.aten._weight_int8pack_mm(xb, q8, s8b)))
    try:
        p4, sz, group = int4pack_for_torch(q4, s4, k)
        szb = sz.bfloat16()
        fn4 = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, p4, group, szb)  # noqa: E731
        fn4()
        out.append(("INT4 torch op", q4.numel(), fn4))
    except Exception:  # not in every torch build
        pass
    if original:
        out += [
            ("INT8 orig dequant+mm", q8.numel(), lambda: x @ dequantize(q8, s8, 8).t()),
            ("INT4 orig dequant+mm", q4.numel(), lambda: x @ dequantize(q4, s4, 4).t()),
        ]
    return out


def run(threads: int, rows: int, original: bool) -> list[str]:
    torch.set_num_threads(threads)
    kernel = get_cpu_kernel()
    bw = bandwidth()
    lines = [f"## threads={threads} rows={rows}: measured copy bandwidth {bw:.1f} GB/s"]
    lines.append(f"{'in->out':>12} {'backend':<22} {'ms':>8} {'GB/s':>7} {'of bw':>6}")
    g = torch.Generator().manual_seed(0)
    for k, n in [*SHAPES, OUTPUT_LAYER]:
        for name, nbytes, fn in cases_for(k, n, rows, kernel, original, g):
            dt = timeit(fn, max_reps=200 if "orig" not in name else 3)
            gbs = nbytes / dt / 1e9
            lines.append(f"{k:>5}->{n:<6} {name:<22} {dt * 1e3:8.3f} {gbs:7.1f} {gbs / bw:6.0%}")
    bw_after = bandwidth()
    lines.append(f"copy bandwidth measured again after the shapes: {bw_after:.1f} GB/s")
    return lines


def interplay(threads: int) -> list[str]:
    """[our INT4 GEMV, torch op] pairs vs each alone: OpenMP spin-waiting between them would make pairs slower."""
    torch.set_num_threads(threads)
    kernel = get_cpu_kernel()
    if kernel is None:
        return []
    g = torch.Generator().manual_seed(1)
    q4, s4 = quantize_weight(torch.randn(4608, 4096, generator=g), 4)
    s4f, x = s4.float(), torch.randn(1, 4096, generator=g)
    a, b = torch.randn(1, 4096, generator=g).bfloat16(), torch.randn(4096, 512, generator=g).bfloat16()
    ours = lambda: kernel.linear(x, q4, s4f, 4)  # noqa: E731
    theirs = lambda: torch.nn.functional.silu(a @ b)  # noqa: E731

    def pair():
        ours()
        theirs()

    t1, t2, t12 = (min(timeit(f, 0.3, 2000) for _ in range(3)) for f in (ours, theirs, pair))
    return [
        f"interplay threads={threads}: ours {t1 * 1e6:.0f} us + torch op {t2 * 1e6:.0f} us = {(t1 + t2) * 1e6:.0f} us; "
        f"alternating pair {t12 * 1e6:.0f} us ({t12 / (t1 + t2) - 1:+.0%})"
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, default=1, help="rows of x (batch x tokens)")
    parser.add_argument("--no-original", action="store_true", help="skip the slow dequantize-then-matmul cases")
    parser.add_argument("--no-interplay", action="store_true")
    args = parser.parse_args()
    kernel = get_cpu_kernel()
    cpu = "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    print(f"# bench_gemv: torch {torch.__version__}, {cpu} ({platform.machine()}), {os.cpu_count()} cpus, "
          f"torch cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"our kernels: {kernel.simd + (' + OpenMP' if kernel.openmp else '') if kernel else 'not built'}, "
          f"OpenMP runtimes loaded: {kernels.openmp_runtimes()}")  # fmt: skip
    for t in args.threads:
        print("\n".join(run(t, args.rows, not args.no_original)))
        print()
    if not args.no_interplay:
        for t in args.threads:
            print("\n".join(interplay(t)))


if __name__ == "__main__":
    main()
