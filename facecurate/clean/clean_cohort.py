"""clean's dataset-wide statistics: the per-face score offsets (cohort, centre
crowding, folder spread, sharpness) measured on the dataset itself, and the
calibration of keep / drop from impostor scores (``--calibrate``)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from facecurate.clean.clean_identity import analyse_identity
from facecurate.clean.clean_params import CleanParams
from facecurate.common import constants as C
from facecurate.engines.local import LocalPool, SharedArray
from facecurate.clean.similar import similar_pairs
from facecurate.clean.vectors import BLAS_SMALL_PRODUCT, group_by_label


@dataclasses.dataclass
class CohortPlan:
    """The dataset-wide part of the score offsets, from the identity centres alone (plus
    a fixed sample of faces): what every block of faces needs to compute its own
    offsets (:func:`face_offsets`), whether the faces are in this process or in shards
    on other machines (facecurate.clean.staged)."""

    partners: dict  # identity -> identities that look like the same person (not each other's cohort)
    centres: np.ndarray | None  # the cohort: at most cohort_max centres (None: no face cohort)
    pos: np.ndarray | None  # identity -> row of ``centres`` (-1: not in the cohort)
    kk: int  # nearest centres averaged per face
    per: np.ndarray | None  # (k,) float64: cohort_centre's correction per identity
    dev: np.ndarray | None  # (k,) float64: spread's deviation per identity


def plan_cohort(cen: np.ndarray, karr: np.ndarray, med: np.ndarray, p: CleanParams, n_faces: int,
                sample_faces, *, pool: LocalPool | None = None) -> CohortPlan:
    """The cohort's globals (see :func:`score_offsets`): merge partners, the cohort of
    centres, the centres' crowding and the folders' spread. ``sample_faces(pick)``
    returns (vectors, identities) of the faces ``pick`` (sorted indices into all
    ``n_faces`` faces): the sample centre_crowding searches."""
    partners: dict = defaultdict(list)
    centres = pos = per = dev = None
    kk = 0
    if (p.cohort or p.cohort_centre or p.margin) and len(karr) > 5:
        sub = cen if len(karr) == len(cen) and np.array_equal(karr, np.arange(len(cen))) else cen[karr]  # no copy
        # identities that look like the same person (merge candidates) are not each other's cohort
        for a, b, _ in similar_pairs(sub, p.merge, pool=pool):
            partners[int(karr[a])].append(int(karr[b]))
            partners[int(karr[b])].append(int(karr[a]))
        if p.cohort or p.margin:
            centres, pos, kk = cohort_subset(sub, karr, len(cen), 5)
        if p.cohort_centre:
            pick = crowding_sample(n_faces)
            fe, fid = sample_faces(pick)
            cc = crowding_of(sub, karr, fe, fid, 20, partners=partners, pool=pool)
            per = np.zeros(len(cen), np.float64)
            per[karr] = cc - float(np.median(cc))
    if p.spread and np.isfinite(med).any():
        gm = float(np.nanmedian(med))
        dev = np.where(np.isfinite(med), med - gm, 0.0)
    return CohortPlan(partners, centres, pos, kk, per, dev)


def face_offsets(identity: np.ndarray, co: np.ndarray | None, ref: float | None, plan: CohortPlan,
                 p: CleanParams) -> np.ndarray:
    """(n,) float64: the cohort, crowding and spread corrections of faces of
    ``identity`` whose cohort means are ``co`` (``ref``: the median of the inliers'
    means); element by element, so any block of faces gets the bits of the whole."""
    off = np.zeros(len(identity), np.float64)
    if p.cohort and co is not None:
        off += p.cohort * (co - ref)
    if plan.per is not None:
        off += p.cohort_centre * plan.per[identity]
    if plan.dev is not None:
        off += p.spread * plan.dev[identity]
    return off


def cohort_median(co: np.ndarray, inl: np.ndarray) -> float:
    """The cohort's reference: the median of the inliers' cohort means (all faces' when
    there is no inlier)."""
    return float(np.median(co[inl])) if inl.any() else float(np.median(co))


def score_offsets(emb, identity, raw, inl, cen, keys, med, p: CleanParams, sharpness=None, blockiness=None,
                  flat=None, *, pool: LocalPool | None = None, shared: SharedArray | None = None,
                  quality_report: dict | None = None) -> tuple:
    """Per-face corrections of the centre similarity, all measured on the dataset itself,
    and each face's similarity to the nearest centre of another identity (None when
    neither the cohort nor the look-alike margin is asked for, or with 5 identities or fewer).
    ``raw``: each face's similarity to its identity's centre (no offsets); ``inl``: the
    subject faces at or above drop; ``cen`` (k, d): identity centres; ``keys``: the
    identities that have faces; ``med`` (k,): median inlier similarity per identity.

    * cohort: a face that resembles many other identities' centres (a generic face, a
      look-alike) scores higher everywhere; subtract ``cohort`` x its mean similarity to
      the 5 nearest other centres (relative to the median face);
    * cohort_centre: the other side of the same test (as in symmetric score
      normalisation): an identity whose centre has other people's faces close by (a
      crowded region of face space, where look-alikes are likely) needs more evidence;
      subtract ``cohort_centre`` x the centre's mean similarity to its 20 nearest faces
      of other identities (relative to the median identity);
    * spread: in a folder whose genuine faces are tight, the same similarity is weaker
      evidence; subtract ``spread`` x (folder's median inlier similarity - the median
      folder's);
    * quality: blurred / low-resolution crops (sharpness below ``low_sharpness``) sit
      lower for everyone; add the measured gap between sharp and blurred inliers'
      median similarity (0..0.03). Heavily compressed photos (``blockiness`` at or above
      ``blocky``: their block edges make them sharp by the Laplacian's measure) and
      occluded crops (``flat`` share at or above ``occlusion``) are two more groups,
      each with its own measured gap. Each gap is measured against the inliers in no
      group, and only with 20 inliers on each side; a face in several groups gets the
      largest gap. ``quality_report`` (a dict) receives each group's faces, inliers and
      lift (see :func:`quality_shift`).
    ``pool``/``shared`` (``emb`` shared with the pool) spread the cohort searches over
    the pool's workers, block by block as in one process.
    """
    n = len(emb)
    karr = np.asarray(keys)
    plan = plan_cohort(cen, karr, med, p, n, lambda pick: (emb[pick], identity[pick]), pool=pool)
    co = near = ref = None
    if plan.centres is not None:
        co, near = cohort_means(emb, identity, plan, pool=pool, shared=shared)
        ref = cohort_median(co, inl) if p.cohort else None
    off = face_offsets(identity, co, ref, plan, p)
    if sharpness is not None:
        off -= quality_shift(raw, inl, sharpness, blockiness, p, flat, report=quality_report)
    return off.astype(np.float32), near


def quality_shift(raw, inl, sharpness, blockiness, p: CleanParams, flat=None, report: dict | None = None
                  ) -> np.ndarray:
    """Each face's measured quality lift (see :func:`score_offsets`): 0, or the gap
    between the median similarity of good-quality inliers and that of the inliers of
    its low-quality group (blurred; heavily compressed; occluded), clipped to 0..0.03.
    ``blockiness`` / ``flat``: None or NaN where align did not record them. ``report``
    (a dict) receives, per group of ``constants.QUALITY_GROUPS``, its ``faces``, ``inliers``
    and ``lift`` (0.0 when not measured: under 20 inliers on either side)."""
    sh = np.asarray(sharpness, np.float64)

    def recorded(v):
        return np.full(len(sh), np.nan) if v is None else np.asarray(v, np.float64)

    bl, fl = recorded(blockiness), recorded(flat)
    low = np.isfinite(sh) & (sh > 0) & (sh < p.low_sharpness)
    blocky = np.isfinite(bl) & (bl >= p.blocky)
    covered = np.isfinite(fl) & (fl >= p.occlusion) & (p.occlusion > 0)
    good = np.isfinite(sh) & (sh >= p.low_sharpness) & ~blocky & ~covered
    lift = np.zeros(len(sh))
    for name, group in zip(C.QUALITY_GROUPS, (low, blocky, covered)):
        delta = 0.0
        if (inl & group).sum() >= 20 and (inl & good).sum() >= 20:
            delta = float(np.clip(np.median(raw[inl & good]) - np.median(raw[inl & group]), 0.0, 0.03))
            lift = np.maximum(lift, delta * group)
        if report is not None:
            report[name] = dict(faces=int(group.sum()), inliers=int((inl & group).sum()), lift=round(delta, 4))
    return lift


def cohort_subset(centres: np.ndarray, ids: np.ndarray, size: int, k: int, cohort_max: int = 5000,
                  seed: int = 0) -> tuple:
    """(cohort centres, identity -> row of them or -1, k used): all ``centres`` (named
    by ``ids``), or a fixed random sample of ``cohort_max`` of them. ``size``: one more
    than the largest identity number."""
    m = len(centres)
    if m > cohort_max:
        pick = np.sort(np.random.default_rng(seed).choice(m, size=cohort_max, replace=False))
        centres, ids, m = centres[pick], ids[pick], cohort_max
    pos = np.full(int(max(size, int(ids.max()) + 1)), -1, np.int64)
    pos[ids] = np.arange(m)
    return np.ascontiguousarray(centres), pos, max(1, min(k, m - 1))


def cohort_means(q: np.ndarray, own: np.ndarray, plan: CohortPlan, block: int = 4096,
                 pool: LocalPool | None = None, shared: SharedArray | None = None) -> tuple:
    """(mean of the kk nearest cohort centres of other identities, the nearest one's
    similarity) of each row of ``q`` (identities ``own``), in blocks of ``block`` rows."""
    n = len(q)
    t = dict(pos=plan.pos, kk=plan.kk, block=block, partners=plan.partners)
    if pool is None or pool.workers == 1 or shared is None:
        both = _topk_rows(dict(t, q=q, a=0, b=n, own=own, centres=plan.centres))
    else:
        cs = pool.share(plan.centres)
        tasks = [dict(t, q=shared, a=a, b=b, own=own[a:b], centres=cs) for a, b in _chunks(n, block, pool)]
        both = np.concatenate(list(pool.map(_topk_rows, tasks)))
    return both[:, 0].copy(), both[:, 1].copy()


def _chunks(n: int, block: int, pool: LocalPool | None) -> list:
    """Row ranges of whole blocks, a few per worker."""
    per = block * max(1, -(-n // (block * 4 * (pool.workers if pool else 1))))
    return [(a, min(n, a + per)) for a in range(0, n, per)] if pool and pool.workers > 1 else [(0, n)]


def topk_other_mean(q: np.ndarray, own: np.ndarray, centres: np.ndarray, ids: np.ndarray, k: int,
                    block: int = 4096, cohort_max: int = 5000, seed: int = 0,
                    partners: dict | None = None, pool: LocalPool | None = None,
                    shared: SharedArray | None = None, nearest: bool = False):
    """Mean similarity of each vector to its k nearest centres of other identities
    (``ids`` names the rows of ``centres``): an exact search over a cohort of at most
    ``cohort_max`` centres (a fixed random sample when there are more), so the cost is
    linear in the number of faces. ``partners`` (identity -> identities) are left out too.
    With a ``pool`` (``shared``: ``q`` shared with it) the blocks run on its workers.
    ``nearest``: return (the means, the similarity to the nearest such centre)."""
    cs, pos, kk = cohort_subset(centres, ids, int(own.max()) + 1, k, cohort_max, seed)
    plan = CohortPlan(partners or {}, cs, pos, kk, None, None)
    co, near = cohort_means(q, own, plan, block, pool, shared)
    return (co, near) if nearest else co


def _sub_blocks(rows: int, m: int, d: int, sub: int = 512) -> list:
    """Row ranges that split a product of ``rows`` x ``m`` (inner size ``d``) into parts
    that stay in the cache, each with the bits of the whole product: BLAS gives a row
    the same bits in any matrix of at least two rows that is too large for its
    small-matrix kernel (a single row goes through another routine), so every part has
    at least two rows and 4M multiply-adds, and a shorter tail joins the part before."""
    least = max(2, -(-(BLAS_SMALL_PRODUCT + 1) // max(1, m * d)), sub)
    if rows < 2 * least:
        return [(0, rows)]
    cuts = list(range(0, rows - least + 1, least))
    return [(a, b) for a, b in zip(cuts, cuts[1:] + [rows])]


def _topk_rows(t: dict) -> np.ndarray:
    """topk_other_mean of rows a..b (a: a multiple of the block): (b - a, 2), the mean
    and the largest of each row's top k."""
    q = t["q"].get() if isinstance(t["q"], SharedArray) else t["q"]
    centres = t["centres"].get() if isinstance(t["centres"], SharedArray) else t["centres"]
    a, b, own, pos, kk, block, partners = t["a"], t["b"], t["own"], t["pos"], t["kk"], t["block"], t["partners"]
    own_pos = pos[own]
    out = np.zeros((b - a, 2), np.float32)
    for b0 in range(0, b - a, block):
        b1 = min(b - a, b0 + block)
        for u0, u1 in _sub_blocks(b1 - b0, len(centres), q.shape[1]):  # the block's product, part by part
            lo, hi = b0 + u0, b0 + u1
            s = q[a + lo:a + hi] @ centres.T  # below: -np.partition(-s, ...) without copies
            op = own_pos[lo:hi]
            ok = op >= 0
            s[np.arange(len(s))[ok], op[ok]] = -np.inf
            if partners:
                rr, cc = [], []
                for r_, g in enumerate(own[lo:hi].tolist()):
                    for h in partners.get(g, ()):
                        if 0 <= h < len(pos) and pos[h] >= 0:
                            rr.append(r_)
                            cc.append(pos[h])
                if rr:
                    s[rr, cc] = -np.inf
            top = _topk_desc(s, kk)
            out[lo:hi, 0], out[lo:hi, 1] = top.mean(1), top[:, 0]
    return out


def _topk_desc(s: np.ndarray, kk: int, group: int = 100) -> np.ndarray:
    """The ``kk`` largest values of each row of ``s`` (changed), largest first: the
    first ``kk`` columns of ``-np.partition(-s, kk - 1, axis=1)``, which numpy's
    selection leaves sorted, so their mean has the same bits. Wide rows go through a
    bound instead of a full selection: the kk-th largest of the rows' group maxima is
    at most the kk-th largest value, so only the groups whose maximum reaches it hold
    candidates (about kk of them); ties keep the column order."""
    b, m = s.shape
    ng = m // group  # whole groups; the last group also holds the (shorter) tail
    if m < 4 * group or ng < kk or not b:
        np.negative(s, out=s)  # -np.partition(-s, ...) without copies
        s.partition(kk - 1, axis=1)
        return -s[:, :kk]
    gmax = np.maximum.reduceat(s, np.arange(0, ng * group, group), axis=1)
    g = -gmax
    g.partition(kk - 1, axis=1)
    t = -g[:, kk - 1]
    if not np.isfinite(t).all() or np.isnan(gmax).any():  # -inf / nan rows: the full selection
        return _topk_desc(s, kk, group=m + 1)
    hit = np.flatnonzero(gmax >= t[:, None])
    row, grp = np.divmod(hit, ng)
    # the candidate groups as whole rows of a (b, ng, group) view: one contiguous copy each
    view = np.lib.stride_tricks.as_strided(s, (b, ng, group), (s.strides[0], group * s.strides[1], s.strides[1]))
    vals = view[row, grp]
    if ng * group < m:  # the tail belongs to the last group: its columns follow the last group's
        tail = s[row, ng * group:]
        tail[grp != ng - 1] = -np.inf
        vals = np.hstack([vals, tail])
    ok = vals >= t[row][:, None]
    rr, vv = np.broadcast_to(row[:, None], ok.shape)[ok], vals[ok]  # by row, then column
    order = np.lexsort((-vv, rr))  # stable: ties keep the column order
    first = np.searchsorted(rr[order], np.arange(b))
    return vv[order][first[:, None] + np.arange(kk)]


def crowding_sample(n: int, sample: int = 5000, seed: int = 0) -> np.ndarray:
    """The faces centre_crowding searches: all ``n``, or a fixed random ``sample`` of them (sorted)."""
    return np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))


def centre_crowding(centres: np.ndarray, ids: np.ndarray, emb: np.ndarray, identity: np.ndarray, k: int,
                    sample: int = 5000, seed: int = 0, block: int = 2048,
                    partners: dict | None = None, pool: LocalPool | None = None) -> np.ndarray:
    """Mean similarity of each identity centre to its ``k`` nearest faces of *other*
    identities (and not of its merge ``partners``): how close another person's face
    can come to this centre in this dataset. A centre in a crowded region of face
    space (many look-alikes) needs more evidence. The faces searched are a fixed
    random sample of at most ``sample`` (cost linear in the number of identities).
    With a ``pool`` the blocks of centres run on its workers."""
    pick = crowding_sample(len(emb), sample, seed)
    return crowding_of(centres, ids, emb[pick], identity[pick], k, block, partners, pool)


def crowding_of(centres: np.ndarray, ids: np.ndarray, fe: np.ndarray, fid: np.ndarray, k: int,
                block: int = 2048, partners: dict | None = None, pool: LocalPool | None = None) -> np.ndarray:
    """centre_crowding against the sampled faces ``fe`` (identities ``fid``)."""
    kk = max(1, min(k, len(fe) - 1))
    t = dict(fe=fe, fid=fid, kk=kk, block=block, partners=partners)
    if pool is None or pool.workers == 1:
        return _crowding_rows(dict(t, centres=centres, ids=ids))
    parts = [dict(t, centres=np.ascontiguousarray(centres[a:b]), ids=ids[a:b])
             for a, b in _chunks(len(centres), block, pool)]
    return np.concatenate(list(pool.map(_crowding_rows, parts)))


def _crowding_rows(t: dict) -> np.ndarray:
    centres, ids, fe, fid, kk, block, partners = (t["centres"], t["ids"], t["fe"], t["fid"], t["kk"], t["block"],
                                                  t["partners"])
    out = np.zeros(len(centres), np.float32)
    order = np.argsort(fid, kind="stable")
    for b0 in range(0, len(centres), block):
        bid = ids[b0:b0 + block]
        tops = []
        for u0, u1 in _sub_blocks(len(bid), len(fe), fe.shape[1]):  # the block's product, part by part
            s = centres[b0 + u0:b0 + u1] @ fe.T
            rows, who = np.arange(u1 - u0), bid[u0:u1]  # (row, identity) whose sampled faces are left out
            if partners:
                extra = [(r_, h) for r_, g in enumerate(who.tolist()) for h in partners.get(g, ())]
                if extra:
                    rows, who = np.r_[rows, [r_ for r_, _ in extra]], np.r_[who, [h for _, h in extra]]
            rr, cc = _rows_of(fid, order, who)
            s[rows[rr], cc] = -np.inf
            tops.append(_topk_desc(s, kk))
        top = np.concatenate(tops)
        top[~np.isfinite(top)] = np.nan
        out[b0:b0 + block] = np.nan_to_num(np.nanmean(top, 1), nan=0.0) if np.isnan(top).any() else top.mean(1)
    return out


def _rows_of(labels: np.ndarray, order: np.ndarray, want: np.ndarray) -> tuple:
    """(i, j) for every j with labels[j] == want[i] (``order``: a stable argsort of
    ``labels``)."""
    srt = labels[order]
    lo, hi = np.searchsorted(srt, want, "left"), np.searchsorted(srt, want, "right")
    cnt = hi - lo
    i = np.repeat(np.arange(len(want)), cnt)
    return i, order[np.repeat(lo - (np.cumsum(cnt) - cnt), cnt) + np.arange(int(cnt.sum()))]


def calibrate(emb: np.ndarray, identity: np.ndarray, photo: np.ndarray, p: CleanParams, far: float,
              seed: int = 0) -> CleanParams:
    """Estimate keep/drop from the data: genuine = each subject face's similarity to
    its own identity's robust centre (leave-in, default thresholds), impostor = a
    face's similarity to other identities' centres. ``drop`` is the impostor score
    at false-accept rate ``far``; ``keep`` the one at ``far / 10``; other thresholds
    are shifted by the same amount as ``drop`` moved from its default."""
    identity = np.asarray(identity, np.int64)
    groups = group_by_label(identity)
    keys = sorted(groups)
    cents = []
    for g in keys:
        rows = groups[g]
        cents.append(analyse_identity(emb[rows], photo[rows], p).centre)  # the centre only: no decisions
    cents = np.stack(cents).astype(np.float32)
    rng = np.random.default_rng(seed)
    m = min(len(emb), 20000)
    pick = np.sort(rng.choice(len(emb), size=m, replace=False))
    pos = {g: t for t, g in enumerate(keys)}
    own = np.array([pos[int(g)] for g in identity[pick]])
    sims = emb[pick] @ cents.T
    sims[np.arange(m), own] = -np.inf
    imp = sims[np.isfinite(sims)]
    if len(imp) > 2_000_000:
        imp = rng.choice(imp, 2_000_000, replace=False)
    gen = (emb[pick] * cents[own]).sum(1)
    drop = float(np.quantile(imp, 1 - far))
    keep = float(np.quantile(imp, 1 - far / 10))
    keep = max(keep, drop + 0.005)
    shift = drop - p.drop
    q = dataclasses.replace(p, keep=keep, drop=drop, cw=p.cw + shift, join=p.join + shift,
                            merge=min(0.999, p.merge + shift), exclude=min(0.999, p.exclude + shift))
    q.calibrated = dict(far=far, impostor_pairs=int(len(imp)), own_centre_median=float(np.median(gen)),
                        faces_below_drop=float(np.mean(gen < drop)), shift=shift)
    return q
