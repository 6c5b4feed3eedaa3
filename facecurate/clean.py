"""The clean stage on a folder OUT: read align.csv and the embedding store, decide
keep / drop / review for every aligned face, write clean.csv, identities.csv,
merges.csv and clean.json (:func:`run_clean`; a packed DEST goes to
:mod:`facecurate.clean_rec`).

The algorithm lives in its own modules: :mod:`facecurate.clean_params` (thresholds,
model-aware defaults), :mod:`facecurate.clean_identity` (per identity: clusters,
robust centre, subject per photo, thresholds, near-duplicates),
:mod:`facecurate.clean_cohort` (score offsets measured on the dataset, calibration),
:mod:`facecurate.similar` (pairs above a threshold: merge candidates) and
:mod:`facecurate.clean_core` (all of it on arrays over a process pool, then
exclusion, too few photos, the review budget and merges). This module holds the
file side: the store, ``--exclude``, the crops' pixel check (:class:`CropSimilarity`),
the manual decisions carried over from a previous clean.csv, and the outputs.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from facecurate import constants as C
from facecurate.clean_cohort import calibrate
from facecurate.clean_core import CoreResult, clean_core
from facecurate.clean_params import R_MANUAL, R_NO_EMBEDDING, CleanParams, default_params, model_family
from facecurate.files import format_float, read_csv, write_csv_atomic, write_text_atomic
from facecurate.similar import similar_pairs
from facecurate.vectors import normalize

__all__ = ["CleanParams", "CoreResult", "CropSimilarity", "clean_core", "default_params", "read_exclude",
           "run_clean", "similar_pairs", "store_index"]

IDENTITY_COLUMNS = (
    "identity", "images", "faces", "kept", "dropped", "review", "duplicates", "not_subject",
    "clusters", "dominant_share", "noise", "median_score", "flags",
)
MERGE_COLUMNS = ("a", "b", "similarity")


def store_index(out_dir: Path):
    """(vectors, memory-mapped; {aligned: row}; meta) of OUT's embedding store, read by
    :func:`facecurate.embed.load_store`; None when OUT has no store."""
    from facecurate.embed import load_store

    store = load_store(out_dir, mmap=True, missing_ok=True)
    if store is None:
        return None
    vecs, rows, meta = store
    return vecs, {r.aligned: i for i, r in enumerate(rows)}, meta


def _model_name(meta: dict) -> str:
    for k in ("model", "name", "model_name"):
        v = meta.get(k)
        if isinstance(v, str):
            return v
        if isinstance(v, dict) and isinstance(v.get("name"), str):
            return v["name"]
    return "dlib"


def ensure_embeddings(out_dir: Path, rows: Sequence[dict], runtime: str = "auto"):
    """The store, embedding with the default model first when crops are missing from it
    (crops the embed stage recorded as failed are not retried here). An existing store
    is continued on its own runtime; ``runtime`` applies to a new one."""
    store = store_index(out_dir)
    need = {r["aligned"] for r in rows}
    if store is None or not need.issubset(set(store[1]) | _failed(store[2])):
        try:
            from facecurate.embed import run_embed
        except ImportError as e:  # pragma: no cover - embed stage missing
            raise RuntimeError(f"{out_dir}: embeddings missing and the embed stage is unavailable ({e})")
        # continue an existing (default-model) store with its own settings
        if store is not None:
            runtime = _store_runtime(store[2])
        run_embed(out_dir, flip=bool(store[2].get("flip", True)) if store is not None else True, runtime=runtime)
        store = store_index(out_dir)
    if store is None:
        raise RuntimeError(f"{out_dir}: no embedding store after embedding")
    return store


def _store_runtime(meta: dict) -> str:
    """The runtime of dlib's model a store was made with (no ``runtime``: dlib)."""
    return "onnx" if str((meta.get("signature") or {}).get("runtime", "")).startswith("onnx") else "dlib"


def _failed(meta: dict) -> set:
    return {f.get("aligned") for f in meta.get("failed", []) if isinstance(f, dict)}


def read_exclude(path: Path) -> tuple[set[str], list]:
    """Names (folder of identities) or encoded images (verification .bin)."""
    path = Path(path)
    if path.is_dir():
        names = {e.name for e in path.iterdir() if not e.name.startswith(".")}
        names |= {Path(n).stem for n in names}
        return names, []
    if path.suffix == ".bin":
        with open(path, "rb") as f:
            try:
                bins, _issame = pickle.load(f, encoding="bytes")
            except Exception as e:
                raise ValueError(f"{path}: not a verification .bin (pickle of (bins, issame_list)): {e}")
        return set(), [bytes(b) for b in bins]
    if path.is_file():  # a text file of names
        return {s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()}, []
    raise FileNotFoundError(f"--exclude {path}: no such file or folder")


def embed_images(images: list[bytes], meta: dict, runtime: str = "auto") -> np.ndarray:
    """Embeddings of encoded aligned crops (a verification .bin) with the store's model
    (dlib: the embed stage's chip from the crop's five template points) on ``runtime``."""
    import cv2

    crops = []
    for b in images:
        img = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
        if img is not None:
            crops.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    if not crops:
        return np.zeros((0, int(meta.get("dim", 128))), np.float32)
    if model_family(_model_name(meta)) != "dlib":
        raise RuntimeError("--exclude with a .bin needs the dlib store; for other models pass a folder of "
                           "identity names")
    from facecurate.models.zoo import make_embedder

    emb = make_embedder("dlib", feed="crop", runtime=runtime)
    out = []
    for b0 in range(0, len(crops), 64):
        chips = [emb.from_crop(c) for c in crops[b0:b0 + 64]]
        out.append(emb.run(chips, bool(meta.get("flip", False))))
    return normalize(np.concatenate(out))


def _f(v, default=0.0) -> float:
    try:
        x = float(v)
        return x if x == x else default
    except (TypeError, ValueError):
        return default


class CropSimilarity:
    """Correlation of two aligned crops, 32x32 grey, mean removed (1.0: same pixels up to
    brightness and contrast). Thumbnails are read on first use and cached; a crop that
    cannot be read compares as 0 (never a duplicate by pixels)."""

    SIDE = 32

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = list(paths)
        self._cache: dict[int, np.ndarray | None] = {}

    def subset(self, rows: Sequence[int]) -> "CropSimilarity":
        """The same comparison on the crops ``rows`` (renumbered 0..), e.g. for a worker."""
        return CropSimilarity([self.paths[int(i)] for i in rows])

    def grey(self, i: int) -> np.ndarray | None:
        """Crop ``i`` as a grey image, or None when it cannot be read."""
        import cv2

        return cv2.imread(str(self.paths[i]), cv2.IMREAD_GRAYSCALE)

    def thumb(self, i: int) -> np.ndarray | None:
        if i not in self._cache:
            import cv2

            im = self.grey(i)
            t = None
            if im is not None and im.size:
                t = cv2.resize(im, (self.SIDE, self.SIDE), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
                t -= t.mean()
                t /= float(np.linalg.norm(t)) + 1e-6
            self._cache[i] = t
        return self._cache[i]

    def __call__(self, i: int, j: int) -> float:
        a, b = self.thumb(i), self.thumb(j)
        return 0.0 if a is None or b is None else float(a @ b)


def _carry_manual(previous_csv: Path, out: list[dict]) -> tuple[int, int]:
    """Give the rows of ``out`` the manual decisions of the previous clean.csv (same
    crop, same identity). Returns (carried over, lost: their crop is gone)."""
    if not previous_csv.exists():
        return 0, 0
    manual = {(r.get("aligned", ""), r.get("identity", "")): r.get("decision", "")
              for r in read_csv(previous_csv) if r.get("reason") == R_MANUAL}
    kept = 0
    for r in out:
        d = manual.get((r["aligned"], r["identity"]))
        if d in (C.DECISION_KEEP, C.DECISION_DROP):
            r.update(previous_decision=r["decision"], previous_reason=r["reason"], decision=d, reason=R_MANUAL)
            kept += 1
    return kept, len(manual) - kept


@dataclass
class _Faces:
    """align.csv's faces as :func:`clean_core`'s arrays: the rows with an embedding in
    stable order (identity, source, face) and the rows without one."""

    have: list  # rows with an embedding; row i is face i of the arrays
    missing: list  # rows whose crop has no embedding
    names: list  # identity names with faces, sorted: identity number -> name
    gid: dict  # name -> identity number
    emb: np.ndarray
    identity: np.ndarray
    photo: np.ndarray
    face_size: np.ndarray
    sharpness: np.ndarray
    quality: np.ndarray


def run_clean(out_dir, *, model_overrides: dict | None = None, calibrate_far: float | None = None,
              exclude: Sequence[str | os.PathLike] = (), max_review: float | None = None,
              min_images: int | None = None, min_face: float | None = None, ambiguous: str | None = None,
              keep_manual: bool = True, show_progress: bool = True, runtime: str = "auto",
              workers: int | None = None, shard_faces: int | None = None) -> dict:
    """Read OUT/align.csv and the embedding store; write clean.csv, identities.csv,
    merges.csv and clean.json. Returns the summary.

    ``keep_manual``: a face whose decision came from a review (reason ``manual`` in
    the existing clean.csv) keeps it; the decision computed now is recorded in
    ``previous_decision``/``previous_reason``, as ``review apply`` does. ``workers``:
    processes for the per-identity work (default: all cores); the outputs depend
    neither on it nor on ``shard_faces`` (see ``clean_core``)."""
    out_dir = Path(out_dir)
    from facecurate.recdata import is_rec_dataset

    if is_rec_dataset(out_dir):  # a packed dataset: identities are labels (facecurate.clean_rec)
        from facecurate.clean_rec import run_clean_rec

        return run_clean_rec(out_dir, model_overrides=model_overrides, calibrate_far=calibrate_far,
                             exclude=exclude, max_review=max_review, min_images=min_images, min_face=min_face,
                             ambiguous=ambiguous, keep_manual=keep_manual, show_progress=show_progress,
                             workers=workers, shard_faces=shard_faces, runtime=runtime)
    all_rows, rows = _read_align(out_dir)
    images_by_id = defaultdict(set)
    for r in all_rows:
        images_by_id[r["identity"]].add(r["source"])
    vecs, where, meta = ensure_embeddings(out_dir, rows, runtime) if rows else (np.zeros((0, 128), np.float32), {}, {})
    model = _model_name(meta)
    ov = dict(model_overrides or {})
    ov.update(max_review=max_review, min_images=min_images, min_face=min_face, ambiguous=ambiguous)
    p = default_params(model, **ov)
    f = _face_arrays(rows, vecs, where)
    if calibrate_far is not None and len(f.names) >= 2:
        p = calibrate(f.emb, f.identity, f.photo, p, calibrate_far)
    ex_ids, ex_vecs = _exclusions(exclude, f.names, meta, runtime)
    res = clean_core(f.emb, f.identity, f.photo, f.quality, p, face_size=f.face_size, sharpness=f.sharpness,
                     excluded=ex_ids, exclude_vecs=ex_vecs,
                     pixel_sim=CropSimilarity([out_dir / r["aligned"] for r in f.have]),
                     show_progress=show_progress, workers=workers, shard_faces=shard_faces)
    out = _face_rows(f, res)
    manual_kept, manual_lost = _carry_manual(out_dir / C.CLEAN_CSV, out) if keep_manual else (0, 0)
    ident_rows = _identity_rows(images_by_id, f, res)
    merge_rows = [dict(a=f.names[a], b=f.names[b], similarity=format_float(s)) for a, b, s in res.merges]
    write_csv_atomic(out_dir / C.CLEAN_CSV, C.CLEAN_COLUMNS, out)
    write_csv_atomic(out_dir / C.IDENTITIES_CSV, IDENTITY_COLUMNS, ident_rows)
    write_csv_atomic(out_dir / C.MERGES_CSV, MERGE_COLUMNS, merge_rows)
    summary = _summary(out, ident_rows, merge_rows, res, p, model, manual_kept, manual_lost)
    write_text_atomic(out_dir / C.CLEAN_META, json.dumps(dict(summary=summary, params=p.as_dict()),
                                                         indent=2, sort_keys=True) + "\n")
    return summary


def _read_align(out_dir: Path) -> tuple[list, list]:
    """(every row of align.csv with an identity, those of them with a crop)."""
    manifest = out_dir / C.ALIGN_MANIFEST
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} not found: run `facecurate align RAW {out_dir}` first")
    # A file directly under RAW (identity "") is recorded by align but belongs to no identity.
    all_rows = [r for r in read_csv(manifest) if r.get("identity")]
    return all_rows, [r for r in all_rows if r.get("aligned")]


def _face_arrays(rows: list, vecs: np.ndarray, where: dict) -> _Faces:
    """The crops' rows (sorted here: identity, source, face) as arrays: unit vectors,
    identity and photo numbers, face size, sharpness and the duplicate-choice quality."""
    rows.sort(key=lambda r: (r["identity"], r["source"], int(r["face"])))
    have = [r for r in rows if r["aligned"] in where]
    missing = [r for r in rows if r["aligned"] not in where]
    names = sorted({r["identity"] for r in have})
    gid = {nm: i for i, nm in enumerate(names)}
    emb = normalize(np.asarray(vecs[[where[r["aligned"]] for r in have]], np.float32)) if have else \
        np.zeros((0, vecs.shape[1] if vecs.ndim == 2 else 128), np.float32)
    identity = np.array([gid[r["identity"]] for r in have], np.int64)
    srcs = {}
    photo = np.array([srcs.setdefault(r["source"], len(srcs)) for r in have], np.int64)
    fsize = np.array([_f(r.get("face_size")) for r in have], np.float32)
    sharp = np.array([_f(r.get("sharpness")) for r in have], np.float32)
    quality = fsize * 1000.0 + np.minimum(sharp, 999.0)
    return _Faces(have, missing, names, gid, emb, identity, photo, fsize, sharp, quality)


def _exclusions(exclude: Sequence[str | os.PathLike], names: list, meta: dict, runtime: str):
    """``--exclude``: (identity numbers named, vectors of the evaluation images or None)."""
    ex_ids: set[int] = set()
    ex_vecs = None
    for e in exclude:
        nm, imgs = read_exclude(Path(e))
        low = {s.lower().replace(" ", "_") for s in nm}
        ex_ids |= {i for i, x in enumerate(names) if x.lower().replace(" ", "_") in low}
        if imgs:
            # auto: the store's own runtime, so the .bin's faces are embedded as the store's were
            v = embed_images(imgs, meta, _store_runtime(meta) if runtime == "auto" and meta else runtime)
            ex_vecs = v if ex_vecs is None else np.concatenate([ex_vecs, v])
    return ex_ids, ex_vecs


def _align_fields(r: dict) -> dict:
    """The columns clean.csv copies from align.csv."""
    return dict(source=r["source"], identity=r["identity"], face=r["face"], aligned=r["aligned"],
                x1=r.get("x1", ""), y1=r.get("y1", ""), x2=r.get("x2", ""), y2=r.get("y2", ""),
                primary=r.get("primary", ""), det_score=r.get("det_score", ""), sharpness=r.get("sharpness", ""))


def _face_rows(f: _Faces, res: CoreResult) -> list[dict]:
    """clean.csv's rows: the decided faces, then those without an embedding; sorted."""
    have = f.have
    out = []
    for i, r in enumerate(have):
        out.append(dict(
            _align_fields(r),
            decision=res.decision[i], reason=res.reason[i], score=format_float(float(res.score[i])),
            cluster=int(res.cluster[i]),
            duplicate_of=have[res.dup_of[i]]["aligned"] if res.dup_of[i] >= 0 else "",
            previous_decision="", previous_reason=""))
    for r in f.missing:
        out.append(dict(_align_fields(r), decision=C.DECISION_DROP, reason=R_NO_EMBEDDING,
                        score="", cluster=-1, duplicate_of="", previous_decision="", previous_reason=""))
    out.sort(key=lambda r: (r["identity"], r["source"], int(r["face"])))
    return out


def _identity_rows(images_by_id: dict, f: _Faces, res: CoreResult) -> list[dict]:
    """identities.csv's rows: every identity of align.csv, with or without faces."""
    ident_rows = []
    for nm in sorted(images_by_id):
        g = f.gid.get(nm)
        inf = res.identities[g] if g is not None else dict(faces=0, kept=0, dropped=0, review=0, duplicates=0,
                                                           not_subject=0, clusters=0, dominant_share=0.0,
                                                           flags=["no_faces"])
        sc = res.score[f.identity == g] if g is not None else np.zeros(0)
        kept_mask = np.array([res.decision[i] == C.DECISION_KEEP for i in np.nonzero(f.identity == g)[0]], bool) \
            if g is not None else np.zeros(0, bool)
        images = len(images_by_id[nm])
        noise = 1.0 - (inf["kept"] + inf["review"]) / images if images else 0.0
        ident_rows.append(dict(
            identity=nm, images=images, faces=inf["faces"], kept=inf["kept"], dropped=inf["dropped"],
            review=inf["review"], duplicates=inf["duplicates"], not_subject=inf["not_subject"],
            clusters=inf["clusters"], dominant_share=format_float(inf["dominant_share"]),
            noise=format_float(max(0.0, noise)),
            median_score=format_float(float(np.median(sc[kept_mask]))) if kept_mask.any() else "",
            flags=";".join(inf["flags"])))
    return ident_rows


def _summary(out: list, ident_rows: list, merge_rows: list, res: CoreResult, p: CleanParams, model: str,
             manual_kept: int, manual_lost: int) -> dict:
    """clean.json's summary (and run_clean's return value)."""
    counts = defaultdict(int)
    reasons = defaultdict(int)
    for r in out:
        counts[r["decision"]] += 1
        reasons[r["reason"]] += 1
    return dict(
        faces=len(out), identities=len(ident_rows),
        keep=counts[C.DECISION_KEEP], drop=counts[C.DECISION_DROP], review=counts[C.DECISION_REVIEW],
        review_share=round(counts[C.DECISION_REVIEW] / len(out), 4) if out else 0.0,
        manual_kept=manual_kept, manual_lost=manual_lost,
        reasons=dict(sorted(reasons.items())),
        ambiguous=sum(1 for r in ident_rows if "ambiguous" in r["flags"]),
        excluded=sum(1 for r in ident_rows if "excluded" in r["flags"]),
        merge_candidates=len(merge_rows), review_resolved_by_budget=res.review_resolved,
        model=model, thresholds={k: round(getattr(p, k), 4) for k in ("keep", "drop", "cw", "join", "dup",
                                                                       "merge", "exclude")},
        calibrated=bool(p.calibrated),
    )
