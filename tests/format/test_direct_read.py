"""Reads past the page cache: the bytes asked for, no cached pages left, a clean fallback."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os

import pytest
import torch

from moe_local.format import direct_read
from moe_local.format.direct_read import ALIGN, aligned_empty, read_range, refused

SIZE = 5 * ALIGN + 123  # not a whole number of blocks: aligned reads run past the end


@pytest.fixture
def data_file(tmp_path):
    payload = os.urandom(SIZE)
    path = tmp_path / "data.bin"
    path.write_bytes(payload)
    return path, payload


def _cached_pages(path) -> int | None:
    """Pages of ``path`` in the page cache (mincore on a private mapping), None where it cannot say."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        anchor = ctypes.c_char.from_buffer(mm)  # the mapping's address; mincore faults nothing in
        try:
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) != 0:
                return None
        finally:
            del anchor
    return sum(v & 1 for v in vec)


def _evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


RANGES = [(0, SIZE), (1, 7), (ALIGN - 3, ALIGN + 10), (SIZE - 50, 50), (8, 0)]


@pytest.mark.parametrize(("offset", "nbytes"), RANGES)
def test_the_bytes_asked_for_at_any_offset(data_file, offset, nbytes):
    path, payload = data_file
    got = read_range(path, offset, nbytes)
    assert got.dtype == torch.uint8 and got.numel() == nbytes
    assert bytes(got.numpy()) == payload[offset : offset + nbytes]
    assert bytes(read_range(path, offset, nbytes, direct=False).numpy()) == payload[offset : offset + nbytes]


def test_a_range_past_the_end_is_an_error(data_file):
    path, _ = data_file
    with pytest.raises(OSError, match="end of file"):
        read_range(path, SIZE - 10, 20)
    with pytest.raises(OSError, match="end of file"):
        read_range(path, SIZE - 10, 20, direct=False)


def test_views_of_wider_elements_are_legal(data_file):
    path, payload = data_file
    for offset in (0, 2, 6, 64):
        got = read_range(path, offset, 64, element=8)
        assert got.view(torch.int64).numel() == 8  # an odd start is copied, not left unviewable
        assert bytes(got.numpy()) == payload[offset : offset + 64]


def test_aligned_buffers():
    for n in (1, ALIGN, 3 * ALIGN + 5):
        buf = aligned_empty(n)
        assert buf.numel() == n and buf.data_ptr() % ALIGN == 0


def test_no_page_cache_is_left(data_file):
    path, _ = data_file
    _evict(path)
    before = _cached_pages(path)
    if before is None or before:
        pytest.skip("this filesystem keeps its pages (tmpfs) or mincore cannot say")
    read_range(path, 100, SIZE - 200)
    assert _cached_pages(path) == 0
    read_range(path, 100, SIZE - 200, direct=False)  # buffered: read, then dropped
    assert _cached_pages(path) == 0


def test_a_filesystem_without_o_direct_is_read_buffered(data_file, monkeypatch):
    path, payload = data_file
    real_open = os.open
    dropped = []

    def no_direct(p, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, adv: dropped.append((off, n, adv)))
    monkeypatch.setattr(direct_read, "_REFUSED", set())
    assert bytes(read_range(path, 10, 100).numpy()) == payload[10:110]
    assert refused(path)  # remembered: the next read does not try again
    assert dropped == [(0, ALIGN, os.POSIX_FADV_DONTNEED)]  # the whole pages read
    assert bytes(read_range(path, 0, 5).numpy()) == payload[:5]


def test_other_errors_are_not_hidden(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_range(tmp_path / "missing.bin", 0, 10)


def _direct_or_skip(path) -> None:
    if refused(path):
        pytest.skip("this filesystem refuses O_DIRECT (tmpfs): read_joined leaves the reading to others")


@pytest.mark.parametrize("first", [0, 100, ALIGN - 1])
def test_joined_ranges_are_read_into_place(tmp_path, first):
    # three ranges with whole blocks between them (as Mixtral's gate, down and up lie), not whole blocks
    # long themselves: each aligned read writes around its range, and the result is still exact
    payload = os.urandom(12 * ALIGN)
    path = tmp_path / "data.bin"
    path.write_bytes(payload)
    a, b = ALIGN + 300, 2 * ALIGN - 300
    ranges = [(first, a), (first + a + 2 * ALIGN, b), (first + a + 2 * ALIGN + b + ALIGN, 77)]
    got = direct_read.read_joined(path, ranges)
    if got is None:
        _direct_or_skip(path)
    assert bytes(got.numpy()) == b"".join(payload[o : o + n] for o, n in ranges)
    assert got.numel() == a + b + 77 and got.is_contiguous()


def test_joined_ranges_need_whole_blocks_between_them(data_file):
    path, _ = data_file
    assert direct_read.read_joined(path, [(0, 100), (150, 10)]) is None  # a gap of 50 bytes
    assert direct_read.read_joined(path, [(0, 100), (100 + ALIGN, 0)]) is None  # nothing to read
    assert direct_read.read_joined(path, []) is None


def test_a_joined_range_past_the_end_is_an_error(data_file):
    path, _ = data_file
    try:
        got = direct_read.read_joined(path, [(0, 10), (10 + ALIGN, SIZE)])
    except OSError as exc:
        assert "end of file" in str(exc)
    else:
        assert got is None
        _direct_or_skip(path)
        pytest.fail("a range past the end was read")


def test_a_budgeted_expert_reads_gate_and_up_into_place(tmp_path, monkeypatch):
    # the fused gate_up of a budgeted load is read straight into its halves: the same tensor as a plain
    # read, and no copy (read_joined answered)
    from moe_local.loading.checkpoint import open_checkpoint
    from moe_local.tiny import make_tiny_checkpoint

    folder = make_tiny_checkpoint("mixtral", tmp_path / "m", hidden_size=64, intermediate_size=32)
    answers = []
    real = direct_read.read_joined

    def spy(path, ranges):
        answers.append(real(path, ranges))
        return answers[-1]

    monkeypatch.setattr("moe_local.format.safetensors_io.read_joined", spy)
    plain = open_checkpoint(folder).experts
    budgeted = open_checkpoint(folder, drop_cache=True).experts
    for layer, expert in ((0, 0), (1, 3)):
        want, got = plain.read(layer, expert), budgeted.read(layer, expert)
        assert torch.equal(want.gate_up, got.gate_up) and torch.equal(want.down, got.down)
    assert len(answers) == 2
    if answers[0] is None:
        _direct_or_skip(next(folder.glob("*.safetensors")))
