"""A synthetic packed dataset written to disk in chunks, for benchmarks/clean.py and the
sharded clean's tests: ``train.rec`` + ``train.idx`` (plain layout, keys 0..N-1, one tiny
JPEG record per face, labels contiguous and increasing) and the embedding store
``facecurate embed DEST/train.rec`` would write (so clean does not embed again).

The model: Zipf-like identity sizes, faces = centre + Gaussian noise (cosine to the
centre about 0.98), 10 % other people, 2 % near-duplicates (the same JPEG template as
their original), 0.5 % of the identities planted as "the same person under two
labels" pairs. Every chunk of about CHUNK_FACES faces draws from its own RNG seeded by
(seed, chunk): the bytes depend only on the arguments, never on memory.
"""

from __future__ import annotations

import inspect
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

class Plan:
    """What the whole dataset is, from the arguments alone: faces per identity
    (Zipf-like, as :func:`synth`), the planted pairs, and the chunks (identity ranges
    of about CHUNK_FACES faces)."""

    def __init__(self, n_faces: int, n_ids: int, dim: int, seed: int = 0):
        rng = np.random.default_rng([seed, 0])
        w = rng.permutation(1.0 / np.arange(1, n_ids + 1) ** 0.6)
        share = w / w.sum() * n_faces
        counts = np.maximum(1, np.floor(share)).astype(np.int64)
        # the faces the floors left over go one each to the largest fractional parts (no
        # one giant identity: real sets' largest hold thousands, not a million)
        left = int(n_faces - counts.sum())
        if left > 0:
            counts[np.argsort(-(share - np.floor(share)), kind="stable")[:left]] += 1
        elif left < 0:
            counts[np.argmax(counts)] += left
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
