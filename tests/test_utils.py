"""utils.py: the one loader (every backend choice and error), P-Tuning, and the multi-GPU helpers.

CUDA and MPS are faked by monkeypatching their availability (and the final move to the device), so all of this
runs on a CPU-only machine; the one test that needs a real GPU is skipped without it.
"""

import argparse
import json
import logging
import types

import pytest
import torch

import chatglm
import kernels
import utils
from chatglm import backends
from chatglm.loading import model_class
from kernels.settings import settings
from quantization import QuantizedLinear

from .conftest import real_model_dir


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    # The loader's gc.collect() after each shard (memory hygiene for 6B shards) costs ~0.3 s a call in a test
    # process and nothing here depends on it: skip it to keep this file fast.
    monkeypatch.setattr("chatglm.loading.gc", types.SimpleNamespace(collect=lambda: 0))
    backends._warned.clear()
    yield
    backends._warned.clear()


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA with N GPUs (default 1); the move to the device is recorded instead of done."""
    moved = []

    def make(n=1):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(backends, "_place", lambda model, device: moved.append(device) or model)
        return moved

    return make


@pytest.fixture
def fake_mps(monkeypatch):
    moved = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(backends, "_place", lambda model, device: moved.append(device) or model)
    return moved


@pytest.fixture(scope="module")
def ids(tiny_dirs):
    tok = chatglm.load_tokenizer(str(tiny_dirs["v2"]))
    return tok("你好，今天天气怎么样", return_tensors="pt")["input_ids"]


def _quantized(model):
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


# --- device and dtype choices ----------------------------------------------------------------------------


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, fake_cuda):
    assert utils.resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    fake_cuda(0)
    assert utils.resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert utils.resolve_device("auto") == "mps"
    fake_cuda(2)
    assert utils.resolve_device("auto") == "cuda"
    assert utils.resolve_device("cuda:1") == "cuda:1"


def test_default_dtype_per_device(monkeypatch):
    assert utils.default_dtype("cuda") == utils.default_dtype("cuda:1") == torch.float16
    assert utils.default_dtype("mps") == torch.float16
    monkeypatch.setattr(backends, "cpu_has_fast_bf16", lambda: True)
    assert utils.default_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(backends, "cpu_has_fast_bf16", lambda: False)
    assert utils.default_dtype("cpu") == torch.float32
    monkeypatch.undo()
    # One probe for both (kernels.native_half_gemm): native bf16 instructions, not merely AVX-512.
    for flags, fast in [({"avx512f", "avx512bw"}, False), ({"avx512f", "avx512_bf16"}, True), ({"amx_bf16"}, True)]:
        monkeypatch.setattr(kernels, "_native_half", {})
        monkeypatch.setattr(settings, "cpu_isa", "native")  # the probe itself, whatever CHATGLM_CPU_ISA says
        monkeypatch.setattr(kernels, "cpu_flags", lambda flags=flags: flags)
        assert utils.cpu_has_fast_bf16() is fast and kernels.native_half_gemm(torch.bfloat16) is fast


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_fp16_on_cpu_warns_and_falls_back(tiny_dirs, monkeypatch, caplog, fast_bf16):
    monkeypatch.setattr(backends, "cpu_has_fast_bf16", lambda: fast_bf16)
    with caplog.at_level(logging.WARNING, "chatglm.backends"):
        model, _ = utils.load_model_and_tokenizer(tiny_dirs["v2"], device="cpu", dtype="fp16")
    assert model.dtype == (torch.bfloat16 if fast_bf16 else torch.float32)
    assert "fp16 on the CPU" in caplog.text


def test_cpu_default_load(tiny_dirs, ids, monkeypatch, caplog):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, "chatglm.backends"):
            model, tokenizer = utils.load_model_and_tokenizer(str(tiny_dirs["v3"]), device="cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "1 thread(s) (OMP_NUM_THREADS=1" in caplog.text
    assert model.device.type == "cpu" and not model.training
    assert model.dtype == utils.default_dtype("cpu")
    assert model.config.chatglm_version == tokenizer.chatglm_version == "v3"
    response, history = model.chat(tokenizer, "你好", history=[], max_length=24)
    assert isinstance(response, str) and len(history) == 2


def test_cuda_path_fp16_and_bf16_fallback(tiny_dirs, fake_cuda, monkeypatch, caplog):
    moved = fake_cuda(1)
    model, _ = utils.load_model_and_tokenizer(tiny_dirs["v2"])  # device auto
    assert moved == ["cuda"] and model.dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with caplog.at_level(logging.WARNING, "chatglm.backends"):
        model, _ = utils.load_model_and_tokenizer(tiny_dirs["v2"], device="cuda:0", dtype="bf16")
    assert moved[-1] == "cuda:0" and model.dtype == torch.float16 and "does not support bf16" in caplog.text


@pytest.fixture
def triton_switch(monkeypatch):
    """Set whether the Triton CUDA kernels count as available (settings.triton, CHATGLM_NO_TRITON)."""

    def switch(on: bool):
        if on:
            pytest.importorskip("triton")
        monkeypatch.setattr(settings, "triton", on)

    yield switch


def test_quantized_on_cuda_warns_once_without_triton(tiny_dirs, fake_cuda, caplog, triton_switch):
    triton_switch(False)
    moved = fake_cuda(1)
    with caplog.at_level(logging.WARNING, "chatglm.backends"):
        for bits in (4, 8):
            model, _ = utils.load_model_and_tokenizer(tiny_dirs["v1"], device="cuda", quantization_bit=bits)
            assert _quantized(model) and model.config.quantization_bit == bits
    assert moved == ["cuda", "cuda"]
    assert caplog.text.count("GPU kernels need Triton") == 1
    assert "--device cpu" in caplog.text and "fp16" in caplog.text


def test_quantized_on_cuda_with_triton_does_not_warn(tiny_dirs, fake_cuda, caplog, triton_switch):
    triton_switch(True)
    fake_cuda(1)
    with caplog.at_level(logging.WARNING, "chatglm.backends"):
        model, _ = utils.load_model_and_tokenizer(tiny_dirs["v1"], device="cuda", quantization_bit=4)
    assert _quantized(model) and "GPU kernels" not in caplog.text


def test_mps_path_is_half(tiny_dirs, fake_mps):
    model, _ = utils.load_model_and_tokenizer(tiny_dirs["v1"], device="auto")
    assert fake_mps == ["mps"] and model.dtype == torch.float16


def test_quantized_on_mps_runs_on_the_cpu_kernels(tiny_dirs, fake_mps, ids, caplog):
    with caplog.at_level(logging.WARNING, "chatglm.backends"):
        model, _ = utils.load_model_and_tokenizer(tiny_dirs["v2"], device="mps", quantization_bit=4)
    assert fake_mps == ["cpu"] and model.device.type == "cpu" and _quantized(model)
    assert model.dtype == utils.default_dtype("cpu") and "CPU kernels" in caplog.text
    assert torch.isfinite(model(ids).logits).all()


def test_quantized_on_cpu_is_close_to_float(tiny_dirs, ids):
    ref, _ = utils.load_model_and_tokenizer(tiny_dirs["v2"], device="cpu", dtype="fp32")
    q8, _ = utils.load_model_and_tokenizer(tiny_dirs["v2"], device="cpu", dtype="fp32", quantization_bit="8")
    assert _quantized(q8) and not _quantized(ref)
    a, b = ref(ids).logits, q8(ids).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_quantized_cpu_models_get_an_int8_output_layer_unless_told(tiny_dirs, ids, version, monkeypatch):
    from quantization import QuantizedLinear

    path = tiny_dirs[version]
    auto, _ = utils.load_model_and_tokenizer(path, device="cpu", dtype="fp32", quantization_bit=4)
    faithful, _ = utils.load_model_and_tokenizer(path, device="cpu", dtype="fp32", quantization_bit=4,
                                                 output_layer="float")  # fmt: skip
    half, _ = utils.load_model_and_tokenizer(path, device="cpu", dtype="fp32", quantization_bit=4, output_layer="bf16")
    plain, _ = utils.load_model_and_tokenizer(path, device="cpu", dtype="fp32")  # not quantized: left as it is
    assert isinstance(auto.output_head(), QuantizedLinear) and auto.output_head().weight_bit_width == 8
    assert (
        type(faithful.output_head()).__name__ != "QuantizedLinear"
        and faithful.output_head().weight.dtype == torch.float32
    )
    assert half.output_head().weight.dtype == torch.bfloat16
    assert plain.output_head().weight.dtype == torch.float32 and not _quantized(plain)
    if version == "v1":
        ids = utils.chatglm.load_tokenizer(str(path))(["你好"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = faithful(ids).logits, auto(ids).logits
    assert float((a - b).norm() / a.norm()) < 2e-2
    with pytest.raises(ValueError, match="output layer"):
        utils.load_model_and_tokenizer(path, device="cpu", quantization_bit=4, output_layer="int4")
    monkeypatch.setenv("OUTPUT_LAYER", "float")
    args = utils.add_model_args(argparse.ArgumentParser()).parse_args([])
    assert args.output_layer == "float"
    assert utils.add_model_args(argparse.ArgumentParser()).parse_args(["--output-layer", "int8"]).output_layer == "int8"


# --- errors ----------------------------------------------------------------------------------------------


def test_cuda_asked_but_absent(tiny_dirs, fake_cuda):
    fake_cuda(0)
    with pytest.raises(RuntimeError, match="CUDA is not available.*--device cpu"):
        utils.load_model_and_tokenizer(tiny_dirs["v2"], device="cuda")
    fake_cuda(1)
    with pytest.raises(RuntimeError, match="only 1 CUDA GPU"):
        utils.load_model_and_tokenizer(tiny_dirs["v2"], device="cuda:1")


def test_mps_asked_but_absent(tiny_dirs, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="MPS is not available"):
        utils.load_model_and_tokenizer(tiny_dirs["v2"], device="mps")


def test_more_gpus_than_exist(tiny_dirs, fake_cuda):
    fake_cuda(0)
    with pytest.raises(RuntimeError, match="2 GPUs were asked for.*but only 0"):
        utils.load_model_and_tokenizer(tiny_dirs["v2"], num_gpus=2)
    with pytest.raises(RuntimeError, match="device_map='auto' needs CUDA GPUs"):
        utils.load_model_and_tokenizer(tiny_dirs["v2"], device_map="auto")
    fake_cuda(2)
    with pytest.raises(RuntimeError, match="2 GPUs were asked for.*but the device is 'cpu'"):
        utils.load_model_and_tokenizer(tiny_dirs["v2"], num_gpus=2, device="cpu")
    with pytest.raises(RuntimeError, match="3 GPUs were asked for.*but only 2"):
        utils.load_model_and_tokenizer(tiny_dirs["v2"], num_gpus=3)
    with pytest.raises(RuntimeError, match="3 GPUs"):
        utils.load_model_on_gpus(tiny_dirs["v2"], num_gpus=3)


def test_bad_model_path_and_bad_values(tmp_path, tiny_dirs):
    with pytest.raises(FileNotFoundError, match="MODEL_PATH"):
        utils.load_model_and_tokenizer(tmp_path / "nope", device="cpu")
    with pytest.raises(FileNotFoundError, match="config.json"):
        utils.load_model_and_tokenizer(tmp_path, device="cpu")  # a directory, but not a checkpoint
    with pytest.raises(FileNotFoundError, match="TOKENIZER_PATH"):
        utils.load_model_and_tokenizer(tiny_dirs["v2"], tokenizer_path=tmp_path / "nope", device="cpu")
    for bits in (5, "3", "x", 16):
        with pytest.raises(ValueError, match="0 \\(none\\), 4 or 8"):
            utils.load_model_and_tokenizer(tiny_dirs["v2"], device="cpu", quantization_bit=bits)
    with pytest.raises(ValueError, match="unknown device"):
        utils.load_model_and_tokenizer(tiny_dirs["v2"], device="tpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        utils.load_model_and_tokenizer(tiny_dirs["v2"], device="cpu", dtype="int3")


# --- the built-in tiny model, flags and environment ------------------------------------------------------


def test_no_model_path_uses_the_tiny_model_and_says_so_once(tiny_dirs, tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny-v1").symlink_to(tiny_dirs["v1"])  # the cache the demos build, already built
    monkeypatch.setattr(settings, "model_cache", str(tmp_path))
    model, tokenizer = utils.load_model_and_tokenizer(None, device="cpu", tiny_version="v1")
    assert model.config.chatglm_version == "v1" == tokenizer.chatglm_version
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "tiny random" in lines[0] and "random text" in lines[0]
    assert "MODEL_PATH" in lines[0] and "--model-path" in lines[0]
    with pytest.raises(ValueError, match="tiny_version"):
        utils.load_model_and_tokenizer("", tiny_version="v4")


def test_add_model_args_reads_the_environment(monkeypatch):
    for name in (
        "MODEL_PATH",
        "TOKENIZER_PATH",
        "DEVICE",
        "DTYPE",
        "QUANTIZE",
        "NUM_GPUS",
        "PTUNING_CHECKPOINT",
        "PT_PATH",
        "PRE_SEQ_LEN",
        "CHATGLM_TINY_VERSION",
    ):
        monkeypatch.delenv(name, raising=False)
    parser = argparse.ArgumentParser()
    assert utils.add_model_args(parser) is parser
    args = parser.parse_args([])
    assert (args.model_path, args.tokenizer_path, args.device, args.dtype, args.quantize, args.num_gpus) == (
        None,
        None,
        "auto",
        None,
        0,
        1,
    )
    assert (args.ptuning_checkpoint, args.pre_seq_len, args.tiny_version) == (None, None, "v3")
    monkeypatch.setenv("MODEL_PATH", "/m")
    monkeypatch.setenv("TOKENIZER_PATH", "/t")
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("DTYPE", "bf16")
    monkeypatch.setenv("QUANTIZE", "4")
    monkeypatch.setenv("NUM_GPUS", "2")
    monkeypatch.setenv("PT_PATH", "/pt")
    monkeypatch.setenv("PRE_SEQ_LEN", "128")
    monkeypatch.setenv("CHATGLM_TINY_VERSION", "v1")
    args = utils.add_model_args(argparse.ArgumentParser()).parse_args([])
    assert (args.model_path, args.tokenizer_path, args.device, args.dtype, args.quantize, args.num_gpus) == (
        "/m",
        "/t",
        "cpu",
        "bf16",
        4,
        2,
    )
    assert (args.ptuning_checkpoint, args.pre_seq_len, args.tiny_version) == ("/pt", 128, "v1")
    monkeypatch.setenv("PTUNING_CHECKPOINT", "/pc")  # the first name wins over PT_PATH
    argv = ["--model-path", "/x", "--quantize", "8", "--device", "cuda:1", "--num-gpus", "1", "--dtype", "fp32"]
    args = utils.add_model_args(argparse.ArgumentParser()).parse_args(argv)
    assert (args.model_path, args.quantize, args.device, args.num_gpus, args.dtype) == ("/x", 8, "cuda:1", 1, "fp32")
    assert args.ptuning_checkpoint == "/pc"
    with pytest.raises(SystemExit):
        utils.add_model_args(argparse.ArgumentParser()).parse_args(["--quantize", "5"])


@pytest.mark.parametrize("argv, message", [(["--max-batch", "0"], "--max-batch must be >= 1, not 0"),
                                           (["--max-waiting", "-1"], "--max-waiting must be >= 0, not -1")])  # fmt: skip
def test_batch_args_name_the_bad_one(argv, message, capsys):
    from serving.workers import add_batch_args, check_batch_args

    parser = argparse.ArgumentParser()
    add_batch_args(parser)
    with pytest.raises(SystemExit):
        check_batch_args(parser, parser.parse_args(argv))
    assert capsys.readouterr().err.strip().endswith(message)


def test_load_from_args(tiny_dirs, monkeypatch):
    seen = {}
    monkeypatch.setattr(utils, "load_model_and_tokenizer", lambda **kw: seen.update(kw) or ("m", "t"))
    ns = argparse.Namespace(
        model_path="/m",
        tokenizer_path=None,
        device="cpu",
        dtype="fp32",
        quantize=0,
        num_gpus=1,
        ptuning_checkpoint=None,
        pre_seq_len=None,
        tiny_version="v2",
    )
    assert utils.load_from_args(ns) == ("m", "t") and ns.tiny is False
    assert seen == dict(
        model_path="/m",
        tokenizer_path=None,
        device="cpu",
        dtype="fp32",
        quantization_bit=None,
        num_gpus=1,
        ptuning_checkpoint=None,
        pre_seq_len=None,
        tiny_version="v2",
        decode="eager",
        output_layer="auto",
        lora=None,
    )
    monkeypatch.undo()
    args = utils.add_model_args(argparse.ArgumentParser()).parse_args(
        ["--model-path", str(tiny_dirs["v2"]), "--device", "cpu", "--quantize", "8", "--num-gpus", "1"]
    )
    model, tokenizer = utils.load_from_args(args)
    assert _quantized(model) and tokenizer.chatglm_version == "v2"


# --- P-Tuning v2 -----------------------------------------------------------------------------------------


def _ptuning_checkpoint(tiny_dir, out, pre_seq_len, projection, fmt="bin", config=True):
    """A P-Tuning output directory as the original main.py saves it: only the prefix encoder's weights."""
    model = chatglm.load_model(
        str(tiny_dir), dtype=torch.float32, pre_seq_len=pre_seq_len, prefix_projection=projection
    )
    state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(utils.PREFIX)}
    out.mkdir()
    if fmt == "bin":
        torch.save(state, out / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(state, str(out / "model.safetensors"))
    if config:
        (out / "config.json").write_text(
            f'{{"pre_seq_len": {pre_seq_len}, "prefix_projection": {str(projection).lower()}}}'
        )
    return model


@pytest.mark.parametrize(
    "version,projection,fmt,config", [("v2", False, "bin", True), ("v1", True, "safetensors", False)]
)
def test_ptuning_checkpoint_loads(tiny_dirs, tmp_path, ids, version, projection, fmt, config):
    ref = _ptuning_checkpoint(tiny_dirs[version], tmp_path / "pt", 4, projection, fmt, config)
    model, tokenizer = utils.load_model_and_tokenizer(
        tiny_dirs[version], device="cpu", dtype="fp32", ptuning_checkpoint=tmp_path / "pt"
    )
    assert model.config.pre_seq_len == 4 and model.config.prefix_projection == projection
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    ids = tokenizer("你好", return_tensors="pt")["input_ids"]
    assert torch.equal(model(ids).logits, ref.eval()(ids).logits)
    base, _ = utils.load_model_and_tokenizer(tiny_dirs[version], device="cpu", dtype="fp32")
    assert not torch.equal(base(ids).logits, model(ids).logits)  # the prefix changes the output


def test_ptuning_checkpoint_of_another_generation_is_refused(tiny_dirs, tmp_path):
    """ChatGLM2 and ChatGLM3 share every shape, so a prefix trained on one would load into the other unnoticed;
    our checkpoints' config.json names the generation (ptuning/main.py saves the model's config)."""
    _ptuning_checkpoint(tiny_dirs["v2"], tmp_path / "pt", 4, False)
    config = json.loads((tmp_path / "pt" / "config.json").read_text())
    (tmp_path / "pt" / "config.json").write_text(json.dumps({**config, "chatglm_version": "v2"}))
    with pytest.raises(ValueError, match=r"trained on ChatGLM2-6B \(v2\); the model is ChatGLM3-6B \(v3\)"):
        utils.load_model_and_tokenizer(tiny_dirs["v3"], device="cpu", dtype="fp32", ptuning_checkpoint=tmp_path / "pt")
    model, _ = utils.load_model_and_tokenizer(tiny_dirs["v2"], device="cpu", dtype="fp32",
                                              ptuning_checkpoint=tmp_path / "pt")  # fmt: skip
    assert model.config.pre_seq_len == 4


def test_ptuning_prefix_stays_fp32_in_a_half_model(tiny_dirs, tmp_path, fake_cuda):
    fake_cuda(1)
    _ptuning_checkpoint(tiny_dirs["v3"], tmp_path / "pt", 3, False)
    model, _ = utils.load_model_and_tokenizer(tiny_dirs["v3"], ptuning_checkpoint=tmp_path / "pt", pre_seq_len=3)
    assert model.dtype == torch.float16
    assert model.transformer.prefix_encoder.embedding.weight.dtype == torch.float32


def test_ptuning_errors(tiny_dirs, tmp_path):
    _ptuning_checkpoint(tiny_dirs["v2"], tmp_path / "pt", 4, False)
    with pytest.raises(ValueError, match="pre_seq_len=128 does not match.*4 rows: use --pre-seq-len 4"):
        utils.load_model_and_tokenizer(
            tiny_dirs["v2"], device="cpu", ptuning_checkpoint=tmp_path / "pt", pre_seq_len=128
        )
    with pytest.raises(ValueError, match="does not fit this ChatGLM-6B model"):  # a v2 prefix on a v1 model
        utils.load_model_and_tokenizer(tiny_dirs["v1"], device="cpu", ptuning_checkpoint=tmp_path / "pt")
    with pytest.raises(FileNotFoundError, match="PT_PATH"):
        utils.load_model_and_tokenizer(tiny_dirs["v2"], device="cpu", ptuning_checkpoint=tmp_path / "none")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="PEFT adapter.*--lora"):
        utils.load_model_and_tokenizer(tiny_dirs["v2"], device="cpu", ptuning_checkpoint=tmp_path / "peft")
    (tmp_path / "other").mkdir()
    torch.save({"transformer.output_layer.weight": torch.zeros(2, 2)}, tmp_path / "other" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no P-Tuning prefix encoder"):
        utils.load_model_and_tokenizer(tiny_dirs["v2"], device="cpu", ptuning_checkpoint=tmp_path / "other")


# --- device maps -----------------------------------------------------------------------------------------


def _meta_model(version, **overrides):
    config = chatglm.ChatGLMConfig.from_checkpoint(str(real_model_dir(version)), **overrides)
    with torch.device("meta"):
        return model_class(config)(config, dtype=torch.float16)


def _original_split(num_gpus, layer_name):
    """THUDM utils.auto_configure_device_map's layer placement, as written there (28 layers, 30 units)."""
    per_gpu_layers, used, gpu_target, out = 30 / num_gpus, 2, 0, {}
    for i in range(28):
        if used >= per_gpu_layers:
            gpu_target += 1
            used = 0
        out[f"{layer_name}.{i}"] = gpu_target
        used += 1
    return out


LAYERS_PER_GPU = {1: [28], 2: [13, 15], 3: [8, 10, 10], 4: [6, 8, 8, 6]}


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
@pytest.mark.parametrize("pre_seq_len", [None, 128])
def test_device_map_covers_full_size_models_like_the_original(version, pre_seq_len):
    from accelerate.utils import check_device_map

    model = _meta_model(version, pre_seq_len=pre_seq_len)
    layer = "transformer.layers" if version == "v1" else "transformer.encoder.layers"
    first = {"v1": ["transformer.word_embeddings", "transformer.final_layernorm", "lm_head"]}.get(
        version,
        [
            "transformer.embedding.word_embeddings",
            "transformer.encoder.final_layernorm",
            "transformer.output_layer",
            "transformer.rotary_pos_emb",
        ],
    )
    for num_gpus in (1, 2, 3, 4):
        for spec in (model.config, model, version):
            device_map = utils.auto_configure_device_map(num_gpus, spec)
            if spec is version and pre_seq_len:
                device_map["transformer.prefix_encoder"] = 0  # a version name knows nothing of P-Tuning
            assert utils.device_map_problems(model, device_map) == [], (num_gpus, spec)
            check_device_map(model, device_map)  # accelerate agrees
            layers = {k: v for k, v in device_map.items() if k.startswith(layer + ".")}
            assert layers == _original_split(num_gpus, layer)
            assert [list(layers.values()).count(g) for g in range(num_gpus)] == LAYERS_PER_GPU[num_gpus]
            assert all(device_map[k] == 0 for k in first)
            assert set(device_map) == set(layers) | set(first) | (
                {"transformer.prefix_encoder"} if pre_seq_len else set()
            )
    if version == "v1":  # the tied lm_head / word_embeddings pair is checked as one tensor
        assert "lm_head.weight" in dict(model.named_parameters(remove_duplicate=False))


def test_device_map_problems_are_found():
    model = _meta_model("v2")
    good = utils.auto_configure_device_map(2, "v2")
    assert utils.device_map_problems(model, good) == []
    missing = {k: v for k, v in good.items() if k != "transformer.rotary_pos_emb"}
    assert utils.device_map_problems(model, missing) == ["no device for transformer.rotary_pos_emb.inv_freq"]
    original_v2 = dict(good, lm_head=0)  # THUDM's v2 map names a module that v2 does not have
    assert utils.device_map_problems(model, original_v2) == ["'lm_head' names no module of the model"]
    twice = dict(good, **{"transformer.encoder": 1})
    assert any("placed 2 times" in p for p in utils.device_map_problems(model, twice))
    v1 = _meta_model("v1")
    tied = dict(utils.auto_configure_device_map(2, "v1"), lm_head=1)
    assert any(p.startswith("tied weights on different devices") for p in utils.device_map_problems(v1, tied))
    with pytest.raises(ValueError, match="does not fit"):
        utils.check_device_map(model, missing)
    with pytest.raises(ValueError, match="at least 1"):
        utils.auto_configure_device_map(0)


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_auto_device_map_respects_per_gpu_memory(version):
    model = _meta_model(version, pre_seq_len=16)
    size = sum(p.numel() * p.element_size() for p in model.parameters())  # ~12.5 GB in fp16
    device_map = utils.infer_device_map(model, 2, max_memory={0: int(size * 0.7), 1: int(size * 0.7), "cpu": 0})
    assert utils.device_map_problems(model, device_map) == []
    assert set(device_map.values()) == {0, 1}  # both GPUs used, nothing offloaded
    on = {
        g: sum(
            p.numel() * p.element_size()
            for n, p in model.named_parameters()
            if any((n + ".").startswith(k + ".") and d == g for k, d in device_map.items())
        )
        for g in (0, 1)
    }
    assert max(on.values()) <= 0.7 * size
    small = utils.infer_device_map(model.config, 2, max_memory={0: size // 4, 1: size // 4, "cpu": 2 * size})
    assert "cpu" in small.values() and utils.device_map_problems(model, small) == []
    int4 = utils.infer_device_map(
        model.config, 2, max_memory={0: size // 4, 1: size // 4, "cpu": 2 * size}, quantization_bit=4
    )
    assert set(int4.values()) == {0, 1}  # INT4 weights fit where fp16 did not


# --- dispatch over several devices -----------------------------------------------------------------------


def _as_cpu_and_disk(device_map):
    return {k: ("cpu" if d == 0 else "disk") for k, d in device_map.items()}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_dispatched_over_two_devices_gives_the_same_logits(tiny_dirs, version):
    ref, tokenizer = utils.load_model_and_tokenizer(tiny_dirs[version], device="cpu", dtype="fp32")
    ids = tokenizer("你好，今天天气怎么样", return_tensors="pt")["input_ids"]
    device_map = _as_cpu_and_disk(utils.auto_configure_device_map(2, ref.config))
    assert set(device_map.values()) == {"cpu", "disk"}
    model, _ = utils.load_model_and_tokenizer(tiny_dirs[version], dtype="fp32", device_map=device_map)
    assert model.hf_device_map == device_map
    assert torch.equal(model(ids).logits, ref(ids).logits)
    kw = dict(history=[], max_length=40, do_sample=False)
    assert model.chat(tokenizer, "你好", **kw) == ref.chat(tokenizer, "你好", **kw)


def test_load_model_on_gpus_like_the_original(tiny_dirs, fake_cuda, monkeypatch):
    import accelerate

    fake_cuda(2)
    seen = {}
    monkeypatch.setattr(
        accelerate, "dispatch_model", lambda model, device_map, **kw: seen.update(device_map=device_map, **kw) or model
    )
    model = utils.load_model_on_gpus(tiny_dirs["v2"], num_gpus=2, trust_remote_code=True)
    assert seen["device_map"] == utils.auto_configure_device_map(2, model.config)
    assert seen["main_device"] == 0 and model.dtype == torch.float16  # .half(), as the original
    model, _ = utils.load_model_and_tokenizer(tiny_dirs["v1"], num_gpus=2)
    assert seen["device_map"] == utils.auto_configure_device_map(2, model.config)
    monkeypatch.setattr(accelerate.utils, "get_max_memory", lambda *a: {0: 10**6, 1: 10**6, "cpu": 10**9})
    model, _ = utils.load_model_and_tokenizer(tiny_dirs["v3"], device_map="auto", quantization_bit=8)
    assert utils.device_map_problems(model, seen["device_map"]) == [] and _quantized(model)
    with pytest.raises(RuntimeError, match="cuda:5"):
        utils.load_model_and_tokenizer(tiny_dirs["v3"], device_map={"": "cuda:5"})


def test_load_model_on_gpus_cpu_offload(tiny_dirs, ids):
    ref = chatglm.load_model(str(tiny_dirs["v3"]), dtype=torch.float32)
    model = utils.load_model_on_gpus(
        tiny_dirs["v3"],
        device_map=_as_cpu_and_disk(utils.auto_configure_device_map(2, ref.config)),
        dtype=torch.float32,
    )
    assert torch.equal(model(ids).logits, ref(ids).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_and_cpu_split_gives_the_same_logits(tiny_dirs, ids):
    one, _ = utils.load_model_and_tokenizer(tiny_dirs["v2"], device="cuda:0", dtype="fp32")
    device_map = {k: ("cpu" if d == 1 else d) for k, d in utils.auto_configure_device_map(2, one.config).items()}
    two, _ = utils.load_model_and_tokenizer(tiny_dirs["v2"], dtype="fp32", device_map=device_map)
    torch.testing.assert_close(two(ids.cuda()).logits, one(ids.cuda()).logits)
