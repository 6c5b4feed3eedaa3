"""The local engine: worker processes on this machine.

With ``workers`` lanes, ``workers - 1`` processes are *spawned* (never forked: a
forked child of a process whose OpenCV / ONNX Runtime thread pools already run can
deadlock) and this process is the last lane: it runs shards itself while the
children start and load their models, and keeps every child two shards ahead so
that none waits. Children die with this process (:func:`facecurate.procs.die_with_parent`).
A shard that raises is retried; a child that dies breaks the pool, which is rebuilt
and the shards in flight retried, up to :data:`facecurate.runner.MAX_SHARD_RETRIES`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Iterator, Optional

from facecurate.procs import die_with_parent, stop_processes
from facecurate.runner import MAX_SHARD_RETRIES, Outcome, ShardRunner, WorkerSpec, WorkerSetupError

_RUNNER: dict = {}  # the ShardRunner of this worker process


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

    def __init__(self, workers: Optional[int] = None, max_retries: int = MAX_SHARD_RETRIES):
        self.workers = max(1, int(workers or default_workers()))
        self.max_retries = max_retries
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
        if lanes == 1:
            yield from self._run_here(spec, pending, tries)
            return
        yield from self._run_pool(spec, pending, tries, lanes - 1)

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
                if pending:  # this process's own share; children start meanwhile
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


__all__ = ["LocalEngine", "default_workers"]
