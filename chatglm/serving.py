"""What the HTTP servers (api.py, stream_api.py, openai_api.py) share: request checks, one model lock, worker threads.

With `use_engine` (the servers' default) the model's engine (chatglm/engine.py) batches the requests of all worker
threads together; without it every step of every request (prefill, then one token at a time) runs under
`model_lock(model)`, so requests from any thread or app never run two forwards on one model at once, and with
more than one worker their steps interleave. Async apps run generation on worker threads (`AsyncRunner`), never
on the event loop. `chat_events` turns `model.stream_chat` into OpenAI-style deltas that never need taking back, and
the non-streaming answer is the same deltas joined, so the two always agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from . import engine
from .engine import EngineBusy, attach, model_lock
from .generation import CHAT_DEFAULTS

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 1 << 20  # bytes of a request body
MAX_TEMPERATURE = 100.0
V3_ROLES = ("system", "user", "assistant", "observation")
TIME_MARKER = "[[训练时间]]"  # the originals' process_response rewrites it: never stream half of it
V1_PUNCT = ",!:;?"  # v1 turns these into full-width ones depending on the *next* character
TOOL_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"


class RequestError(Exception):
    """A request the server refuses: HTTP status, a message for the client, and the offending field if any."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


# --- request bodies and fields ------------------------------------------------------------------------------


def _no_constants(name):
    raise ValueError(f"{name} is not valid JSON")


def _check_text(data):
    # json.loads accepts lone surrogates ("\ud800"), which no tokenizer can encode; walked without recursion
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(400, "request body contains a lone UTF-16 surrogate, not valid Unicode") from None
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def parse_json_body(raw: bytes, limit: int = DEFAULT_MAX_BODY) -> dict:
    """The JSON object of a request body, or RequestError 413 (too big) / 400 (not a JSON object of text)."""
    if limit and len(raw) > limit:
        raise RequestError(413, f"request body is larger than {limit} bytes")
    if not raw.strip():
        raise RequestError(400, "request body is empty: send a JSON object")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise RequestError(400, "request body is not UTF-8") from None
    except (ValueError, RecursionError) as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"request body must be a JSON object, got {type(data).__name__}")
    _check_text(data)
    return data


async def read_body(request, limit: int = DEFAULT_MAX_BODY) -> bytes:
    """A Starlette request's body, refused (413) as soon as it passes `limit` bytes, chunked or not."""
    declared = request.headers.get("content-length")
    if limit and declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if limit and size > limit:
            raise RequestError(413, f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def field(data: dict, name: str, kind, required: bool = False, default=None):
    """data[name] checked against `kind` ("str", "int", "number", "bool", "list"); None/missing -> default."""
    value = data.get(name)
    if value is None:
        if required:
            raise RequestError(400, f"'{name}' is required", name)
        return default
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list": isinstance(value, list),
    }[kind]
    if not ok:
        names = {
            "str": "a string",
            "int": "an integer",
            "number": "a number",
            "bool": "true or false",
            "list": "a list",
        }
        raise RequestError(400, f"'{name}' must be {names[kind]}, got {type(value).__name__}", name)
    return value


def check_history(version: str, history) -> list:
    """v1/v2: a list of [query, response] string pairs; v3: a list of {"role", "content"} messages."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise RequestError(400, f"'history' must be a list, got {type(history).__name__}", "history")
    out = []
    for i, item in enumerate(history):
        if version != "v3":
            if not (isinstance(item, list) and len(item) == 2 and all(isinstance(s, str) for s in item)):
                raise RequestError(400, f"history[{i}] must be a [query, response] pair of strings", "history")
            out.append((item[0], item[1]))
            continue
        if not isinstance(item, dict):
            raise RequestError(400, f"history[{i}] must be an object with 'role' and 'content' (ChatGLM3)", "history")
        role, content = item.get("role"), item.get("content")
        if role not in V3_ROLES:
            raise RequestError(400, f"history[{i}].role must be one of {', '.join(V3_ROLES)}, got {role!r}", "history")
        if not isinstance(content, str):
            raise RequestError(400, f"history[{i}].content must be a string", "history")
        msg = {"role": role, "content": content}
        if item.get("metadata") is not None:
            if not isinstance(item["metadata"], str):
                raise RequestError(400, f"history[{i}].metadata must be a string", "history")
            msg["metadata"] = item["metadata"]
        if item.get("tools") is not None:
            if role != "system" or not isinstance(item["tools"], list):
                raise RequestError(400, f"history[{i}].tools must be a list on a system message", "history")
            msg["tools"] = item["tools"]
        out.append(msg)
    return out


def context_length(model) -> int:
    config = model.config
    n = config.max_sequence_length if config.chatglm_version == "v1" else config.seq_length
    return int(n or 2048)


def generation_kwargs(model, max_length=None, top_p=None, temperature=None, max_temperature=MAX_TEMPERATURE) -> dict:
    """Checked chat() arguments; None keeps the model's default (for the built-in tiny model, the
    `default_max_new_tokens` its loader set). temperature 0 means greedy decoding."""
    gen = {}
    if max_length is None and getattr(model, "default_max_new_tokens", None):
        gen["max_new_tokens"] = model.default_max_new_tokens
    if max_length is not None:
        limit = context_length(model)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= limit:
            raise RequestError(400, f"'max_length' must be an integer from 1 to {limit}", "max_length")
        gen["max_length"] = max_length
    if top_p is not None:
        if not _finite(top_p) or not 0 < top_p <= 1:
            raise RequestError(400, "'top_p' must be a number in (0, 1]", "top_p")
        gen["top_p"] = float(top_p)
    if temperature is not None:
        if not _finite(temperature) or not 0 <= temperature <= max_temperature:
            raise RequestError(400, f"'temperature' must be a number from 0 to {max_temperature:g}", "temperature")
        if temperature == 0:
            gen["do_sample"] = False  # greedy: what a temperature going to 0 tends to
        else:
            gen["temperature"] = float(temperature)
    return gen


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --- one model, many requests -------------------------------------------------------------------------------


def free_cuda_cache(model) -> None:
    """The originals' torch_gc(): return cached blocks to the driver after a request, only when on CUDA."""
    try:
        device = next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return
    if device.type == "cuda":
        import torch

        # Under the model lock: a decode step being captured as a CUDA graph (--decode cuda_graph) must not
        # see the allocator hand memory back to the driver mid-capture.
        with model_lock(model), torch.cuda.device(device):
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()


def locked_steps(model, iterator, cancel: threading.Event | None = None) -> Iterator:
    """Items of `iterator` (a model.stream_chat), each step computed under the model lock; stops on `cancel`.
    A model with an engine (chatglm/engine.py) takes its lock itself, step by step."""
    lock = contextlib.nullcontext() if getattr(model, "engine", None) is not None else None
    try:
        yield from engine.locked_steps(model, iterator, cancel, lock)
    finally:
        free_cuda_cache(model)


def last_step(model, iterator):
    """The final item of a locked stream (the whole reply of a non-streaming request)."""
    item = None
    for item in locked_steps(model, iterator):  # noqa: B007
        pass
    return item


def use_engine(model, max_batch: int, max_waiting: int, concurrency: int) -> tuple[bool, int]:
    """Give the model its engine when max_batch > 1 (chatglm/engine.py batches that many requests together);
    returns (attached, the worker threads the server needs: one per running request)."""
    from .base import ChatGLMCausalLM

    if max_batch > 1 and isinstance(model, ChatGLMCausalLM):
        attach(model, max_batch=max_batch, max_waiting=max_waiting)
        return True, max_batch
    return False, concurrency


def add_batch_args(parser, default_batch: int = 8):
    """--max-batch and --max-waiting."""
    parser.add_argument("--max-batch", type=int, default=default_batch,
                        help=f"requests generated together in one batch (default {default_batch}; 1: one at a "
                             "time, as the original)")  # fmt: skip
    parser.add_argument("--max-waiting", type=int, default=64, help="requests that may wait beyond those (503 past it)")


def check_batch_args(parser, args) -> None:
    if args.max_batch < 1 or args.max_waiting < 0:
        parser.error("--max-batch must be >= 1 and --max-waiting >= 0")


class AsyncRunner:
    """Worker threads for an async app: `concurrency` generations at once, `max_waiting` more queued, 503 beyond."""

    def __init__(self, concurrency: int = 1, max_waiting: int = 64):
        if concurrency < 1 or max_waiting < 0:
            raise ValueError("concurrency must be >= 1 and max_waiting >= 0")
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="chatglm-gen")
        self.capacity = concurrency + max_waiting
        self._lock = threading.Lock()
        self.active = 0  # admitted and not done (running or waiting)

    def _submit(self, fn):
        with self._lock:
            if self.active >= self.capacity:
                raise RequestError(503, f"server busy: {self.active} requests in progress or waiting, try again later")
            self.active += 1
        try:
            fut = self.executor.submit(fn)
        except RuntimeError:  # shut down
            self._release(None)
            raise RequestError(503, "server is shutting down") from None
        fut.add_done_callback(self._release)  # also when cancelled before it ran
        return fut

    def _release(self, _fut):
        with self._lock:
            self.active -= 1

    async def run(self, fn):
        """fn() on a worker thread; the event loop keeps serving meanwhile. A full engine is a 503."""
        try:
            return await asyncio.wrap_future(self._submit(fn))
        except EngineBusy as e:
            raise RequestError(503, f"server busy: {e}") from None

    def stream(self, events: Callable[[threading.Event], Iterator]):
        """Start events(cancel) on a worker thread now (503 if full); return an async iterator of its items.

        Leaving the iterator early (client gone) sets `cancel`, which stops the generation at its next step.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(kind, value):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # the loop is closed: nobody is listening
                cancel.set()

        def job():
            try:
                for item in events(cancel):
                    if cancel.is_set():
                        break
                    put("item", item)
            except Exception as e:  # noqa: BLE001  (handed to the consumer)
                put("error", e)
            finally:
                put("end", None)

        fut = self._submit(job)

        async def items():
            try:
                while True:
                    kind, value = await queue.get()
                    if kind == "end":
                        return
                    if kind == "error":
                        raise value
                    yield value
            finally:
                cancel.set()
                fut.cancel()  # not started yet: never starts

        return items()

    def close(self):
        self.executor.shutdown(wait=False, cancel_futures=True)


# --- deltas for streaming APIs ------------------------------------------------------------------------------


class TokenRecorder:
    """A logits processor that only watches: prompt length, tokens generated, and the raw ids so far."""

    def __init__(self):
        self.prompt_len, self.calls, self.ids = None, 0, []

    def __call__(self, input_ids, scores):
        if self.prompt_len is None:
            self.prompt_len = int(input_ids.shape[1])
        self.calls += 1
        self.ids = input_ids[0, self.prompt_len :].tolist()  # all generated but the token being chosen now
        return scores


def holdback(text: str, version: str, stops=()) -> int:
    """How many trailing characters may still change or turn out to be a stop sequence."""
    n = 0
    for s in (TIME_MARKER, *stops):
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    if version == "v1" and text and text[-1] in V1_PUNCT:
        n = max(n, 1)
    return n


def find_stop(text: str, stops) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def chat_events(model, tokenizer, query: str, history: list, role: str = "user", gen: dict | None = None,
                stops=(), tools: bool = False, cancel: threading.Event | None = None) -> Iterator[dict]:  # fmt: skip
    """Run one chat and yield {"content": delta}, then maybe {"tool_call": {"name", "arguments"}}, then
    {"finish_reason", "usage"}. Deltas are only sent once no later token can change them, so joining them gives
    the final text; a ChatGLM3 reply is held until its first line says whether it is text or a tool call."""
    version = model.config.chatglm_version
    gen = dict(gen or {})
    rec = TokenRecorder()
    kwargs = {"role": role} if version == "v3" else {}
    stream = model.stream_chat(tokenizer, query, history, logits_processor=[rec], **kwargs, **gen)
    sent, response, stopped, first_line = "", None, False, version != "v3"
    for response, _ in locked_steps(model, stream, cancel):
        if not first_line and isinstance(response, str):
            first_line = "\n" in tokenizer.decode(rec.ids)
            if not first_line:
                continue  # ChatGLM3's metadata line is not finished: plain text, or the name of a tool?
        if isinstance(response, dict):
            if tools:
                continue  # a tool call: sent whole at the end
            response = response.get("content", "")
        cut = find_stop(response, stops)
        if cut is not None:
            response, stopped = response[:cut], True
        safe = response if stopped else response[: len(response) - holdback(response, version, stops)]
        if len(safe) > len(sent) and safe.startswith(sent):
            yield {"content": safe[len(sent) :]}
            sent = safe
        if stopped:
            break
    if cancel is not None and cancel.is_set():
        return
    finish = "stop"
    if isinstance(response, dict) and tools and "parameters" in response:
        finish = "tool_calls"
        args = json.dumps(response["parameters"], ensure_ascii=False)
        yield {"tool_call": {"name": response["name"], "arguments": args}}
    elif not stopped:
        if isinstance(response, dict):
            response = response.get("content", "")
        response = response or ""
        if len(response) > len(sent) and response.startswith(sent):
            yield {"content": response[len(sent) :]}
        prompt = rec.prompt_len or 0
        max_new, max_length = gen.get("max_new_tokens"), gen.get("max_length") or CHAT_DEFAULTS[version][0]
        if (max_new and rec.calls >= max_new) or (not max_new and prompt + rec.calls >= max_length):
            finish = "length"
    prompt = rec.prompt_len or 0
    usage = {"prompt_tokens": prompt, "completion_tokens": rec.calls, "total_tokens": prompt + rec.calls}
    yield {"finish_reason": finish, "usage": usage}


# --- OpenAI messages -> ChatGLM query / history -------------------------------------------------------------


def _text(content, i: int, allow_none: bool = False) -> str:
    if content is None:
        if allow_none:
            return ""
        raise RequestError(400, f"messages[{i}].content is required", "messages")
    if isinstance(content, str):
        return content
    parts = []
    for part in content:  # [{"type": "text", "text": ...}]
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError(400, f"messages[{i}].content: only text parts are supported", "messages")
        parts.append(part["text"])
    return "".join(parts)


def _tool_call_code(name: str, arguments: str, i: int) -> str:
    try:
        args = json.loads(arguments or "{}")
    except ValueError:
        raise RequestError(400, f"messages[{i}]: tool call arguments of {name!r} are not JSON", "messages") from None
    if not isinstance(args, dict) or not all(isinstance(k, str) and k.isidentifier() for k in args):
        raise RequestError(400, f"messages[{i}]: tool call arguments must be an object of named values", "messages")
    return "```python\ntool_call(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")\n```"


def openai_to_chat(version: str, messages: list[dict], tools: list[dict] | None = None):
    """(query, history, role) for model.stream_chat from OpenAI chat messages (dicts with role, content, ...).

    ChatGLM3: system/user/assistant become its roles, `tools` a leading system message (as ChatGLM3's own
    api_server), assistant tool_calls its `tool_call(...)` turns and tool results `observation` turns.
    ChatGLM-6B / ChatGLM2-6B (as ChatGLM2's openai_api.py): a leading system message is put before the last user
    message, and the earlier ones must be user/assistant pairs.
    """
    if not messages:
        raise RequestError(400, "'messages' must not be empty", "messages")
    last_i = len(messages) - 1
    last = messages[-1]
    if version != "v3":
        if tools:
            raise RequestError(400, "tools need a ChatGLM3 model", "tools")
        if last["role"] != "user":
            raise RequestError(400, "the last message must have role 'user'", "messages")
        query = _text(last.get("content"), last_i)
        prev = list(enumerate(messages[:-1]))
        if prev and prev[0][1]["role"] == "system":
            query = _text(prev.pop(0)[1].get("content"), 0) + query
        if len(prev) % 2 or any(m["role"] != ("user", "assistant")[j % 2] for j, (_, m) in enumerate(prev)):
            raise RequestError(400, "before the last message, ChatGLM-6B/ChatGLM2-6B take an optional system message, "
                                    "then alternating user/assistant messages", "messages")  # fmt: skip
        history = [(_text(prev[j][1].get("content"), prev[j][0]), _text(prev[j + 1][1].get("content"), prev[j + 1][0]))
                   for j in range(0, len(prev), 2)]  # fmt: skip
        return query, history, "user"
    history = []
    if tools:
        history.append({"role": "system", "content": TOOL_PROMPT, "tools": tools})
    for i, m in enumerate(messages[:-1]):
        role = m["role"]
        if role in ("tool", "function"):
            history.append({"role": "observation", "content": _text(m.get("content"), i)})
        elif role == "assistant" and m.get("tool_calls"):
            text = _text(m.get("content"), i, allow_none=True)
            if text:
                history.append({"role": "assistant", "content": text})
            for call in m["tool_calls"]:
                fn = call["function"]
                history.append({"role": "assistant", "metadata": fn["name"],
                                "content": _tool_call_code(fn["name"], fn.get("arguments"), i)})  # fmt: skip
        else:
            history.append({"role": role, "content": _text(m.get("content"), i)})
    if last["role"] == "user":
        return _text(last.get("content"), last_i), history, "user"
    if last["role"] in ("tool", "function"):
        return _text(last.get("content"), last_i), history, "observation"
    raise RequestError(400, "the last message must have role 'user' or 'tool'", "messages")


# --- the polling queue of stream_api.py ---------------------------------------------------------------------


class PollingQueue:
    """Requests queued by id, generated by a pool of worker threads, their growing text read by polling.

    At most `workers` generate at once (their steps interleave under the model lock) and `max_waiting` more wait.
    A finished result is kept `ttl` seconds after the client first read its final state, and never dropped
    before; results nobody ever reads are dropped `abandon_ttl` seconds after finishing (None: kept).
    All state is guarded by one condition variable.
    """

    BUSY, DUPLICATE, UNKNOWN = 100, 101, 102

    def __init__(self, model, tokenizer, workers: int = 4, max_waiting: int = 16, ttl: float = 600.0,
                 abandon_ttl: float | None = None, clock=time.monotonic):  # fmt: skip
        if workers < 1 or max_waiting < 0 or ttl < 0:
            raise ValueError("workers must be >= 1, max_waiting >= 0 and ttl >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.max_waiting, self.ttl, self.abandon_ttl, self.clock = max_waiting, ttl, abandon_ttl, clock
        self.cond = threading.Condition()
        self.entries: dict[str, dict] = {}
        self.waiting: deque[str] = deque()
        self.workers, self.running, self.closed = workers, 0, False
        self.threads = [threading.Thread(target=self._work, name=f"chatglm-poll-{i}", daemon=True)
                        for i in range(workers)]  # fmt: skip
        for t in self.threads:
            t.start()

    def submit(self, request_id: str, query: str, history: list, gen: dict) -> tuple[int, str]:
        with self.cond:
            self._sweep()
            old = self.entries.get(request_id)
            if old is not None and not old["is_finished"]:
                return self.DUPLICATE, f"request_id {request_id!r} is still in process"
            if len(self.waiting) >= self.max_waiting + self.workers - self.running:
                return self.BUSY, "busy now, try again later"
            self.entries[request_id] = dict(query=query, history=history, gen=gen, response="", is_handled=False,
                                            is_finished=False, timestamp=time.time(), finished_at=None,
                                            read_at=None, error=None, version=0)  # fmt: skip
            self.waiting.append(request_id)
            self.cond.notify_all()
            return 0, "start process"

    def poll(self, request_id: str) -> dict | None:
        """The public state of a request (None if unknown); reading a final state starts its TTL."""
        with self.cond:
            self._sweep()
            return self._read(request_id)

    def _read(self, request_id: str) -> dict | None:
        # Caller holds self.cond. Reading a final state starts its TTL.
        e = self.entries.get(request_id)
        if e is None:
            return None
        if e["is_finished"] and e["read_at"] is None:
            e["read_at"] = self.clock()
        return self._public(e)

    def wait_change(self, request_id: str, seen_version: int, timeout: float) -> dict | None:
        """Block until the request changes after `seen_version` (or `timeout` s); its state, None if unknown."""
        with self.cond:
            self.cond.wait_for(lambda: self._changed(request_id, seen_version), timeout=timeout)
            return self._read(request_id)

    def _changed(self, request_id, seen_version) -> bool:
        e = self.entries.get(request_id)
        return e is None or e["version"] != seen_version or self.closed

    @staticmethod
    def _public(e) -> dict:
        out = {k: e[k] for k in ("is_finished", "is_handled", "response", "timestamp")}
        out["version"] = e["version"]
        if e["error"]:
            out["error"] = e["error"]
        return out

    def _sweep(self):
        now = self.clock()
        for rid in [rid for rid, e in self.entries.items() if e["is_finished"] and self._expired(e, now)]:
            del self.entries[rid]

    def _expired(self, e, now) -> bool:
        if e["read_at"] is not None:
            return now - e["read_at"] >= self.ttl
        return self.abandon_ttl is not None and now - e["finished_at"] >= self.abandon_ttl

    def _update(self, e, **changes):
        with self.cond:
            e.update(changes, timestamp=time.time(), version=e["version"] + 1)
            self.cond.notify_all()

    def _work(self):
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.waiting or self.closed)
                if self.closed:
                    return
                e = self.entries[self.waiting.popleft()]
                self.running += 1
                e.update(is_handled=True, timestamp=time.time(), version=e["version"] + 1)
                self.cond.notify_all()
            error = None
            try:
                stream = self.model.stream_chat(self.tokenizer, e["query"], e["history"], **e["gen"])
                for response, history in locked_steps(self.model, stream):
                    self._update(e, response=response, history=history)
            except Exception as ex:  # noqa: BLE001  (reported to the client, the worker goes on)
                logger.exception("generation failed")
                error = f"generation failed: {type(ex).__name__}: {ex}"
            with self.cond:
                self.running -= 1
                self._update(e, is_finished=True, finished_at=self.clock(), error=error)

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify_all()


def add_server_args(parser, port: int):
    """--host, --port and the limits every server takes."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    g.add_argument("--port", type=int, default=port, help=f"port (default {port})")
    g.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="largest request body accepted")
    return g


def now_string() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
