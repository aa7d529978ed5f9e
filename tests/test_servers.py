"""api.py, stream_api.py and openai_api.py against the real apps on the tiny models.

FastAPI apps through TestClient (and a live uvicorn on loopback for the openai client and disconnects), Flask
through test_client, and api.py once as a real process. Replies use greedy decoding (temperature 0), so every
answer can be checked against model.chat run alone.
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("flask")

from fastapi.testclient import TestClient  # noqa: E402

import api  # noqa: E402
import openai_api  # noqa: E402
import stream_api  # noqa: E402
from chatglm.generation import ChatStep  # noqa: E402
from chatglm.sampling import ForceTokens  # noqa: E402
from serving.events import holdback
from serving.openai_messages import openai_to_chat  # noqa: E402

from .conftest import REPO  # noqa: E402

TIMEOUT = 30  # seconds: the longest any single wait in these tests may take


def expected(model, tokenizer, query, history=None, **gen):
    return model.chat(tokenizer, query, history or [], do_sample=False, **gen)


def until(predicate, timeout=TIMEOUT, step=0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


class Gated:
    """The model, but each reply waits for `gate` before its first step (to hold requests in flight)."""

    def __init__(self, model):
        self._model, self.gate, self.entered = model, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def chat_steps(self, *args, **kwargs):
        self.entered.set()
        if not self.gate.wait(TIMEOUT):
            raise TimeoutError("gate never opened")
        yield from self._model.chat_steps(*args, **kwargs)

    def stream_chat(self, *args, **kwargs):
        return type(self._model).stream_chat(self, *args, **kwargs)  # through this double's chat_steps


class Scripted:
    """The model, but its replies are the given text (then the stop token), through the real chat code."""

    def __init__(self, model, tokenizer, text, stop="<|observation|>"):
        self._model = model
        self.ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.get_command(stop)]

    def __getattr__(self, name):
        return getattr(self._model, name)

    def chat_steps(self, tokenizer, query, history=None, logits_processor=None, **kwargs):
        procs = [*(logits_processor or []), ForceTokens(self.ids)]
        return self._model.chat_steps(tokenizer, query, history, logits_processor=procs, **kwargs)

    def stream_chat(self, *args, **kwargs):
        return type(self._model).stream_chat(self, *args, **kwargs)  # through this double's chat_steps


@contextmanager
def serve(app):
    """A live uvicorn server for `app` on a free loopback port; yields its base URL."""
    uvicorn = pytest.importorskip("uvicorn")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        until(lambda: server.started, timeout=15)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


# --- api.py ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_api_contract(tiny, version):
    model, tok = tiny[version]
    with TestClient(api.create_app(model, tok)) as client:
        r = client.post("/", json={"prompt": "你好", "history": [], "max_length": 48, "temperature": 0})
        assert r.status_code == 200
        body = r.json()
        assert set(body) == {"response", "history", "status", "time"}
        assert body["status"] == 200
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"])
        response, history = expected(model, tok, "你好", max_length=48)
        assert body["response"] == response
        assert body["history"] == json.loads(json.dumps(history))  # pairs become JSON lists
        if version == "v3":
            assert body["history"][0] == {"role": "user", "content": "你好"}
        else:
            assert body["history"] == [["你好", response]]
        # the history comes back as the next request's history
        r = client.post("/", json={"prompt": "再见", "history": body["history"], "max_length": 96, "temperature": 0})
        assert r.status_code == 200 and len(r.json()["history"]) == len(body["history"]) + (2 if version == "v3" else 1)


class Spy:
    """Records the chat arguments and answers at once: the request -> model.chat mapping, without generating."""

    def __init__(self, model):
        self._model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def stream_chat(self, tokenizer, query, history=None, **kwargs):
        self.calls.append(kwargs)
        yield "ok", list(history or []) + [(query, "ok")]

    def chat_steps(self, tokenizer, query, history=None, **kwargs):  # the streaming APIs' entry (serving/events.py)
        self.calls.append(kwargs)
        yield ChatStep(ids=[1, 2], text="ok", delta="ok", grew=True, prompt_tokens=3)


def test_api_passes_parameters_and_keeps_the_model_defaults(tiny):
    spy = Spy(tiny["v1"][0])
    with TestClient(api.create_app(spy, tiny["v1"][1])) as client:
        assert client.post("/", json={"prompt": "hi"}).json()["response"] == "ok"
        client.post("/", json={"prompt": "hi", "history": None, "max_length": None})
        client.post("/", json={"prompt": "hi", "max_length": 100, "top_p": 0.5, "temperature": 0.3})
        client.post("/", json={"prompt": "hi", "temperature": 0})
    # nothing given -> nothing passed: chat() applies the original 2048 / 0.7 / 0.95; only the last step is
    # answered, so a step may bring several tokens (the engine's)
    assert all(c.pop("every_token") is False for c in spy.calls)
    assert spy.calls == [{}, {}, {"max_length": 100, "top_p": 0.5, "temperature": 0.3}, {"do_sample": False}]


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "empty"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"history": []}', 400, "'prompt' is required"),
    (b'{"prompt": 5}', 400, "'prompt' must be a string"),
    (b'{"prompt": "a", "history": "x"}', 400, "'history' must be a list"),
    (b'{"prompt": "a", "history": [["q"]]}', 400, "pair"),
    (b'{"prompt": "a", "history": [[1, 2]]}', 400, "pair"),
    (b'{"prompt": "a", "max_length": 0}', 400, "max_length"),
    (b'{"prompt": "a", "max_length": 10000000}', 400, "max_length"),
    (b'{"prompt": "a", "max_length": 1.5}', 400, "max_length"),
    (b'{"prompt": "a", "max_length": true}', 400, "max_length"),
    (b'{"prompt": "a", "top_p": -0.1}', 400, "top_p"),
    (b'{"prompt": "a", "top_p": 1.5}', 400, "top_p"),
    (b'{"prompt": "a", "top_p": "0.5"}', 400, "top_p"),
    (b'{"prompt": "a", "temperature": -1}', 400, "temperature"),
    (b'{"prompt": "a", "temperature": NaN}', 400, "NaN"),
    (b'{"prompt": "a", "temperature": Infinity}', 400, "Infinity"),
    (b'{"prompt": "\\ud800"}', 400, "surrogate"),
    (b'\xff\xfe{}', 400, "UTF-8"),
    (b'{"prompt": "' + b"x" * 2048 + b'"}', 413, "larger than 1024"),
])  # fmt: skip
def test_api_rejects_bad_requests(tiny, body, status, message):
    model, tok = tiny["v2"]
    with TestClient(api.create_app(model, tok, max_body_bytes=1024)) as client:
        r = client.post("/", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status, r.text
        assert message in r.json()["detail"]
        assert r.json()["status"] == status


@pytest.mark.parametrize("prompt", ["\x00", "🎉👋🏽", "e\u0301\u0301", "שלום مرحبا", "a\u2028b\ufeff", "<|user|>[gMASK]</s>",
                                    "\n\t  ", "", "[[训练时间]]"])  # fmt: skip
def test_api_unicode_edge_cases(tiny, prompt):
    for version in ("v1", "v3"):
        with TestClient(api.create_app(*tiny[version])) as client:
            r = client.post("/", json={"prompt": prompt, "max_length": 64, "temperature": 0})
            assert r.status_code == 200, (version, r.text)


def test_api_deeply_nested_body_is_a_client_error(tiny):
    with TestClient(api.create_app(*tiny["v2"])) as client:
        for depth in (900, 100_000):
            body = b'{"prompt": "a", "max_length": 30, "x": ' + b"[" * depth + b"]" * depth + b"}"
            r = client.post("/", content=body)
            assert r.status_code in (200, 400), r.text  # parsed and ignored, or refused: never a 500
        assert client.post("/", json={"prompt": "a", "max_length": 30}).status_code == 200


def test_api_v3_history_must_be_role_messages(tiny):
    model, tok = tiny["v3"]
    with TestClient(api.create_app(model, tok)) as client:
        for history in ([["q", "a"]], [{"role": "bot", "content": "x"}], [{"role": "user"}],
                        [{"role": "user", "content": "x", "tools": []}]):  # fmt: skip
            r = client.post("/", json={"prompt": "a", "history": history})
            assert r.status_code == 400 and "history" in r.json()["detail"], history
        r = client.post("/", json={"prompt": "a", "history": [{"role": "system", "content": "be brief"}],
                                   "max_length": 40, "temperature": 0})  # fmt: skip
        assert r.status_code == 200


def test_api_concurrent_requests_get_their_own_answers(tiny):
    model, tok = tiny["v2"]
    queries = ["你好", "今天天气", "写一首诗", "hello", "1+1=?", "再见"]
    want = {q: expected(model, tok, q, max_length=40) for q in queries}
    assert len({r for r, _ in want.values()}) > 1  # different prompts, different replies: mixing would show
    with TestClient(api.create_app(model, tok, concurrency=3)) as client:

        def ask(q):
            return q, client.post("/", json={"prompt": q, "history": [], "max_length": 40, "temperature": 0})

        with ThreadPoolExecutor(len(queries) * 2) as pool:
            results = list(pool.map(ask, queries * 2))
    for q, r in results:
        assert r.status_code == 200
        assert (r.json()["response"], [tuple(p) for p in r.json()["history"]]) == want[q]


def test_api_event_loop_serves_while_generating_and_refuses_when_full(tiny):
    gated = Gated(tiny["v2"][0])
    with TestClient(api.create_app(gated, tiny["v2"][1], concurrency=1, max_waiting=1)) as client:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/", json={"prompt": "a", "max_length": 30})
            assert gated.entered.wait(TIMEOUT)
            second = pool.submit(client.post, "/", json={"prompt": "b", "max_length": 30})
            until(lambda: client.app.state.runner.active == 2)
            # a generation is running and one waits: the loop still answers, and the next one is refused
            t0 = time.monotonic()
            assert client.post("/", json={}).status_code == 400
            busy = client.post("/", json={"prompt": "c"})
            assert busy.status_code == 503 and "busy" in busy.json()["detail"]
            assert time.monotonic() - t0 < 5
            gated.gate.set()
            assert first.result(TIMEOUT).status_code == 200
            assert second.result(TIMEOUT).status_code == 200
        assert client.app.state.runner.active == 0


def test_cuda_cache_is_freed_only_on_cuda(tiny, monkeypatch):
    import torch

    def fail():
        raise AssertionError("empty_cache called for a CPU model")

    monkeypatch.setattr(torch.cuda, "empty_cache", fail)
    with TestClient(api.create_app(*tiny["v2"])) as client:
        assert client.post("/", json={"prompt": "hi", "max_length": 30}).status_code == 200


def test_api_runs_as_a_process(tiny_dirs, tmp_path):
    if not (REPO / "utils.py").exists():
        pytest.skip("utils.py is not there yet")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = dict(os.environ, MODEL_PATH=str(tiny_dirs["v2"]), CHATGLM_CACHE=str(tmp_path), CHATGLM_NO_PROGRESS="1",
               PYTHONUNBUFFERED="1")  # fmt: skip
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "api.py", "--device", "cpu", "--port", str(port)], cwd=str(REPO),
                            env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:

        def up():
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        until(up, timeout=60, step=0.2)
        req = urllib.request.Request(f"http://127.0.0.1:{port}", method="POST",
                                     data=json.dumps({"prompt": "你好", "history": [], "max_length": 40}).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            body = json.loads(r.read())
        assert body["status"] == 200 and body["history"][0][0] == "你好"
        assert body["history"][0][1] == body["response"]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


# --- openai_api.py --------------------------------------------------------------------------------------------


def sse_chunks(lines):
    """The JSON chunks of an SSE body; asserts it ends with [DONE]."""
    data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def stream_post(client, body):
    with client.stream("POST", "/v1/chat/completions", json=dict(body, stream=True)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return sse_chunks(list(r.iter_lines()))


def test_openai_models(tiny):
    with TestClient(openai_api.create_app(*tiny["v3"])) as client:
        body = client.get("/v1/models").json()
        assert body["object"] == "list" and body["data"][0]["id"] == "chatglm3-6b"
        assert body["data"][0]["object"] == "model"


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_openai_stream_concatenates_to_the_plain_answer(tiny, version):
    model, tok = tiny[version]
    messages = [{"role": "system", "content": "你是一个助手"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "讲个故事"}]  # fmt: skip
    body = {"model": "x", "messages": messages, "temperature": 0, "max_tokens": 24}
    with TestClient(openai_api.create_app(model, tok)) as client:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        full = r.json()
        assert full["object"] == "chat.completion" and full["model"] == "x"
        choice = full["choices"][0]
        assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
        usage = full["usage"]
        assert usage["completion_tokens"] == 24
        assert usage["total_tokens"] == usage["prompt_tokens"] + 24 and usage["prompt_tokens"] > 10
        # the same as the model's own chat on the converted conversation
        query, history, role = openai_to_chat(version, messages)
        reply, _ = expected(model, tok, query, history, max_new_tokens=24)
        assert choice["message"]["content"] == reply

        chunks = stream_post(client, dict(body, stream_options={"include_usage": True}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == choice["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage


def test_openai_stop_sequences(tiny):
    model, tok = tiny["v2"]
    body = {"messages": [{"role": "user", "content": "讲个故事"}], "temperature": 0, "max_tokens": 30}
    with TestClient(openai_api.create_app(model, tok)) as client:
        answer = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        assert len(answer) > 8
        stop = answer[6:8]
        want = answer[: answer.find(stop)]
        r = client.post("/v1/chat/completions", json=dict(body, stop=[stop, "never-said"])).json()
        assert r["choices"][0]["message"]["content"] == want and r["choices"][0]["finish_reason"] == "stop"
        chunks = stream_post(client, dict(body, stop=stop))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == want and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_holdback_keeps_what_may_still_change():
    assert holdback("abc", "v2") == 0
    assert holdback("abc[[训", "v2") == 3  # could become [[训练时间]], which the model's reply rewrites
    assert holdback("中文,", "v1") == 1 and holdback("中文,", "v2") == 0  # v1 full-width punctuation
    assert holdback("hello wor", "v2", ["world"]) == 3


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 2.5}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": -0.1}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": "1"}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 0}, "repetition_penalty"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}, "messages"),
])  # fmt: skip
def test_openai_errors_in_openai_shape(tiny, body, param):
    with TestClient(openai_api.create_app(*tiny["v2"])) as client:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param
        assert client.post("/v1/chat/completions", content=b"{oops").json()["error"]["message"]
        assert client.get("/v1/nothing").json()["error"]["message"]


def test_openai_passes_sampling_parameters(tiny):
    spy = Spy(tiny["v2"][0])
    body = {"messages": [{"role": "user", "content": "x"}], "temperature": 0.5, "top_p": 0.9, "max_tokens": 7,
            "repetition_penalty": 1.2}  # fmt: skip
    with TestClient(openai_api.create_app(spy, tiny["v2"][1])) as client:
        assert client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] == "ok"
        client.post("/v1/chat/completions", json={"messages": body["messages"], "temperature": 0})
        client.post("/v1/chat/completions", json={"messages": body["messages"], "seed": 3})
    assert all(c["every_token"] is False for c in spy.calls)  # a step may bring several tokens (the engine's)
    first, greedy, seeded = ({k: v for k, v in c.items() if k not in ("logits_processor", "every_token")}
                             for c in spy.calls)  # fmt: skip
    assert first == {"temperature": 0.5, "top_p": 0.9, "max_new_tokens": 7, "repetition_penalty": 1.2}
    assert greedy == {"do_sample": False}
    assert set(seeded) == {"generator"}


def test_openai_seed_makes_sampling_repeatable(tiny):
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 16, "temperature": 1.0, "seed": 11}
    with TestClient(openai_api.create_app(*tiny["v2"])) as client:
        a, b = (client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"] for _ in range(2))
    assert a == b


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip


def test_openai_tool_calls_v3(tiny):
    model, tok = tiny["v3"]
    scripted = Scripted(model, tok, "get_weather\n```python\ntool_call(city='北京', days=3)\n```")
    body = {"messages": [{"role": "user", "content": "北京天气怎么样"}], "tools": TOOLS}
    with TestClient(openai_api.create_app(scripted, tok)) as client:
        r = client.post("/v1/chat/completions", json=body).json()
        choice = r["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "北京", "days": 3}

        chunks = stream_post(client, body)
        calls = [c["choices"][0]["delta"]["tool_calls"] for c in chunks if c["choices"][0]["delta"].get("tool_calls")]
        assert len(calls) == 1 and calls[0][0]["index"] == 0
        assert json.loads(calls[0][0]["function"]["arguments"]) == {"city": "北京", "days": 3}
        assert not any(c["choices"][0]["delta"].get("content") for c in chunks)  # nothing of the call leaks as text
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

        # the call and its result go back as history; the tool result is an observation turn
        follow = dict(body, messages=body["messages"] + [choice["message"],
                      {"role": "tool", "tool_call_id": call["id"], "content": "晴，25度"}])  # fmt: skip
        assert client.post("/v1/chat/completions", json=follow).status_code == 200
    query, history, role = openai_to_chat("v3", follow["messages"], [TOOLS[0]["function"]])
    assert role == "observation" and query == "晴，25度"
    assert history[0]["tools"] == [TOOLS[0]["function"]] and history[0]["role"] == "system"
    assert history[-1] == {"role": "assistant", "metadata": "get_weather",
                           "content": "```python\ntool_call(city='北京', days=3)\n```"}  # fmt: skip


def test_openai_tool_call_arguments_are_never_evaluated(tiny):
    model, tok = tiny["v3"]
    scripted = Scripted(model, tok, "get_weather\n```python\ntool_call(city=__import__('os').getcwd())\n```")
    with TestClient(openai_api.create_app(scripted, tok)) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "tools": TOOLS})
    choice = r.json()["choices"][0]
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] != "tool_calls"
    assert "__import__" in choice["message"]["content"]  # returned as text, not run


def test_openai_tools_need_chatglm3(tiny):
    with TestClient(openai_api.create_app(*tiny["v2"])) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "tools": TOOLS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


def test_openai_client_against_live_server(tiny):
    openai = pytest.importorskip("openai")
    model, tok = tiny["v3"]
    with serve(openai_api.create_app(model, tok)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        assert [m.id for m in client.models.list()] == ["chatglm3-6b"]
        messages = [{"role": "system", "content": "简短回答"}, {"role": "user", "content": "你好"}]
        full = client.chat.completions.create(model="chatglm3-6b", messages=messages, temperature=0, max_tokens=20)
        assert full.usage.completion_tokens == 20
        parts = []
        for chunk in client.chat.completions.create(model="chatglm3-6b", messages=messages, temperature=0,
                                                    max_tokens=20, stream=True):  # fmt: skip
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        assert "".join(parts) == full.choices[0].message.content
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="chatglm3-6b", messages=messages, top_p=5)


def test_openai_client_disconnect_frees_the_worker(tiny):
    import http.client

    model, tok = tiny["v2"]
    app = openai_api.create_app(model, tok)
    body = json.dumps({"messages": [{"role": "user", "content": "写一篇长文"}], "stream": True, "max_tokens": 8000})
    with serve(app) as url:
        host, port = url.rsplit("/", 1)[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.readline().startswith(b"data: ")  # streaming has begun
        until(lambda: app.state.runner.active == 1)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        # 8000 tokens take ~25 s here: the worker stops at its next step instead
        until(lambda: app.state.runner.active == 0, timeout=5)
        with urllib.request.urlopen(urllib.request.Request(
                url + "/v1/chat/completions", method="POST", headers={"Content-Type": "application/json"},
                data=json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}).encode()),
                timeout=TIMEOUT) as r:  # fmt: skip
            assert json.loads(r.read())["usage"]["completion_tokens"] <= 5


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_openai_batches_concurrent_requests_each_answered_as_alone(tiny, version):
    """8 clients at once through the engine: every answer is the one its request gets alone (greedy), and the
    engine's decode steps were shared between them."""
    model, tok = tiny[version]
    questions = [f"问题 {i}: " + "你好" * i for i in range(8)]
    lengths = [6 + 3 * (i % 4) for i in range(8)]
    alone = [expected(model, tok, q, max_new_tokens=n)[0] for q, n in zip(questions, lengths)]
    with TestClient(openai_api.create_app(model, tok, max_batch=4)) as client:
        engine = model.engine

        def ask(i):
            body = {"messages": [{"role": "user", "content": questions[i]}], "temperature": 0,
                    "max_tokens": lengths[i]}  # fmt: skip
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
        assert answers == alone
        assert engine.steps < sum(lengths)  # batched: fewer decode forwards than tokens
    assert getattr(model, "engine", None) is None  # the app's shutdown stopped and removed it


def test_openai_follow_up_turn_prefills_only_its_new_tokens(tiny):
    """The OpenAI API is stateless: the second turn sends the whole conversation again. The engine finds the first
    turn's keys still kept in its slot and prefills only what is new; the answer is the one computed cold."""
    model, tok = tiny["v3"]
    first = [{"role": "user", "content": "你好, " * 20}]
    with TestClient(openai_api.create_app(model, tok, max_batch=2)) as client:
        body = {"messages": first, "temperature": 0, "max_tokens": 12}
        answer = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "再说一遍"}]
        before = model.engine.reused
        r = client.post("/v1/chat/completions", json={"messages": second, "temperature": 0, "max_tokens": 8})
        reused = model.engine.reused - before
        prompt_tokens = r.json()["usage"]["prompt_tokens"]
    first_prompt = len(tok.build_chat_input("你好, " * 20, history=[])["input_ids"][0])
    assert first_prompt <= reused < prompt_tokens  # at least the first turn's prompt was not read again
    history = [{"role": "user", "content": "你好, " * 20}, {"role": "assistant", "content": answer}]
    assert r.json()["choices"][0]["message"]["content"] == expected(model, tok, "再说一遍", history,
                                                                    max_new_tokens=8)[0]  # fmt: skip


def test_openai_answers_503_with_retry_after_when_every_slot_and_the_queue_are_taken(tiny):
    model, tok = tiny["v2"]
    body = {"messages": [{"role": "user", "content": "写一篇长文"}], "stream": True, "max_tokens": 8000}
    app = openai_api.create_app(model, tok, max_batch=2, max_waiting=0)
    with serve(app) as url:
        import http.client

        host, port = url.rsplit("/", 1)[1].split(":")
        held = []
        for _ in range(2):  # two long streams take both slots
            conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                         headers={"Content-Type": "application/json"})  # fmt: skip
            resp = conn.getresponse()
            assert resp.status == 200 and resp.readline().startswith(b"data: ")
            held.append((conn, resp))
        until(lambda: model.engine.load() == (2, 0))
        req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=TIMEOUT)
        assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
        assert json.loads(refused.value.read())["error"]["type"] == "server_busy"
        for conn, _ in held:  # the clients leave: their slots free up
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()
        until(lambda: model.engine.load() == (0, 0), timeout=10)


# --- stream_api.py --------------------------------------------------------------------------------------------


def post(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 200, r.data
    return r.get_json()


def wait_finished(client, rid):
    return until(lambda: (s := post(client, "/get_response", {"request_id": rid})["response"])["is_finished"] and s)


def test_stream_api_queue_states_codes_and_ttl(tiny):
    model, tok = tiny["v2"]
    gated = Gated(model)
    ttl = 1.0  # long enough that a loaded machine reads a result back in time (right after it is first read)
    app = stream_api.create_app(gated, tok, workers=1, max_waiting=1, ttl=ttl, client_ids=True)
    client = app.test_client()
    try:
        gen = {"max_length": 40, "temperature": 0}
        assert post(client, "/chat", {"request_id": "a", "query": "你好", "history": [], **gen}) == \
            {"code": 0, "msg": "start process"}  # fmt: skip
        assert gated.entered.wait(TIMEOUT)
        state = post(client, "/get_response", {"request_id": "a"})
        assert state["code"] == 0 and state["msg"] == "success"
        assert set(state["response"]) == {"is_finished", "is_handled", "response", "timestamp"}
        assert state["response"]["is_handled"] and not state["response"]["is_finished"]
        assert post(client, "/chat", {"request_id": "a", "query": "x"})["code"] == 101  # still in process
        assert post(client, "/chat", {"request_id": "b", "query": "今天天气", **gen})["code"] == 0
        waiting = post(client, "/get_response", {"request_id": "b"})["response"]
        assert not waiting["is_handled"] and not waiting["is_finished"] and waiting["response"] == ""
        busy = post(client, "/chat", {"request_id": "c", "query": "x"})
        assert busy["code"] == 100 and "busy" in busy["msg"]
        assert post(client, "/get_response", {"request_id": "nope"})["code"] == 102

        gated.gate.set()
        a = wait_finished(client, "a")
        # read: kept ttl seconds more (read again at once), then gone
        assert post(client, "/get_response", {"request_id": "a"})["response"] == a
        b = wait_finished(client, "b")
        assert a["response"] == expected(model, tok, "你好", max_length=40)[0]
        assert b["response"] == expected(model, tok, "今天天气", max_length=40)[0]
        time.sleep(ttl + 0.2)
        assert post(client, "/get_response", {"request_id": "a"})["code"] == 102
        # a finished id may be used again
        assert post(client, "/chat", {"request_id": "b", "query": "again", **gen})["code"] == 0
        wait_finished(client, "b")
    finally:
        gated.gate.set()
        app.extensions["chatglm_queue"].close()


def test_stream_api_keeps_unread_results_past_the_ttl(tiny):
    model, tok = tiny["v2"]
    app = stream_api.create_app(model, tok, workers=1, max_waiting=2, ttl=0.1, client_ids=True)
    client = app.test_client()
    queue = app.extensions["chatglm_queue"]
    try:
        post(client, "/chat", {"request_id": 7, "query": "你好", "max_length": 30, "temperature": 0})
        until(lambda: queue.entries["7"]["is_finished"])  # finished, and nobody has read it
        time.sleep(0.3)
        post(client, "/chat", {"request_id": "other", "query": "x", "max_length": 30})  # requests sweep
        state = post(client, "/get_response", {"request_id": 7})
        assert state["code"] == 0 and state["response"]["is_finished"]
    finally:
        queue.close()


def test_stream_api_idle_workers_take_requests_without_a_waiting_queue(tiny):
    app = stream_api.create_app(*tiny["v2"], workers=1, max_waiting=0, client_ids=True)
    client = app.test_client()
    try:
        assert post(client, "/chat", {"request_id": "x", "query": "hi", "max_length": 30})["code"] == 0
        wait_finished(client, "x")
        assert post(client, "/chat", {"request_id": "y", "query": "hi", "max_length": 30})["code"] == 0
        wait_finished(client, "y")
    finally:
        app.extensions["chatglm_queue"].close()


def test_stream_api_concurrent_requests_are_not_mixed(tiny):
    model, tok = tiny["v2"]
    queries = {f"id-{i}": q for i, q in enumerate(["你好", "今天天气", "写一首诗", "hello", "1+1=?", "再见"])}
    want = {rid: expected(model, tok, q, max_length=40)[0] for rid, q in queries.items()}
    app = stream_api.create_app(model, tok, workers=3, max_waiting=8, client_ids=True)
    client = app.test_client()
    try:
        with ThreadPoolExecutor(len(queries)) as pool:
            codes = list(
                pool.map(
                    lambda kv: post(
                        app.test_client(),
                        "/chat",
                        {"request_id": kv[0], "query": kv[1], "max_length": 40, "temperature": 0},
                    )["code"],
                    queries.items(),
                )
            )
        assert codes == [0] * len(queries)
        for rid in queries:
            assert wait_finished(client, rid)["response"] == want[rid]
    finally:
        app.extensions["chatglm_queue"].close()


@pytest.mark.parametrize("body, status, message", [
    (b"{bad", 400, "not valid JSON"),
    (b'{"query": "x"}', 400, "request_id"),
    (b'{"request_id": true, "query": "x"}', 400, "request_id"),
    (b'{"request_id": "a"}', 400, "'query' is required"),
    (b'{"request_id": "a", "query": "x", "history": [["a", 1]]}', 400, "pair"),
    (b'{"request_id": "a", "query": "x", "top_p": 3}', 400, "top_p"),
    (b'{"request_id": "a", "query": "' + b"x" * 4096 + b'"}', 413, "larger than"),
])  # fmt: skip
def test_stream_api_rejects_bad_requests(tiny, body, status, message):
    app = stream_api.create_app(*tiny["v2"], max_body_bytes=2048, client_ids=True)
    try:
        r = app.test_client().post("/chat", data=body, content_type="application/json")
        assert r.status_code == status and message in r.get_json()["msg"]
    finally:
        app.extensions["chatglm_queue"].close()


def test_stream_api_server_sent_events(tiny):
    model, tok = tiny["v2"]
    app = stream_api.create_app(model, tok, workers=1, client_ids=True)
    client = app.test_client()
    try:
        post(client, "/chat", {"request_id": "s", "query": "讲个故事", "max_length": 40, "temperature": 0})
        r = client.get("/events/s")
        assert r.status_code == 200 and r.mimetype == "text/event-stream"
        events = [json.loads(line[6:]) for line in r.get_data(as_text=True).splitlines() if line.startswith("data: ")]
        assert events[-1]["is_finished"] and not any(e["is_finished"] for e in events[:-1])
        final = events[-1]["response"]
        assert final == expected(model, tok, "讲个故事", max_length=40)[0]
        assert all(e["delta"] is not None for e in events)  # the polled text only grows
        assert "".join(e["delta"] for e in events) == final
        assert client.get("/events/unknown").status_code == 404
    finally:
        app.extensions["chatglm_queue"].close()


def test_stream_api_answers_every_http_error_in_json(tiny):
    app = stream_api.create_app(*tiny["v2"], client_ids=True)
    try:
        client = app.test_client()
        for method, path, status in (("get", "/chat", 405), ("get", "/get_response", 405), ("get", "/nope", 404)):
            r = getattr(client, method)(path)
            assert r.status_code == status and r.is_json, (path, r.data[:80])
            assert r.get_json()["code"] == status and r.get_json()["msg"]
        assert "POST" in client.get("/chat").headers["Allow"]
    finally:
        app.extensions["chatglm_queue"].close()


@pytest.mark.parametrize("script", ["api.py", "stream_api.py", "openai_api.py", "cli_demo.py", "web_demo.py"])
def test_entry_point_with_a_wrong_model_path_prints_one_line(script, tmp_path):
    port = [] if script == "cli_demo.py" else ["--port", "0"]  # (servers check their port first: any free one)
    proc = subprocess.run([sys.executable, script, "--model-path", str(tmp_path / "nonexistent"), "--device", "cpu",
                           *port], cwd=str(REPO), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nonexistent" in errors[0] and "does not exist" in errors[0]


@pytest.mark.parametrize("script", ["api.py", "stream_api.py", "openai_api.py", "web_demo.py"])
def test_a_server_whose_port_is_taken_says_so_before_loading(script, tmp_path):
    """One line at once, not a model loaded for minutes and then a bind error: the port is checked first (the
    model path here does not even exist, and the port is what the error names)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, script, "--model-path", str(tmp_path / "nonexistent"), "--device",
                               "cpu", "--port", str(port)], cwd=str(REPO), capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"cannot listen on 127.0.0.1:{port}" in errors[0], errors


def test_tiny_tool_help_names_the_command_and_every_option():
    proc = subprocess.run([sys.executable, "-m", "chatglm.tiny", "--help"], cwd=str(REPO), capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m chatglm.tiny")
    for help_text in ("generation: v1 ChatGLM-6B", "directory to write", "random seed", "weight file format",
                      "number of weight shards", "replace OUT whole"):  # fmt: skip
        assert help_text in " ".join(proc.stdout.split()), help_text  # every option says what it does


@pytest.mark.parametrize(
    "script", ["benchmarks/bench_generate.py", "benchmarks/bench_engine.py", "benchmarks/bench_servers.py"]
)
def test_benchmark_help_describes_every_option_and_column(script):
    proc = subprocess.run([sys.executable, script, "--help"], cwd=str(REPO), capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    options = [(i, m) for i, line in enumerate(lines) if (m := re.match(r"  (--[a-z-]+)(.*)$", line))]
    assert len(options) >= 6
    for i, m in options:  # a help text on the option's line or the next one
        assert len(m.group(2).split()) > 1 or lines[i + 1].startswith(" " * 10), m.group(1)
    if script.endswith("bench_generate.py"):  # the table's abbreviations are explained
        text = " ".join(proc.stdout.split())
        assert all(f"{abbr} =" in text for abbr in ("sc.ttft, sc.ms/t, sc.t/s", "of flr", "dec x, pre x"))


def test_bench_servers_streams_several_clients_through_openai_api_with_the_replies_they_get_alone():
    """The streaming run of bench_servers (2 clients, 6 tokens, the tiny model): real server processes, every reply
    of the batched clients checked against its prompt's reply alone, tokens counted by the server; then the
    follow-up turn (a first turn of ~60 tokens), timed after its first turn and cold, replies checked too."""
    proc = subprocess.run([sys.executable, "benchmarks/bench_servers.py", "--servers", "none", "--stream-clients", "2",
                           "--stream-tokens", "6", "--follow-up", "60", "--dtype", "fp32"], cwd=str(REPO),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = re.findall(r"run \d: one client +([\d.]+) tok/s, then 2 clients +([\d.]+) tok/s \((\d+) tokens in "
                      r"[\d.]+ s\) = ([\d.]+)x; replies as alone: (\w+)", proc.stdout)  # fmt: skip
    assert len(runs) == 3, proc.stdout
    for one, two, tokens, ratio, same in runs:
        assert same == "True" and 0 < int(tokens) <= 12  # at most max_tokens each, counted by the server
        assert float(one) > 0 and abs(float(two) / float(one) - float(ratio)) < 0.01 + 0.01 * float(ratio)
    assert re.search(r"median [\d.]+x one client", proc.stdout)
    turns = re.findall(r"run \d: (\d+) / (\d+) prompt tokens: after its first turn ([\d.]+) ms, cold ([\d.]+) ms = "
                       r"([\d.]+)% of cold; replies as cold: (\w+) \(cold\), (\w+)", proc.stdout)  # fmt: skip
    assert len(turns) == 3, proc.stdout
    for warm, cold, t_warm, t_cold, share, same, same_warm in turns:  # (fp32 on the tiny model: no near-tie)
        assert same == same_warm == "True" and 60 < int(warm) and abs(int(warm) - int(cold)) <= 2
        assert abs(100 * float(t_warm) / float(t_cold) - float(share)) < 0.5 + 0.02 * float(share)
    bad = subprocess.run([sys.executable, "benchmarks/bench_servers.py", "--servers", "api.py,nope"], cwd=str(REPO),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "unknown nope" in bad.stderr


def test_servers_keep_the_tiny_models_replies_short(capsys):
    """With no model path (the built-in tiny random model) the servers default to 256 new tokens, as the demos
    do, and say so at startup; a request that asks for a length gets it."""
    import argparse

    import utils

    args = utils.add_model_args(argparse.ArgumentParser()).parse_args(["--device", "cpu", "--tiny-version", "v2"])
    model, tokenizer = utils.load_from_args(args)
    assert model.default_max_new_tokens == utils.TINY_MAX_NEW_TOKENS == 256
    assert "kept to 256 tokens" in capsys.readouterr().err
    spy = Spy(model)
    messages = [{"role": "user", "content": "x"}]
    with TestClient(api.create_app(spy, tokenizer)) as client:
        client.post("/", json={"prompt": "hi"})
        client.post("/", json={"prompt": "hi", "max_length": 100})
    with TestClient(openai_api.create_app(spy, tokenizer)) as client:
        client.post("/v1/chat/completions", json={"messages": messages})
        client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 7})
    app = stream_api.create_app(spy, tokenizer, client_ids=True)
    try:
        client = app.test_client()
        assert post(client, "/chat", {"request_id": "t", "query": "hi", "history": []})["code"] == 0
        wait_finished(client, "t")
    finally:
        app.extensions["chatglm_queue"].close()
    calls = [{k: v for k, v in c.items() if k in ("max_length", "max_new_tokens")} for c in spy.calls]
    assert calls == [{"max_new_tokens": 256}, {"max_length": 100}, {"max_new_tokens": 256}, {"max_new_tokens": 7},
                     {"max_new_tokens": 256}]  # fmt: skip
    with TestClient(openai_api.create_app(model, tokenizer)) as client:  # the real model stops there
        usage = client.post("/v1/chat/completions", json={"messages": messages, "temperature": 0}).json()["usage"]
        assert usage["completion_tokens"] <= 256


def test_async_runner_stream_marks_quiet_gaps_and_cancels_when_left():
    """AsyncRunner.stream yields the worker's items in order and a None for every `idle` seconds without one (the
    SSE keep-alive: one timer per stream); a consumer that leaves early, or closes the items before taking any
    (a client gone during the first SSE chunk), sets the work's cancel event."""
    import asyncio

    from serving.workers import AsyncRunner

    runner = AsyncRunner(concurrency=2)
    go_on = threading.Event()
    started, stopped = [threading.Event(), threading.Event()], [threading.Event(), threading.Event()]

    def slow(cancel):
        yield "a"
        go_on.wait(10)  # a long prefill: nothing to send until the consumer has seen two keep-alives
        yield "b"

    more, produced = threading.Event(), threading.Event()

    def ready(cancel):
        try:
            yield from range(3)
            more.wait(10)
            yield 3
        finally:
            produced.set()

    def endless(cancel, i):
        started[i].set()
        try:
            while not cancel.is_set():
                yield "x"
                time.sleep(0.01)
        finally:
            stopped[i].set()

    async def main():
        got = []
        async for item in runner.stream(slow, idle=0.05):
            got.append(item)
            if got.count(None) == 2:
                go_on.set()
        go_on.clear()
        threading.Timer(0.2, go_on.set).start()
        quiet = [item async for item in runner.stream(slow)]  # no idle: no markers
        behind = []
        async for item in runner.stream(ready, idle=0.05):  # a slow consumer: items wait, no marker is added
            behind.append(item)
            if item == 2:
                more.set()
                produced.wait(10)  # blocking the loop: item 3 is queued before any timer runs
            await asyncio.sleep(0.12)
        items = runner.stream(lambda cancel: endless(cancel, 0), idle=0.05)
        first = await items.__anext__()
        await items.aclose()  # the client left
        assert await asyncio.to_thread(stopped[0].wait, 10)
        unread = runner.stream(lambda cancel: endless(cancel, 1), idle=0.05)
        await asyncio.to_thread(started[1].wait, 10)  # its work runs (work closed before it starts never starts)
        await unread.aclose()  # left before taking the first item
        assert await asyncio.to_thread(stopped[1].wait, 10)  # at once, not when the items are dropped
        return got, quiet, first, behind

    try:
        got, quiet, first, behind = asyncio.run(main())
    finally:
        go_on.set()
        runner.close()
    assert [x for x in got if x is not None] == ["a", "b"] and got.count(None) >= 2 and got[-1] == "b"
    assert quiet == ["a", "b"] and first in ("x", None) and behind == [0, 1, 2, 3]
    for _ in range(100):
        if runner.active == 0:
            break
        time.sleep(0.05)
    assert runner.active == 0 and not runner._cancels
