"""The clean stage: decide keep / drop / review for every aligned face.

Per identity (work linear in its faces; all-pairs steps run on at most
``CleanParams.sample`` faces):

1. Chinese-whispers clustering (dlib) of the identity's faces on a cosine-similarity
   graph; clusters whose centres are close to the largest one are joined to it: that
   group is the dominant person. A folder whose second person is nearly as large as
   the first is flagged ``ambiguous`` instead of guessed.
2. A robust centre: the mean of the dominant group, then iterated on the best face of
   each photo that lies inside the drop threshold (a trimmed mean).
3. Per photo, at most one face is the subject (the one closest to the centre); the
   others are ``not_subject``.
4. Subject faces are kept at or above ``keep``, dropped below ``drop`` and sent to
   review in between; when more than ``max_review`` of all faces would land in
   review, the band keeps the faces just short of ``keep`` and drops the rest.
5. Near-duplicates among the subject faces are kept once (the copy with the largest,
   sharpest face): cosine >= ``dup``, and when the crops are at hand, pairs within
   0.005 of ``dup`` are decided by the crops' pixels (``CropSimilarity``).

Across identities: centres closer than ``merge`` become merge candidates (faiss when
importable, else an inverted-file search in numpy: sub-quadratic), and ``exclude``
drops identities that overlap an evaluation set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from facecurate import constants as C
from facecurate.engines.local import LocalPool, SharedArray, default_workers
from facecurate.files import format_float, progress, read_csv, write_csv_atomic, write_text_atomic

# Reasons written to clean.csv (defined in constants.py).
R_CENTRE = C.REASON_CENTRE
R_BAND = C.REASON_UNCERTAIN
R_FAR = C.REASON_FAR
R_MINORITY = C.REASON_MINORITY
R_NOT_SUBJECT = C.REASON_NOT_SUBJECT
R_DUPLICATE = C.REASON_DUPLICATE
R_AMBIGUOUS = C.REASON_AMBIGUOUS
R_TOO_FEW = C.REASON_TOO_FEW
R_LOW_QUALITY = C.REASON_LOW_QUALITY
R_EXCLUDED = C.REASON_EXCLUDED
R_NO_EMBEDDING = C.REASON_NO_EMBEDDING
R_MANUAL = C.REASON_MANUAL  # a review's decision, kept by later runs

IDENTITY_COLUMNS = (
    "identity", "images", "faces", "kept", "dropped", "review", "duplicates", "not_subject",
    "clusters", "dominant_share", "noise", "median_score", "flags",
)
MERGE_COLUMNS = ("a", "b", "similarity")


# ----------------------------------------------------------------------------- thresholds
@dataclass
class CleanParams:
    """All thresholds are cosine similarities of L2-normalised embeddings."""

    keep: float  # subject faces at or above: keep
    drop: float  # below: drop; in between: review
    cw: float  # Chinese-whispers edge: similarity at or above
    join: float  # clusters whose centres are this close join the dominant person
    dup: float  # near-duplicate: similarity at or above (embeddings alone)
    merge: float  # identity centres at or above: merge candidates
    exclude: float  # identity centre vs an evaluation face at or above: excluded
    ambiguous_ratio: float = 0.6  # second person / dominant person at or above: ambiguous
    max_review: float = 0.03  # share of all faces sent to review at most
    min_images: int = 2  # identities with fewer kept photos are dropped (too_few_images)
    min_face: float = 0.0  # subject faces smaller (px) are low_quality drops
    ambiguous: str = "review"  # what happens to an ambiguous folder's faces: review | drop
    iters: int = 3
    dup_pixel: float = 0.93  # with the crops at hand, pairs from dup - 0.005 to dup + 0.005 are
    # duplicates only when their crops correlate at least this much (32x32 grey)
    cohort: float = 0.3  # score -= cohort * (mean sim to the 5 nearest other centres - its median)
    cohort_centre: float = 0.3  # score -= this * (centre's mean sim to its 20 nearest other-identity faces - median)
    spread: float = 0.5  # score -= spread * (folder's median inlier sim - median over folders)
    low_sharpness: float = 40.0  # crops below (variance of Laplacian) get the measured quality shift
    loo: bool = True  # score each face against the centre of the others
    sample: int = 1000  # all-pairs clustering on at most this many faces per identity
    model: str = ""
    calibrated: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


#: Model-aware defaults keyed by the family of embeddings.json's model name. The dlib
#: row was tuned on the noisy LFW-dev benchmark (benchmarks/clean_noisy.py); dlib's
#: own same-person rule is a Euclidean distance < 0.6, i.e. cosine > 0.82.
MODEL_DEFAULTS: dict[str, dict] = {
    "dlib": dict(keep=0.945, drop=0.92, cw=0.93, join=0.95, dup=0.99, merge=0.975, exclude=0.96),
    # insightface ArcFace (w600k_r50, glintr100, mbf): same person typically > 0.4,
    # different people < 0.2 (512-D, cosine).
    "arcface": dict(keep=0.40, drop=0.30, cw=0.40, join=0.55, dup=0.95, merge=0.60, exclude=0.55),
}


def model_family(name: str) -> str:
    n = (name or "").lower()
    return "dlib" if "dlib" in n else "arcface"


def default_params(model: str, **overrides) -> CleanParams:
    d = dict(MODEL_DEFAULTS[model_family(model)])
    d.update({k: v for k, v in overrides.items() if v is not None})
    return CleanParams(model=model, **d)


# ----------------------------------------------------------------------------- helpers
def _norm(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    n = np.sqrt(np.add.reduce(v * v, axis=-1, keepdims=True))  # np.linalg.norm(v, axis=-1), without its overhead
    return v / np.maximum(n, 1e-12)


def _mean0(x: np.ndarray) -> np.ndarray:
    """x.mean(0) of a float32 matrix, computed as numpy computes it (same bits), without its overhead."""
    r = np.add.reduce(x, axis=0)
    return np.true_divide(r, np.intp(len(x)), out=r, casting="unsafe")


def _median(x: np.ndarray) -> float:
    """float(np.median(x)) of a float32 vector, same bits."""
    if np.isnan(x).any():
        return float(np.median(x))
    v = np.sort(x)
    h = len(v) // 2
    return float(v[h]) if len(v) % 2 else float(np.float32(np.add.reduce(v[h - 1:h + 1]) / np.intp(2)))


def chinese_whispers(emb: np.ndarray, threshold: float) -> np.ndarray:
    """dlib's Chinese whispers over the graph {(i, j): cos(i, j) >= threshold}.
    Returns labels renumbered by cluster size (0 = largest; ties by first member)."""
    n = len(emb)
    if n == 0:
        return np.zeros(0, np.int64)
    if n == 1:
        return np.zeros(1, np.int64)
    sim = emb @ emb.T
    adj = sim >= threshold
    np.fill_diagonal(adj, True)  # dlib is given every node's self-loop
    if adj.all():  # one clique: one cluster
        return np.zeros(n, np.int64)
    first = adj.argmax(1)  # each node's first neighbour
    if np.array_equal(adj, first[:, None] == first[None, :]):
        # Every connected component is a clique (the common case: one tight person plus
        # unrelated faces). dlib's run then ends with one label per component: ties go to
        # the smallest label, so a component's smallest label wins at its first visit and
        # only spreads, and its 100 n seeded random visits reach every node (checked
        # against dlib in tests/test_clean.py). Same labels, no edge list.
        return _renumber(first)
    import dlib

    ii, jj = np.nonzero(np.triu(adj, 1))
    edges = [(i, i) for i in range(n)] + list(zip(ii.tolist(), jj.tolist()))
    raw = np.asarray(dlib.chinese_whispers(edges), np.int64)
    return _renumber(raw)


def _renumber(raw: np.ndarray) -> np.ndarray:
    if raw.min() >= 0 and raw.max() < len(raw) and (raw[raw] == raw).all():  # labels name their first member
        counts = np.bincount(raw, minlength=len(raw))
        labs = first = np.nonzero(counts)[0]
        counts = counts[labs]
    else:
        labs, first, counts = np.unique(raw, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))  # by size, ties by first member
    remap = np.empty(labs.max() + 1, np.int64)
    remap[labs[order]] = np.arange(len(labs))
    return remap[raw]


def _sample_index(n: int, cap: int) -> np.ndarray:
    if n <= cap:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, cap).round().astype(np.int64))


# decisions and reasons as small codes while computing (strings only in the results)
KEEP, REVIEW, DROP = 0, 1, 2
DECISIONS = (C.DECISION_KEEP, C.DECISION_REVIEW, C.DECISION_DROP)
REASONS = (R_CENTRE, R_BAND, R_FAR, R_MINORITY, R_NOT_SUBJECT, R_DUPLICATE, R_AMBIGUOUS, R_TOO_FEW,
           R_LOW_QUALITY, R_EXCLUDED, R_NO_EMBEDDING, R_MANUAL)
RC = {r: i for i, r in enumerate(REASONS)}


@dataclass
class IdentityResult:
    decision: list
    reason: list
    score: np.ndarray
    cluster: np.ndarray
    dup_of: np.ndarray  # index (within identity) of the kept copy, -1 none
    centre: np.ndarray | None
    clusters: int
    dominant_share: float
    ambiguous: bool


@dataclass
class Analysis:
    """Steps 1-3 of one identity: everything that depends neither on the other
    identities (the score offsets) nor on the crops."""

    s: np.ndarray  # (n,) float32: similarity to the robust centre (leave-one-out), no offsets
    cluster: np.ndarray  # (n,) int64, -1: in no cluster
    subject: np.ndarray  # (n,) bool: the face of its photo closest to the centre
    centre: np.ndarray | None
    minority: np.ndarray  # (clusters,) bool: not the dominant person, >= 2 sampled faces
    rival: np.ndarray  # (clusters,) bool: a competing person of an ambiguous folder
    clusters: int
    dominant_share: float
    ambiguous: bool
    median: float  # median s of the subject faces at or above drop (nan: fewer than 3)


def clean_identity(emb: np.ndarray, photo: np.ndarray, quality: np.ndarray, p: CleanParams,
                   face_size: np.ndarray | None = None, offset: np.ndarray | None = None,
                   pixel_sim: Callable[[int, int], float] | None = None) -> IdentityResult:
    """Decide every face of one identity.

    emb: (n, d) unit vectors; photo: (n,) photo id (faces of one photo share it);
    quality: (n,) larger is better (picks the copy kept among duplicates); offset: (n,)
    subtracted from each face's similarity before the thresholds (see ``score_offsets``);
    pixel_sim(i, j): correlation of the two crops, confirms near-duplicates (two shots
    of one event can be as close as two copies of one photo in embedding space)."""
    a = analyse_identity(emb, photo, p)
    dec, rea, s, dup_of = decide_identity(a, emb, quality, p, face_size, offset, pixel_sim)
    return IdentityResult([DECISIONS[c] for c in dec.tolist()], [REASONS[c] for c in rea.tolist()], s, a.cluster,
                          dup_of, a.centre, a.clusters, a.dominant_share, a.ambiguous)


def analyse_identity(emb: np.ndarray, photo: np.ndarray, p: CleanParams) -> Analysis:
    """Steps 1-3: clusters, the robust centre, each face's similarity to it, one subject
    per photo, ambiguity."""
    n = len(emb)
    emb = np.ascontiguousarray(emb, np.float32)
    photo = np.asarray(photo)
    if n == 0:
        z = np.zeros(0, bool)
        return Analysis(np.zeros(0, np.float32), np.zeros(0, np.int64), z, None, z, z, 0, 0.0, False, np.nan)
    # 1. clusters on (a sample of) the faces
    idx = _sample_index(n, p.sample)
    es = emb if len(idx) == n else emb[idx]
    lab_s = chinese_whispers(es, p.cw)
    cluster = lab_s.copy() if len(idx) == n else np.full(n, -1, np.int64)
    if len(idx) < n:
        cluster[idx] = lab_s
        rest = np.setdiff1d(np.arange(n), idx)  # the rest join the cluster of their nearest sampled face
        sims = emb[rest] @ es.T
        best = sims.argmax(1)
        ok = sims[np.arange(len(rest)), best] >= p.cw
        cluster[rest[ok]] = lab_s[best[ok]]
    nclus = int(lab_s.max()) + 1
    sizes = np.bincount(lab_s, minlength=nclus)
    joined = np.ones(1, bool)
    if nclus > 1:  # a singleton's mean is its face; the others as numpy's mean computes them
        first = np.full(nclus, -1, np.int64)
        first[lab_s[::-1]] = np.arange(len(lab_s))[::-1]
        cent = _norm(np.stack([es[first[k]] if sizes[k] == 1 else _mean0(es[lab_s == k]) for k in range(nclus)]))
        joined = (cent @ cent[0] >= p.join) & (sizes >= 1)
        joined[0] = True
    dom_size = int(sizes[joined].sum())
    # 2. robust centre
    members = cluster >= 0
    members[members] = joined[cluster[members]]
    c = _norm(_mean0(emb[members]))
    shared = not (np.diff(photo) > 0).all() and len(np.unique(photo)) < n  # some photo has several faces

    def best_per_photo(s):
        return _best_per_photo(s, photo) if shared else np.ones(n, bool)

    for _ in range(p.iters):
        s = emb @ c
        inl = best_per_photo(s) & (s >= p.drop)
        if not inl.any():
            break
        c_new = _norm(_mean0(emb[inl]))
        if np.all(np.abs(c_new - c) <= 1e-6 + 1e-5 * np.abs(c)):  # np.allclose(c_new, c, atol=1e-6)
            c = c_new
            break
        c = c_new
    s = (emb @ c).astype(np.float32)
    if p.loo:  # leave-one-out: a face does not vote for its own centre (matters in small folders)
        inl = best_per_photo(s) & (s >= p.drop)
        if inl.sum() >= 2:
            tot = emb[inl].sum(0)
            ii = np.nonzero(inl)[0]
            s[ii] = np.einsum("ij,ij->i", emb[ii], _norm(tot[None, :] - emb[ii]))
            out = np.nonzero(~inl)[0]
            s[out] = emb[out] @ _norm(tot)
    # 3. one subject per photo
    subject = best_per_photo(s)
    # ambiguity: a coherent second person (a cluster of subject faces the centre rejects)
    # nearly as large as the set the centre accepts
    good = subject & (s >= p.drop)
    inliers = int(good.sum())
    rejected = subject & (s < p.drop) & (cluster >= 0)
    counts = np.bincount(cluster[rejected], minlength=nclus)
    second = int(counts.max()) if rejected.any() else 0
    ambiguous = second >= 2 and second >= p.ambiguous_ratio * max(1, inliers)
    rival = joined | (counts >= p.ambiguous_ratio * max(1, inliers)) if ambiguous else np.zeros(nclus, bool)
    median = _median(s[good]) if inliers >= 3 else np.nan
    return Analysis(s, cluster, subject, c, ~joined & (sizes >= 2), rival, nclus,
                    float(dom_size / max(1, len(idx))), bool(ambiguous), median)


def decide_identity(a: Analysis, emb: np.ndarray, quality: np.ndarray, p: CleanParams,
                    face_size: np.ndarray | None = None, offset: np.ndarray | None = None,
                    pixel_sim: Callable[[int, int], float] | None = None):
    """Steps 4-5 on an identity's analysis: (decision codes, reason codes, score, dup_of)."""
    n = len(a.s)
    s = a.s
    if offset is not None:
        s = (s - np.asarray(offset, np.float32)).astype(np.float32)
    dec = np.full(n, DROP, np.uint8)
    rea = np.full(n, RC[R_FAR], np.uint8)
    dup_of = np.full(n, -1, np.int64)
    if n == 0:
        return dec, rea, s, dup_of
    # 4. thresholds
    sub = a.subject
    low = sub & (np.asarray(face_size) < p.min_face) if face_size is not None and p.min_face > 0 else \
        np.zeros(n, bool)
    rest = sub & ~low
    keep = rest & (s >= p.keep)
    band = rest & ~keep & (s >= p.drop)
    dec[keep], rea[keep] = KEEP, RC[R_CENTRE]
    dec[band], rea[band] = REVIEW, RC[R_BAND]
    far = rest & ~keep & ~band & (a.cluster >= 0)
    far[far] = a.minority[a.cluster[far]]
    rea[far] = RC[R_MINORITY]
    rea[low] = RC[R_LOW_QUALITY]
    rea[~sub] = RC[R_NOT_SUBJECT]
    # 5. near-duplicates among the faces that survive
    _mark_duplicates(emb, dec != DROP, quality, s, p, dec, rea, dup_of, pixel_sim)
    if a.ambiguous:  # no guess: every face of the competing people goes the same way
        cand = rea <= RC[R_MINORITY]  # centre, uncertain, far_from_centre, minority_cluster
        rv = a.cluster >= 0
        rv[rv] = a.rival[a.cluster[rv]]
        m = cand & ((dec != DROP) | rv)
        dec[m] = REVIEW if p.ambiguous == "review" else DROP
        rea[m] = RC[R_AMBIGUOUS]
    return dec, rea, s, dup_of


def _best_per_photo(s: np.ndarray, photo: np.ndarray) -> np.ndarray:
    """Mask of the highest-scoring face of each photo (ties: first face)."""
    order = np.lexsort((np.arange(len(s)), -s, photo))
    first = np.ones(len(s), bool)
    first[1:] = photo[order][1:] != photo[order][:-1]
    out = np.zeros(len(s), bool)
    out[order[first]] = True
    return out


def _mark_duplicates(emb, alive, quality, s, p: CleanParams, decision, reason, dup_of, pixel_sim=None) -> None:
    """decision / reason: code arrays (KEEP, REVIEW, DROP; RC), changed in place."""
    ids = np.nonzero(alive)[0]
    if len(ids) < 2:
        return
    # Embeddings alone: similarity >= dup. With the crops: from dup - 0.005 to dup + 0.005
    # a pair must be confirmed by the pixels (re-encoded / rescaled copies correlate
    # > 0.93 once aligned; two shots of the same event mostly do not); above, it need not.
    thr = p.dup if pixel_sim is None else p.dup - 0.005
    sure = p.dup + 0.005
    e = emb[ids]
    block = 2048
    parent: dict = {}

    def find(a):
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for b0 in range(0, len(ids), block):
        rows = e[b0:b0 + block]
        # only the columns from b0 on hold pairs i < j; BLAS gives them the same bits
        # as the full product when neither shape is small enough for its small-matrix kernel
        c0 = b0 if min(len(rows) * (len(e) - b0), len(rows) * len(e)) * e.shape[1] > 4_000_000 else 0
        sims = rows @ e[c0:].T
        rr, cc = np.nonzero(sims >= thr)
        cc += c0
        upper = ids[b0 + rr] < ids[cc]
        for r, c in zip(rr[upper].tolist(), cc[upper].tolist()):
            a, b = int(ids[b0 + r]), int(ids[c])
            ra, rb = find(a), find(b)
            if ra != rb and (pixel_sim is None or sims[r, c - c0] >= sure or pixel_sim(a, b) >= p.dup_pixel):
                parent[max(ra, rb)] = min(ra, rb)
    if not parent:
        return
    groups = defaultdict(list)
    for i in ids.tolist():
        if i in parent:
            groups[find(i)].append(i)
    for g in groups.values():
        if len(g) < 2:
            continue
        best = min(g, key=lambda i: (int(decision[i]), -float(quality[i]), -float(s[i]), i))
        for i in g:
            if i != best:
                decision[i], reason[i], dup_of[i] = DROP, RC[R_DUPLICATE], best


def limit_review(decisions: list, reasons: list, scores: np.ndarray, p: CleanParams, total: int) -> int:
    """Shrink the review band from below until at most ``max_review`` of ``total``
    faces are in review: the band keeps the faces just short of the keep threshold
    (the ones a person is most likely to rescue), the rest of it is dropped. Faces at
    or above ``keep`` are never touched, so the kept set does not depend on the
    budget. Returns how many reviews were resolved."""
    budget = int(np.floor(p.max_review * total))
    band = [i for i, r in enumerate(reasons) if decisions[i] == C.DECISION_REVIEW and r == R_BAND]
    other = sum(1 for d in decisions if d == C.DECISION_REVIEW) - len(band)
    allowed = max(0, budget - other)
    if len(band) <= allowed:
        return 0
    order = sorted(band, key=lambda i: (-float(scores[i]), i))
    for i in order[allowed:]:
        decisions[i], reasons[i] = C.DECISION_DROP, R_FAR
    return len(order) - allowed


# ----------------------------------------------------------------------------- cross-identity
def similar_pairs(vecs: np.ndarray, threshold: float, *, exact_below: int = 20000, seed: int = 0,
                  use_faiss: bool | None = None, pool: LocalPool | None = None) -> list[tuple[int, int, float]]:
    """Pairs (i < j) of unit vectors with cosine >= threshold. Exact (blocked) for small
    sets; above ``exact_below`` an inverted-file search (faiss when importable, numpy
    otherwise) that costs ~n^1.5 instead of n^2; the numpy one spreads its lists over
    ``pool``'s workers (same pairs, same bits). Sorted by (-sim, i, j)."""
    vecs = np.ascontiguousarray(vecs, np.float32)
    n = len(vecs)
    if n < 2:
        return []
    if n <= exact_below:
        pairs = _pairs_exact(vecs, threshold)
    else:
        if use_faiss is None:
            use_faiss = _have_faiss()
        pairs = _pairs_ivf_faiss(vecs, threshold, seed) if use_faiss else \
            _pairs_ivf_numpy(vecs, threshold, seed, pool)
    pairs.sort(key=lambda t: (-round(t[2], 6), t[0], t[1]))
    return pairs


def _have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _pairs_exact(vecs, thr, block=4096):
    out = []
    n = len(vecs)
    for b0 in range(0, n, block):
        sims = vecs[b0:b0 + block] @ vecs[b0:].T
        rr, cc = np.nonzero(sims >= thr)
        for r, c in zip(rr.tolist(), cc.tolist()):
            i, j = b0 + r, b0 + c
            if i < j:
                out.append((i, j, float(sims[r, c])))
    return out


def _kmeans(x: np.ndarray, k: int, seed: int, iters: int = 10) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cent = x[np.sort(rng.choice(len(x), size=k, replace=False))].copy()
    for _ in range(iters):
        a = _assign(x, cent, 1)[:, 0]
        sums = np.zeros_like(cent)
        _add_at_rows(sums, a, x)
        cnt = np.bincount(a, minlength=k)
        empty = cnt == 0
        sums[empty] = cent[empty]
        cent = _norm(sums)
    return cent


def _add_at_rows(sums: np.ndarray, idx: np.ndarray, x: np.ndarray) -> None:
    """``np.add.at(sums, idx, x.astype(sums.dtype))`` with the same bits (each row of
    ``sums`` adds its rows of ``x`` one by one, in order), without its per-row cost:
    one vectorised step per rank within a group."""
    if not len(idx):
        return
    order = np.argsort(idx, kind="stable")
    si = idx[order]
    starts = np.r_[0, np.flatnonzero(si[1:] != si[:-1]) + 1]
    sizes = np.diff(np.r_[starts, len(si)])
    big = np.argsort(-sizes, kind="stable")  # groups by decreasing size
    starts, dest, left = starts[big], si[starts[big]], sizes[big][::-1]
    for r in range(int(sizes.max())):
        g = len(left) - int(np.searchsorted(left, r, side="right"))  # groups with more than r rows
        sums[dest[:g]] += x[order[starts[:g] + r]].astype(sums.dtype, copy=False)


def _assign(x: np.ndarray, cent: np.ndarray, nprobe: int, block: int = 65536) -> np.ndarray:
    out = np.empty((len(x), nprobe), np.int64)
    for b0 in range(0, len(x), block):
        s = x[b0:b0 + block] @ cent.T
        if nprobe == 1:
            out[b0:b0 + block, 0] = s.argmax(1)
        else:
            part = np.argpartition(-s, nprobe - 1, axis=1)[:, :nprobe]
            out[b0:b0 + block] = np.take_along_axis(part, np.argsort(
                -np.take_along_axis(s, part, 1), axis=1, kind="stable"), 1)
    return out


def _home_and_probes(t: dict) -> tuple:
    """Worker: ``_assign(x, cent, 1)`` and ``_assign(x, cent, nprobe)`` of one block
    of rows, from one product."""
    x = t["x"].get() if isinstance(t["x"], SharedArray) else t["x"]
    s = x[t["a"]:t["b"]] @ t["cent"].T
    part = np.argpartition(-s, t["nprobe"] - 1, axis=1)[:, :t["nprobe"]]
    probes = np.take_along_axis(part, np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable"), 1)
    return s.argmax(1), probes


def _ivf_shape(n: int) -> tuple[int, int]:
    nlist = int(max(16, min(4096, round(np.sqrt(n)))))
    return nlist, 8


def _pairs_ivf_numpy(vecs, thr, seed, pool: LocalPool | None = None):
    n = len(vecs)
    nlist, nprobe = _ivf_shape(n)
    rng = np.random.default_rng(seed)
    train = vecs[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))]
    cent = _kmeans(train, nlist, seed)
    shared = pool is not None and pool.workers > 1
    V = pool.share(vecs) if shared else vecs
    block = 65536  # as _assign
    tasks = [dict(x=V, a=a, b=min(n, a + block), cent=cent, nprobe=nprobe) for a in range(0, n, block)]
    hp = list(pool.map(_home_and_probes, tasks) if shared else map(_home_and_probes, tasks))
    home, probes = np.concatenate([h for h, _ in hp]), np.concatenate([q for _, q in hp])
    members = _group(home)
    queries = _group(probes.reshape(-1))  # queries of each list: every vector that probes it
    lists = [(members[k], np.unique(queries[k] // nprobe)) for k in range(nlist) if k in members and k in queries]
    per = max(1, -(-len(lists) // (4 * pool.workers)) if shared else len(lists))
    tasks = [dict(V=V, thr=thr, lists=lists[a:a + per]) for a in range(0, len(lists), per)]
    parts = list(pool.map(_ivf_lists, tasks) if shared else map(_ivf_lists, tasks))
    if not parts:
        return []
    a, b, s = (np.concatenate([x[f] for x in parts]) for f in range(3))
    # a pair met in several lists: the similarity of the last one (as a dict in list order)
    key = (a * n + b)[::-1]
    _, last = np.unique(key, return_index=True)
    last = len(key) - 1 - last
    return list(zip(a[last].tolist(), b[last].tolist(), s[last].astype(np.float64).tolist()))


def _ivf_lists(t: dict):
    """Worker: the pairs (a < b, sim) at or above ``thr`` between each list's members
    and its queries, in list order, then row-major order within a list."""
    vecs = t["V"].get() if isinstance(t["V"], SharedArray) else t["V"]
    out_a, out_b, out_s = [], [], []
    for m, q in t["lists"]:
        sims = vecs[q] @ vecs[m].T
        rr, cc = np.nonzero(sims >= t["thr"])
        i, j = q[rr], m[cc]
        ok = i != j
        out_a.append(np.minimum(i, j)[ok])
        out_b.append(np.maximum(i, j)[ok])
        out_s.append(sims[rr[ok], cc[ok]])
    cat = np.concatenate
    return (cat(out_a) if out_a else np.zeros(0, np.int64), cat(out_b) if out_b else np.zeros(0, np.int64),
            cat(out_s) if out_s else np.zeros(0, np.float32))


def _group(labels: np.ndarray) -> dict:
    order = np.argsort(labels, kind="stable")
    lab = labels[order]
    cuts = np.nonzero(np.diff(lab))[0] + 1
    return {int(g[0]): order[s:e] for g, s, e in zip(np.split(lab, cuts), np.r_[0, cuts], np.r_[cuts, len(lab)])}


def _pairs_ivf_faiss(vecs, thr, seed):
    import faiss

    n, d = vecs.shape
    nlist, nprobe = _ivf_shape(n)
    quant = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    index.cp.seed = seed
    index.train(vecs[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))])
    index.add(vecs)
    index.nprobe = nprobe
    lims, dist, lab = index.range_search(vecs, float(thr))
    q = np.repeat(np.arange(n, dtype=np.int64), np.diff(lims).astype(np.int64))
    lab = lab.astype(np.int64)
    ok = (q != lab) & (lab >= 0)
    a, b = np.minimum(q[ok], lab[ok]), np.maximum(q[ok], lab[ok])
    _, first = np.unique(a * n + b, return_index=True)
    return [(int(x), int(y), float(s)) for x, y, s in zip(a[first], b[first], dist[ok][first])]


# ----------------------------------------------------------------------------- the core on arrays
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


def clean_core(emb: np.ndarray, identity: np.ndarray, photo: np.ndarray, quality: np.ndarray,
               p: CleanParams, *, face_size: np.ndarray | None = None, sharpness: np.ndarray | None = None,
               excluded: Iterable[int] = (),
               exclude_vecs: np.ndarray | None = None, pixel_sim: Callable[[int, int], float] | None = None,
               show_progress: bool = False, workers: int | None = 1, shard_faces: int | None = None) -> CoreResult:
    """clean on arrays: ``identity`` (n,) ints 0..k-1, ``photo`` (n,) ints (unique per
    photo across the whole set), ``quality`` (n,) floats; ``pixel_sim(i, j)`` compares
    two faces' crops (confirms near-duplicates; see ``CropSimilarity``). Deterministic:
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
    groups = _group(identity) if n else {}
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
                    info[g]["flags"].append("ambiguous")
        offset = None
        if n and (p.cohort or p.cohort_centre or p.spread or sharpness is not None):
            offset = score_offsets(emb, identity, raw, subject & (raw >= p.drop), centres, np.asarray(keys), med,
                                   p, sharpness, pool=pool, shared=E)
        # 4-5 per identity: thresholds on the corrected scores, duplicates
        local = pixel_sim is not None and pool.workers > 1 and not hasattr(pixel_sim, "subset")
        tasks = [dict(E=E, rows=rows, bounds=b, block=blk, quality=quality[rows], p=p,
                      face_size=None if face_size is None else np.asarray(face_size)[rows],
                      offset=None if offset is None else offset[rows],
                      pixel=None if pixel_sim is None else pixel_sim if local or pool.workers == 1 else
                      pixel_sim.subset(rows), global_pixel=local or pool.workers == 1)
                 for (rows, b, _), blk in zip(shards, blocks)]
        # an arbitrary pixel_sim callable cannot travel to the workers: decide here then
        decided = map(_decide_shard, tasks) if local else _largest_first(pool, _decide_shard, tasks)
        dec, rea = np.full(n, DROP, np.uint8), np.full(n, RC[R_FAR], np.uint8)
        score, dup_of = np.zeros(n, np.float32), np.full(n, -1, np.int64)
        for (rows, _, _), out in zip(shards, progress(decided, total=len(tasks), desc="clean", **bar)):
            dec[rows], rea[rows], score[rows] = out["decision"], out["reason"], out["score"]
            pos = out["dup_of"]
            dup_of[rows[pos >= 0]] = rows[pos[pos >= 0]]
        return _finish_core(emb, identity, p, dec, rea, score, cluster, dup_of, centres, info, excluded,
                            exclude_vecs, pool)


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
    """Worker: analyse_identity for each identity of a shard, packed into arrays."""
    emb, rows, b, p = t["E"].get(), t["rows"], t["bounds"], t["p"]
    res = [analyse_identity(np.asarray(emb[rows[b[j]:b[j + 1]]]), t["photo"][b[j]:b[j + 1]], p)
           for j in range(len(b) - 1)]
    zero = np.zeros(t["d"], np.float32)
    return dict(
        s=np.concatenate([a.s for a in res]), subject=np.concatenate([a.subject for a in res]),
        cluster=np.concatenate([a.cluster for a in res]),
        centre=np.stack([zero if a.centre is None else a.centre for a in res]),
        nclus=np.array([a.clusters for a in res], np.int64),
        minority=np.concatenate([a.minority for a in res]), rival=np.concatenate([a.rival for a in res]),
        dominant_share=np.array([a.dominant_share for a in res], np.float64),
        ambiguous=np.array([a.ambiguous for a in res], bool), median=np.array([a.median for a in res], np.float64))


def _unpack(blk: dict, b: np.ndarray) -> list:
    cb = np.r_[0, np.cumsum(blk["nclus"])]
    return [Analysis(blk["s"][b[j]:b[j + 1]], blk["cluster"][b[j]:b[j + 1]], blk["subject"][b[j]:b[j + 1]],
                     blk["centre"][j], blk["minority"][cb[j]:cb[j + 1]], blk["rival"][cb[j]:cb[j + 1]],
                     int(blk["nclus"][j]), float(blk["dominant_share"][j]), bool(blk["ambiguous"][j]),
                     float(blk["median"][j])) for j in range(len(b) - 1)]


def _decide_shard(t: dict) -> dict:
    """Worker: decide_identity for each identity of a shard."""
    emb, rows, b, p = t["E"].get(), t["rows"], t["bounds"], t["p"]
    n = len(rows)
    dec, rea = np.full(n, DROP, np.uint8), np.full(n, RC[R_FAR], np.uint8)
    score, dup = np.zeros(n, np.float32), np.full(n, -1, np.int64)
    pix, fs, off = t["pixel"], t["face_size"], t["offset"]
    for j, a in enumerate(_unpack(t["block"], b)):
        lo, hi = int(b[j]), int(b[j + 1])
        local_pix = None
        if pix is not None:  # identity index -> global index (global_pixel) or shard position
            tr = rows if t["global_pixel"] else np.arange(n)
            local_pix = (lambda x, y, lo=lo: pix(int(tr[lo + x]), int(tr[lo + y])))
        dd, rr, ss, du = decide_identity(a, np.asarray(emb[rows[lo:hi]]), t["quality"][lo:hi], p,
                                         None if fs is None else fs[lo:hi], None if off is None else off[lo:hi],
                                         local_pix)
        dec[lo:hi], rea[lo:hi], score[lo:hi] = dd, rr, ss
        dup[lo:hi] = np.where(du >= 0, du + lo, -1)
    return dict(decision=dec, reason=rea, score=score, dup_of=dup)


def _finish_core(emb, identity, p, dec, rea, score, cluster, dup_of, centres, info, excluded,
                 exclude_vecs, pool: LocalPool | None = None) -> CoreResult:
    """The cross-identity tail: exclusion, too few photos, the review budget, merges, counts."""
    n, (k, d) = len(emb), centres.shape
    # exclusion against an evaluation set's vectors
    if exclude_vecs is not None and len(exclude_vecs) and k:
        # an identity overlaps the evaluation set when two of its faces match the centre,
        # or one matches it clearly (one chance match among thousands of faces is likely)
        best, hits = _match_counts(centres, _norm(exclude_vecs), p.exclude)
        hit = (hits >= 2) | (best >= p.exclude + 0.015)
        excluded |= set(np.nonzero(hit)[0].tolist())
    if excluded:
        m = np.isin(identity, sorted(excluded))
        dec[m], rea[m] = DROP, RC[R_EXCLUDED]
        for g in excluded:
            if g < k:
                info[g]["flags"].append("excluded")
    # too few photos
    kept_by_id = np.bincount(identity[dec != DROP], minlength=k)
    m = (dec != DROP) & (kept_by_id[identity] < p.min_images)
    dec[m], rea[m] = DROP, RC[R_TOO_FEW]
    for g in np.nonzero((kept_by_id > 0) & (kept_by_id < p.min_images))[0].tolist():
        info[g]["flags"].append("too_few")
    resolved = _limit_review_codes(dec, rea, score, p, n)
    # centres of what is kept, for merges
    alive = dec == KEEP
    sums = np.zeros((k, d), np.float64)
    if alive.any():
        _add_at_rows(sums, identity[alive], emb[alive])
    has = np.linalg.norm(sums, axis=1) > 0
    fin = _norm(np.where(has[:, None], sums, centres)).astype(np.float32)
    live = np.nonzero(has & ~np.isin(np.arange(k), list(excluded)))[0]
    merges = [(int(live[a]), int(live[b]), s) for a, b, s in similar_pairs(fin[live], p.merge, pool=pool)]
    for a, b, _ in merges:
        for g in (a, b):
            if "merge_candidate" not in info[g]["flags"]:
                info[g]["flags"].append("merge_candidate")
    counts = dict(faces=np.ones(n, bool), kept=dec == KEEP, review=dec == REVIEW, dropped=dec == DROP,
                  duplicates=rea == RC[R_DUPLICATE], not_subject=rea == RC[R_NOT_SUBJECT])
    for name, m in counts.items():
        for g, c in enumerate(np.bincount(identity[m], minlength=k).tolist()):
            info[g][name] += c
    return CoreResult([DECISIONS[c] for c in dec.tolist()], [REASONS[c] for c in rea.tolist()], score, cluster,
                      dup_of, info, fin, merges, resolved)


def _limit_review_codes(dec, rea, score, p: CleanParams, total: int) -> int:
    """``limit_review`` on code arrays (in place)."""
    budget = int(np.floor(p.max_review * total))
    review = dec == REVIEW
    band = np.nonzero(review & (rea == RC[R_BAND]))[0]
    allowed = max(0, budget - (int(review.sum()) - len(band)))
    if len(band) <= allowed:
        return 0
    order = sorted(band.tolist(), key=lambda i: (-float(score[i]), i))
    gone = np.asarray(order[allowed:], np.int64)
    dec[gone], rea[gone] = DROP, RC[R_FAR]
    return len(order) - allowed


def score_offsets(emb, identity, raw, inl, cen, keys, med, p: CleanParams, sharpness=None, *,
                  pool: LocalPool | None = None, shared: SharedArray | None = None) -> np.ndarray:
    """Per-face corrections of the centre similarity, all measured on the dataset itself.
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
      median similarity (0..0.03).
    ``pool``/``shared`` (``emb`` shared with the pool) spread the cohort searches over
    the pool's workers, block by block as in one process.
    """
    n = len(emb)
    karr = np.asarray(keys)
    off = np.zeros(n, np.float64)
    if (p.cohort or p.cohort_centre) and len(karr) > 5:
        # identities that look like the same person (merge candidates) are not each other's cohort
        partners = defaultdict(list)
        for a, b, _ in similar_pairs(cen[karr], p.merge, pool=pool):
            partners[int(karr[a])].append(int(karr[b]))
            partners[int(karr[b])].append(int(karr[a]))
        if p.cohort:
            co = topk_other_mean(emb, identity, cen[karr], karr, 5, partners=partners, pool=pool, shared=shared)
            ref = float(np.median(co[inl])) if inl.any() else float(np.median(co))
            off += p.cohort * (co - ref)
        if p.cohort_centre:
            cc = centre_crowding(cen[karr], karr, emb, identity, 20, partners=partners, pool=pool)
            per = np.zeros(len(cen), np.float64)
            per[karr] = cc - float(np.median(cc))
            off += p.cohort_centre * per[identity]
    if p.spread and np.isfinite(med).any():
        gm = float(np.nanmedian(med))
        dev = np.where(np.isfinite(med), med - gm, 0.0)
        off += p.spread * dev[identity]
    if sharpness is not None:
        sh = np.asarray(sharpness, np.float64)
        low = np.isfinite(sh) & (sh > 0) & (sh < p.low_sharpness)
        hi = np.isfinite(sh) & (sh >= p.low_sharpness)
        if (inl & low).sum() >= 20 and (inl & hi).sum() >= 20:
            delta = float(np.clip(np.median(raw[inl & hi]) - np.median(raw[inl & low]), 0.0, 0.03))
            off -= delta * low
    return off.astype(np.float32)


def _chunks(n: int, block: int, pool: LocalPool | None) -> list:
    """Row ranges of whole blocks, a few per worker."""
    per = block * max(1, -(-n // (block * 4 * (pool.workers if pool else 1))))
    return [(a, min(n, a + per)) for a in range(0, n, per)] if pool and pool.workers > 1 else [(0, n)]


def topk_other_mean(q: np.ndarray, own: np.ndarray, centres: np.ndarray, ids: np.ndarray, k: int,
                    block: int = 4096, cohort_max: int = 5000, seed: int = 0,
                    partners: dict | None = None, pool: LocalPool | None = None,
                    shared: SharedArray | None = None) -> np.ndarray:
    """Mean similarity of each vector to its k nearest centres of other identities
    (``ids`` names the rows of ``centres``): an exact search over a cohort of at most
    ``cohort_max`` centres (a fixed random sample when there are more), so the cost is
    linear in the number of faces. ``partners`` (identity -> identities) are left out too.
    With a ``pool`` (``shared``: ``q`` shared with it) the blocks run on its workers."""
    n, m = len(q), len(centres)
    if m > cohort_max:
        pick = np.sort(np.random.default_rng(seed).choice(m, size=cohort_max, replace=False))
        centres, ids, m = centres[pick], ids[pick], cohort_max
    pos = np.full(int(max(ids.max(), own.max())) + 1, -1, np.int64)
    pos[ids] = np.arange(m)
    kk = max(1, min(k, m - 1))
    if pool is None or pool.workers == 1 or shared is None:
        return _topk_rows(dict(q=q, a=0, b=n, own=own, centres=centres, pos=pos, kk=kk, block=block,
                               partners=partners))
    cs = pool.share(np.ascontiguousarray(centres))
    tasks = [dict(q=shared, a=a, b=b, own=own[a:b], centres=cs, pos=pos, kk=kk, block=block, partners=partners)
             for a, b in _chunks(n, block, pool)]
    return np.concatenate(list(pool.map(_topk_rows, tasks)))


def _topk_rows(t: dict) -> np.ndarray:
    """topk_other_mean of rows a..b (a: a multiple of the block)."""
    q = t["q"].get() if isinstance(t["q"], SharedArray) else t["q"]
    centres = t["centres"].get() if isinstance(t["centres"], SharedArray) else t["centres"]
    a, b, own, pos, kk, block, partners = t["a"], t["b"], t["own"], t["pos"], t["kk"], t["block"], t["partners"]
    own_pos = pos[own]
    out = np.zeros(b - a, np.float32)
    for b0 in range(0, b - a, block):
        s = q[a + b0:min(b, a + b0 + block)] @ centres.T  # below: -np.partition(-s, ...) without copies
        op = own_pos[b0:b0 + block]
        ok = op >= 0
        s[np.arange(len(s))[ok], op[ok]] = -np.inf
        if partners:
            rr, cc = [], []
            for r_, g in enumerate(own[b0:b0 + block].tolist()):
                for h in partners.get(g, ()):
                    if 0 <= h < len(pos) and pos[h] >= 0:
                        rr.append(r_)
                        cc.append(pos[h])
            if rr:
                s[rr, cc] = -np.inf
        out[b0:b0 + block] = _topk_desc(s, kk).mean(1)
    return out


def _topk_desc(s: np.ndarray, kk: int, group: int = 100) -> np.ndarray:
    """The ``kk`` largest values of each row of ``s`` (changed), largest first: the
    first ``kk`` columns of ``-np.partition(-s, kk - 1, axis=1)``, which numpy's
    selection leaves sorted, so their mean has the same bits. Wide rows go through a
    bound instead of a full selection: the kk-th largest of the rows' group maxima is
    at most the kk-th largest value, so only the groups whose maximum reaches it hold
    candidates (about kk of them)."""
    b, m = s.shape
    ng = -(-m // group)
    if m < 4 * group or ng < kk or not b:
        np.negative(s, out=s)  # -np.partition(-s, ...) without copies
        s.partition(kk - 1, axis=1)
        return -s[:, :kk]
    gmax = np.maximum.reduceat(s, np.arange(0, m, group), axis=1)
    g = -gmax
    g.partition(kk - 1, axis=1)
    t = -g[:, kk - 1]
    if not np.isfinite(t).all() or np.isnan(gmax).any():  # -inf / nan rows: the full selection
        return _topk_desc(s, kk, group=m + 1)
    hit = np.flatnonzero(gmax >= t[:, None])
    row, grp = np.divmod(hit, ng)
    cols = grp[:, None] * group + np.arange(group)
    vals = s[row[:, None], np.minimum(cols, m - 1)]
    vals[cols >= m] = -np.inf
    ok = vals >= t[row][:, None]
    rr, vv = np.broadcast_to(row[:, None], ok.shape)[ok], vals[ok]
    order = np.lexsort((-vv, rr))
    first = np.searchsorted(rr[order], np.arange(b))
    return vv[order][first[:, None] + np.arange(kk)]


def centre_crowding(centres: np.ndarray, ids: np.ndarray, emb: np.ndarray, identity: np.ndarray, k: int,
                    sample: int = 5000, seed: int = 0, block: int = 2048,
                    partners: dict | None = None, pool: LocalPool | None = None) -> np.ndarray:
    """Mean similarity of each identity centre to its ``k`` nearest faces of *other*
    identities (and not of its merge ``partners``): how close another person's face
    can come to this centre in this dataset. A centre in a crowded region of face
    space (many look-alikes) needs more evidence. The faces searched are a fixed
    random sample of at most ``sample`` (cost linear in the number of identities).
    With a ``pool`` the blocks of centres run on its workers."""
    n = len(emb)
    pick = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    fe, fid = emb[pick], identity[pick]
    kk = max(1, min(k, len(pick) - 1))
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
    for b0 in range(0, len(centres), block):
        s = centres[b0:b0 + block] @ fe.T
        bid = ids[b0:b0 + block]
        s[bid[:, None] == fid[None, :]] = -np.inf
        if partners:
            for r_, g in enumerate(bid.tolist()):
                for h in partners.get(g, ()):
                    s[r_, fid == h] = -np.inf
        top = _topk_desc(s, kk)
        top[~np.isfinite(top)] = np.nan
        out[b0:b0 + block] = np.nan_to_num(np.nanmean(top, 1), nan=0.0) if np.isnan(top).any() else top.mean(1)
    return out


def _match_counts(a: np.ndarray, b: np.ndarray, thr: float, block: int = 8192):
    best = np.full(len(a), -1.0, np.float32)
    hits = np.zeros(len(a), np.int64)
    for b0 in range(0, len(b), block):
        s = a @ b[b0:b0 + block].T
        best = np.maximum(best, s.max(1))
        hits += (s >= thr).sum(1)
    return best, hits


# ----------------------------------------------------------------------------- calibration
def calibrate(emb: np.ndarray, identity: np.ndarray, photo: np.ndarray, p: CleanParams, far: float,
              seed: int = 0) -> CleanParams:
    """Estimate keep/drop from the data: genuine = each subject face's similarity to
    its own identity's robust centre (leave-in, default thresholds), impostor = a
    face's similarity to other identities' centres. ``drop`` is the impostor score
    at false-accept rate ``far``; ``keep`` the one at ``far / 10``; other thresholds
    are shifted by the same amount as ``drop`` moved from its default."""
    identity = np.asarray(identity, np.int64)
    groups = _group(identity)
    keys = sorted(groups)
    cents = []
    for g in keys:
        rows = groups[g]
        r = clean_identity(emb[rows], photo[rows], np.zeros(len(rows)), p)
        cents.append(r.centre)
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


# ----------------------------------------------------------------------------- files
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
    from facecurate.embed import crop_points, dlib_chip, dlib_embedder

    emb = dlib_embedder("crop", runtime)
    out = []
    for b0 in range(0, len(crops), 64):
        chips = [dlib_chip(c, crop_points(c)) for c in crops[b0:b0 + 64]]
        out.append(emb.run(chips, bool(meta.get("flip", False))))
    return _norm(np.concatenate(out))


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
    manifest = out_dir / C.ALIGN_MANIFEST
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} not found: run `facecurate align RAW {out_dir}` first")
    # A file directly under RAW (identity "") is recorded by align but belongs to no identity.
    all_rows = [r for r in read_csv(manifest) if r.get("identity")]
    rows = [r for r in all_rows if r.get("aligned")]
    images_by_id = defaultdict(set)
    for r in all_rows:
        images_by_id[r["identity"]].add(r["source"])
    vecs, where, meta = ensure_embeddings(out_dir, rows, runtime) if rows else (np.zeros((0, 128), np.float32), {}, {})
    model = _model_name(meta)
    ov = dict(model_overrides or {})
    ov.update(max_review=max_review, min_images=min_images, min_face=min_face, ambiguous=ambiguous)
    p = default_params(model, **ov)
    # stable order: identity, source, face
    rows.sort(key=lambda r: (r["identity"], r["source"], int(r["face"])))
    have = [r for r in rows if r["aligned"] in where]
    missing = [r for r in rows if r["aligned"] not in where]
    names = sorted({r["identity"] for r in have})
    gid = {nm: i for i, nm in enumerate(names)}
    emb = _norm(np.asarray(vecs[[where[r["aligned"]] for r in have]], np.float32)) if have else \
        np.zeros((0, vecs.shape[1] if vecs.ndim == 2 else 128), np.float32)
    identity = np.array([gid[r["identity"]] for r in have], np.int64)
    srcs = {}
    photo = np.array([srcs.setdefault(r["source"], len(srcs)) for r in have], np.int64)
    fsize = np.array([_f(r.get("face_size")) for r in have], np.float32)
    sharp = np.array([_f(r.get("sharpness")) for r in have], np.float32)
    quality = fsize * 1000.0 + np.minimum(sharp, 999.0)
    if calibrate_far is not None and len(names) >= 2:
        p = calibrate(emb, identity, photo, p, calibrate_far)
    ex_ids: set[int] = set()
    ex_vecs = None
    for e in exclude:
        nm, imgs = read_exclude(Path(e))
        low = {s.lower().replace(" ", "_") for s in nm}
        ex_ids |= {gid[x] for x in names if x.lower().replace(" ", "_") in low}
        if imgs:
            # auto: the store's own runtime, so the .bin's faces are embedded as the store's were
            v = embed_images(imgs, meta, _store_runtime(meta) if runtime == "auto" and meta else runtime)
            ex_vecs = v if ex_vecs is None else np.concatenate([ex_vecs, v])
    res = clean_core(emb, identity, photo, quality, p, face_size=fsize, sharpness=sharp, excluded=ex_ids,
                     exclude_vecs=ex_vecs, pixel_sim=CropSimilarity([out_dir / r["aligned"] for r in have]),
                     show_progress=show_progress, workers=workers, shard_faces=shard_faces)
    out = []
    for i, r in enumerate(have):
        out.append(dict(
            source=r["source"], identity=r["identity"], face=r["face"], aligned=r["aligned"],
            x1=r.get("x1", ""), y1=r.get("y1", ""), x2=r.get("x2", ""), y2=r.get("y2", ""),
            primary=r.get("primary", ""), det_score=r.get("det_score", ""), sharpness=r.get("sharpness", ""),
            decision=res.decision[i], reason=res.reason[i], score=format_float(float(res.score[i])),
            cluster=int(res.cluster[i]),
            duplicate_of=have[res.dup_of[i]]["aligned"] if res.dup_of[i] >= 0 else "",
            previous_decision="", previous_reason=""))
    for r in missing:
        out.append(dict(source=r["source"], identity=r["identity"], face=r["face"], aligned=r["aligned"],
                        x1=r.get("x1", ""), y1=r.get("y1", ""), x2=r.get("x2", ""), y2=r.get("y2", ""),
                        primary=r.get("primary", ""), det_score=r.get("det_score", ""),
                        sharpness=r.get("sharpness", ""), decision=C.DECISION_DROP, reason=R_NO_EMBEDDING,
                        score="", cluster=-1, duplicate_of="", previous_decision="", previous_reason=""))
    out.sort(key=lambda r: (r["identity"], r["source"], int(r["face"])))
    manual_kept, manual_lost = _carry_manual(out_dir / C.CLEAN_CSV, out) if keep_manual else (0, 0)
    ident_rows = []
    all_names = sorted(images_by_id)
    for nm in all_names:
        g = gid.get(nm)
        inf = res.identities[g] if g is not None else dict(faces=0, kept=0, dropped=0, review=0, duplicates=0,
                                                           not_subject=0, clusters=0, dominant_share=0.0,
                                                           flags=["no_faces"])
        sc = res.score[identity == g] if g is not None else np.zeros(0)
        kept_mask = np.array([res.decision[i] == C.DECISION_KEEP for i in np.nonzero(identity == g)[0]], bool) \
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
    merge_rows = [dict(a=names[a], b=names[b], similarity=format_float(s)) for a, b, s in res.merges]
    write_csv_atomic(out_dir / C.CLEAN_CSV, C.CLEAN_COLUMNS, out)
    write_csv_atomic(out_dir / C.IDENTITIES_CSV, IDENTITY_COLUMNS, ident_rows)
    write_csv_atomic(out_dir / C.MERGES_CSV, MERGE_COLUMNS, merge_rows)
    counts = defaultdict(int)
    reasons = defaultdict(int)
    for r in out:
        counts[r["decision"]] += 1
        reasons[r["reason"]] += 1
    summary = dict(
        faces=len(out), identities=len(all_names),
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
    write_text_atomic(out_dir / C.CLEAN_META, json.dumps(dict(summary=summary, params=p.as_dict()),
                                                         indent=2, sort_keys=True) + "\n")
    return summary
