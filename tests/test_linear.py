"""The models' Linear: same parameters as nn.Linear, CPU fast paths equal to an fp32 reference."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chatglm
from chatglm.layers import Linear
from kernels import native_half_gemm
from kernels.settings import settings
from quantization.ops import fast_linear


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_float_linear_matches_fp32_reference(dtype, rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(37, 70, generator=g) * 0.1).to(dtype)
    b = (torch.randn(37, generator=g) * 0.1).to(dtype) if bias else None
    x = torch.randn(rows, 70, generator=g).to(dtype)
    ref = F.linear(x.float(), w.float(), b.float() if bias else None)
    with torch.no_grad():
        y = fast_linear(x, w, b)
    assert y.dtype == dtype and y.shape == (rows, 37)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # one rounding of the output to the half type
    assert torch.allclose(y.float(), ref, atol=tol, rtol=tol)


def test_linear_is_an_nn_linear_and_trains():
    layer = Linear(8, 4, dtype=torch.bfloat16)
    assert isinstance(layer, nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(20, 8, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()  # autograd takes the plain F.linear path
    assert layer.weight.grad is not None and x.grad.shape == x.shape
    assert isinstance(native_half_gemm(torch.bfloat16), bool)


def test_bf16_tiny_model_close_to_its_fp32_self(tiny_dirs):
    path = str(tiny_dirs["v2"])
    fp32 = chatglm.load_model(path, dtype=torch.float32)
    bf16 = chatglm.load_model(path, dtype=torch.bfloat16)
    ids = torch.randint(10, fp32.config.padded_vocab_size, (2, 24))
    with torch.no_grad():
        ref = fp32(ids).logits
        prefill = bf16(ids).logits.float()  # 48 rows: the prefill path
        step = bf16(ids[:, :1]).logits.float()  # 2 rows: the GEMV path
    assert (prefill - ref).abs().max() < 0.05 * ref.abs().max()
    assert (step - ref[:, :1]).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_prefill_in_bf16_matches_reference(bits):
    from quantization.ops import CPU_CHUNK_ROWS, quantize_weight, quantized_linear, quantized_linear_reference

    g = torch.Generator().manual_seed(bits)
    q, scale = quantize_weight(torch.randn(48, 64, generator=g), bits)
    bias = torch.randn(48, generator=g).bfloat16()
    x = torch.randn(CPU_CHUNK_ROWS + 9, 64, generator=g).bfloat16()  # a long prefill: two chunks of rows
    with torch.no_grad():
        y = quantized_linear(x, q, scale, bits, bias)
    ref = quantized_linear_reference(x.float(), q, scale, bits, bias.float())
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    # int8 activations per 64 columns (~0.5% relative) plus one bf16 rounding of the output
    assert (y.float() - ref).abs().max() <= 0.02 * ref.abs().max()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_bytes", [1 << 24, 3 * 2 * 64])  # the whole weight at once; blocks of 3 rows
def test_dequantized_gemm_takes_many_rows_on_native_bf16(monkeypatch, bits, dtype, block_bytes):
    """On a CPU with native bf16 matmuls and no INT8 GEMM of ours, GEMM_MIN_ROWS rows or more run
    dequantize-to-bf16 + torch's GEMM (forced here on any CPU: torch's bf16 matmul runs everywhere); fewer rows
    stay on the fused kernel."""
    import kernels
    from quantization import ops

    if kernels.get_cpu_kernel() is None:
        pytest.skip("the CPU kernels could not be built here")
    calls = []
    real = ops.dequantized_gemm
    monkeypatch.setattr(ops, "dequantized_gemm", lambda *a: calls.append(a[1].shape) or real(*a))
    monkeypatch.setattr(ops, "native_half_gemm", lambda dt: dt == torch.bfloat16)
    monkeypatch.setattr(kernels.get_cpu_kernel(), "has_gemm", False)
    monkeypatch.setattr(ops, "DEQUANT_GEMM_BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(bits)
    q, scale = ops.quantize_weight(torch.randn(47, 64, generator=g), bits)
    bias = torch.randn(47, generator=g)
    for rows in (ops.GEMM_MIN_ROWS - 1, ops.GEMM_MIN_ROWS, 300):
        x = torch.randn(rows, 64, generator=g).to(dtype).view(1, rows, 64)
        with torch.no_grad():
            y = ops.quantized_linear(x, q, scale, bits, bias)
        ref = ops.quantized_linear_reference(x.double(), q, scale, bits, bias.double())
        assert y.dtype == dtype and y.shape == ref.shape
        assert (y.double() - ref).abs().max() <= 0.02 * ref.abs().max()  # bf16 x and output (or int8 x)
    assert calls == [(1, ops.GEMM_MIN_ROWS, 64), (1, 300, 64)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_gemm_takes_many_rows_where_the_kernel_has_it(monkeypatch, bits, dtype):
    """With an AVX-512 VNNI build (on AMX CPUs: with the tiles), gemm_min_rows rows or more (in chunks of
    GEMM_CHUNK_ROWS) go through our INT8 GEMM; fewer rows, settings.cpu_quantized_gemm off, fp32 activations asked
    for, or a width that is not a multiple of 64 stay on the fused kernel."""
    import kernels
    from quantization import ops

    kernel = kernels.get_cpu_kernel()
    if kernel is None or not kernel.has_gemm:
        pytest.skip("no INT8 GEMM in this build (AVX-512 VNNI CPUs only)")
    calls = []
    real = kernels.CpuKernel.gemm
    monkeypatch.setattr(
        kernels.CpuKernel, "gemm", lambda self, x, *a: calls.append(tuple(x.shape)) or real(self, x, *a)
    )
    monkeypatch.setattr(ops, "GEMM_CHUNK_ROWS", 128)
    monkeypatch.setattr(ops, "amx", lambda: False)
    g = torch.Generator().manual_seed(bits)
    q, scale = ops.quantize_weight(torch.randn(47, 128, generator=g), bits)
    bias = torch.randn(47, generator=g)

    def run(rows, width=128):
        x = torch.randn(1, rows, width, generator=g).to(dtype)
        with torch.no_grad():
            y = ops.quantized_linear(x, q if width == 128 else q6, scale, bits, bias)
        w = q if width == 128 else q6
        ref = ops.quantized_linear_reference(x.double(), w, scale, bits, bias.double())
        assert y.dtype == dtype and y.shape == ref.shape
        assert (y.double() - ref).abs().max() <= 0.02 * ref.abs().max()

    q6, _ = ops.quantize_weight(torch.randn(47, 96, generator=g), bits)
    first = ops.gemm_min_rows(kernel)  # 32 on AMX tiles; 64 on VNNI, where the lanes kernel is faster below
    assert first == (ops.GEMM_MIN_ROWS if kernel.gemm_tiles else ops.LANES_GEMM_MIN_ROWS)
    run(first - 1)
    run(first)
    run(300)  # three chunks: 128, 128, 44
    assert calls == [(first, 128), (128, 128), (128, 128), (44, 128)]
    calls.clear()
    run(300, width=96)
    with settings.override(cpu_quantized_gemm=False):
        run(300)
    with settings.override(cpu_float_activations=True):
        run(300)
    monkeypatch.setattr(ops, "amx", lambda: True)  # an AMX CPU: our GEMM where it runs on the tiles
    monkeypatch.setattr(kernel, "amx", True)
    assert ops._gemm_path(kernel) == "int8"
    with settings.override(cpu_amx=False):  # else dequantize + torch's bf16 GEMM (on the tiles)
        assert ops._gemm_path(kernel) == "bf16"
    monkeypatch.setattr(kernel, "amx", False)
    assert ops._gemm_path(kernel) == "bf16"
    assert calls == []


def test_cpu_inference_computes_in_fp32_when_half_math_is_emulated(tiny_dirs):
    from chatglm.layers import compute_dtype

    x = torch.zeros(1, 2, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = torch.bfloat16 if native_half_gemm(torch.bfloat16) else torch.float32
        assert compute_dtype(x) == expected
    assert compute_dtype(x) == torch.bfloat16  # autograd on (training): the weights' dtype, as the original
    model = chatglm.load_model(str(tiny_dirs["v1"]), dtype=torch.bfloat16)
    ids = torch.randint(10, 100, (1, 6))
    with torch.no_grad():
        out = model(ids)
    assert out.logits.dtype == expected and out.past_key_values[0][0].dtype == expected
    assert model.transformer.layers[0].input_layernorm.weight.dtype == torch.bfloat16  # weights untouched


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_quantized_cpu_model_computes_in_fp32_on_every_cpu(tiny_dirs, version):
    """INT8/INT4 matrices are our kernels, which take fp32 activations: the trunk of a quantized model loaded in
    bf16 computes in fp32 with or without native bf16 (the original's CPU path, .float().quantize(), does too);
    training keeps bf16."""
    import kernels
    from chatglm.layers import compute_dtype

    if kernels.get_cpu_kernel() is None:
        pytest.skip("the CPU kernels could not be built here (gcc missing)")
    x = torch.zeros(1, 2, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert compute_dtype(x, quantized=True) == torch.float32
    assert compute_dtype(x, quantized=True) == torch.bfloat16
    model = chatglm.load_model(str(tiny_dirs[version]), dtype=torch.bfloat16, quantization_bit=4).eval()
    ids = torch.randint(10, 100, (1, 6))
    with torch.no_grad():
        out = model(ids)
    assert out.logits.dtype == torch.float32 and out.past_key_values[0][0].dtype == torch.float32
    with settings.override(cpu_kernels=False), torch.no_grad():  # the original's paths: the weights' dtype
        assert compute_dtype(x, quantized=True) == torch.bfloat16


def test_cached_fp32_follows_the_parameter():
    """The fp32 copy of a bias/scale that the CPU kernels take is refreshed when the parameter changes."""
    from quantization.ops import cached_fp32

    lin = torch.nn.Linear(4, 3).to(torch.bfloat16)
    first = cached_fp32(lin, "bias")
    assert first.dtype == torch.float32 and torch.equal(first, lin.bias.float())
    assert cached_fp32(lin, "bias") is first  # no new copy while the parameter is unchanged
    with torch.no_grad():
        lin.bias.add_(1)  # in place: the version counter moves
    assert torch.equal(cached_fp32(lin, "bias"), lin.bias.float())
    lin.bias = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))  # replaced
    assert torch.equal(cached_fp32(lin, "bias"), torch.zeros(3))
    with torch.inference_mode():
        inf = torch.nn.Linear(4, 3).to(torch.bfloat16)  # inference tensors: no version counter, still cached
        assert torch.equal(cached_fp32(inf, "bias"), inf.bias.float())
    lin.bias = None
    assert cached_fp32(lin, "bias") is None
