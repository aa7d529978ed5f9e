"""The CPU kernels (kernels/quantization_kernels.c) against PyTorch references, in both builds.

Builds: the default one (-march=native: AVX2/FMA/F16C intrinsics where the CPU has them) and the portable one
(-DCHATGLM_PORTABLE: plain C, what a CPU without AVX2 runs). Tolerances:
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

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import native_half_gemm
from quantization import fast_linear, quantize_weight
from quantization.ops import dequantize, quantized_linear_reference

QB = kernels.QBLOCK
SHAPES = [(1, 64, 4), (1, 4096, 37), (2, 130, 9), (3, 4098, 13), (5, 13696, 6), (16, 200, 7), (17, 96, 5), (1, 2, 3)]


@pytest.fixture(scope="module", params=["native", "portable"])
def kernel(request):
    k = kernels.get_cpu_kernel() if request.param == "native" else kernels.build_cpu_kernel(portable=True)
    if k is None:
        pytest.skip("the CPU kernels could not be built here (gcc missing)")
    if request.param == "portable":
        assert k.simd == "portable C"
    return k


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


def test_int8_kernel_takes_minus_128(kernel):
    """THUDM's quantizer never writes -128, but a checkpoint could: |w| * sign(x, w) handles it exactly."""
    q = torch.full((5, 128), -128, dtype=torch.int8)
    q[1] = 127
    x = torch.full((1, 128), -127.0)
    y = kernel.linear(x, q, torch.ones(5), 8, quantize_activations=True)
    assert torch.equal(y, (x.double() @ q.double().t()).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES + [(1, 4096, 65), (4, 33, 130)])
def test_half_linear(kernel, threads, dtype, shape):
    w, x, bias = _data(shape, hash((str(dtype), shape)) % 2**31)
    wh = w.to(dtype)
    if dtype == torch.float16:  # subnormals, infinities' neighbours and signed zeros go through the conversion
        wh.view(-1)[:4] = torch.tensor([6e-8, -3e-5, 65504.0, -0.0], dtype=dtype)
    ref = x.double() @ wh.double().t()
    terms = x.double().abs() @ wh.double().abs().t()
    _check(kernel.half_linear(x, wh), ref, terms)
    _check(kernel.half_linear(x, wh, bias.to(dtype)), ref + bias.to(dtype).double(), terms + bias.double().abs())
    with pytest.raises(TypeError):
        kernel.half_linear(x, w)


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
    if dtype == torch.float32 or (rows > 16 and native_half_gemm(dtype)):
        assert torch.equal(y, F.linear(x, w, b))  # not the kernel's business: exactly torch
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
    monkeypatch.setenv("CHATGLM_CPU_FLOAT_ACTIVATIONS", "1")
    a = kernel.linear(x, q, scale.float(), 4, bias)
    assert torch.equal(a, kernel.linear(x, q, scale.float(), 4, bias, quantize_activations=False))
    ref = quantized_linear_reference(x.double(), q, scale, 4, bias.double())
    _check(a, ref, x.double().abs() @ dequantize(q, scale, 4).double().abs().t() + bias.double().abs())


def test_one_openmp_runtime():
    """torch ships its own libgomp; ours must bind to the same one (one thread pool). Checked in a fresh process
    (other libraries, e.g. sentencepiece's wheel, bring their own runtime into this one)."""
    code = (
        "import torch, kernels\n"
        "k = kernels.get_cpu_kernel()\n"
        "k.linear(torch.randn(1, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8), 8)\n"
        "print(k.openmp, kernels.openmp_runtimes())\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    openmp, runtimes = out.stdout.strip().split(" ", 1)
    if openmp != "True":
        pytest.skip("no OpenMP build here")
    runtimes = ast.literal_eval(runtimes)
    if not runtimes:
        pytest.skip("/proc/self/maps is not readable here")
    assert len(runtimes) == 1, runtimes
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    if any(name.startswith("libgomp") for name in os.listdir(torch_lib)):
        assert os.path.dirname(runtimes[0]) == torch_lib  # torch's own, not the system's
