"""Similarity-transform alignment onto the ArcFace template."""

from __future__ import annotations

import cv2
import numpy as np

from facecurate.common.constants import ARCFACE_BASE_SIZE, ARCFACE_TEMPLATE_112


def template(size: int = ARCFACE_BASE_SIZE) -> np.ndarray:
    """The ArcFace 5-point template for a ``size`` x ``size`` crop (multiples of 112)."""
    if size <= 0 or size % ARCFACE_BASE_SIZE:
        raise ValueError(f"crop size must be a positive multiple of {ARCFACE_BASE_SIZE}, got {size}")
    return ARCFACE_TEMPLATE_112 * (size / ARCFACE_BASE_SIZE)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping
    ``src`` points onto ``dst`` (Umeyama 1991, no reflection). Returns a 2x3 matrix."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    n = src.shape[0]
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    cov = d_c.T @ s_c / n
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1
    r = u @ np.diag(d) @ vt
    var_s = (s_c ** 2).sum() / n
    scale = (sig * d).sum() / var_s if var_s > 0 else 1.0
    t = mu_d - scale * r @ mu_s
    return np.hstack([scale * r, t[:, None]])


def align_face(img: np.ndarray, landmarks5: np.ndarray, size: int = ARCFACE_BASE_SIZE) -> np.ndarray:
    """Warp ``img`` so that ``landmarks5`` land on the ArcFace template; black border."""
    m = similarity_transform(landmarks5, template(size))
    return cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
