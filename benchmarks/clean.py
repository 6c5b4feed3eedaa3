"""Scale benchmark of the clean stage on a packed dataset written to disk (issue 21).

    python benchmarks/clean.py [--faces 1000000] [--identities 100000] [--dim 128]
        [--dtype float32|float16] [--workers N] [--engine local|ray] [--dir DIR] [--keep]
        [--seed-sample 10000] [--json]

1. Writes a synthetic packed dataset to DIR/clean-<faces>-<identities>-<dim>-<dtype>/
   in chunks of about CHUNK_FACES faces (never all faces in memory): ``train.rec`` +
   ``train.idx`` in the plain layout (keys 0..N-1, one record per face, labels
   contiguous and increasing in key order), each record a tiny valid JPEG (one of
   TEMPLATES pre-encoded 16x16 grey noise images; a near-duplicate reuses its
   original's template, so clean's pixel check sees the same image), and the
   embedding store ``facecurate embed DEST/train.rec`` writes (embeddings.npy filled
   through a memory map, embeddings.csv streamed, embeddings.json last with
   ``input: rec`` and the record count, so clean does not embed again).
   The synthetic model is that of :func:`synth` (below, kept for the 100k digest test
   of tests/test_clean.py): Zipf-like identity sizes, faces = centre + Gaussian noise
   (cosine to the centre about 0.98), 10 % other people, 2 % near-duplicates, 0.5 %
   of the identities planted as "the same person under two labels" pairs; synth's
   bystander faces do not exist in a .rec (every record is its own photo) and are
   left out. Every chunk draws from its own RNG seeded by (seed, chunk), so the bytes
   depend only on the arguments. The model name is a dlib-like one (clean's dlib
   thresholds suit this spread, at any --dim).
2. Runs the real clean stage on it (``facecurate.clean.run_clean``) while a
   :class:`facecurate.common.procs.PssSampler` samples the PSS of this process and
   all its descendants (workers, a local Ray cluster).
3. Times the seed method (iterated folder mean with the drop threshold, per
   identity, 1 process) on --seed-sample identities read from the store, and
   extrapolates it linearly in faces to the whole store (``seed_extrapolated``).

Prints ``key: value`` lines (``--json``: one JSON line).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_rec import MODEL, Plan, write_dataset  # noqa: E402

#: clean.json summary keys that may hold the core's own time (finer than run_clean's wall).
CORE_SECONDS_KEYS = ("clean_core_s", "core_seconds", "seconds_core")


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


# ----------------------------------------------------------------------------- measures
def seed_method(dest: Path, plan: Plan, drop: float, sample: int) -> tuple[float, int, bool]:
    """(seconds of the seed method on ``sample`` identities read from the store,
    their faces, whether that is a sample): per identity, the folder mean, then 3
    times the mean of the faces at or above ``drop`` against it."""
    vecs = np.load(dest / "embeddings.npy", mmap_mode="r")
    n_ids = len(plan.counts)
    ids = np.sort(np.random.default_rng([plan.seed, 4]).choice(n_ids, size=min(sample, n_ids), replace=False))
    folders = [np.asarray(vecs[plan.starts[i]:plan.starts[i + 1]], np.float32) for i in ids.tolist()]
    t0 = time.perf_counter()
    for e in folders:
        mm = e.mean(0)
        for _ in range(3):
            k = e @ (mm / max(np.linalg.norm(mm), 1e-12)) >= drop
            if not k.any():
                break
            mm = e[k].mean(0)
    return time.perf_counter() - t0, sum(len(e) for e in folders), ids.size < n_ids


def merge_recall(dest: Path, plan: Plan) -> tuple[float, float, int]:
    """(recall of the planted label pairs whose two identities both keep a face, recall
    of all planted pairs, how many pairs have an identity that keeps nothing). merges.csv
    names the labels. clean compares only identities that keep faces (an identity that
    keeps none, e.g. too_few_images, has no kept centre to merge), so the first figure is
    the merge search's recall and the second what a user finds."""
    with open(dest / "merges.csv", newline="", encoding="utf-8") as f:
        found = {tuple(sorted((int(r["a"]), int(r["b"])))) for r in csv.DictReader(f)}
    with open(dest / "identities.csv", newline="", encoding="utf-8") as f:
        keeps = {int(r["identity"]) for r in csv.DictReader(f) if int(r["kept"]) > 0}
    planted = {(int(a), int(b)) for a, b in plan.planted}
    live = {pr for pr in planted if pr[0] in keeps and pr[1] in keeps}
    return (len(live & found) / max(1, len(live)), len(planted & found) / len(planted), len(planted - live))


def _store_state(dest: Path) -> tuple:
    """What would change if clean embedded the .rec again: the store's files."""
    return tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(dest.glob("embeddings.*"))) + (
        (dest / "embeddings.json").read_bytes(),)


def run(a) -> dict:
    from facecurate.clean import run_clean
    from facecurate.clean.clean_params import default_params
    from facecurate.common.procs import PssSampler

    base = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="fc-bench-clean-", dir="/tmp"))
    dest = base / f"clean-{a.faces}-{a.identities}-{a.dim}-{a.dtype}"
    plan = Plan(a.faces, a.identities, a.dim)
    reuse = a.reuse and (dest / "embeddings.json").exists()
    if not reuse:
        shutil.rmtree(dest, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        if reuse:  # the same arguments wrote the same bytes: clean's own files and work go
            for name in ("clean.csv", "identities.csv", "merges.csv", "clean.json", ".facecurate"):
                shutil.rmtree(dest / name, ignore_errors=True) if name.startswith(".") else \
                    (dest / name).unlink(missing_ok=True)
            dtype = json.loads((dest / "embeddings.json").read_text())["dtype"]
        else:
            dtype = write_dataset(dest, plan, a.dtype)
        t_write = time.perf_counter() - t0
        t_seed, seed_faces, sampled = seed_method(dest, plan, default_params(MODEL).drop, a.seed_sample)
        t_seed_all = t_seed * plan.faces / max(seed_faces, 1)
        kw = {"engine": a.engine} if a.engine else {}
        store = _store_state(dest)
        with PssSampler(interval=a.interval) as pss:
            t0 = time.perf_counter()
            s = run_clean(dest, workers=a.workers, show_progress=False, **kw)
            t_clean = time.perf_counter() - t0
        t_core = next((float(s[k]) for k in CORE_SECONDS_KEYS if k in s), t_clean)
        recall, recall_all, not_kept = merge_recall(dest, plan)
        ray = _on_ray(dest, a.ray_nodes) if a.ray_nodes else {}
        return dict(
            faces=plan.faces, identities=a.identities, dim=a.dim, dtype=dtype, dtype_requested=a.dtype,
            engine=a.engine or "default",
            workers=a.workers or "default", write_s=round(t_write, 1), write_faces_per_s=round(plan.faces / t_write),
            rec_gb=round((dest / "train.rec").stat().st_size / 1e9, 3),
            store_gb=round((dest / "embeddings.npy").stat().st_size / 1e9, 3),
            clean_s=round(t_clean, 1), clean_core_s=round(t_core, 1), faces_per_s=round(plan.faces / t_clean),
            peak_pss_gb=round(pss.peak / 1e9, 3), merge_recall=round(recall, 4), merge_recall_all=round(recall_all, 4),
            planted_pairs=len(plan.planted), planted_pairs_not_kept=not_kept,
            merge_search=s.get("merge_search", "unknown"), merge_search_s=s.get("merge_search_s", "unknown"),
            seed_s=round(t_seed_all, 2), seed_extrapolated=sampled, seed_sample_faces=seed_faces,
            clean_vs_seed_ratio=round(t_core / max(t_seed_all, 1e-9), 2),
            keep=s["keep"], drop=s["drop"], review=s["review"], merge_candidates=s["merge_candidates"],
            store_reused=_store_state(dest) == store,
            write_reused=reuse, **ray,
            steps_s=",".join(f"{k}={v.get('seconds')}" for k, v in s.get("engine", {}).get("steps", {}).items()))
    finally:
        if not a.keep:
            shutil.rmtree(dest, ignore_errors=True)
            if not a.dir:
                shutil.rmtree(base, ignore_errors=True)


OUTPUTS = ("clean.csv", "identities.csv", "merges.csv", "clean.json")


def _on_ray(dest: Path, nodes: int) -> dict:
    """clean again on a Ray cluster of ``nodes`` nodes of one CPU each started on this
    host (a copy of DEST: the inputs hard-linked), and whether its outputs equal the
    first run's byte for byte."""
    import ray
    from ray.cluster_utils import Cluster

    from facecurate.clean import run_clean

    other = dest.with_name(dest.name + "-ray")
    shutil.rmtree(other, ignore_errors=True)
    other.mkdir()
    for f in dest.iterdir():
        if f.is_file() and f.name not in OUTPUTS:
            os.link(f, other / f.name)
    node = {"num_cpus": 1, "object_store_memory": 200 * 1024 * 1024}
    c = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    for _ in range(nodes - 1):
        c.add_node(**node)
    try:
        ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
        c.wait_for_nodes()
        t0 = time.perf_counter()
        s = run_clean(other, engine="ray", show_progress=False)
        t = time.perf_counter() - t0
        same = all((dest / n).read_bytes() == (other / n).read_bytes() for n in OUTPUTS)
        used = len(s.get("engine", {}).get("steps", {}).get("analyse", {}).get("nodes", {}))
    finally:
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(other, ignore_errors=True)
    return dict(ray_nodes=nodes, ray_nodes_used=used, ray_clean_s=round(t, 1), ray_identical=same)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, default=1_000_000)
    ap.add_argument("--identities", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                    help="the store's dtype (float16 only where the store writer supports it; "
                         "the dtype line says what was written)")
    ap.add_argument("--workers", type=int, default=None, help="clean's processes (default: clean's own)")
    ap.add_argument("--engine", default=None, help="clean's engine (passed only when given)")
    ap.add_argument("--dir", default=None, help="where DEST is written (default: a new folder under /tmp)")
    ap.add_argument("--keep", action="store_true", help="leave DEST (and the default folder) on disk")
    ap.add_argument("--seed-sample", type=int, default=10_000,
                    help="identities the seed method is timed on (extrapolated in faces to all)")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between PSS samples")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse DEST when --dir already holds the dataset these arguments write (with --keep)")
    ap.add_argument("--ray-nodes", type=int, default=0,
                    help="then clean a copy on a Ray cluster of this many one-CPU nodes started on this host "
                         "and print whether its outputs are byte-identical (ray_identical)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.faces < a.identities or a.identities < 2:
        ap.error("need --identities >= 2 and --faces >= --identities")
    out = run(a)
    if a.json:
        print(json.dumps(out, sort_keys=True))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    sys.exit(main())
