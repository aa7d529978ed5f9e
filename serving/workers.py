"""One model, many requests: worker threads for the servers, the engine or the model lock between them.

With `use_engine` (the servers' default) the model's engine (chatglm/engine.py) batches the requests of all worker
threads together; without it every step of every request (prefill, then one token at a time) runs under
`model_lock(model)`, so requests from any thread or app never run two forwards on one model at once, and with
more than one worker their steps interleave. Async apps run generation on worker threads (`AsyncRunner`), never
on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from chatglm import engine
from chatglm.engine import EngineBusy, attach, model_lock

from .requests import RequestError


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


def last_step(model, iterator, cancel: threading.Event | None = None):
    """The final item of a locked stream (the whole reply of a non-streaming request); stops on `cancel`."""
    item = None
    for item in locked_steps(model, iterator, cancel):  # noqa: B007
        pass
    return item


def use_engine(model, max_batch: int, max_waiting: int, concurrency: int) -> tuple[bool, int]:
    """Give the model its engine when max_batch > 1 (chatglm/engine.py batches that many requests together);
    returns (attached, the worker threads the server needs: one per running request)."""
    from chatglm.base import ChatGLMCausalLM

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
    if args.max_batch < 1:
        parser.error(f"--max-batch must be >= 1, not {args.max_batch}")
    if args.max_waiting < 0:
        parser.error(f"--max-waiting must be >= 0, not {args.max_waiting}")


class ClientGone(Exception):
    """The client disconnected before its reply was ready; its work was cancelled."""


def _shutting_down() -> RequestError:
    return RequestError(503, "server is shutting down")


class _Items:
    """AsyncRunner.stream's items: closing them stops the work even when they were never started (an async
    generator closed before its first step skips its `finally`: a client gone during the first SSE chunk would
    leave its generation running to max_tokens)."""

    def __init__(self, gen, stop):
        self._gen, self._stop = gen, stop

    def __aiter__(self):
        return self

    def __anext__(self):
        return self._gen.__anext__()

    async def aclose(self):
        self._stop()
        await self._gen.aclose()

    def __del__(self):  # dropped unstarted and unclosed (a response that never ran): stop all the same
        self._stop()


class AsyncRunner:
    """Worker threads for an async app: `concurrency` generations at once, `max_waiting` more queued, 503 beyond."""

    def __init__(self, concurrency: int = 1, max_waiting: int = 64):
        if concurrency < 1 or max_waiting < 0:
            raise ValueError("concurrency must be >= 1 and max_waiting >= 0")
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="chatglm-gen")
        # request checks that tokenize (a 1 MB prompt takes about a second): off the event loop, beside generation
        self.checker = ThreadPoolExecutor(max_workers=2, thread_name_prefix="chatglm-check")
        self.capacity = concurrency + max_waiting
        self._lock = threading.Lock()
        self.active = 0  # admitted and not done (running or waiting)
        self._cancels: set[threading.Event] = set()  # of the work admitted and not done: close() sets them all
        self.closed = False

    def _submit(self, fn):
        with self._lock:
            if self.active >= self.capacity:
                raise RequestError(503, f"server busy: {self.active} requests in progress or waiting, try again later")
            self.active += 1
        try:
            fut = self.executor.submit(fn)
        except RuntimeError:  # shut down
            self._release(None)
            raise _shutting_down() from None
        fut.add_done_callback(self._release)  # also when cancelled before it ran
        return fut

    def _release(self, _fut):
        with self._lock:
            self.active -= 1

    async def run(self, fn: Callable[[threading.Event], object], request=None, poll: float = 0.25):
        """fn(cancel) on a worker thread; the event loop keeps serving meanwhile. A full engine is a 503.

        When the client of `request` (a Starlette request) disconnects, or the task is cancelled (shutdown),
        `cancel` is set, so the generation stops at its next step, and ClientGone is raised.
        """
        cancel = self._cancel_event()
        fut = self._submit(lambda: fn(cancel))
        waiter = asyncio.wrap_future(fut)
        try:
            while not waiter.done():
                await asyncio.wait({waiter}, timeout=poll)
                if not waiter.done() and request is not None and await request.is_disconnected():
                    raise ClientGone
            result = waiter.result()
            if self.closed:  # its work was cut short (cancel set by close): not a reply
                raise _shutting_down()
            return result
        except EngineBusy as e:
            raise RequestError(503, f"server busy: {e}") from None
        finally:
            if not waiter.done():
                cancel.set()
                fut.cancel()  # not started yet: never starts
            self._cancels.discard(cancel)

    def _cancel_event(self) -> threading.Event:
        cancel = threading.Event()
        self._cancels.add(cancel)
        return cancel

    async def check(self, fn):
        """fn() on a checker thread (request checks that take time), without holding a generation slot."""
        return await asyncio.wrap_future(self.checker.submit(fn))

    def stream(self, events: Callable[[threading.Event], Iterator], idle: float | None = None):
        """Start events(cancel) on a worker thread now (503 if full); return an async iterator of its items, and
        of None whenever `idle` seconds pass without one (a keep-alive for the stream).

        Leaving the iterator early (client gone) sets `cancel`, which stops the generation at its next step.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = self._cancel_event()

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
                if cancel.is_set() and self.closed:  # cut short by close(): the stream says so, not just ending
                    put("error", _shutting_down())
            except Exception as e:  # noqa: BLE001  (handed to the consumer)
                put("error", e)
            finally:
                put("end", None)

        fut = self._submit(job)
        last = loop.time()  # when the consumer last took something
        timer = None

        def tick():  # one timer per stream, not one per item: an idle marker once `idle` seconds pass quietly
            nonlocal timer
            due = last + idle - loop.time()
            if due <= 0:
                if queue.empty():  # items waiting (a slow consumer) need no marker, nor does one already queued
                    queue.put_nowait(("idle", None))
                due = idle
            timer = loop.call_later(due, tick)

        def stop():  # the stream ended, or its consumer left (or was cancelled, or closed it before starting)
            if timer is not None:
                timer.cancel()
            cancel.set()
            fut.cancel()  # not started yet: never starts
            self._cancels.discard(cancel)

        async def items():
            nonlocal last
            if idle is not None and idle > 0:
                tick()
            try:
                while True:
                    kind, value = await queue.get()
                    last = loop.time()
                    if kind == "end":
                        return
                    if kind == "error":
                        raise value
                    yield None if kind == "idle" else value
            finally:
                stop()

        return _Items(items(), stop)

    def close(self):
        """Stop: queued work never starts, running generations stop at their next step (a plain request then gets
        a 503, a stream an error event before its end)."""
        self.closed = True
        for cancel in list(self._cancels):
            cancel.set()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.checker.shutdown(wait=False, cancel_futures=True)
