"""Process helpers every stage shares: worker processes that never outlive the run
that started them, and per-OUT run locks.

**Children die with their parent.** A cluster scheduler stops a job by killing its
main process (SIGTERM, then SIGKILL); nothing runs in that process afterwards, so
its workers must notice by themselves. :func:`die_with_parent`, called first in
every worker, asks Linux to SIGKILL the worker when its parent exits
(``prctl(PR_SET_PDEATHSIG)``), checks that the parent did not die before that took
effect, and starts a thread that polls ``os.getppid()`` (the portable fallback, and
a second line of defence). multiprocessing's resource tracker needs nothing: it
exits when the last process holding its pipe (parent and workers) is gone.

**Run locks.** :func:`run_lock` holds a kernel lock (``fcntl.flock``) on
``OUT/.facecurate/<stage>.lock`` for the length of a run, with the holder's pid
written in the file. The kernel drops the lock when the holder dies, however it
dies, so a stale lock file never blocks a rerun. The file name can carry a part
(``<stage>.part-K-of-N.lock``) so that disjoint slices of one run can each hold
their own lock.

**Memory of a process tree.** :func:`tree_pss` adds up the proportional set size
(PSS, ``/proc/PID/smaps_rollup``) of a process and all its descendants: a page
shared by k processes counts 1/k in each, so a memory map shared by a driver and
its workers (the embedding store, a fork's copy-on-write pages) counts once, where
summing RSS would count it once per process. :class:`PssSampler` samples it on a
thread and keeps the peak (the benchmarks' ``peak_pss_gb``). Linux only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

PROC = Path("/proc")

from facecurate.common.constants import LOCK_SUFFIX, WORK_DIR

PR_SET_PDEATHSIG = 1
#: How often the watcher thread checks that the parent is still there (seconds).
PARENT_POLL_SECONDS = 0.5


class LockedError(RuntimeError):
    """Another live run holds the lock of this stage on this OUT."""


# --------------------------------------------------------------------------- children
def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(parent_pid: int, poll: float = PARENT_POLL_SECONDS) -> threading.Thread:
    """A daemon thread that ends this process (quietly, at once) as soon as its
    parent is no longer ``parent_pid``."""

    def run() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(poll)

    t = threading.Thread(target=run, name="facecurate-parent-watch", daemon=True)
    t.start()
    return t


def die_with_parent(parent_pid: int) -> None:
    """Call first in a worker process: it exits as soon as ``parent_pid`` (the process
    that started it, passed down explicitly) is gone, whatever killed the parent.
    Also leaves Ctrl-C to the parent: a terminal's SIGINT reaches the whole process
    group, and the parent stops the workers itself (no traceback from each worker)."""
    _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    with contextlib.suppress(ValueError):  # not in the main thread: leave SIGINT alone
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent(parent_pid)


def stop_processes(processes) -> None:
    """Terminate worker processes (``multiprocessing.Process`` objects) at once and
    reap them: for runs that end early (an error, Ctrl-C), so that neither the
    workers nor the interpreter's exit wait for the work in flight."""
    procs = [p for p in processes if p is not None]
    for p in procs:
        with contextlib.suppress(Exception):
            p.terminate()
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(5)


# --------------------------------------------------------------------------- memory
def _pss_bytes(pid: int) -> int:
    """Pss of one process (bytes); FileNotFoundError / ProcessLookupError when it is gone."""
    with open(PROC / str(pid) / "smaps_rollup", "rb") as f:
        for line in f:
            if line.startswith(b"Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def _parents() -> dict[int, list[int]]:
    """ppid -> pids of every process now listed in /proc (from /proc/PID/stat: the
    name in parentheses may hold spaces and parentheses, so fields are read after
    the last ``)``)."""
    out: dict[int, list[int]] = {}
    for d in os.listdir(PROC):
        if not d.isdigit():
            continue
        try:
            with open(PROC / d / "stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone since the listing
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1:
            out.setdefault(int(fields[1]), []).append(int(d))
    return out


def descendants(pid: int) -> list[int]:
    """The pids of every descendant of ``pid`` alive now (children, grandchildren, ...)."""
    children = _parents()
    out, todo = [], [int(pid)]
    while todo:
        kids = children.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def tree_pss(pid: int) -> int:
    """PSS in bytes of process ``pid`` and all its descendants together (shared pages
    counted once overall, not once per process). Processes that end while they are
    read are skipped; 0 when ``pid`` itself is gone."""
    total = 0
    for p in [int(pid), *descendants(pid)]:
        try:
            total += _pss_bytes(p)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


class PssSampler:
    """``with PssSampler() as s: ...``: a daemon thread samples :func:`tree_pss` of
    ``pid`` (default: this process) every ``interval`` seconds; ``s.peak`` is the
    largest sample (bytes), taken also once at the start and once at the end."""

    def __init__(self, pid: Optional[int] = None, interval: float = 0.2):
        self.pid = os.getpid() if pid is None else int(pid)
        self.interval = float(interval)
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def sample(self) -> int:
        v = tree_pss(self.pid)
        self.peak = max(self.peak, v)
        self.samples += 1
        return v

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "PssSampler":
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="facecurate-pss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()


# --------------------------------------------------------------------------- locks
def lock_path(out: str | os.PathLike, stage: str, part: Optional[tuple[int, int]] = None) -> Path:
    """``OUT/.facecurate/<stage>.lock``, or ``<stage>.part-K-of-N.lock`` for part K of N."""
    name = stage if part is None else f"{stage}.part-{part[0]}-of-{part[1]}"
    return Path(out) / WORK_DIR / f"{name}{LOCK_SUFFIX}"


def _holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="utf-8").split()[0]
        return f"pid {int(pid)}"
    except (OSError, IndexError, ValueError):
        return "another process"


@contextlib.contextmanager
def run_lock(out: str | os.PathLike, stage: str, part: Optional[tuple[int, int]] = None) -> Iterator[Path]:
    """Hold this stage's lock on OUT for the ``with`` block; raise :class:`LockedError`
    naming the holder's pid when a live run holds it. The lock file stays behind
    (removing it would let two runs lock two different files); the kernel lock, not
    the file, is what counts."""
    import fcntl

    path = lock_path(out, stage, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            what = stage if part is None else f"{stage} (part {part[0]} of {part[1]})"
            raise LockedError(
                f"{out} is in use: another `facecurate {what}` run ({_holder(path)}) is writing it; "
                "wait for it to finish or stop it, then rerun") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


__all__ = ["LockedError", "die_with_parent", "watch_parent", "stop_processes", "run_lock", "lock_path",
           "descendants", "tree_pss", "PssSampler"]
