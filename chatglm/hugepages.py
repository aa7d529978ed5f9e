"""Weights in transparent huge pages (Linux, CPU): faster decode when the weights do not fit in cache.

Decode reads every weight once per token, far more bytes than any cache holds. With 4 KiB pages a 3.4 GB INT4
model is 850 000 pages: the walk through them misses the TLB every 4 KiB and the hardware prefetcher stops at
each page boundary. The same weights in 2 MiB pages stream faster (`benchmarks/bench_generate.py`, see
docs/benchmarks.md). Most kernels only give huge pages to memory that asks for them (`enabled` is `madvise`),
and torch's allocator does not ask, so `move_to_huge_pages` copies each large CPU tensor of a model into
anonymous memory advised with MADV_HUGEPAGE, one tensor at a time (the extra memory is one tensor at most).

Nothing changes for the caller: the parameters keep their names, dtypes, shapes and values; `state_dict`,
saving and moving to another device work as before. Turned off by CHATGLM_NO_HUGE_PAGES=1, and a no-op where
transparent huge pages are `never` or absent (not Linux).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap

import torch

from kernels.settings import settings

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25  # Linux 6.1+: back a range with huge pages now (compacting memory if it must)
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
# Tensors smaller than this stay where they are (a huge page must be wholly inside the tensor to help).
MIN_BYTES = 4 << 20
COLLAPSE_TRIES, COLLAPSE_PIECE = 3, 64 << 20  # fill_in: rounds, and bytes asked at a time


def thp_mode() -> str:
    """The bracketed choice of the kernel's THP setting ('always', 'madvise', 'never'), or '' when unknown."""
    try:
        with open(THP_SETTING, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def enabled() -> bool:
    return settings.huge_pages and thp_mode() in ("always", "madvise")


@functools.lru_cache(maxsize=1)
def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _advise(address: int, nbytes: int, advice: int, name: str) -> bool:
    """madvise the whole 2 MiB pages of [address, address + nbytes) (the rest keeps 4 KiB pages); True when Linux
    took it, False when it refused or no whole huge page lies inside."""
    start = address + (-address) % HUGE_PAGE
    span = (address + nbytes - start) // HUGE_PAGE * HUGE_PAGE
    if span <= 0:
        return False
    if _madvise()(start, span, advice) != 0:
        logger.debug("madvise(%s) failed: errno %d", name, ctypes.get_errno())
        return False
    return True


def huge_page_empty(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of nbytes whose 2 MiB-aligned whole pages are advised MADV_HUGEPAGE. The memory
    belongs to an anonymous private mapping that lives as long as the tensor (and its views)."""
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(region, dtype=torch.uint8)  # holds a reference to the mapping
    offset = (-whole.data_ptr()) % HUGE_PAGE
    _advise(whole.data_ptr() + offset, nbytes, MADV_HUGEPAGE, "MADV_HUGEPAGE")
    return whole[offset : offset + nbytes]


def collapse(address: int, nbytes: int) -> bool:
    """Ask Linux to back the whole 2 MiB pages of [address, address + nbytes) with huge pages now
    (MADV_COLLAPSE); True when it did. A page fault in MADV_HUGEPAGE memory takes a huge page only when one is
    free at that moment, and with the page cache full of checkpoint shards part of a model's weights fell back
    to 4 KiB pages (2.26 of 2.9 GiB in one load, 2.71 in the next; decode 119 against 83 ms/token). Kernels
    before 6.1 refuse it (EINVAL): the memory stays as it is."""
    return _advise(address, nbytes, MADV_COLLAPSE, "MADV_COLLAPSE")


def anon_huge_bytes(addresses, smaps: str = "/proc/self/smaps") -> dict[int, int]:
    """For each address, the bytes of huge pages (AnonHugePages) of the mapping that holds it: one read of smaps
    for them all (0 for an address in no mapping, or when smaps cannot be read)."""
    wanted, found = sorted(set(addresses)), {}
    try:
        with open(smaps, encoding="ascii", errors="replace") as f:
            inside: list[int] = []
            for line in f:
                head = line.split(maxsplit=1)[0] if line.strip() else ""
                if "-" in head and not head.endswith(":"):
                    start, end = (int(v, 16) for v in head.split("-"))
                    inside = [a for a in wanted if start <= a < end]
                elif inside and head == "AnonHugePages:":
                    for a in inside:
                        found[a] = int(line.split()[1]) * 1024
                    inside = []
    except (OSError, ValueError):
        pass
    return {a: found.get(a, 0) for a in addresses}


def whole_pages(address: int, nbytes: int) -> int:
    """Bytes of the whole 2 MiB pages inside [address, address + nbytes)."""
    start = address + (-address) % HUGE_PAGE
    return max(0, (address + nbytes - start) // HUGE_PAGE * HUGE_PAGE)


def fill_in(regions, tries: int = COLLAPSE_TRIES, piece: int = COLLAPSE_PIECE) -> tuple[int, int]:
    """Collapse again, `piece` bytes at a time, the regions (address, nbytes; each in a mapping of its own) whose
    whole 2 MiB pages are not all huge pages yet, up to `tries` rounds; (bytes in huge pages, bytes that could be).

    A copy made while the page cache is full of checkpoint shards, or when free memory lies in small pieces (after
    other processes ran: 4 of 14 free GB in 2-4 MiB blocks, 2026-12-07), can fault in part of its pages at 4 KiB,
    and one MADV_COLLAPSE of a whole tensor fails whole where compaction fails once; Linux also backs off
    compaction after failures, so a later, smaller request can succeed. Decode read 3.3 GiB in 71-85 ms/token with
    every page huge and 103-118 ms with 2.1-2.4 GiB."""
    regions = [(a, n) for a, n in regions if whole_pages(a, n)]
    want = sum(whole_pages(a, n) for a, n in regions)
    have = anon_huge_bytes([a for a, _ in regions])
    for _ in range(tries):
        short = [(a, n) for a, n in regions if have[a] < whole_pages(a, n)]
        if not short:
            break
        for address, nbytes in short:
            for off in range(0, nbytes, piece):
                collapse(address + off, min(piece, nbytes - off))
        have = anon_huge_bytes([a for a, _ in regions])
    return sum(min(have[a], whole_pages(a, n)) for a, n in regions), want


def to_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a contiguous CPU tensor in huge-page memory (same dtype, shape and values)."""
    nbytes = tensor.numel() * tensor.element_size()
    out = huge_page_empty(nbytes).view(tensor.dtype).view(tensor.shape)
    out.copy_(tensor)
    collapse(out.data_ptr(), nbytes)
    return out


def move_to_huge_pages(model: torch.nn.Module, min_bytes: int = MIN_BYTES) -> int:
    """Move every CPU parameter and buffer of at least min_bytes into huge-page memory, in place; returns the
    bytes moved (0 when turned off or unsupported). Tied weights stay tied."""
    if not enabled():
        return 0
    moved: dict[tuple, torch.Tensor] = {}
    done = getattr(model, "_huge_page_ptrs", set())  # tensors an earlier call moved: not copied again
    total = 0
    with torch.no_grad():
        for module in model.modules():
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(module, kind).items():
                    if t is None or t.device.type != "cpu" or not t.is_contiguous() or t.is_sparse:
                        continue
                    nbytes = t.numel() * t.element_size()
                    if nbytes < min_bytes or t.data_ptr() in done:
                        continue
                    key = (t.data_ptr(), t.dtype, tuple(t.shape))
                    if key not in moved:
                        moved[key] = to_huge_pages(t.data)
                        total += nbytes
                    if isinstance(t, torch.nn.Parameter):
                        t.data = moved[key]
                    else:
                        getattr(module, kind)[name] = moved[key]
    model._huge_page_ptrs = done | {t.data_ptr() for t in moved.values()}
    if total:
        have, want = fill_in([(t.data_ptr(), t.numel() * t.element_size()) for t in moved.values()])
        log = logger.debug if have >= want else logger.info
        log("moved %.2f GiB of weights into huge pages, %.2f of %.2f GiB of them backed by 2 MiB pages",
            total / 2**30, have / 2**30, want / 2**30)  # fmt: skip
    return total
