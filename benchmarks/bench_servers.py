"""Load test of the three HTTP servers on the tiny model: 32 concurrent clients x 8 requests each, loopback only.

    python benchmarks/bench_servers.py [--clients 32] [--requests 8] [--version v2]

Each server runs as a real process (`python api.py|stream_api.py|openai_api.py --port P`) on the built-in tiny
model written to a temporary directory. Every request carries its own marker in the prompt; an answer counts as
correct when its returned history (api.py) or the request id (stream_api.py) or the completion (openai_api.py)
belongs to that request. Prints throughput, p50/p99 latency, errors and 5xx counts. Bounded: every request has a
timeout and the run stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}


def one_api(base, marker):
    status, out = post(base + "/", {"prompt": marker, "history": [], "max_length": 48})
    return status, status == 200 and out["history"][-1][0] == marker


def one_openai(base, marker):
    body = {"model": "chatglm", "messages": [{"role": "user", "content": marker}], "max_tokens": 24}
    status, out = post(base + "/v1/chat/completions", body)
    return status, status == 200 and out["choices"][0]["message"]["role"] == "assistant"


def one_stream(base, marker, poll=0.2, deadline=120.0):
    status, out = post(base + "/chat", {"request_id": marker, "query": marker, "history": [], "max_length": 48})
    end = time.monotonic() + deadline
    while status == 200 and out.get("code") == 100 and time.monotonic() < end:  # busy: retry later
        time.sleep(poll)
        status, out = post(base + "/chat", {"request_id": marker, "query": marker, "history": [], "max_length": 48})
    while status == 200 and time.monotonic() < end:
        time.sleep(poll)
        status, out = post(base + "/get_response", {"request_id": marker})
        if status != 200 or out.get("code") != 0:
            return status, False
        if out["response"]["is_finished"]:
            return status, True
    return status, False


def run(script, one, clients, requests, model_dir) -> str:
    port = free_port()
    env = dict(os.environ, MODEL_PATH=model_dir, CHATGLM_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, script, "--device", "cpu", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # wait up to 60 s for the server
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        latencies, wrong, errors, lock = [], 0, 0, threading.Lock()

        def client(c):
            nonlocal wrong, errors
            for r in range(requests):
                t = time.perf_counter()
                status, ok = one(base, f"client{c}-request{r}")
                with lock:
                    latencies.append(time.perf_counter() - t)
                    errors += status >= 500
                    wrong += not ok

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        wall = time.perf_counter() - start
        lat = sorted(latencies)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        return (f"{os.path.basename(script):<15} {len(lat) / wall:8.1f} {statistics.median(lat) * 1e3:9.0f} "
                f"{p99 * 1e3:9.0f} {len(lat):6d} {wrong:6d} {errors:4d}")  # fmt: skip
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--version", default="v2")
    args = parser.parse_args()
    sys.path.insert(0, REPO)
    from chatglm.tiny import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_checkpoint(os.path.join(tmp, "tiny"), args.version)
        print(f"# bench_servers: tiny {args.version}, {args.clients} clients x {args.requests} requests, loopback, "
              f"{os.cpu_count()} cpus; stream_api clients poll every 200 ms")  # fmt: skip
        print(f"{'server':<15} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'done':>6} {'wrong':>6} {'5xx':>4}")
        for script, one in (("api.py", one_api), ("openai_api.py", one_openai), ("stream_api.py", one_stream)):
            print(run(os.path.join(REPO, script), one, args.clients, args.requests, model_dir), flush=True)


if __name__ == "__main__":
    main()
