"""Benchmark: the Ray engine against itself on more nodes, and against the local engine.

On this host, real Ray clusters (``ray.cluster_utils.Cluster``, nodes of 1 CPU each,
small object stores, no dashboard), of one node and of two, run ``align`` and then
``embed`` (dlib's model) on the same LFW *dev* photos:

* scaling: a cluster of two 1-CPU nodes against one 1-CPU node (target >= 1.7x);
* overhead: Ray on 2 CPUs (the two nodes) against the local engine with 2 workers
  (target: within 10%).

    python benchmarks/distributed.py [--n 300] [--repeat 3] [--shard-size 10] [--runtime dlib] [--stages align]

Each round runs the three setups back to back (1 node, 2 nodes, local; reversed
every other round), so that the shared machine's drifting speed hits them alike; a
cluster is started for its setup and stopped after it, so no idle cluster runs beside
a timed run.
Times are medians over ``--repeat`` rounds; each ratio is the median of the rounds'
own ratios. A time is the wall time of the whole ``run_align`` / ``run_embed`` call,
model loading and Ray worker start included, with Ray itself already running and
this a later job on it (the idle workers Ray starts for a cluster's first job are
used up first, as a user's first job would have). Outputs of every run are checked
byte-identical to each other. Also prints the per-core rates (photos/s and faces/s
per CPU) that the README's sizing paragraph uses.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODE = {"num_cpus": 1, "object_store_memory": 200 * 1024 * 1024}
STORE = ("embeddings.npy", "embeddings.csv", "embeddings.json")


def build_raw(data: Path, raw: Path, n: int) -> int:
    dev = [s.strip() for s in (data / "splits" / "lfw-dev.txt").read_text().splitlines() if s.strip()]
    count = 0
    for ident in dev:
        for f in sorted(os.listdir(data / "lfw" / ident)):
            if count == n:
                return count
            (raw / ident).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data / "lfw" / ident / f, raw / ident / f)
            count += 1
    return count


def outputs(out: Path, names=None) -> dict:
    if names:
        return {n: (out / n).read_bytes() for n in names}
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".facecurate" not in p.parts}


def start_cluster(nodes: int):
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args=dict(NODE, include_dashboard=False))
    for _ in range(nodes - 1):
        c.add_node(**NODE)
    c.wait_for_nodes()
    return c


def use(cluster) -> None:
    """Connect this driver to ``cluster``."""
    import ray

    ray.shutdown()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)


def drain_prestarted() -> None:
    """Ray starts idle worker processes for the first job of a cluster only; a user's
    later jobs start theirs (about 0.4 s each). One throwaway actor per CPU uses them
    up, so that every timed run pays that start as a user's run would."""
    import ray

    @ray.remote(num_cpus=1)
    class Probe:
        def ping(self):
            return 0

    actors = [Probe.remote() for _ in range(int(ray.cluster_resources().get("CPU", 1)))]
    ray.get([a.ping.remote() for a in actors])
    for a in actors:
        ray.kill(a)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=10)
    ap.add_argument("--data", default=os.environ.get("FACECURATE_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--runtime", choices=["auto", "dlib", "onnx"], default="dlib",
                    help="what runs dlib's model in embed (default dlib: processes, one per CPU; onnx is one "
                         "batched session per worker)")
    ap.add_argument("--stages", default="align,embed",
                    help="comma-separated stages to time (default align,embed; embed on dlib takes minutes)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    stages = [s for s in ("align", "embed") if s in args.stages.split(",")]
    if not stages:
        ap.error("--stages: name align, embed or both")

    import ray

    from facecurate.align.align import AlignConfig, run_align
    from facecurate.embed.embed import run_embed

    tmp = Path(tempfile.mkdtemp(prefix="fc-dist-"))
    raw = tmp / "raw"
    n = build_raw(Path(args.data), raw, args.n)
    ss = args.shard_size
    runs: dict = {}
    ref: dict = {}
    k = [0]

    def align(engine, workers=None):
        k[0] += 1
        out = tmp / f"a{k[0]}"
        t = timed(lambda: run_align(raw, out, AlignConfig(), engine=engine, workers=workers, shard_size=ss,
                                    show_progress=False))
        got = outputs(out)
        ref.setdefault("align", got)
        assert got == ref["align"], "align outputs differ between runs"
        shutil.rmtree(out)
        return t

    base = tmp / "base"
    run_align(raw, base, AlignConfig(), workers=2, shard_size=ss, show_progress=False)  # warms imports and cache too

    def embed(engine, workers=None):
        k[0] += 1
        store = tmp / f"e{k[0]}"
        t = timed(lambda: run_embed(base, engine=engine, workers=workers, chunk_size=ss, store_dir=store,
                                    runtime=args.runtime, show_progress=False))
        got = outputs(store, STORE)
        ref.setdefault("embed", got)
        assert got == ref["embed"], "embed outputs differ between runs"
        shutil.rmtree(store)
        return t

    # Every round times the three setups back to back (reversed every other round), so
    # that a drift of the shared machine's speed hits all three alike. Only one cluster
    # is up at a time: an idle cluster's daemons would take CPU from the run being timed.
    timers = [(stage, fn) for stage, fn in (("align", align), ("embed", embed)) if stage in stages]
    try:
        for r in range(args.repeat):
            order = ["ray_1node", "ray_2nodes", "local_2"]
            for setup in (order if r % 2 == 0 else order[::-1]):
                cluster = None if setup == "local_2" else start_cluster(1 if setup == "ray_1node" else 2)
                try:
                    if cluster:
                        use(cluster)
                        drain_prestarted()
                    for stage, fn in timers:
                        t = fn("ray") if cluster else fn("local", 2)
                        runs.setdefault(stage, {}).setdefault(setup, []).append(t)
                finally:
                    if cluster:
                        ray.shutdown()
                        cluster.shutdown()
                        time.sleep(2)  # let its processes exit before the next timed run
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    report = {"photos": n, "repeat": args.repeat, "shard_size": ss, "seconds": runs, "figures": {}}
    for stage in stages:
        t = runs[stage]
        med = {k: statistics.median(v) for k, v in t.items()}
        report["figures"][stage] = {
            "median_seconds": {k: round(v, 2) for k, v in med.items()},
            # each round's ratio (its three runs back to back), then the median over rounds
            "scaling_2_vs_1_node": round(statistics.median(
                a / b for a, b in zip(t["ray_1node"], t["ray_2nodes"])), 2),
            "ray_over_local_2cpu": round(statistics.median(
                a / b for a, b in zip(t["ray_2nodes"], t["local_2"])), 3),
            "per_core_rate_1node": round(n / med["ray_1node"], 2),
        }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{n} LFW dev photos, shard size {ss}, medians of {args.repeat} interleaved rounds; ratios are "
              "medians of each round's ratio (shared, noisy machine)")
        for stage, f in report["figures"].items():
            m = f["median_seconds"]
            print(f"{stage:6s} ray 1 node {m['ray_1node']:6.2f} s | ray 2 nodes {m['ray_2nodes']:6.2f} s | "
                  f"local 2 workers {m['local_2']:6.2f} s")
            print(f"       scaling 2 vs 1 node: {f['scaling_2_vs_1_node']:.2f}x (target >= 1.7x); "
                  f"ray/local on 2 CPUs: {f['ray_over_local_2cpu']:.3f} (target <= 1.10); "
                  f"per core: {f['per_core_rate_1node']:.1f} /s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
