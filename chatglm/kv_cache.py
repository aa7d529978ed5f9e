"""The one KV cache of both architectures: keys and values preallocated per layer and written in place, each row
of the batch at its own position.

The original grows its cache with `torch.cat` at every layer of every step: each new token copies the whole cache
once more (quadratic traffic over a reply, and two copies alive at once at the peak). Here each layer owns a
buffer [rows, kv_heads, capacity, head_dim], allocated on first use (on the layer's own device, so multi-GPU maps
work) and grown by doubling. Positions not written yet are zero: a fixed-span step, and rows shorter than the
longest, read them under a mask, and 0 * NaN of uninitialized memory would still be NaN. Attention reads a view
of the positions written so far; nothing is copied per step.

A `KVCache` is a snapshot: `lengths` (one int for every row, or one per row) never changes; a forward returns
the next snapshot over the same storage (`advance`). A storage made with `slots` holds that many rows, and a
snapshot may cover some of them (`select`): a sequence is prefilled alone into its slot, then decodes in one batch
with the others, each at its own length; rows outside a snapshot are neither read nor written. Storage is only written past every snapshot's length, and a cache handed back to
`generate` (the next chat turn, a retry from an older turn) is copied first, so an old snapshot never sees another
branch's tokens.

Two ways to write, one object:
- eager (prompt and decode): a layer's new keys go at each row's own length (one slice when the rows agree),
  and the layer attends over [0, the longest row's end);
- the fixed-shape decode step (chatglm/static_decode.py): `at(pos, span, key_valid)` gives a cache whose writes go
  to the positions held in a tensor (so the step can be captured or compiled once), whose reads cover a fixed
  span, and which gives the step's attention mask (`step_mask`) from tensors alone.

The original's tuple `past_key_values` (one (k, v) per layer, [b, kv_heads, length, head_dim]) exists only at
the API boundary: `from_past` copies one in, and a cache reads as one (`len(cache)`, `cache[i] == (k, v)`).
"""

from __future__ import annotations

import torch


class _Storage:
    def __init__(self, num_layers: int, capacity: int, slots: int | None = None):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.capacity = capacity
        self.slots = slots  # rows of every buffer (None: the rows of the first write)
        self.filled = 0  # positions written by the generation that owns this storage (the longest row)

    def new_buffer(self, like: torch.Tensor, capacity: int, written: int = 0) -> torch.Tensor:
        """A layer's buffer [slots, heads, capacity, d] in `like`'s dtype and device, zero past `written` (the
        positions the caller fills at once)."""
        rows = like.shape[0] if self.slots is None else self.slots
        buf = like.new_empty(rows, like.shape[1], capacity, like.shape[3])
        buf[:, :, written:].zero_()
        return buf


class KVCache:
    """A snapshot of the cached positions (`lengths`: an int for every row, or a tuple, one per row) of some rows
    (`rows`: slot indices, None = all) of shared, growable per-layer buffers; in fixed-step mode (`pos` set)
    writes go to tensor positions and reads cover `span` positions."""

    __slots__ = ("_storage", "lengths", "rows", "pos", "span", "key_valid", "_index", "__weakref__")

    def __init__(self, storage: _Storage, lengths: int | tuple[int, ...] = 0, rows=None, pos=None, span=None,
                 key_valid=None):  # fmt: skip
        if not isinstance(lengths, int) and len(set(lengths)) == 1:
            lengths = lengths[0]  # rows that agree are one length: slice writes
        self._storage, self.lengths, self.rows = storage, lengths, rows
        self.pos, self.span, self.key_valid = pos, span, key_valid
        self._index = None  # (shape, flat write positions) of rows at their own lengths, shared by the layers

    @classmethod
    def empty(cls, num_layers: int, capacity: int, slots: int | None = None) -> KVCache:
        """A new storage; with `slots`, of that many rows, to be used through `select`."""
        return cls(_Storage(num_layers, max(int(capacity), 1), slots))

    def select(self, rows, lengths: int | tuple[int, ...]) -> KVCache:
        """A snapshot of these rows (slot indices) of a storage made with `slots`, each at its length."""
        rows = tuple(int(r) for r in rows)
        slots = self._storage.slots
        if slots is None or not rows or min(rows) < 0 or max(rows) >= slots or len(set(rows)) != len(rows):
            raise ValueError(f"rows {rows} are not distinct slots of this cache (slots: {slots})")
        if not isinstance(lengths, int) and len(lengths) != len(rows):
            raise ValueError(f"{len(rows)} rows need {len(rows)} lengths, got {len(lengths)}")
        return KVCache(self._storage, lengths, rows)

    @classmethod
    def from_past(cls, past, capacity: int) -> KVCache:
        """A fresh cache holding a copy of `past` (a KVCache or the original's tuple of per-layer (k, v))."""
        return cls.empty(len(past), max(capacity, cache_length(past))).copy_in(past)

    def copy_in(self, past) -> KVCache:
        """The snapshot after writing a copy of `past` at the start of this (cleared) storage."""
        length = cache_length(past)
        self.reserve(length - self.length)
        for i in range(len(past)):
            self._write_slice(i, *past[i], 0)
        self._storage.filled = max(self._storage.filled, length)
        return KVCache(self._storage, past.lengths if isinstance(past, KVCache) else length)

    # --- reading, as the original's tuple ---
    @property
    def length(self) -> int:
        """Positions of the longest row."""
        return self.lengths if isinstance(self.lengths, int) else max(self.lengths)

    def __len__(self) -> int:
        return len(self._storage.k)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._storage
        if s.k[i] is None:
            raise IndexError(f"layer {i} of the cache was never written")
        rows = self._row_index(s.k[i].device)
        return s.k[i][rows, :, : self.length], s.v[i][rows, :, : self.length]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def to_tuple(self) -> tuple:
        """The original's form: a tuple of per-layer (k, v) views (no copy)."""
        return tuple(self)

    @property
    def capacity(self) -> int:
        return self._storage.capacity

    def is_written(self) -> bool:
        """Every layer has its buffers (a forward has run)."""
        return all(k is not None for k in self._storage.k)

    def shares_storage(self, other: KVCache) -> bool:
        return self._storage is other._storage

    # --- snapshots ---
    def advance(self, n: int) -> KVCache:
        """The snapshot after a forward of n new positions in every row (all layers written)."""
        s = self._storage
        lengths = self.lengths + n if isinstance(self.lengths, int) else tuple(x + n for x in self.lengths)
        s.filled = max(s.filled, self.length + n)
        return KVCache(s, lengths, self.rows)

    def at(self, pos: torch.Tensor, span: int, key_valid: torch.Tensor | None = None) -> KVCache:
        """This cache (all its rows) in fixed-step mode: writes at `pos` ([1], every row, or [rows]), reads
        [0, span); `key_valid` [rows, >= span] (False = a padding key) joins the step's mask."""
        return KVCache(self._storage, self.lengths, None, pos, span, key_valid)

    def step_mask(self) -> torch.Tensor:
        """Fixed-step mode: bool [rows or 1, 1, 1, span], True where a row's query may attend (keys up to its own
        position, padding excluded). Built from tensors only, so it can be captured or compiled."""
        keys = torch.arange(self.span, device=self.pos.device) <= self.pos[:, None]  # [rows or 1, span]
        if self.key_valid is not None:
            keys = keys & self.key_valid[:, : self.span]
        return keys[:, None, None, :]

    def reserve(self, extra: int) -> None:
        """Make room for `extra` positions after the longest row (doubling, so growth is amortized)."""
        s = self._storage
        need = self.length + extra
        if need <= s.capacity:
            return
        new_cap = max(need, 2 * s.capacity)
        for bufs in (s.k, s.v):
            for i, old in enumerate(bufs):
                if old is not None:
                    new = s.new_buffer(old, new_cap, s.filled)
                    new[:, :, : s.filled] = old[:, :, : s.filled]
                    bufs[i] = new
        s.capacity = new_cap

    def clear(self) -> KVCache:
        """An empty cache over this storage, its written positions zeroed (a fixed-span step reads them)."""
        s = self._storage
        for buf in s.k + s.v:
            if buf is not None:
                buf[:, :, : s.filled].zero_()
        s.filled = 0
        return KVCache(s, 0)

    @staticmethod
    def rehome(snapshots) -> None:
        """Give these snapshots (all over one storage) a copy of it of their own, so that storage can be reused."""
        snapshots = list(snapshots)
        if not snapshots:
            return
        longest = max(snapshots, key=lambda c: c.length)
        own = KVCache.from_past(KVCache(longest._storage, longest.length), 1)._storage
        for c in snapshots:
            c._storage = own

    # --- writing (layer i, from its attention) ---
    def append(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's new keys/values [rows, heads, s, d] written at each row's position; returns what the layer
        attends over: [rows, heads, end, d] with end the longest row's new length (or the fixed span)."""
        s = self._storage
        if self.pos is not None:
            return self._write_at(i, k, v)
        n = k.shape[2]
        if isinstance(self.lengths, int):
            self._write_slice(i, k, v, self.lengths)
        else:  # rows at their own positions: one indexed copy per tensor into the buffer seen as [-1, d]
            kb, vb = self._buffers(i, k, v, self.length + n, 0)
            index = self._flat_positions(kb, k)
            for buf, t in ((kb, k), (vb, v)):
                buf.view(-1, buf.shape[-1]).index_copy_(0, index, t.reshape(-1, t.shape[-1]).to(buf.dtype))
        end = self.length + n
        rows = self._row_index(k.device)  # a slice (a view) unless the rows are scattered (then a gather)
        return s.k[i][rows, :, :end], s.v[i][rows, :, :end]

    def append_all(self, past) -> KVCache:
        """The snapshot after writing a whole tuple-style cache (the P-Tuning prefix) after every row."""
        n = past[0][0].shape[2]
        self.reserve(n)
        for i in range(len(past)):
            self.append(i, *past[i])
        return self.advance(n)

    def _buffers(self, i: int, k: torch.Tensor, v: torch.Tensor, end: int, written: int):
        """Layer i's key and value buffers, allocated on first use (zero past `written`), with room up to `end`."""
        s = self._storage
        if end > s.capacity:
            raise RuntimeError(f"KV cache overflow: {end} > capacity {s.capacity} (call reserve first)")
        for bufs, t in ((s.k, k), (s.v, v)):
            if bufs[i] is None:
                bufs[i] = s.new_buffer(t, s.capacity, written)
        return s.k[i], s.v[i]

    def _row_index(self, device):
        """The snapshot's rows of a buffer: every row, a slice of consecutive slots, or an index tensor."""
        r = self.rows
        if r is None:
            return slice(None)
        if r == tuple(range(r[0], r[0] + len(r))):
            return slice(r[0], r[0] + len(r))
        return torch.tensor(r, device=device)

    def _flat_positions(self, buf: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Where row r's head h position lengths[r] + j is in a (contiguous) buffer seen as [-1, d], in the order
        of the new keys [rows, heads, n, d]; made once per snapshot and shape (every layer's buffer has the same),
        from Python ints (a decode step's few dozen positions: one tensor made, not eight small ops)."""
        slots, heads, cap, _ = buf.shape
        n = new.shape[2]
        key = (slots, heads, cap, n, buf.device)
        if self._index is None or self._index[0] != key:
            rows = self.rows if self.rows is not None else range(new.shape[0])
            flat = [(r * heads + h) * cap + length + j
                    for r, length in zip(rows, self.lengths) for h in range(heads) for j in range(n)]  # fmt: skip
            self._index = (key, torch.tensor(flat, device=buf.device))
        return self._index[1]

    def _write_slice(self, i: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        end = start + k.shape[2]
        written = end if start == 0 and self.rows is None else 0  # other slots' rows are not written here
        rows = self._row_index(k.device)
        for buf, t in zip(self._buffers(i, k, v, end, written), (k, v)):
            buf[rows, :, start:end] = t

    def _write_at(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The fixed-shape step: one new position per row, at the tensor `pos` (no Python value from the data).
        s = self._storage
        kb, vb = s.k[i], s.v[i]
        if self.pos.numel() == 1:  # every row at the same position
            kb.index_copy_(2, self.pos, k.to(kb.dtype))
            vb.index_copy_(2, self.pos, v.to(vb.dtype))
        else:  # each row at its own position
            rows = torch.arange(kb.shape[0], device=kb.device)
            kb[rows, :, self.pos] = k[:, :, 0].to(kb.dtype)
            vb[rows, :, self.pos] = v[:, :, 0].to(vb.dtype)
        return kb[:, :, : self.span], vb[:, :, : self.span]


def cache_length(past) -> int:
    """Positions held by a cache (the longest row of a KVCache, the original tuple's length; 0 for None)."""
    if past is None:
        return 0
    if isinstance(past, KVCache):
        return past.length
    return past[0][0].shape[2]


def open_cache(past, num_layers: int, new: int, use_cache: bool = True, prefix=None) -> KVCache | None:
    """The cache a forward of `new` positions writes into, with room for them: `past` itself when it is a
    KVCache, a copy of the original's tuple, a new one, or None when no cache is wanted (training without a
    prefix). `prefix` (a function returning the P-Tuning prefix as a tuple cache) fills an empty cache first."""
    if isinstance(past, KVCache):
        cache = past
    elif past is not None:
        cache = KVCache.from_past(past, cache_length(past) + new)
    else:
        cache = None
    if prefix is not None and cache_length(cache) == 0:
        kv = prefix()
        cache = (cache or KVCache.empty(num_layers, cache_length(kv) + new)).append_all(kv)
    elif cache is None and use_cache:
        cache = KVCache.empty(num_layers, new)
    if cache is not None:
        cache.reserve(new)
    return cache
