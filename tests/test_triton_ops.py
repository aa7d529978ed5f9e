"""Triton weight-only INT8/INT4 kernels (quantization/triton_ops.py) against the plain-PyTorch reference.

On the CPU they run under Triton's interpreter (TRITON_INTERPRET=1, set before the kernels are first built);
with a CUDA device the same checks also run compiled on the GPU."""

import functools
import importlib
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

import quantization  # noqa: E402
from kernels.settings import settings  # noqa: E402
from quantization import triton_ops  # noqa: E402
from quantization.ops import dequantize, pack_int4, quantized_linear_reference  # noqa: E402

# Error allowed per output element, as a fraction of the largest |reference| output (the reference runs in fp32 on
# the dequantized weight; the kernels accumulate in fp32 and round once to x's dtype).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@functools.cache
def interpreter_failure():
    """Why Triton's interpreter cannot run a loop with a run-time bound here, or None when it can. Triton 3.6's
    interpreter turns such a bound into a Python int from a 1-element array, which NumPy 2.4 and newer refuse
    ("only 0-dimensional arrays can be converted to Python scalars"); the kernels themselves compile and run on a
    GPU with it. Asked once, with a kernel of the probe's own, after TRITON_INTERPRET=1 is set."""

    @triton.jit
    def _count(out_ptr, n):
        total = 0
        for _ in range(0, n, 1):
            total += 1
        triton.language.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count[(1,)](out, 3)
    except Exception as e:  # the interpreter's own failure, whatever it is
        return f"{type(e).__name__}: {e}"
    return None if out.item() == 3 else f"the probe loop counted {out.item()}, not 3"


def interpret(monkeypatch):
    """Set TRITON_INTERPRET=1 for this test, and skip it, saying why, where this Triton cannot interpret loops."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    why = interpreter_failure()
    if why:
        import numpy

        pytest.skip(f"Triton {triton.__version__}'s interpreter fails with NumPy {numpy.__version__}: {why}")


@pytest.fixture(params=["interpreter", "cuda"])
def device(request, monkeypatch):
    """The device the tensors live on, with TRITON_INTERPRET set to match before any kernel is built."""
    if request.param == "interpreter":
        interpret(monkeypatch)
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return torch.device("cuda")


def make_weight(n, k, bits, seed):
    """A seeded quantized weight in THUDM's layout, with the extreme values in it, and its fp16 scale."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 7) if bits == 4 else (-128, 127)
    q = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    q[0, : min(k, 8)] = torch.tensor([lo, hi, hi, lo, lo, lo, hi, hi], dtype=torch.int8)[: min(k, 8)]
    q[:, -2] = lo  # every row holds both extremes, in both nibbles for INT4 (k is even)
    q[:, -1] = hi
    scale = (torch.rand(n, generator=g) * 0.04 + 0.01).half()
    return (pack_int4(q) if bits == 4 else q), scale


# (N, K, block_n, block_k, split_k): odd shapes with small blocks (several blocks, masked tails in N and K), with
# and without split-K, and a realistic-ish shape with the default GPU blocks.
SHAPES = [(37, 100, 16, 32, 1), (37, 100, 16, 32, 3), (256, 512, None, None, None)]
ROWS = [(1,), (3,), (17,), (2, 5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("lead", ROWS, ids=lambda r: "x".join(map(str, r)))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-split{s[4]}")
@pytest.mark.parametrize("bits", [4, 8])
def test_linear_matches_reference(device, bits, shape, lead, with_bias, dtype):
    n, k, block_n, block_k, split_k = shape
    seed = zlib.crc32(repr((bits, shape, lead, with_bias, dtype)).encode())
    weight, scale = make_weight(n, k, bits, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).half() if with_bias else None  # a bias dtype other than x's

    expected = quantized_linear_reference(x.float(), weight, scale, bits, bias.float() if with_bias else None)
    to = (lambda t: t.to(device)) if device.type != "cpu" else (lambda t: t)
    y = triton_ops.triton_quantized_linear(
        to(x), to(weight), to(scale), bits, to(bias) if with_bias else None,
        block_n=block_n, block_k=block_k, split_k=split_k,
    )  # fmt: skip
    assert y.dtype == dtype and y.shape == (*lead, n) and y.device == x.to(device).device
    err = (y.cpu().float() - expected).abs().max().item()
    assert err <= TOLERANCE[dtype] * expected.abs().max().item(), (err, expected.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("lead", [(1,), (), (1, 1)], ids=lambda r: "x".join(map(str, r)) or "1d")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-split{s[4]}")
@pytest.mark.parametrize("bits", [4, 8])
def test_gemv_matches_reference(device, bits, shape, lead, with_bias, dtype):
    """The one-row kernel (no tensor cores) against the reference, as the tensor-core kernel above."""
    n, k, block_n, block_k, split_k = shape
    seed = zlib.crc32(repr(("gemv", bits, shape, lead, with_bias, dtype)).encode())
    weight, scale = make_weight(n, k, bits, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).half() if with_bias else None
    expected = quantized_linear_reference(x.float(), weight, scale, bits, bias.float() if with_bias else None)
    to = (lambda t: t.to(device)) if device.type != "cpu" else (lambda t: t)
    y = triton_ops.triton_quantized_linear(
        to(x), to(weight), to(scale), bits, to(bias) if with_bias else None,
        block_n=block_n, block_k=block_k, split_k=split_k, gemv=True,
    )  # fmt: skip
    assert y.dtype == dtype and y.shape == (*lead, n)
    err = (y.cpu().float() - expected).abs().max().item()
    assert err <= TOLERANCE[dtype] * expected.abs().max().item(), (err, expected.abs().max().item())


def test_gemv_is_chosen_by_the_variable_for_one_row(device, monkeypatch):
    weight, scale = make_weight(48, 64, 4, seed=5)
    to = (lambda t: t.to(device)) if device.type != "cpu" else (lambda t: t)
    calls = []
    real = triton_ops._gemv
    monkeypatch.setattr(triton_ops, "_gemv", lambda *a: calls.append(a[0].shape) or real(*a))
    one, three = to(torch.randn(1, 64)), to(torch.randn(3, 64))
    triton_ops.triton_quantized_linear(one, to(weight), to(scale), 4)
    assert calls == []  # the tensor-core kernel is the default
    monkeypatch.setattr(settings, "triton_gemv", True)
    a = triton_ops.triton_quantized_linear(one, to(weight), to(scale), 4)
    triton_ops.triton_quantized_linear(three, to(weight), to(scale), 4)  # more rows: the tensor-core kernel
    assert calls == [(1, 64)]
    b = triton_ops.triton_quantized_linear(one, to(weight), to(scale), 4, gemv=False)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one row"):
        triton_ops.triton_quantized_linear(three, to(weight), to(scale), 4, gemv=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("bits", [4, 8])
def test_prefill_path_dequantizes_then_matmuls(device, bits, dtype):
    n, k = 37, 100
    weight, scale = make_weight(n, k, bits, seed=bits)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 10, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g)
    expected = quantized_linear_reference(x.float(), weight, scale, bits, bias)
    y = triton_ops.triton_quantized_linear(
        x.to(device), weight.to(device), scale.to(device), bits, bias.to(device), dequant_above=8
    )
    assert y.dtype == dtype and y.shape == (2, 10, n)
    err = (y.cpu().float() - expected).abs().max().item()
    # here the weight is rounded to x's dtype before the matmul (as the reference in x's dtype does)
    assert err <= 2 * TOLERANCE[dtype] * expected.abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(37, 100, 16, 32), (5, 2, 4, 1), (64, 256, 64, 128)], ids=str)
@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_exact(device, bits, shape, dtype):
    n, k, block_n, block_k = shape
    weight, scale = make_weight(n, k, bits, seed=n * k + bits)
    out = triton_ops.triton_dequantize(
        weight.to(device), scale.to(device), bits, dtype, block_n=block_n, block_k=block_k
    )
    assert out.dtype == dtype and out.shape == (n, k)
    assert torch.equal(out.cpu(), dequantize(weight, scale, bits, dtype))


def test_strided_x_and_empty_rows(device):
    weight, scale = make_weight(24, 64, 4, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 6, generator=g).t()  # [6, 64] with a column stride of 6
    expected = quantized_linear_reference(x, weight, scale, 4)
    y = triton_ops.triton_quantized_linear(x.to(device), weight.to(device), scale.to(device), 4, block_n=16)
    assert (y.cpu() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    empty = triton_ops.triton_quantized_linear(x[:0].to(device), weight.to(device), scale.to(device), 4)
    assert empty.shape == (0, 24)


def test_rejects_bad_arguments(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    weight, scale = make_weight(8, 32, 8, seed=0)
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="bits"):
        triton_ops.triton_quantized_linear(x, weight, scale, 3)
    with pytest.raises(ValueError, match="features"):
        triton_ops.triton_quantized_linear(x, weight, scale, 4)  # the same bytes as INT4 are 64 features
    with pytest.raises(ValueError, match="block_k"):
        triton_ops.triton_quantized_linear(x, weight, scale, 8, block_k=48)
    with pytest.raises(ValueError, match="fp16"):
        triton_ops.triton_quantized_linear(x.double(), weight, scale, 8)


def test_kernels_built_lazily_per_interpret_setting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_ops.clear_kernel_cache()
    assert triton_ops._KERNEL_CACHE == {}
    weight, scale = make_weight(16, 32, 8, seed=1)
    triton_ops.triton_dequantize(weight, scale, 8)
    assert set(triton_ops._KERNEL_CACHE) == {("1", True)}
    assert type(triton_ops._KERNEL_CACHE["1", True]["linear"]).__name__ == "InterpretedFunction"


def test_available_false_when_triton_import_fails(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.delitem(sys.modules, "quantization.triton_ops")
    monkeypatch.delattr(quantization, "triton_ops")
    fresh = importlib.import_module("quantization.triton_ops")
    assert fresh is not triton_ops
    assert fresh.available() is False
    assert triton_ops.available() is False  # the check runs each time, it is not cached at import
    with pytest.raises(ImportError):
        fresh.triton_dequantize(*make_weight(4, 8, 8, seed=0), 8)


def test_import_does_not_import_triton():
    code = (
        "import sys, quantization.triton_ops as t\n"
        "assert 'triton' not in sys.modules, 'imported at module import'\n"
        "assert isinstance(t.available(), bool)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_tiny_model_on_cuda_runs_triton_and_matches_cpu(tiny_dirs, bits):
    """The whole path on a GPU: QuantizedLinear dispatches to the Triton kernels, and the fp16 logits of a
    quantized tiny model agree with the same model's fp32 logits on the CPU."""
    import chatglm
    from quantization import ops

    ops._triton_imports.cache_clear()
    assert ops.cuda_kernels()
    model = chatglm.load_model(str(tiny_dirs["v2"]), dtype="fp32", quantization_bit=bits).eval()
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits  # the CPU kernels (int8 activations: ~0.5% off the exact product)
        calls = []
        real = ops.quantized_linear_reference
        ops.quantized_linear_reference = lambda *a, **k: calls.append(1) or real(*a, **k)
        try:
            got = model.half().cuda()(ids.cuda()).logits.float().cpu()
        finally:
            ops.quantized_linear_reference = real
    assert not calls  # no layer fell back to dequantize-then-matmul
    assert (got - expected).abs().max() <= 3e-2 * expected.abs().max()


def test_gpu_gemv_benchmark_runs_under_the_interpreter(monkeypatch):
    """benchmarks/bench_gemv.py --device cuda, run here on a tiny shape on the CPU under the interpreter: the
    table is produced, one row per backend, with a time per call (the GPU session then only has to run it)."""
    interpret(monkeypatch)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_gemv

    lines = bench_gemv.run_gpu(1, device="cpu", shapes=[(64, 48)], copies=2)
    rows = [ln for ln in lines[2:] if ln.strip()]
    names = ["fp16 cuBLAS", "bf16 cuBLAS", "INT8 triton", "INT8 triton gemv", "INT8 orig dequant+mm",
             "INT4 triton", "INT4 triton gemv", "INT4 orig"]  # fmt: skip
    assert len(rows) == 8 and all(any(n in r for r in rows) for n in names)
    assert all(float(r.split()[-3]) > 0 for r in rows)  # microseconds per call


def _compile_for(kernels, arch, xdt, bits, split):
    """Compile the linear kernel ahead of time for a CUDA arch (no GPU needed: Triton ships ptxas)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"x_ptr": f"*{xdt}", "w_ptr": "*i8", "s_ptr": "*fp16", "b_ptr": "*fp16",
           "out_ptr": "*fp32" if split > 1 else f"*{xdt}", "M": "i32", "N": "i32", "K": "i32",
           "stride_xm": "i32", "stride_xk": "i32", "stride_wn": "i32", "stride_om": "i32", "k_per_split": "i32"}  # fmt: skip
    consts = {"BITS": bits, "HAS_BIAS": True, "SPLIT_K": split, "FP32_DOT": xdt == "fp32", "BLOCK_M": 16,
              "BLOCK_N": 64, "BLOCK_K": 256 if bits == 4 else 128}  # fmt: skip
    sig.update({name: "constexpr" for name in consts})
    src = ASTSource(fn=kernels["linear"], signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 3})


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_current_gpus(monkeypatch, arch):
    """The compiled (not interpreted) kernels build to machine code for sm_80 (A100) and sm_90 (H100/H200) here,
    without a GPU: fp16/bf16/fp32 activations, INT4/INT8, with and without split-K, plus the one-row (GEMV) and
    dequantize kernels.
    On a GPU they use the tensor cores (mma in the PTX) for fp16/bf16."""
    pytest.importorskip("triton.backends.nvidia")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    triton_ops.clear_kernel_cache()
    try:
        kernels = triton_ops._kernels()
        if triton_ops._interpreting():
            pytest.skip("triton is set to interpret here")
        for xdt, bits, split in [("fp16", 4, 1), ("bf16", 8, 4), ("fp32", 4, 4), ("bf16", 4, 1)]:
            compiled = _compile_for(kernels, arch, xdt, bits, split)
            assert compiled.asm["cubin"] and (xdt == "fp32" or "mma" in compiled.asm["ptx"])
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        for xdt, bits, split in [("fp16", 4, 1), ("bf16", 8, 4), ("fp32", 4, 4)]:  # the one-row kernel
            consts = {"BITS": bits, "HAS_BIAS": True, "SPLIT_K": split, "BLOCK_N": 32,
                      "BLOCK_K": 512 if bits == 4 else 256}  # fmt: skip
            sig = {"x_ptr": f"*{xdt}", "w_ptr": "*i8", "s_ptr": "*fp16", "b_ptr": "*fp16",
                   "out_ptr": "*fp32" if split > 1 else f"*{xdt}", "N": "i32", "K": "i32", "stride_xk": "i32",
                   "stride_wn": "i32", "k_per_split": "i32", **{name: "constexpr" for name in consts}}  # fmt: skip
            src = ASTSource(fn=kernels["gemv"], signature=sig, constexprs=consts)
            assert triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4}).asm["cubin"]
        for bits in (4, 8):
            consts = {"BITS": bits, "BF16_BY_HAND": False, "BLOCK_N": 64, "BLOCK_K": 128}
            sig = {"w_ptr": "*i8", "s_ptr": "*fp16", "out_ptr": "*bf16", "N": "i32", "KW": "i32", "stride_wn": "i32",
                   "stride_on": "i32", **{name: "constexpr" for name in consts}}  # fmt: skip
            src = ASTSource(fn=kernels["dequantize"], signature=sig, constexprs=consts)
            assert triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4}).asm["cubin"]
    finally:
        triton_ops.clear_kernel_cache()
