"""Writing large store files around the page cache (Linux ``O_DIRECT``).

A population's weight snapshots are hundreds of MB written once and read, if at all, later by an analysis.
Written through the page cache, every byte is first copied into a fresh cache page. On a virtual machine
whose host takes back the guest's free memory (free page reporting, or memory mapped in lazily), the first
touch of such a page costs a host page fault. On the 2-core Firecracker VM of the README's performance
table, one ``write`` of 230 MB into the cache took 3.0-3.9 s of kernel time, against 0.10-0.14 s for the
same bytes with ``O_DIRECT`` from one reused 4 MB buffer; in the sweep benchmark's trials the store write
of a population's 230 MB of snapshots went from 2.8-3.4 s to 0.6-0.8 s (with the jemalloc pool of
``raydyn.store.store._write_pool``).

:class:`DirectFile` is the file-like sink Parquet writes into: it gathers the writer's pages in an aligned
buffer and writes it out in whole blocks; the last block is padded and the file truncated to its length.
The file is byte for byte what a buffered write gives. Only where ``O_DIRECT`` exists and the filesystem
takes it (ext4, xfs, btrfs, tmpfs since Linux 6.6, ...); :func:`open_direct` returns None elsewhere and the
caller writes as usual. The costs: the write waits for the disk (a buffered one returns once the bytes are
in memory), and the file is not left in the page cache, so its first reader reads it from the disk.
``RAYDYN_DIRECT_IO=0`` turns it off (e.g. on a disk much slower than ~1 GB/s).
"""
from __future__ import annotations

import errno
import mmap
import os
import threading

__all__ = ["DirectFile", "open_direct", "MIN_BYTES", "ENV"]

#: Environment variable: "0" writes every file through the page cache.
ENV = "RAYDYN_DIRECT_IO"
#: Files expected smaller than this are written as usual (the saving is per byte; the set-up is not).
MIN_BYTES = 16 * 2**20
#: Bytes per write call; a multiple of every logical block size in use (512 B or 4 KiB).
_CHUNK = 4 * 2**20
_BLOCK = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)

# one staging buffer per process, reused by every write (fresh memory is what this module avoids paying for)
_spare: list[mmap.mmap] = []
_spare_lock = threading.Lock()


def _buffer() -> mmap.mmap:
    with _spare_lock:
        if _spare:
            return _spare.pop()
    # anonymous mappings are page-aligned, as O_DIRECT needs
    return mmap.mmap(-1, _CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0))


def _release(buf: mmap.mmap) -> None:
    with _spare_lock:
        if not _spare:
            _spare.append(buf)
            return
    buf.close()


def enabled() -> bool:
    return bool(_O_DIRECT) and os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class DirectFile:
    """A write-only file opened with ``O_DIRECT``: ``write``/``tell``/``close``, as pyarrow's sinks need."""

    def __init__(self, fd: int, path: str):
        self._fd, self.path = fd, path
        self._buf = _buffer()
        self._view = memoryview(self._buf)
        self._fill = 0  # bytes staged in the buffer
        self._size = 0  # bytes written by the caller
        self.closed = False

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:  # bytes leave in whole chunks (and the rest at close)
        pass

    def write(self, data) -> int:
        src = memoryview(data).cast("B")
        n, pos = len(src), 0
        while pos < n:
            k = min(_CHUNK - self._fill, n - pos)
            self._view[self._fill:self._fill + k] = src[pos:pos + k]
            self._fill += k
            pos += k
            if self._fill == _CHUNK:
                self._write_out(_CHUNK)
                self._fill = 0
        self._size += n
        return n

    def _write_out(self, nbytes: int) -> None:
        view = self._view[:nbytes]
        done = 0
        while done < nbytes:  # a short write of a block-aligned request stays block-aligned
            done += os.write(self._fd, view[done:])

    def close(self) -> None:
        """Write the staged tail (padded to a whole block), cut the file to its length and close it."""
        if self.closed:
            return
        try:
            if self._fill:
                padded = -(-self._fill // _BLOCK) * _BLOCK
                self._view[self._fill:padded] = bytes(padded - self._fill)
                self._write_out(padded)
            os.ftruncate(self._fd, self._size)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without writing the staged tail (the caller deletes the file)."""
        if not self.closed:
            self.closed = True
            os.close(self._fd)
            self._view.release()
            _release(self._buf)


def open_direct(path: str) -> DirectFile | None:
    """``path`` created (or truncated) for a direct write, or None where the platform or filesystem has no
    ``O_DIRECT`` (the caller then writes through the page cache). Other errors (no such directory, no
    permission) are raised as from ``open``."""
    if not enabled():
        return None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_DIRECT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise
    return DirectFile(fd, path)
