"""Benchmarks: each script prints its figures and conditions (see docs/benchmarks.md)."""

from __future__ import annotations

import threading
import time


def all_at_once(fn, n: int) -> tuple[list, float]:
    """fn(i) for i in range(n), each on its own thread, started together: (their results, wall seconds)."""
    out = [None] * n

    def one(i):
        out[i] = fn(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, time.perf_counter() - start
