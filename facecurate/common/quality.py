"""Quality measures of a face, from its aligned crop or its source photo: what align
records in align.csv and clean corrects its scores and finds occlusions with. Each is
a plain function of pixels, deterministic for a given OpenCV."""

from __future__ import annotations

import math

import cv2
import numpy as np

from facecurate.common import constants as C


def sharpness(crop_rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the grey crop: low for blurred faces."""
    grey = cv2.cvtColor(crop_rgb, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def blockiness(image: np.ndarray, box) -> float:
    """How strongly the source's JPEG 8x8 block grid shows over the face ``box`` (x1, y1,
    x2, y2 in source pixels) of ``image`` (the decoded source, grey or RGB; only the box
    is converted to grey): the mean step across
    the grid's block boundaries over the mean step elsewhere, the weaker of the two
    directions. About 1 for a photo saved at ordinary quality or resized after saving;
    above 2 for a heavily compressed one (quality 10 or less), whose crop is sharp by
    the Laplacian's measure (the block edges) but has lost the face's detail. NaN when the
    box holds fewer than 3 blocks a side. The grid is the file's own, counted from the
    image's corner, so it is not found in a photo cropped or resized after it was saved."""
    h, w = image.shape[:2]
    x1, y1 = max(0, int(box[0]) // 8 * 8), max(0, int(box[1]) // 8 * 8)
    x2, y2 = min(w, int(math.ceil(box[2]))), min(h, int(math.ceil(box[3])))
    if x2 - x1 < 24 or y2 - y1 < 24:
        return float("nan")
    patch = image[y1:y2, x1:x2]
    if patch.ndim == 3:
        patch = cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY)
    patch = patch.astype(np.float32)
    ratios = []
    for steps in (np.abs(np.diff(patch, axis=1)).mean(0), np.abs(np.diff(patch, axis=0)).mean(1)):
        m = len(steps) // 8 * 8
        phase = steps[:m].reshape(-1, 8).mean(0)  # step i sits between pixels i and i+1 of a block
        ratios.append(float(phase[7] / (np.delete(phase, 7).mean() + 1e-3)))
    return min(ratios)


def flat_share(grey: np.ndarray | None) -> float:
    """Share of the face cells of an aligned grey crop whose grey values are flat
    (standard deviation below ``constants.OCCLUSION_FLAT_STD``); 0.0 for no image."""
    if grey is None or not grey.size:
        return 0.0
    side, g = C.OCCLUSION_SIDE, C.OCCLUSION_GRID
    im = cv2.resize(grey, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    cell = side // g
    std = im[:cell * g, :cell * g].reshape(g, cell, g, cell).std(axis=(1, 3))
    face = std[C.OCCLUSION_ROWS[0]:C.OCCLUSION_ROWS[1], C.OCCLUSION_COLS[0]:C.OCCLUSION_COLS[1]]
    return float((face < C.OCCLUSION_FLAT_STD).mean())
