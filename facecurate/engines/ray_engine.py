"""The Ray engine: one stateful actor per worker slot of a Ray cluster.

Each actor holds a :class:`facecurate.engines.runner.ShardRunner` (models loaded once) and
runs shards one at a time. Every actor is created at once and handed its first shard
with its setup call, so it starts on it the moment its models are loaded; from then
on the driver keeps it two shards deep (one when fewer shards are left than workers,
so that none waits at the end behind another's second shard). While some actors are
still starting (at most :data:`GATHER` seconds), an actor takes at most its fair share
of the run's shards, so that the work spreads over every node however late a node's
models load. The driver is the only place that decides retries (actors are created
with ``max_restarts=0`` and ``max_task_retries=0``, so Ray retries nothing behind
our back):

* a shard whose code raises is retried on any actor;
* an actor that dies (its process or its whole node) costs the shards it held:
  they go back to the queue and a replacement actor is requested, which Ray places
  wherever resources are left;
* a shard retried :data:`facecurate.engines.runner.MAX_SHARD_RETRIES` times is reported
  as failed; a worker that cannot see RAW or OUT fails the run at once.

CPU workers ask for ``spec.num_cpus`` CPUs; GPU workers (``spec.gpu`` on a cluster
with GPUs) for one GPU each, so every GPU of every node gets a worker. Shards are
written by the workers to storage every node sees at the same path; only stats
travel back to the driver.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from typing import Iterator, Optional

from facecurate.engines.runner import MAX_SHARD_RETRIES, Outcome, RunError, ShardRunner, WorkerSpec, WorkerSetupError
import facecurate

#: Object store of a Ray instance this engine starts itself (bytes): only shards'
#: item lists and stats pass through it.
LOCAL_OBJECT_STORE = 256 * 1024 * 1024
#: How long the run waits for a worker to start when none is running (seconds).
START_TIMEOUT = float(os.environ.get("FACECURATE_RAY_START_TIMEOUT", "180"))
#: While other workers are still starting, a ready worker takes at most its fair share
#: of the shards, for at most this many seconds after the start of the run.
GATHER = 15.0
#: How long the driver waits for an answer before it checks for a stall (seconds).
POLL = 0.5


class ShardActor:
    """The body of a Ray actor (wrapped with ``ray.remote`` by the engine)."""

    def __init__(self):
        self.runner: Optional[ShardRunner] = None

    def setup(self, spec: WorkerSpec) -> dict:
        import ray

        node = ray.get_runtime_context().get_node_id()[:8]
        try:
            self.runner = ShardRunner(spec, node=f"{_ip()}/{node}", child=True)
        except WorkerSetupError as e:
            return {"error": str(e)}
        return {"node": self.runner.node, "pid": os.getpid()}

    def run(self, shard) -> dict:
        if self.runner is None:  # its setup failed; the driver learns why from the setup call
            raise RuntimeError("the worker's setup failed")
        return self.runner.run(shard)


def _ip() -> str:
    import ray

    try:
        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001
        return "?"


#: How long a cluster's address may take to accept a connection (seconds); Ray itself
#: retries an address where nothing answers for minutes.
PROBE_TIMEOUT = 10.0


def _probe(address: str) -> None:
    """RunError at once when nothing accepts a connection at a ``HOST:PORT`` address
    (or ``ray://HOST:PORT``); other forms (``auto``, ``local``) are left to Ray."""
    import socket

    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT).close()
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise RunError(f"cannot connect to the Ray cluster at {address}: nothing answers there ({why}); "
                       "start it first (ray start --head) or fix --ray-address / RAY_ADDRESS") from None


def worker_pythonpath() -> str:
    """PYTHONPATH for the workers: the folder this facecurate package was imported
    from first, then the driver's own PYTHONPATH. Ray puts the driver's working
    folder on the workers' path; run from the folder that holds a checkout named
    ``facecurate``, that folder would be imported as an empty namespace package and
    every worker would fail. A regular package anywhere on the path wins over a
    namespace one, so this makes the workers import what the driver imported,
    wherever the driver runs (nodes see the same paths, as for RAW and OUT)."""
    home = os.path.dirname(os.path.dirname(os.path.abspath(facecurate.__file__)))
    rest = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(p for p in (home, rest) if p)


def connect(address: Optional[str]) -> bool:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a Ray instance for this
    run. Returns True when this call started or connected Ray (and should shut it down)."""
    try:
        import ray
    except ImportError:
        raise RunError("--engine ray needs Ray: pip install 'facecurate[ray]' (Python 3.10+)") from None
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _probe(address)
    kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False,
              runtime_env={"env_vars": {"PYTHONPATH": worker_pythonpath()}})
    try:
        if address:
            ray.init(address=address, **kw)
        else:  # "local": a new instance, whatever an old cluster file in Ray's temp folder says
            ray.init(address="local", object_store_memory=LOCAL_OBJECT_STORE, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RunError(f"cannot connect to the Ray cluster at {address or 'a new local instance'}: {e}") from None
    return True


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit)): .*$", re.M)


def error_line(err) -> str:
    """The line of a Ray error that says what went wrong in the worker: the last
    ``SomeError: message`` line of its traceback (e.g. ``ImportError: cannot import
    name ...``), else its first line; never a traceback."""
    text = _ANSI.sub("", str(err))
    found = list(_EXCEPTION_LINE.finditer(text))
    if found:
        return found[-1].group(0).strip()
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)


class RayEngine:
    name = "ray"

    def __init__(self, address: Optional[str] = None, workers: Optional[int] = None,
                 max_retries: int = MAX_SHARD_RETRIES, start_timeout: float = START_TIMEOUT):
        self.address, self.workers = address, workers
        self.max_retries, self.start_timeout = max_retries, start_timeout
        self.resources: dict = {}

    def _request(self, spec: WorkerSpec) -> dict:
        import ray

        res = ray.cluster_resources()
        if spec.gpu and res.get("GPU", 0) >= 1:
            return {"num_cpus": 0, "num_gpus": 1}
        return {"num_cpus": spec.num_cpus, "num_gpus": 0}

    def lanes(self, spec: WorkerSpec, n_shards: int) -> int:
        self._owns = connect(self.address) or getattr(self, "_owns", False)
        import ray

        self.resources = self._request(spec)
        res = ray.cluster_resources()
        if self.resources["num_gpus"]:
            slots = int(res.get("GPU", 0))
        else:
            slots = int(res.get("CPU", 0) // max(self.resources["num_cpus"], 1e-3))
        # More workers than the cluster has room for would wait forever: cap at its slots.
        return max(1, min(min(self.workers or slots, slots) if slots else 1, n_shards))

    def run(self, spec: WorkerSpec, shards) -> Iterator[Outcome]:
        import ray

        n = self.lanes(spec, len(shards))
        actor_cls = ray.remote(ShardActor).options(max_restarts=0, max_task_retries=0, **self.resources)
        state = _State(self, spec, actor_cls, deque(shards), n)
        try:
            for _ in range(n):
                state.new_actor(first=True)
            yield from state.loop()
        finally:
            state.kill_all()
            if getattr(self, "_owns", False):
                ray.shutdown()
                self._owns = False


class _State:
    """The driver's bookkeeping for one run: actors, shards in flight, retries."""

    def __init__(self, engine: RayEngine, spec: WorkerSpec, actor_cls, pending: deque, lanes: int):
        self.e, self.spec, self.cls, self.pending = engine, spec, actor_cls, pending
        self.refs: dict = {}  # ObjectRef -> ("setup", actor, None) | ("run", actor, shard)
        self.held: dict = {}  # live actor -> shards in flight
        self.ready: set = set()  # live actors whose setup has answered
        self.taken: dict = {}  # actor -> shards handed to it in this run
        self.first: set = set()  # the actors created at the start of the run, while alive
        self.share = -(-len(pending) // max(1, lanes))  # a fair share of the run's shards
        self.tries: dict = {}
        self.deaths = 0
        self.last_error = ""  # why the last worker died (named when none is left)
        self.started = self.last_progress = time.monotonic()

    def new_actor(self, first: bool = False) -> None:
        """Create an actor. One of the run's first actors is handed its first shard
        with its setup (a replacement gets shards once it has started: Ray may have
        no room for it)."""
        a = self.cls.remote()
        self.refs[a.setup.remote(self.spec)] = ("setup", a, None)
        self.held[a] = self.taken[a] = 0
        if first:
            self.first.add(a)
            if self.pending:
                self._give(a)

    def _give(self, actor) -> None:
        shard = self.pending.popleft()
        self.refs[actor.run.remote(shard)] = ("run", actor, shard)
        self.held[actor] += 1
        self.taken[actor] += 1

    def kill_all(self) -> None:
        import ray

        for a in list(self.held):  # every actor with a call in flight is in held too
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def _feed(self) -> None:
        # Two shards deep, so that an actor never waits for the driver between two
        # shards; one when fewer shards are left than actors. While the first actors
        # start, none takes more than its share, so that the work spreads over every node.
        self._reclaim()
        capped = bool(self.first - self.ready) and time.monotonic() - self.started < GATHER
        for a in self.ready:
            while self.pending and self.held[a] < (2 if len(self.pending) >= len(self.held) else 1):
                if capped and self.taken[a] >= self.share:
                    break
                self._give(a)

    def _retry(self, shard, err: str) -> Optional[Outcome]:
        n = self.tries.get(shard.index, 0)
        if n >= self.e.max_retries:
            return Outcome(shard, None, err, retries=n)
        self.tries[shard.index] = n + 1
        self.pending.append(shard)
        return None

    def _reclaim(self) -> None:
        """No shard left to hand out and a started actor idle, while an actor still
        loading its models holds the shard it was given at creation: end that actor
        and give its shard to the started one."""
        import ray

        if self.pending or not any(self.held[a] == 0 for a in self.ready):
            return
        for ref, (kind, a, _) in list(self.refs.items()):
            if kind == "setup" and self.held.get(a) and not ray.wait([ref], timeout=0)[0]:
                self._forget(a)

    def _started(self, actor) -> bool:
        """Whether the actor's setup has succeeded (the driver may not have read it yet)."""
        import ray

        if actor in self.ready:
            return True
        for ref, (kind, a, _) in self.refs.items():
            if kind == "setup" and a is actor and ray.wait([ref], timeout=0)[0]:
                try:
                    return not ray.get(ref).get("error")
                except Exception:  # noqa: BLE001 - it died in its setup
                    return False
        return False

    def _forget(self, actor) -> list:
        """End ``actor`` and drop its calls. Returns the shards it held; those it was
        given before its setup succeeded never ran there and go back to the queue."""
        import ray

        was_ready = self._started(actor)
        for group in (self.ready, self.first):
            group.discard(actor)
        self.held.pop(actor, None)
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        held = []
        for ref, (kind, a, shard) in list(self.refs.items()):
            if a is actor:
                del self.refs[ref]
                if kind == "run" and was_ready:
                    held.append(shard)
                elif kind == "run":
                    self.pending.appendleft(shard)
        return held

    def _actor_died(self, actor, err: str) -> list[Outcome]:
        """Requeue every shard the dead actor held (a try each) and ask for a replacement."""
        self.last_error = err
        out = []
        for shard in self._forget(actor):
            o = self._retry(shard, err)
            if o is not None:
                out.append(o)
        self.deaths += 1
        if self.pending and self.deaths <= 4 * (self.e.max_retries + 1) * max(1, len(self.held) + 1):
            self.new_actor()
        return out

    def loop(self) -> Iterator[Outcome]:
        import ray

        while self.pending or any(v[0] == "run" for v in self.refs.values()):
            self._feed()
            if not self.refs:  # every worker died and no replacement is allowed
                while self.pending:
                    s = self.pending.popleft()
                    why = f" (the last one: {self.last_error})" if self.last_error else ""
                    yield Outcome(s, None, "no Ray worker left" + why, retries=self.tries.get(s.index, 0))
                return
            done, _ = ray.wait(list(self.refs), num_returns=1, timeout=POLL)
            if not done:
                self._check_stall()
                continue
            self.last_progress = time.monotonic()
            ref = done[0]
            if ref not in self.refs:
                continue
            yield from self._handle(ref, *self.refs.pop(ref))

    def _handle(self, ref, kind, actor, shard) -> Iterator[Outcome]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            value = ray.get(ref)
        except RayTaskError as e:  # the code raised: retry the shard anywhere
            if kind == "setup":
                yield from self._actor_died(actor, f"worker setup failed: {error_line(e)}")
                return
            self.held[actor] = max(0, self.held.get(actor, 1) - 1)
            o = self._retry(shard, str(getattr(e, "cause", None) or e).splitlines()[0])
            if o is not None:
                yield o
            return
        except (RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError) as e:
            if kind == "run":
                self.refs[ref] = (kind, actor, shard)  # so that _actor_died requeues it too
            yield from self._actor_died(actor, f"worker died: {type(e).__name__}: {error_line(e)}")
            return
        if kind == "setup":
            if value.get("error"):
                raise WorkerSetupError(value["error"])
            self.ready.add(actor)
            return
        self.held[actor] = max(0, self.held.get(actor, 1) - 1)
        yield Outcome(shard, value, retries=self.tries.get(shard.index, 0))

    def _check_stall(self) -> None:
        """No worker running and none starting within the timeout: fail rather than hang."""
        if self.ready or not self.pending:
            self.last_progress = time.monotonic() if self.ready else self.last_progress
            return
        if time.monotonic() - self.last_progress > self.e.start_timeout:
            import ray

            raise RunError(f"no Ray worker could start within {self.e.start_timeout:.0f} s (each asks for "
                           f"{self.e.resources}; the cluster has {ray.available_resources()} free of "
                           f"{ray.cluster_resources()})")


__all__ = ["RayEngine", "connect", "ShardActor"]
