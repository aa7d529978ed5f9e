"""One engine per model that serves many requests at once: continuous batching over the one forward.

Requests join the running batch at any step and leave when done. Each has a slot of one KV cache (`KVCache` with
`slots`) and its own generation plan (sampling parameters, stop criteria, max length: generation_config.py), so a
request's greedy reply is the one it gets alone. One thread runs the steps; each step is

  1. drop the requests whose reader left (the consumer closed its stream: a client disconnected, a cancel);
  2. admit waiting requests into free slots;
  3. prefill one chunk (at most `prefill_chunk` tokens) of the oldest request still reading its prompt, so the
     running streams keep getting tokens while a long prompt is read (ChatGLM-6B, whose prompt attends both ways,
     is prefilled whole); a ChatGLM2/3 prompt's last token is left to step 4 as a decode row, so that its logits
     (the first token's) have a decode row's bits however the rest was read;
  4. decode one token for every request past its prompt, in one forward: each row at its own position. The rows
     run are the slots from the lowest running one to the highest (a view of the cache, no copy); a slot between
     them that is free or still prefilling gets a dummy token whose output is ignored and whose key is written
     where that slot writes next anyway (a free slot: just past what it keeps);
  5. hand the new tokens to their readers: a request's first token and its end at once, the others at most
     every `stream_interval` seconds (1/30 s, a video frame), several at a time when steps are faster than that
     (each handover wakes a reader's thread, which then decodes, formats and writes to its socket, taking the GIL
     between the engine's torch ops: with 8 streams of the tiny model through openai_api.py a handover cost
     ~0.6 ms of the engine's time, and 8 streams got 2.4-3.5x one stream's tokens/s at 4 ms against 5-6x at
     32 ms). A full-size model's steps are longer than the interval on a CPU, so every step hands over. The
     reader still yields after every token.

Prefix reuse: a slot keeps the keys and values of its last request (prompt and reply) until another request
needs it. A new request goes to the free slot whose kept tokens share the longest prefix with its prompt, and
only the rest of its prompt is prefilled: the follow-up turn of a conversation sent whole through a stateless API
(openai_api.py, api.py) reads only its new tokens. Otherwise it takes the slot used least recently. Bounded by the
slots themselves: nothing is kept beyond them. (ChatGLM-6B's prompt attends both ways, so a shared beginning does
not mean shared keys: it always prefills whole.)

Bit for bit: a row's result must not depend on the rows sharing its forward (chunks, batches, a kept prefix computed
in an earlier decode). On the CPU each decode row is computed on its own: bf16/fp16 and INT8/INT4 weights, norms and
rotary by our kernels, and attention over exactly the row's own keys (layers.KeyLengths: our kernel for fp32 and
bf16 activations, layers.decode_rows elsewhere), so a decode row in a batch gets the bits it gets alone (fp32
weights too, by our kernel up to quantization.ops.FAST_LINEAR_MAX_ROWS rows: a larger max_batch puts bigger
batches on torch's sgemm, whose last bits depend on the row count, logits within about 1e-6). A prompt read in pieces (chunks,
or only its end after a kept prefix) is another matter: its attention runs through torch's SDPA, whose rounding
depends on where the prompt was cut, on a CPU with native bf16 matmuls bf16 weights (above 16 rows) take torch's
bf16 GEMM for prompts, and INT8/INT4 weights (32+ rows, settings.cpu_quantized_gemm) a GEMM: ours on AVX-512 VNNI
or AMX tiles (each row the bits it gets alone), else torch's bf16 one. With fp32 activations that is a last-bit
difference; with bf16 activations (bf16 weights on a CPU with native bf16) a reply after a kept prefix can differ
from the reply alone by rounding. Not the same request sent again: it keeps all its prompt's keys but the last
token's, which a cold read takes as a decode row too (step 3), so it gets the first reply's bits. Either way a prompt's keys never depend on the other requests: each prompt is read in its own
forward (reading prompts that arrived together in one forward of several rows was tried: it changed the last bits
of every row, through torch's fp32 GEMMs and SDPA).

Bounded: `max_batch` requests run, `max_waiting` more wait; beyond that `submit` raises `EngineBusy` (servers
answer 503 with Retry-After). Each step runs under `model_lock(model)`, so other users of the model (a request
the engine does not take, a CUDA cache release) never run a forward at the same time.

`generation.generate_stream` hands a request to the model's engine (`attach(model)`) when the engine can take
it: one sequence, no cache passed in or asked back, eager decode, no streamer. Everything else runs as before.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator

import torch

from kernels import release_openmp_threads

from .kv_cache import KVCache
from .sampling import greedy_tokens

logger = logging.getLogger(__name__)

_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def model_lock(model) -> threading.Lock:
    """The process-wide lock of one model: held for each forward step of any request."""
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.Lock()
        return lock


def locked_steps(model, iterator, cancel: threading.Event | None = None, lock=None) -> Iterator:
    """Items of `iterator`, each computed under `lock` (default: the model lock); stops on `cancel`. The iterator
    is closed under the lock too, also when the reader stops early."""
    lock = model_lock(model) if lock is None else lock
    it = iter(iterator)
    try:
        while cancel is None or not cancel.is_set():
            with lock:
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            with lock:
                close()


class EngineBusy(RuntimeError):
    """Every slot runs and the waiting line is full: try again later."""


_END = object()
# seconds: a running request's new tokens are handed to its reader at most this often (a 30 Hz frame: text arrives
# as smoothly as video; each handover costs the engine a thread wakeup and GIL handoffs, see the module docstring)
STREAM_INTERVAL = 1 / 30
IDS_ROOM = 1024  # room for new tokens a request's ids buffer starts with


class _Request:
    def __init__(self, plan, input_ids, state):
        self.plan, self.state = plan, state
        # ids [1, prompt + generated]: a view of a buffer that holds the whole reply, so a new token is one write
        # (what a reader was handed never changes: only positions past it are written later)
        n = input_ids.shape[1]
        with torch.inference_mode():  # as the sequences generate_stream yields without the engine: int64, inference
            self.buffer = input_ids.new_empty(1, max(min(plan.max_length, n + IDS_ROOM), n + 1), dtype=torch.long)
            self.buffer[:, :n] = input_ids
            self.ids = self.buffer[:, :n]
        self.prompt = state["input_ids"]  # [1, n]
        self.position_ids = state["position_ids"]  # [1, n] (v2/v3) or [1, 2, n] (v1)
        self.out: queue.SimpleQueue = queue.SimpleQueue()  # lists of items (sequences, then _END or an error)
        self.pending: list = []  # items not handed over yet
        self.handed = -math.inf  # when items were last handed over (time.perf_counter)
        self.final = False  # its last item is pending: hand over at once
        self.slot: int | None = None
        self.length = 0  # positions written in its slot (the P-Tuning prefix included)
        self.read = 0  # prompt tokens prefilled
        self.next = None  # the inputs of its next decode step, once prefilled
        self.left = False  # its reader is gone
        # (guard, limit) when its token is a greedy choice made for all such rows of a step at once
        # (sampling.greedy_tokens), else None
        self.greedy = plan.greedy_rule


class Engine:
    def __init__(self, model, max_batch: int = 8, max_waiting: int = 64, prefill_chunk: int = 512,
                 capacity: int = 512, stream_interval: float = STREAM_INTERVAL):  # fmt: skip
        if max_batch < 1 or max_waiting < 0 or prefill_chunk < 1 or not stream_interval >= 0:
            raise ValueError("max_batch and prefill_chunk must be >= 1, max_waiting and stream_interval >= 0")
        self.stream_interval = stream_interval
        self.model, self.max_batch, self.max_waiting = model, max_batch, max_waiting
        self.chunked = model.config.chatglm_version != "v1"  # v1's prompt attends both ways: read whole
        self.prefill_chunk = prefill_chunk
        self.cache = KVCache.empty(model.config.num_layers, capacity, slots=max_batch)  # grows by doubling
        self.slots: list[_Request | None] = [None] * max_batch
        self.kept: list[torch.Tensor | None] = [None] * max_batch  # token ids whose keys a free slot still holds
        self.last_used, self._clock = [0] * max_batch, 0
        self.prefix = model.config.pre_seq_len or 0  # P-Tuning positions before the text in every slot
        self.reused = 0  # prompt tokens not prefilled thanks to a kept prefix (for tests and benchmarks)
        self.waiting: deque[_Request] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.steps = 0  # decode forwards run (for tests and benchmarks)
        self._outbox: list[_Request] = []  # the requests with items not handed over yet
        # The attaching thread (usually the one that loaded the model) hands back its OpenMP workers, so that the
        # engine thread's parallel regions are not throttled (kernels.release_openmp_threads).
        release_openmp_threads()
        self._thread = threading.Thread(target=self._run, name="chatglm-engine", daemon=True)
        self._thread.start()

    # --- the client side ---
    def can_take(self, plan, input_ids, attention_mask, position_ids, past_key_values, return_past_key_values,
                 decode) -> bool:  # fmt: skip
        return (
            not self._closed
            and threading.current_thread() is not self._thread
            and input_ids.shape[0] == 1
            and (attention_mask is None or bool(attention_mask.all()))
            and position_ids is None
            and past_key_values is None
            and not return_past_key_values
            and decode in (None, "eager")
            and getattr(self.model, "decode_mode", None) in (None, "eager")
            and plan.streamer is None
            and (plan.config.num_return_sequences or 1) == 1
        )

    def stream(self, plan, input_ids, every_token: bool = True):
        """Yield the growing sequence [1, prompt + new] after every new token, as generate_stream does; without
        `every_token`, only the newest of the sequences handed over together (a server turns each yield into
        text and an event: at 8 streams of a tiny model those were most of the readers' time)."""
        if self._closed:
            raise EngineBusy("the engine is shut down")
        req = _Request(plan, input_ids, self.model._init_generation(input_ids))
        with self._cv:
            if self._closed:
                raise EngineBusy("the engine is shut down")
            if len(self.waiting) >= self.max_waiting and None not in self.slots:
                raise EngineBusy(f"{self.max_batch} requests running and {len(self.waiting)} waiting")
            self.waiting.append(req)
            self._cv.notify()
        try:
            while True:
                items = req.out.get()
                last = len(items) - 1
                for i, item in enumerate(items):
                    if item is _END:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    if every_token or i == last or not isinstance(items[i + 1], torch.Tensor):
                        yield item
        finally:
            with self._cv:
                req.left = True
                self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def load(self) -> tuple[int, int]:
        """(requests running, requests waiting)."""
        with self._cv:
            return sum(r is not None for r in self.slots), len(self.waiting)

    # --- the step loop ---
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._closed and not self.waiting and not any(self.slots):
                        self._cv.wait()
                    if self._closed:
                        for req in [*self.waiting, *(r for r in self.slots if r is not None)]:
                            req.out.put([*req.pending, EngineBusy("the engine is shut down")])
                        return
                    self._admit()
                running = [r for r in self.slots if r is not None]
                try:
                    with model_lock(self.model):
                        self._prefill_one()
                        self._flush()  # a first token goes out before the decode step
                        self._decode()
                except Exception as e:  # noqa: BLE001  (handed to every request of the failed step)
                    logger.exception("engine step failed")
                    for req in running:
                        self._finish(req, e)
                self._flush()

    def _flush(self, everything: bool = False) -> None:
        """Hand new tokens and ends to their readers, after a step (a reader woken mid-step would take the GIL
        from the rows still being emitted): a request's first token and its end at once, otherwise what it has
        pending once `stream_interval` seconds have passed since its last handover (or `everything`: before a
        prompt chunk, a long step), all in one item (each handover wakes the reader's thread, and on a model
        whose steps take less than a millisecond the readers' wakeups and GIL handoffs were a fifth of the
        engine's time with 8 requests)."""
        now, keep = time.perf_counter(), []
        for req in self._outbox:
            if everything or req.final or now - req.handed >= self.stream_interval:
                req.out.put(req.pending)
                req.pending, req.handed = [], now
            else:
                keep.append(req)
        self._outbox = keep

    def _admit(self) -> None:
        for req in list(self.slots):
            if req is not None and req.left:
                self._finish(req)
        self.waiting = deque(r for r in self.waiting if not r.left)
        while self.waiting and None in self.slots:
            req = self.waiting.popleft()
            self._place(req)

    def _place(self, req: _Request) -> None:
        """Put a request in the free slot that keeps the longest prefix of its prompt, else the least recently
        used one; it prefills from the end of the shared prefix."""
        free = [s for s, r in enumerate(self.slots) if r is None]
        shared = {s: self._shared(self.kept[s], req.prompt[0]) for s in free} if self.chunked else {}
        best = max(free, key=lambda s: (shared.get(s, 0), -self.last_used[s]))
        n = min(shared.get(best, 0), req.prompt.shape[1] - 1)  # at least one token is read: its logits are needed
        if n == 0:
            best = min(free, key=lambda s: self.last_used[s])
        req.slot, req.read, req.length = best, n, self.prefix + n if n else 0
        self.slots[best], self.kept[best] = req, None
        self.reused += n

    @staticmethod
    def _shared(kept, prompt) -> int:
        if kept is None:
            return 0
        m = min(len(kept), len(prompt))
        differ = (kept[:m] != prompt[:m]).nonzero()
        return int(differ[0]) if len(differ) else m

    def _finish(self, req: _Request, error: BaseException | None = None) -> None:
        if req.slot is not None and self.slots[req.slot] is req:
            self.slots[req.slot] = None
            written = req.length - self.prefix  # the tokens whose keys the slot holds: kept for a later request
            self.kept[req.slot] = req.ids[0, :written].clone() if error is None and written > 0 else None
            self._clock += 1
            self.last_used[req.slot] = self._clock
        self._hand(req, error if error is not None else _END)
        req.final = True

    def _prefill_one(self) -> None:
        req = next((r for r in self.slots if r is not None and r.next is None), None)
        if req is None:
            return
        n = req.prompt.shape[1]
        # v2/v3: the prompt's last token is read as a decode row (the next step's), so its logits have a decode
        # row's bits whether the rest of the prompt was read now or kept from an earlier request: the same request
        # sent again gets the same greedy reply (read whole, then only that token, the bits differed)
        stop = n - 1 if self.chunked and n > 1 else n
        if req.read < stop:
            self._flush(everything=True)  # no token waits through a prompt chunk (seconds on a CPU)
            end = min(stop, req.read + self.prefill_chunk) if self.chunked else n
            out = self.model(input_ids=req.prompt[:, req.read : end], position_ids=req.position_ids[..., req.read : end],
                             past_key_values=self.cache.select([req.slot], req.length), return_last_logit=True)  # fmt: skip
            req.length, req.read = out.past_key_values.length, end
            if end == n:
                self._emit(req, out.logits[:, -1])
        if req.read == stop < n:
            req.next = {"input_ids": req.prompt[:, stop:], "position_ids": req.position_ids[..., stop:]}
            req.read = n

    def _decode(self) -> None:
        rows = [r for r in self.slots if r is not None and r.next is not None]
        if not rows:
            return
        lo, hi = min(r.slot for r in rows), max(r.slot for r in rows)
        like = rows[0].next
        batch = [self.slots[s] if self.slots[s] in rows else None for s in range(lo, hi + 1)]
        ids = torch.cat([r.next["input_ids"] if r else torch.zeros_like(like["input_ids"]) for r in batch])
        pos = torch.cat([r.next["position_ids"] if r else torch.zeros_like(like["position_ids"]) for r in batch])
        lengths = tuple(r.length if r else self._idle_length(s) for s, r in zip(range(lo, hi + 1), batch))
        out = self.model(input_ids=ids, position_ids=pos, past_key_values=self.cache.select(range(lo, hi + 1), lengths),
                         return_last_logit=True)  # fmt: skip
        self.steps += 1
        logits = out.logits[:, -1]
        groups: dict[tuple, list[int]] = {}  # greedy rows by their rule: one call and one read each, not one a row
        for i, req in enumerate(batch):
            if req is not None and req.greedy is not None:
                groups.setdefault(req.greedy, []).append(i)
        chosen = {}
        for rule, members in groups.items():
            tokens, ids = greedy_tokens(logits if len(members) == len(batch) else logits[members], *rule)
            chosen.update((i, (tokens[j : j + 1], ids[j])) for j, i in enumerate(members))
        for i, req in enumerate(batch):
            if req is not None:
                req.length += 1
                self._emit(req, logits[i : i + 1], chosen.get(i))

    def _hand(self, req: _Request, item) -> None:
        if not req.pending:
            self._outbox.append(req)
        req.pending.append(item)

    def _idle_length(self, slot: int) -> int:
        """Where a slot not decoding this step may take a dummy key: its own next write position (a free slot:
        just past the tokens it keeps)."""
        req, kept = self.slots[slot], self.kept[slot]
        if req is not None:
            return req.length
        return self.prefix + len(kept) if kept is not None else 0

    def _emit(self, req: _Request, logits, chosen=None) -> None:
        """Choose the request's next token from its logits [1, vocab] (or take `chosen`, (tokens [1], the id), a
        greedy row's token chosen with the batch's, sampling.greedy_tokens), hand the sequence over, stop or go on."""
        plan = req.plan
        if chosen is None:
            tokens, scores = plan.choose(req.ids, logits)
            token = int(tokens[0])
        else:
            (tokens, token), scores = chosen, None
        n = req.ids.shape[1]
        if n == req.buffer.shape[1]:
            req.buffer = torch.cat([req.buffer, torch.empty_like(req.buffer)], dim=1)
        req.buffer[0, n] = token
        req.ids = req.buffer[:, : n + 1]
        self._hand(req, req.ids)
        done = token in plan.eos or req.ids.shape[1] >= plan.max_length
        stopped = None
        if plan.stopping:  # the scores a plain greedy row's criteria see: its logits in fp32, as choose() gives
            stopped = plan.stopped(req.ids, logits.float() if scores is None else scores)
        if done or (stopped is not None and bool(stopped[0])) or req.left:
            self._finish(req)
        else:
            # the engine's forwards take no mask (every row attends to its own cache up to its length): the
            # hook is given none to grow
            state = req.next or {k: v for k, v in req.state.items() if k not in ("attention_mask", "keep")}
            req.next = self.model._next_generation_inputs(state, tokens, None)


def attach(model, **options) -> Engine:
    """Give the model an engine (options: Engine's); generate_stream, stream_chat and chat then go through it."""
    engine = getattr(model, "engine", None)
    if engine is None:
        engine = model.engine = Engine(model, **options)
    return engine


def detach(model) -> None:
    """Stop the model's engine (requests still running get EngineBusy) and take it off the model."""
    engine = model.__dict__.pop("engine", None)
    if engine is not None:
        engine.close()
