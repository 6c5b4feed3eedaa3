"""Benchmark: faces/s of ``facecurate embed`` against a naive loop, in one run.

The naive loop is what the blog recipes do: for each face, one after another, read
the photo, cut dlib's chip, call ``compute_face_descriptor`` on that one chip,
normalise. ``facecurate embed`` feeds the same model the same chips in batches,
with ``--workers`` processes (default: all cores). Both run on the same few hundred
LFW *dev* photos, aligned first with ``facecurate align`` (not timed).

    python benchmarks/embed.py [--n 300] [--data ../shared/data] [--flip]

Prints faces/s of: the naive loop, embed with 1 worker (batching alone) and embed
with all workers, and the ratios against the naive loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="number of LFW dev photos")
    ap.add_argument("--data", default=os.environ.get("FACECURATE_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--workers", type=int, default=None, help="embed workers (default: all cores)")
    ap.add_argument("--flip", action="store_true")
    ap.add_argument("--work", default=None, help="keep the aligned photos here (default: a temp folder)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from facecurate.align import AlignConfig, run_align
    from facecurate.embed import DlibEmbedder, Loader, items_from_align, load_store, run_embed

    data = Path(args.data)
    lfw, ids = data / "lfw", (data / "splits" / "lfw-dev.txt").read_text().split()
    tmp = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fc-bench-embed-"))
    raw, out = tmp / "raw", tmp / "out"
    n = 0
    for ident in sorted(ids):
        for f in sorted((lfw / ident).glob("*.jpg")):
            if n >= args.n:
                break
            dst = raw / ident / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                dst.symlink_to(f)
            n += 1
    print(f"aligning {n} LFW dev photos into {out} (not timed) ...", file=sys.stderr)
    run_align(raw, out, AlignConfig(), show_progress=False)
    items, _ = items_from_align(out)
    faces = len(items)

    def cpu() -> float:
        import resource

        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    def naive_loop():
        # one face at a time, same model, same chips: read the photo, cut the chip, describe
        emb = DlibEmbedder("five")
        loader = Loader()
        return np.array([emb.run([emb.chip(it, loader)[0]], args.flip)[0] for it in items])

    def embed(workers, label):
        store = tmp / f"store-{label}"
        run_embed(out, workers=workers, flip=args.flip, show_progress=False, store_dir=store, overwrite=True)
        return load_store(store)[0]

    runs = {"naive": lambda: naive_loop(), "embed_1_worker": lambda: embed(1, "w1"),
            "embed": lambda: embed(args.workers, "wn")}
    times: dict[str, list] = {k: [] for k in runs}
    cpus: dict[str, list] = {k: [] for k in runs}
    ref = None
    for _ in range(args.repeat):  # interleaved, so load from other processes hits all alike
        for k, fn in runs.items():
            t0, c0 = time.perf_counter(), cpu()
            v = fn()
            times[k].append(time.perf_counter() - t0)
            cpus[k].append(cpu() - c0)
            if ref is None:
                ref = v
            assert np.allclose(v, ref, atol=1e-6), f"{k} and the naive loop disagree"
    med = {k: float(np.median(v)) for k, v in times.items()}
    res = {"faces": faces, "cores": os.cpu_count(), "flip": args.flip, "repeat": args.repeat,
           "load_average_1min": round(os.getloadavg()[0], 2)}
    for k in runs:
        res[f"{k}_faces_per_s"] = round(faces / med[k], 2)
        res[f"{k}_ratio"] = round(med["naive"] / med[k], 2)
        res[f"{k}_cores_used"] = round(float(np.median(cpus[k])) / med[k], 2)
    res["embed_workers"] = args.workers or os.cpu_count()
    if args.json:
        print(json.dumps(res, sort_keys=True))
    else:
        print(f"faces: {faces} on {res['cores']} cores (flip={args.flip}), median of {args.repeat} "
              f"interleaved rounds; 1-min load average at the end {res['load_average_1min']}")
        print(f"  naive loop (one face at a time): {res['naive_faces_per_s']:.2f} faces/s "
              f"(using {res['naive_cores_used']:.2f} cores)")
        print(f"  embed, 1 worker (batches):       {res['embed_1_worker_faces_per_s']:.2f} faces/s "
              f"= {res['embed_1_worker_ratio']:.2f}x (using {res['embed_1_worker_cores_used']:.2f} cores)")
        print(f"  embed, {res['embed_workers']} workers:                {res['embed_faces_per_s']:.2f} faces/s "
              f"= {res['embed_ratio']:.2f}x the naive loop (using {res['embed_cores_used']:.2f} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
