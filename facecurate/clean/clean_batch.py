"""The per-identity steps of the clean stage for many small identities at once.

Most identities of a crawl have a handful of faces, where one identity's work is a
hundred numpy calls on tiny arrays: the per-call cost dominates. ``analyse_rows``
stacks identities of the same size ``n`` into one (B, n, d) array and runs each step
of ``analyse_identity`` once for the whole stack. The result has the bits
``analyse_identity`` gives, identity by identity: every product goes through the
same BLAS routine with the same shapes (numpy's batched matmul calls it once per
identity; a product on a subset of rows is made on exactly that subset), every mean
adds the same rows in the same order (a sum over the first axis adds row after row;
a row left out adds +0.0, which changes nothing), and every norm reduces the same
row. An identity outside the common case (more than MAX_BATCH faces, a graph that is
not a union of cliques, nan) goes through ``analyse_identity`` itself.
``decide_rows`` applies the thresholds of ``decide_identity`` to a whole shard and
names the identities where duplicates or ambiguity can still change them.
tests/test_clean.py compares both with the per-identity functions bit for bit.
"""

from __future__ import annotations

import numpy as np

from facecurate.clean.clean_identity import analyse_identity, apply_thresholds
from facecurate.clean.clean_params import DROP, R_FAR, RC
from facecurate.clean.vectors import normalize as _norm

#: identities of 2..MAX_BATCH faces take the stacked path
MAX_BATCH = 32


def _masked_sums(E: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(B, d): the rows of each E[b] where mask[b], added one after the other (as
    ``np.add.reduce(E[b][mask[b]], axis=0)``)."""
    return np.add.reduce(np.where(mask[:, :, None], E, np.float32(0)), axis=1)


def _masked_means(E: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``facecurate.clean.clean_identity._mean0(E[b][mask[b]])`` for each b (float64 division, as there)."""
    r = _masked_sums(E, mask)
    cnt = np.maximum(mask.sum(1), 1).astype(np.intp)
    return np.true_divide(r, cnt[:, None], out=r, casting="unsafe")


def _label_sums(E: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """(B, n, d): for each label k, the rows of E[b] labelled k, added in order."""
    B, n, _ = E.shape
    acc = np.zeros_like(E)
    rows = np.arange(B)
    for i in range(n):
        acc[rows, lab[:, i]] += E[:, i]
    return acc


def _matvec_by_rows(M: np.ndarray, v: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """out[b, i] = (M[b][rows[b]] @ v[b])[rank of i] for the rows set in ``rows[b]``:
    each identity's product on exactly its selected rows (BLAS gives a row other bits in
    a matrix of another height), stacked by the number of rows."""
    out = np.zeros(rows.shape, np.float32)
    cnt = rows.sum(1)
    for m in np.unique(cnt[cnt > 0]).tolist():
        bs = np.nonzero(cnt == m)[0]
        sel = rows[bs]
        sub = M[bs][sel].reshape(len(bs), m, M.shape[2])
        r = np.matmul(sub, v[bs][:, :, None])[:, :, 0]
        o = out[bs]
        o[sel] = r.reshape(-1)
        out[bs] = o
    return out


def _cliques(E: np.ndarray, cw: float):
    """Chinese whispers when every component of the graph is a clique (see
    ``chinese_whispers``): labels by size (ties by first member), counts; ok False
    where the graph is not a union of cliques."""
    B, n, _ = E.shape
    ar = np.arange(n)
    adj = np.matmul(E, E.transpose(0, 2, 1)) >= cw
    adj[:, ar, ar] = True
    first = adj.argmax(2)
    ok = (adj == (first[:, :, None] == first[:, None, :])).all((1, 2))
    counts = (first[:, :, None] == ar).sum(1)  # faces per label (a label names its first member)
    key = np.where(counts > 0, (n + 1 - counts) * (n + 1) + ar, (n + 2) * (n + 1))
    order = np.argsort(key, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(ar, (B, n)), axis=1)
    lab = np.take_along_axis(rank, first, 1)
    sizes = np.take_along_axis(counts, order, 1)  # by rank; 0 past the last cluster
    return lab, sizes, (counts > 0).sum(1), ok


def _dominant(E: np.ndarray, lab: np.ndarray, sizes: np.ndarray, nclus: np.ndarray, join: float) -> np.ndarray:
    """(B, n) bool: the clusters joined to the largest one (cluster centres' similarity
    to cluster 0's at or above ``join``)."""
    B, n, _ = E.shape
    joined = np.zeros((B, n), bool)
    joined[:, 0] = True
    multi = np.nonzero(nclus > 1)[0]
    if len(multi):
        Em, lm, sm = E[multi], lab[multi], sizes[multi]
        cent = _label_sums(Em, lm)
        np.true_divide(cent, np.maximum(sm, 1).astype(np.intp)[:, :, None], out=cent, casting="unsafe")
        cent = _norm(cent)
        live = np.arange(n) < nclus[multi][:, None]
        sims = _matvec_by_rows(cent, np.ascontiguousarray(cent[:, 0]), live)
        j = live & (sims >= join) & (sm >= 1)
        j[:, 0] = True
        joined[multi] = j
    return joined


def _best_per_photo(s: np.ndarray, photo: np.ndarray) -> np.ndarray:
    """``facecurate.clean.clean_identity._best_per_photo`` of each row: no other face of the photo
    scores higher, or the same and comes first."""
    n = s.shape[1]
    earlier = np.arange(n)[None, :] < np.arange(n)[:, None]  # [i, j]: j before i
    a, o = s[:, :, None], s[:, None, :]
    beaten = (photo[:, :, None] == photo[:, None, :]) & ((o > a) | ((o == a) & earlier))
    return ~beaten.any(2)


def _centre(E: np.ndarray, members: np.ndarray, photo: np.ndarray, p):
    """The robust centre (iterated trimmed mean) and each face's similarity to it."""
    c = _norm(_masked_means(E, members))
    active = np.ones(len(E), bool)
    for _ in range(p.iters):
        s = np.matmul(E, c[:, :, None])[:, :, 0]
        inl = _best_per_photo(s, photo) & (s >= p.drop)
        upd = active & inl.any(1)
        if not upd.any():
            break
        c_new = _norm(_masked_means(E, inl))
        close = np.all(np.abs(c_new - c) <= 1e-6 + 1e-5 * np.abs(c), axis=1)
        c[upd] = c_new[upd]
        active = upd & ~close
    return c, np.matmul(E, c[:, :, None])[:, :, 0].astype(np.float32)


def _leave_one_out(E: np.ndarray, s: np.ndarray, photo: np.ndarray, drop: float) -> np.ndarray:
    """Each inlier scored against the centre of the other inliers, the rest against the
    centre of all inliers (identities with at least two inliers)."""
    inl = _best_per_photo(s, photo) & (s >= drop)
    two = inl.sum(1) >= 2
    if not two.any():
        return s
    s = s.copy()
    Et, it = E[two], inl[two]
    tot = _masked_sums(Et, it)
    loo = np.einsum("bij,bij->bi", Et, _norm(tot[:, None, :] - Et))
    rest = _matvec_by_rows(Et, _norm(tot), ~it)
    st = s[two]
    st[it] = loo[it]
    st[~it] = rest[~it]
    s[two] = st
    return s


def analyse_stack(E: np.ndarray, photo: np.ndarray, p) -> dict:
    """``analyse_identity`` of B identities of n faces each (2 <= n <= p.sample).
    E: (B, n, d) float32; photo: (B, n). Per identity: s, cluster, subject (B, n);
    centre (B, d); nclus, dominant_share, ambiguous, median (B,); minority, rival
    (B, n), valid in their first nclus entries; ok (B,): False where the general path
    must decide."""
    E = np.ascontiguousarray(E, np.float32)
    B, n, _ = E.shape
    ar = np.arange(n)
    lab, sizes, nclus, ok = _cliques(E, p.cw)
    joined = _dominant(E, lab, sizes, nclus, p.join)
    dom_size = (sizes * joined).sum(1)
    members = np.take_along_axis(joined, lab, 1)
    c, s = _centre(E, members, photo, p)
    if p.loo:
        s = _leave_one_out(E, s, photo, p.drop)
    ok &= ~np.isnan(s).any(1)
    subject = _best_per_photo(s, photo)
    good = subject & (s >= p.drop)
    inliers = good.sum(1)
    rej = ((lab[:, :, None] == ar) & (subject & ~good)[:, :, None]).sum(1)  # rejected faces per cluster
    second = rej.max(1)
    bar = p.ambiguous_ratio * np.maximum(1, inliers)
    ambiguous = (second >= 2) & (second >= bar)
    live = ar < nclus[:, None]
    rival = ambiguous[:, None] & live & (joined | (rej >= bar[:, None]))
    v = np.sort(np.where(good, s, np.float32(np.inf)), axis=1)
    h = inliers // 2
    mid = np.take_along_axis(v, np.minimum(h, n - 1)[:, None], 1)[:, 0]
    low = np.take_along_axis(v, np.maximum(h - 1, 0)[:, None], 1)[:, 0]
    even = ((low + mid).astype(np.float64) / 2).astype(np.float32)
    median = np.where(inliers < 3, np.nan, np.where(inliers % 2 == 1, mid, even).astype(np.float64))
    return dict(s=s.astype(np.float32), cluster=lab.astype(np.int64), subject=subject, centre=c,
                nclus=nclus.astype(np.int64), minority=live & ~joined & (sizes >= 2), rival=rival,
                dominant_share=dom_size / n, ambiguous=ambiguous, median=median, ok=ok)


def analyse_rows(emb: np.ndarray, rows: np.ndarray, photo: np.ndarray, b: np.ndarray, p) -> dict:
    """``analyse_identity`` of the identities ``emb[rows[b[j]:b[j + 1]]]`` (``photo``:
    of ``rows``) packed into arrays (as ``facecurate.clean.clean_core._analyse_shard`` returns
    them): stacks of equal size where ``analyse_stack`` applies, ``analyse_identity``
    for the others."""
    J, N, d = len(b) - 1, len(rows), emb.shape[1]
    size = np.diff(b)
    s, subject, cluster = np.zeros(N, np.float32), np.zeros(N, bool), np.full(N, -1, np.int64)
    centre, nclus = np.zeros((J, d), np.float32), np.zeros(J, np.int64)
    dom, amb, med = np.zeros(J, np.float64), np.zeros(J, bool), np.full(J, np.nan)
    stacked, single = [], {}
    done = np.zeros(J, bool)
    top = min(MAX_BATCH, p.sample)
    for n in np.unique(size[(size >= 2) & (size <= top)]).tolist():
        js = np.nonzero(size == n)[0]
        pos = b[js][:, None] + np.arange(n)
        r = analyse_stack(emb[rows[pos]], photo[pos], p)
        js, pos = js[r["ok"]], pos[r["ok"]]
        if not len(js):
            continue
        r = {k: v[r["ok"]] for k, v in r.items()}
        s[pos], subject[pos], cluster[pos] = r["s"], r["subject"], r["cluster"]
        centre[js], nclus[js], dom[js], amb[js], med[js] = (r["centre"], r["nclus"], r["dominant_share"],
                                                            r["ambiguous"], r["median"])
        done[js] = True
        stacked.append((js, r))
    for j in np.nonzero(~done)[0].tolist():
        lo, hi = int(b[j]), int(b[j + 1])
        a = analyse_identity(np.asarray(emb[rows[lo:hi]]), photo[lo:hi], p)
        s[lo:hi], subject[lo:hi], cluster[lo:hi] = a.s, a.subject, a.cluster
        if a.centre is not None:
            centre[j] = a.centre
        nclus[j], dom[j], amb[j], med[j] = a.clusters, a.dominant_share, a.ambiguous, a.median
        single[j] = a
    cb = np.r_[0, np.cumsum(nclus)]
    minority, rival = np.zeros(cb[-1], bool), np.zeros(cb[-1], bool)
    for js, r in stacked:
        live = np.arange(r["s"].shape[1]) < r["nclus"][:, None]
        at = (cb[js][:, None] + np.arange(live.shape[1]))[live]
        minority[at], rival[at] = r["minority"][live], r["rival"][live]
    for j, a in single.items():
        minority[cb[j]:cb[j + 1]], rival[cb[j]:cb[j + 1]] = a.minority, a.rival
    return dict(s=s, subject=subject, cluster=cluster, centre=centre, nclus=nclus, minority=minority, rival=rival,
                dominant_share=dom, ambiguous=amb, median=med)


def decide_rows(emb: np.ndarray, rows: np.ndarray, b: np.ndarray, blk: dict, p, face_size, offset,
                pixel: bool) -> tuple:
    """Step 4 of ``decide_identity`` (the thresholds) for every face of a shard at once,
    and which identities still need ``decide_identity`` itself: those with a possible
    near-duplicate pair, an ambiguous folder, or more than MAX_BATCH faces. Returns
    (decision codes, reason codes, scores, needs (identities,) bool); the codes are
    final for the identities that do not need it (nothing else changes them there)."""
    n, size = len(rows), np.diff(b)
    s = blk["s"]
    if offset is not None:
        s = (s - np.asarray(offset, np.float32)).astype(np.float32)
    dec, rea = np.full(n, DROP, np.uint8), np.full(n, RC[R_FAR], np.uint8)
    cluster = blk["cluster"]
    ident = np.repeat(np.arange(len(size)), size)
    cb = np.r_[0, np.cumsum(blk["nclus"])]
    flat = np.where(cluster >= 0, cb[ident] + cluster, -1)  # each face's cluster among the shard's
    apply_thresholds(s, blk["subject"], flat, blk["minority"], face_size, p, dec, rea)
    needs = blk["ambiguous"] | (size > MAX_BATCH)
    needs |= _duplicate_candidates(emb, rows, b, dec != DROP, p.dup - 0.005 if pixel else p.dup, ~needs)
    return dec, rea, s, needs


def _duplicate_candidates(emb, rows, b, alive, thr: float, look: np.ndarray) -> np.ndarray:
    """(identities,) bool: identities (of 2..MAX_BATCH faces, where ``look``) with two
    alive faces whose similarity may reach ``thr``. The products here have other bits
    than the duplicate search's (another BLAS routine); the margin covers the rounding
    of any order of a d-term dot product (|error| <= d * 2**-24 * |x| * |y|)."""
    size = np.diff(b)
    out = np.zeros(len(size), bool)
    for n in np.unique(size[look & (size >= 2) & (size <= MAX_BATCH)]).tolist():
        js = np.nonzero(look & (size == n))[0]
        pos = b[js][:, None] + np.arange(n)
        E = np.ascontiguousarray(emb[rows[pos]], np.float32)
        S = np.matmul(E, E.transpose(0, 2, 1))
        sq = np.einsum("bij,bij->bi", E, E, dtype=np.float64).max(1)
        margin = 1e-4 * np.maximum(1.0, sq)
        a = alive[pos]
        pair = a[:, :, None] & a[:, None, :] & np.triu(np.ones((n, n), bool), 1)
        out[js] = (pair & (S >= (thr - margin)[:, None, None])).any((1, 2))
    return out
