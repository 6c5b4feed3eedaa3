"""Row-wise numpy helpers shared by clean's modules, each with the same bits as the
plain numpy expression it replaces."""

from __future__ import annotations

import numpy as np


def normalize(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    n = np.sqrt(np.add.reduce(v * v, axis=-1, keepdims=True))  # np.linalg.norm(v, axis=-1), without its overhead
    return v / np.maximum(n, 1e-12)


def group_by_label(labels: np.ndarray) -> dict:
    order = np.argsort(labels, kind="stable")
    lab = labels[order]
    cuts = np.nonzero(np.diff(lab))[0] + 1
    return {int(g[0]): order[s:e] for g, s, e in zip(np.split(lab, cuts), np.r_[0, cuts], np.r_[cuts, len(lab)])}


def add_at_rows(sums: np.ndarray, idx: np.ndarray, x: np.ndarray) -> None:
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
