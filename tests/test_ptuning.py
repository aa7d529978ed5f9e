"""ptuning/: P-Tuning v2 training, checkpoints, resume, evaluation, scripts and data checks on tiny models."""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chatglm

pytest.importorskip("rouge_chinese")
pytest.importorskip("jieba")
pytest.importorskip("nltk")

from ptuning.checkpoint import load_model_and_tokenizer  # noqa: E402
from ptuning.main import main, parse_args  # noqa: E402
from ptuning.metrics import compute_metrics, sample_scores  # noqa: E402
from ptuning.preprocess import DataError, eval_features, read_rows, train_features  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PT = REPO / "ptuning"
TRAIN, DEV, CHAT = (str(PT / "data" / n) for n in ("tiny_train.json", "tiny_dev.json", "tiny_chat.json"))
PREFIX = "transformer.prefix_encoder."
QUIET = ["--report_to", "none", "--disable_tqdm", "True", "--log_level", "error", "--seed", "0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A tiny model on a shared 2-core machine: one thread is 10-20x faster than oversubscribed OpenMP.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


PTUNING = ("--pre_seq_len", "4", "--prefix_projection")


def train_argv(model_dir, out, steps=40, chat=False, method=PTUNING):
    data = ["--train_file", CHAT, "--prompt_column", "prompt", "--response_column", "response",
            "--history_column", "history"] if chat else [
            "--train_file", TRAIN, "--prompt_column", "content", "--response_column", "summary"]  # fmt: skip
    return ["--do_train", *data, "--model_name_or_path", str(model_dir), "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--max_steps", str(steps), "--logging_steps", "1",
            "--save_steps", str(steps // 2), "--learning_rate", "2e-2", *method,
            "--max_source_length", "32", "--max_target_length", "24", *QUIET]  # fmt: skip


def logged_losses(out) -> list[float]:
    history = json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]
    return [e["loss"] for e in history if "loss" in e]


def assert_loss_drops(out):
    losses = logged_losses(out)
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    # With lr=0 the two means differ by < 0.05 on this data (batch noise); training drops them by 0.35-0.6.
    assert first - last > 0.2, (first, last, losses)


def sample_logits(model, tok):
    ids = torch.tensor([tok.encode("类型#裙*颜色#红色", add_special_tokens=True)])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def trained(tiny_dirs, tmp_path_factory):
    """One v2 P-Tuning run shared by the checkpoint, evaluation and demo tests: (out dir, trainer)."""
    out = tmp_path_factory.mktemp("pt") / "v2"
    _, trainer = main(train_argv(tiny_dirs["v2"], out))
    return out, trainer


# --- metrics and data ---------------------------------------------------------------------------------


def test_metrics_match_hand_computed_values():
    import jieba

    assert list(jieba.cut("我喜欢喝咖啡")) == ["我", "喜欢", "喝咖啡"]
    assert list(jieba.cut("我喜欢喝茶")) == ["我", "喜欢", "喝茶"]
    s = sample_scores("我喜欢喝咖啡", "我喜欢喝茶")
    # words: 2 of 3 unigrams and 1 of 2 bigrams shared, LCS 2; characters: 4/6, 3/5, 2/4, 1/3 n-gram precisions.
    assert s["rouge-1"] == s["rouge-l"] == 66.6667 and s["rouge-2"] == 50.0
    assert s["bleu-4"] == round(100 * (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, 4)
    assert compute_metrics(["今天天气好", ""], ["今天天气好", "今天"]) == {
        "rouge-1": 50.0, "rouge-2": 50.0, "rouge-l": 50.0, "bleu-4": 50.0,
    }  # fmt: skip


@pytest.mark.parametrize(
    "lines, line, words",
    [
        (['{"content": "a", "summary": "b"}', "", '{"content": "c", "summary": "d"}'], 2, "empty line"),
        (['{"content": "a", "summary": "b"}', '{"content": "a", summary}'], 2, "not valid JSON"),
        (['{"content": "a", "summary": "b"}'] * 3 + ['{"content": "a"}'], 4, "missing column(s) summary"),
        (['["a", "b"]'], 1, "expected a JSON object"),
        (['{"content": "a", "summary": '], 1, "not valid JSON (Expecting value at column 29)"),  # cut short: its end
    ],
)
def test_bad_data_fails_early_with_the_line_number(tmp_path, lines, line, words):
    bad = tmp_path / "bad.json"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"line {line}: {words}")):
        read_rows(str(bad), "content", "summary")
    # main() checks the data before it loads the model: a missing model is not what fails.
    with pytest.raises(DataError, match=f"line {line}"):
        main(["--do_train", "--train_file", str(bad), "--prompt_column", "content", "--response_column", "summary",
              "--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(tmp_path / "o"),
              *QUIET])  # fmt: skip


def test_a_missing_file_that_is_not_read_is_warned_of(tmp_path, caplog):
    """train.sh passes VAL_FILE without --do_eval (as the original): a path that does not exist is said, not read."""
    import types

    from ptuning.main import read_splits

    good = tmp_path / "train.json"
    good.write_text('{"content": "a", "summary": "b"}\n', encoding="utf-8")
    data = types.SimpleNamespace(train_file=str(good), validation_file=str(tmp_path / "nope.json"), test_file=None,
                                 prompt_column="content", response_column="summary", history_column=None,
                                 max_train_samples=None, max_eval_samples=None, max_predict_samples=None)  # fmt: skip
    run = types.SimpleNamespace(do_train=True, do_eval=False, do_predict=False)
    with caplog.at_level("WARNING"):
        splits = read_splits(data, run)
    assert list(splits) == ["train"] and len(splits["train"]) == 1
    assert any("nope.json" in r.message and "no --do_eval" in r.message for r in caplog.records), caplog.text


def test_bad_history_column_is_reported(tmp_path):
    bad = tmp_path / "chat.json"
    bad.write_text('{"prompt": "a", "response": "b", "history": [["q"]]}\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 1: column 'history' must be a list of"):
        read_rows(str(bad), "prompt", "response", "history")


def test_prompt_formats_per_generation(tiny_dirs):
    row = {"query": "你好", "response": "好的", "history": [["早", "早上好"]]}
    for v in ("v1", "v2", "v3"):
        tok = chatglm.load_tokenizer(str(tiny_dirs[v]))
        f = train_features(tok, v, row, 64, 16)
        answer = [t for t in f["labels"] if t != -100]
        text = tok.decode(f["input_ids"])
        if v != "v3":  # the text of the rounds (v1 normalizes "：" to ":")
            prompt_text = tok.decode(tok.encode(tok.build_prompt("你好", row["history"]), add_special_tokens=False))
            assert prompt_text.strip() and prompt_text in text
        if v == "v1":  # prompt [gMASK] <sop> answer <eop>, rounds from 0; <sop> is learned as the original
            assert (
                tok.build_prompt("你好", row["history"]) == "[Round 0]\n问：早\n答：早上好\n[Round 1]\n问：你好\n答："
            )
            assert answer[:1] == [tok.bos_token_id] and answer[-1] == tok.eos_token_id
            assert f["input_ids"][f["labels"].index(tok.bos_token_id) - 1] == tok.gmask_token_id
        else:  # [gMASK] sop prompt answer </s>
            assert f["input_ids"][:2] == tok.get_prefix_tokens() and answer[-1] == tok.get_command("<eos>")
        if v == "v2":
            assert (
                tok.build_prompt("你好", row["history"])
                == "[Round 1]\n\n问：早\n\n答：早上好\n\n[Round 2]\n\n问：你好\n\n答："
            )
        if v == "v3":  # user / assistant turns; the answer follows <|assistant|> and its metadata line
            ids = f["input_ids"]
            assert ids.count(tok.get_command("<|user|>")) == 2 and ids.count(tok.get_command("<|assistant|>")) == 2
            first = next(i for i, t in enumerate(f["labels"]) if t != -100)
            assert ids[first - 1] == tok.get_command("<|assistant|>") and ids[first - 1] not in ids[first:]
        assert tok.decode(answer, skip_special_tokens=True).strip() == "好的"
        prompt = eval_features(tok, v, row, 64, 16)["input_ids"]
        assert f["input_ids"][: len(prompt)] == prompt  # generation starts where the training answer starts


# --- training ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_ptuning_lowers_the_loss(tiny_dirs, tmp_path, version):
    main(train_argv(tiny_dirs[version], tmp_path / "out"))
    assert_loss_drops(tmp_path / "out")


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_ptuning_on_chat_data_with_history(tiny_dirs, tmp_path, version):
    main(train_argv(tiny_dirs[version], tmp_path / "out", chat=True))
    assert_loss_drops(tmp_path / "out")


def test_only_the_prefix_encoder_trains_and_is_saved(tiny_dirs, trained):
    out, trainer = trained
    assert_loss_drops(out)
    model = trainer.model
    assert {k for k, p in model.named_parameters() if p.requires_grad} == {
        k for k in model.state_dict() if k.startswith(PREFIX)
    }
    base = chatglm.load_model(str(tiny_dirs["v2"]), dtype="fp32").state_dict()
    trained_state = model.state_dict()
    assert all(torch.equal(v, trained_state[k]) for k, v in base.items())  # every base weight is unchanged

    half, full = (torch.load(out / f"checkpoint-{n}" / "pytorch_model.bin", weights_only=True) for n in (20, 40))
    assert set(full) == {PREFIX + "embedding.weight"} | {PREFIX + f"trans.{i}.{w}" for i in (0, 2)
                                                          for w in ("weight", "bias")}  # fmt: skip
    assert not torch.equal(half[PREFIX + "embedding.weight"], full[PREFIX + "embedding.weight"])
    config = json.loads((out / "checkpoint-40" / "config.json").read_text())
    assert config["pre_seq_len"] == 4 and config["prefix_projection"] is True


def test_base_plus_checkpoint_reproduces_the_trained_model(tiny_dirs, trained):
    out, trainer = trained
    tok = chatglm.load_tokenizer(str(tiny_dirs["v2"]))
    expected = sample_logits(trainer.model, tok)
    model = chatglm.load_model(str(tiny_dirs["v2"]), dtype="fp32", pre_seq_len=4, prefix_projection=True)
    result = model.load_state_dict(torch.load(out / "checkpoint-40" / "pytorch_model.bin"), strict=False)
    assert not result.unexpected_keys
    assert torch.equal(sample_logits(model, tok), expected)
    # ptuning's loader (evaluate.sh, web_demo.py) reads pre_seq_len and the projection from the checkpoint
    model, _ = load_model_and_tokenizer(str(tiny_dirs["v2"]), ptuning_checkpoint=str(out / "checkpoint-40"))
    assert torch.equal(sample_logits(model, tok), expected)
    with pytest.raises(ValueError, match="pre_seq_len=4, not 8"):
        load_model_and_tokenizer(str(tiny_dirs["v2"]), ptuning_checkpoint=str(out / "checkpoint-40"), pre_seq_len=8)


def test_restart_resumes_from_the_last_checkpoint(tiny_dirs, trained, tmp_path):
    out, _ = trained
    shutil.copytree(out / "checkpoint-20", tmp_path / "checkpoint-20")  # a run stopped after its first save
    main(train_argv(tiny_dirs["v2"], tmp_path))
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 40
    assert logged_losses(tmp_path)[:20] == logged_losses(out)[:20]  # the history came from the checkpoint
    resumed = torch.load(tmp_path / "checkpoint-40" / "pytorch_model.bin")
    straight = torch.load(out / "checkpoint-40" / "pytorch_model.bin")
    assert all(torch.allclose(resumed[k], straight[k], atol=1e-6) for k in straight)


def test_evaluate_writes_predictions_and_metrics(tiny_dirs, trained, tmp_path):
    out, _ = trained
    main(["--do_eval", "--do_predict", "--validation_file", DEV, "--test_file", DEV, "--prompt_column", "content",
          "--response_column", "summary", "--model_name_or_path", str(tiny_dirs["v2"]), "--ptuning_checkpoint",
          str(out / "checkpoint-40"), "--output_dir", str(tmp_path), "--max_source_length", "32",
          "--max_target_length", "8", "--per_device_eval_batch_size", "3", "--predict_with_generate",
          *QUIET])  # fmt: skip
    lines = (tmp_path / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 6 and all(set(r) == {"labels", "predict"} for r in rows)
    assert rows[0]["labels"].startswith("蓝色") and any(r["predict"] for r in rows)  # 8 tokens of each
    for split in ("eval", "predict"):
        metrics = json.loads((tmp_path / f"{split}_results.json").read_text())
        for key in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
            assert 0 <= metrics[f"{split}_{key}"] <= 100


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_predict_generates_from_left_padded_prompts(tiny_dirs, tmp_path, version):
    # Prompts of different lengths in one batch (the chat rows): each generation's padding and masks.
    main(["--do_predict", "--test_file", CHAT, "--prompt_column", "prompt", "--response_column", "response",
          "--history_column", "history", "--model_name_or_path", str(tiny_dirs[version]), "--pre_seq_len", "4",
          "--output_dir", str(tmp_path), "--max_source_length", "96", "--max_target_length", "6",
          "--per_device_eval_batch_size", "4", "--max_predict_samples", "4", "--predict_with_generate",
          *QUIET])  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "generated_predictions.txt").read_text("utf-8").splitlines()]
    assert [r["labels"][:1] for r in rows] == ["可", "冬", "推", "可"]  # 6 tokens of each answer, in order


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_train_and_evaluate_scripts_with_env_overrides(tiny_dirs, tmp_path):
    """train.sh as shipped (INT4 base model by default), shrunk from the environment, then evaluate.sh."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", MODEL_PATH=str(tiny_dirs["v2"]),
               TRAIN_FILE=TRAIN, VAL_FILE=DEV, OUTPUT_DIR=str(tmp_path), PRE_SEQ_LEN="4", MAX_STEPS="4",
               SAVE_STEPS="4", LOGGING_STEPS="1", BATCH_SIZE="2", GRAD_ACCUM="2", MAX_SOURCE_LENGTH="32",
               MAX_TARGET_LENGTH="8", PYTHONPATH=str(REPO))  # fmt: skip
    run = subprocess.run(["bash", str(PT / "train.sh"), *QUIET], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    config = json.loads((tmp_path / "checkpoint-4" / "config.json").read_text())
    assert config["pre_seq_len"] == 4 and config["quantization_bit"] == 4
    assert len(logged_losses(tmp_path)) == 4 and "'loss'" in run.stdout  # progress is printed
    env.update(STEP="4", VAL_FILE=DEV)
    del env["PRE_SEQ_LEN"]  # evaluate.sh reads it (and prefix_projection) from the checkpoint
    run = subprocess.run(["bash", str(PT / "evaluate.sh"), "--max_predict_samples", "2", *QUIET], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert len((tmp_path / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()) == 2


def test_every_script_passes_arguments_main_accepts(tmp_path):
    """Each shell script runs with a stand-in python / deepspeed that records its arguments; main parses them."""
    (tmp_path / "python").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$OUT"\n')
    (tmp_path / "deepspeed").write_text(
        '#!/usr/bin/env bash\nwhile [ "$1" != main.py ]; do shift; done\nprintf "%s\\n" "$@" > "$OUT"\n'
    )
    for stub in ("python", "deepspeed"):
        (tmp_path / stub).chmod(0o755)
    ds = json.loads((PT / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["fp16"]["enabled"] == "auto"
    assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["zero_optimization"]["reduce_bucket_size"] == 5e8
    for script in ("train.sh", "evaluate.sh", "train_chat.sh", "train_lora.sh", "ds_train_finetune.sh",
                   "evaluate_finetune.sh"):  # fmt: skip
        out = tmp_path / f"{script}.args"
        env = dict(os.environ, PYTHON=str(tmp_path / "python"), OUT=str(out), PATH=f"{tmp_path}:{os.environ['PATH']}")
        subprocess.run(["bash", str(PT / script)], env=env, check=True)
        argv = out.read_text().splitlines()
        assert argv[0] == "main.py", (script, argv)
        argv = argv[1:]
        if "--deepspeed" in argv:  # validated above; the flag itself needs deepspeed installed
            assert argv[argv.index("--deepspeed") + 1] == "deepspeed.json"
            del argv[argv.index("--deepspeed") : argv.index("--deepspeed") + 2]
        argv = [a for a in argv if a not in ("--fp16", "--fp16_full_eval")]  # need a GPU
        model_args, data_args, args = parse_args(argv + ["--report_to", "none"])
        if script in ("train.sh", "evaluate.sh"):  # evaluate.sh reads pre_seq_len from the checkpoint
            assert model_args.pre_seq_len == (128 if script == "train.sh" else None)
            assert model_args.quantization_bit == 4
            assert data_args.max_source_length == 64 and data_args.max_target_length == 64
        if script == "train.sh":
            assert args.learning_rate == 2e-2 and args.gradient_accumulation_steps == 16 and args.max_steps == 3000
        if script == "train_chat.sh":
            assert data_args.history_column == "history" and args.learning_rate == 1e-2


# --- LoRA and the web demo ----------------------------------------------------------------------------


def test_lora_trains_only_adapters_saves_peft_files_and_reloads(tiny_dirs, tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    from chatglm.backends import load_model_and_tokenizer as load_for_chat

    _, trainer = main(train_argv(tiny_dirs["v2"], tmp_path, steps=6, method=("--lora_rank", "4")))
    ckpt = tmp_path / "checkpoint-6"
    saved = load_file(ckpt / "adapter_model.safetensors")  # PEFT's file and key names
    assert saved and all(k.startswith("base_model.model.transformer.") and ".lora_" in k for k in saved)
    assert json.loads((ckpt / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert not (ckpt / "pytorch_model.bin").exists()
    base = chatglm.load_model(str(tiny_dirs["v2"]), dtype="fp32").state_dict()
    tuned = {k.replace(".base_layer", ""): v for k, v in trainer.model.state_dict().items() if "lora_" not in k}
    assert tuned.keys() == base.keys() and all(torch.equal(base[k], tuned[k]) for k in base)
    tok = chatglm.load_tokenizer(str(tiny_dirs["v2"]))
    want = sample_logits(trainer.model, tok)
    model, _ = load_model_and_tokenizer(str(tiny_dirs["v2"]), lora_checkpoint=str(ckpt))
    assert torch.equal(sample_logits(model, tok), want)
    with_peft = peft.PeftModel.from_pretrained(chatglm.load_model(str(tiny_dirs["v2"]), dtype="fp32"), str(ckpt))
    assert torch.allclose(sample_logits(with_peft, tok), want, atol=1e-5)
    ours, _ = load_for_chat(str(tiny_dirs["v2"]), device="cpu", dtype="fp32", lora=str(ckpt))  # --lora
    assert torch.allclose(sample_logits(ours, tok), want, atol=1e-5)
    # a run restarted on the same output_dir resumes from the PEFT files
    _, resumed = main(train_argv(tiny_dirs["v2"], tmp_path, steps=8, method=("--lora_rank", "4")))
    assert resumed.state.global_step == 8 and (tmp_path / "checkpoint-8" / "adapter_model.safetensors").is_file()


def test_web_demo_streams_a_reply_with_the_checkpoint(tiny_dirs, trained):
    out, _ = trained
    from ptuning import web_demo

    model, tok = load_model_and_tokenizer(str(tiny_dirs["v2"]), ptuning_checkpoint=str(out / "checkpoint-40"),
                                          training=False)  # fmt: skip
    torch.manual_seed(0)
    steps = list(web_demo.predict(model.eval(), tok, "你好", [], 40, 0.7, 0.95, []))
    chatbot, history = steps[-1]
    assert [m["role"] for m in chatbot] == ["user", "assistant"] and history[0][0] == "你好"
    pytest.importorskip("gradio")
    assert web_demo.create_demo(model, tok) is not None


@pytest.mark.parametrize("script", ["main.py", "web_demo.py"])
def test_ptuning_entry_points_print_one_line_on_a_wrong_model_path(script, tmp_path):
    argv = [sys.executable, str(PT / script), "--model_name_or_path", str(tmp_path / "missing")]
    if script == "main.py":
        argv += ["--do_predict", "--test_file", DEV, "--prompt_column", "content", "--response_column", "summary",
                 "--output_dir", str(tmp_path / "out"), "--report_to", "none"]  # fmt: skip
    else:
        argv += ["--port", "0"]  # (the port is checked first: any free one)
    run = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert run.returncode == 2, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing" in errors[0] and "Traceback" not in run.stderr


@pytest.mark.skipif(shutil.which("bash") is None or not (REPO / ".venv" / "bin" / "python").exists(),
                    reason="needs bash and the repository's .venv")  # fmt: skip
def test_scripts_find_the_repository_venv_themselves():
    """Without PYTHON set, the scripts run main.py with the repository's .venv (bare python3 lacks the packages)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"  # no venv on PATH
    run = subprocess.run(["bash", str(PT / "train.sh"), "--help"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--pre_seq_len" in run.stdout
