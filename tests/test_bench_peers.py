"""benchmarks/bench_peers.py: the checkpoint it writes, the tokenizer it hands the peers' converters, and a whole
run on a tiny ChatGLM2 shape (every engine installed here runs; one that is not is skipped with a line)."""

import importlib.util
import json
import os
import re
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import bench_peers  # noqa: E402
from benchmarks.bench_load import build_checkpoint  # noqa: E402


def test_checkpoint_is_the_config_cut_to_its_layers_with_real_norms_and_rotary(tiny_dirs, tmp_path):
    from chatglm import load_model

    out = tmp_path / "ckpt"
    build_checkpoint(str(tiny_dirs["v2"] / "config.json"), str(out), layers=3)
    with open(out / "config.json") as f:
        assert json.load(f)["num_layers"] == 3
    model = load_model(str(out), dtype=torch.float32)
    state = model.state_dict()
    assert len({k.split(".")[3] for k in state if ".layers." in k}) == 3
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in state.items() if "layernorm.weight" in k)
    inv = state["transformer.rotary_pos_emb.inv_freq"]
    dim = 2 * inv.numel()
    ref = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    torch.testing.assert_close(inv.float(), ref, rtol=1e-3, atol=0)  # fp16 in the file
    w = state["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"]
    assert 0.015 < w.std().item() < 0.025  # random, at the 0.02 scale
    with torch.no_grad():  # it runs and its logits are finite
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_the_read_floor_reads_every_byte_of_the_blocks_and_the_output_layer(tiny_dirs):
    import torch

    from benchmarks.bench_generate import weight_bytes
    from chatglm.backends import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(tiny_dirs["v2"]), device="cpu", quantization_bit=4)
    tensors = bench_peers.decode_tensors(model)
    blocks, head = weight_bytes(model)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    scale = model.output_head().weight_scale
    assert nbytes == blocks + head + scale.numel() * scale.element_size()  # what a step reads, and the head's scales
    assert any(t.dtype == torch.int8 for t in tensors) and bench_peers.read_in_place(tensors, passes=2) > 0


def test_converter_tokenizer_reads_like_the_originals():
    """The peers' converters read THUDM's tokenizer attributes: the shim gives them from ours."""
    from chatglm import ChatGLMTokenizer
    from tests.conftest import real_model_dir

    ours = ChatGLMTokenizer.from_pretrained(str(real_model_dir("v3")))
    shim = bench_peers.SentencePieceTokenizer(ours)
    n = ours.sp.vocab_size()
    assert shim.tokenizer.sp_model.vocab_size() == n
    assert shim.tokenizer.sp_model.serialized_model_proto()  # what chatglm.cpp writes into its file
    assert "<|system|>" in shim.tokenizer.special_tokens  # how chatglm.cpp tells ChatGLM3 from ChatGLM2
    assert shim._convert_id_to_token(ours.get_command("<|user|>")) == "<|user|>"
    assert shim._convert_id_to_token(ours.get_command("[gMASK]")) == "[gMASK]"
    assert shim._convert_id_to_token(64999) == ""  # a padded row: no text (ours raises there)
    piece = ours.sp.id_to_piece(1000)
    assert shim._convert_id_to_token(1000) == piece
    assert shim.get_vocab()[piece] == 1000


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def test_whole_run_on_a_tiny_chatglm2(tiny_dirs, tmp_path, capsys):
    bench_peers.main(["--workdir", str(tmp_path), "--config", str(tiny_dirs["v2"]), "--layers", "2",
                      "--prompt", "24", "--new", "6", "--reps", "2", "--threads", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"^# bench_peers: .*, \d+ cpus, flags .*CHATGLM_CPU_ISA=", out, re.M)
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if re.match(r"^(ours|chatglm\.cpp|llama\.cpp) ", line)
    }
    assert "ours" in rows
    dec, tok_s = float(rows["ours"][1]), float(rows["ours"][3])
    assert dec > 0 and abs(1e3 / tok_s - dec) <= 0.051  # the same median, decode printed to 0.1 ms
    assert rows["ours"][-3] == "1.00"  # ours x = ours / ours
    assert len(re.findall(r"^# ours rep \d: decode", out, re.M)) == 2
    # ours also alternates steps with reads of its own weights, and says how its decode compares
    paired = re.findall(r"^# ours rep \d: decode .*steps alternated with reads of its weights: step ([\d.]+) ms, "
                        r"read ([\d.]+) ms, (\d+)%", out, re.M)  # fmt: skip
    assert len(paired) == 2 and all(float(d) > 0 and float(r) >= 0 and int(p) >= 0 for d, r, p in paired)
    assert re.search(r"^# ours, decode steps alternated with reads .*; median over reps \d+% of that floor$", out, re.M)
    for engine, module in (("chatglm.cpp", "chatglm_cpp"), ("llama.cpp", "llama_cpp")):
        if not _installed(module):
            assert re.search(rf"^# {re.escape(engine)}: skipped, not installed .*setup_peers\.sh", out, re.M)
            assert engine not in rows
        else:  # installed: converted once, then timed beside ours, or its failure said in one line
            assert engine in rows or re.search(rf"^# {re.escape(engine)}.*(failed|skipped)", out, re.M), out
    # a second run reuses the checkpoint and the converted files
    bench_peers.main(["--workdir", str(tmp_path), "--config", str(tiny_dirs["v2"]), "--layers", "2",
                      "--prompt", "24", "--new", "4", "--reps", "1", "--engines", "ours"])  # fmt: skip
    again = capsys.readouterr().out
    assert "wrote" not in again and "converted" not in again
    assert re.search(r"^ours ", again, re.M)
