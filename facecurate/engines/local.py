"""The local engine: worker processes on this machine.

With ``workers`` lanes, ``workers - 1`` processes are *spawned* (never forked: a
forked child of a process whose OpenCV / ONNX Runtime thread pools already run can
deadlock) and this process is the last lane: it runs shards itself while the
children start and load their models, and keeps every child two shards ahead so
that none waits. Children die with this process (:func:`facecurate.common.procs.die_with_parent`).
A shard that raises is retried; a child that dies breaks the pool, which is rebuilt
and the shards in flight retried, up to :data:`facecurate.engines.runner.MAX_SHARD_RETRIES`.

The same module holds :class:`LocalPool`, the local engine's stateless form for work
that has no per-shard record (clean's per-identity work): ``share`` an array with
the workers (a read-only memory map of one copy) and ``map`` a module-level function
over shards, results in shard order::

    with LocalPool(workers) as pool:
        handle = pool.share(big_array)
        for result in pool.map(fn, [(handle, shard) for shard in shards]):
            ...

Both start their workers with spawn, make them die with this process, and keep
their BLAS / OpenCV single-threaded (one process per core already).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import tempfile
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from facecurate.common.constants import BLAS_THREAD_VARS
from facecurate.common.procs import die_with_parent, stop_processes
from facecurate.engines.runner import MAX_SHARD_RETRIES, Outcome, ShardRunner, WorkerSpec, WorkerSetupError

_RUNNER: dict = {}  # the ShardRunner of this worker process


@contextlib.contextmanager
def single_threaded_children():
    """Children spawned inside this block run their BLAS single-threaded (the variable
    must be set before numpy loads in the child, so it is set here, in the parent)."""
    saved = {k: os.environ.get(k) for k in BLAS_THREAD_VARS}
    os.environ.update({k: "1" for k in BLAS_THREAD_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _child_init(spec: WorkerSpec, parent_pid: int) -> None:
    die_with_parent(parent_pid)  # a killed run leaves no worker behind
    _RUNNER["r"] = ShardRunner(spec, child=True)


def _child_run(shard) -> dict:
    return _RUNNER["r"].run(shard)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class LocalEngine:
    name = "local"

    def __init__(self, workers: Optional[int] = None, max_retries: int = MAX_SHARD_RETRIES, own_lane: bool = True):
        """``own_lane``: this process runs shards too (``workers - 1`` children); False:
        ``workers`` children and this process only hands out shards (a driver that holds
        large data of its own, such as the sharded clean's, keeps its memory to itself)."""
        self.workers = max(1, int(workers or default_workers()))
        self.max_retries = max_retries
        self.own_lane = own_lane
        self._own: Optional[ShardRunner] = None

    def lanes(self, spec: WorkerSpec, n_shards: int) -> int:
        return max(1, min(self.workers, n_shards))

    def _own_runner(self, spec: WorkerSpec) -> ShardRunner:
        if self._own is None or self._own.spec != spec:
            self._own = ShardRunner(spec, child=False)
        return self._own

    def _attempt(self, runner: ShardRunner, shard, tries: dict) -> Optional[Outcome]:
        """Run one shard in this process; an Outcome when it is final, None to retry."""
        try:
            return Outcome(shard, runner.run(shard), retries=tries.get(shard.index, 0))
        except WorkerSetupError:
            raise
        except Exception as e:  # noqa: BLE001 - a shard's failure is reported, not fatal
            return self._failed(shard, e, tries)

    def _failed(self, shard, e: BaseException, tries: dict) -> Optional[Outcome]:
        n = tries.get(shard.index, 0)
        if n >= self.max_retries:
            return Outcome(shard, None, _error(e), retries=n)
        tries[shard.index] = n + 1
        return None

    def run(self, spec: WorkerSpec, shards) -> Iterator[Outcome]:
        pending = deque(shards)
        tries: dict = {}
        lanes = self.lanes(spec, len(pending))
        if lanes == 1 and self.own_lane:
            yield from self._run_here(spec, pending, tries)
            return
        with single_threaded_children():  # children are spawned on demand, while the run lasts
            yield from self._run_pool(spec, pending, tries, lanes - 1 if self.own_lane else lanes)

    def _run_here(self, spec, pending: deque, tries: dict) -> Iterator[Outcome]:
        runner = self._own_runner(spec)
        while pending:
            shard = pending.popleft()
            if pending:
                runner.prefetch(pending[0])  # ordered read-ahead, when the worker has it
            o = self._attempt(runner, shard, tries)
            if o is None:
                pending.appendleft(shard)
            else:
                yield o

    def _run_pool(self, spec, pending: deque, tries: dict, children: int) -> Iterator[Outcome]:
        ex = self._pool(spec, children)
        running: dict = {}
        clean_exit = False
        try:
            while pending or running:
                while pending and len(running) < 2 * children:
                    s = pending.popleft()
                    running[ex.submit(_child_run, s)] = s
                if pending and self.own_lane:  # this process's own share; children start meanwhile
                    shard = pending.popleft()
                    o = self._attempt(self._own_runner(spec), shard, tries)
                    if o is None:
                        pending.append(shard)
                    else:
                        yield o
                    finished = [f for f in running if f.done()]
                else:
                    finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                broken = False
                for f in finished:
                    shard = running.pop(f)
                    try:
                        yield Outcome(shard, f.result(), retries=tries.get(shard.index, 0))
                    except BrokenProcessPool as e:
                        broken = True
                        o = self._failed(shard, e, tries)
                        pending.append(shard) if o is None else (yield o)
                    except Exception as e:  # noqa: BLE001
                        o = self._failed(shard, e, tries)
                        pending.append(shard) if o is None else (yield o)
                if broken:  # a child died: the pool is unusable; retry its shards on a new one
                    for f, shard in list(running.items()):
                        running.pop(f)
                        o = self._failed(shard, RuntimeError("a worker process died"), tries)
                        pending.append(shard) if o is None else (yield o)
                    ex.shutdown(wait=False, cancel_futures=True)
                    ex = self._pool(spec, children)
            clean_exit = True
        finally:
            if not clean_exit:  # an error or Ctrl-C: stop the shards in flight now, not after them
                stop_processes(list((getattr(ex, "_processes", None) or {}).values()))
            ex.shutdown(wait=clean_exit, cancel_futures=True)

    @staticmethod
    def _pool(spec: WorkerSpec, children: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(children, mp_context=mp.get_context("spawn"),
                                   initializer=_child_init, initargs=(spec, os.getpid()))


# --------------------------------------------------------------------------- LocalPool
_OPEN: dict[str, np.ndarray] = {}  # worker side: memory maps opened so far, by path


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


def _pool_init(parent: int) -> None:
    """LocalPool worker initializer: die with the parent (and leave Ctrl-C to it)."""
    die_with_parent(parent)


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
            with single_threaded_children():
                self._pool = mp.get_context("spawn").Pool(self.workers, initializer=_pool_init,
                                                          initargs=(os.getpid(),))
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


__all__ = ["LocalEngine", "LocalPool", "SharedArray", "distribute", "default_workers"]
