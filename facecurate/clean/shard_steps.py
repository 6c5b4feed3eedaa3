"""The per-shard steps of the sharded clean of a packed dataset
(:mod:`facecurate.clean.staged`), as run by a worker of any engine.

A shard is a run of whole identities: faces ``lo .. hi`` of the face table (faces in
key order, identities contiguous). Each step reads what it needs (the shard's rows of
the memory-mapped store, the face table, the earlier steps' files of the same shard
and the small global files) and writes one ``.npz`` per shard under its own folder
of the work folder; the engine's runner then writes the shard's record. The steps are
the functions :func:`facecurate.clean.clean_core.clean_core` runs on a whole dataset,
applied to one shard, so the results have the same bits:

1. ``analyse``: clusters, robust centre, subject faces (clean_batch.analyse_rows);
2. ``cohort``: each face's mean similarity to its nearest cohort centres, computed on
   whole 4096-row blocks of the face order (the rows of a block outside the shard are
   read too) as clean_cohort does in one process;
3. ``decide``: score offsets, thresholds, duplicates, the look-alike margin, then
   exclusion, too few photos, lost identities and occluded faces (whole identities),
   the kept centres, and the faces the review budget may change;
4. ``write``: the budget's changes applied, the per-identity counts and the shard's
   rows of clean.csv (no header), which the driver joins.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facecurate.clean.clean_batch import analyse_rows
from facecurate.clean.clean_cohort import CohortPlan, cohort_means, face_offsets
from facecurate.clean.clean_core import BELOW_DROP, decide_shard, finish_identities, near_other
from facecurate.clean.clean_params import DECISIONS, DROP, KEEP, R_DUPLICATE, R_NOT_SUBJECT, RC, REASONS, REVIEW, \
    CleanParams
from facecurate.clean.rec_records import RecCropSimilarity
from facecurate.clean.vectors import add_at_rows, all_unit, normalize
from facecurate.common import constants as C
from facecurate.common.files import csv_cell, write_bytes_atomic
from facecurate.engines.local import SharedArray

#: the steps, in order; each has a folder of per-shard files in the work folder
STEPS = ("analyse", "cohort", "decide", "write")
#: rows per block of the cohort search (clean_cohort.cohort_means' default)
COHORT_BLOCK = 4096
#: identity flags, in the order clean_core appends them (identities.csv keeps it)
FLAG_ORDER = (C.FLAG_AMBIGUOUS, C.FLAG_EXCLUDED, C.FLAG_TOO_FEW, C.FLAG_LOST, C.FLAG_WEAK, C.FLAG_MERGE_CANDIDATE)


@dataclass(frozen=True)
class Layout:
    """Where a worker finds everything (paths every node must see) and the settings."""

    dest: str  # the packed dataset's folder
    work: str  # DEST/.facecurate/clean/<settings digest>
    tables: str  # the face table's folder (DEST/.facecurate/clean/table-<store digest>)
    store: str  # embeddings.npy
    rec: str  # train.rec
    faces: int  # faces (embedded image records), in key order
    identities: int
    dim: int
    normalize: bool  # rows are renormalised (the store is not all unit rows in key order)
    params: CleanParams
    offsets: bool  # score offsets are computed (clean_core's condition)
    write_key: str  # digest of what only the write step reads (manual decisions, label names)
    show: bool = True  # progress bars in the driver (not part of what the workers compute)

    def table(self, name: str) -> Path:
        return Path(self.tables) / f"{name}.npy"

    def step_dir(self, step: str) -> Path:
        """A step's folder of per-shard files and records; the write step's is named by
        ``write_key``, so that new manual decisions or names redo only that step."""
        return Path(self.work) / (f"{step}-{self.write_key}" if step == "write" else step)

    def step_file(self, step: str, index: int) -> Path:
        return self.step_dir(step) / f"shard_{index:06d}.npz"

    def global_file(self, name: str) -> Path:
        return Path(self.work) / f"{name}.npz"


def read_rows(lay: Layout, lo: int, hi: int) -> np.ndarray:
    """Faces lo..hi (the store's rows lo..hi) as float32 rows, renormalised when the
    layout says so; read, not kept mapped."""
    vecs = np.load(lay.store, mmap_mode="r")
    x = np.array(vecs[lo:hi], np.float32)
    del vecs
    return normalize(x) if lay.normalize else x


def read_table(lay: Layout, name: str, lo: int, hi: int) -> np.ndarray:
    return np.array(np.load(lay.table(name), mmap_mode="r")[lo:hi])


def save(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


def load(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_global(lay: Layout, name: str) -> dict:
    return load(lay.global_file(name))


def cohort_plan(g: dict) -> CohortPlan:
    """The CohortPlan saved in the global file of step 1 (:func:`save_plan`)."""
    partners: dict = {}
    for a, b in zip(g["partner_a"].tolist(), g["partner_b"].tolist()):
        partners.setdefault(a, []).append(b)
    has = bool(g["has_cohort"])
    return CohortPlan(partners, g["cohort_centres"] if has else None, g["cohort_pos"] if has else None,
                      int(g["kk"]), g["per"] if bool(g["has_per"]) else None,
                      g["dev"] if bool(g["has_dev"]) else None)


def plan_arrays(plan: CohortPlan, k: int) -> dict:
    """A CohortPlan as arrays for :func:`save` (partners in insertion order)."""
    pa, pb = [], []
    for a, hs in plan.partners.items():
        for b in hs:
            pa.append(a)
            pb.append(b)
    z = np.zeros(0)
    return dict(partner_a=np.asarray(pa, np.int64), partner_b=np.asarray(pb, np.int64),
                has_cohort=np.bool_(plan.centres is not None),
                cohort_centres=plan.centres if plan.centres is not None else np.zeros((0, 1), np.float32),
                cohort_pos=plan.pos if plan.pos is not None else np.zeros(0, np.int64), kk=np.int64(plan.kk),
                has_per=np.bool_(plan.per is not None), per=plan.per if plan.per is not None else z,
                has_dev=np.bool_(plan.dev is not None), dev=plan.dev if plan.dev is not None else z)


class CleanShardWorker:
    """One step of the sharded clean, for any shard (built once per worker process)."""

    def __init__(self, lay: Layout, step: str):
        self.lay, self.step = lay, step
        self._globals: dict = {}

    def _global(self, name: str) -> dict:
        if name not in self._globals:
            self._globals[name] = load_global(self.lay, name)
        return self._globals[name]

    def run(self, shard) -> dict:
        lo, hi = shard.items.start, shard.items.stop
        return getattr(self, f"_{self.step}")(shard.index, lo, hi)

    # ------------------------------------------------------------------ steps
    def _bounds(self, lo: int, hi: int) -> tuple:
        ident = read_table(self.lay, "identity", lo, hi)
        g0 = int(ident[0])
        local = ident - g0
        b = np.r_[0, np.cumsum(np.bincount(local))].astype(np.int64)
        return ident, local, g0, b

    def _analyse(self, index: int, lo: int, hi: int) -> dict:
        lay = self.lay
        E = read_rows(lay, lo, hi)
        _, _, _, b = self._bounds(lo, hi)
        blk = analyse_rows(E, np.arange(hi - lo), np.arange(lo, hi, dtype=np.int64), b, lay.params)
        unit = all_unit(E)
        save(lay.step_file("analyse", index), unit=np.bool_(unit), **blk)
        return dict(faces=hi - lo, identities=len(b) - 1, unit=unit)

    def _cohort(self, index: int, lo: int, hi: int) -> dict:
        lay = self.lay
        plan = cohort_plan(self._global("global1"))
        a = (lo // COHORT_BLOCK) * COHORT_BLOCK
        b = min(lay.faces, -(-hi // COHORT_BLOCK) * COHORT_BLOCK)
        Q = read_rows(lay, a, b)
        own = read_table(lay, "identity", a, b).astype(np.int64)
        co, near = cohort_means(Q, own, plan, COHORT_BLOCK)
        co, near = co[lo - a:hi - a], near[lo - a:hi - a]
        blk = load(lay.step_file("analyse", index))
        inl = blk["subject"] & (blk["s"] >= lay.params.drop)
        save(lay.step_file("cohort", index), co=co, near=near, inl=inl)
        return dict(faces=hi - lo, inliers=int(inl.sum()))

    def _decide(self, index: int, lo: int, hi: int) -> dict:
        lay, p = self.lay, self.lay.params
        n = hi - lo
        E = read_rows(lay, lo, hi)
        ident, local, g0, b = self._bounds(lo, hi)
        J = len(b) - 1
        blk = load(lay.step_file("analyse", index))
        g1 = self._global("global1")
        plan = cohort_plan(g1)
        co = near = None
        if plan.centres is not None:
            c = load(lay.step_file("cohort", index))
            co, near = c["co"], c["near"]
        offset = None
        if lay.offsets:
            ref = float(self._global("global2")["ref"]) if (p.cohort and co is not None) else None
            offset = face_offsets(ident.astype(np.int64), co, ref, plan, p).astype(np.float32)
        offs = read_table(lay, "offset", lo, hi)
        pixel = RecCropSimilarity(lay.rec, offs.tolist())
        out = decide_shard(dict(E=SharedArray(E, None, E.dtype.str, E.shape), rows=np.arange(n), bounds=b,
                                 block=blk, quality=np.zeros(n, np.float32), p=p, face_size=None, offset=offset,
                                 pixel=pixel, global_pixel=False))
        dec, rea, score = out["decision"], out["reason"], out["score"]
        if near is not None and p.margin:
            near_other(dec, rea, blk["s"], near, p)
        info = [dict(faces=0, kept=0, dropped=0, review=0, duplicates=0, not_subject=0, clusters=0,
                     dominant_share=0.0, flags=[C.FLAG_AMBIGUOUS] if a else []) for a in blk["ambiguous"].tolist()]
        excluded = {int(g) - g0 for g in g1["excluded"].tolist() if g0 <= int(g) < g0 + J}
        finish_identities(local, np.arange(lo, hi, dtype=np.int64), dec, rea, score, p, info, excluded, pixel)
        kept = np.flatnonzero(dec == KEEP)
        sums = np.zeros((J, E.shape[1]), np.float64)
        if kept.size:
            add_at_rows(sums, local[kept], E, rows=kept)
        has = np.linalg.norm(sums, axis=1) > 0
        fin = normalize(np.where(has[:, None], sums, blk["centre"])).astype(np.float32)
        # the faces the review budget may change: every review, and the band below drop
        cand = np.flatnonzero((dec == REVIEW) | ((dec == DROP) & np.isin(rea, BELOW_DROP)
                                                 & (score >= p.drop - p.near_drop)))
        pos = out["dup_of"]
        dup = np.where(pos >= 0, pos + lo, -1)
        flags = np.array([_flag_bits(i["flags"]) for i in info], np.uint8)
        save(lay.step_file("decide", index), decision=dec, reason=rea, score=score, dup_of=dup, fin=fin, has=has,
             flags=flags, cand=cand + lo, cand_decision=dec[cand], cand_reason=rea[cand], cand_score=score[cand])
        return dict(faces=n, review=int((dec == REVIEW).sum()), candidates=int(cand.size))

    def _write(self, index: int, lo: int, hi: int) -> dict:
        lay = self.lay
        d = load(lay.step_file("decide", index))
        dec, rea, score, dup = d["decision"], d["reason"], d["score"], d["dup_of"]
        _, local, _, b = self._bounds(lo, hi)
        ch = self._global("global3")
        m = (ch["index"] >= lo) & (ch["index"] < hi)
        at = ch["index"][m] - lo
        dec[at], rea[at] = ch["decision"][m], ch["reason"][m]
        J = len(b) - 1
        counts = {name: np.bincount(local[mask], minlength=J).astype(np.int64) for name, mask in dict(
            faces=np.ones(hi - lo, bool), kept=dec == KEEP, review=dec == REVIEW, dropped=dec == DROP,
            duplicates=rea == RC[R_DUPLICATE], not_subject=rea == RC[R_NOT_SUBJECT]).items()}
        med = np.full(J, np.nan)
        for j in range(J):
            sc = score[b[j]:b[j + 1]][dec[b[j]:b[j + 1]] == KEEP]
            if sc.size:
                med[j] = float(np.median(sc))
        text, stats = self._csv_part(index, lo, hi, dec, rea, score, dup)
        write_bytes_atomic(lay.step_dir("write") / f"shard_{index:06d}.csv", text)
        save(lay.step_file("write", index), median=med, **counts)
        return stats

    def _csv_part(self, index: int, lo: int, hi: int, dec, rea, score, dup) -> tuple:
        """clean.csv's rows of this shard's records, in key order: its faces and the
        records without an embedding that fall in its key range (see staged.plan)."""
        lay = self.lay
        keys = read_table(lay, "key", lo, hi)
        labels = read_table(lay, "label", lo, hi)
        cluster = load(lay.step_file("analyse", index))["cluster"]
        fail = load_global(lay, "failed")
        fm = fail["shard"] == index
        fkeys, flabs = fail["key"][fm], fail["label"][fm]
        manual = json.loads((lay.step_dir("write") / "manual.json").read_text(encoding="utf-8"))
        names = json.loads((lay.step_dir("write") / "names.json").read_text(encoding="utf-8"))
        dup_keys = np.where(dup >= 0, _keys_at(lay, dup), -1)
        n_all = (hi - lo) + fkeys.size
        order = np.argsort(np.r_[keys, fkeys], kind="stable")
        pre = C.REC_KEY_PREFIX
        rows = []
        counts: dict = {}
        reasons: dict = {}
        kept_manual = 0
        for o in order.tolist():
            if o < hi - lo:
                k, lab = int(keys[o]), int(labels[o])
                d, r = DECISIONS[int(dec[o])], REASONS[int(rea[o])]
                s, c, u = float(score[o]), int(cluster[o]), int(dup_keys[o])
            else:
                k, lab = int(fkeys[o - (hi - lo)]), int(flabs[o - (hi - lo)])
                d, r, s, c, u = C.DECISION_DROP, C.REASON_NO_EMBEDDING, float("nan"), -1, -1
            pd = pr = ""
            mv = manual.get(f"{pre}{k}")
            if mv is not None:
                pd, pr, d, r = d, r, mv, C.REASON_MANUAL
                kept_manual += 1
            name = names.get(str(lab), str(lab)) if lab >= 0 else ""
            rows.append((k, lab, name, f"{pre}{k}", d, r, s, c, f"{pre}{u}" if u >= 0 else "", pd, pr))
            counts[d] = counts.get(d, 0) + 1
            reasons[r] = reasons.get(r, 0) + 1
        buf = io.StringIO(newline="")
        csv.writer(buf, lineterminator="\n").writerows([csv_cell(v) for v in r] for r in rows)
        return buf.getvalue().encode("utf-8"), dict(rows=n_all, decisions=counts, reasons=reasons,
                                                   manual_kept=kept_manual)


def _flag_bits(flags: list) -> int:
    bits = 0
    for f in flags:
        bits |= 1 << FLAG_ORDER.index(f)
    return bits


def flag_names(bits: int) -> list:
    return [f for i, f in enumerate(FLAG_ORDER) if bits >> i & 1]


def _keys_at(lay: Layout, idx: np.ndarray) -> np.ndarray:
    keys = np.load(lay.table("key"), mmap_mode="r")
    return np.array(keys[np.maximum(idx, 0)])


__all__ = ["STEPS", "Layout", "CleanShardWorker", "FLAG_ORDER", "flag_names", "plan_arrays", "cohort_plan",
           "read_rows", "save", "load"]
