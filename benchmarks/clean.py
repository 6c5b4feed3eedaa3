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
import inspect
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: Faces generated and written per chunk (the writer's memory: about this many
#: vectors of --dim float32, plus one chunk of records and rows).
CHUNK_FACES = 1_000_000
#: Distinct tiny JPEG images the records reuse.
TEMPLATES = 300
TEMPLATE_SIDE = 16
#: The synthetic model: noise scale (cosine to the centre ~0.98), other people,
#: near-duplicates (their noise scale), planted pairs (one per this many identities).
NOISE, OTHER_SHARE, DUP_SHARE, DUP_NOISE, PLANTED_EVERY = 0.2, 0.10, 0.02, 0.02, 200
#: The store's model name: a dlib family name, so clean uses its dlib thresholds.
MODEL = "synthetic_dlib_like"
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


# ----------------------------------------------------------------------------- the dataset
class Plan:
    """What the whole dataset is, from the arguments alone: faces per identity
    (Zipf-like, as :func:`synth`), the planted pairs, and the chunks (identity ranges
    of about CHUNK_FACES faces)."""

    def __init__(self, n_faces: int, n_ids: int, dim: int, seed: int = 0):
        rng = np.random.default_rng([seed, 0])
        w = rng.permutation(1.0 / np.arange(1, n_ids + 1) ** 0.6)
        counts = np.maximum(1, np.floor(w / w.sum() * n_faces)).astype(np.int64)
        counts[np.argmax(counts)] += n_faces - counts.sum()
        self.counts, self.dim, self.seed = counts, dim, seed
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # first key of each identity
        self.faces = int(self.starts[-1])
        self.planted = np.sort(rng.choice(n_ids, size=(max(1, n_ids // PLANTED_EVERY), 2), replace=False), axis=1)
        self.pair_of = {int(b): int(a) for a, b in self.planted} | {int(a): int(a) for a, _ in self.planted}
        cuts = np.searchsorted(self.starts, np.arange(CHUNK_FACES, self.faces, CHUNK_FACES), side="right") - 1
        self.bounds = np.unique(np.concatenate([[0], cuts, [n_ids]]))  # identity ranges

    def centres(self, rng, i0: int, i1: int) -> np.ndarray:
        """Unit centres of identities i0..i1-1; both labels of a planted pair get the
        centre drawn from the pair's own seed (the two may lie in different chunks)."""
        c = rng.standard_normal((i1 - i0, self.dim), dtype=np.float32)
        for i in range(i0, i1):
            a = self.pair_of.get(i)
            if a is not None:
                c[i - i0] = np.random.default_rng([self.seed, 1, a]).standard_normal(self.dim, dtype=np.float32)
        return c / np.linalg.norm(c, axis=1, keepdims=True)

    def chunk(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels, unit vectors float32, template numbers) of chunk ``k``'s faces."""
        i0, i1 = int(self.bounds[k]), int(self.bounds[k + 1])
        rng = np.random.default_rng([self.seed, 2, k])
        cen = self.centres(rng, i0, i1)
        local = np.repeat(np.arange(i1 - i0), self.counts[i0:i1])
        n = local.size
        x = rng.standard_normal((n, self.dim), dtype=np.float32)
        x *= NOISE / np.sqrt(self.dim)
        x += cen[local]
        wrong = rng.random(n) < OTHER_SHARE
        x[wrong] = rng.standard_normal((int(wrong.sum()), self.dim), dtype=np.float32)
        tmpl = rng.integers(0, TEMPLATES, n)
        dup = np.flatnonzero(rng.random(n) < DUP_SHARE)
        dup = dup[dup > 0]
        dup = dup[local[dup] == local[dup - 1]]
        x[dup] = x[dup - 1] + DUP_NOISE / np.sqrt(self.dim) * rng.standard_normal((dup.size, self.dim),
                                                                                    dtype=np.float32)
        tmpl[dup] = tmpl[dup - 1]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return local + i0, x, tmpl


def templates(seed: int) -> list[bytes]:
    """TEMPLATES tiny grey JPEGs of noise (no flat patch, so clean's occlusion check
    finds none; pairwise correlation low, so only a duplicate's copy matches)."""
    import cv2

    rng = np.random.default_rng([seed, 3])
    opts = [cv2.IMWRITE_JPEG_QUALITY, 75, cv2.IMWRITE_JPEG_OPTIMIZE, 1]
    return [cv2.imencode(".jpg", rng.integers(0, 256, (TEMPLATE_SIDE, TEMPLATE_SIDE), dtype=np.uint8),
                         opts)[1].tobytes() for _ in range(TEMPLATES)]


def _store_writer(ws, rows: int, dim: int, dtype: str):
    """(Workspace.store_writer for ``dtype``, the dtype really written): float16 only
    where the store writer takes a dtype."""
    if dtype != "float32" and "dtype" in inspect.signature(ws.store_writer).parameters:
        return ws.store_writer(rows, dim, dtype=np.dtype(dtype)), dtype
    return ws.store_writer(rows, dim), "float32"


def write_dataset(dest: Path, plan: Plan, dtype: str) -> str:
    """train.rec/.idx, property and the embedding store in ``dest`` (see the module),
    chunk by chunk; returns the store's dtype as written."""
    from facecurate import __version__
    from facecurate.common.constants import IDX_NAME, PROPERTY_NAME, REC_KEY_PREFIX, REC_NAME, VERSIONS_KEY
    from facecurate.common.files import atomic_write
    from facecurate.common.provenance import library_versions
    from facecurate.common.recordio import RecordWriter
    from facecurate.common.workspace import Workspace

    dest.mkdir(parents=True)
    tpl = templates(plan.seed)
    ws = Workspace(dest)
    writer, written = _store_writer(ws, plan.faces, plan.dim, dtype)
    with atomic_write(dest / REC_NAME, "wb", fsync=False) as rec, \
            atomic_write(dest / IDX_NAME, "w", fsync=False, encoding="ascii", newline="\n") as idx, writer as st:
        w = RecordWriter(rec)
        key = 0
        for k in range(len(plan.bounds) - 1):
            labels, x, tmpl = plan.chunk(k)
            keys = range(key, key + labels.size)
            offs = w.write_images([(float(lab), tpl[t], kk)
                                   for lab, t, kk in zip(labels.tolist(), tmpl.tolist(), keys)])
            idx.write("".join([f"{kk}\t{o}\n" for kk, o in zip(keys, offs)]))
            st.add(x, [(f"{REC_KEY_PREFIX}{kk}", f"{REC_NAME}:{kk}", str(lab), "0")
                       for kk, lab in zip(keys, labels.tolist())])
            key += labels.size
        w.flush()
    (dest / PROPERTY_NAME).write_text(f"{len(plan.counts)},{TEMPLATE_SIDE},{TEMPLATE_SIDE}\n")
    info = {"name": MODEL, "dim": plan.dim, "feed": "crop", "runtime": "synthetic"}
    ws.write_store_meta({
        "model": MODEL, "model_info": info, "model_file": None, "sha256": "synthetic", "dim": plan.dim,
        "input_size": TEMPLATE_SIDE, "normalisation": "l2", "flip": True, "feed": "crop", "input": "rec",
        "count": plan.faces, "failed": [], "signature": info, "dtype": written, "version": __version__,
        VERSIONS_KEY: library_versions(), "note": "synthetic vectors (benchmarks/clean.py)"})
    return written


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


def merge_recall(dest: Path, plan: Plan) -> float:
    """Share of the planted label pairs that merges.csv names (its names are the labels)."""
    with open(dest / "merges.csv", newline="", encoding="utf-8") as f:
        found = {tuple(sorted((int(r["a"]), int(r["b"])))) for r in csv.DictReader(f)}
    planted = {(int(a), int(b)) for a, b in plan.planted}
    return len(planted & found) / len(planted)


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
    shutil.rmtree(dest, ignore_errors=True)
    try:
        plan = Plan(a.faces, a.identities, a.dim)
        t0 = time.perf_counter()
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
        return dict(
            faces=plan.faces, identities=a.identities, dim=a.dim, dtype=dtype, dtype_requested=a.dtype,
            engine=a.engine or "default",
            workers=a.workers or "default", write_s=round(t_write, 1), write_faces_per_s=round(plan.faces / t_write),
            rec_gb=round((dest / "train.rec").stat().st_size / 1e9, 3),
            store_gb=round((dest / "embeddings.npy").stat().st_size / 1e9, 3),
            clean_s=round(t_clean, 1), clean_core_s=round(t_core, 1), faces_per_s=round(plan.faces / t_clean),
            peak_pss_gb=round(pss.peak / 1e9, 3), merge_recall=round(merge_recall(dest, plan), 4),
            planted_pairs=len(plan.planted), merge_search=s.get("merge_search", "unknown"),
            seed_s=round(t_seed_all, 2), seed_extrapolated=sampled, seed_sample_faces=seed_faces,
            clean_vs_seed_ratio=round(t_core / max(t_seed_all, 1e-9), 2),
            keep=s["keep"], drop=s["drop"], review=s["review"], merge_candidates=s["merge_candidates"],
            store_reused=_store_state(dest) == store)
    finally:
        if not a.keep:
            shutil.rmtree(dest, ignore_errors=True)
            if not a.dir:
                shutil.rmtree(base, ignore_errors=True)


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
