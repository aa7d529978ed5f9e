"""The web demos as a person uses them: web_demo.py (Gradio) and web_demo_streamlit.py in a real headless Chromium,
and web_demo_streamlit.py through Streamlit's AppTest. Screenshots go to artifacts/."""

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from kernels.settings import settings

from .conftest import REPO

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = REPO / "artifacts"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,1000"]  # fmt: skip
QUESTION = "你好, what is $E=mc^2$?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, env_extra, log_path, url, timeout=90):
    """Start a demo as a subprocess and wait until it answers HTTP; its output goes to log_path."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", CHATGLM_NO_PROGRESS="1", GRADIO_ANALYTICS_ENABLED="False")
    env.pop("MODEL_PATH", None)
    env.update(env_extra)
    log = open(log_path, "w")  # closed by stop_server
    proc = subprocess.Popen([sys.executable, *args], cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    pytest.fail(f"{args[0]} did not start serving {url}:\n{open(log_path).read()[-3000:]}")


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    proc.log.close()


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"browser tests need Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    with tempfile.TemporaryDirectory() as profile:
        for flag in [*CHROME_FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(60)
        try:
            yield driver
        finally:
            driver.quit()


def wait_for(driver, condition, timeout=60, what="the page"):
    """Poll condition() until it is truthy. An element that the page re-renders between finding it and reading it
    (Gradio replaces the chat's nodes as it updates them) makes that poll try again rather than fail the test."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])
    return wait.until(lambda d: condition(), f"waiting for {what}")


def screenshot(driver, name: str):
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path))
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000, f"{path} is not a real PNG"


def test_gradio_web_demo_in_a_browser(browser, tiny_dirs, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    args = ["web_demo.py", "--device", "cpu", "--port", str(port), "--max-length", "48"]
    env = {"MODEL_PATH": str(tiny_dirs["v2"]), "CHATGLM_CACHE": str(tmp_path)}  # ChatGLM2: the KV cache in state
    proc = start_server(args, env, tmp_path / "log", url)
    d = browser

    def messages(role):
        return [e.text for e in d.find_elements(By.CSS_SELECTOR, f"#chatbot [data-testid={role}]")]

    try:
        d.set_window_size(1400, 860)
        d.get(url)
        box = wait_for(d, lambda: d.find_elements(By.CSS_SELECTOR, "#user-input textarea"), what="the input box")[0]
        sliders = [e.get_attribute("value") for e in d.find_elements(By.CSS_SELECTOR, "input[type=number]")]
        assert sliders == ["48", "0.8", "0.95"]  # --max-length, then ChatGLM2's top_p / temperature defaults
        in_view = (
            "const r = document.querySelector('#submit').getBoundingClientRect(); return [r.top, r.bottom, innerHeight]"
        )
        top, bottom, height = d.execute_script(in_view)
        assert 0 <= top and bottom <= height, (top, bottom, height)  # Submit is on screen without scrolling
        box.send_keys("first line")
        ActionChains(d).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        assert box.get_attribute("value") == "first line\n" and not messages("user")  # Shift+Enter: a new line
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(QUESTION, Keys.ENTER)  # Enter sends
        wait_for(d, lambda: messages("user") and any(t.strip() for t in messages("bot")), what="the streamed answer")
        assert ["".join(t.split()) for t in messages("user")] == ["你好,whatisE=mc2?"]  # LaTeX rendered by KaTeX ...
        assert d.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=user] .katex")  # ... not shown as source
        assert box.get_attribute("value") == ""
        screenshot(d, "web_demo.png")

        first = d.current_window_handle  # a second user has a history of their own
        d.switch_to.new_window("tab")
        d.get(url)
        wait_for(d, lambda: d.find_elements(By.CSS_SELECTOR, "#user-input textarea"), what="the second session")
        assert messages("user") == [] and messages("bot") == []
        d.close()
        d.switch_to.window(first)

        assert len(messages("user")) == 1
        d.find_element(By.CSS_SELECTOR, "#clear").click()
        wait_for(d, lambda: not messages("user") and not messages("bot"), timeout=20, what="an empty chat")
    finally:
        d.set_window_size(1280, 1000)
        stop_server(proc)
    log = (tmp_path / "log").read_text()
    assert "share=True" not in log and "--share" in log  # the launch message names the option, not a code edit


def test_streamlit_demo_in_a_browser(browser, tiny_dirs, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    # no address or statistics flags: the repository's .streamlit/config.toml must keep the page local and quiet
    args = ["-m", "streamlit", "run", "web_demo_streamlit.py", "--server.port", str(port),
            "--server.fileWatcherType", "none", "--", "--device", "cpu", "--max-length", "40"]  # fmt: skip
    env = {"MODEL_PATH": str(tiny_dirs["v3"]), "CHATGLM_CACHE": str(tmp_path)}
    proc = start_server(args, env, tmp_path / "log", url)
    d = browser
    select = "[data-testid=stChatMessage] [data-testid=stChatMessageContent]"
    try:
        d.get(url)
        box = wait_for(d, lambda: d.find_elements(By.CSS_SELECTOR, "textarea"), 90, "the chat input")[0]
        box.send_keys("hello", Keys.ENTER)
        wait_for(d, lambda: len([e for e in d.find_elements(By.CSS_SELECTOR, select) if e.text.strip()]) == 2,
                 90, "the user message and the answer")  # fmt: skip
        assert d.find_elements(By.CSS_SELECTOR, "[data-testid=stChatMessageAvatarUser]")
        screenshot(d, "web_demo_streamlit.png")
        listening = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections("tcp") if c.status == "LISTEN"}
        assert listening == {"127.0.0.1"}, listening  # loopback only, never every interface
        log = (tmp_path / "log").read_text()
        assert "Network URL" not in log and "External URL" not in log and "usage statistics" not in log.lower()
    finally:
        stop_server(proc)


@pytest.mark.parametrize("version,max_batch", [("v1", "4"), ("v3", "4"), ("v3", "1")])
def test_streamlit_demo_with_apptest(tiny_dirs, tmp_path, monkeypatch, version, max_batch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MODEL_PATH", str(tiny_dirs[version]))
    monkeypatch.setattr(settings, "model_cache", str(tmp_path))
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setattr(sys, "argv", ["web_demo_streamlit.py", "--max-batch", max_batch])  # not pytest's arguments
    st.cache_resource.clear()  # the model is cached per process: load this test's one
    try:
        at = AppTest.from_file(str(REPO / "web_demo_streamlit.py"), default_timeout=60).run()
        assert not at.exception
        defaults = {"v1": [2048, 0.7, 0.95], "v3": [8192, 0.8, 0.6]}[version]
        assert [s.label for s in at.sidebar.slider] == ["max_length", "top_p", "temperature"]
        assert [s.value for s in at.sidebar.slider] == defaults
        at.sidebar.slider[0].set_value(32)
        at.chat_input[0].set_value("你好").run()
        at.chat_input[0].set_value("   ").run()  # an empty message is ignored
        at.sidebar.slider[0].set_value(160)  # sent whole, the conversation so far counts: room for a reply
        at.chat_input[0].set_value("再说一遍").run()
        assert not at.exception
        assert [m.name for m in at.chat_message] == ["user", "assistant", "user", "assistant"]
        assert at.chat_message[0].markdown[0].value == "你好"
        assert at.chat_message[2].markdown[0].value == "再说一遍"
        assert len(at.session_state["history"]) == (2 if version == "v1" else 4)
        # one at a time, the next turn continues from the session's cache; batched, the engine keeps the keys
        assert (at.session_state["past_key_values"] is not None) == (version != "v1" and max_batch == "1")
        at.button(key="clean").click().run()
        assert not at.exception
        assert len(at.chat_message) == 0 and at.session_state["history"] == []
        at.chat_input[0].set_value("很长的问题 " * 300).run()  # longer than max_length: cut, with a notice
        assert not at.exception
        assert "only its first" in at.warning[0].value and [m.name for m in at.chat_message] == ["user", "assistant"]
    finally:
        st.cache_resource.clear()


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_gradio_demo_handlers_every_generation(tiny, version):
    """The page's own event handlers, without a browser: sliders' defaults, history and cache kept, empty input."""
    pytest.importorskip("gradio")
    import web_demo

    model, tokenizer = tiny[version]
    demo = web_demo.build_demo(model, tokenizer)
    sliders = [(b.label, b.value) for b in demo.blocks.values() if type(b).__name__ == "Slider"]
    expected = {"v1": [2048, 0.7, 0.95], "v2": [8192, 0.8, 0.95], "v3": [8192, 0.8, 0.6]}[version]
    assert sliders == list(zip(["Maximum length", "Top P", "Temperature"], expected))
    fns = {f.name: f.fn for f in demo.fns.values()}
    chat, history, past = [], [], None
    for text, max_length in [("你好", 32), ("   ", 32), ("再说一遍", 160)]:  # v1's history counts: room for a reply
        box, chat, pending = fns["take_input"](text, chat)
        assert box == ""
        for chat, history, past in fns["predict"](pending, chat, max_length, 0.8, 0.6, history, past):
            pass
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant"]
    assert len(history) == (2 if version != "v3" else 4)
    assert (past is None) == (version == "v1")  # ChatGLM2/3 keep the KV cache for the next turn


class Greedy:
    """The model, replying greedily whatever the sliders say (so a reply can be compared with one alone)."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def stream_chat(self, *args, **kwargs):
        return self._model.stream_chat(*args, **dict(kwargs, do_sample=False))


def test_gradio_demo_generates_several_tabs_together(tiny):
    """With the engine, replies of tabs chatting at once are generated together, each as it would be alone, and a
    tab's next turn reuses the keys its last one left."""
    pytest.importorskip("gradio")
    import web_demo
    from chatglm.engine import attach, detach

    model, tokenizer = tiny["v2"]
    queries = ["你好", "讲个故事"]
    want = {q: model.chat(tokenizer, q, [], max_length=160, do_sample=False)[0] for q in queries}
    engine = attach(model, max_batch=4)
    try:
        demo = web_demo.build_demo(Greedy(model), tokenizer)
        fns = {f.name: f for f in demo.fns.values()}
        assert fns["predict"].concurrency_limit == 4
        peak, stop = [0], threading.Event()

        def monitor():
            while not stop.is_set():
                peak[0] = max(peak[0], engine.load()[0])
                time.sleep(0.002)

        barrier = threading.Barrier(len(queries))

        def tab(query):
            _, chat, pending = fns["take_input"].fn(query, [])
            barrier.wait()
            for state in fns["predict"].fn(pending, chat, 160, 0.8, 0.6, [], None):
                pass
            return state

        watcher = threading.Thread(target=monitor, daemon=True)
        watcher.start()
        with ThreadPoolExecutor(len(queries)) as pool:
            results = list(pool.map(tab, queries))
        stop.set()
        watcher.join()
        assert peak[0] == len(queries)  # in the engine together
        for query, (chat, history, past) in zip(queries, results):
            assert chat[-1]["content"] == want[query] and history == [(query, want[query])] and past is None
        chat, history, _ = results[0]
        reused = engine.reused
        _, chat, pending = fns["take_input"].fn("再说一遍", chat)
        for chat, history, _ in fns["predict"].fn(pending, chat, 200, 0.8, 0.6, history, None):
            pass
        assert chat[-1]["content"] == model.chat(tokenizer, "再说一遍", history[:1], max_length=200, do_sample=False)[0]
        assert engine.reused > reused  # the first turn's keys, kept in its slot
    finally:
        detach(model)


def test_pages_say_when_the_tiny_model_runs(tmp_path, monkeypatch, capsys):
    """With no model path both pages show the notice the terminal prints, in the same words."""
    import argparse

    import streamlit as st
    from streamlit.testing.v1 import AppTest

    import utils
    import web_demo

    monkeypatch.delenv("MODEL_PATH", raising=False)
    monkeypatch.setattr(settings, "model_cache", str(tmp_path))
    args = utils.add_model_args(argparse.ArgumentParser()).parse_args(["--device", "cpu", "--tiny-version", "v2"])
    model, tokenizer = utils.load_from_args(args)
    notice = utils.tiny_notice("v2")
    assert f"Note: {notice}" in capsys.readouterr().err
    demo = web_demo.build_demo(model, tokenizer)
    shown = [c.get("props", {}).get("value") for c in demo.config["components"]]
    assert notice in shown
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setattr(sys, "argv", ["web_demo_streamlit.py"])
    st.cache_resource.clear()
    try:
        at = AppTest.from_file(str(REPO / "web_demo_streamlit.py"), default_timeout=60).run()
        assert not at.exception
        assert [i.value for i in at.info] == [utils.tiny_notice("v3")]  # the page's default tiny model is v3
    finally:
        st.cache_resource.clear()


CONTEXT = {"v1": 2048, "v2": 32768, "v3": 8192}  # the tiny models' context: the releases' configs


def long_exchange(version, tokenizer, tokens: int) -> list:
    """A history of one exchange of more than `tokens` tokens, in the generation's format."""
    text = "很长的问题 " * (tokens // 8 + 1)
    assert len(tokenizer.encode(text, add_special_tokens=False)) > tokens // 2
    if version == "v3":
        return [{"role": "user", "content": text}, {"role": "assistant", "metadata": "", "content": text}]
    return [(text, text)]


class Short(Greedy):
    """The model, noting the max_length each reply is asked for and replying with a few tokens."""

    def __init__(self, model):
        super().__init__(model)
        self.asked = []

    def stream_chat(self, *args, **kwargs):
        self.asked.append(kwargs.pop("max_length"))
        return self._model.stream_chat(*args, **dict(kwargs, max_new_tokens=4))


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_gradio_demo_max_length_ends_at_the_models_context(tiny, version):
    """The Maximum length slider ends at the model's context, as the CLI and the servers do (not the original's
    4096 / 32768), and starts there when asked for more; Gradio refuses more from an API client, and the handler
    itself clamps more to the context."""
    gr = pytest.importorskip("gradio")
    import web_demo
    from serving.requests import context_length

    model, tokenizer = tiny[version]
    assert context_length(model) == CONTEXT[version]
    short = Short(model)
    demo = web_demo.build_demo(short, tokenizer, max_length=10**6)
    slider = next(b for b in demo.blocks.values() if getattr(b, "label", None) == "Maximum length")
    assert (slider.minimum, slider.maximum, slider.value) == (1, CONTEXT[version], CONTEXT[version])
    with pytest.raises(gr.Error, match="greater than maximum"):
        slider.preprocess(CONTEXT[version] + 1)  # what a gradio_client call (/predict) goes through
    fns = {f.name: f.fn for f in demo.fns.values()}
    _, chat, pending = fns["take_input"]("你好", [])
    for chat, history, past in fns["predict"](pending, chat, 10**6, 0.8, 0.6, [], None):
        pass
    assert short.asked == [CONTEXT[version]] and len(history) == (1 if version != "v3" else 2)


@pytest.mark.parametrize("version,max_batch", [("v1", 1), ("v2", 1), ("v3", 1), ("v3", 4)])
def test_gradio_demo_says_when_the_conversation_no_longer_fits(tiny, version, max_batch):
    """A conversation past the model's context, or past the Maximum length, gets a message in the chat saying so
    (and to clear the history), not an empty reply; the history stays as it was."""
    pytest.importorskip("gradio")
    import web_demo

    model, tokenizer = tiny[version]
    demo = web_demo.build_demo(model, tokenizer, max_batch=max_batch)  # 4: the engine, the page's default
    fns = {f.name: f.fn for f in demo.fns.values()}
    history = long_exchange(version, tokenizer, CONTEXT[version])
    shown = [{"role": "user", "content": "…"}, {"role": "assistant", "content": "…"}]
    _, chat, pending = fns["take_input"]("再说一遍", shown)
    *_, (chat, after, past) = fns["predict"](pending, chat, CONTEXT[version], 0.8, 0.6, history, None)
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant"]
    notice = chat[-1]["content"]
    assert f"the model's context is {CONTEXT[version]} tokens" in notice and "Click Clear History" in notice
    assert after == history and past is None
    # within the context, but past a Maximum length that leaves no room for a reply (the original: one token, empty)
    history = long_exchange(version, tokenizer, 32)
    _, chat, pending = fns["take_input"]("你好", [])
    *_, (chat, after, past) = fns["predict"](pending, chat, 16, 0.8, 0.6, history, None)
    notice = chat[-1]["content"]
    assert "a maximum length of 16 leaves no room for a reply" in notice and "click Clear History" in notice
    assert after == history


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_gradio_demo_keeps_a_cached_conversation_within_the_context(tiny, version, monkeypatch):
    """One reply at a time, ChatGLM2/3 continue from the session's KV cache, whose earlier turns max_length does
    not count (as the original): the cache, prompt and reply still stay within the model's context, and once no
    room is left the chat says so."""
    pytest.importorskip("gradio")
    import web_demo
    from chatglm.kv_cache import cache_length

    model, tokenizer = tiny[version]
    monkeypatch.setattr(model.config, "seq_length", 64)  # a context a few turns fill
    demo = web_demo.build_demo(model, tokenizer)
    fns = {f.name: f.fn for f in demo.fns.values()}
    chat, history, past = [], [], None
    for turn in range(30):
        before, kept = history, past
        _, chat, pending = fns["take_input"](f"第{turn}个问题", chat)
        for chat, history, past in fns["predict"](pending, chat, 48, 0.8, 0.6, history, past):
            pass
        if chat[-1]["content"].startswith("This conversation is"):
            break
        assert past is not None and cache_length(past) <= 64
    else:
        pytest.fail("the conversation never filled the context")
    assert turn >= 1 and "the model's context is 64 tokens" in chat[-1]["content"]
    assert history == before and past is kept  # nothing generated: the session stays as it was


def test_gradio_demo_refuses_a_max_length_past_the_context(tiny_dirs, tmp_path, monkeypatch, capsys):
    """--max-length past the model's context is an error, as in cli_demo.py."""
    pytest.importorskip("gradio")
    import web_demo

    monkeypatch.setenv("MODEL_PATH", str(tiny_dirs["v3"]))
    monkeypatch.setattr(settings, "model_cache", str(tmp_path))
    assert web_demo.main(["--device", "cpu", "--port", str(free_port()), "--max-length", "32768"]) == 2
    assert "error: --max-length must be at most 8192 (the model's context), got 32768" in capsys.readouterr().err


def test_streamlit_demo_keeps_to_the_models_context(tiny_dirs, tmp_path, monkeypatch):
    """The max_length slider ends at the model's context; a conversation past it, or past max_length, gets a
    message in the chat instead of an empty reply; --max-length past the context is refused on the page."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from chatglm import load_tokenizer

    monkeypatch.setenv("MODEL_PATH", str(tiny_dirs["v3"]))
    monkeypatch.setattr(settings, "model_cache", str(tmp_path))
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setattr(sys, "argv", ["web_demo_streamlit.py"])
    st.cache_resource.clear()
    try:
        at = AppTest.from_file(str(REPO / "web_demo_streamlit.py"), default_timeout=60).run()
        assert not at.exception
        assert (at.sidebar.slider[0].max, at.sidebar.slider[0].value) == (8192, 8192)
        history = long_exchange("v3", load_tokenizer(str(tiny_dirs["v3"])), 8192)
        at.session_state["history"] = history
        at.chat_input[0].set_value("再说一遍").run()
        assert not at.exception
        assert [m.name for m in at.chat_message] == ["user", "assistant", "user", "assistant"]
        notice = at.chat_message[-1].warning[0].value
        assert "the model's context is 8192 tokens" in notice and "清理会话历史 (clear history)" in notice
        assert at.session_state["history"] == history
        history = long_exchange("v3", load_tokenizer(str(tiny_dirs["v3"])), 32)
        at.session_state["history"] = history
        at.sidebar.slider[0].set_value(16)
        at.chat_input[0].set_value("你好").run()
        assert not at.exception and at.session_state["history"] == history
        assert "a maximum length of 16 leaves no room for a reply" in at.chat_message[-1].warning[0].value
        st.cache_resource.clear()
        monkeypatch.setattr(sys, "argv", ["web_demo_streamlit.py", "--max-length", "32768"])
        at = AppTest.from_file(str(REPO / "web_demo_streamlit.py"), default_timeout=60).run()
        assert not at.exception and not at.chat_input
        assert [e.value for e in at.error] == ["--max-length must be at most 8192 (the model's context), got 32768"]
    finally:
        st.cache_resource.clear()
