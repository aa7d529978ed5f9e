"""The servers under abuse (issue 29): token limits, no 5xx on well-typed input, cancellation, bounded state.

Each test drives a real server on 127.0.0.1 (the FastAPI apps under uvicorn, the Flask app under werkzeug, in
threads of this process so that a test can look inside; the signal tests start the scripts as processes) on the
tiny checkpoints, through an HTTP client. The startup checks call the scripts' main().
"""

import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("flask")

import httpx  # noqa: E402

import api  # noqa: E402
import openai_api  # noqa: E402
import stream_api  # noqa: E402
from serving.requests import MAX_DEPTH, RequestError, allowed_hosts, check_host, context_length  # noqa: E402

from .conftest import REPO  # noqa: E402
from .test_servers import TIMEOUT, TOOLS, Gated, Scripted, expected, serve, until  # noqa: E402


def n_tokens(model, tok, query, history=()):
    return int(model._chat_inputs(tok, model.config.chatglm_version, query, list(history), "user", None)
               ["input_ids"].shape[-1])  # fmt: skip


def nested(depth):
    value = {}
    for _ in range(depth):
        value = {"type": "object", "properties": {"x": value}}
    return value


def openai_post(client, body):
    return client.post("/v1/chat/completions", json=body)


# --- prompt length in tokens ----------------------------------------------------------------------------------


def test_api_refuses_a_prompt_past_the_context_and_says_the_limit(tiny):
    model, tok = tiny["v1"]
    limit = context_length(model)
    long = "你好" * limit  # thousands of tokens, a few KB
    with live(api.create_app(model, tok)) as client:
        r = client.post("/", json={"prompt": long})
        assert r.status_code == 400 and str(limit) in r.json()["detail"], r.text
        assert str(n_tokens(model, tok, long)) in r.json()["detail"]
        # counted with the history: each part alone fits, together they do not
        half = "你好" * (limit // 3)
        r = client.post("/", json={"prompt": half, "history": [[half, half]]})
        assert r.status_code == 400 and "history" in r.json()["detail"], r.text
        # a prompt that fits but leaves max_length no room
        r = client.post("/", json={"prompt": "你好" * 20, "max_length": 10})
        assert r.status_code == 400 and "max_length" in r.json()["detail"]
        r = client.post("/", json={"prompt": "你好", "max_length": 40, "temperature": 0})
        assert r.status_code == 200 and r.json()["response"] == expected(model, tok, "你好", max_length=40)[0]


def test_stream_api_refuses_a_prompt_past_the_context(tiny):
    model, tok = tiny["v3"]
    app = stream_api.create_app(model, tok)
    with live(app) as client:
        r = client.post("/chat", json={"query": "hello " * context_length(model)})
        assert r.status_code == 400 and str(context_length(model)) in r.json()["msg"]


def test_openai_refuses_prompt_plus_max_tokens_past_the_context(tiny):
    model, tok = tiny["v3"]
    limit = context_length(model)
    with live(openai_api.create_app(model, tok)) as client:
        r = openai_post(client, {"messages": [{"role": "user", "content": "hello " * limit}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        r = openai_post(client, {"messages": [{"role": "user", "content": "hello"}], "max_tokens": limit})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "max_tokens" and str(limit) in err["message"]
        r = openai_post(client, {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4


def test_tool_definitions_are_bounded_in_depth_and_rendered_size(tiny):
    model, tok = tiny["v3"]
    deep = [{"type": "function", "function": {"name": "f", "parameters": nested(MAX_DEPTH + 1)}}]
    assert len(json.dumps(deep)) < 2000  # a small body that would render to tens of thousands of tokens
    wide = [{"type": "function", "function": {"name": f"f{i}", "parameters": nested(3)}} for i in range(3000)]
    with live(openai_api.create_app(model, tok)) as client:
        for tools in (deep, wide):
            r = openai_post(client, {"messages": [{"role": "user", "content": "x"}], "tools": tools})
            assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text[:300]
        ok = [{"type": "function", "function": {"name": "f", "parameters": nested(MAX_DEPTH // 2 - 2)}}]
        r = openai_post(client, {"messages": [{"role": "user", "content": "x"}], "tools": ok, "max_tokens": 3})
        assert r.status_code == 200, r.text
    with live(api.create_app(model, tok)) as client:  # the same bound on ChatGLM3 history of api.py
        history = [{"role": "system", "content": "tools", "tools": [deep[0]["function"]]}]
        r = client.post("/", json={"prompt": "x", "history": history})
        assert r.status_code == 400 and "history" in r.json()["detail"]


# --- no 5xx on well-typed input -------------------------------------------------------------------------------


def test_a_vanishing_temperature_decodes_greedily(tiny):
    model, tok = tiny["v2"]
    want = expected(model, tok, "你好", max_length=40)[0]
    with live(api.create_app(model, tok)) as client:
        r = client.post("/", json={"prompt": "你好", "max_length": 40, "temperature": 1e-300})
        assert r.status_code == 200 and r.json()["response"] == want, r.text
    with live(openai_api.create_app(model, tok)) as client:
        body = {"messages": [{"role": "user", "content": "你好"}], "temperature": 1e-300, "max_tokens": 8}
        r = openai_post(client, body)
        assert r.status_code == 200, r.text


def test_openai_seed_outside_what_a_generator_takes_is_a_client_error(tiny):
    with live(openai_api.create_app(*tiny["v2"])) as client:
        for seed in (2**70, -(2**64)):
            r = openai_post(client, {"messages": [{"role": "user", "content": "x"}], "seed": seed})
            assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
        for seed in (2**64 - 1, -1):
            r = openai_post(client, {"messages": [{"role": "user", "content": "x"}], "seed": seed, "max_tokens": 2})
            assert r.status_code == 200, r.text


def test_openai_deeply_nested_tool_call_arguments_are_a_client_error(tiny):
    model, tok = tiny["v3"]
    for args in ("[" * 5000 + "]" * 5000, json.dumps(nested(MAX_DEPTH + 1))):  # RecursionError / too deep
        assert len(args) < 20_000
        call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": args}}
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]  # fmt: skip
        with live(openai_api.create_app(model, tok)) as client:
            r = openai_post(client, {"messages": messages})
            assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text[:300]


@pytest.mark.parametrize("args", ["{1, 2}", "b'raw'", "1j", "1e999", "[" * 300 + "]" * 300])
def test_model_tool_calls_that_json_cannot_carry_come_back_as_text(tiny, args):
    model, tok = tiny["v3"]
    code = f"get_weather\n```python\ntool_call(city={args})\n```"
    body = {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS}
    with live(openai_api.create_app(Scripted(model, tok, code), tok)) as client:
        r = openai_post(client, body)
        assert r.status_code == 200, r.text[:300]
        choice = r.json()["choices"][0]
        assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"
        assert "tool_call(city=" in choice["message"]["content"]
        streamed = client.post("/v1/chat/completions", json=dict(body, stream=True))
        assert streamed.status_code == 200 and "server_error" not in streamed.text


# --- stream_api.py: ids, cancellation, bounded state ----------------------------------------------------------


@contextmanager
def live(app):
    """An HTTP client of `app` served on a free loopback port (uvicorn for FastAPI, werkzeug for Flask)."""
    if hasattr(app, "test_client"):  # Flask
        with serve_flask(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as c:
            yield c
    else:
        with serve(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            yield c


def flask_post(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 200, r.data
    return r.json()


def test_stream_api_issues_unguessable_ids_and_refuses_client_ids(tiny):
    model, tok = tiny["v2"]
    app = stream_api.create_app(model, tok, workers=1)
    with live(app) as client:
        first = flask_post(client, "/chat", {"query": "你好", "max_length": 30, "temperature": 0})
        second = flask_post(client, "/chat", {"query": "你好", "max_length": 30, "temperature": 0})
        assert first["code"] == second["code"] == 0 and first["request_id"] != second["request_id"]
        assert len(first["request_id"]) >= 20  # 18 random bytes, URL-safe
        state = until(lambda: (s := flask_post(client, "/get_response", {"request_id": first["request_id"]}))
                      ["response"]["is_finished"] and s)  # fmt: skip
        assert state["response"]["response"] == expected(model, tok, "你好", max_length=30)[0]
        for guess in ("73", "1", "0", "a"):
            assert flask_post(client, "/get_response", {"request_id": guess})["code"] == 102
        r = client.post("/chat", json={"request_id": "73", "query": "x"})
        assert r.status_code == 400 and "--client-ids" in r.json()["msg"]


def test_stream_api_unread_results_expire(tiny):
    app = stream_api.create_app(*tiny["v2"], workers=1, abandon_ttl=0.2)
    queue = app.extensions["chatglm_queue"]
    with live(app) as client:
        rid = flask_post(client, "/chat", {"query": "x", "max_length": 20})["request_id"]
        until(lambda: queue.entries[rid]["is_finished"])  # finished, never read
        time.sleep(0.3)
        flask_post(client, "/chat", {"query": "y", "max_length": 20})  # any request sweeps
        assert flask_post(client, "/get_response", {"request_id": rid})["code"] == 102
        assert rid not in queue.entries


def test_stream_api_cancel_stops_waiting_and_running_requests(tiny):
    model, tok = tiny["v2"]
    gated = Gated(model)
    app = stream_api.create_app(gated, tok, workers=1, max_waiting=2)
    with live(app) as client:
        running = flask_post(client, "/chat", {"query": "讲个故事", "max_length": 200})["request_id"]
        assert gated.entered.wait(TIMEOUT)
        waiting = flask_post(client, "/chat", {"query": "x", "max_length": 200})["request_id"]
        assert flask_post(client, "/cancel", {"request_id": waiting}) == {"code": 0, "msg": "cancelled"}
        state = flask_post(client, "/get_response", {"request_id": waiting})["response"]
        assert state["is_finished"] and state["error"] == "cancelled" and not state["is_handled"]
        assert flask_post(client, "/cancel", {"request_id": running})["code"] == 0
        gated.gate.set()
        state = until(lambda: (s := flask_post(client, "/get_response", {"request_id": running})["response"])
                      ["is_finished"] and s)  # fmt: skip
        assert state["error"] == "cancelled"
        assert flask_post(client, "/cancel", {"request_id": "nope"})["code"] == 102
        # the worker is free again
        rid = flask_post(client, "/chat", {"query": "你好", "max_length": 30, "temperature": 0})["request_id"]
        state = until(lambda: (s := flask_post(client, "/get_response", {"request_id": rid})["response"])
                      ["is_finished"] and s)  # fmt: skip
        assert state["response"] == expected(model, tok, "你好", max_length=30)[0]


@contextmanager
def serve_flask(app):
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()


def test_stream_api_limits_chunked_bodies_like_the_others(tiny):
    app = stream_api.create_app(*tiny["v2"], max_body_bytes=4096)
    with serve_flask(app) as port:
        for size, status in ((3000, 200), (5000, 413), (200_000, 413)):
            body = json.dumps({"query": "x", "max_length": 20, "padding": "x" * size}).encode()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
            chunks = (body[i : i + 1000] for i in range(0, len(body), 1000))
            conn.request("POST", "/chat", body=chunks, encode_chunked=True,
                         headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})  # fmt: skip
            r = conn.getresponse()
            assert r.status == status, (size, r.status, r.read()[:200])
            if status == 413:
                assert "larger than 4096" in json.loads(r.read())["msg"]
            conn.close()


def test_stream_api_bounds_open_event_streams(tiny):
    model, tok = tiny["v2"]
    gated = Gated(model)
    app = stream_api.create_app(gated, tok, workers=1, max_event_streams=1)
    with serve_flask(app) as port:
        base = f"http://127.0.0.1:{port}"
        rid = http_json(base + "/chat", {"query": "x", "max_length": 30})["request_id"]
        first = urllib.request.urlopen(f"{base}/events/{rid}", timeout=TIMEOUT)
        assert first.readline().startswith(b"data: ")  # open, waiting for tokens
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{base}/events/{rid}", timeout=TIMEOUT)
        assert e.value.code == 503 and "event streams" in json.loads(e.value.read())["msg"]
        gated.gate.set()
        assert b'"is_finished": true' in first.read()  # the reply ends, the stream closes and frees its place
        first.close()
        second = until(lambda: _open(f"{base}/events/{rid}"))
        assert b'"is_finished": true' in second.read()


def _open(url):
    try:
        return urllib.request.urlopen(url, timeout=TIMEOUT)
    except urllib.error.HTTPError:
        return None


def http_json(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        return json.loads(r.read())


# --- cancellation: clients that leave, signals ----------------------------------------------------------------


@pytest.mark.parametrize("server", ["api", "openai"])
def test_a_client_that_leaves_a_plain_request_cancels_its_work(tiny, server):
    model, tok = tiny["v2"]
    if server == "api":
        app, path, body = api.create_app(model, tok), "/", {"prompt": "写一篇长文", "max_length": 8000}
    else:
        app, path = openai_api.create_app(model, tok), "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "写一篇长文"}], "max_tokens": 8000}
    with serve(app) as url:
        host, port = url.rsplit("/", 1)[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        until(lambda: app.state.runner.active == 1)
        time.sleep(0.5)  # generating
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        # 8000 tokens take ~25 s here: the work stops at its next step instead
        until(lambda: app.state.runner.active == 0, timeout=5)
        until(lambda: model.engine.load() == (0, 0), timeout=5)
        small = dict(body, max_length=30) if server == "api" else dict(body, max_tokens=5)
        req = urllib.request.Request(url + path, json.dumps(small).encode(), {"Content-Type": "application/json"})
        start = time.monotonic()
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            assert r.status == 200
        assert time.monotonic() - start < 10


@pytest.mark.parametrize("script, sig, stream", [("api.py", signal.SIGTERM, False), ("openai_api.py", signal.SIGTERM, False),
                                               ("openai_api.py", signal.SIGINT, True), ("stream_api.py", signal.SIGTERM, False)])  # fmt: skip
def test_a_signal_stops_running_work_and_the_server_exits_in_seconds(tiny_dirs, tmp_path, script, sig, stream):
    """SIGTERM or Ctrl+C while a long reply runs: the FastAPI servers give it 2 s, then end it in the API's own way
    (a plain request a 503, a stream an error event and [DONE]) and exit without a traceback."""
    port = free_port()
    env = dict(os.environ, MODEL_PATH=str(tiny_dirs["v2"]), CHATGLM_CACHE=str(tmp_path), CHATGLM_NO_PROGRESS="1")
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, script, "--device", "cpu", "--port", str(port)], cwd=str(REPO), env=env,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:

        def up():
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        until(up, timeout=60, step=0.2)
        path, body = {
            "api.py": ("/", {"prompt": "写一篇长文", "max_length": 8000}),
            "openai_api.py": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "写"}],
                                                       "max_tokens": 8000, "stream": stream}),
            "stream_api.py": ("/chat", {"query": "写一篇长文", "max_length": 8000}),
        }[script]  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        # the real server guards its Host header (DNS rebinding)
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json",
                                                                   "Host": f"rebind.evil.example:{port}"})  # fmt: skip
        assert conn.getresponse().status == 400
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse() if stream or script == "stream_api.py" else None
        if script == "stream_api.py":
            assert json.loads(response.read())["code"] == 0
        time.sleep(1.0)  # generating: 8000 tokens would take tens of seconds
        start = time.monotonic()
        proc.send_signal(sig)
        if script != "stream_api.py":
            response = response or conn.getresponse()
            answer = response.read().decode()
            if stream:  # the stream ends in its own way: an error event, then [DONE]
                events = [line[6:] for line in answer.splitlines() if line.startswith("data: ")]
                assert (
                    events[-1] == "[DONE]" and json.loads(events[-2])["error"]["message"] == "server is shutting down"
                )
            else:
                assert response.status == 503 and "shutting down" in answer
        proc.wait(timeout=10)
        assert time.monotonic() - start < 8, (tmp_path / "server.log").read_text()[-2000:]
        text = (tmp_path / "server.log").read_text()
        assert "Traceback" not in text and "ERROR" not in text, text[-2000:]
        if sig == signal.SIGINT:
            assert proc.returncode == 130
        conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        log.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- Host header, logs, v3 streaming --------------------------------------------------------------------------


def test_allowed_hosts():
    assert allowed_hosts("0.0.0.0") is None and allowed_hosts("::") is None
    assert allowed_hosts("127.0.0.1", ["*"]) is None
    local = allowed_hosts("127.0.0.1", ["Chat.Example"])
    for ok in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "chat.example:80", "LOCALHOST"):
        check_host(ok, local)
    for bad in ("evil.example", "evil.example:8000", "127.0.0.2", "", None, "localhost.evil.example"):
        with pytest.raises(RequestError) as e:
            check_host(bad, local)
        assert e.value.status == 400 and "--allow-host" in e.value.message


def test_servers_refuse_a_foreign_host_header(tiny):
    model, tok = tiny["v2"]
    hosts = allowed_hosts("127.0.0.1")
    body = {"prompt": "你好", "max_length": 60}
    with live(api.create_app(model, tok, allowed_hosts=hosts)) as client:
        r = client.post("/", json=body, headers={"Host": "rebind.evil.example:8000"})
        assert r.status_code == 400 and "--allow-host rebind.evil.example" in r.json()["detail"]
        assert client.post("/", json=body, headers={"Host": "localhost:8000"}).status_code == 200
    with live(openai_api.create_app(model, tok, allowed_hosts=hosts)) as client:
        r = client.get("/v1/models", headers={"Host": "rebind.evil.example"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert client.get("/v1/models", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    app = stream_api.create_app(model, tok, allowed_hosts=hosts)
    with live(app) as client:
        r = client.post("/chat", json={"query": "x"}, headers={"Host": "rebind.evil.example"})
        assert r.status_code == 400 and "DNS rebinding" in r.json()["msg"]
        assert client.post("/chat", json={"query": "x", "max_length": 20}).status_code == 200  # Host: localhost


def test_api_logs_no_conversation_text_at_info(tiny, caplog):
    model, tok = tiny["v2"]
    with caplog.at_level(logging.INFO, logger="api"), live(api.create_app(model, tok)) as client:
        r = client.post("/", json={"prompt": "秘密的问题", "max_length": 30, "temperature": 0})
    reply = r.json()["response"]
    logged = "\n".join(rec.getMessage() for rec in caplog.records if rec.name == "api")
    assert "characters" in logged and "秘密的问题" not in logged and (not reply or reply not in logged)


def content_chunks(client, body):
    r = client.post("/v1/chat/completions", json=dict(body, stream=True))
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return [
        c["choices"][0]["delta"]["content"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")
    ]


def test_v3_plain_reply_streams_token_by_token_and_holds_only_for_tools(tiny):
    model, tok = tiny["v3"]
    text = "Hello there, this is a plain reply in several words"
    body = {"messages": [{"role": "user", "content": "x"}]}
    with live(openai_api.create_app(Scripted(model, tok, text), tok)) as client:
        chunks = content_chunks(client, body)
        assert "".join(chunks) == text and len(chunks) >= 5, chunks
        with_tools = content_chunks(client, dict(body, tools=TOOLS))  # a text reply, held until its line ends
        assert "".join(with_tools) == text and len(with_tools) == 1
    # without tools, a reply whose first line may be a tool's name is held until the line ends, then is text
    call = "get_weather\n```python\ntool_call(city='x')\n```"
    with live(openai_api.create_app(Scripted(model, tok, call), tok)) as client:
        plain = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        assert "".join(content_chunks(client, body)) == plain


def test_stream_api_polls_the_same_deltas_as_the_openai_stream(tiny):
    """stream_api's text only grows (the events.py deltas); a ChatGLM3 tool call arrives as one object."""
    model, tok = tiny["v3"]
    call = "get_weather\n```python\ntool_call(city_name='北京')\n```"
    history = [{"role": "system", "content": "tools", "tools": [TOOLS[0]["function"]]}]
    app = stream_api.create_app(Scripted(model, tok, call), tok, workers=1)
    with live(app) as client:
        rid = flask_post(client, "/chat", {"query": "北京天气", "history": history, "max_length": 2000})["request_id"]
        with client.stream("GET", f"/events/{rid}") as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1]["is_finished"] and events[-1]["response"] == {"name": "get_weather",
                                                                      "parameters": {"city_name": "北京"}}  # fmt: skip
        assert all(e["response"] == "" for e in events[:-1])  # nothing of the call leaks as text first
    text = "Hello there, a plain reply"
    app = stream_api.create_app(Scripted(model, tok, text), tok, workers=1)
    with live(app) as client:
        rid = flask_post(client, "/chat", {"query": "hi", "max_length": 200})["request_id"]
        with client.stream("GET", f"/events/{rid}") as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        replies = [e["response"] for e in events]
        assert replies[-1] == text and all(b.startswith(a) for a, b in zip(replies, replies[1:]))
        assert "".join(e["delta"] for e in events) == text


# --- request bodies: the size limit, numbers past Python's digit limit, a body cut short ----------------------

SERVER_MAINS = {"api.py": api.main, "stream_api.py": stream_api.main, "openai_api.py": openai_api.main}


@pytest.mark.parametrize("script", SERVER_MAINS)
@pytest.mark.parametrize("value", ["-5", "0"])
def test_a_body_limit_below_one_byte_is_refused_at_startup(script, value, monkeypatch, capsys):
    import utils

    def started(args):
        raise AssertionError(f"{script} went on to load the model with --max-body-bytes {value}")

    monkeypatch.setattr(utils, "load_or_exit", started)
    with pytest.raises(SystemExit) as e:
        SERVER_MAINS[script](["--max-body-bytes", value, "--port", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"--max-body-bytes: must be >= 1, not {value}")


@pytest.mark.parametrize("script", SERVER_MAINS)
def test_the_body_limit_says_its_default(script, capsys):
    with pytest.raises(SystemExit) as e:
        SERVER_MAINS[script](["--help"])
    assert e.value.code == 0
    assert f"(default {1 << 20})" in " ".join(capsys.readouterr().out.split())


def test_the_apps_refuse_a_body_limit_below_one_byte(tiny):
    model, tok = tiny["v2"]
    for create in (api.create_app, openai_api.create_app, stream_api.create_app):
        with pytest.raises(ValueError, match="max_body_bytes"):
            create(model, tok, max_body_bytes=0)


def test_a_number_past_the_digit_limit_is_a_client_error_in_http_terms(tiny):
    """json.loads refuses an integer of over 4300 digits with advice to call sys.set_int_max_str_digits(): the
    client gets what is wrong with its request instead (and no RecursionError text for one nested too deeply);
    ordinary JSON errors keep saying where."""
    model, tok = tiny["v2"]
    huge = b'{"prompt": "a", "query": "a", "x": ' + b"1" * 5000 + b"}"
    for app, path, message in ((api.create_app(model, tok), "/", lambda r: r.json()["detail"]),
                               (openai_api.create_app(model, tok), "/v1/chat/completions",
                                lambda r: r.json()["error"]["message"]),
                               (stream_api.create_app(model, tok), "/chat", lambda r: r.json()["msg"])):  # fmt: skip
        with live(app) as client:
            r = client.post(path, content=huge, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, r.text
            assert message(r).startswith("request body is not valid JSON: a number has too many digits"), r.text
            assert "sys." not in r.text and "int_max_str_digits" not in r.text, r.text
            r = client.post(path, content=b'{"prompt": "a",, }', headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and message(r).startswith("request body is not valid JSON: "), r.text
            assert "line 1 column 16" in message(r), r.text
            r = client.post(path, content=b"[" * 100_000, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and "nest too deeply" in message(r) and "recursion" not in r.text, r.text


@contextmanager
def uvicorn_records():
    """What uvicorn logs meanwhile (its error logger: 'Exception in ASGI application' and the traceback)."""
    records, handler, logger = [], logging.Handler(), logging.getLogger("uvicorn.error")
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("server", ["api", "openai"])
def test_a_client_that_leaves_mid_body_costs_no_traceback(tiny, server):
    """Content-Length promises 100 bytes, 15 come, then the socket closes: nobody is left to answer, and the log
    gets at most a line, no traceback; the server goes on serving."""
    model, tok = tiny["v2"]
    app, path = (api.create_app(model, tok), "/") if server == "api" else (openai_api.create_app(model, tok),
                                                                            "/v1/chat/completions")  # fmt: skip
    with serve(app) as url, uvicorn_records() as records:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: 100\r\n\r\n".encode() + b'{"prompt": "hi"')  # fmt: skip
            time.sleep(0.3)  # the app waits for the rest of the body
        time.sleep(0.5)  # the server sees the connection close
        with pytest.raises(urllib.error.HTTPError) as e:  # still serving
            http_json(url + path, {})
        assert e.value.code == 400
        assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR], [r.getMessage() for r in records]
        assert len(records) <= 1
