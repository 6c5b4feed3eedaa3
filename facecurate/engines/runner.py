"""The run machinery of every sharded stage (align, embed): the shard plan, the
per-shard completion record, the settings check, ``--overwrite``, ``--part K/N``,
the lock, the progress bar and the merged per-shard stats. Which engine runs the
shards (:mod:`facecurate.engines`) is not the stage's business.

A stage gives the runner

* its work items, sorted, and a key per item: :func:`plan_shards` cuts them into
  shards of a fixed size. Shard ``i`` holds items ``i*S .. i*S+S-1`` of the sorted
  list, so the plan depends only on the inputs and the shard size, never on the
  number of workers, the engine, the part or what is already done;
* a :class:`WorkerSpec`: a module-level factory that builds the stage's worker in a
  worker process (models loaded once) and whose ``run(shard)`` writes the shard's
  data under the stage's work folder and returns small stats.

After a shard's data, :class:`ShardRunner` (in the worker process) writes
``shard_NNNNNN.json``, the shard's record: its stats and the digest of its item keys.
A shard is finished when its record exists and its digest matches the plan's shard:
that is the whole resume logic, the same under every engine, so a run interrupted
under one engine is finished under another.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from facecurate.common.constants import (BLAS_THREAD_VARS, MERGED_FILE, PLAN_FILE, SHARD_RECORD, SHARD_STEM,
                                         VERSIONS_FILE)
from facecurate.common.files import progress, remove_stale_temps, write_text_atomic
from facecurate.common.provenance import resume_message
from facecurate.common.procs import LockedError, run_lock
from facecurate.common.workspace import Workspace

#: A shard that fails this many more times after its first try is given up on.
MAX_SHARD_RETRIES = 2
#: Fault-injection knob for tests: seconds a worker waits before each shard.
DELAY_ENV = "FACECURATE_SHARD_DELAY"


class RunError(RuntimeError):
    """The run as a whole failed (settings, shared storage, shards that kept failing)."""


class WorkerSetupError(RunError):
    """A worker could not start (e.g. cannot see RAW): retrying elsewhere will not help."""


# --------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Shard:
    index: int
    items: tuple
    digest: str

    @property
    def name(self) -> str:
        return SHARD_STEM.format(index=self.index)


def _digest(keys: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()[:32]


def plan_shards(items: Sequence, key: Callable[[Any], str], size: int) -> list[Shard]:
    """Fixed shards of ``size`` consecutive items of the (already sorted) list."""
    size = max(1, int(size))
    return [Shard(i, tuple(items[s:s + size]), _digest([key(x) for x in items[s:s + size]]))
            for i, s in enumerate(range(0, len(items), size))]


def parse_part(text: Optional[str]) -> Optional[tuple[int, int]]:
    """``"K/N"`` -> (K, N), 1 <= K <= N; None for None."""
    if text is None:
        return None
    try:
        k, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise RunError(f"--part {text!r}: expected K/N, e.g. 2/8") from None
    if not 1 <= k <= n:
        raise RunError(f"--part {text!r}: K must lie between 1 and N")
    return k, n


def in_part(index: int, part: Optional[tuple[int, int]]) -> bool:
    return part is None or index % part[1] == part[0] - 1


def record_path(work: Path, index: int) -> Path:
    return Path(work) / SHARD_RECORD.format(index=index)


def finished(work: Path, shards: Sequence[Shard]) -> dict[int, dict]:
    """The records of the plan's shards that are finished (record present, digest equal)."""
    done = {}
    for s in shards:
        p = record_path(work, s.index)
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("digest") == s.digest:
            done[s.index] = rec
    return done


# --------------------------------------------------------------------------- settings
def write_once(path: Path, text: str) -> bool:
    """Create ``path`` with ``text`` unless it exists (atomic: temp file + link, so two
    parts starting together never both write it). True when this call created it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def check_meta(path: Path, meta: dict, same: Callable[[dict, dict], Optional[str]], *, part) -> None:
    """The settings check: ``meta`` must agree with what ``path`` already records
    (``same(old, new)`` returns a message when not). A whole run (re)writes the file;
    a part only creates it, so parts never write the same file."""
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    if path.exists():
        try:
            recorded = path.read_text()
            old = json.loads(recorded)
        except ValueError as e:  # also a file that is not UTF-8
            old = e
        if not isinstance(old, dict):
            raise RunError(f"{path} is not a readable record of an earlier run (corrupt or truncated); "
                           "rerun with --overwrite to start again, or pick another OUT")
        msg = same(old, meta)
        if msg:
            raise RunError(msg)
        if part is not None or recorded == text:
            return
    if part is None:
        write_text_atomic(path, text)
    elif not write_once(path, text):
        check_meta(path, meta, same, part=part)


def check_versions(work: Path, versions: dict, part) -> None:
    """Record the library versions this stage's shards are made under; a run that
    finds shards made under other versions (or under a facecurate that recorded none)
    is refused, since a resume would mix two versions' outputs in one dataset
    (``--overwrite`` clears the work folder, and this record with it)."""
    work = Path(work)
    path = work / VERSIONS_FILE
    if not path.exists() and any(work.glob(SHARD_STEM.split("{")[0] + "*.json")):
        raise RunError(resume_message(str(work), None, versions))
    check_meta(path, versions, lambda old, new: resume_message(str(work), old, new), part=part)


def recorded_size(work: Path, default: int) -> int:
    """The shard size a previous run (or part) of this work folder planned with, else
    ``default``: a rerun without an explicit shard size keeps the plan."""
    try:
        return int(json.loads((Path(work) / PLAN_FILE).read_text())["shard_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return default


def check_plan(work: Path, shards: Sequence[Shard], size: int, part) -> str:
    """Record the shard plan; every part must find the same one. Returns its digest."""
    digest = _digest([s.digest for s in shards])
    plan = {"shard_size": int(size), "shards": len(shards), "digest": digest}

    def same(old: dict, new: dict) -> Optional[str]:
        if part is not None and old != new:
            return (f"{work}: another part planned {old.get('shards')} shards of {old.get('shard_size')} "
                    f"(this one: {new['shards']} of {new['shard_size']}); every part must see the same "
                    "inputs and the same --shard-size")
        return None

    check_meta(work / PLAN_FILE, plan, same, part=part)
    return digest


def clear(work: Path, outputs: Sequence[Path]) -> None:
    """``--overwrite``: forget every record and the merged outputs."""
    shutil.rmtree(work, ignore_errors=True)
    for p in outputs:
        Path(p).unlink(missing_ok=True)


# --------------------------------------------------------------------------- workers
@dataclass(frozen=True)
class WorkerSpec:
    """How to build a stage's worker: ``factory(*args)`` in the worker process. The
    worker's ``run(shard) -> dict`` writes the shard's data; its optional
    ``prefetch(shard)`` starts reading the next shard ahead."""

    factory: Callable
    args: tuple
    work: str  # the stage's work folder (records)
    must_see: tuple = ()  # paths every worker must see (shared storage)
    num_cpus: float = 1.0  # Ray: CPUs per worker
    gpu: bool = False  # Ray: ask for one GPU per worker when the cluster has GPUs


def single_threaded_libraries() -> None:
    """One worker per core: keep OpenCV and BLAS from starting a thread per core."""
    for k in BLAS_THREAD_VARS:
        os.environ.setdefault(k, "1")
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass


class ShardRunner:
    """Lives in a worker process: checks the shared paths, builds the stage's worker
    once, runs shards and writes each shard's record after its data."""

    def __init__(self, spec: WorkerSpec, node: Optional[str] = None, child: bool = True):
        self.node = node or socket.gethostname()
        for p in spec.must_see:
            if not os.path.exists(p):
                raise WorkerSetupError(
                    f"a worker on node {self.node} cannot see {p}: RAW and OUT must be on storage that "
                    "every node sees at the same path (NFS, Lustre, ...)")
        if child:
            single_threaded_libraries()
        self.spec = spec
        self.worker = spec.factory(*spec.args)

    def prefetch(self, shard: Shard) -> None:
        if hasattr(self.worker, "prefetch"):
            self.worker.prefetch(shard)

    def run(self, shard: Shard) -> dict:
        t0 = time.perf_counter()
        if os.environ.get(DELAY_ENV):  # fault tests: a slow node, to be killed mid-shard
            time.sleep(float(os.environ[DELAY_ENV]))
        stats = self.worker.run(shard) or {}
        rec = {"shard": shard.index, "digest": shard.digest, "units": len(shard.items),
               "seconds": round(time.perf_counter() - t0, 4), "node": self.node, "pid": os.getpid(),
               "stats": stats}
        write_text_atomic(record_path(Path(self.spec.work), shard.index), json.dumps(rec, sort_keys=True))
        return rec


@dataclass
class Outcome:
    """What an engine reports for one shard: its record, or the error of its last try."""

    shard: Shard
    record: Optional[dict] = None
    error: Optional[str] = None
    retries: int = 0


# --------------------------------------------------------------------------- running
@dataclass
class RunStats:
    engine: str
    workers: int = 0
    shards: int = 0
    shards_now: int = 0
    retries: int = 0
    failed: list = field(default_factory=list)
    nodes: dict = field(default_factory=dict)
    records: list = field(default_factory=list)

    def add(self, o: Outcome) -> None:
        self.retries += o.retries
        if o.record is None:
            self.failed.append(f"{o.shard.name} ({len(o.shard.items)} items): {o.error}")
            return
        self.shards_now += 1
        self.records.append(o.record)
        n = self.nodes.setdefault(o.record.get("node", "?"), {"shards": 0, "units": 0, "seconds": 0.0})
        n["shards"] += 1
        n["units"] += o.record.get("units", 0)
        n["seconds"] += o.record.get("seconds", 0.0)

    def summary(self) -> dict:
        nodes = {k: {"shards": v["shards"], "units": v["units"], "busy_seconds": round(v["seconds"], 2),
                     "units_per_second": round(v["units"] / v["seconds"], 2) if v["seconds"] > 0 else None}
                 for k, v in sorted(self.nodes.items())}
        return {"name": self.engine, "workers": self.workers, "shards": self.shards,
                "shards_now": self.shards_now, "retries": self.retries, "failed": list(self.failed),
                "nodes": nodes}


def run_shards(engine, spec: WorkerSpec, shards: Sequence[Shard], *, part=None, desc: str = "",
               unit: str = "it", show_progress: bool = True,
               on_shard: Optional[Callable[[dict], None]] = None) -> tuple[RunStats, bool]:
    """Run the shards of ``part`` (all when None) that are not finished yet on
    ``engine``, with one progress bar. Returns the stats and whether every shard of
    the whole plan is finished now."""
    work = Path(spec.work)
    done = finished(work, shards)
    mine = [s for s in shards if in_part(s.index, part)]
    todo = [s for s in mine if s.index not in done]
    stats = RunStats(engine=engine.name, shards=len(mine))
    total = sum(len(s.items) for s in mine)
    bar = progress(total=total, initial=total - sum(len(s.items) for s in todo), desc=desc, unit=unit,
                   disable=None if show_progress else True)
    try:
        if todo:
            _remove_shard_temps(work, todo)
            stats.workers = engine.lanes(spec, len(todo))
            for o in engine.run(spec, todo):
                stats.add(o)
                bar.update(len(o.shard.items) if o.record is not None else 0)
                if on_shard and o.record is not None:
                    on_shard(o.record)
    finally:
        bar.close()
    complete = len(finished(work, shards)) == len(shards)
    return stats, complete


def _remove_shard_temps(work: Path, todo: Sequence[Shard]) -> None:
    """What a killed run left half-written for the shards about to run (their data
    and records, under temporary names); never another part's."""
    stems = {s.name for s in todo}
    remove_stale_temps(work, lambda target: target.partition(".")[0] in stems)


def fail_message(stage: str, stats: RunStats) -> str:
    names = "; ".join(stats.failed[:10]) + (f"; ... {len(stats.failed) - 10} more" if len(stats.failed) > 10 else "")
    return (f"{stage}: {len(stats.failed)} shard(s) kept failing after {MAX_SHARD_RETRIES} retries: {names}. "
            "Rerun the same command to finish them (finished shards are kept).")


def should_merge(work: Path, plan_digest: str, part) -> bool:
    """A whole run always merges; a part merges only when it finds the merged outputs
    not yet made for this plan (the caller holds the stage lock)."""
    if part is None:
        return True
    try:
        return json.loads((work / MERGED_FILE).read_text()).get("plan") != plan_digest
    except (OSError, ValueError):
        return True


def mark_merged(work: Path, plan_digest: str) -> None:
    write_text_atomic(work / MERGED_FILE, json.dumps({"plan": plan_digest}) + "\n")


def merge_if_due(out: Path, stage: str, work: Path, plan_digest: str, part, merge: Callable[[], Any],
                 outputs: Sequence[str] = ()):
    """Run ``merge()`` once every shard is finished: always in a whole run; in a part
    only when no other run holds the stage's lock and the merge is not made yet for
    this plan (so two parts never write the merged outputs). None when skipped.
    ``outputs`` (file names in ``out``): what a merge killed midway left under
    temporary names is removed first."""
    def merge_clean():
        Workspace(out).remove_stale_temps(outputs)
        return merge()

    if part is None:
        result = merge_clean()
        mark_merged(work, plan_digest)
        return result
    try:
        with run_lock(out, stage):
            if not should_merge(work, plan_digest, part):
                return None
            result = merge_clean()
            mark_merged(work, plan_digest)
            return result
    except LockedError:
        return None


__all__ = ["RunError", "WorkerSetupError", "Shard", "plan_shards", "parse_part", "in_part", "finished",
           "check_meta", "check_plan", "recorded_size", "clear", "WorkerSpec", "ShardRunner", "Outcome", "RunStats",
           "run_shards", "fail_message", "should_merge", "mark_merged", "merge_if_due", "MAX_SHARD_RETRIES"]
