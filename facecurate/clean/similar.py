"""Pairs of unit vectors above a cosine threshold (clean's merge candidates and the
cohort's merge partners): exact in blocks for small sets, above that an inverted-file
search (faiss when importable, else numpy over a pool's workers): sub-quadratic."""

from __future__ import annotations

import numpy as np

from facecurate.engines.local import LocalPool, SharedArray
from facecurate.clean.vectors import add_at_rows, group_by_label, normalize


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
            use_faiss = have_faiss()
        pairs = _pairs_ivf_faiss(vecs, threshold, seed) if use_faiss else \
            _pairs_ivf_numpy(vecs, threshold, seed, pool)
    pairs.sort(key=lambda t: (-round(t[2], 6), t[0], t[1]))
    return pairs


def have_faiss() -> bool:
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
        a = _nearest(x, cent)
        sums = np.zeros_like(cent)
        add_at_rows(sums, a, x)
        cnt = np.bincount(a, minlength=k)
        empty = cnt == 0
        sums[empty] = cent[empty]
        cent = normalize(sums)
    return cent


def _nearest(x: np.ndarray, cent: np.ndarray, block: int = 65536) -> np.ndarray:
    """Each row's most similar centre, a block of rows at a time."""
    out = np.empty(len(x), np.int64)
    for b0 in range(0, len(x), block):
        out[b0:b0 + block] = (x[b0:b0 + block] @ cent.T).argmax(1)
    return out


def _home_and_probes(t: dict) -> tuple:
    """Worker: for one block of rows, each row's most similar centre and its
    ``nprobe`` most similar in decreasing order, from one product."""
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
    block = 65536  # as _nearest
    tasks = [dict(x=V, a=a, b=min(n, a + block), cent=cent, nprobe=nprobe) for a in range(0, n, block)]
    hp = list(pool.map(_home_and_probes, tasks) if shared else map(_home_and_probes, tasks))
    home, probes = np.concatenate([h for h, _ in hp]), np.concatenate([q for _, q in hp])
    members = group_by_label(home)
    queries = group_by_label(probes.reshape(-1))  # queries of each list: every vector that probes it
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
