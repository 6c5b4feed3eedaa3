"""Scale benchmark of the clean stage's core on synthetic embeddings.

    python benchmarks/clean.py [--faces 1000000] [--identities 100000] [--dim 128] [--workers N]

Synthetic data: identity centres are random unit vectors; each face is its centre plus
Gaussian noise (dlib-like spread: cosine to the centre ~0.98), 10% of the faces are other
people (random vectors), 2% are re-encoded duplicates (tiny noise), 5% of the photos
carry a bystander face, and 0.5% of the identities are planted "same person under two
names" pairs (for merges.csv). Faces per identity are long-tailed (Zipf-like).

Times, in the same run:
  * clean_core on everything (per-identity clustering/centre/decisions + cross-identity
    merge search + review budget), on --workers processes (default: all cores),
  * the merge search alone (inverted file, faiss when importable, else numpy) against
    the naive all-pairs search of identity centres, timed on a subsample and
    extrapolated quadratically (reported as such),
  * the seed method (iterated folder-mean threshold) as the per-identity baseline.
Prints absolute times, ratios, the merge recall of planted pairs and the peak resident
memory of this process and of the largest worker.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np


def synth(n_faces: int, n_ids: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, n_ids + 1) ** 0.6
    w = rng.permutation(w)
    counts = np.maximum(1, np.floor(w / w.sum() * n_faces)).astype(np.int64)
    counts[np.argmax(counts)] += n_faces - counts.sum()
    centres = rng.standard_normal((n_ids, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    planted = rng.choice(n_ids, size=(max(1, n_ids // 200), 2), replace=False)
    centres[planted[:, 1]] = centres[planted[:, 0]]  # the same person crawled under two names
    ident = np.repeat(np.arange(n_ids), counts)
    n = len(ident)
    x = np.empty((n, dim), np.float32)
    for b0 in range(0, n, 200_000):
        sl = slice(b0, min(n, b0 + 200_000))
        x[sl] = centres[ident[sl]] + 0.2 / np.sqrt(dim) * rng.standard_normal((sl.stop - b0, dim)).astype(np.float32)
    wrong = rng.random(n) < 0.10
    x[wrong] = rng.standard_normal((int(wrong.sum()), dim)).astype(np.float32)
    photo = np.arange(n, dtype=np.int64)
    dup = np.nonzero(rng.random(n) < 0.02)[0]
    dup = dup[dup > 0]
    same = ident[dup] == ident[dup - 1]
    dup = dup[same]
    x[dup] = x[dup - 1] + 0.02 / np.sqrt(dim) * rng.standard_normal((len(dup), dim)).astype(np.float32)
    by = np.nonzero(rng.random(n) < 0.05)[0]
    by = by[(by > 0) & (ident[by] == ident[by - 1])]
    photo[by] = photo[by - 1]  # a second face in the previous photo
    x[by] = rng.standard_normal((len(by), dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    quality = rng.random(n).astype(np.float32)
    return x, ident, photo, quality, planted


def _peak_mb(who) -> int:
    kb = resource.getrusage(who).ru_maxrss  # kB on Linux, bytes on macOS
    return round(kb / (1 << 20 if sys.platform == "darwin" else 1 << 10))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, default=1_000_000)
    ap.add_argument("--identities", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--naive-sample", type=int, default=20_000,
                    help="identity centres in the all-pairs baseline (extrapolated quadratically)")
    ap.add_argument("--workers", type=int, default=None, help="clean_core processes (default: all cores)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    from facecurate.clean.clean_core import clean_core
    from facecurate.clean.clean_params import default_params
    from facecurate.clean.similar import _have_faiss, _pairs_exact, similar_pairs
    from facecurate.engines.local import default_workers

    workers = a.workers or default_workers()

    t0 = time.perf_counter()
    x, ident, photo, quality, planted = synth(a.faces, a.identities, a.dim)
    t_synth = time.perf_counter() - t0
    p = default_params("dlib")

    t0 = time.perf_counter()
    res = clean_core(x, ident, photo, quality, p, workers=workers)
    t_clean = time.perf_counter() - t0

    # merge search alone on the final centres vs the naive all-pairs search
    cen = res.centres
    t0 = time.perf_counter()
    pairs = similar_pairs(cen, p.merge, exact_below=0)
    t_ivf = time.perf_counter() - t0
    m = min(a.naive_sample, len(cen))
    t0 = time.perf_counter()
    exact_sub = _pairs_exact(cen[:m], p.merge)
    t_naive_sub = time.perf_counter() - t0
    t_naive = t_naive_sub * (len(cen) / m) ** 2
    found = {(i, j) for i, j, _ in pairs}
    exact_sub_set = {(i, j) for i, j, _ in exact_sub}
    recall_sub = len(exact_sub_set & found) / max(1, len(exact_sub_set))
    planted_set = {tuple(sorted(map(int, t))) for t in planted}
    merge_found = {(i, j) for i, j, _ in res.merges}
    planted_recall = len(planted_set & merge_found) / len(planted_set)

    # seed method (iterated folder mean) over every identity, same data
    t0 = time.perf_counter()
    order = np.argsort(ident, kind="stable")
    cuts = np.nonzero(np.diff(ident[order]))[0] + 1
    for rows in np.split(order, cuts):
        e = x[rows]
        mm = e.mean(0)
        for _ in range(3):
            k = e @ (mm / max(np.linalg.norm(mm), 1e-12)) >= p.drop
            if not k.any():
                break
            mm = e[k].mean(0)
    t_seed = time.perf_counter() - t0

    dec = np.array(res.decision)
    out = dict(
        faces=len(x), identities=a.identities, dim=a.dim, faiss=_have_faiss(), workers=workers,
        synth_s=round(t_synth, 1),
        clean_core_s=round(t_clean, 1), faces_per_s=round(len(x) / t_clean),
        seed_iterated_centre_s=round(t_seed, 1), clean_vs_seed_ratio=round(t_clean / t_seed, 2),
        merge_ivf_s=round(t_ivf, 2), merge_naive_allpairs_s_extrapolated=round(t_naive, 1),
        merge_naive_sample=m, merge_naive_sample_s=round(t_naive_sub, 2),
        merge_speedup=round(t_naive / max(t_ivf, 1e-9), 1), merge_recall_on_sample=round(recall_sub, 4),
        planted_merge_recall=round(planted_recall, 4),
        peak_rss_mb=_peak_mb(resource.RUSAGE_SELF), peak_rss_worker_mb=_peak_mb(resource.RUSAGE_CHILDREN),
        keep=int((dec == "keep").sum()), drop=int((dec == "drop").sum()), review=int((dec == "review").sum()),
    )
    if a.json:
        print(json.dumps(out, sort_keys=True))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
