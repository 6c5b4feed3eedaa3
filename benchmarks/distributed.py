"""Benchmark: the Ray engine against itself on more nodes, and against the local engine.

On this host, a real Ray cluster (``ray.cluster_utils.Cluster``, nodes of 1 CPU each,
small object stores, no dashboard) runs ``align`` and then ``embed`` (dlib's model)
on the same LFW *dev* photos:

* scaling: a cluster of two 1-CPU nodes against one 1-CPU node (target >= 1.7x);
* overhead: Ray on 2 CPUs (the two nodes) against the local engine with 2 workers
  (target: within 10%).

    python benchmarks/distributed.py [--n 300] [--repeat 3] [--shard-size 10] [--runtime dlib] [--stages align]

Each figure is the median of ``--repeat`` rounds (the 2-node and local runs are
interleaved); wall time of the whole ``run_align`` / ``run_embed`` call, model
loading and Ray worker start included, Ray itself already running. Outputs of every
run are checked byte-identical to the first local run's. Also prints the per-core
rates (photos/s and faces/s per CPU) that the README's sizing paragraph uses.
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
    from ray.cluster_utils import Cluster

    from facecurate.align import AlignConfig, run_align
    from facecurate.embed import run_embed

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

    cluster = Cluster(initialize_head=True, head_node_args=dict(NODE, include_dashboard=False))
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        timers = [(stage, fn) for stage, fn in (("align", align), ("embed", embed)) if stage in stages]
        for stage, fn in timers:
            runs[stage] = {"ray_1node": [fn("ray") for _ in range(args.repeat)]}
        cluster.add_node(**NODE)
        cluster.wait_for_nodes()
        for _ in range(args.repeat):
            for stage, fn in timers:
                runs[stage].setdefault("ray_2nodes", []).append(fn("ray"))
                runs[stage].setdefault("local_2", []).append(fn("local", 2))
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    report = {"photos": n, "repeat": args.repeat, "shard_size": ss, "seconds": runs, "figures": {}}
    for stage in stages:
        med = {k: statistics.median(v) for k, v in runs[stage].items()}
        report["figures"][stage] = {
            "median_seconds": {k: round(v, 2) for k, v in med.items()},
            "scaling_2_vs_1_node": round(med["ray_1node"] / med["ray_2nodes"], 2),
            "ray_over_local_2cpu": round(med["ray_2nodes"] / med["local_2"], 3),
            "per_core_rate_1node": round(n / med["ray_1node"], 2),
        }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{n} LFW dev photos, shard size {ss}, medians of {args.repeat} rounds (shared, noisy machine)")
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
