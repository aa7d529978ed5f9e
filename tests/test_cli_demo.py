"""cli_demo.py driven in a real pseudo-terminal, as a person uses it; assertions are on what the screen shows."""

import os
import sys

import pytest

pexpect = pytest.importorskip("pexpect")

from .conftest import REPO  # noqa: E402

NAMES = {"v1": "ChatGLM-6B", "v2": "ChatGLM2-6B", "v3": "ChatGLM3-6B"}
REPLY = "ChatGLM：(.*?)\r\n\r\n用户："  # pexpect patterns match across lines (re.DOTALL)


def spawn(tmp_path, args=(), model=None, timeout=60):
    env = dict(os.environ, PYTHONUNBUFFERED="1", CHATGLM_NO_PROGRESS="1", CHATGLM_CACHE=str(tmp_path / "cache"))
    for name in ("MODEL_PATH", "TOKENIZER_PATH", "DEVICE"):
        env.pop(name, None)  # only what the test gives
    if model is not None:
        env["MODEL_PATH"] = str(model)
    return pexpect.spawn(sys.executable, ["cli_demo.py", "--device", "cpu", *args], cwd=str(REPO), env=env,
                         encoding="utf-8", timeout=timeout, dimensions=(40, 200))  # fmt: skip


def finish(child, status=0):
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == status, child.before
    assert "Traceback" not in child.before


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_chat_clear_stop(tiny_dirs, tmp_path, version):
    child = spawn(tmp_path, ["--max-length", "48"], model=tiny_dirs[version])
    welcome = f"欢迎使用 {NAMES[version]} 模型，输入内容即可进行对话，clear 清空对话历史，stop 终止程序"
    child.expect_exact(welcome)
    child.expect_exact("\r\n用户：")
    child.sendline("你好")
    child.expect(REPLY)  # the reply streamed out, then the prompt came back
    assert child.match.group(1).strip()
    child.sendline("再说一句")  # v3 continues from the KV cache; v1 resends the history (may pass --max-length)
    child.expect(REPLY)
    child.sendline("clear")
    child.expect_exact(welcome)
    child.expect_exact("用户：")
    child.sendline("stop")
    finish(child)


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_ctrl_c_stops_the_reply_not_the_session(tiny_dirs, tmp_path, version):
    child = spawn(tmp_path, ["--max-length", "2000"], model=tiny_dirs[version])
    child.expect_exact("用户：")
    for question in ("写一篇很长的文章", "继续"):  # the second turn follows an interrupted one
        child.sendline(question)
        child.expect_exact("ChatGLM：")
        child.expect(r"\S\S\S")  # the reply is streaming out
        child.sendintr()
        child.expect_exact("用户：", timeout=30)  # that reply stopped, the session goes on
    child.sendintr()  # Ctrl-C at the prompt ends the session cleanly
    finish(child)


def test_no_model_uses_the_tiny_model_and_says_so(tmp_path):
    child = spawn(tmp_path, timeout=120)
    child.expect("tiny random ChatGLM3-6B model")
    child.expect_exact("answers are random text")
    child.expect_exact("MODEL_PATH")
    child.expect_exact("欢迎使用 ChatGLM3-6B 模型")
    child.expect_exact("用户：")
    child.sendeof()  # Ctrl-D
    finish(child)


@pytest.mark.parametrize(
    "args, says",
    [(["--top-p", "2"], "--top-p must be from 0 to 1"), (["--temperature", "-1"], "--temperature must be 0"),
     (["--temperature", "nan"], "--temperature must be 0"), (["--max-length", "0"], "--max-length must be at least 1"),
     (["--max-length", "100000"], "--max-length must be at most")],
)  # fmt: skip
def test_sampling_flags_out_of_range_are_one_clear_error(tiny_dirs, tmp_path, args, says):
    child = spawn(tmp_path, args, model=tiny_dirs["v2"])
    finish(child, status=2)
    errors = [line for line in child.before.splitlines() if line.startswith("error:") or "error:" in line]
    assert len(errors) == 1 and says in errors[0], child.before


def test_temperature_zero_is_greedy_and_top_p_zero_is_taken(tiny_dirs, tmp_path):
    """Greedy with --temperature 0 (as the servers): the same reply twice; --top-p 0 samples the top token."""
    replies = []
    for args in (["--temperature", "0"], ["--temperature", "0"], ["--top-p", "0"]):
        child = spawn(tmp_path, ["--max-length", "40", *args], model=tiny_dirs["v2"])
        child.expect_exact("用户：")
        child.sendline("你好")
        child.expect(REPLY)
        replies.append(child.match.group(1).strip())
        child.sendline("stop")
        finish(child)
    assert replies[0] and replies[0] == replies[1] == replies[2]


def test_wrong_model_path_is_one_clear_error(tmp_path):
    child = spawn(tmp_path, ["--model-path", str(tmp_path / "nope")])
    finish(child, status=2)
    lines = [line for line in child.before.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0], lines


@pytest.mark.parametrize("model, tokenizer, says", [("v2", "v1", "ChatGLM-6B's and the model ChatGLM2-6B"),
                                                    ("v3", "real-v3", "more than the model's 640 embedding rows")])  # fmt: skip
def test_a_tokenizer_that_is_not_the_models_is_one_clear_error(tiny_dirs, tmp_path, model, tokenizer, says):
    """Refused at load, before the weights, not as a traceback at the first message."""
    from .conftest import real_model_dir

    path = real_model_dir("v3") if tokenizer == "real-v3" else tiny_dirs[tokenizer]
    child = spawn(tmp_path, ["--tokenizer-path", str(path)], model=tiny_dirs[model])
    finish(child, status=2)
    lines = [line for line in child.before.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the tokenizer in ") and says in lines[0], lines


def test_input_that_is_not_utf8_is_one_line_and_the_session_goes_on(tiny_dirs, tmp_path):
    """A GBK terminal's bytes (or any non-UTF-8 line) get one error line; the next line is answered."""
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1", CHATGLM_NO_PROGRESS="1", CHATGLM_CACHE=str(tmp_path / "cache"),
               MODEL_PATH=str(tiny_dirs["v2"]), PYTHONIOENCODING="utf-8")  # fmt: skip
    gbk = "你好".encode("gbk") + b"\n\xff\xfe\nhi\nstop\n"
    run = subprocess.run([sys.executable, "cli_demo.py", "--device", "cpu", "--max-length", "40"], cwd=str(REPO),
                         env=env, input=gbk, capture_output=True, timeout=120)  # fmt: skip
    out, err = run.stdout.decode("utf-8", "replace"), run.stderr.decode("utf-8", "replace")
    assert run.returncode == 0 and "Traceback" not in out + err, err
    assert err.count("error: that input is not UTF-8 text") == 2, err
    assert out.count("ChatGLM：") == 1  # "hi" was answered, the bad lines were not sent to the model
