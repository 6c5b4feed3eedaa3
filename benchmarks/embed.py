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

    # naive loop: one face at a time, same model, same chips
    emb = DlibEmbedder("five")
    loader = Loader()
    t0 = time.perf_counter()
    naive = []
    for it in items:
        chip, _ = emb.chip(it, loader)
        naive.append(emb.run([chip], args.flip)[0])
    t_naive = time.perf_counter() - t0

    res = {"faces": faces, "cores": os.cpu_count(), "flip": args.flip,
           "naive_faces_per_s": round(faces / t_naive, 2)}
    for label, workers in (("embed_1_worker", 1), ("embed", args.workers)):
        store = tmp / f"store-{label}"
        t0 = time.perf_counter()
        s = run_embed(out, workers=workers, flip=args.flip, show_progress=False, store_dir=store, overwrite=True)
        dt = time.perf_counter() - t0
        vecs, _, _ = load_store(store)
        assert np.allclose(vecs, np.array(naive), atol=1e-6), "embed and the naive loop disagree"
        res[f"{label}_faces_per_s"] = round(faces / dt, 2)
        res[f"{label}_workers"] = s["workers"]
        res[f"{label}_ratio"] = round(t_naive / dt, 2)
    if args.json:
        print(json.dumps(res, sort_keys=True))
    else:
        print(f"faces: {faces} on {res['cores']} cores (flip={args.flip})")
        print(f"  naive loop (one face at a time): {res['naive_faces_per_s']:.2f} faces/s")
        print(f"  embed, 1 worker (batches):       {res['embed_1_worker_faces_per_s']:.2f} faces/s "
              f"= {res['embed_1_worker_ratio']:.2f}x")
        print(f"  embed, {res['embed_workers']} workers:                {res['embed_faces_per_s']:.2f} faces/s "
              f"= {res['embed_ratio']:.2f}x the naive loop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
