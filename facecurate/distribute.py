"""A small distributor: run a per-shard function over a list of shards and get the
results back in shard order.

    with LocalPool(workers) as pool:
        handle = pool.share(big_array)          # read-only memory map in the workers
        for result in pool.map(fn, [(handle, shard) for shard in shards]):
            ...

``fn`` is a module-level function of one argument (the shard); it must not depend on
where it runs. ``LocalPool`` runs it in this process when ``workers`` is 1 and on
``workers`` spawned processes otherwise (spawn, never fork: a forked child of a
process whose OpenCV / ONNX Runtime thread pools already run can deadlock). The
workers die with this process (``PR_SET_PDEATHSIG`` on Linux) and run their BLAS
single-threaded (one process per core already). Arrays given to ``share`` reach the
workers as a read-only memory map of one copy (an anonymous ``memfd`` on Linux, a
temporary file elsewhere), not as pickled copies per shard, so memory does not grow
with the number of workers.

This is the interface another engine (e.g. Ray) would implement: ``share`` and an
ordered ``map``.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import tempfile
from typing import Any, Callable, Iterator, Sequence

import numpy as np

_BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_OPEN: dict[str, np.ndarray] = {}  # worker side: memory maps opened so far, by path


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class SharedArray:
    """A read-only array shared with the workers. ``get()`` returns the array itself in
    the process that shared it and a memory map of the same bytes in a worker."""

    def __init__(self, array: np.ndarray | None, path: str | None, dtype: str, shape: tuple):
        self._array, self.path, self.dtype, self.shape = array, path, dtype, shape

    def get(self) -> np.ndarray:
        if self._array is not None:
            return self._array
        a = _OPEN.get(self.path)
        if a is None:
            a = _OPEN[self.path] = np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r", shape=self.shape)
        return a

    def __reduce__(self):
        if self.path is None:  # pragma: no cover - only a pool with workers pickles shards
            raise TypeError("this SharedArray lives in-process only")
        return SharedArray, (None, self.path, self.dtype, self.shape)


def _die_with_parent(parent: int) -> None:
    """Worker initializer: be killed when the parent dies (Linux), and exit at once if it
    already has."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover
            pass
    if os.getppid() != parent:
        os._exit(1)


class LocalPool:
    """``workers`` spawned processes (none when ``workers`` is 1), reused across ``map``
    calls until ``close``."""

    def __init__(self, workers: int | None = None):
        self.workers = max(1, int(workers or default_workers()))
        self._pool = None
        self._files: list = []

    def __enter__(self) -> "LocalPool":
        return self

    def __exit__(self, exc_type, *_):
        self.close(terminate=exc_type is not None)

    def _start(self):
        if self._pool is None:
            saved = {k: os.environ.get(k) for k in _BLAS_ENV}
            os.environ.update({k: "1" for k in _BLAS_ENV})  # read by the workers' BLAS when it loads
            try:
                self._pool = mp.get_context("spawn").Pool(self.workers, initializer=_die_with_parent,
                                                          initargs=(os.getpid(),))
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return self._pool

    def share(self, array: np.ndarray) -> SharedArray:
        """A handle on ``array`` for the shards (written once to a memory-mapped file
        when there are workers)."""
        array = np.ascontiguousarray(array)
        if self.workers == 1:
            return SharedArray(array, None, array.dtype.str, array.shape)
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("facecurate-shared")
            f = os.fdopen(fd, "wb+", buffering=0)
            path = f"/proc/{os.getpid()}/fd/{fd}"
        else:  # pragma: no cover - not Linux
            f = tempfile.NamedTemporaryFile(prefix="facecurate-", suffix=".bin")
            path = f.name
        view = memoryview(array.reshape(-1).view(np.uint8))
        for b0 in range(0, len(view), 1 << 26):
            f.write(view[b0:b0 + (1 << 26)])
        f.flush()
        self._files.append(f)
        return SharedArray(array, path, array.dtype.str, array.shape)

    def map(self, fn: Callable[[Any], Any], shards: Sequence) -> Iterator:
        """``fn(shard)`` for every shard, yielded in shard order."""
        if self.workers == 1 or len(shards) <= 1:
            for s in shards:
                yield fn(s)
            return
        yield from self._start().imap(fn, shards, chunksize=1)

    def close(self, terminate: bool = False) -> None:
        if self._pool is not None:
            if terminate:
                self._pool.terminate()
            else:
                self._pool.close()
            self._pool.join()
            self._pool = None
        for f in self._files:
            f.close()
        self._files = []


def distribute(shards: Sequence, fn: Callable[[Any], Any], workers: int | None = None) -> Iterator:
    """``fn(shard)`` for every shard on a ``LocalPool`` of ``workers``, in shard order."""
    with LocalPool(workers) as pool:
        yield from pool.map(fn, shards)
