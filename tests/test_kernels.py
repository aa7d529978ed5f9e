"""The CPU kernels (kernels/quantization_kernels.c) against PyTorch references, in both builds.

Builds, each where this CPU can run it: the one the model uses (kernels.cpu_isa(): -march=native unless
CHATGLM_CPU_ISA says otherwise), the AVX2 one (-march=x86-64-v3: what an AVX2-only CPU runs, built here even on
an AVX-512 CPU) and the portable one (-DCHATGLM_PORTABLE: plain C, what a CPU without AVX2 runs). Tolerances:
- activation quantization (int8 per 64 columns): bit-exact against the PyTorch emulation;
- INT8/INT4 "q" kernels: the integer sums are exact, so against the emulation (dequantized x, float64) the only
  error is fp32 accumulation: |y - ref| <= 1e-5 * sum|terms|; against the float reference (x unrounded) the
  error is at most half an activation step per column, sum_i (d_block(i) / 2) |w_i| (a rigorous bound, which
  outlier channels make large for their block), and on Gaussian x at most 1.5% of ||ref|| (measured ~0.5%);
- float-activation kernels and the bf16/fp16 GEMV: fp32 accumulation only, 1e-5 * sum|terms|.
"""

import ast
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import native_half_gemm
from kernels.settings import settings
from quantization import fast_linear, quantize_weight
from quantization.ops import dequantize, quantized_linear_reference

QB = kernels.QBLOCK
SHAPES = [
    (1, 64, 4),
    (1, 4096, 37),
    (2, 130, 9),
    (3, 4098, 13),
    (5, 13696, 6),
    (16, 200, 7),
    (17, 96, 5),
    (1, 2, 3),
    (8, 256, 37),  # INT4/INT8 multi-row paths (weight groups unpacked once, two x rows per pass)
    (6, 4096, 9),
    (1, 128, 16),  # INT4 decode in groups of 8 rows (also (1, 4096, 37): two groups and a tail of 5)
    (1, 192, 16),  # AVX-512 VNNI decode: one pair of 64-column blocks and a last odd block
    (1, 64, 8),  # and a single block (no pair)
    (2, 256, 16),  # small batches: two x rows per pass over 8 weight rows
    (3, 192, 17),  # an x row left alone, an odd block, and a tail of weight rows
    (19, 128, 9),  # more x rows than the AVX-512 small-batch path takes: weight groups unpacked once
]


@pytest.fixture(scope="module", params=["default", "avx2", "portable"])
def kernel(request):
    if request.param == "avx2" and not kernels.can_run("avx2"):
        pytest.skip("this CPU cannot run the AVX2 kernels")
    k = kernels.get_cpu_kernel() if request.param == "default" else kernels.build_cpu_kernel(request.param)
    if k is None:
        pytest.skip("the CPU kernels could not be built here (gcc missing)")
    if request.param == "portable":
        assert k.simd == "portable C"
    if request.param == "avx2":
        assert k.simd == "AVX2+FMA+F16C"  # the intrinsics, and no AVX-512 code from the compiler
    return k


def test_native_build_uses_avx512_vnni_and_amx_where_the_cpu_has_them():
    k = kernels.get_cpu_kernel()
    if k is None or kernels.cpu_isa() != "native":
        pytest.skip("no native kernel build here")
    vnni = {"avx512f", "avx512bw", "avx512_vnni", "f16c", "fma"} <= kernels.cpu_flags()
    amx = vnni and {"amx_tile", "amx_int8"} <= kernels.cpu_flags()
    assert k.simd.startswith("AVX2+FMA+F16C, AVX-512 VNNI") == vnni, k.simd
    assert (k.simd == "AVX2+FMA+F16C, AVX-512 VNNI, AMX int8") == amx, k.simd
    assert k.has_gemm == vnni and k.amx <= amx  # (tiles where Linux grants them: kernels before 5.16 do not)
    with settings.override(cpu_amx=False):
        assert not k.gemm_tiles


@pytest.fixture(params=[1, 2])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def quantize_activations_reference(x, split):
    """Per 64-column block: s = max|x| / 127 (fp32), q = round_half_even(x * (1 / s)); padding is zero."""
    m, k = x.shape
    nb = (k + QB - 1) // QB
    blocks = torch.zeros(m, nb * QB).index_copy_(1, torch.arange(k), x).view(m, nb, QB)
    s = blocks.abs().amax(-1) / 127
    inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
    q = torch.round(blocks * inv[..., None]).clamp(-127, 127).to(torch.int8)
    if split:
        q = torch.cat([q[..., 0::2], q[..., 1::2]], -1)
    return q.reshape(m, nb * QB), s


def _data(shape, seed, outliers=True):
    m, k, n = shape
    g = torch.Generator().manual_seed(seed)
    w, x, bias = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    if outliers and k > 8:  # ChatGLM's activations have a few large channels
        x[:, 3] *= 40
        x[:, k // 2] = 0  # and exact zeros, and an all-zero row
    if m > 2:
        x[1] = 0
    return w, x, bias


def _check(y, ref, terms_abs, rel=1e-5):
    y = y.double()
    bound = rel * terms_abs + 1e-6
    assert y.shape == ref.shape
    assert ((y - ref).abs() <= bound).all(), ((y - ref).abs() - bound).max()


@pytest.mark.parametrize("k", [1, 2, 63, 64, 65, 130, 4096, 13696])
@pytest.mark.parametrize("split", [0, 1])
def test_activation_quantization_bit_exact(kernel, k, split):
    k += split * (k % 2)  # the INT4 order needs an even width
    g = torch.Generator().manual_seed(k)
    x = torch.randn(3, k, generator=g) * torch.logspace(-3, 3, 3)[:, None]
    x[0, 0] = 0.5 * (x[0, : min(k, 64)].abs().max() / 127) * 3  # a value at exactly x.5 steps
    q, d = kernel.quantize_activations(x, split)
    q_ref, d_ref = quantize_activations_reference(x, split)
    assert torch.equal(d, d_ref)
    assert torch.equal(q, q_ref)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantized_kernels(kernel, threads, bits, shape):
    m, k, n = shape
    w, x, bias = _data(shape, hash((bits, shape)) % 2**31)
    q, scale = quantize_weight(w, bits)
    wq = dequantize(q, scale, bits).double()  # exact: the weight the kernels see
    # the int8-activation kernel against its exact emulation, then against the unrounded float reference
    y = kernel.linear(x, q, scale.float(), bits, bias, quantize_activations=True)
    qx, d = quantize_activations_reference(x, split=0)
    xq = (qx.double().view(m, -1, QB) * d.double()[..., None]).view(m, -1)[:, :k]
    _check(y, xq @ wq.t() + bias.double(), xq.abs() @ wq.abs().t() + bias.double().abs())
    ref = x.double() @ wq.t() + bias.double()
    half_step = (d.double()[..., None] / 2).expand(m, -1, QB).reshape(m, -1)[:, :k]  # |x - xq| <= step / 2
    assert (
        (y.double() - ref).abs() <= half_step @ wq.abs().t() + 1e-5 * (x.double().abs() @ wq.abs().t()) + 1e-5
    ).all()
    _, x_plain, _ = _data(shape, 1, outliers=False)
    y = kernel.linear(x_plain, q, scale.float(), bits, None, quantize_activations=True)
    ref_plain = x_plain.double() @ wq.t()
    assert (y.double() - ref_plain).norm() <= 1.5e-2 * ref_plain.norm()
    # the fp32-activation kernel: exact products
    y = kernel.linear(x, q, scale.float(), bits, bias, quantize_activations=False)
    _check(y, ref, x.double().abs() @ wq.abs().t() + bias.double().abs())
    # without bias
    y = kernel.linear(x, q, scale.float(), bits, None, quantize_activations=True)
    _check(y, xq @ wq.t(), xq.abs() @ wq.abs().t())


@pytest.mark.parametrize("amx", [True, False])  # the AMX kernels where there are (settings.cpu_amx), or the VNNI ones
@pytest.mark.parametrize("bits", [8, 4])
# VNNI: (4096, 37), (192, 16), (4160, 24) the lanes kernels at every row count (a last group of 5 rows, an odd
# block count); (256, 40) the block-sum kernels for 1-2 rows (1-3 on AMX for INT4), then the lanes (or the tiles)
@pytest.mark.parametrize("k, n", [(4096, 37), (192, 16), (4160, 24), (256, 40)])
def test_quantized_kernels_give_each_row_its_bits_alone(kernel, threads, amx, bits, k, n):
    """The engine decodes the rows of several requests in one call: each row must get exactly the bits it gets in a
    call of its own, at every batch size up to the rows from which prefill takes a GEMM (quantization/ops.py)."""
    from quantization.ops import LANES_GEMM_MIN_ROWS

    rows = LANES_GEMM_MIN_ROWS - 1
    w, x, bias = _data((rows, k, n), bits * k + n)
    q, scale = quantize_weight(w, bits)
    with settings.override(cpu_amx=amx):
        alone = torch.cat([kernel.linear(x[i : i + 1], q, scale.float(), bits, bias) for i in range(rows)])
        for m in (2, 3, 4, 5, 8, 9, 16, 17, 31, rows):
            assert torch.equal(kernel.linear(x[:m], q, scale.float(), bits, bias), alone[:m]), m


GEMM_SHAPES = [
    (1, 64, 4),
    (7, 128, 40),  # padding x rows (tiles of 6) and a panel of 32 + 8 weight rows
    (12, 4160, 100),  # 65 blocks; panels of 32, the last one 4 rows
    (6, 8192, 33),  # two passes over k (4096 columns per packed panel); one row in the last panel's first half
    (40, 13696, 70),  # ChatGLM2's dense_4h_to_h width: four passes, the last 1408 columns
    (32, 256, 48),  # a last panel of 16 rows: its second half all padding
    (150, 192, 20),  # AMX: two passes of 128 x rows, the last tile 6 rows; 3 blocks (odd, for the pipelined steps)
]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", GEMM_SHAPES)
def test_quantized_gemm(kernel, threads, bits, shape):
    """The GEMM for many rows (AVX-512 VNNI builds): the q kernels' integer sums per block, so within fp32
    accumulation of their exact emulation, and each row exactly what linear() gives it alone (so a prompt's KV
    cache is the same prefilled whole, in chunks or row by row); on AMX tiles INT4 also the VNNI GEMM's bits;
    other builds have none."""
    m, k, n = shape
    w, x, bias = _data(shape, hash(("gemm", bits, shape)) % 2**31)
    q, scale = quantize_weight(w, bits)
    if not kernel.has_gemm:
        assert kernel.gemm(x, q, scale.float(), bits, bias) is None
        return
    wq = dequantize(q, scale, bits).double()
    qx, d = quantize_activations_reference(x, split=0)
    xq = (qx.double().view(m, -1, QB) * d.double()[..., None]).view(m, -1)[:, :k]
    for b in (bias, None):
        y = kernel.gemm(x, q, scale.float(), bits, b)
        bd = torch.zeros(n, dtype=torch.float64) if b is None else b.double()
        _check(y, xq @ wq.t() + bd, xq.abs() @ wq.abs().t() + bd.abs())
        fused = kernel.linear(x, q, scale.float(), bits, b, quantize_activations=True)
        _check(y, fused.double(), xq.abs() @ wq.abs().t() + bd.abs(), rel=2e-5)
        if bits == 4 or not kernel.gemm_tiles:  # INT4 on AMX tiles: the VNNI GEMM's bits (INT8 there: signed sums)
            assert torch.equal(kernel.gemm(x, q, scale.float(), bits, b, tiles=False), y)
        # and every row the bits of the row kernels, alone (AVX-512 VNNI: the block-sum and lanes kernels; AMX
        # tiles: their row kernels)
        alone = torch.cat([kernel.linear(x[i : i + 1], q, scale.float(), bits, b) for i in range(m)])
        assert torch.equal(y, alone)
        if not kernel.gemm_tiles:
            assert torch.equal(kernel.linear(x, q, scale.float(), bits, b), y)  # and in a batch of all m rows
    assert kernel.gemm(x[:, :-1].contiguous(), q[:, : q.shape[1] - 1], scale.float(), bits) is None  # k % 64


@pytest.fixture(scope="module")
def vnni_kernel():
    """A build with the AVX-512 VNNI kernels where this CPU runs them (-march=native), else None."""
    k = kernels.build_cpu_kernel("native") if "avx512_vnni" in kernels.cpu_flags() else None
    return k if k is not None and k.has_gemm else None


@pytest.mark.parametrize("bits", [8, 4])
# 48 x 4096: three groups of 16 rows; 16 x 192: one, 3 blocks (odd); 32 x 4160: 65 blocks, the GEMM's panel of 32;
# 64 x 13696: ChatGLM2's dense_4h_to_h width (the GEMM's four passes over k)
@pytest.mark.parametrize("m, k, n", [(9, 4096, 48), (17, 192, 16), (70, 4160, 32), (3, 13696, 64)])
def test_lanes16_layout_gets_the_same_bits_at_every_row_count(kernel, vnni_kernel, threads, bits, m, k, n):
    """The kernels' own weight layout (quantization.ops.to_lanes16; AVX-512 VNNI and AVX2 builds): a permutation of
    THUDM's bytes that from_lanes16 undoes, in which a row gets the same bits alone and in any batch (prompts take it
    too), within fp32 accumulation of the exact emulation. Those bits are the VNNI build's: on VNNI the bits THUDM's
    layout gets there from the row kernels and the GEMM; on AVX2 the same again (exact integer sums per block, the
    same fp32 steps), checked against the VNNI build where this CPU runs it (THUDM's layout keeps its own bits on
    AVX2). The portable build, and shapes it does not cover, are refused."""
    from quantization.ops import from_lanes16, to_lanes16

    w, x, bias = _data((m, k, n), bits * k + n + m)
    q, scale = quantize_weight(w, bits)
    p, s = to_lanes16(q), scale.float()
    assert p.shape == q.shape and torch.equal(from_lanes16(p), q) and not torch.equal(p, q)
    # row 16 * g + i's bytes 4 * j .. 4 * j + 3 sit at group g, dword j, lane i
    assert torch.equal(p.view(n // 16, -1, 16, 4)[n // 16 - 1, 2, 5], q[n - 16 + 5, 8:12])
    if not kernel.packed_layout:
        with pytest.raises(ValueError, match="lanes16"):
            kernel.linear(x, p, s, bits, bias, packed=True)
        return
    with pytest.raises(ValueError, match="lanes16"):  # rows not a multiple of 16
        kernel.linear(x, p[: n - 8], s[: n - 8], bits, packed=True)
    qx, d = quantize_activations_reference(x, split=0)
    xq = (qx.double().view(m, -1, QB) * d.double()[..., None]).view(m, -1)[:, :k]
    # and every byte, which quantize_weight never writes: INT8 -128, INT4 nibbles of -8 (the widest int16 sums)
    every_byte = torch.randint(-128, 128, q.shape, dtype=torch.int8, generator=torch.Generator().manual_seed(m))
    for q, b in ((q, bias), (q, None), (every_byte, bias)):
        p, wq = to_lanes16(q), dequantize(q, scale, bits).double()
        y = kernel.linear(x, p, s, bits, b, packed=True)
        bd = torch.zeros(n, dtype=torch.float64) if b is None else b.double()
        _check(y, xq @ wq.t() + bd, xq.abs() @ wq.abs().t() + bd.abs())
        for r in sorted({1, 2, 3, 4, 5, 8, 9, m}):
            if r <= m:
                assert torch.equal(kernel.linear(x[:r], p, s, bits, b, packed=True), y[:r]), r
        assert torch.equal(torch.cat([kernel.linear(x[i : i + 1], p, s, bits, b, packed=True) for i in range(m)]), y)
        if kernel.has_gemm:  # VNNI: THUDM's layout's bits, from the row kernels and from the GEMM
            assert torch.equal(kernel.linear(x, q, s, bits, b), y)
            assert torch.equal(kernel.gemm(x, q, s, bits, b, tiles=False), y)
        elif vnni_kernel is not None:  # AVX2: the VNNI build's bits
            assert torch.equal(vnni_kernel.linear(x, p, s, bits, b, packed=True), y)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n, k", [(37, 4096), (5, 2), (9, 130)])
def test_dequantize_bf16_is_the_reference_rounded(kernel, threads, bits, n, k):
    g = torch.Generator().manual_seed(n * k + bits)
    q, scale = quantize_weight(torch.randn(n, k, generator=g), bits)
    ref = dequantize(q, scale, bits).to(torch.bfloat16)  # fp32 products, rounded to nearest even
    assert torch.equal(kernel.dequantize_bf16(q, scale.float(), bits), ref)
    buf = torch.full((n * k + 3,), 7.0, dtype=torch.bfloat16)  # rows [2, n) into a reused buffer
    part = kernel.dequantize_bf16(q, scale.float(), bits, 2, n, out=buf)
    assert part.data_ptr() == buf.data_ptr() and torch.equal(part, ref[2:])


def test_int8_kernel_takes_minus_128(kernel):
    """THUDM's quantizer never writes -128, but a checkpoint could: |w| * sign(x, w) handles it exactly."""
    q = torch.full((5, 128), -128, dtype=torch.int8)
    q[1] = 127
    x = torch.full((1, 128), -127.0)
    y = kernel.linear(x, q, torch.ones(5), 8, quantize_activations=True)
    assert torch.equal(y, (x.double() @ q.double().t()).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES + [(1, 4096, 65), (4, 33, 130)])
def test_float_linear(kernel, threads, dtype, shape):
    w, x, bias = _data(shape, hash((str(dtype), shape)) % 2**31)
    wh = w.to(dtype)
    if dtype == torch.float16:  # subnormals, infinities' neighbours and signed zeros go through the conversion
        wh.view(-1)[:4] = torch.tensor([6e-8, -3e-5, 65504.0, -0.0], dtype=dtype)
    ref = x.double() @ wh.double().t()
    terms = x.double().abs() @ wh.double().abs().t()
    _check(kernel.float_linear(x, wh), ref, terms)
    _check(kernel.float_linear(x, wh, bias.to(dtype)), ref + bias.to(dtype).double(), terms + bias.double().abs())
    with pytest.raises(TypeError):
        kernel.float_linear(x, w.double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k, n", [(64, 8), (100, 7), (4098, 13)])  # tails of k (16 columns a step), of n (4 rows)
def test_float_linear_gives_each_row_its_bits_alone(kernel, threads, dtype, k, n):
    """A decode batch through float_linear: every row the bits it gets in a call of its own (the engine's promise
    that a reply does not depend on the requests beside it; torch's sgemm does not keep it for fp32)."""
    w, x, bias = _data((70, k, n), k + n)
    w = w.to(dtype)
    alone = torch.cat([kernel.float_linear(x[i : i + 1], w, bias) for i in range(x.shape[0])])
    for m in (2, 3, 8, 17, 70):
        assert torch.equal(kernel.float_linear(x[:m], w, bias), alone[:m]), m


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 300])
def test_fast_linear_matches_f_linear(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(70, 300, generator=g).to(dtype), torch.randn(70, generator=g).to(dtype)
    x = torch.randn(rows, 300, generator=g).to(dtype)
    y = fast_linear(x, w, b)
    assert y.dtype == dtype and y.shape == (rows, 70)
    ref = x.double() @ w.double().t() + b.double()
    # fp32 accumulation, then one rounding to x's dtype (as F.linear)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-10}[dtype]
    assert ((y.double() - ref).abs() <= tol * (ref.abs() + 1) + 1e-4 * ref.abs().max()).all()
    if rows > 16 and (dtype == torch.float32 or native_half_gemm(dtype)):
        assert torch.equal(y, F.linear(x, w, b))  # prefill that torch's matmul takes: exactly torch
    elif rows <= 16 and kernels.get_cpu_kernel() is not None:  # decode batches: each row its bits alone
        assert torch.equal(y, torch.cat([fast_linear(x[i : i + 1], w, b) for i in range(rows)]))
    # 3-d input and fp32 activations with bf16 weights (the output layer of a bf16 model fed fp32)
    y3 = fast_linear(x.float().view(1, rows, 300), w, b)
    assert y3.shape == (1, rows, 70) and y3.dtype == torch.float32
    assert torch.allclose(y3[0].double(), ref, atol=1e-3 * ref.abs().max().item())


def test_fast_linear_keeps_autograd():
    w = torch.randn(8, 16).bfloat16().requires_grad_()
    x = torch.randn(2, 16).bfloat16()
    fast_linear(x, w).float().sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape


def test_float_activations_env(monkeypatch):
    kernel = kernels.get_cpu_kernel()
    if kernel is None:
        pytest.skip("the CPU kernels could not be built here (gcc missing)")
    w, x, bias = _data((1, 256, 8), 0)
    q, scale = quantize_weight(w, 4)
    monkeypatch.setattr(settings, "cpu_float_activations", True)
    a = kernel.linear(x, q, scale.float(), 4, bias)
    assert torch.equal(a, kernel.linear(x, q, scale.float(), 4, bias, quantize_activations=False))
    ref = quantized_linear_reference(x.double(), q, scale, 4, bias.double())
    _check(a, ref, x.double().abs() @ dequantize(q, scale, 4).double().abs().t() + bias.double().abs())


def _in_a_fresh_process(code: str) -> str:
    """The standard output of `code` run by a new Python process at the repository's root."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True).stdout


def test_one_openmp_runtime():
    """torch ships its own libgomp; ours must bind to the same one (one thread pool). Checked in a fresh process
    (other libraries, e.g. sentencepiece's wheel, bring their own runtime into this one)."""
    code = (
        "import torch, kernels\n"
        "k = kernels.get_cpu_kernel()\n"
        "k.linear(torch.randn(1, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8), 8)\n"
        "print(k.openmp, kernels.openmp_runtimes())\n"
    )
    openmp, runtimes = _in_a_fresh_process(code).strip().split(" ", 1)
    if openmp != "True":
        pytest.skip("no OpenMP build here")
    runtimes = ast.literal_eval(runtimes)
    if not runtimes:
        pytest.skip("/proc/self/maps is not readable here")
    assert len(runtimes) == 1, runtimes
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    if any(name.startswith("libgomp") for name in os.listdir(torch_lib)):
        assert os.path.dirname(runtimes[0]) == torch_lib  # torch's own, not the system's


def test_small_calls_stay_on_the_calling_thread():
    """A kernel call with little work (a tiny model's layers) runs without OpenMP workers: in a fresh process,
    small float and INT8 linears and a short attention start no thread; one 6B-sized layer does (2+ cpus).
    Checked in a fresh process: /proc/self/task counts its threads."""
    code = (
        "import os, torch, kernels\n"
        "torch.set_num_threads(2)\n"
        "k = kernels.get_cpu_kernel()\n"
        "n = lambda: len(os.listdir('/proc/self/task'))\n"
        "before = n()\n"
        "for _ in range(3):\n"
        "    k.float_linear(torch.randn(1, 64), torch.randn(640, 64))\n"
        "    k.linear(torch.randn(1, 64), torch.zeros(128, 64, dtype=torch.int8), torch.ones(128), 8)\n"
        "    k.attention_decode(torch.randn(1, 64), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16), 4, 0.25)\n"
        "small = n()\n"
        "k.float_linear(torch.randn(1, 4096), torch.randn(4608, 4096))\n"
        "print(k.openmp, before, small, n())\n"
    )
    openmp, before, small, big = _in_a_fresh_process(code).split()
    if openmp != "True" or (os.cpu_count() or 1) < 2:
        pytest.skip("no OpenMP build or one cpu here")
    assert int(small) == int(before) < int(big)


def test_release_openmp_threads(kernel, threads):
    """The engine's attaching thread hands back its OpenMP workers (kernels.release_openmp_threads): every runtime
    loaded does, and the next parallel regions, in this thread and in another, start new workers and compute as
    before (torch's ops and our kernels)."""
    from kernels import openmp_runtimes, release_openmp_threads

    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(8, 65536, generator=g), torch.randint(-127, 128, (256, 4096), dtype=torch.int8, generator=g)
    xk, scale = torch.randn(8, 4096, generator=g), torch.rand(256, generator=g)
    expect = (torch.nn.functional.silu(x), kernel.linear(xk, w, scale, 8))
    assert release_openmp_threads() == len(openmp_runtimes())
    results = []
    worker = threading.Thread(
        target=lambda: results.append((torch.nn.functional.silu(x), kernel.linear(xk, w, scale, 8)))
    )
    worker.start()
    worker.join()
    for got in (results[0], (torch.nn.functional.silu(x), kernel.linear(xk, w, scale, 8))):
        assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])


# --- decode helpers (rms_norm, rotary, single-query attention, silu * up) against the torch code they replace --


@pytest.mark.parametrize("n", [1, 7, 64, 4096, 4099])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_helper(kernel, n, wdtype):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=g) * 5
    x[1] = 0  # an all-zero row stays zero (eps keeps the scale finite)
    w = torch.randn(n, generator=g).to(wdtype)
    ref = F.rms_norm(x.double(), (n,), w.double(), 1e-5)
    y = kernel.rms_norm(x, w, 1e-5)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.allclose(y.double(), ref, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize(("rows", "heads", "head_dim", "rot"), [(1, 34, 128, 64), (5, 3, 8, 8), (2, 2, 6, 2)])
def test_rotary_helper_equals_apply_rotary(kernel, rows, heads, head_dim, rot):
    from chatglm.layers import apply_rotary

    g = torch.Generator().manual_seed(rows * heads)
    width = heads * head_dim + 11  # a row holds more than the rotated heads (v follows q and k)
    buf = torch.randn(rows, width, generator=g)
    angles = torch.rand(rows, rot // 2, generator=g) * 50
    cs = torch.stack([angles.cos(), angles.sin()], -1).contiguous()
    ref = apply_rotary(buf[:, : heads * head_dim].view(1, rows, heads, head_dim), cs.view(1, rows, rot // 2, 2))
    out = kernel.rotary_(buf.clone(), rows, width, heads, head_dim, cs)
    assert torch.allclose(out[:, : heads * head_dim].view(1, rows, heads, head_dim), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[:, heads * head_dim :], buf[:, heads * head_dim :])  # the rest is untouched


@pytest.mark.parametrize(
    ("b", "heads", "groups", "t", "d"),
    # ChatGLM2/3 (16 heads a group), ChatGLM-6B (one head a group), the tiny models (2), odd sizes
    [
        (1, 32, 2, 300, 128),
        (1, 32, 32, 130, 128),
        (3, 4, 2, 37, 16),
        (2, 4, 4, 1, 16),
        (2, 6, 3, 37, 12),
        (2, 3, 1, 5, 24),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_decode_helper(kernel, threads, b, heads, groups, t, d, dtype):
    """fp32 or bf16 q, k, v (a bf16 model's activations and cache, read as they are): computed in fp32, close to
    a float64 reference on the same values."""
    from chatglm.kv_cache import KVCache
    from chatglm.layers import decode_attention

    g = torch.Generator().manual_seed(t + heads)
    cache = KVCache.empty(1, t + 9)  # strided views into a preallocated cache, as decode sees them
    k, v = cache.append(0, (torch.randn(b, groups, t, d, generator=g) * 3).to(dtype),
                        torch.randn(b, groups, t, d, generator=g).to(dtype))  # fmt: skip
    qkv = torch.randn(b, heads * d + 2 * groups * d, generator=g).to(dtype)  # q first in the row, as in the projection
    q = qkv[:, : heads * d].view(b, heads, 1, d)
    ref = decode_attention(q.double(), k.double(), v.double()).reshape(b, heads * d)
    out = kernel.attention_decode(qkv, k, v, heads, d**-0.5)
    assert out.shape == (b, heads * d) and out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)
    if dtype == torch.bfloat16:
        with pytest.raises(ValueError, match="all fp32 or all bf16"):
            kernel.attention_decode(qkv.float(), k, v, heads, d**-0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_decode_rows_at_their_own_lengths(kernel, threads, dtype):
    """With `lengths` each row attends to its own first keys and gets the bits it gets alone (a call over exactly
    its keys), close to the reference."""
    from chatglm.layers import decode_attention

    b, heads, groups, t, d = 3, 8, 2, 41, 32
    g = torch.Generator().manual_seed(7)
    k, v = (torch.randn(b, groups, t, d, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(b, heads * d, generator=g).to(dtype)
    lengths = torch.tensor([17, 41, 1], dtype=torch.int32)
    out = kernel.attention_decode(q, k, v, heads, d**-0.5, lengths)
    for r, n in enumerate(lengths.tolist()):
        alone = kernel.attention_decode(q[r : r + 1], k[r : r + 1, :, :n], v[r : r + 1, :, :n], heads, d**-0.5)
        assert torch.equal(out[r : r + 1], alone)
        kr, vr = k[r : r + 1, :, :n].double(), v[r : r + 1, :, :n].double()
        ref = decode_attention(q[r : r + 1].view(1, heads, 1, d).double(), kr, vr).reshape(1, heads * d)
        assert torch.allclose(out[r : r + 1].double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="int32 lengths"):
        kernel.attention_decode(q, k, v, heads, d**-0.5, lengths.long())


@pytest.mark.parametrize("f", [1, 8, 13, 13696])
def test_silu_mul_helper(kernel, f):
    g = torch.Generator().manual_seed(f)
    h = torch.randn(3, 2 * f, generator=g) * 8
    h[0, 0] = -95.0  # far tails: exp's clamp
    h[0, -1] = 95.0
    ref = F.silu(h[:, :f].double()) * h[:, f:].double()
    out = kernel.silu_mul(h)
    assert out.shape == (3, f)
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1, 7, 8, 640, 65024])
def test_greedy_helper_is_torch_argmax_and_isfinite_row_by_row(kernel, n):
    """kernel.greedy: each row's torch.argmax over its first `limit` columns (the first maximum; the first NaN when
    there is one) and whether the whole row is finite, rows at a stride, SIMD and tail elements alike."""
    g = torch.Generator().manual_seed(n)
    big = torch.randn(9, n + 5, generator=g)
    s = big[:, :n]  # rows n + 5 apart
    s[1, n // 2] = float("nan")  # a NaN: argmax takes it
    s[1, n - 1] = float("nan")
    s[2, -1] = float("inf")
    s[3] = float("-inf")  # all -inf: index 0
    s[4] = 0.0
    s[4, n // 3] = s[4, n - 1] = 5.0  # a tie: the first
    s[5, -1] = float("-inf")  # -inf is not finite either
    s[6] = -0.0
    s[6, -1] = 0.0  # signed zeros are equal: index 0
    s[7, n - 1] = 1e30  # the maximum in the tail
    for limit in {None, n, max(1, n - 3), 1}:
        ids, finite = kernel.greedy(s, limit)
        part = s if limit is None else s[:, :limit]
        assert ids == part.argmax(dim=-1).tolist(), limit
        assert finite == torch.isfinite(s).all(dim=-1).tolist()
    with pytest.raises(ValueError, match="fp32"):
        kernel.greedy(s.double())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_glm2_decode_with_helpers_equals_torch_path(tiny_dirs, monkeypatch, dtype):
    """The tiny v2 model decodes with close logits (fp32: the same greedy tokens) with the kernel modules and with
    their torch references swapped back (chatglm/layers.py). bf16: on a CPU with native bf16 matmuls the
    activations and cache stay bf16 and the decode attention reads them as they are (elsewhere they are fp32)."""
    import chatglm
    from chatglm import layers

    model = chatglm.load_model(str(tiny_dirs["v2"]), dtype=dtype).eval()
    ids = torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    forced = torch.randint(5, 100, (5, 2, 1), generator=torch.Generator().manual_seed(1))  # bf16: the same inputs

    def run():
        from chatglm.kv_cache import KVCache

        logits, tokens, cache = [], ids, KVCache.empty(len(model.transformer.encoder.layers), 32)
        with torch.inference_mode():
            for i in range(5):
                out = model(tokens, past_key_values=cache, return_last_logit=True)
                cache = out.past_key_values
                logits.append(out.logits[:, -1].float())
                tokens = out.logits[:, -1:].argmax(-1) if dtype == "fp32" else forced[i]
        return torch.stack(logits)

    if kernels.get_cpu_kernel() is None:
        pytest.skip("the CPU kernels could not be built here (gcc missing)")
    used = []
    real = layers.cpu_kernel_for
    monkeypatch.setattr(layers, "cpu_kernel_for", lambda x, *also: used.append(real(x, *also)) or used[-1])
    fast = run()
    if dtype == "fp32":
        assert used and all(k is not None for k in used)  # every helper site took the C path
    else:  # bf16 activations: the decode attention (norms, rotary, SwiGLU: torch's); fp32 ones: every site
        assert any(k is not None for k in used)
    used.clear()
    layers.use_kernels(model, False)
    slow = run()
    assert not used  # the references never ask for a kernel
    if dtype == "fp32":
        assert torch.equal(fast.argmax(-1), slow.argmax(-1))
        assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-4)
    else:  # bf16 rounding of activations on both paths, in different places
        assert (fast - slow).abs().max() <= 0.05 * slow.abs().max()


def test_cpu_isa_switch_is_read_once_and_checked():
    """CHATGLM_CPU_ISA forces a build (and, off "native", a CPU without native half GEMM); a bad value is one
    clear error."""
    code = (
        "import torch, kernels; k = kernels.get_cpu_kernel();"
        "print(kernels.cpu_isa(), k and k.isa, k and k.simd, kernels.native_half_gemm(torch.bfloat16), sep='|')"
    )
    env = {**os.environ, "CHATGLM_CPU_ISA": "portable"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    isa, built, simd, native = out.strip().split("|")
    assert isa == "portable" and native == "False"
    assert (built, simd) in (("portable", "portable C"), ("None", "None"))  # None only where gcc is missing
    env["CHATGLM_CPU_ISA"] = "avx9"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "CHATGLM_CPU_ISA='avx9' is not one of native, avx2, portable" in proc.stderr
