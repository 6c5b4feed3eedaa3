"""``facecurate clean DEST`` where DEST holds a packed dataset (``train.rec`` + ``.idx``)
and the embedding store ``facecurate embed DEST/train.rec`` wrote beside it.

The same core as for folders (:func:`facecurate.clean.clean_core.clean_core`: robust centre,
Chinese whispers, cohort corrections, duplicates, merge candidates, ``--exclude``,
``--calibrate``), fed differently at the edges:

* the identities are the labels (a vector label's first value), named from the
  ``labels.csv`` beside the rec when there is one, else the label itself;
* every image record is one face of its own photo, so there is no subject choice and
  no bystander; align's face size and sharpness are unknown (no quality correction;
  the first of two duplicate copies in key order is kept);
* the pixel check of near-duplicates reads the two records' image bytes.

Rows are handled as numpy arrays, never one dict per record, and the vectors stay in
the memory-mapped store: clean.csv of millions of records is written from arrays.
Outputs: ``clean.csv`` (one row per image record, in key order:
``constants.REC_CLEAN_COLUMNS``), ``identities.csv``, ``merges.csv``, ``clean.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from facecurate.common import constants as C
from facecurate.clean.clean_common import clean_summary, clean_versions, flag_counts, identity_row, kept_medians
from facecurate.clean.clean_cohort import calibrate
from facecurate.clean.clean_core import clean_core
from facecurate.clean.clean_inputs import exclusions, model_name, store_runtime
from facecurate.clean.clean_params import default_params
from facecurate.common.files import format_float
from facecurate.common.manifests import IdentityRow, MergeRow
from facecurate.common.recdata import LABEL_RULE, KeyedRecords, int_label, read_label_names, read_layout, rec_key, \
    rec_paths
from facecurate.common.recordio import RecordIOError, read_idx_arrays
from facecurate.clean.vectors import all_unit, normalize
from facecurate.common.workspace import Workspace
from facecurate.clean.rec_records import RecCropSimilarity, labels_of
from facecurate.clean.staged import NotStageable, run_staged
from facecurate.embed.embed import run_embed, store_dtype


# ----------------------------------------------------------------------------- inputs
class RecFaces:
    """The image records of the store: ``keys``, ``labels``, ``rows`` (index into the
    store's vectors; -1 = not embedded), in key order; ``failed`` the store's reasons."""

    def __init__(self, keys: np.ndarray, labels: np.ndarray, rows: np.ndarray, failed: dict):
        self.keys, self.labels, self.rows, self.failed = keys, labels, rows, failed


def _store_keys(ws: Workspace) -> tuple[np.ndarray, np.ndarray]:
    """(record keys, labels) of the store's rows, in row order, from embeddings.csv
    (``aligned`` = rec:<key>, ``identity`` = the label), streamed as text."""
    keys, labels = [], []
    for aligned, ident in ws.store_columns("aligned", "identity"):
        k = rec_key(aligned)
        if k is None:
            raise ValueError(f"{ws.path(C.EMBEDDINGS_CSV)}: row {aligned!r} is not a record of a .rec (this store "
                             "was made from folders; run `facecurate embed DEST/train.rec`)")
        lab = int_label(ident)
        if lab < 0:  # embed fails such a record: a store that has one was made otherwise
            raise ValueError(f"{ws.path(C.EMBEDDINGS_CSV)}: row {aligned!r} has label {ident[:40]!r}, not "
                             f"{LABEL_RULE} (a crafted .rec or an old store; run `facecurate embed "
                             "DEST/train.rec --overwrite`)")
        keys.append(k)
        labels.append(lab)
    return np.asarray(keys, np.int64), np.asarray(labels, np.int64)


def ensure_embedded(dest: Path, rec_path: Path, runtime: str = "auto") -> Workspace:
    """DEST's workspace once its store holds every image record of the .rec: embedding
    the .rec first (default model, on ``runtime``) when the store is missing; a store
    that lacks records is continued with its own settings and runtime."""
    ws = Workspace(dest)
    if not ws.has(C.EMBEDDINGS_NPY):
        run_embed(rec_path, runtime=runtime)
    else:
        meta = ws.store_meta()
        if meta.get("input") == "rec" and int(meta.get("count", 0)) + len(meta.get("failed", [])) \
                < _image_records(rec_path):  # the rec has records the store lacks: continue it
            run_embed(rec_path, flip=bool(meta.get("flip", True)), runtime=store_runtime(meta),
                      dtype=store_dtype(meta))
    meta = ws.store_meta()
    if meta.get("input") not in (None, "rec"):
        raise ValueError(f"{dest}: the embedding store was made from {meta.get('input')!r} input, not this .rec "
                         f"(run `facecurate embed {rec_path} --overwrite`)")
    return ws


def ensure_store(dest: Path, rec_path: Path, runtime: str = "auto"):
    """(vectors memory-mapped, meta, RecFaces), embedding the .rec first (default
    model, on ``runtime``) when the store is missing; a store that lacks records is
    continued with its own settings and runtime."""
    ws = ensure_embedded(dest, rec_path, runtime)
    vecs = ws.store_vectors(mmap=True)
    meta = ws.store_meta()
    keys, labels = _store_keys(ws)
    ws.check_store_rows(keys.size, len(vecs))
    failed = {rec_key(f.get("aligned", "")): f.get("reason", "") for f in meta.get("failed", [])
              if isinstance(f, dict) and rec_key(f.get("aligned", "")) is not None}
    fk = sorted(set(failed) - set(keys.tolist()))
    all_keys = np.concatenate([keys, np.asarray(fk, np.int64)])
    all_labels = np.concatenate([labels, np.asarray(labels_of(rec_path, fk), np.int64)])
    rows = np.concatenate([np.arange(keys.size, dtype=np.int64), np.full(len(fk), -1, np.int64)])
    order = np.argsort(all_keys, kind="stable")
    return vecs, meta, RecFaces(all_keys[order], all_labels[order], rows[order], failed)


def _image_records(rec_path: Path) -> int:
    """How many image records the .idx names (the layout rule of recdata)."""
    keys, offs = read_idx_arrays(rec_paths(rec_path)[1])
    k0 = np.flatnonzero(keys == 0)
    try:
        with open(rec_path, "rb") as f:
            layout = read_layout(f, int(offs[k0[0]]) if k0.size else None, int(keys.size))
    except RecordIOError as e:
        raise ValueError(f"{rec_path}: corrupt .rec at {e} (run `facecurate inspect` for details)") from None
    if not layout.has_header:
        return int(keys.size)
    return int(np.count_nonzero((keys >= 1) & (keys < layout.first)))


# ----------------------------------------------------------------------------- run
def _unit_rows(vecs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The vectors of ``rows``, float32: the memory-mapped store itself when the rows are
    all of it in order and of unit length (the common case: no copy; a float16 store
    cast whole), else a normalised copy."""
    if rows.size == len(vecs) and np.array_equal(rows, np.arange(rows.size)):
        ok = all(all_unit(vecs[lo:lo + 65536]) for lo in range(0, len(vecs), 65536))
        if ok:
            return np.asarray(vecs, np.float32)
    return normalize(np.asarray(vecs[rows], np.float32))


def _previous_manual(ws: Workspace) -> dict[str, str]:
    """aligned -> keep/drop of the rows a review decided in the previous clean.csv."""
    if not ws.has(C.CLEAN_CSV):
        return {}
    return {r.aligned: r.decision for r in ws.stream_clean()()
            if r.reason == C.REASON_MANUAL and r.decision in (C.DECISION_KEEP, C.DECISION_DROP)}


def run_clean_rec(dest, *, model_overrides: dict | None = None, calibrate_far: float | None = None,
                  exclude: Sequence[str | os.PathLike] = (), max_review: float | None = None,
                  min_images: int | None = None, min_face: float | None = None, ambiguous: str | None = None,
                  keep_manual: bool = True, show_progress: bool = True, runtime: str = "auto",
                  engine="local", ray_address: str | None = None, part=None, sharded: bool = True,
                  on_shard=None, **core_kw) -> dict:
    """Clean the image records of ``dest/train.rec`` (see the module); returns the summary.
    Without ``--calibrate`` it runs sharded (:mod:`facecurate.clean.staged`: bounded
    memory, ``engine`` local or ray, ``part`` K/N) when the store's rows are in key order
    with each label's records together (as embed writes them for a packed dataset);
    ``sharded=False`` runs everything in this process (clean_core on all faces at once).
    ``runtime``: dlib's model on dlib or ONNX Runtime, for a store made here and for the
    faces of an ``--exclude`` .bin; ``core_kw``: clean_core's options (workers, shard_faces)."""
    dest = Path(dest)
    rec_path, _idx = rec_paths(dest)
    label_names = read_label_names(rec_path) or {}
    ov = dict(model_overrides or {})
    ov.update(max_review=max_review, min_images=min_images, min_face=min_face, ambiguous=ambiguous)
    if calibrate_far is None and sharded:  # the sharded run (facecurate.clean.staged), when the store's order allows it
        ws = ensure_embedded(dest, rec_path, runtime)
        meta = ws.store_meta()
        model = model_name(meta)
        try:
            return run_staged(dest, rec_path, default_params(model, **ov), model, label_names,
                              lambda names: exclusions(exclude, names, meta, runtime), engine=engine,
                              workers=core_kw.get("workers"), ray_address=ray_address, part=part,
                              shard_faces=core_kw.get("shard_faces"), show_progress=show_progress,
                              previous_manual=_previous_manual(ws) if keep_manual else {},
                              on_shard=on_shard)
        except NotStageable:
            if part is not None or engine != "local":
                raise ValueError(f"{dest}: the store's rows are not in key order with each label's records "
                                 "together, which the sharded clean (--engine ray, --part) needs; run "
                                 "`facecurate embed DEST/train.rec --overwrite`, or clean it locally") from None
    elif part is not None or engine != "local":
        raise ValueError("--calibrate runs in one process: leave out --engine ray and --part")
    vecs, meta, faces = ensure_store(dest, rec_path, runtime)
    model = model_name(meta)
    p = default_params(model, **ov)
    have = np.flatnonzero((faces.rows >= 0) & (faces.labels >= 0))
    ulabs, identity = np.unique(faces.labels[have], return_inverse=True)
    identity = identity.astype(np.int64)
    names = [label_names.get(int(lab), str(int(lab))) for lab in ulabs]
    dim = vecs.shape[1] if vecs.ndim == 2 else int(meta.get("dim", 128))
    emb = _unit_rows(vecs, faces.rows[have]) if have.size else np.zeros((0, dim), np.float32)
    photo = np.arange(have.size, dtype=np.int64)  # every record is its own photo
    quality = np.zeros(have.size, np.float32)  # face size and sharpness are not in a .rec
    if calibrate_far is not None and len(names) >= 2:
        p = calibrate(emb, identity, photo, p, calibrate_far)
    ex_ids, ex_vecs = exclusions(exclude, names, meta, runtime)
    kr = KeyedRecords(rec_path)
    pos = np.searchsorted(kr.keys, faces.keys[have])
    offsets = kr.offsets[np.minimum(pos, max(kr.keys.size - 1, 0))]
    res = clean_core(emb, identity, photo, quality, p, excluded=ex_ids, exclude_vecs=ex_vecs,
                     pixel_sim=RecCropSimilarity(rec_path, offsets.tolist()), show_progress=show_progress,
                     **{k: v for k, v in core_kw.items() if v is not None})
    Workspace(dest).remove_stale_temps(C.CLEAN_OUTPUTS)
    rows, counts, reasons, manual = _write_clean_csv(dest, faces, have, res, label_names, keep_manual)
    ident_rows = _identity_rows(faces, identity, ulabs, names, res, label_names)
    merge_rows = [MergeRow(a=names[a], b=names[b], similarity=float(s)) for a, b, s in res.merges]
    ws = Workspace(dest)
    ws.write_identities(ident_rows)
    ws.write_merges(merge_rows)
    summary = dict(input="rec", **clean_summary(rows, counts, reasons, len(ident_rows), flag_counts(ident_rows),
                                                merge_rows, res.review_resolved, p, model, *manual))
    ws.write_clean_meta(dict(summary=summary, params=p.as_dict(), versions=clean_versions()))
    return summary


def _write_clean_csv(dest: Path, faces: RecFaces, have: np.ndarray, res, label_names: dict,
                     keep_manual: bool):
    """clean.csv, one row per image record in key order, written from arrays. Returns
    (rows, counts by decision, counts by reason, (manual kept, manual lost))."""
    n = faces.keys.size
    dec = np.full(n, C.DECISION_DROP, dtype=object)
    rea = np.full(n, C.REASON_NO_EMBEDDING, dtype=object)
    score = np.full(n, np.nan)
    cluster = np.full(n, -1, np.int64)
    dup = np.full(n, -1, np.int64)
    if have.size:
        dec[have] = np.asarray(res.decision, dtype=object)
        rea[have] = np.asarray(res.reason, dtype=object)
        score[have] = res.score
        cluster[have] = res.cluster
        d = np.asarray(res.dup_of, np.int64)
        dup[have] = np.where(d >= 0, faces.keys[have][np.maximum(d, 0)], -1)
    manual = _previous_manual(Workspace(dest)) if keep_manual else {}
    prev_d = np.full(n, "", dtype=object)
    prev_r = np.full(n, "", dtype=object)
    kept_manual = 0
    if manual:
        for i, k in enumerate(faces.keys.tolist()):
            m = manual.get(f"{C.REC_KEY_PREFIX}{k}")
            if m is not None:
                prev_d[i], prev_r[i] = dec[i], rea[i]
                dec[i], rea[i] = m, C.REASON_MANUAL
                kept_manual += 1
    names = {}

    def name(lab: int) -> str:
        s = names.get(lab)
        if s is None:
            s = names[lab] = label_names.get(lab, str(lab)) if lab >= 0 else ""
        return s
    pre = C.REC_KEY_PREFIX
    out = ((k, lab, name(lab), f"{pre}{k}", d, r, format_float(s), c, f"{pre}{u}" if u >= 0 else "", pd, pr)
           for k, lab, d, r, s, c, u, pd, pr in zip(faces.keys.tolist(), faces.labels.tolist(), dec, rea,
                                                     score.tolist(), cluster.tolist(), dup.tolist(), prev_d, prev_r))
    Workspace(dest).write_clean(out, C.REC_CLEAN_COLUMNS)
    u, c = np.unique(dec.astype(str), return_counts=True) if n else ([], [])
    counts = {C.DECISION_KEEP: 0, C.DECISION_DROP: 0, C.DECISION_REVIEW: 0}
    counts.update(dict(zip(u.tolist() if n else [], c.tolist() if n else [])))
    ur, cr = np.unique(rea.astype(str), return_counts=True) if n else ([], [])
    reasons = dict(zip(ur.tolist() if n else [], cr.tolist() if n else []))
    return n, counts, reasons, (kept_manual, len(manual) - kept_manual)


def _identity_rows(faces: RecFaces, identity: np.ndarray, ulabs: np.ndarray, names: list,
                   res, label_names: dict) -> list[IdentityRow]:
    """identities.csv rows: every label of the .rec's image records (records = images)."""
    labs_all, images = np.unique(faces.labels[faces.labels >= 0], return_counts=True)
    g_of = {int(lab): g for g, lab in enumerate(ulabs.tolist())}
    medians = kept_medians(identity, res, len(names))
    out = []
    for lab, n_img in zip(labs_all.tolist(), images.tolist()):
        g = g_of.get(lab)
        out.append(identity_row(label_names.get(lab, str(lab)), n_img, res.identities[g] if g is not None else None,
                                medians[g] if g is not None else float("nan")))
    return out
