"""CPU weights in transparent huge pages (chatglm/hugepages.py): same values, tied stays tied, memory advised."""

import torch
from torch import nn

from chatglm import hugepages
from kernels.settings import settings


def _smaps_line(address: int, field: str) -> str:
    """The `field` line (e.g. 'VmFlags:') of the /proc/self/smaps mapping that holds `address` ('' when not found)."""
    inside = False
    with open("/proc/self/smaps", encoding="ascii") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(v, 16) for v in head.split("-"))
                inside = start <= address < end
            elif inside and head == field:
                return line
    return ""


def _vm_flags(address: int) -> str:
    return _smaps_line(address, "VmFlags:")


def test_tensor_copy_is_exact_and_advised():
    if not hugepages.enabled():
        import pytest

        pytest.skip(f"transparent huge pages are {hugepages.thp_mode() or 'unavailable'} here")
    src = torch.randn(3 << 20, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).view(3, -1)
    out = hugepages.to_huge_pages(src)
    assert out.dtype == src.dtype and out.shape == src.shape and torch.equal(out, src)
    assert out.data_ptr() % hugepages.HUGE_PAGE == 0
    assert " hg" in _vm_flags(out.data_ptr())  # madvise(MADV_HUGEPAGE) reached the kernel
    out.add_(1)  # private writable memory, independent of the source
    assert not torch.equal(out, src)


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages (KiB) of the mapping that holds `address` (0 when not found)."""
    line = _smaps_line(address, "AnonHugePages:")
    return int(line.split()[1]) if line else 0


def test_a_copy_is_collapsed_into_huge_pages_where_linux_can():
    """to_huge_pages asks for the whole range at once (MADV_COLLAPSE): where Linux says it did, every whole 2 MiB
    page of the copy is a huge page, whatever was free when the copy faulted its pages in."""
    if not hugepages.enabled():
        import pytest

        pytest.skip(f"transparent huge pages are {hugepages.thp_mode() or 'unavailable'} here")
    src = torch.arange(5 << 20, dtype=torch.int32)  # 20 MiB
    out = hugepages.to_huge_pages(src)
    assert torch.equal(out, src)
    if hugepages.collapse(out.data_ptr(), out.numel() * 4):  # again: a no-op on pages already huge
        assert _anon_huge_kib(out.data_ptr()) >= 10 * 2048  # 10 whole huge pages
    assert not hugepages.collapse(out.data_ptr() + 4096, 8192)  # no whole huge page inside: nothing asked


def test_model_moves_in_place_and_gives_the_same_logits(tiny_dirs, monkeypatch):
    import chatglm

    monkeypatch.setattr(settings, "huge_pages", True)
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "madvise")
    model = chatglm.load_model(str(tiny_dirs["v1"]), dtype="fp32").eval()
    ids = torch.randint(5, 100, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tied = model.lm_head.weight is model.transformer.word_embeddings.weight
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    moved = hugepages.move_to_huge_pages(model, min_bytes=1)
    assert moved == sum(v.numel() * v.element_size() for v in {p.data_ptr(): p for p in state.values()}.values())
    after_state = model.state_dict()
    assert after_state.keys() == state.keys()
    assert all(torch.equal(after_state[k], state[k]) for k in state)
    assert all(after_state[k].data_ptr() != ptrs[k] for k in state)  # every tensor really moved
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    if tied:
        assert model.lm_head.weight is model.transformer.word_embeddings.weight
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert hugepages.move_to_huge_pages(model, min_bytes=1) == 0  # nothing is copied twice


def test_off_switches(tiny_dirs, monkeypatch):
    import chatglm

    model = chatglm.load_model(str(tiny_dirs["v2"]), dtype="fp32")
    with settings.override(huge_pages=False):
        assert hugepages.move_to_huge_pages(model, min_bytes=1) == 0
    monkeypatch.setattr(settings, "huge_pages", True)
    monkeypatch.setattr(hugepages, "THP_SETTING", "/nonexistent/transparent_hugepage/enabled")
    assert hugepages.thp_mode() == "" and hugepages.move_to_huge_pages(model, min_bytes=1) == 0


def test_thp_mode_reads_the_bracketed_choice(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    monkeypatch.setattr(hugepages, "THP_SETTING", str(setting))
    assert hugepages.thp_mode() == "madvise" and hugepages.enabled()
    setting.write_text("always madvise [never]\n")
    assert hugepages.thp_mode() == "never" and not hugepages.enabled()


def test_cpu_load_with_device_moves_big_weights(tiny_dirs, monkeypatch):
    import chatglm

    monkeypatch.setattr(hugepages, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(hugepages, "MIN_BYTES", 1)
    calls = []
    real = hugepages.move_to_huge_pages
    monkeypatch.setattr(chatglm.loading, "move_to_huge_pages", lambda m: calls.append(real(m, min_bytes=1)))
    chatglm.load_model(str(tiny_dirs["v3"]), dtype="fp32", device="cpu")
    chatglm.load_model(str(tiny_dirs["v3"]), dtype="fp32")  # no device: it may go to a GPU next, left alone
    assert len(calls) == 1 and calls[0] > 0


def test_anon_huge_bytes_reads_each_addresss_mapping_from_smaps(tmp_path):
    smaps = tmp_path / "smaps"
    smaps.write_text(
        "7f0000000000-7f0000800000 rw-p 00000000 00:00 0 \nSize:               8192 kB\nAnonHugePages:      4096 kB\n"
        "VmFlags: rd wr mr mw me ac hg\n"
        "7f0000800000-7f0000a00000 rw-p 00000000 00:00 0 \nSize:               2048 kB\nAnonHugePages:         0 kB\n"
        "7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]\nAnonHugePages: 0 kB\n"
    )
    a, b = 0x7F0000000000 + 4096, 0x7F0000800000
    got = hugepages.anon_huge_bytes([a, b, 0x1000], smaps=str(smaps))
    assert got == {a: 4096 * 1024, b: 0, 0x1000: 0}
    assert hugepages.anon_huge_bytes([a], smaps=str(tmp_path / "missing")) == {a: 0}


def test_fill_in_collapses_the_short_regions_again_piece_by_piece_a_bounded_number_of_times(monkeypatch):
    page = hugepages.HUGE_PAGE
    full, short, never = (10 * page, 5 * page), (20 * page, 6 * page), (40 * page, 4 * page)
    have = {full[0]: 5 * page, short[0]: 2 * page, never[0]: 0}
    calls = []

    def collapse(address, nbytes):  # the second region fills in on its first retry; the third never does
        calls.append((address, nbytes))
        if short[0] <= address < short[0] + short[1]:
            have[short[0]] = short[1]
        return True

    monkeypatch.setattr(hugepages, "collapse", collapse)
    monkeypatch.setattr(hugepages, "anon_huge_bytes", lambda addresses: {a: have[a] for a in addresses})
    got, want = hugepages.fill_in([full, short, never, (60 * page + 1, 4096)], tries=3, piece=4 * page)
    assert (got, want) == (11 * page, 15 * page)  # the last region holds no whole 2 MiB page: not counted
    assert not any(full[0] <= a < full[0] + full[1] for a, _ in calls)  # a full region is left alone
    assert [c for c in calls if c[0] < never[0]] == [(short[0], 4 * page), (short[0] + 4 * page, 2 * page)]
    assert [c for c in calls if c[0] >= never[0]] == [(never[0], 4 * page)] * 3  # three rounds, then it stops


def test_moved_weights_report_how_much_of_them_is_in_huge_pages():
    if not hugepages.enabled():
        import pytest

        pytest.skip(f"transparent huge pages are {hugepages.thp_mode() or 'unavailable'} here")
    out = hugepages.to_huge_pages(torch.arange(3 << 20, dtype=torch.int32))  # 12 MiB: 6 whole huge pages
    have, want = hugepages.fill_in([(out.data_ptr(), 12 << 20)])
    assert want == 12 << 20 and 0 <= have <= want
    if hugepages.collapse(out.data_ptr(), 12 << 20):  # where Linux collapses at all, it is all there
        assert hugepages.fill_in([(out.data_ptr(), 12 << 20)])[0] == want
