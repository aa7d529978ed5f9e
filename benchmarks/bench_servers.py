"""Load test of the three HTTP servers on the tiny model: 32 concurrent clients x 8 requests each, then 1000
abandoned requests, loopback only; then N streaming clients at once against one alone through openai_api.py.

    python benchmarks/bench_servers.py [--clients 32] [--requests 8] [--abandoned 1000] [--version v2] [--dtype auto]
    python benchmarks/bench_servers.py --servers none --stream-clients 8 --model-path DIR --quantize 4
    python benchmarks/bench_servers.py --servers none --stream-clients 0 --follow-up 1000 [--model-path DIR ...]

Each server runs as a real process (`python api.py|stream_api.py|openai_api.py --port P`, batching through the
engine as by default) on the built-in tiny model written to a temporary directory, in --dtype. Requests are greedy
(temperature 0) and use one of 16 prompts; a reply counts as right only when it equals the reply computed for that
prompt alone in this process, in the same dtype, so a reply given to the wrong client or mixed with another shows as "wrong". Then
the server's memory (RSS) is read before and after --abandoned requests whose clients leave: api.py and
openai_api.py clients disconnect right after sending (the work is cancelled), stream_api.py clients queue a request
and never read it (the server runs with --unread-ttl 5; RSS is read after that expired). Prints throughput,
p50/p99 latency, wrong answers, 5xx counts and RSS. Bounded: every request has a timeout, the run stops by itself.

Streaming throughput (--stream-clients N, default 8; 0 skips it): openai_api.py on the tiny model, or on
--model-path (a full-width checkpoint, e.g. bench_peers.py's `hf-4` written with `--layers 4`, loaded with
--quantize), batching N requests. Three runs, each one client alone just before N clients at once (this VM's memory
changes speed between minutes, so each run of N is set against the one-client run just before it), every prompt
new to the server; each prompt's reply alone comes from an earlier server process. Every request streams (SSE, greedy, --stream-tokens
max_tokens); generated tokens are the server's own usage count. Prints tokens/s of each, the ratio, and whether
every reply of the N clients equals its prompt's reply alone.

Follow-up turn (--follow-up TOKENS; 0, the default, skips it): the OpenAI API is stateless, so a second turn sends
the whole conversation again. Three runs: a first turn of about TOKENS tokens, then the conversation with its reply
and a new question (max_tokens 8, not streamed: the time is mostly the prompt's prefill), against a conversation
of the same length whose first turn the server never saw (cold). Each follow-up turn's reply cold comes from an
earlier server process; the cold one must equal it, the one after its first turn (its prompt read in two pieces)
may differ by rounding where activations are bf16 or a greedy choice is a near-tie (chatglm/engine.py). Prints
both times and their ratio (issue 32's target: at most 15% of cold).
"""

from __future__ import annotations

import argparse
import contextlib
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
sys.path.insert(0, REPO)
from benchmarks import all_at_once  # noqa: E402

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


def stream_openai(base: str, prompt: str, max_tokens: int, timeout: float = 600.0) -> tuple[str, int]:
    """One streamed greedy chat completion: (the text, completion tokens from the usage chunk)."""
    body = {"model": "chatglm", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    text, tokens = [], 0
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                text.append(choice["delta"].get("content") or "")
    return "".join(text), tokens


def start_server(script: str, model_dir: str, args: list[str]) -> tuple[subprocess.Popen, int]:
    """The server as a process on a free loopback port, once it accepts connections (up to 10 minutes: a
    full-width checkpoint is quantized while loading)."""
    port = free_port()
    env = dict(os.environ, MODEL_PATH=model_dir, CHATGLM_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, script), "--device", "cpu", "--port", str(port), *args],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(6000):
        if proc.poll() is not None:
            raise SystemExit(f"error: {script} exited with status {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"error: {script} did not listen within 10 minutes")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def server(script: str, model_dir: str, args: list[str]):
    """start_server's process, its port and base URL; stopped on leaving."""
    proc, port = start_server(script, model_dir, args)
    try:
        yield proc, port, f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def streaming(model_dir: str, server_args: list[str], clients: int, max_tokens: int, reps: int = 3) -> None:
    """N streaming clients at once against one alone, through openai_api.py batching N (see the docstring)."""
    # Every prompt is new to the server that times it: a prompt sent again would reuse its kept keys (no prefill)
    # and, with bf16 activations, could change its reply by rounding (chatglm/engine.py). So the replies alone
    # come from a first server process, and a second one times one client and then N at once on fresh prompts.
    singles = [f"第{rep}次，一个人的问题：请写一段话" for rep in range(reps)]
    batches = [[f"第{rep}次，第{i}个问题：请写一段话" for i in range(clients)] for rep in range(reps)]
    args = [*server_args, "--max-batch", str(clients)]

    def at_once(base, ps):
        return all_at_once(lambda i: stream_openai(base, ps[i], max_tokens), len(ps))

    with server("openai_api.py", model_dir, args) as (_, _, base):
        want = {p: at_once(base, [p])[0][0][0] for ps in batches for p in ps}
    with server("openai_api.py", model_dir, args) as (_, _, base):
        at_once(base, ["预热"])  # warm up
        print(f"streaming through openai_api.py ({' '.join(args)}; {os.path.basename(model_dir)}), max_tokens "
              f"{max_tokens}, greedy; each run: one client alone, then {clients} at once, every prompt new")  # fmt: skip
        ratios = []
        for rep in range(reps):
            (single,), t1 = at_once(base, [singles[rep]])
            out, t = at_once(base, batches[rep])
            tokens = sum(n for _, n in out)
            rate1, rate = single[1] / t1, tokens / t
            ratios.append(rate / rate1)
            same = all(text == want[p] for (text, _), p in zip(out, batches[rep]))
            print(f"  run {rep + 1}: one client {rate1:6.1f} tok/s, then {clients} clients {rate:7.1f} tok/s "
                  f"({tokens} tokens in {t:.2f} s) = {rate / rate1:.2f}x; replies as alone: {same}")  # fmt: skip
        print(f"  median {statistics.median(ratios):.2f}x one client")


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
    extra = ["--dtype", dtype] + (["--unread-ttl", str(UNREAD_TTL)] if script == "stream_api.py" else [])
    with server(script, model_dir, extra) as (proc, port, base):
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


def chat_once(base: str, messages: list, max_tokens: int) -> tuple[str, int, float]:
    """One plain (non-streamed) greedy chat completion: (the reply, prompt tokens, wall seconds)."""
    body = {"model": "chatglm", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    t = time.perf_counter()
    status, out = post(base + "/v1/chat/completions", body, timeout=600)
    if status != 200:
        raise SystemExit(f"error: openai_api.py answered {status}")
    return out["choices"][0]["message"]["content"], out["usage"]["prompt_tokens"], time.perf_counter() - t


def follow_up(model_dir: str, server_args: list[str], history: int, reps: int = 3) -> None:
    """A follow-up turn sent whole through the stateless OpenAI API after its first turn, against a conversation
    of the same length whose first turn the server never saw (cold); see the docstring."""
    from chatglm import load_tokenizer

    tok = load_tokenizer(model_dir)
    with open(os.path.join(REPO, "chatglm", "data", "tiny_corpus.txt"), encoding="utf-8") as f:
        corpus = tok.encode(f.read() * (1 + history // 200), add_special_tokens=False)

    def first_turn(i):  # about `history` tokens, its own from the start
        return f"第{i}段：" + tok.decode(corpus[i * 7 : i * 7 + history])

    convs = [[{"role": "user", "content": first_turn(i)}] for i in range(2 * reps)]
    second = {"role": "user", "content": "请用一句话总结上面的内容"}
    with server("openai_api.py", model_dir, server_args) as (_, _, base):  # the first turns' replies
        for c in convs:
            c.append({"role": "assistant", "content": chat_once(base, c, 16)[0]})
            c.append(second)
    with server("openai_api.py", model_dir, server_args) as (_, _, base):  # each follow-up turn's reply cold
        cold_reply = [chat_once(base, c, 8)[0] for c in convs]
    with server("openai_api.py", model_dir, server_args) as (_, _, base):
        chat_once(base, [{"role": "user", "content": "预热"}], 4)  # warm up
        print(f"follow-up turn through openai_api.py ({' '.join(server_args)}; {os.path.basename(model_dir)}): a "
              f"first turn of ~{history} tokens, then the whole conversation again with a new question, max_tokens 8; "
              f"cold = a conversation of the same length whose first turn this server never saw")  # fmt: skip
        shares = []
        for rep in range(reps):
            warm, cold = convs[2 * rep], convs[2 * rep + 1]
            chat_once(base, warm[:1], 16)  # its first turn: the engine keeps its keys
            (text_w, n_w, t_w), (text_c, n_c, t_c) = chat_once(base, warm, 8), chat_once(base, cold, 8)
            shares.append(t_w / t_c)
            print(f"  run {rep + 1}: {n_w} / {n_c} prompt tokens: after its first turn {t_w * 1e3:.1f} ms, cold "
                  f"{t_c * 1e3:.1f} ms = {100 * t_w / t_c:.1f}% of cold; replies as cold: {text_c == cold_reply[2 * rep + 1]} "
                  f"(cold), {text_w == cold_reply[2 * rep]} (after its first turn)")  # fmt: skip
        print(f"  median {100 * statistics.median(shares):.1f}% of cold")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--requests", type=int, default=8, help="requests per client, one after another (default 8)")
    parser.add_argument("--abandoned", type=int, default=1000, help="requests whose client leaves (default 1000)")
    parser.add_argument("--version", default="v2", choices=["v1", "v2", "v3"], help="tiny model generation")
    parser.add_argument("--servers", default="api.py,openai_api.py,stream_api.py",
                        help="comma-separated, for the load test ('none' skips it)")  # fmt: skip
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="the servers' --dtype (default auto: bf16 on a CPU with native bf16 matmuls, else fp32)",
    )
    parser.add_argument("--stream-clients", type=int, default=8,
                        help="streaming clients at once against one alone (default 8; 0 skips it)")  # fmt: skip
    parser.add_argument("--stream-tokens", type=int, default=64, help="max_tokens of each streamed request")
    parser.add_argument("--model-path", default=None,
                        help="a checkpoint for the streaming run (default: the tiny model)")  # fmt: skip
    parser.add_argument("--quantize", type=int, default=0, choices=[0, 4, 8], help="its --quantize (default 0)")
    parser.add_argument("--follow-up", type=int, default=0, metavar="TOKENS",
                        help="also time a follow-up turn after a first turn of about TOKENS tokens (0: skip)")  # fmt: skip
    args = parser.parse_args()
    if args.model_path and not os.path.isfile(os.path.join(args.model_path, "config.json")):
        parser.error(f"--model-path {args.model_path}: no config.json there")
    unknown = set(args.servers.split(",")) - {"none", "api.py", "openai_api.py", "stream_api.py"}
    if unknown:
        parser.error(f"--servers: unknown {', '.join(sorted(unknown))} (api.py, openai_api.py, stream_api.py, none)")
    if args.stream_clients < 0 or args.stream_tokens < 1 or args.follow_up < 0:
        parser.error("--stream-clients and --follow-up must be >= 0 and --stream-tokens >= 1")

    from chatglm.tiny import make_tiny_checkpoint
    from kernels import cpu_summary

    print(f"# CPU: {cpu_summary()}; {os.cpu_count()} cpus")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_checkpoint(os.path.join(tmp, "tiny"), args.version)
        if args.servers != "none":
            load_test(args, model_dir)
        server_args = ["--dtype", args.dtype] + (["--quantize", str(args.quantize)] if args.model_path else [])
        if args.stream_clients:
            streaming(args.model_path or model_dir, server_args, args.stream_clients, args.stream_tokens)
        if args.follow_up:
            follow_up(args.model_path or model_dir, server_args, args.follow_up)


def load_test(args, model_dir: str) -> None:
    import chatglm
    from chatglm.backends import resolve_dtype

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
