"""Small typed records passed between stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass
class Detection:
    """One detected face in image pixels of the image the detector saw."""

    box: np.ndarray  # (4,) float: x1, y1, x2, y2
    score: float
    landmarks: Optional[np.ndarray] = None  # (5, 2) ArcFace points, when the detector gives them

    def scaled(self, s: float) -> "Detection":
        return Detection(self.box * s, self.score, None if self.landmarks is None else self.landmarks * s)

    @property
    def size(self) -> float:
        w = max(0.0, float(self.box[2] - self.box[0]))
        h = max(0.0, float(self.box[3] - self.box[1]))
        return float(np.sqrt(w * h))


def nearest_to_centre(dets: Sequence[Detection], width: int, height: int) -> Optional[Detection]:
    """The detection whose box centre is nearest the image centre (the subject of a
    photo centred on its subject, as LFW's are); None when there is none."""
    if not dets:
        return None
    c = np.array([width, height], np.float64) / 2.0
    return min(dets, key=lambda d: float(np.sum(((d.box[:2] + d.box[2:]) / 2 - c) ** 2)))
