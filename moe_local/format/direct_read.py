"""Read byte ranges of a file past the OS page cache (``O_DIRECT``), or through it and then drop it.

A budgeted load reads experts over and over from disk. Through the page cache each read is
charged to the process's cgroup until it is dropped again, and is slower: on the 2-core test VM's
virtual disk a cold 21 MiB read ran at 0.72 GB/s buffered against 1.2 GB/s with ``O_DIRECT``
(``benchmarks/bench_direct_read.py``). ``O_DIRECT`` wants the file offset, the length and the
buffer's address aligned to the device's logical block; 4 KiB covers every common device. The
range read is widened to whole blocks, into an aligned buffer, and the caller gets a view of the
bytes it asked for (at most 8 KiB more is held with it).

Filesystems without ``O_DIRECT`` (tmpfs, some network and FUSE filesystems) refuse it at open or
at the first read; such a file is then read buffered, with its pages dropped afterwards, and the
refusal is remembered for the rest of the process.
"""

from __future__ import annotations

import errno
import os

import torch

ALIGN = 4096  # covers 512-byte and 4 KiB logical blocks
_CHUNK = 1 << 30  # preadv moves at most ~2 GiB per call on Linux
_REFUSED: set[str] = set()  # files whose filesystem refused O_DIRECT (read buffered from then on)
_DIRECT_FLAG = getattr(os, "O_DIRECT", 0)


def pread_into(fd: int, buf: memoryview, offset: int, *, allow_short: bool = False) -> int:
    """Fill ``buf`` from ``fd`` at ``offset``, looping over short reads.

    Args:
        fd: an open file.
        buf: where the bytes go.
        offset: the file offset of ``buf[0]``.
        allow_short: stop quietly at the end of the file (an aligned read may run past it).

    Returns:
        Bytes read.

    Raises:
        OSError: when the file ends before ``buf`` is full (unless ``allow_short``).
    """
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done : done + _CHUNK]], offset + done)
        if n <= 0:
            if allow_short:
                break
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += n
    return done


def aligned_empty(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes`` whose first byte lies on an ``ALIGN`` boundary."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    shift = -raw.data_ptr() % ALIGN
    return raw[shift : shift + nbytes]


def read_range(
    path: str | os.PathLike[str],
    offset: int,
    nbytes: int,
    *,
    direct: bool = True,
    element: int = 1,
    drop: bool = True,
) -> torch.Tensor:
    """Read ``nbytes`` at ``offset`` of ``path`` into a new uint8 tensor, leaving no page cache.

    Args:
        path: the file.
        offset: first byte.
        nbytes: bytes to read.
        direct: try ``O_DIRECT`` first (False: buffered, then the pages dropped).
        drop: with ``direct=False``, drop the pages read (False: a plain read that leaves them
            cached, as an unbudgeted load wants).
        element: bytes per element the caller will view the bytes as: a direct read whose
            ``offset`` is not a multiple of it is copied to a fresh tensor, so the view is legal.

    Returns:
        A uint8 tensor of ``nbytes`` (a view into a slightly larger aligned buffer when read direct).

    Raises:
        OSError: the file cannot be opened or ends before ``offset + nbytes``.
    """
    key = os.fspath(path)
    if direct and _DIRECT_FLAG and key not in _REFUSED and nbytes:
        try:
            data = _read_direct(key, offset, nbytes)
            return data if offset % element == 0 else data.clone()
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _REFUSED.add(key)  # this filesystem does not do O_DIRECT: buffered from now on
    return _read_buffered(key, offset, nbytes, drop or direct)


def read_joined(path: str | os.PathLike[str], ranges: list[tuple[int, int]]) -> torch.Tensor | None:
    """Byte ranges of ``path`` one after another in one new uint8 tensor, each read straight into place.

    A fused ``gate_up`` is gate's rows then up's: read into a buffer and copied into the halves, the
    copy of 15 MiB per bf16 expert cost a third as much again as its disk read under a budget (the
    copy's fresh pages are faulted in as it writes them). Here each range is read with ``O_DIRECT``
    into its place: that needs the gaps between the ranges in the file (Mixtral's ``w1, w2, w3``:
    gate, down, up) to be whole blocks, which a tensor of 4096-multiple bytes between them is. An
    aligned read also writes the block's bytes before a range and after it: those after fall where
    the next range goes (read later), those before are the previous range's, saved and put back.

    Args:
        path: the file.
        ranges: ``(offset, nbytes)`` of each range, in the order wanted.

    Returns:
        The ranges' bytes (a view into a buffer at most 8 KiB larger), or None where they cannot be
        read this way: gaps that are not whole blocks, no ``O_DIRECT`` here, or nothing to read.

    Raises:
        OSError: the file cannot be opened or ends before a range does.
    """
    key = os.fspath(path)
    if not _DIRECT_FLAG or key in _REFUSED or not ranges:
        return None
    first, total = ranges[0][0], 0
    for offset, nbytes in ranges:
        if nbytes <= 0 or (offset - first - total) % ALIGN:
            return None
        total += nbytes
    lead = first % ALIGN  # a range's place is congruent to its file offset, modulo the block
    buf = aligned_empty(-(-(lead + total) // ALIGN) * ALIGN)
    try:
        fd = os.open(key, os.O_RDONLY | _DIRECT_FLAG)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _REFUSED.add(key)
        return None
    try:
        place = lead
        for offset, nbytes in ranges:
            start, end = place - offset % ALIGN, -(-(place + nbytes) // ALIGN) * ALIGN
            before = buf[start:place].clone()  # the previous range's last bytes (empty for the first)
            got = pread_into(
                fd, memoryview(buf[start:end].numpy()), offset - (place - start), allow_short=True
            )
            if got < place + nbytes - start:
                raise OSError(f"unexpected end of file at byte {offset - (place - start) + got}")
            buf[start:place] = before
            place += nbytes
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _REFUSED.add(key)  # refused at the first read: the caller reads another way
        return None
    finally:
        os.close(fd)
    return buf[lead : lead + total]


def _read_direct(path: str, offset: int, nbytes: int) -> torch.Tensor:
    start = offset - offset % ALIGN
    end = -(-(offset + nbytes) // ALIGN) * ALIGN
    buf = aligned_empty(end - start)
    fd = os.open(path, os.O_RDONLY | _DIRECT_FLAG)
    try:
        got = pread_into(fd, memoryview(buf.numpy()), start, allow_short=True)
    finally:
        os.close(fd)
    if got < offset + nbytes - start:
        raise OSError(f"unexpected end of file at byte {start + got}")
    return buf[offset - start : offset - start + nbytes]


def _read_buffered(path: str, offset: int, nbytes: int, drop: bool) -> torch.Tensor:
    out = torch.empty(nbytes, dtype=torch.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        if nbytes:
            pread_into(fd, memoryview(out.numpy()), offset)
        if drop and hasattr(os, "posix_fadvise"):  # whole pages: the kernel keeps a page only partly named
            start = offset - offset % ALIGN
            span = -(-(offset + nbytes - start) // ALIGN) * ALIGN
            os.posix_fadvise(fd, start, span, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return out


def refused(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is read buffered because its filesystem refused ``O_DIRECT``."""
    return os.fspath(path) in _REFUSED or not _DIRECT_FLAG
