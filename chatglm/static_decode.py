"""Decode steps of fixed shape: captured once in a CUDA graph, or compiled with torch.compile.

Eager decode at batch 1 on a GPU spends much of each step launching kernels from Python (a dozen per block,
28 blocks, plus the head), while the weights take a few milliseconds to read. A step whose tensors never change
shape or address can be recorded once as a CUDA graph and replayed with one launch, or compiled. What makes the
step static here:

- the KV cache is a set of per-layer buffers of fixed capacity, written at a position held in a tensor
  (`index_copy_`), never at a Python int;
- attention runs over a fixed span, a bucket of positions (256, 512, 1024, ... up to the capacity), with a mask
  that hides the positions past the current one and the left padding of a batch; one graph (or compiled
  shape) per bucket, made the first time a generation reaches it;
- the rotary table is precomputed up to the capacity and indexed by the position tensor.

The step is the model's one forward (`model.transformer`) on a cache in fixed-step mode (`KVCache.at`), which
also gives the step's mask from tensors; the decoder sizes the rotary tables up to its capacity first. The
prompt (prefill) runs eagerly and writes into the same buffers, so a reply costs no copy. Rows may stand at
different positions (one per-row position tensor). A decoder is kept on
the model per (batch, mode) and grows (doubling, its steps made again) when a reply needs more room. Its
buffers serve every generation: the `past_key_values` snapshots it hands out are moved to storage of their own
before a later generation reuses the buffers, so a kept cache (the next chat turn, a retry) stays valid.

Modes: "static" (the fixed-shape step run eagerly: the reference the others are tested against), "cuda_graph"
(CUDA only), "compile" (torch.compile; on CUDA the compiled step is also captured in a CUDA graph).
"""

from __future__ import annotations

import threading
import weakref

import torch

from .kv_cache import KVCache, cache_length

_lock = threading.Lock()

MODES = ("eager", "static", "cuda_graph", "compile")
MIN_SPAN = 256  # the smallest attention bucket; the next ones double up to the capacity
CAPACITY_STEP = 256  # capacities are rounded up to a multiple of this, so nearby lengths share a decoder


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"decode must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def spans(capacity: int) -> list[int]:
    """The attention buckets of a decoder: MIN_SPAN, doubling, and the capacity itself last."""
    out, n = [], MIN_SPAN
    while n < capacity:
        out.append(n)
        n *= 2
    return out + [capacity]


class StaticDecoder:
    """Fixed-shape decode steps of one model for batch size `batch` and up to `capacity` cached positions."""

    def __init__(self, model, batch: int, capacity: int, mode: str):
        self.device = _device_for(model, mode)
        self.model, self.batch, self.mode = model, batch, mode
        # Its buffers serve every generation; one row per sequence (`select` prefills one row alone).
        self.cache = KVCache.empty(model.config.num_layers, capacity, slots=batch)
        self.rope = model.transformer.rope_tables(capacity, self.device)  # kept: a graph reads them by address
        self.key_valid = torch.ones(batch, capacity, dtype=torch.bool, device=self.device)
        # The step's inputs: fixed tensors that each step overwrites (a CUDA graph reads these addresses).
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.position_ids = None  # [b, 1] (v2/v3) or [b, 2, 1] (v1): shaped by the first step
        self.pos = torch.zeros(batch, dtype=torch.long, device=self.device)  # each row's write position
        self._steps: dict[int, object] = {}  # span -> callable running one step
        self._handed: weakref.WeakSet[KVCache] = weakref.WeakSet()
        self.busy = False  # a generation is using the buffers (get_decoder .. release)

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def release(self) -> None:
        """The generation is over: the buffers may serve the next one."""
        self.busy = False

    # --- one generation ---
    def begin(self, attention_mask, prompt_len: int, past_key_values=None) -> KVCache:
        """A cache over this decoder's buffers for a new generation: empty, or a copy of `past_key_values`.

        `attention_mask` [b, n] (0 = left padding) covers the last n keys up to the end of the `prompt_len`-token
        prompt (v2/v3: the cached text and the prompt; v1: the prompt); the keys it marks 0 are never attended.
        Keys before it (the P-Tuning prefix, v1's cache) are all attended."""
        KVCache.rehome(c for c in self._handed if c.shares_storage(self.cache))  # kept by callers: moved out
        self._handed = weakref.WeakSet()
        cache = self.cache.clear()  # masked positions are still read: what the last generation wrote is zeroed
        cached = cache_length(past_key_values) if past_key_values is not None else self.model.config.pre_seq_len or 0
        if cached + prompt_len + 1 > self.capacity:  # the prefill must not grow the storage behind our back
            self.grow(cached + prompt_len + 1)
        if past_key_values is not None:
            cache = cache.copy_in(past_key_values)
        start = cached + prompt_len - attention_mask.shape[1]
        self.key_valid.fill_(True)
        self.key_valid[:, start : start + attention_mask.shape[1]] = attention_mask.to(self.device).bool()
        return cache

    def track(self, snapshot: KVCache) -> KVCache:
        """Remember a snapshot handed to the caller, to move it out before these buffers are reused."""
        self._handed.add(snapshot)
        return snapshot

    def step(self, tokens, position_ids, cache: KVCache) -> torch.Tensor:
        """Logits [b, vocab] of the next position after `cache` (every row of the decoder, each at its own
        length); writes each row's keys and values at its length."""
        length = cache.length
        if length >= self.capacity:
            self.grow(length + 1)
        span = next(n for n in spans(self.capacity) if n > length)
        if self.position_ids is None:
            self.position_ids = torch.zeros_like(position_ids, device=self.device)
        self.tokens.copy_(tokens.view(self.batch, 1))
        self.position_ids.copy_(position_ids)
        if isinstance(cache.lengths, int):
            self.pos.fill_(cache.lengths)
        else:
            self.pos.copy_(torch.tensor(cache.lengths))
        run = self._steps.get(span)
        if run is None:
            run = self._steps[span] = self._make_step(span)
        return run()

    def grow(self, need: int) -> None:
        """Room for `need` positions (at least double): the buffers are copied, the steps made again."""
        old = self.capacity
        self.cache.reserve(max(_round_up(need), 2 * old))  # copies what is filled, zero beyond
        capacity = self.capacity
        key_valid = torch.ones(self.batch, capacity, dtype=torch.bool, device=self.device)
        key_valid[:, :old] = self.key_valid
        self.key_valid = key_valid
        self.rope = self.model.transformer.rope_tables(capacity, self.device)
        self._steps.clear()  # graphs read the old buffers by address

    # --- the fixed-shape step, per span ---
    def _forward(self, span: int) -> torch.Tensor:
        cache = self.cache.at(self.pos, span, self.key_valid)
        hidden = self.model.transformer(self.tokens, self.position_ids, past_key_values=cache)[0]  # [b, 1, h]
        return self.model.output_head()(hidden)[:, -1]

    def _make_step(self, span: int):
        if not self.cache.is_written():
            raise RuntimeError("static decode: the prefill did not fill every layer's buffers")
        fn = lambda: self._forward(span)  # noqa: E731
        if self.mode == "compile":
            if self.device.type == "cpu":
                from kernels import torch_ops

                torch_ops.register()  # the C kernels enter the graph as operators
            _allow_recompiles(64)
            fn = torch.compile(fn, dynamic=False)
        if self.mode == "cuda_graph" or (self.mode == "compile" and self.device.type == "cuda"):
            return _capture(fn, self.device)
        return fn


def _allow_recompiles(limit: int) -> None:
    """Each (decoder, span) is its own specialization of one code object; past dynamo's default of 8 it would
    quietly run the step uncompiled. Raised (never lowered) for the process."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # the first is the newer name of the second
        if isinstance(getattr(dynamo_config, name, None), int):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))
            return


def _capture(fn, device):
    """Record fn (no arguments) in a CUDA graph after warming it up on a side stream; returns the replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):  # compiles Triton kernels, autotunes, fills caches: nothing of this may be recorded
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads (a server's other requests, another model) may use CUDA meanwhile.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()

    def replay():
        graph.replay()
        return out.clone()  # the graph's output is overwritten by the next replay: callers may keep the logits

    return replay


def get_decoder(model, batch: int, need: int, mode: str) -> StaticDecoder:
    """A decoder of the model for this batch size and mode with room for `need` positions (it grows when a
    reply needs more), marked busy until `release`. One is kept per (batch, mode) while the parameters stay
    where they are (a graph reads them at fixed addresses: after `.to()`, `.half()` or `.quantize()` the old
    one is dropped). When the kept one is busy (servers interleave the steps of two requests), this
    generation gets a private one."""
    capacity = _round_up(need)
    signature = tuple((p.data_ptr(), p.dtype, p.device) for p in model.parameters())
    key = (batch, mode)
    with _lock:  # two threads must not both take the kept decoder
        kept = model.__dict__.setdefault("_static_decoders", {})
        dec, sig = kept.get(key, (None, None))
        if dec is not None and sig == signature and not dec.busy:
            dec.busy = True
        elif dec is not None and sig == signature:
            dec = None  # busy: a private one, made below
        else:
            kept.pop(key, None)  # free the old buffers and graphs before allocating new ones
            dec = StaticDecoder(model, batch, capacity, mode)
            dec.busy = True
            kept[key] = (dec, signature)
    if dec is None:
        dec = StaticDecoder(model, batch, capacity, mode)
        dec.busy = True
    elif dec.capacity < capacity:
        dec.grow(capacity)
    return dec


def _round_up(n: int) -> int:
    return -(-n // CAPACITY_STEP) * CAPACITY_STEP


def check_model(model, mode: str) -> None:
    """Raise ValueError when `model` cannot decode in `mode` (checked at load time by utils)."""
    check_mode(mode)
    if mode != "eager":
        _device_for(model, mode)


def _device_for(model, mode: str) -> torch.device:
    from .base import ChatGLMCausalLM  # here: base imports generation, which imports this module

    if not isinstance(model, ChatGLMCausalLM):
        raise ValueError(f"decode={mode!r} needs a ChatGLM model of this package, not {type(model).__name__}")
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        raise ValueError(f"decode={mode!r} needs the whole model on one device (found {len(devices)})")
    device = devices.pop()
    if mode == "cuda_graph" and device.type != "cuda":
        raise ValueError(f"decode='cuda_graph' needs the model on a CUDA device, not {device}")
    return device
