"""The clean stage on a folder OUT: read align.csv and the embedding store, decide
keep / drop / review for every aligned face, write clean.csv, identities.csv,
merges.csv and clean.json (:func:`run_clean`; a packed DEST goes to
:mod:`facecurate.clean.clean_rec`).

The algorithm lives in its own modules: :mod:`facecurate.clean.clean_params` (thresholds,
model-aware defaults), :mod:`facecurate.clean.clean_identity` (per identity: clusters,
robust centre, subject per photo, thresholds, near-duplicates),
:mod:`facecurate.clean.clean_cohort` (score offsets measured on the dataset, calibration),
:mod:`facecurate.clean.similar` (pairs above a threshold: merge candidates) and
:mod:`facecurate.clean.clean_core` (all of it on arrays over a process pool, then
exclusion, too few photos, the review budget and merges). This module holds the
file side: the store, ``--exclude``, the crops' pixel check (:class:`CropSimilarity`),
the manual decisions carried over from a previous clean.csv, and the outputs.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from facecurate.common import constants as C
from facecurate.clean.clean_cohort import calibrate
from facecurate.clean.clean_common import (CropSimilarity, clean_summary, clean_versions, flag_counts, identity_row,
                                          kept_medians)
from facecurate.clean.clean_core import CoreResult, clean_core
from facecurate.clean.clean_inputs import embed_images, exclusions, failed_keys, model_name, read_exclude, store_runtime
from facecurate.clean.clean_params import R_MANUAL, R_NO_EMBEDDING, CleanParams, check_cosines, default_params
from facecurate.clean.clean_rec import run_clean_rec
from facecurate.common.manifests import AlignRow, CleanRow, IdentityRow, MergeRow
from facecurate.common.recdata import is_rec_dataset
from facecurate.clean.similar import similar_pairs
from facecurate.clean.vectors import normalize
from facecurate.common.workspace import Workspace
from facecurate.embed.embed import load_store, run_embed, store_dtype


__all__ = ["CleanParams", "CoreResult", "CropSimilarity", "clean_core", "default_params", "embed_images",
           "read_exclude", "run_clean", "similar_pairs", "store_index"]


def store_index(out_dir: Path):
    """(vectors, memory-mapped; {aligned: row}; meta) of OUT's embedding store, read by
    :func:`facecurate.embed.load_store`; None when OUT has no store."""
    store = load_store(out_dir, mmap=True, missing_ok=True)
    if store is None:
        return None
    vecs, rows, meta = store
    return vecs, {r.aligned: i for i, r in enumerate(rows)}, meta


def ensure_embeddings(out_dir: Path, rows: Sequence[AlignRow], runtime: str = "auto"):
    """The store, embedding with the default model first when crops are missing from it
    (crops the embed stage recorded as failed are not retried here). An existing store
    is continued on its own runtime and dtype; ``runtime`` applies to a new one."""
    store = store_index(out_dir)
    need = {r.aligned for r in rows}
    if store is None or not need.issubset(set(store[1]) | failed_keys(store[2])):
        # continue an existing (default-model) store with its own settings
        kw = {}
        if store is not None:
            runtime = store_runtime(store[2])
            kw = dict(flip=bool(store[2].get("flip", True)), dtype=store_dtype(store[2]))
        run_embed(out_dir, runtime=runtime, **kw)
        store = store_index(out_dir)
    if store is None:
        raise RuntimeError(f"{out_dir}: no embedding store after embedding")
    return store


def _carry_manual(ws: Workspace, out: list[CleanRow]) -> tuple[list[CleanRow], int, int]:
    """``out`` with the manual decisions of the previous clean.csv (same crop, same
    identity). Returns (rows, carried over, lost: their crop is gone)."""
    if not ws.has(C.CLEAN_CSV):
        return out, 0, 0
    manual = {(r.aligned, r.identity): r.decision for r in ws.clean_rows() if r.reason == R_MANUAL}
    kept = 0
    rows = []
    for r in out:
        d = manual.get((r.aligned, r.identity))
        if d in (C.DECISION_KEEP, C.DECISION_DROP):
            r = r.manual(d)
            kept += 1
        rows.append(r)
    return rows, kept, len(manual) - kept


@dataclass
class _Faces:
    """align.csv's faces as :func:`clean_core`'s arrays: the rows with an embedding in
    stable order (identity, source, face) and the rows without one."""

    have: list[AlignRow]  # rows with an embedding; row i is face i of the arrays
    missing: list[AlignRow]  # rows whose crop has no embedding
    names: list  # identity names with faces, sorted: identity number -> name
    gid: dict  # name -> identity number
    emb: np.ndarray
    identity: np.ndarray
    photo: np.ndarray
    face_size: np.ndarray
    sharpness: np.ndarray
    blockiness: np.ndarray  # NaN where align did not record it
    flat: np.ndarray  # align's flat_share; NaN where not recorded
    quality: np.ndarray


def run_clean(out_dir, *, model_overrides: dict | None = None, calibrate_far: float | None = None,
              exclude: Sequence[str | os.PathLike] = (), max_review: float | None = None,
              min_images: int | None = None, min_face: float | None = None, ambiguous: str | None = None,
              keep_manual: bool = True, show_progress: bool = True, runtime: str = "auto",
              workers: int | None = None, shard_faces: int | None = None, engine="local",
              ray_address: str | None = None, part=None) -> dict:
    """Read OUT/align.csv and the embedding store; write clean.csv, identities.csv,
    merges.csv and clean.json. Returns the summary.

    ``keep_manual``: a face whose decision came from a review (reason ``manual`` in
    the existing clean.csv) keeps it; the decision computed now is recorded in
    ``previous_decision``/``previous_reason``, as ``review apply`` does. ``workers``:
    processes for the per-identity work (default: all cores); the outputs depend
    neither on it nor on ``shard_faces`` (see ``clean_core``). ``engine`` (local or ray),
    ``ray_address`` and ``part`` (K/N) run a packed dataset's clean sharded
    (:mod:`facecurate.clean.staged`); a folder OUT is cleaned in this process."""
    out_dir = Path(out_dir)
    check_cosines(model_overrides or {})  # before anything is embedded
    if is_rec_dataset(out_dir):  # a packed dataset: identities are labels (facecurate.clean.clean_rec)
        return run_clean_rec(out_dir, model_overrides=model_overrides, calibrate_far=calibrate_far,
                             exclude=exclude, max_review=max_review, min_images=min_images, min_face=min_face,
                             ambiguous=ambiguous, keep_manual=keep_manual, show_progress=show_progress,
                             workers=workers, shard_faces=shard_faces, runtime=runtime, engine=engine,
                             ray_address=ray_address, part=part)
    if part is not None or engine != "local":
        raise ValueError(f"{out_dir}: --engine ray and --part are for a packed dataset (DEST with train.rec); "
                         "a folder OUT is cleaned in one process (its --workers share the work)")
    ws = Workspace(out_dir)
    all_rows, rows = _read_align(ws)
    images_by_id = defaultdict(set)
    for r in all_rows:
        images_by_id[r.identity].add(r.source)
    vecs, where, meta = ensure_embeddings(out_dir, rows, runtime) if rows else (np.zeros((0, 128), np.float32), {}, {})
    model = model_name(meta)
    ov = dict(model_overrides or {})
    ov.update(max_review=max_review, min_images=min_images, min_face=min_face, ambiguous=ambiguous)
    p = default_params(model, **ov)
    f = _face_arrays(rows, vecs, where)
    if calibrate_far is not None and len(f.names) >= 2:
        p = calibrate(f.emb, f.identity, f.photo, p, calibrate_far)
    ex_ids, ex_vecs = exclusions(exclude, f.names, meta, runtime)
    res = clean_core(f.emb, f.identity, f.photo, f.quality, p, face_size=f.face_size, sharpness=f.sharpness,
                     blockiness=f.blockiness, flat_share=f.flat,
                     excluded=ex_ids, exclude_vecs=ex_vecs,
                     pixel_sim=CropSimilarity([out_dir / r.aligned for r in f.have]),
                     show_progress=show_progress, workers=workers, shard_faces=shard_faces)
    out = _face_rows(f, res)
    out, manual_kept, manual_lost = _carry_manual(ws, out) if keep_manual else (out, 0, 0)
    ident_rows = _identity_rows(images_by_id, f, res)
    merge_rows = [MergeRow(a=f.names[a], b=f.names[b], similarity=float(s)) for a, b, s in res.merges]
    ws.remove_stale_temps(C.CLEAN_OUTPUTS)
    ws.write_clean(out)
    ws.write_identities(ident_rows)
    ws.write_merges(merge_rows)
    summary = clean_summary(len(out), Counter(r.decision for r in out), Counter(r.reason for r in out),
                            len(ident_rows), flag_counts(ident_rows), merge_rows, res.review_resolved, p, model,
                            manual_kept, manual_lost, quality=res.quality)
    ws.write_clean_meta(dict(summary=summary, params=p.as_dict(), versions=clean_versions()))
    return summary


def _read_align(ws: Workspace) -> tuple[list[AlignRow], list[AlignRow]]:
    """(every row of align.csv with an identity, those of them with a crop)."""
    # A file directly under RAW (identity "") is recorded by align but belongs to no identity.
    all_rows = [r for r in ws.align_rows() if r.identity]
    return all_rows, [r for r in all_rows if r.aligned]


def _order(r: AlignRow | CleanRow) -> tuple:
    """clean's order of faces: identity, source, face."""
    return r.identity, r.source, -1 if r.face is None else r.face


def _face_arrays(rows: list, vecs: np.ndarray, where: dict) -> _Faces:
    """The crops' rows (sorted here: identity, source, face) as arrays: unit vectors
    (float32, whatever the store's dtype),
    identity and photo numbers, face size, sharpness, blockiness, flat share and the duplicate-choice quality."""
    rows.sort(key=_order)
    have = [r for r in rows if r.aligned in where]
    missing = [r for r in rows if r.aligned not in where]
    names = sorted({r.identity for r in have})
    gid = {nm: i for i, nm in enumerate(names)}
    emb = normalize(np.asarray(vecs[[where[r.aligned] for r in have]], np.float32)) if have else \
        np.zeros((0, vecs.shape[1] if vecs.ndim == 2 else 128), np.float32)
    identity = np.array([gid[r.identity] for r in have], np.int64)
    srcs = {}
    photo = np.array([srcs.setdefault(r.source, len(srcs)) for r in have], np.int64)
    fsize = np.array([r.face_size for r in have], np.float32)
    sharp = np.array([r.sharpness for r in have], np.float32)
    fsize[np.isnan(fsize)] = 0.0  # not recorded: 0
    sharp[np.isnan(sharp)] = 0.0
    blocky = np.array([r.blockiness for r in have], np.float32)
    flat = np.array([r.flat_share for r in have], np.float32)
    quality = fsize * 1000.0 + np.minimum(sharp, 999.0)
    return _Faces(have, missing, names, gid, emb, identity, photo, fsize, sharp, blocky, flat, quality)


def _clean_row(r: AlignRow, **decided) -> CleanRow:
    """A clean.csv row: the columns clean copies from align.csv, and ``decided``."""
    return CleanRow(source=r.source, identity=r.identity, face=r.face, aligned=r.aligned, x1=r.x1, y1=r.y1,
                    x2=r.x2, y2=r.y2, primary=r.primary, det_score=r.det_score, sharpness=r.sharpness, **decided)


def _face_rows(f: _Faces, res: CoreResult) -> list[CleanRow]:
    """clean.csv's rows: the decided faces, then those without an embedding; sorted."""
    have = f.have
    out = [_clean_row(r, decision=res.decision[i], reason=res.reason[i], score=float(res.score[i]),
                      cluster=int(res.cluster[i]), duplicate_of=have[d].aligned if (d := res.dup_of[i]) >= 0 else "")
           for i, r in enumerate(have)]
    out += [_clean_row(r, decision=C.DECISION_DROP, reason=R_NO_EMBEDDING, cluster=-1) for r in f.missing]
    out.sort(key=_order)
    return out


def _identity_rows(images_by_id: dict, f: _Faces, res: CoreResult) -> list[IdentityRow]:
    """identities.csv's rows: every identity of align.csv, with or without faces."""
    medians = kept_medians(f.identity, res, len(f.names))
    rows = []
    for nm in sorted(images_by_id):
        g = f.gid.get(nm)
        rows.append(identity_row(nm, len(images_by_id[nm]), res.identities[g] if g is not None else None,
                                 medians[g] if g is not None else float("nan")))
    return rows
