"""Small typed records passed between stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
