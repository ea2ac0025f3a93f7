"""A run of token ids in a file, read in place with positioned reads: memory does not
grow with the file, and every rank shares the page cache. No Lightning, no torch."""

import os
import threading
from pathlib import Path

import numpy as np

from gptnano.errors import UserError


class Tokens:
    """A 1-D run of token ids in a file, read on demand: ``len()``, slices (views: no
    reading), ``rows(starts, length)`` for a batch of windows, ``np.asarray`` for all of it.

    Why ``os.pread`` and not a memory map: on the reference machine (Linux 6.18) touching
    one token of a mapped file maps the whole large folio the page cache holds it in,
    ~1 MB, so 20 training steps of random windows added ~500 MB to the process's resident
    memory, growing with every step towards the size of the file. ``pread`` copies only
    the bytes of each window (one call per window, a few microseconds); the page cache
    still keeps the hot parts of the file in memory, shared by every rank. Where the OS has
    no ``pread`` (Windows), ``read_at`` reads the same bytes with a seek and a read.
    """

    def __init__(self, path: Path, dtype, start: int = 0, stop: int | None = None, _file=None, _lock=None):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self._file = _file or open(self.path, "rb", buffering=0)  # shared by every view of it
        self._lock = _lock or threading.Lock()  # and so is its position, where reads must seek (read_at)
        self.start = start
        self.stop = self._file.seek(0, os.SEEK_END) // self.dtype.itemsize if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key: slice) -> "Tokens":
        begin, end, step = key.indices(len(self))
        if step != 1:
            raise ValueError("Tokens slices must be contiguous")
        return Tokens(self.path, self.dtype, self.start + begin, self.start + max(begin, end), self._file,
                      self._lock)

    def __reduce__(self):  # a DataLoader worker process reopens the file
        return Tokens, (self.path, self.dtype, self.start, self.stop)

    def read(self, begin: int, end: int) -> np.ndarray:
        return self.rows(np.array([begin]), end - begin)[0]

    def rows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """``[len(starts), length]`` ids: row i holds tokens ``starts[i] : starts[i] + length`` of this view."""
        if len(starts) and (starts.min() < 0 or starts.max() + length > len(self)):
            raise IndexError(f"windows outside 0..{len(self)}")
        size = length * self.dtype.itemsize
        raw = b"".join(read_at(self._file, size, (self.start + int(s)) * self.dtype.itemsize, self._lock)
                       for s in starts)
        if len(raw) != size * len(starts):
            raise UserError(f"{self.path} became shorter while it was read: delete it and run again")
        return np.frombuffer(raw, dtype=self.dtype).reshape(len(starts), length)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        ids = self.read(0, len(self))
        return ids if dtype is None else ids.astype(dtype)


def read_at(file, size: int, offset: int, seek_lock: threading.Lock) -> bytes:
    """Up to ``size`` bytes of the open binary ``file`` from byte ``offset`` (fewer only at
    its end). ``os.pread`` where the OS has it (Linux, macOS): one call, no shared file
    position. Elsewhere (Windows) a seek and a read, under ``seek_lock`` because the
    position they move is shared by every thread reading the file."""
    pread = getattr(os, "pread", None)  # looked up per call, so a test can take it away
    if pread is not None:
        return pread(file.fileno(), size, offset)
    parts, got = [], 0
    with seek_lock:
        file.seek(offset)
        while got < size:  # an unbuffered read may return less than asked before the end
            part = file.read(size - got)
            if not part:
                break
            parts.append(part)
            got += len(part)
    return b"".join(parts)
