"""Load test of the three HTTP servers on the tiny model: 32 concurrent clients x 8 requests each, then 1000
abandoned requests, loopback only.

    python benchmarks/bench_servers.py [--clients 32] [--requests 8] [--abandoned 1000] [--version v2] [--dtype auto]

Each server runs as a real process (`python api.py|stream_api.py|openai_api.py --port P`, batching through the
engine as by default) on the built-in tiny model written to a temporary directory, in --dtype. Requests are greedy
(temperature 0) and use one of 16 prompts; a reply counts as right only when it equals the reply computed for that
prompt alone in this process, in the same dtype, so a reply given to the wrong client or mixed with another shows as "wrong". Then
the server's memory (RSS) is read before and after --abandoned requests whose clients leave: api.py and
openai_api.py clients disconnect right after sending (the work is cancelled), stream_api.py clients queue a request
and never read it (the server runs with --unread-ttl 5; RSS is read after that expired). Prints throughput,
p50/p99 latency, wrong answers, 5xx counts and RSS. Bounded: every request has a timeout, the run stops by itself.
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
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [f"第{i}个问题：你好" for i in range(16)]
API_MAX_LENGTH, OPENAI_MAX_TOKENS = 48, 24
UNREAD_TTL = 5.0


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


def one_api(base, prompt, want):
    status, out = post(base + "/", {"prompt": prompt, "history": [], "max_length": API_MAX_LENGTH, "temperature": 0})
    return status, status == 200 and out["response"] == want["api"]


def one_openai(base, prompt, want):
    body = {"model": "chatglm", "messages": [{"role": "user", "content": prompt}], "max_tokens": OPENAI_MAX_TOKENS,
            "temperature": 0}  # fmt: skip
    status, out = post(base + "/v1/chat/completions", body)
    return status, status == 200 and out["choices"][0]["message"]["content"] == want["openai"]


def one_stream(base, prompt, want, poll=0.2, deadline=120.0):
    body = {"query": prompt, "history": [], "max_length": API_MAX_LENGTH, "temperature": 0}
    status, out = post(base + "/chat", body)
    end = time.monotonic() + deadline
    while status == 200 and out.get("code") == 100 and time.monotonic() < end:  # busy: retry later
        time.sleep(poll)
        status, out = post(base + "/chat", body)
    rid = out.get("request_id")
    while status == 200 and rid and time.monotonic() < end:
        time.sleep(poll)
        status, out = post(base + "/get_response", {"request_id": rid})
        if status != 200 or out.get("code") != 0:
            return status, False
        if out["response"]["is_finished"]:
            return status, out["response"]["response"] == want["api"]
    return status, False


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def leave_at_once(port: int, path: str, body: dict) -> None:
    """Send a request and close the connection without reading the answer."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\n\r\n".encode() + data)  # fmt: skip
        time.sleep(0.05)


def abandon(script: str, base: str, port: int, n: int) -> None:
    if script == "stream_api.py":

        def queue_and_forget(i):
            body = {"query": PROMPTS[i % 16], "max_length": 24}
            for _ in range(600):
                status, out = post(base + "/chat", body)
                if status != 200 or out.get("code") != 100:
                    return
                time.sleep(0.05)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(queue_and_forget, range(n)))
        time.sleep(UNREAD_TTL + 1)
        post(base + "/chat", {"query": "x", "max_length": 24})  # a request sweeps what expired
        return
    path, body = {
        "api.py": ("/", {"prompt": "写一篇长文", "max_length": 2000}),
        "openai_api.py": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "写"}], "max_tokens": 2000}),
    }[script]  # fmt: skip
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda _: leave_at_once(port, path, body), range(n)))
    time.sleep(2)


def run(script, one, clients, requests, abandoned, model_dir, want, dtype) -> str:
    port = free_port()
    env = dict(os.environ, MODEL_PATH=model_dir, CHATGLM_NO_PROGRESS="1")
    extra = ["--dtype", dtype] + (["--unread-ttl", str(UNREAD_TTL)] if script == "stream_api.py" else [])
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, script), "--device", "cpu", "--port", str(port),
                             *extra], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
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
                prompt = PROMPTS[(c * requests + r) % len(PROMPTS)]
                status, ok = one(base, prompt, want[prompt])
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
        before = rss_mb(proc.pid)
        abandon(script, base, port, abandoned)
        after = rss_mb(proc.pid)
        alive = one(base, PROMPTS[0], want[PROMPTS[0]])[1]
        return (f"{script:<15} {len(lat) / wall:8.1f} {statistics.median(lat) * 1e3:9.0f} "
                f"{p99 * 1e3:9.0f} {len(lat):6d} {wrong:6d} {errors:4d} {before:9.0f} {after:9.0f}  "
                f"{'yes' if alive else 'NO'}")  # fmt: skip
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--requests", type=int, default=8, help="requests per client, one after another (default 8)")
    parser.add_argument("--abandoned", type=int, default=1000, help="requests whose client leaves (default 1000)")
    parser.add_argument("--version", default="v2", choices=["v1", "v2", "v3"], help="tiny model generation")
    parser.add_argument("--servers", default="api.py,openai_api.py,stream_api.py", help="comma-separated")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="the servers' --dtype (default auto: bf16 on a CPU with native bf16 matmuls, else fp32)",
    )
    args = parser.parse_args()
    sys.path.insert(0, REPO)

    import chatglm
    from chatglm.backends import resolve_dtype
    from chatglm.tiny import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_checkpoint(os.path.join(tmp, "tiny"), args.version)
        # the dtype the servers load in (bf16 on a CPU with native bf16 matmuls, else fp32): the reference is the
        # servers' own arithmetic, alone
        dtype = resolve_dtype(args.dtype, "cpu")
        model, tok = chatglm.load_model(model_dir, dtype=dtype), chatglm.load_tokenizer(model_dir)
        want = {p: {"api": model.chat(tok, p, [], max_length=API_MAX_LENGTH, do_sample=False)[0],
                    "openai": model.chat(tok, p, [], max_new_tokens=OPENAI_MAX_TOKENS, do_sample=False)[0]}
                for p in PROMPTS}  # fmt: skip
        del model
        print(
            f"# bench_servers: tiny {args.version} {str(dtype).replace('torch.', '')}, {args.clients} clients x "
            f"{args.requests} requests, then "
            f"{args.abandoned} abandoned; loopback, {os.cpu_count()} cpus; stream_api clients poll every 200 ms"
        )
        print(f"{'server':<15} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'done':>6} {'wrong':>6} {'5xx':>4} "
              f"{'RSS MB':>9} {'after ab.':>9}  alive")  # fmt: skip
        ones = {"api.py": one_api, "openai_api.py": one_openai, "stream_api.py": one_stream}
        for script in args.servers.split(","):
            out = run(script, ones[script], args.clients, args.requests, args.abandoned, model_dir, want, args.dtype)
            print(out, flush=True)


if __name__ == "__main__":
    main()
