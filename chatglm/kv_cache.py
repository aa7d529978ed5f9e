"""A preallocated KV cache that the attention layers write into in place (no concatenation per step).

The original grows its cache with `torch.cat` at every layer of every step: each new token copies the
whole cache once more (quadratic traffic over a reply, and two copies alive at once at the peak). Here each
layer owns a buffer [b, kv_heads, capacity, head_dim] allocated on first use (on the layer's own device, so
multi-GPU maps work) and grown by doubling; a step writes its new keys and values at [length, length + s)
and attends over a view of [0, length + s).

For everything that reads a cache, a `KVCache` looks like the original tuple: `len(cache)` layers and
`cache[i] == (k, v)`, each [b, kv_heads, length, head_dim]. A cache object is a snapshot: its `length` never
changes; `generate_stream` yields a new snapshot per step over the same storage. Storage is only appended
to past every snapshot's length, and a cache handed back to `generate` (the next chat turn, a retry from an
older turn) is copied first, so an old snapshot never sees another branch's tokens.
"""

from __future__ import annotations

import torch


class _Storage:
    def __init__(self, num_layers: int, capacity: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.capacity = capacity
        self.filled = 0  # positions written by the generation that owns this storage
        # Zero-filled buffers: the fixed-span attention of static_decode reads masked positions too, and 0 * NaN
        # of uninitialized memory would still be NaN.
        self.zeroed = False

    def new_buffer(self, like: torch.Tensor, capacity: int) -> torch.Tensor:
        """A layer's buffer [b, heads, capacity, d] in `like`'s dtype and device."""
        alloc = like.new_zeros if self.zeroed else like.new_empty
        return alloc(like.shape[0], like.shape[1], capacity, like.shape[3])


class KVCache:
    """A snapshot of `length` cached positions over shared, growable per-layer buffers."""

    def __init__(self, storage: _Storage, length: int = 0):
        self._storage = storage
        self.length = length

    @classmethod
    def empty(cls, num_layers: int, capacity: int) -> KVCache:
        return cls(_Storage(num_layers, max(int(capacity), 1)))

    @classmethod
    def from_past(cls, past, capacity: int) -> KVCache:
        """A fresh cache holding a copy of `past` (a KVCache or a tuple of per-layer (k, v))."""
        length = past[0][0].shape[2]
        cache = cls.empty(len(past), max(capacity, length))
        for i in range(len(past)):
            k, v = past[i]
            cache._write(i, k, v, 0)
        cache._storage.filled = length
        return cache.snapshot(length)

    def __len__(self) -> int:
        return len(self._storage.k)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._storage
        if s.k[i] is None:
            raise IndexError(f"layer {i} of the cache was never written")
        return s.k[i][:, :, : self.length], s.v[i][:, :, : self.length]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def capacity(self) -> int:
        return self._storage.capacity

    def snapshot(self, length: int) -> KVCache:
        return KVCache(self._storage, length)

    def reserve(self, extra: int) -> None:
        """Make room for `extra` positions after this snapshot (doubling, so growth is amortized)."""
        s = self._storage
        need = self.length + extra
        if need <= s.capacity:
            return
        new_cap = max(need, 2 * s.capacity)
        for i in range(len(s.k)):
            for bufs in (s.k, s.v):
                old = bufs[i]
                if old is not None:
                    new = s.new_buffer(old, new_cap)
                    new[:, :, : s.filled] = old[:, :, : s.filled]
                    bufs[i] = new
        s.capacity = new_cap

    def _write(self, i: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        s = self._storage
        end = start + k.shape[2]
        if end > s.capacity:
            raise RuntimeError(f"KV cache overflow: {end} > capacity {s.capacity} (call reserve first)")
        for bufs, t in ((s.k, k), (s.v, v)):
            if bufs[i] is None:
                bufs[i] = s.new_buffer(t, s.capacity)
            bufs[i][:, :, start:end] = t

    def append(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys/values for this step written after `length`; returns the views [0, length + s)."""
        s = self._storage
        self._write(i, k, v, self.length)
        end = self.length + k.shape[2]
        return s.k[i][:, :, :end], s.v[i][:, :, :end]

    def append_all(self, past) -> KVCache:
        """The snapshot after writing a whole tuple-style cache (the P-Tuning prefix) at the end."""
        n = past[0][0].shape[2]
        self.reserve(n)
        for i in range(len(past)):
            k, v = past[i]
            self._write(i, k, v, self.length)
        return self.advance(n)

    def layer(self, i: int) -> _LayerView:
        return _LayerView(self, i)

    def advance(self, n: int) -> KVCache:
        """The snapshot after a forward of n new positions (all layers appended)."""
        s = self._storage
        s.filled = max(s.filled, self.length + n)
        return self.snapshot(self.length + n)


class _LayerView:
    """What one layer gets: where to append its keys and values (no `.to`, so device hooks leave it alone)."""

    __slots__ = ("cache", "i")

    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i


class StaticSpan:
    """The cache of one fixed-shape decode step (chatglm/static_decode.py): per-layer buffers of fixed capacity,
    the write position as a 1-element tensor (not a Python int, so the step can be captured or compiled once),
    and the span of positions attended over (a bucket >= position + 1; the mask hides what lies past it)."""

    __slots__ = ("k", "v", "pos", "span")

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], pos: torch.Tensor, span: int):
        self.k, self.v, self.pos, self.span = k, v, pos, span

    def layer(self, i: int) -> _StaticLayer:
        return _StaticLayer(self, i)


class _StaticLayer:
    __slots__ = ("cache", "i")

    def __init__(self, cache: StaticSpan, i: int):
        self.cache, self.i = cache, i

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        kb, vb = c.k[self.i], c.v[self.i]
        kb.index_copy_(2, c.pos, k.to(kb.dtype))
        vb.index_copy_(2, c.pos, v.to(vb.dtype))
        return kb[:, :, : c.span], vb[:, :, : c.span]


def cache_length(past) -> int:
    """Positions held by a cache of either kind (0 for None)."""
    if past is None:
        return 0
    if isinstance(past, KVCache):
        return past.length
    return past[0][0].shape[2]


def layer_cache(past, i: int):
    """The per-layer argument for layer i: a view into a KVCache, the (k, v) tuple, or None."""
    if past is None:
        return None
    return past.layer(i) if isinstance(past, (KVCache, StaticSpan)) else past[i]


def extend(kv_cache, k: torch.Tensor, v: torch.Tensor):
    """The keys/values a layer attends over: in place in a KVCache, or the original's concatenation."""
    if isinstance(kv_cache, _LayerView):
        return kv_cache.cache.append(kv_cache.i, k, v)
    if isinstance(kv_cache, _StaticLayer):
        return kv_cache.append(k, v)
    if kv_cache is None:
        return k, v
    return torch.cat([kv_cache[0], k], dim=2), torch.cat([kv_cache[1], v], dim=2)
