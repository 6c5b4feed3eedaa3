"""dlib's 128-D face ResNet as an embedder, on either runtime.

dlib's network was trained on dlib's own 150x150 face chips
(``get_face_chip(img, shape, 150, 0.25)``), which show more of the head than the
112x112 ArcFace crop. With the source photo at hand the chip is rebuilt from it: a
similarity transform maps the recorded five ArcFace points onto
:data:`DLIB_CHIP_TEMPLATE_150` (dlib's chip geometry expressed in those five points,
fitted once on LFW dev identities). Without a source (folder of crops, .rec) the chip
is warped from the crop itself.

* :class:`DlibEmbedder`: dlib itself (CPU, single-threaded: one process per core);
* :class:`DlibOnnxEmbedder`: the graph converted from dlib's own weights
  (:mod:`facecurate.models.dlib_onnx`) on ONNX Runtime, batched, CUDA when a session
  gets it, fed exactly the same chips.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from facecurate.common.constants import ARCFACE_BASE_SIZE, ARCFACE_TEMPLATE_112, DLIB_FEEDS
from facecurate.common.files import sha256_file
from facecurate.common.geometry import similarity_transform
from facecurate.common.imageio import ImageError, read_image
from facecurate.common.workspace import Workspace

from .arcface import ArcFaceONNX, OnnxEmbedder
from .base import ONNX_RUNTIME_TAG, ModelError, l2_rows
from .dlib_models import DESCRIPTOR, SHAPE68, dlib_descriptor_model, model_file

#: dlib's face chip (``get_face_chip(img, shape, 150, 0.25)``) expressed in the five
#: ArcFace points (left eye, right eye, nose tip, left / right mouth corner) in chip
#: pixels: the mean over 1500 LFW *dev* faces of the 5 points mapped into dlib's chip
#: (research/fit in the embed issue; the per-point spread is ~3.7 px).
DLIB_CHIP_SIZE = 150
DLIB_CHIP_TEMPLATE_150 = np.array(
    [
        [47.2957, 46.1568],
        [99.6780, 46.1906],
        [73.5659, 75.0590],
        [49.7033, 103.8239],
        [97.4912, 103.9099],
    ],
    dtype=np.float64,
)
#: How the dlib model is fed: ``five`` (chip warped from the source photo with the
#: recorded 5 points, the default), ``68`` (dlib's 68 landmarks re-run on the recorded
#: box, then ``dlib.get_face_chip``: dlib's exact chain), ``crop`` (chip warped from the
#: aligned crop; loses what lies outside it).


def dlib_chip(rgb: np.ndarray, pts5, size: int = DLIB_CHIP_SIZE) -> np.ndarray:
    """dlib's 150x150 chip geometry from the five ArcFace points (RGB in, RGB out).
    Large downscales go through an area-averaged resize first (no aliasing), as
    dlib's own chip extraction does with its image pyramid."""
    import cv2

    pts = np.asarray(pts5, np.float64).reshape(5, 2)
    tpl = DLIB_CHIP_TEMPLATE_150 * (size / DLIB_CHIP_SIZE)
    m = similarity_transform(pts, tpl)
    scale = math.sqrt(abs(np.linalg.det(m[:, :2])))
    if scale < 0.5:
        f = min(1.0, 2.0 * scale)  # shrink so that the warp scales by about 0.5
        h, w = rgb.shape[:2]
        nw, nh = max(1, round(w * f)), max(1, round(h * f))
        rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
        fx, fy = nw / w, nh / h
        m = similarity_transform(pts * np.array([fx, fy]), tpl)
    return cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def fit_dlib_chip_template(align_out, limit: int = 1500, seed: int = 0) -> np.ndarray:
    """How :data:`DLIB_CHIP_TEMPLATE_150` was made (offline, on LFW *dev* identities):
    for the primary faces of an align OUT, re-run dlib's 68-point model on the box,
    take dlib's chip placement (``get_face_chip_details(shape, 150, 0.25)``), map the
    recorded five points into chip pixels and average them."""
    import random

    import cv2
    import dlib

    ws = Workspace(Path(align_out))
    raw = ws.align_meta().get("raw") or ""
    faces = [row for row in ws.align_rows() if row.is_ok and row.aligned and row.primary
             and row.points is not None and row.box is not None]
    random.Random(seed).shuffle(faces)
    sp = dlib.shape_predictor(model_file(SHAPE68))
    pts = []
    for row in faces[:limit]:
        try:
            img = read_image(Path(raw) / row.source) if raw else None
        except (ImageError, OSError):
            img = None
        if img is None:
            continue
        x1, y1, x2, y2 = (int(round(v)) for v in row.box)
        det = dlib.get_face_chip_details(sp(img, dlib.rectangle(x1, y1, x2, y2)), DLIB_CHIP_SIZE, 0.25)
        r, a = det.rect, det.angle
        c = np.array([(r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2])
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        corners = np.array([[r.left(), r.top()], [r.right(), r.top()], [r.right(), r.bottom()]], float)
        src = ((corners - c) @ rot.T + c).astype(np.float32)
        dst = np.float32([[0, 0], [det.cols - 1, 0], [det.cols - 1, det.rows - 1]])
        m = cv2.getAffineTransform(src, dst)  # dlib's get_mapping_to_chip
        p5 = np.asarray(row.points, float).reshape(5, 2)
        pts.append(p5 @ m[:, :2].T + m[:, 2])
    return np.mean(pts, axis=0)


def crop_points(crop: np.ndarray) -> np.ndarray:
    """Where the five points lie in an ArcFace-aligned crop of any size."""
    h, w = crop.shape[:2]
    return ARCFACE_TEMPLATE_112 * np.array([w / ARCFACE_BASE_SIZE, h / ARCFACE_BASE_SIZE])


class DlibEmbedder:
    """dlib's 128-D ResNet descriptor on dlib chips built as described above."""

    name = "dlib_face_recognition_resnet_model_v1"
    dim = 128
    input_size = (DLIB_CHIP_SIZE, DLIB_CHIP_SIZE)
    runtime = "dlib"
    per_core = True  # dlib's descriptor is single-threaded
    batch_size = 32

    def __init__(self, feed: str = "five"):
        if feed not in DLIB_FEEDS:
            raise ModelError(f"unknown dlib feed {feed!r}; choose one of {', '.join(DLIB_FEEDS)}")
        self.feed = feed
        self._model = None  # loaded on first use: a parent that only hands out work never loads it
        self._sp = None
        self.provider = "CPU (dlib)"

    @property
    def model(self):
        if self._model is None:
            self._model = dlib_descriptor_model()
        return self._model

    def info(self) -> dict:
        return {"name": self.name, "file": Path(model_file(DESCRIPTOR)).name,
                "sha256": dlib_sha(), "dim": self.dim, "input_size": list(self.input_size),
                "color": "RGB", "feed": self.feed, "provider": self.provider}

    def chip(self, item, loader) -> tuple[np.ndarray, str]:
        """(150x150 RGB chip, how it was made)."""
        if self.feed != "crop" and item.raw and item.pts5 is not None:
            src = loader.source(item.raw)
            if src is not None:
                if self.feed == "68" and item.box is not None:
                    return self._chip68(src, item.box), "source68"
                return dlib_chip(src, item.pts5), "source"
        return self.from_crop(loader.crop_rgb(item)), "crop"

    @staticmethod
    def from_crop(rgb: np.ndarray) -> np.ndarray:
        """dlib's chip warped from an aligned crop (what lies outside it is lost)."""
        return dlib_chip(rgb, crop_points(rgb))

    def _chip68(self, rgb, box):
        import dlib

        if self._sp is None:
            self._sp = dlib.shape_predictor(model_file(SHAPE68))
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        shape = self._sp(rgb, dlib.rectangle(x1, y1, x2, y2))
        return dlib.get_face_chip(rgb, shape, DLIB_CHIP_SIZE, 0.25)

    def prepare(self, item, loader) -> tuple[np.ndarray, str]:
        return self.chip(item, loader)

    def blob(self, chips, flip: bool) -> None:
        return None  # dlib takes the chips themselves (see run)

    def forward(self, blob, n: int, flip: bool) -> np.ndarray:
        raise TypeError("dlib's runtime takes chips, not a blob: use run()")

    def run(self, chips: list[np.ndarray], flip: bool) -> np.ndarray:
        if not chips:
            return np.zeros((0, self.dim), np.float32)
        batch = [np.ascontiguousarray(c) for c in chips]
        if flip:
            batch += [np.ascontiguousarray(c[:, ::-1]) for c in chips]
        vecs = np.array([np.array(v) for v in self.model.compute_face_descriptor(batch)], np.float64)
        if flip:
            n = len(chips)
            vecs = vecs[:n] + vecs[n:]
        return l2_rows(vecs)


_DLIB_SHA: Optional[str] = None


def dlib_sha() -> str:
    """sha256 of the installed ``dlib_face_recognition_resnet_model_v1.dat`` (once)."""
    global _DLIB_SHA
    if _DLIB_SHA is None:
        _DLIB_SHA = sha256_file(model_file(DESCRIPTOR))
    return _DLIB_SHA


class DlibOnnxEmbedder(OnnxEmbedder):
    """dlib's ResNet on ONNX Runtime: the graph converted from dlib's own weights
    (cached on first use), loaded through the same door as insightface recognisers,
    fed exactly the chips :class:`DlibEmbedder` feeds dlib (RGB). ``model``: the
    converted graph (:func:`facecurate.models.dlib_onnx.dlib_resnet_onnx`) loaded as
    an :class:`ArcFaceONNX`; ``chips``: the DlibEmbedder whose chip geometry it uses
    (dlib's model is never loaded)."""

    def __init__(self, model: ArcFaceONNX, chips: DlibEmbedder):
        self._chips = chips
        super().__init__(model)
        self.name, self.feed = DlibEmbedder.name, chips.feed

    def info(self) -> dict:
        d = self.model.info()
        d.update(name=self.name, onnx_file=Path(d["file"]).name, onnx_sha256=d["sha256"], sha256=dlib_sha(),
                 feed=self.feed, runtime=ONNX_RUNTIME_TAG + ("-fp16" if self.model.fp16 else ""))
        d["file"] = DESCRIPTOR
        return d

    def prepare(self, item, loader) -> tuple[np.ndarray, str]:
        return self._chips.chip(item, loader)

    def from_crop(self, rgb: np.ndarray) -> np.ndarray:
        return self._chips.from_crop(rgb)

    def blob(self, chips: list[np.ndarray], flip: bool) -> np.ndarray:
        # RGB chips; the recogniser door takes BGR (and turns it back into RGB)
        return super().blob([c[:, :, ::-1] for c in chips], flip)


__all__ = ["DlibEmbedder", "DlibOnnxEmbedder", "dlib_chip", "crop_points", "dlib_sha", "fit_dlib_chip_template",
           "DLIB_CHIP_SIZE", "DLIB_CHIP_TEMPLATE_150", "DLIB_FEEDS"]
