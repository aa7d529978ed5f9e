"""GEMV (decode, batch 1) at ChatGLM2-6B's real layer shapes: effective GB/s of weight bytes per backend.

    python benchmarks/bench_gemv.py [--threads 1 2] [--rows 1] [--no-original] [--no-interplay]
    python benchmarks/bench_gemv.py --device cuda [--rows 1]     # Triton INT8/INT4 against cuBLAS fp16/bf16

For each shape and thread count: fp32 and bf16 matmul (PyTorch), our bf16/fp16 GEMV (kernels float_linear, what
quantization.fast_linear calls), our INT8 and INT4 kernels (default: activations rounded to int8 per 64 columns;
"f32 x": the fp32-activation kernels; with --rows above 1 also what prefill can take: dequantize + torch's bf16 GEMM,
and our INT8 GEMM on AVX-512 VNNI builds, on AMX tiles where it has them and then without), PyTorch's own
weight-only ops (aten._weight_int8pack_mm; aten._weight_int4pack_mm_for_cpu with the per-row scale repeated per group), and the
original's approach (dequantize the whole matrix, then matmul). The ceiling is the machine's memory bandwidth,
measured in the same run (a 512 MiB tensor copy: bytes read plus written per second). Then the cold-weights section
(many matrices in turn, 4 KiB against huge pages, as decode reads them). Last, the thread interplay check: a loop of
[our GEMV, a torch op] pairs against the two timed alone (OpenMP spin-waiting would show as a slower pair).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels  # noqa: E402
from kernels import get_cpu_kernel  # noqa: E402
from quantization.ops import dequantize, dequantized_gemm, quantize_weight, unpack_int4  # noqa: E402

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


def bandwidth(place=None) -> float:
    a = torch.empty(2**27)  # 512 MiB
    b = torch.empty_like(a)
    if place is not None:  # e.g. chatglm.hugepages.to_huge_pages
        a, b = place(a), place(b)
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
            ("bf16 ours", w.numel() * 2, lambda: kernel.float_linear(x, wb)),
            ("fp16 ours", w.numel() * 2, lambda: kernel.float_linear(x, wh)),
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
        if rows > 1:  # what prefill can take instead: dequantize + torch's bf16 GEMM, and our INT8 GEMM
            out += [
                ("INT8 dequant+bf16 mm", q8.numel(), lambda: dequantized_gemm(kernel, x, q8, s8f, 8)),
                ("INT4 dequant+bf16 mm", q4.numel(), lambda: dequantized_gemm(kernel, x, q4, s4f, 4)),
            ]
        if rows > 1 and kernel.has_gemm:
            out += [
                ("INT8 ours GEMM", q8.numel(), lambda: kernel.gemm(x, q8, s8f, 8)),
                ("INT4 ours GEMM", q4.numel(), lambda: kernel.gemm(x, q4, s4f, 4)),
            ]
        if rows > 1 and kernel.gemm_tiles:  # the GEMM above ran on AMX tiles: the same without them
            out += [
                ("INT8 ours GEMM no AMX", q8.numel(), lambda: kernel.gemm(x, q8, s8f, 8, tiles=False)),
                ("INT4 ours GEMM no AMX", q4.numel(), lambda: kernel.gemm(x, q4, s4f, 4, tiles=False)),
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


def gpu_cases(k, n, rows, device, copies):
    """(name, weight bytes, fn) for one shape on a GPU: cuBLAS fp16/bf16, the Triton INT8/INT4 kernels (at one
    row both the tensor-core one and the GEMV one), PyTorch's weight-only ops and the original's approach
    (dequantize, then matmul). Each case cycles through `copies` weights so that the bytes come from HBM, not
    from the GPU's L2 cache."""
    from quantization.ops import quantized_linear_reference
    from quantization.triton_ops import triton_quantized_linear

    g = torch.Generator(device=device).manual_seed(k + n)
    x = torch.randn(rows, k, device=device, dtype=torch.float16, generator=g)
    cases = []

    for dtype, name in ((torch.float16, "fp16 cuBLAS"), (torch.bfloat16, "bf16 cuBLAS")):
        ws = [torch.randn(n, k, device=device, generator=g).to(dtype) for _ in range(copies)]
        xd = x.to(dtype)
        cases.append((name, n * k * 2, cycling(lambda w, xd=xd: xd @ w.t(), ws)))
    for bits in (8, 4):
        qs = [quantize_weight(torch.randn(n, k, device=device, generator=g), bits) for _ in range(copies)]
        nbytes = qs[0][0].numel() + qs[0][1].numel() * 2
        cases.append((f"INT{bits} triton", nbytes,
                      cycling(lambda q, b=bits: triton_quantized_linear(x, *q, b, gemv=False), qs)))  # fmt: skip
        if rows == 1:  # the one-row kernel, which the default dispatch takes with CHATGLM_TRITON_GEMV=1
            cases.append((f"INT{bits} triton gemv", nbytes,
                          cycling(lambda q, b=bits: triton_quantized_linear(x, *q, b, gemv=True), qs)))  # fmt: skip
        cases.append((f"INT{bits} orig dequant+mm", nbytes,
                      cycling(lambda q, b=bits: quantized_linear_reference(x, *q, b), qs)))  # fmt: skip
        if str(device).startswith("cuda"):  # PyTorch's own weight-only CUDA ops, where this build has them
            try:
                case = torch_op_case(x, qs, bits, k)
                case[2]()
                cases.append(case)
            except Exception as e:  # absent or refused in this build: say so, go on
                print(f"# INT{bits} torch op skipped at {k}->{n}: {type(e).__name__}: {str(e)[:120]}", flush=True)
    return cases


def torch_op_case(x, qs, bits, k):
    """aten._weight_int8pack_mm, or tinygemm's aten._weight_int4pack_mm on weights repacked for it (unsigned
    nibbles with a zero point of 8, one scale per row repeated per group), cycling like the others."""
    xb = x.bfloat16()
    nbytes = qs[0][0].numel() + qs[0][1].numel() * 2
    if bits == 8:
        ws = [(q, s.bfloat16()) for q, s in qs]
        fn = lambda w: torch.ops.aten._weight_int8pack_mm(xb, *w)  # noqa: E731
    else:
        group = next(g for g in (256, 128, 64, 32) if k % g == 0)
        ws = []
        for q, s in qs:
            u = (unpack_int4(q).to(torch.int32) + 8).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).contiguous(), 8)
            sz = torch.stack([s.float(), torch.zeros_like(s.float())], -1).bfloat16()  # [n, 2]
            ws.append((packed, sz.unsqueeze(0).expand(k // group, -1, -1).contiguous()))
        fn = lambda w: torch.ops.aten._weight_int4pack_mm(xb, w[0], group, w[1])  # noqa: E731
    return (f"INT{bits} torch op", nbytes, cycling(fn, ws))


def cycling(fn, weights):
    """fn over the next of `weights` at each call, so that on a GPU the bytes come from HBM, not from L2."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(weights)
        return fn(weights[state["i"]])

    return call


def run_gpu(rows: int, device: str = "cuda", shapes=None, copies: int | None = None) -> list[str]:
    """The GPU table: GB/s of weight bytes per call against the copy bandwidth of device memory."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn, reps):
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - start) / reps

    def copy_bandwidth(elems):
        a = torch.empty(elems, device=device)
        b = torch.empty_like(a)
        return 2 * elems * 4 / min(timed(lambda: b.copy_(a), 20) for _ in range(3)) / 1e9

    bw = copy_bandwidth(2**28 if device.startswith("cuda") else 2**24)  # 1 GiB on a GPU
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else device
    lines = [f"## {name} rows={rows}: measured copy bandwidth {bw:.0f} GB/s (read + write)"]
    lines.append(f"{'in->out':>12} {'backend':<24} {'us':>9} {'GB/s':>7} {'of bw':>6}")
    for k, n in shapes or [*SHAPES, OUTPUT_LAYER]:
        # enough copies of the weights to overflow a 50 MB L2 (at least 256 MB of INT4 per case)
        reps_copies = copies or max(2, -(-(256 << 20) // (n * k // 2)))
        for case, nbytes, fn in gpu_cases(k, n, rows, device, reps_copies):
            dt = timed(fn, 3 if "orig" in case else 200)
            gbs = nbytes / dt / 1e9
            lines.append(f"{k:>5}->{n:<6} {case:<24} {dt * 1e6:9.1f} {gbs:7.1f} {gbs / bw:6.0%}")
        torch.cuda.empty_cache() if device.startswith("cuda") else None
    return lines


def cold(threads: int, total_bytes: int = 3 << 29) -> list[str]:
    """Weights as decode meets them: many matrices (4096 -> 27392) read in turn, about 1.5 GB in all, so nothing
    comes from cache; ours with the weights in ordinary (4 KiB) pages and in huge pages (as a CPU model has
    them, chatglm/hugepages.py), next to torch's bf16 matmul. GB/s of weight bytes, best of 5 passes."""
    from chatglm import hugepages

    torch.set_num_threads(threads)
    kernel = get_cpu_kernel()
    if kernel is None:
        return []
    k, n = 4096, 27392
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, k, generator=g)
    huge = hugepages.enabled()
    bw = max([bandwidth()] + ([bandwidth(hugepages.to_huge_pages)] if huge else []))
    lines = [f"## cold weights, threads={threads}: {k}->{n} matrices in turn, ~{total_bytes / 1e9:.1f} GB per "
             f"pass; copy bandwidth {bw:.1f} GB/s (best of 4 KiB and huge pages)"]  # fmt: skip

    def each(call, ws):
        for w in ws:
            call(*w)

    def one(name, make, call, nbytes_each):
        count = max(2, total_bytes // nbytes_each)
        for pages in ("4 KiB pages", "huge pages") if huge else ("4 KiB pages",):
            ws = [make() for _ in range(count)]
            if pages == "huge pages":
                ws = [tuple(hugepages.to_huge_pages(t) if t.numel() * t.element_size() > 1 << 20 else t for t in w)
                      for w in ws]  # fmt: skip
            dt = min(timeit(functools.partial(each, call, ws), 0.2, 5) for _ in range(2))
            gbs = count * nbytes_each / dt / 1e9
            lines.append(f"{name:<12} {pages:<12} {gbs:6.1f} GB/s {gbs / bw:6.0%}")
            del ws

    s = torch.rand(n, generator=g) * 0.01
    one("INT4 ours", lambda: (torch.randint(-128, 128, (n, k // 2), dtype=torch.int8, generator=g),),
        lambda q: kernel.linear(x, q, s, 4), n * k // 2)  # fmt: skip
    one("INT8 ours", lambda: (torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g),),
        lambda q: kernel.linear(x, q, s, 8), n * k)  # fmt: skip
    one(
        "bf16 ours",
        lambda: (torch.randn(n, k, generator=g).bfloat16(),),
        lambda w: kernel.float_linear(x, w),
        n * k * 2,
    )
    xb = x.bfloat16()
    one("bf16 torch", lambda: (torch.randn(n, k, generator=g).bfloat16(),), lambda w: xb @ w.t(), n * k * 2)
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
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-weights (many matrices) section")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the Triton kernels against cuBLAS")
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        print(f"# bench_gemv: torch {torch.__version__}, {torch.cuda.get_device_name(args.device)}, "
              f"CUDA {torch.version.cuda}")  # fmt: skip
        print("\n".join(run_gpu(args.rows, args.device)))
        return
    kernel = get_cpu_kernel()
    print(f"# bench_gemv: torch {torch.__version__}, {platform.machine()}, {kernels.cpu_summary()}, "
          f"our kernels: {kernel.simd + (' + OpenMP' if kernel.openmp else '') if kernel else 'not built'}, "
          f"OpenMP runtimes loaded: {kernels.openmp_runtimes()}")  # fmt: skip
    for t in args.threads:
        print("\n".join(run(t, args.rows, not args.no_original)))
        print()
    if not args.no_cold:
        for t in args.threads:
            print("\n".join(cold(t)))
            print()
    if not args.no_interplay:
        for t in args.threads:
            print("\n".join(interplay(t)))


if __name__ == "__main__":
    main()
