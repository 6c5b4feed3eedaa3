"""Engines run a stage's shards; the stages never know which one does.

An engine has ``name``, ``lanes(spec, n_shards)`` (how many workers it will use)
and ``run(spec, shards)``, which yields one :class:`facecurate.engines.runner.Outcome` per
shard, in any order, after at most :data:`facecurate.engines.runner.MAX_SHARD_RETRIES`
retries. Its workers are :class:`facecurate.engines.runner.ShardRunner` objects: built once
per worker process (models loaded once), each writes its shard's data and then
its record.

* ``local`` (:mod:`facecurate.engines.local`): spawned processes on this machine;
* ``ray`` (:mod:`facecurate.engines.ray_engine`): Ray actors on a cluster.
"""

from __future__ import annotations

import importlib.util
from typing import Optional
from facecurate.engines.local import LocalEngine
from facecurate.engines.ray_engine import RayEngine
from facecurate.engines.runner import RunError

ENGINES = ("local", "ray")


def get_engine(name: str = "local", *, workers: Optional[int] = None, address: Optional[str] = None):
    if name not in ENGINES:
        raise RunError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    if address and name != "ray":
        raise RunError(f"--ray-address is for --engine ray (this run's engine is {name})")
    if name == "local":
        return LocalEngine(workers)
    if importlib.util.find_spec("ray") is None:
        raise RunError("--engine ray needs Ray: pip install 'facecurate[ray]' (Python 3.10+)")

    return RayEngine(address=address, workers=workers)


__all__ = ["ENGINES", "get_engine"]
