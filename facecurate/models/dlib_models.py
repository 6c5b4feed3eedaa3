"""dlib's shipped models (``face_recognition_models``): HOG and MMOD detectors, the
68-point landmark model, the 128-D ResNet descriptor. All work offline.

``face_recognition_models/__init__`` imports ``pkg_resources`` (gone from new
setuptools), so the weight files are located with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from typing import Sequence

import numpy as np

from facecurate.common.constants import (
    DLIB68_LEFT_EYE,
    DLIB68_MOUTH_LEFT,
    DLIB68_MOUTH_RIGHT,
    DLIB68_NOSE_TIP,
    DLIB68_RIGHT_EYE,
)
from facecurate.common.records import Detection

from .base import ModelError


class ModelNotFound(ModelError):
    """A weight file of ``face_recognition_models`` is missing."""


def model_file(name: str) -> str:
    """Path of a weight file shipped by ``face_recognition_models``."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise ModelNotFound("face_recognition_models is not installed: pip install face_recognition_models")
    path = os.path.join(os.path.dirname(spec.origin), "models", name)
    if not os.path.isfile(path):
        raise ModelNotFound(f"{name} not found in face_recognition_models ({path})")
    return path


SHAPE68 = "shape_predictor_68_face_landmarks.dat"
SHAPE5 = "shape_predictor_5_face_landmarks.dat"
DESCRIPTOR = "dlib_face_recognition_resnet_model_v1.dat"
MMOD = "mmod_human_face_detector.dat"
#: dlib's built-in frontal face detector (HOG + linear SVM), saved once with
#: ``fhog_object_detector.save``. ``dlib.get_frontal_face_detector()`` rebuilds it from
#: a compressed string in dlib's source on every call, which costs 0.3-0.5 s in every
#: worker that starts; reading this copy takes about 1 ms. ``tests/test_align.py``
#: checks that it is the same detector, byte for byte, as the installed dlib's.
HOG_FILE = os.path.join(os.path.dirname(__file__), "data", "dlib_frontal_face_hog.svm")


def frontal_face_detector():
    """dlib's frontal face detector, read from :data:`HOG_FILE`; dlib's own
    ``get_frontal_face_detector()`` when that copy is missing or unreadable."""
    import dlib

    try:
        return dlib.fhog_object_detector(HOG_FILE)
    except RuntimeError:
        return dlib.get_frontal_face_detector()


def _rect(box) -> "dlib.rectangle":  # noqa: F821
    import dlib

    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    return dlib.rectangle(x1, y1, x2, y2)


class _DlibDetector:
    """What dlib's two detectors share: no ONNX provider, no landmarks (the 68-point
    :class:`DlibLandmarks68` fills them in), upsampling settings."""

    name = ""
    provider = None
    has_landmarks = False

    def __init__(self, max_upsample: int, min_side: int):
        self.max_upsample = max_upsample
        self.min_side = min_side

    def info(self) -> dict:
        return {"name": self.name, "max_upsample": self.max_upsample, "min_side": self.min_side,
                "provider": self.provider}


def _first_upsample(image: np.ndarray, min_side: int) -> int:
    """Images smaller than ``min_side`` are searched at twice their size from the
    start: HOG's smallest face is about 80 px, MMOD's about 40 px."""
    return 1 if max(image.shape[:2]) < min_side else 0


class DlibHOGDetector(_DlibDetector):
    """dlib's HOG + linear SVM frontal face detector (on the grey image). Small images
    are upsampled once from the start; more upsampling (finds smaller faces, ~4x the
    cost each) happens only when nothing is found."""

    name = "dlib"

    def __init__(self, max_upsample: int = 1, min_side: int = 512):
        super().__init__(max_upsample, min_side)
        self._det = frontal_face_detector()

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        import cv2

        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb
        first = _first_upsample(grey, self.min_side)
        for up in range(first, max(first, self.max_upsample) + 1):
            rects, scores, _ = self._det.run(grey, up, 0.0)
            if len(rects):
                break
        return [
            Detection(np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], dtype=np.float64), float(s))
            for r, s in zip(rects, scores)
        ]


class DlibCNNDetector(_DlibDetector):
    """dlib's MMOD CNN face detector (more robust to pose, slower on a CPU)."""

    name = "dlib-cnn"

    def __init__(self, max_upsample: int = 1, min_side: int = 512):
        import dlib

        super().__init__(max_upsample, min_side)
        self._det = dlib.cnn_face_detection_model_v1(model_file(MMOD))

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        first = _first_upsample(rgb, self.min_side)
        for up in range(first, max(first, self.max_upsample) + 1):
            dets = self._det(rgb, up)
            if len(dets):
                break
        out = []
        for d in dets:
            r = d.rect
            out.append(Detection(np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], dtype=np.float64),
                                 float(d.confidence)))
        return out


class DlibLandmarks68:
    """dlib's 68-point shape predictor; ``five`` turns 68 points into the ArcFace 5."""

    name = "dlib-68"

    def __init__(self):
        import dlib

        self._sp = dlib.shape_predictor(model_file(SHAPE68))

    def predict(self, rgb: np.ndarray, box) -> np.ndarray:
        shape = self._sp(rgb, _rect(box))
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)

    @staticmethod
    def five(pts68: np.ndarray) -> np.ndarray:
        return np.stack([
            pts68[list(DLIB68_LEFT_EYE)].mean(axis=0),
            pts68[list(DLIB68_RIGHT_EYE)].mean(axis=0),
            pts68[DLIB68_NOSE_TIP],
            pts68[DLIB68_MOUTH_LEFT],
            pts68[DLIB68_MOUTH_RIGHT],
        ]).astype(np.float64)


@lru_cache(maxsize=None)
def dlib_descriptor_model():
    import dlib

    return dlib.face_recognition_model_v1(model_file(DESCRIPTOR))


def dlib_descriptors(chips: Sequence[np.ndarray]) -> np.ndarray:
    """128-D descriptors of 150x150 RGB dlib face chips (a batch), as float32 (N, 128).
    dlib's vectors are not unit length; callers normalise."""
    if not len(chips):
        return np.zeros((0, 128), np.float32)
    model = dlib_descriptor_model()
    vecs = model.compute_face_descriptor([np.ascontiguousarray(c) for c in chips])
    return np.array([np.array(v) for v in vecs], dtype=np.float32)
