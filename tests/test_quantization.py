"""INT8/INT4 weight-only quantization: layout, kernels against the reference, checkpoints, tiny models."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatglm import load_model, load_tokenizer
from kernels import get_cpu_kernel
from kernels.settings import settings
from quantization import (
    QuantizedLinear,
    dequantize,
    pack_int4,
    quantize,
    quantize_weight,
    set_output_layer,
    unpack_int4,
)
from quantization.ops import quantized_linear_reference


def test_pack_unpack_exact_including_extremes():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (7, 10), generator=g, dtype=torch.int8)
    q[0, :4] = torch.tensor([-8, 7, 7, -8], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (7, 5) and packed.dtype == torch.int8
    # the even column is the HIGH nibble: (-8, 7) -> 0x87, (7, -8) -> 0x78
    assert packed[0, 0].item() == torch.tensor(0x87).to(torch.uint8).to(torch.int8).item()
    assert packed[0, 1].item() == 0x78
    assert torch.equal(unpack_int4(packed), q)


def _thudm_quantize(w16: torch.Tensor, bits: int):
    """THUDM's quantize() on an fp16 weight, as its quantization.py computes it: fp16 arithmetic throughout."""
    qmax = 2 ** (bits - 1) - 1
    scale = w16.abs().max(dim=-1).values / qmax
    return torch.round(w16 / scale[:, None]).to(torch.int8), scale


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(4608, 4096), (3, 8), (65, 130), (1, 13696)])
def test_quantization_is_bit_identical_to_thudm(bits, shape):
    g = torch.Generator().manual_seed(shape[0] * 7 + bits)
    w16 = (torch.randn(shape, generator=g) * 0.05).half()
    # rows built to land on .5 ties: multiples of half a step of the row's scale
    qmax = 2 ** (bits - 1) - 1
    steps = torch.randint(-2 * qmax, 2 * qmax + 1, (shape[0] // 2 + 1, shape[1]), generator=g)
    steps[:, 0] = 2 * qmax
    tie_rows = (steps.half() * 0.5 * (torch.rand(steps.shape[0], 1, generator=g) * 0.01 + 0.001).half()).half()
    w16[: tie_rows.shape[0]] = tie_rows[: shape[0]]
    expected_q, expected_scale = _thudm_quantize(w16, bits)
    for source in (w16, w16.float(), w16.bfloat16()):  # from other dtypes: the original's cast to fp16 first
        q, scale = quantize_weight(source, bits) if source.dtype != torch.bfloat16 else quantize_weight(w16, bits)
        values = unpack_int4(q) if bits == 4 else q
        assert torch.equal(scale, expected_scale) and scale.dtype == torch.float16
        assert torch.equal(values, expected_q)
    fp32_way = torch.round(w16.float() / expected_scale.float()[:, None]).to(torch.int8)
    if shape[0] * shape[1] > 10**6:  # the test can tell: dividing in fp32 gives other integers on some ties
        assert not torch.equal(fp32_way, expected_q)
    err = (dequantize(q, scale, bits) - w16.float()).abs()
    # half a step, plus the fp16 rounding of quotients up to qmax (an ulp of 1/16 at 64..127): the original's own error
    assert (err <= scale.float()[:, None] * 0.54 + 1e-4).all()
    zero = torch.zeros(2, 8)
    assert not quantize_weight(zero, bits)[0].any()  # an all-zero row stays zero (no 0/0)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(1, 64, 96), (3, 128, 40), (16, 256, 33), (2, 4096, 12)])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernel_equals_reference(bits, shape, threads):
    kernel = get_cpu_kernel()
    if kernel is None:
        pytest.skip("the CPU kernel could not be built here (gcc missing)")
    m, k, n = shape
    g = torch.Generator().manual_seed(hash((bits, shape)) % 2**31)
    w, x, bias = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    q, scale = quantize_weight(w, bits)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = kernel.linear(x, q, scale.float(), bits, bias, quantize_activations=False)  # exact products
        yq = kernel.linear(x, q, scale.float(), bits, bias)  # the default: x rounded to int8 per 64 columns
        if bits == 4:
            assert torch.equal(kernel.unpack_int4(q), unpack_int4(q))
        assert torch.equal(kernel.dequantize(q, scale.float(), bits), dequantize(q, scale, bits))
    finally:
        torch.set_num_threads(old)
    ref = quantized_linear_reference(x.double(), q, scale, bits, bias.double())
    assert (y.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (yq.double() - ref).norm() <= 1.5e-2 * ref.norm()  # tests/test_kernels.py has the exact bounds


def test_quantized_linear_dtypes_and_fallback(monkeypatch):
    lin = torch.nn.Linear(64, 32)
    q = QuantizedLinear.from_linear(lin, 8)
    x = torch.randn(2, 3, 64)
    y = q(x)
    assert y.shape == (2, 3, 32) and y.dtype == torch.float32
    assert q(x.bfloat16()).dtype == torch.bfloat16
    import kernels

    monkeypatch.setattr(settings, "cpu_float_activations", True)
    y_float = q(x)  # the kernel with fp32 activations, when it is built
    monkeypatch.setattr(kernels, "_cpu_kernel", None)
    monkeypatch.setattr(kernels, "_cpu_tried", True)
    y_ref = q(x)  # the PyTorch fallback
    assert torch.allclose(y_float, y_ref, atol=1e-4)
    # the default kernel rounds x to int8 per 64 columns: <= 1.5% of the norm (tests/test_kernels.py: exact bounds)
    assert (y - y_ref).norm() <= 1.5e-2 * y_ref.norm()


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_tiny_model_close_to_float(tiny_dirs, version, bits):
    path = str(tiny_dirs[version])
    tok = load_tokenizer(path)
    ids = tok(["你好，世界 hello"], return_tensors="pt")["input_ids"]
    ref = load_model(path, dtype=torch.float32)
    model = load_model(path, dtype=torch.float32).quantize(bits)
    assert model.config.quantization_bit == bits
    names = [type(m).__name__ for m in model.modules()]
    assert names.count("QuantizedLinear") == 4 * model.config.num_layers  # qkv, dense, h_to_4h, 4h_to_h
    head = model.lm_head if version == "v1" else model.transformer.output_layer
    assert isinstance(head, torch.nn.Linear)  # the output layer stays float
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > (0.999 if bits == 8 else 0.97)
    # decoding and prefill both run through the fused kernel (on the CPU at every row count)
    out = model.generate(ids, do_sample=False, max_new_tokens=4)
    assert out.shape[1] == ids.shape[1] + 4


def _thudm_int4_checkpoint(src, dst):
    """An INT4 checkpoint as THUDM ships it, written here from the spec (not with our quantizer)."""
    shutil.copytree(src, dst)
    for f in dst.glob("pytorch_model*"):
        f.unlink()
    model = load_model(str(src), dtype=torch.float16)
    state = {}
    for key, value in model.state_dict().items():
        layer = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and layer.split(".")[-1] in ("query_key_value", "dense", "dense_h_to_4h",
                                                                "dense_4h_to_h") and ".layers." in key:  # fmt: skip
            w = value.half()  # the original's quantize(): fp16 arithmetic throughout
            scale = w.abs().max(dim=-1).values / 7
            q = torch.round(w / scale[:, None]).to(torch.int8)
            packed = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)).to(torch.int8)
            state[key], state[layer + ".weight_scale"] = packed, scale
        else:
            state[key] = value.clone()
    save_file(state, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_bit"] = 4
    (dst / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_thudm_int4_checkpoint_loads_like_quantizing_in_place(tiny_dirs, tmp_path, version):
    dst = tmp_path / "int4"
    _thudm_int4_checkpoint(tiny_dirs[version], dst)
    loaded = load_model(str(dst), dtype=torch.float16)
    assert loaded.config.quantization_bit == 4
    in_place = load_model(str(tiny_dirs[version]), dtype=torch.float16).quantize(4)
    ids = torch.tensor([[5, 6, 7, 8, 9]]) if version == "v2" else None
    if ids is None:
        tok = load_tokenizer(str(tiny_dirs[version]))
        ids = tok(["你好"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = loaded.float()(ids).logits, in_place.float()(ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    # and it saves back in the same layout, without the float weights
    loaded.save_pretrained(tmp_path / "resaved")
    saved = load_file(str(tmp_path / "resaved" / "model.safetensors"))
    key = next(k for k in saved if k.endswith("query_key_value.weight"))
    assert saved[key].dtype == torch.int8 and saved[key.replace(".weight", ".weight_scale")].dtype == torch.float16
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_bit"] == 4


def test_quantize_while_loading_equals_quantize_after(tiny_dirs):
    path = str(tiny_dirs["v3"])
    a = load_model(path, dtype=torch.float32, quantization_bit=8)
    b = load_model(path, dtype=torch.float32).quantize(8)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_bad_quantization_requests(tiny_dirs, tiny):
    model, _ = tiny["v2"]
    with pytest.raises(ValueError):
        model.quantize(3)
    q = load_model(str(tiny_dirs["v2"]), dtype=torch.float32, quantization_bit=4)
    with pytest.raises(ValueError, match="already"):
        quantize(q, 8)


def test_quantize_embeddings_option(tiny_dirs):
    path = str(tiny_dirs["v1"])
    model = load_model(path, dtype=torch.float32).quantize(8, quantize_embeddings=True)
    assert type(model.lm_head).__name__ == "QuantizedLinear"
    assert type(model.transformer.word_embeddings).__name__ == "QuantizedEmbedding"
    ids = load_tokenizer(path)(["你好"], return_tensors="pt")["input_ids"]
    ref = load_model(path, dtype=torch.float32)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(ref(ids).logits.flatten(), model(ids).logits.flatten(), dim=0)
    assert cos > 0.99


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_output_layer_int8_and_bf16_stay_close_to_float(tiny_dirs, version):
    """The output layer alone in INT8 (a quarter of fp32's bytes) or bf16: logits within a measured bound."""
    path = str(tiny_dirs[version])
    ids = load_tokenizer(path)(["你好，世界 hello"], return_tensors="pt")["input_ids"]
    ref = load_model(path, dtype=torch.float32)
    emb = ref.transformer.word_embeddings.weight if version == "v1" else None
    with torch.no_grad():
        want = ref(ids).logits
        errors = {}
        for mode in ("int8", "bf16"):
            model = set_output_layer(load_model(path, dtype=torch.float32).quantize(4), mode)
            head = model.output_head()
            if mode == "int8":
                assert isinstance(head, QuantizedLinear) and head.weight_bit_width == 8
                assert model.config.quantization_output_bit == 8
            else:
                assert head.weight.dtype == torch.bfloat16
            four = load_model(path, dtype=torch.float32).quantize(4)
            got, base = model(ids).logits, four(ids).logits  # against the same INT4 blocks with a float head
            errors[mode] = float((got - base).norm() / base.norm())
            assert model.generate(ids, do_sample=False, max_new_tokens=3).shape[1] == ids.shape[1] + 3
        if emb is not None:  # v1: the word embeddings (tied to lm_head) stay float
            assert model.transformer.word_embeddings.weight.dtype == torch.float32
        assert torch.isfinite(want).all()
    assert errors["int8"] < 2e-2 and errors["bf16"] < 5e-3, errors


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_output_layer_int8_quantized_while_loading_saves_and_loads_back(tiny_dirs, tmp_path, version):
    path = str(tiny_dirs[version])
    loaded = load_model(path, dtype=torch.float32, quantization_bit=4, quantization_output_bit=8)
    after = set_output_layer(load_model(path, dtype=torch.float32).quantize(4), "int8")
    head, other = loaded.output_head(), after.output_head()
    assert isinstance(head, QuantizedLinear) and torch.equal(head.weight, other.weight)
    assert torch.equal(head.weight_scale, other.weight_scale)
    loaded.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_output_bit"] == 8
    again = load_model(str(tmp_path / "saved"), dtype=torch.float32)
    ids = (
        torch.tensor([[5, 6, 7, 8, 9]])
        if version == "v2"
        else load_tokenizer(path)(["你好"], return_tensors="pt")["input_ids"]
    )
    with torch.no_grad():
        assert torch.equal(again(ids).logits, loaded(ids).logits)
    with pytest.raises(ValueError, match="INT8 only"):
        load_model(path, dtype=torch.float32, quantization_bit=4, quantization_output_bit=4)
    with pytest.raises(ValueError, match="output layer must be"):
        set_output_layer(loaded, "int4")


def _same(a, b, bits):
    """The same bits, or (bits False: two fp32 summation orders of the same exact integer sums) within 1e-5 of the
    largest output."""
    if bits:
        assert torch.equal(a, b)
    else:
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5 * b.abs().max(), (a - b).abs().max()


@pytest.mark.parametrize("bits", [8, 4])
def test_layer_in_the_cpu_kernels_layout_computes_and_saves_as_thudms(bits):
    """QuantizedLinear.pack_for_cpu: where the kernels have their own layout (AVX-512 VNNI, AVX2) the weight's bytes
    are rearranged in place, the outputs keep their bits on VNNI (decode rows, batches, the GEMM) and stay within
    fp32 accumulation on AVX2 (where THUDM's layout sums in another order; tests/test_kernels.py), fp32 activations
    keep theirs, and state_dict, load_state_dict and moves see THUDM's layout; elsewhere nothing changes."""

    g = torch.Generator().manual_seed(bits)
    ref = QuantizedLinear.from_linear(torch.nn.Linear(256, 96), bits)
    layer = QuantizedLinear.from_linear(torch.nn.Linear(256, 96), bits)
    layer.load_state_dict(ref.state_dict())
    kernel = get_cpu_kernel()
    can = kernel is not None and kernel.packed_layout
    with settings.override(cpu_packed_weights=False):
        assert not layer.pack_for_cpu() and layer.weight_layout == "thudm"
    assert layer.pack_for_cpu() == can and layer.weight_layout == ("lanes16" if can else "thudm")
    assert not layer.pack_for_cpu()  # once
    if can:
        assert not torch.equal(layer.weight, ref.weight) and torch.equal(layer.thudm_weight(), ref.weight)
    same_bits = not can or kernel.has_gemm  # (AVX2: the packed kernels' bits are the VNNI build's)
    x = torch.randn(80, 256, generator=g)
    with torch.no_grad():
        for rows in (1, 2, 5, 80):  # 80: THUDM's layout takes the GEMM there
            _same(layer(x[:rows]), ref(x[:rows]), same_bits)
        with settings.override(cpu_float_activations=True):
            assert torch.equal(layer(x[:3]), ref(x[:3]))
        with settings.override(cpu_kernels=False):
            _same(layer(x[:3]), ref(x[:3]), same_bits)
    state = layer.state_dict()
    assert torch.equal(state["weight"], ref.weight) and torch.equal(state["weight_scale"], ref.weight_scale)
    other = QuantizedLinear.from_linear(torch.nn.Linear(256, 96), bits)
    layer.load_state_dict(other.state_dict())  # THUDM's bytes in, the layout kept
    assert layer.weight_layout == ("lanes16" if can else "thudm") and torch.equal(layer.thudm_weight(), other.weight)
    with torch.no_grad():
        _same(layer(x[:4]), other(x[:4]), same_bits)
    layer.to(torch.float16)  # a cast that leaves int8 weights alone keeps the layout
    assert layer.weight_layout == ("lanes16" if can else "thudm") and layer.bias.dtype == torch.float16
    layer.to("meta")  # a move: THUDM's layout first
    assert layer.weight_layout == "thudm"


def test_model_loaded_for_the_cpu_holds_the_kernels_layout_and_saves_thudms(tiny_dirs, tmp_path):
    """load_model(device="cpu") rearranges the quantized layers where the kernels have a layout of their own; the
    logits are those of the model in THUDM's layout, and the saved checkpoint is byte for byte the same."""
    path = str(tiny_dirs["v3"])
    with settings.override(cpu_packed_weights=False):
        plain = load_model(path, dtype=torch.float32, quantization_bit=4, quantization_output_bit=8, device="cpu")
    model = load_model(path, dtype=torch.float32, quantization_bit=4, quantization_output_bit=8, device="cpu")
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    kernel = get_cpu_kernel()
    want = "lanes16" if kernel is not None and kernel.packed_layout else "thudm"
    assert layers and {m.weight_layout for m in layers} == {want}
    assert {m.weight_layout for m in plain.modules() if isinstance(m, QuantizedLinear)} == {"thudm"}
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        _same(model(ids).logits, plain(ids).logits, want == "thudm" or kernel.has_gemm)
    model.save_pretrained(tmp_path / "a")
    plain.save_pretrained(tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
