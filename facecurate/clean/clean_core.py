"""clean on arrays (:func:`clean_core`): the per-identity work in shards of
identities on a process pool (analyse, score offsets, decide), then the
cross-identity tail: exclusion, too few photos, the review budget, merge candidates
and per-identity counts. Deterministic for any number of workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from facecurate.common import constants as C
from facecurate.clean.clean_batch import analyse_rows, decide_rows
from facecurate.clean.clean_cohort import score_offsets
from facecurate.clean.clean_identity import Analysis, decide_identity
from facecurate.clean.clean_params import (
    DECISIONS, DROP, KEEP, R_BAND, R_CANDIDATE, R_DUPLICATE, R_EXCLUDED, R_FAR, R_MINORITY, R_NEAR_OTHER,
    R_NOT_SUBJECT, R_OCCLUDED, R_TOO_FEW, RC, REASONS, REVIEW, CleanParams,
)
from facecurate.engines.local import LocalPool, default_workers
from facecurate.common.files import progress
from facecurate.clean.similar import similar_pairs
from facecurate.clean.vectors import add_at_rows, group_by_label, normalize


@dataclass
class CoreResult:
    decision: list
    reason: list
    score: np.ndarray
    cluster: np.ndarray
    dup_of: np.ndarray  # global index of the kept copy, -1 none
    identities: list  # per identity dict
    centres: np.ndarray  # (n_identities, d)
    merges: list  # (a, b, sim) identity indices
    review_resolved: int
    quality: dict = field(default_factory=dict)  # per low-quality group: faces, inliers, lift (folder flow)


def clean_core(emb: np.ndarray, identity: np.ndarray, photo: np.ndarray, quality: np.ndarray,
               p: CleanParams, *, face_size: np.ndarray | None = None, sharpness: np.ndarray | None = None,
               blockiness: np.ndarray | None = None, flat_share: np.ndarray | None = None,
               excluded: Iterable[int] = (),
               exclude_vecs: np.ndarray | None = None, pixel_sim: Callable[[int, int], float] | None = None,
               show_progress: bool = False, workers: int | None = 1, shard_faces: int | None = None) -> CoreResult:
    """clean on arrays: ``identity`` (n,) ints 0..k-1, ``photo`` (n,) ints (unique per
    photo across the whole set), ``quality`` (n,) floats; ``pixel_sim(i, j)`` compares
    two faces' crops (confirms near-duplicates; see ``facecurate.clean.CropSimilarity``). Deterministic:
    the same result for any number of ``workers`` (processes for the per-identity work
    and the cohort statistics; None: all cores); ``shard_faces``: faces per shard of
    identities (default: about 16 shards per worker, at least 256 faces)."""
    n = len(emb)
    emb = np.ascontiguousarray(emb, np.float32)
    identity = np.asarray(identity, np.int64)
    photo, quality = np.asarray(photo), np.asarray(quality)
    k = int(identity.max()) + 1 if n else 0
    d = emb.shape[1] if emb.ndim == 2 else 0
    excluded = set(int(e) for e in excluded)
    groups = group_by_label(identity) if n else {}
    keys = sorted(groups)
    shards = _identity_shards(keys, groups, default_workers() if workers is None else workers, shard_faces)
    bar = dict(unit="shard", disable=None if show_progress else True)
    with LocalPool(workers) as pool:
        E = pool.share(emb)
        # 1-3 per identity, once: nothing there depends on the offsets or the crops
        tasks = [dict(E=E, rows=rows, bounds=b, photo=photo[rows], p=p, d=d) for rows, b, _ in shards]
        blocks = list(progress(_largest_first(pool, _analyse_shard, tasks), total=len(tasks), desc="clean (centres)",
                               **bar))
        raw, subject, cluster = (np.zeros(n, np.float32), np.zeros(n, bool), np.full(n, -1, np.int64))
        centres = np.zeros((k, d), np.float32)
        med = np.full(k, np.nan)
        info = [dict(faces=0, kept=0, dropped=0, review=0, duplicates=0, not_subject=0, clusters=0,
                     dominant_share=0.0, flags=[]) for _ in range(k)]
        for (rows, _, ks), blk in zip(shards, blocks):
            raw[rows], subject[rows], cluster[rows] = blk["s"], blk["subject"], blk["cluster"]
            centres[ks] = blk["centre"]
            med[ks] = blk["median"]
            for g, nc, ds, amb in zip(ks.tolist(), blk["nclus"].tolist(), blk["dominant_share"].tolist(),
                                      blk["ambiguous"].tolist()):
                info[g].update(clusters=nc, dominant_share=ds)
                if amb:
                    info[g]["flags"].append(C.FLAG_AMBIGUOUS)
        offset = nearest = None
        quality_report: dict = {}
        if n and (p.cohort or p.cohort_centre or p.margin or p.spread or sharpness is not None):
            offset, nearest = score_offsets(emb, identity, raw, subject & (raw >= p.drop), centres,
                                            np.asarray(keys), med, p, sharpness, blockiness, flat_share,
                                            pool=pool, shared=E, quality_report=quality_report)
        # 4-5 per identity: thresholds on the corrected scores, duplicates
        local = pixel_sim is not None and pool.workers > 1 and not hasattr(pixel_sim, "subset")
        tasks = [dict(E=E, rows=rows, bounds=b, block=blk, quality=quality[rows], p=p,
                      face_size=None if face_size is None else np.asarray(face_size)[rows],
                      offset=None if offset is None else offset[rows],
                      pixel=None if pixel_sim is None else pixel_sim if local or pool.workers == 1 else
                      pixel_sim.subset(rows), global_pixel=local or pool.workers == 1)
                 for (rows, b, _), blk in zip(shards, blocks)]
        # an arbitrary pixel_sim callable cannot travel to the workers: decide here then
        decided = map(decide_shard, tasks) if local else _largest_first(pool, decide_shard, tasks)
        dec, rea = np.full(n, DROP, np.uint8), np.full(n, RC[R_FAR], np.uint8)
        score, dup_of = np.zeros(n, np.float32), np.full(n, -1, np.int64)
        for (rows, _, _), out in zip(shards, progress(decided, total=len(tasks), desc="clean", **bar)):
            dec[rows], rea[rows], score[rows] = out["decision"], out["reason"], out["score"]
            pos = out["dup_of"]
            dup_of[rows[pos >= 0]] = rows[pos[pos >= 0]]
        if nearest is not None and p.margin:
            near_other(dec, rea, raw, nearest, p)
        res = _finish_core(emb, identity, photo, p, dec, rea, score, cluster, dup_of, centres, info, excluded,
                           exclude_vecs, pool, pixel_sim)
        res.quality = quality_report
        return res


def _largest_first(pool: LocalPool, fn, tasks: list):
    """``pool.map(fn, tasks)``, results in task order, the shards with the most faces
    started first (one huge identity started last would run alone at the end)."""
    if pool.workers == 1:
        yield from map(fn, tasks)
        return
    order = sorted(range(len(tasks)), key=lambda i: -len(tasks[i]["rows"]))
    done: dict = {}
    nxt = 0
    for i, r in zip(order, pool.map(fn, [tasks[i] for i in order])):
        done[i] = r
        while nxt in done:
            yield done.pop(nxt)
            nxt += 1


def _identity_shards(keys: list, groups: dict, workers: int, shard_faces: int | None = None) -> list:
    """Consecutive identities in shards of similar face counts: (rows, bounds, keys)."""
    if not keys:
        return []
    n = sum(len(groups[g]) for g in keys)
    target = shard_faces or (max(256, -(-n // (16 * workers))) if workers > 1 else n)
    shards, cur = [], []
    size = 0
    for g in keys:
        cur.append(g)
        size += len(groups[g])
        if size >= target:
            shards.append(cur)
            cur, size = [], 0
    if cur:
        shards.append(cur)
    out = []
    for ks in shards:
        parts = [groups[g] for g in ks]
        out.append((np.concatenate(parts), np.r_[0, np.cumsum([len(x) for x in parts])], np.asarray(ks)))
    return out


def _analyse_shard(t: dict) -> dict:
    """Worker: analyse_identity for each identity of a shard, packed into arrays (small
    identities stacked by size: facecurate.clean.clean_batch, same bits)."""
    return analyse_rows(t["E"].get(), t["rows"], t["photo"], t["bounds"], t["p"])


def _unpack(blk: dict, b: np.ndarray, which: list) -> dict:
    """The Analysis of the identities ``which`` of a shard's packed arrays."""
    cb = np.r_[0, np.cumsum(blk["nclus"])]
    return {j: Analysis(blk["s"][b[j]:b[j + 1]], blk["cluster"][b[j]:b[j + 1]], blk["subject"][b[j]:b[j + 1]],
                        blk["centre"][j], blk["minority"][cb[j]:cb[j + 1]], blk["rival"][cb[j]:cb[j + 1]],
                        int(blk["nclus"][j]), float(blk["dominant_share"][j]), bool(blk["ambiguous"][j]),
                        float(blk["median"][j])) for j in which}


def decide_shard(t: dict) -> dict:
    """Worker: decide_identity for each identity of a shard (the thresholds of all its
    faces at once, then decide_identity where duplicates or ambiguity can change them:
    facecurate.clean.clean_batch.decide_rows, same result)."""
    emb, rows, b, p = t["E"].get(), t["rows"], t["bounds"], t["p"]
    n = len(rows)
    pix, fs, off = t["pixel"], t["face_size"], t["offset"]
    dec, rea, score, needs = decide_rows(emb, rows, b, t["block"], p, fs, off, pix is not None)
    dup = np.full(n, -1, np.int64)
    todo = np.nonzero(needs)[0].tolist()
    analyses = _unpack(t["block"], b, todo)
    for j in todo:
        lo, hi = int(b[j]), int(b[j + 1])
        local_pix = None
        if pix is not None:  # identity index -> global index (global_pixel) or shard position
            tr = rows if t["global_pixel"] else np.arange(n)
            local_pix = (lambda x, y, lo=lo: pix(int(tr[lo + x]), int(tr[lo + y])))
        dd, rr, ss, du = decide_identity(analyses[j], np.asarray(emb[rows[lo:hi]]), t["quality"][lo:hi], p,
                                         None if fs is None else fs[lo:hi], None if off is None else off[lo:hi],
                                         local_pix)
        dec[lo:hi], rea[lo:hi], score[lo:hi] = dd, rr, ss
        dup[lo:hi] = np.where(du >= 0, du + lo, -1)
    return dict(decision=dec, reason=rea, score=score, dup_of=dup)


def _finish_core(emb, identity, photo, p, dec, rea, score, cluster, dup_of, centres, info, excluded,
                 exclude_vecs, pool: LocalPool | None = None, pixel_sim=None) -> CoreResult:
    """The cross-identity tail: exclusion, too few photos, identities lost, occluded faces,
    the review budget, merges, counts."""
    n, (k, d) = len(emb), centres.shape
    excluded |= excluded_by_vectors(centres, exclude_vecs, p)
    finish_identities(identity, photo, dec, rea, score, p, info, excluded, pixel_sim)
    resolved = limit_review(dec, rea, score, p, n)
    fill_review(dec, rea, score, p, n)
    # centres of what is kept, for merges
    alive = dec == KEEP
    sums = np.zeros((k, d), np.float64)
    if alive.any():
        kept = np.flatnonzero(alive)
        add_at_rows(sums, identity[kept], emb, rows=kept)  # no copy of the kept faces' vectors
    has = np.linalg.norm(sums, axis=1) > 0
    fin = normalize(np.where(has[:, None], sums, centres)).astype(np.float32)
    live = np.nonzero(has & ~np.isin(np.arange(k), list(excluded)))[0]
    merges = [(int(live[a]), int(live[b]), s) for a, b, s in similar_pairs(fin[live], p.merge, pool=pool)]
    for a, b, _ in merges:
        for g in (a, b):
            if C.FLAG_MERGE_CANDIDATE not in info[g]["flags"]:
                info[g]["flags"].append(C.FLAG_MERGE_CANDIDATE)
    counts = dict(faces=np.ones(n, bool), kept=dec == KEEP, review=dec == REVIEW, dropped=dec == DROP,
                  duplicates=rea == RC[R_DUPLICATE], not_subject=rea == RC[R_NOT_SUBJECT])
    for name, m in counts.items():
        for g, c in enumerate(np.bincount(identity[m], minlength=k).tolist()):
            info[g][name] += c
    return CoreResult([DECISIONS[c] for c in dec.tolist()], [REASONS[c] for c in rea.tolist()], score, cluster,
                      dup_of, info, fin, merges, resolved)


def excluded_by_vectors(centres: np.ndarray, exclude_vecs: np.ndarray | None, p: CleanParams) -> set:
    """The identities an evaluation set's vectors exclude: two of its faces match the
    centre, or one matches it clearly (one chance match among thousands of faces is likely)."""
    if exclude_vecs is None or not len(exclude_vecs) or not len(centres):
        return set()
    best, hits = _match_counts(centres, normalize(exclude_vecs), p.exclude)
    hit = (hits >= 2) | (best >= p.exclude + 0.015)
    return set(np.nonzero(hit)[0].tolist())


def finish_identities(identity: np.ndarray, photo: np.ndarray, dec: np.ndarray, rea: np.ndarray,
                      score: np.ndarray, p: CleanParams, info: list, excluded: set, pixel_sim=None) -> None:
    """The steps after the thresholds that look at one identity at a time (so a shard of
    whole identities gets the result of the whole set): exclusion, too few photos,
    identities lost, occluded faces. ``identity`` numbers index ``info``; ``dec``/``rea``
    change in place."""
    k = len(info)
    if excluded:
        m = np.isin(identity, sorted(excluded))
        dec[m], rea[m] = DROP, RC[R_EXCLUDED]
        for g in sorted(excluded):
            if g < k:
                info[g]["flags"].append(C.FLAG_EXCLUDED)
    # too few photos
    kept_by_id = np.bincount(identity[dec != DROP], minlength=k)
    m = (dec != DROP) & (kept_by_id[identity] < p.min_images)
    dec[m], rea[m] = DROP, RC[R_TOO_FEW]
    for g in np.nonzero((kept_by_id > 0) & (kept_by_id < p.min_images))[0].tolist():
        info[g]["flags"].append(C.FLAG_TOO_FEW)
    flag_identities(identity, photo, dec, rea, score, p, info, excluded)
    review_occluded(dec, rea, score, p, pixel_sim)


#: review reasons the budget may resolve, in the order they keep their place: the best
#: faces of lost / weak identities, then occluded faces, then the rest by score (the
#: review page's order too: constants.REVIEW_PRIORITY)
_PRIORITY = {RC[r]: rank for r, rank in C.REVIEW_PRIORITY.items()}
#: the reasons of subject faces below drop (what the review steps may pick from)
BELOW_DROP = (RC[R_FAR], RC[R_MINORITY])


def limit_review(dec: np.ndarray, rea: np.ndarray, score: np.ndarray, p: CleanParams, total: int) -> int:
    """Shrink the review band until at most ``max_review`` of ``total`` faces are in
    review: identity candidates first, then occluded faces, then the faces just short of
    the keep threshold (the ones a person is most likely to rescue) keep their place; the
    rest is dropped (reason far_from_centre). Faces at or above ``keep`` are never
    kept by it, so the kept set does not depend on the budget. ``dec``/``rea``: decision and
    reason codes (:mod:`facecurate.clean.clean_params`), changed in place. Returns how many
    reviews were resolved."""
    budget = int(np.floor(p.max_review * total))
    review = dec == REVIEW
    band = np.nonzero(review & np.isin(rea, list(_PRIORITY)))[0]
    allowed = max(0, budget - (int(review.sum()) - len(band)))
    if len(band) <= allowed:
        return 0
    order = sorted(band.tolist(), key=lambda i: (_PRIORITY[int(rea[i])], -float(score[i]), i))
    gone = np.asarray(order[allowed:], np.int64)
    dec[gone], rea[gone] = DROP, RC[R_FAR]
    return len(order) - allowed


def fill_review(dec: np.ndarray, rea: np.ndarray, score: np.ndarray, p: CleanParams, total: int) -> int:
    """While the review budget has room, subject faces at most ``near_drop`` below the
    drop threshold go to review (reason uncertain), highest score first: the band does
    not end abruptly at drop. Returns how many were added."""
    room = int(np.floor(p.max_review * total)) - int((dec == REVIEW).sum())
    if room <= 0 or p.near_drop <= 0:
        return 0
    cand = np.flatnonzero((dec == DROP) & np.isin(rea, BELOW_DROP) & (score >= p.drop - p.near_drop))
    pick = cand[np.lexsort((cand, -score[cand]))][:room]
    dec[pick], rea[pick] = REVIEW, RC[R_BAND]
    return len(pick)


def near_other(dec: np.ndarray, rea: np.ndarray, raw: np.ndarray, nearest: np.ndarray, p: CleanParams) -> None:
    """Kept faces whose similarity to their own centre (``raw``) exceeds that to the
    nearest other identity's centre (``nearest``) by less than ``margin`` go to review:
    a look-alike of the subject, or a person filed under two names."""
    m = (dec == KEEP) & (raw - nearest < p.margin)
    dec[m], rea[m] = REVIEW, RC[R_NEAR_OTHER]


def photos_per_identity(identity: np.ndarray, photo: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """(k,) distinct photos of each identity among the faces of ``mask`` (photo numbers
    are unique across identities)."""
    _, first = np.unique(photo[mask], return_index=True)
    return np.bincount(identity[mask][first], minlength=k)


def flag_identities(identity: np.ndarray, photo: np.ndarray, dec: np.ndarray, rea: np.ndarray, score: np.ndarray,
                    p: CleanParams, info: list, skip: set) -> None:
    """No identity lost silently: one with at least ``lost_photos`` photos with a face
    that keeps none is flagged lost, one that keeps fewer than ``weak_share`` of them
    weak_majority (ambiguous and excluded ones are flagged already); the ``candidates``
    best of their subject faces not kept go to review (identity_candidate), first in the budget."""
    k = len(info)
    photos = photos_per_identity(identity, photo, np.ones(len(identity), bool), k)
    kept = photos_per_identity(identity, photo, dec == KEEP, k)
    lost = (photos >= p.lost_photos) & (kept == 0)
    weak = (photos >= p.lost_photos) & (kept > 0) & (kept < p.weak_share * photos)
    flagged = []
    for g in np.flatnonzero(lost | weak).tolist():
        if g in skip or C.FLAG_AMBIGUOUS in info[g]["flags"]:
            continue
        info[g]["flags"].append(C.FLAG_LOST if lost[g] else C.FLAG_WEAK)
        flagged.append(g)
    if not flagged or p.candidates <= 0:
        return
    cand = np.flatnonzero(np.isin(identity, flagged) & (dec == DROP) & np.isin(rea, BELOW_DROP + (RC[R_TOO_FEW],)))
    cand = cand[np.lexsort((cand, -score[cand], identity[cand]))]
    ids = identity[cand]
    rank = np.arange(len(cand)) - np.searchsorted(ids, ids)  # position within its identity
    pick = cand[rank < p.candidates]
    dec[pick], rea[pick] = REVIEW, RC[R_CANDIDATE]


def review_occluded(dec: np.ndarray, rea: np.ndarray, score: np.ndarray, p: CleanParams, pixel_sim) -> None:
    """Band faces and subject faces scored at most ``occlusion_range`` below drop whose
    crop has flat patches over at least ``occlusion`` of the face (a covered face: the
    embedding suffers, the person may be the right one) go to review as occluded, ahead
    of the band. Needs the crops (``pixel_sim.flat_share``)."""
    if pixel_sim is None or not hasattr(pixel_sim, "flat_share") or p.occlusion <= 0:
        return
    below = (dec == DROP) & np.isin(rea, BELOW_DROP) & (score >= p.drop - p.occlusion_range)
    cand = np.flatnonzero(below | ((dec == REVIEW) & (rea == RC[R_BAND])))
    hit = [i for i in cand.tolist() if pixel_sim.flat_share(i) >= p.occlusion]
    dec[hit], rea[hit] = REVIEW, RC[R_OCCLUDED]


def _match_counts(a: np.ndarray, b: np.ndarray, thr: float, block: int = 8192):
    best = np.full(len(a), -1.0, np.float32)
    hits = np.zeros(len(a), np.int64)
    for b0 in range(0, len(b), block):
        s = a @ b[b0:b0 + block].T
        best = np.maximum(best, s.max(1))
        hits += (s >= thr).sum(1)
    return best, hits
