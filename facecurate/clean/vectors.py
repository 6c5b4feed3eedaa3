"""Row-wise numpy helpers shared by clean's modules, each with the same bits as the
plain numpy expression it replaces."""

from __future__ import annotations

import numpy as np

#: A matrix product of more multiply-adds than this goes through the BLAS kernel for
#: large matrices, which gives every row the same bits however the product is split
#: (two rows at least); up to this, the small-matrix kernel may give other bits.
BLAS_SMALL_PRODUCT = 4_000_000


def normalize(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    n = np.sqrt(np.add.reduce(v * v, axis=-1, keepdims=True))  # np.linalg.norm(v, axis=-1), without its overhead
    return v / np.maximum(n, 1e-12)


def all_unit(rows: np.ndarray) -> bool:
    """Whether every row has unit length (within 1e-4, computed in float64): the one test
    by which every clean flow (in memory, a .rec, the sharded run) decides whether the
    store's vectors are used as they are or normalised first, so they agree bit for bit."""
    return bool(np.allclose(np.linalg.norm(np.asarray(rows, np.float64), axis=1), 1.0, atol=1e-4))


def group_by_label(labels: np.ndarray) -> dict:
    order = np.argsort(labels, kind="stable")
    lab = labels[order]
    cuts = np.nonzero(np.diff(lab))[0] + 1
    return {int(g[0]): order[s:e] for g, s, e in zip(np.split(lab, cuts), np.r_[0, cuts], np.r_[cuts, len(lab)])}


def add_at_rows(sums: np.ndarray, idx: np.ndarray, x: np.ndarray, long: int = 256, chunk: int = 65536,
                rows: np.ndarray | None = None) -> None:
    """``np.add.at(sums, idx, x[rows].astype(sums.dtype))`` with the same bits (each
    row of ``sums`` adds its rows of ``x`` one by one, in order), without its per-row
    cost. ``rows`` (default: every row of ``x``, in order) names the rows of ``x``
    that ``idx`` labels, so that a caller need not copy a subset of a large matrix.

    A group of at most ``long`` rows: one vectorised step per rank, the groups in
    decreasing size so that the groups of each step are a prefix, accumulated in
    preallocated buffers (no temporaries: on a large matrix their page faults cost
    more than the additions). A longer group: ``np.add.reduce`` over its row of
    ``sums`` then its rows (a reduction over the first axis adds the rows one after
    the other; np.add.reduceat does not), ``chunk`` rows at a time."""
    if not len(idx):
        return
    order = np.argsort(idx, kind="stable")
    src = order if rows is None else np.asarray(rows)[order]  # row of x of each sorted position
    si = idx[order]
    starts = np.r_[0, np.flatnonzero(si[1:] != si[:-1]) + 1]
    sizes = np.diff(np.r_[starts, len(si)])
    for i in np.flatnonzero(sizes > long).tolist():
        g, a, e = si[starts[i]], int(starts[i]), int(starts[i] + sizes[i])
        for c in range(a, e, chunk):
            part = x[src[c:min(e, c + chunk)]].astype(sums.dtype)
            sums[g] = np.add.reduce(np.vstack([sums[g][None], part]), axis=0)
    starts, sizes = starts[sizes <= long], sizes[sizes <= long]
    if not len(starts):
        return
    big = np.argsort(-sizes, kind="stable")  # groups by decreasing size
    starts, dest, left = starts[big], si[starts[big]], sizes[big][::-1]
    acc = sums[dest]  # each group's running sum, in the order of ``dest``
    buf = np.empty((len(dest),) + x.shape[1:], x.dtype)
    for r in range(int(sizes.max())):
        g = len(left) - int(np.searchsorted(left, r, side="right"))  # groups with more than r rows
        np.take(x, src[starts[:g] + r], axis=0, out=buf[:g])
        np.add(acc[:g], buf[:g], out=acc[:g])  # x's dtype cast to sums' exactly, as astype does
    sums[dest] = acc
