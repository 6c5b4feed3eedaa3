"""clean's per-identity algorithm (linear in the identity's faces; all-pairs steps run
on at most ``CleanParams.sample`` faces):

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
   0.005 of ``dup`` are decided by the crops' pixels
   (:class:`facecurate.clean.CropSimilarity`).

Steps 1-3 are :func:`analyse_identity`, 4-5 :func:`decide_identity`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from facecurate.clean.clean_params import (
    DECISIONS, DROP, KEEP, R_AMBIGUOUS, R_BAND, R_CENTRE, R_DUPLICATE, R_FAR, R_LOW_QUALITY, R_MINORITY,
    R_NOT_SUBJECT, RC, REASONS, REVIEW, CleanParams,
)
from facecurate.clean.vectors import BLAS_SMALL_PRODUCT, normalize


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
    subtracted from each face's similarity before the thresholds (see ``clean_cohort.score_offsets``);
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
        cent = normalize(np.stack([es[first[k]] if sizes[k] == 1 else _mean0(es[lab_s == k]) for k in range(nclus)]))
        joined = (cent @ cent[0] >= p.join) & (sizes >= 1)
        joined[0] = True
    dom_size = int(sizes[joined].sum())
    # 2. robust centre
    members = cluster >= 0
    members[members] = joined[cluster[members]]
    c = normalize(_mean0(emb[members]))
    shared = not (np.diff(photo) > 0).all() and len(np.unique(photo)) < n  # some photo has several faces

    def best_per_photo(s):
        return _best_per_photo(s, photo) if shared else np.ones(n, bool)

    for _ in range(p.iters):
        s = emb @ c
        inl = best_per_photo(s) & (s >= p.drop)
        if not inl.any():
            break
        c_new = normalize(_mean0(emb[inl]))
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
            s[ii] = np.einsum("ij,ij->i", emb[ii], normalize(tot[None, :] - emb[ii]))
            out = np.nonzero(~inl)[0]
            s[out] = emb[out] @ normalize(tot)
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


def apply_thresholds(s: np.ndarray, subject: np.ndarray, cluster: np.ndarray, minority: np.ndarray,
                     face_size: np.ndarray | None, p: CleanParams, dec: np.ndarray, rea: np.ndarray) -> None:
    """Step 4 on code arrays (changed in place, from DROP / far_from_centre): keep and
    review bands of the subject faces, minority clusters, low quality, not the subject.
    ``cluster`` indexes ``minority`` (-1: in no cluster); shared by one identity and by
    a shard of identities (:mod:`facecurate.clean.clean_batch`)."""
    n = len(s)
    low = subject & (np.asarray(face_size) < p.min_face) if face_size is not None and p.min_face > 0 else \
        np.zeros(n, bool)
    rest = subject & ~low
    keep = rest & (s >= p.keep)
    band = rest & ~keep & (s >= p.drop)
    dec[keep], rea[keep] = KEEP, RC[R_CENTRE]
    dec[band], rea[band] = REVIEW, RC[R_BAND]
    far = rest & ~keep & ~band & (cluster >= 0)
    far[far] = minority[cluster[far]]
    rea[far] = RC[R_MINORITY]
    rea[low] = RC[R_LOW_QUALITY]
    rea[~subject] = RC[R_NOT_SUBJECT]


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
    apply_thresholds(s, a.subject, a.cluster, a.minority, face_size, p, dec, rea)
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
        c0 = b0 if min(len(rows) * (len(e) - b0), len(rows) * len(e)) * e.shape[1] > BLAS_SMALL_PRODUCT else 0
        sims = rows @ e[c0:].T
        rr, cc = np.divmod(np.flatnonzero(sims >= thr), sims.shape[1])  # np.nonzero's pairs, in its order
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

