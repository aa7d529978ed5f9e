"""cli_demo.py driven in a real pseudo-terminal, as a person uses it."""

import os
import sys

import pytest

pexpect = pytest.importorskip("pexpect")

from .conftest import REPO  # noqa: E402

needs_utils = pytest.mark.skipif(not (REPO / "utils.py").exists(), reason="utils.py is not there yet")


def spawn(env_extra, args=(), timeout=60):
    env = dict(os.environ, PYTHONUNBUFFERED="1", CHATGLM_NO_PROGRESS="1")
    env.pop("MODEL_PATH", None)  # only what the test gives
    env.update(env_extra)
    return pexpect.spawn(sys.executable, ["cli_demo.py", *args], cwd=str(REPO), env=env, encoding="utf-8",
                         timeout=timeout, dimensions=(40, 200))  # fmt: skip


@needs_utils
@pytest.mark.parametrize("version", ["v1", "v3"])
def test_chat_session(tiny_dirs, tmp_path, version):
    child = spawn({"MODEL_PATH": str(tiny_dirs[version]), "CHATGLM_CACHE": str(tmp_path)}, ["--device", "cpu"])
    name = "ChatGLM-6B" if version == "v1" else "ChatGLM3-6B"
    child.expect(f"欢迎使用 {name} 模型")
    child.expect("用户：")
    child.sendline("你好")
    child.expect("ChatGLM：")
    child.expect("用户：")  # the reply streamed out and the prompt came back
    child.sendline("clear")
    child.expect(f"欢迎使用 {name} 模型")
    child.expect("用户：")
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@needs_utils
def test_ctrl_c_stops_the_reply_not_the_session(tiny_dirs, tmp_path):
    child = spawn({"MODEL_PATH": str(tiny_dirs["v2"]), "CHATGLM_CACHE": str(tmp_path)},
                  ["--device", "cpu", "--max-length", "6000"])  # fmt: skip
    child.expect("用户：")
    child.sendline("写一篇很长的文章")
    child.expect("ChatGLM：")
    child.expect(r"\S{5}")  # some of the reply has streamed out
    child.sendintr()
    child.expect("用户：", timeout=30)  # the session is still alive
    child.sendline("你好")
    child.expect("ChatGLM：")
    child.expect("用户：")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@needs_utils
def test_no_model_uses_the_tiny_model_and_says_so(tmp_path):
    child = spawn({"CHATGLM_CACHE": str(tmp_path)}, ["--device", "cpu"], timeout=120)
    child.expect("tiny")
    child.expect("用户：")
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@needs_utils
def test_wrong_model_path_is_one_clear_error(tmp_path):
    child = spawn({"MODEL_PATH": str(tmp_path / "nope"), "CHATGLM_CACHE": str(tmp_path)}, ["--device", "cpu"])
    child.expect("error: ")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    assert "Traceback" not in child.before
