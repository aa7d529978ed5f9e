"""The OpenAI routes as a Ray Serve application (issue 35), on a local Ray cluster this test starts and stops:
two replicas of the tiny ChatGLM3 both answer, each as the model answers alone; a replica killed while requests
run is replaced, and every request sent either completes or gets an error, none hangs and none is lost."""

from __future__ import annotations

import socket
import threading
import time

import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install -r requirements-ray.txt)")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from serving.ray_app import REPLICA_HEADER, build_app  # noqa: E402

from .test_servers import until  # noqa: E402

TIMEOUT = 120  # seconds any one request may take, a replica start included
QUESTION = {"model": "chatglm3-6b", "messages": [{"role": "user", "content": "你好"}], "temperature": 0,
            "max_tokens": 12}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(predicate, timeout=TIMEOUT, step=0.5):
    return until(predicate, timeout, step)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"replicas": 2, "tiny_version": "v3", "max_batch": 4}), name="chatglm", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _replicas() -> list[str]:
    """The named actors of the live replicas (no dashboard needed)."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in named if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA"))


def _ask(url, body=QUESTION):
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT)
    return r.status_code, r.headers.get(REPLICA_HEADER.decode()), r.json() if r.status_code == 200 else r.text


def test_both_replicas_answer_as_the_model_alone(cluster):
    from utils import add_model_args, load_from_args

    args = add_model_args(__import__("argparse").ArgumentParser()).parse_args(["--tiny-version", "v3"])
    model, tok = load_from_args(args)
    want = model.chat(tok, "你好", [], do_sample=False, max_new_tokens=12)[0]
    seen, replies = set(), set()
    for _ in range(40):  # Ray's router spreads requests: both replicas take some
        status, replica, body = _ask(cluster)
        assert status == 200, body
        seen.add(replica)
        replies.add(body["choices"][0]["message"]["content"])
        if len(seen) == 2:
            break
    assert len(seen) == 2 and replies == {want}
    models = httpx.get(f"{cluster}/v1/models", timeout=TIMEOUT).json()["data"]
    assert models[0]["id"] == "chatglm3-6b"


def test_a_killed_replica_is_replaced_and_no_request_hangs_or_is_lost(cluster):
    before = _until(lambda: len(_replicas()) == 2 and _replicas())
    results, errors = [None] * 12, []
    body = dict(QUESTION, max_tokens=200)

    def client(i):
        try:
            results[i] = _ask(cluster, body)[:2]
        except httpx.TimeoutException as e:  # a hang: the failure this test looks for
            errors.append(f"request {i} hung: {e}")
        except httpx.HTTPError as e:  # a dropped connection is an error the client sees, not a loss
            results[i] = ("connection error", type(e).__name__)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    time.sleep(1.0)  # requests are running on both replicas
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    for t in threads:
        t.join(TIMEOUT + 10)
    assert not errors and all(r is not None for r in results), (errors, results)  # none hung, none lost
    assert all(r[0] == 200 or r[0] == "connection error" or r[0] >= 500 for r in results), results
    assert any(r[0] == 200 for r in results)
    after = _until(lambda: len(_replicas()) == 2 and before[0] not in _replicas() and _replicas())
    assert before[0] not in after
    tags = set()

    def both_answer():  # the replacement answers once it has loaded the model
        tags.add(_ask(cluster)[1])
        return len(tags) == 2

    _until(both_answer, step=0.1)
    killed = before[0].rsplit("#", 1)[-1]  # SERVE_REPLICA::app#deployment#<replica id>
    assert killed not in tags, (killed, tags)
