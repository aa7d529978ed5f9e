"""PEFT-standard adapters (issue 34): LoRA directories written by PEFT load into our models without PEFT, `--lora`
works in every entry point, `python -m chatglm.adapters` folds an adapter into a plain checkpoint, and ChatGLM3's
finetune_demo P-Tuning output (a whole checkpoint with pre_seq_len) loads as the model or as the prefix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import chatglm
import utils
from chatglm.adapters import apply_lora, merge_lora
from chatglm.adapters import main as merge_main

from .conftest import REPO

PROMPT = "类型#裙*颜色#红色"


def logits(model, tok):
    ids = torch.tensor([tok.encode(PROMPT, add_special_tokens=True)])
    with torch.inference_mode():
        return model.eval()(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def peft_adapters(tiny_dirs, tmp_path_factory):
    """A LoRA adapter per version, written by PEFT itself (as ChatGLM3's finetune_demo does), random (not zero)
    B matrices so that it changes the logits; with the PEFT model's logits."""
    peft = pytest.importorskip("peft")
    out = {}
    for version in ("v1", "v2", "v3"):
        torch.manual_seed(0)
        base = chatglm.load_model(str(tiny_dirs[version]), dtype="fp32")
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"], init_lora_weights=False)
        model = peft.get_peft_model(base, config)
        path = tmp_path_factory.mktemp(f"lora-{version}")
        model.save_pretrained(str(path))
        out[version] = (path, logits(model, chatglm.load_tokenizer(str(tiny_dirs[version]))))
    return out


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_a_peft_lora_adapter_loads_without_peft(tiny_dirs, peft_adapters, version):
    path, want = peft_adapters[version]
    tok = chatglm.load_tokenizer(str(tiny_dirs[version]))
    base = chatglm.load_model(str(tiny_dirs[version]), dtype="fp32")
    plain = logits(base, tok)
    model = apply_lora(base, path)
    got = logits(model, tok)
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    reply = model.chat(tok, "你好", [], do_sample=False, max_new_tokens=6)[0]  # generation goes through it too
    assert isinstance(reply, str)


def test_lora_flag_in_every_entry_point(tiny_dirs, peft_adapters):
    path, want = peft_adapters["v3"]
    parser = utils.add_model_args(__import__("argparse").ArgumentParser())
    args = parser.parse_args(["--model-path", str(tiny_dirs["v3"]), "--device", "cpu", "--dtype", "fp32",
                              "--lora", str(path)])  # fmt: skip
    model, tok = utils.load_from_args(args)
    torch.testing.assert_close(logits(model, tok), want, atol=1e-5, rtol=1e-5)
    int4, _ = utils.load_from_args(parser.parse_args(["--model-path", str(tiny_dirs["v3"]), "--device", "cpu",
                                                      "--quantize", "4", "--lora", str(path)]))  # fmt: skip
    assert torch.allclose(logits(int4, tok), want, atol=0.5)  # on INT4 layers: the adapter on top, INT4's error
    with pytest.raises(ValueError, match="quantized"):
        merge_lora(int4)
    scripts = ["cli_demo.py", "web_demo.py", "api.py", "stream_api.py", "openai_api.py"]
    for script in scripts:
        out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "--lora" in out.stdout, (script, out.stderr[-500:])


def test_merge_writes_a_plain_checkpoint_with_the_adapters_logits(tiny_dirs, peft_adapters, tmp_path, capsys):
    path, want = peft_adapters["v2"]
    merge_main(["--model-path", str(tiny_dirs["v2"]), "--lora", str(path), "--output", str(tmp_path / "merged")])
    merged = chatglm.load_model(str(tmp_path / "merged"), dtype="fp32")
    tok = chatglm.load_tokenizer(str(tmp_path / "merged"))
    torch.testing.assert_close(logits(merged, tok), want, atol=1e-5, rtol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())
    with pytest.raises(SystemExit) as e:  # an existing directory is not overwritten
        merge_main(["--model-path", str(tiny_dirs["v2"]), "--lora", str(path), "--output", str(tmp_path / "merged")])
    assert e.value.code == 2 and "not empty" in capsys.readouterr().err


def test_adapter_errors_are_one_clear_line(tiny_dirs, peft_adapters, tmp_path):
    path, _ = peft_adapters["v2"]
    v1 = chatglm.load_model(str(tiny_dirs["v1"]), dtype="fp32")
    with pytest.raises(ValueError, match="does not fit"):
        apply_lora(v1, path)  # a ChatGLM2 adapter on ChatGLM-6B
    config = json.loads((path / "adapter_config.json").read_text())
    for change, message in (({"peft_type": "PREFIX_TUNING"}, "--ptuning-checkpoint"),
                            ({"use_dora": True}, "use_dora"), ({"bias": "all"}, "bias")):  # fmt: skip
        bad = tmp_path / next(iter(change))
        bad.mkdir()
        (bad / "adapter_config.json").write_text(json.dumps({**config, **change}))
        (bad / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes())
        with pytest.raises(ValueError, match=message):
            apply_lora(chatglm.load_model(str(tiny_dirs["v2"]), dtype="fp32"), bad)
    with pytest.raises(FileNotFoundError, match="LORA_PATH"):
        utils.load_model_and_tokenizer(tiny_dirs["v2"], device="cpu", lora=tmp_path / "none")


def test_chatglm3_finetune_demo_ptuning_output_loads(tiny_dirs, tmp_path):
    """finetune_demo's PREFIX_TUNING sets config.pre_seq_len and saves the whole model: it loads as the model, and
    its prefix as --ptuning-checkpoint on the base model."""
    torch.manual_seed(0)
    tuned = chatglm.load_model(str(tiny_dirs["v3"]), dtype="fp32", pre_seq_len=4)
    with torch.no_grad():
        tuned.transformer.prefix_encoder.embedding.weight.normal_(0, 1)
    tuned.save_pretrained(str(tmp_path / "pt"))
    tok = chatglm.load_tokenizer(str(tiny_dirs["v3"]))
    want = logits(tuned, tok)
    whole = chatglm.load_model(str(tmp_path / "pt"), dtype="fp32")
    torch.testing.assert_close(logits(whole, tok), want)
    on_base, _ = utils.load_model_and_tokenizer(tiny_dirs["v3"], device="cpu", dtype="fp32",
                                                ptuning_checkpoint=tmp_path / "pt")  # fmt: skip
    torch.testing.assert_close(logits(on_base, tok), want)
