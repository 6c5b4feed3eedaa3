"""insightface's SCRFD face detectors (det_10g, det_2.5g, det_500m, ...) on ONNX
Runtime: :class:`SCRFD` -> ``list[Detection]`` with the 5 ArcFace points."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np

from facecurate.common.files import sha256_file
from facecurate.common.records import Detection

from .onnx_inspect import SCRFD_LAYOUTS, open_checked, static_dim
from .onnx_session import OnnxModelError


def letterbox(img: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """insightface's detector resize: keep the aspect ratio, fit into ``size`` =
    (width, height), put the image at the top-left and pad bottom/right with zeros.
    Returns (padded image, scale) where network pixels = image pixels * scale."""
    import cv2

    W, H = int(size[0]), int(size[1])
    h, w = img.shape[:2]
    if float(h) / w > float(H) / W:
        new_h = H
        new_w = max(1, int(new_h / (float(h) / w)))
    else:
        new_w = W
        new_h = max(1, int(new_w * (float(h) / w)))
    scale = float(new_h) / h
    resized = cv2.resize(img, (new_w, new_h))
    out = np.zeros((H, W, 3), dtype=np.uint8)
    out[:new_h, :new_w] = resized
    return out, scale


def anchor_centers(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    """(height*width*num_anchors, 2) x, y centres, row-major, anchors of a location
    adjacent (SCRFD's layout)."""
    ys, xs = np.mgrid[:height, :width]
    c = np.stack([xs, ys], axis=-1).astype(np.float32).reshape(-1, 2) * stride
    if num_anchors > 1:
        c = np.repeat(c, num_anchors, axis=0)
    return c


def distance2bbox(points: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Boxes from distances (left, top, right, bottom) to anchor centres."""
    return np.stack(
        [points[:, 0] - d[:, 0], points[:, 1] - d[:, 1], points[:, 0] + d[:, 2], points[:, 1] + d[:, 3]],
        axis=-1,
    )


def distance2kps(points: np.ndarray, d: np.ndarray) -> np.ndarray:
    """(N, K, 2) keypoints from (N, 2K) offsets to anchor centres."""
    k = d.reshape(d.shape[0], -1, 2)
    return points[:, None, :] + k


def nms(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> np.ndarray:
    """Greedy NMS (insightface's variant, +1 pixel areas). Ties in score are broken
    by index so the result is deterministic. Returns kept indices, best first."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[rest] - inter)
        order = rest[ovr <= thresh]
    return np.asarray(keep, dtype=np.int64)


class SCRFD:
    """insightface SCRFD face detector (det_10g, det_2.5g, det_500m, ...).

    ``detect(rgb)`` returns detections sorted by score (best first) with boxes and the
    5 keypoints (left eye, right eye, nose, left / right mouth corner: the ArcFace
    order) in the pixels of the image given.  Models exported without keypoints
    (6 / 10 outputs) give ``landmarks=None``.
    """

    kind = "detector"

    def __init__(self, path, device: str = "auto", det_size=(640, 640), det_thresh: float = 0.5,
                 nms_thresh: float = 0.4, threads: Optional[int] = None):
        self.path = Path(path)
        self.session, self.provider, ins, outs = open_checked(self.path, "detector", "an SCRFD detector", device, threads)
        self.name = self.path.stem
        self.input_name = ins[0][0]
        self.output_names = [o[0] for o in outs]
        self.strides, self.num_anchors, self.use_kps = SCRFD_LAYOUTS[len(outs)]
        self.has_landmarks = self.use_kps  # exports without keypoints leave them to a Landmarker
        shape = ins[0][1]
        h, w = static_dim(shape[2]), static_dim(shape[3])
        if h is not None and w is not None:
            self.input_size = (w, h)  # fixed by the graph; det_size is ignored
        else:
            self.input_size = (int(det_size[0]), int(det_size[1]))
        self.det_thresh = float(det_thresh)
        self.nms_thresh = float(nms_thresh)
        self._centers = {}

    def _centres(self, h, w, stride):
        key = (h, w, stride)
        if key not in self._centers:
            self._centers[key] = anchor_centers(h, w, stride, self.num_anchors)
        return self._centers[key]

    def _forward(self, blob):
        outs = self.session.run(self.output_names, {self.input_name: blob})
        outs = [o[0] if o.ndim == 3 else o for o in outs]  # batched export: [1, N, C]
        H, W = blob.shape[2], blob.shape[3]
        fmc = len(self.strides)
        scores, boxes, kpss = [], [], []
        for i, stride in enumerate(self.strides):
            sc = outs[i].reshape(-1)
            centres = self._centres(H // stride, W // stride, stride)
            if len(centres) != len(sc):
                raise OnnxModelError(
                    f"{self.name}: stride {stride} gives {len(sc)} scores, expected "
                    f"{len(centres)} for input {W}x{H} and {self.num_anchors} anchors"
                )
            pos = np.nonzero(sc >= self.det_thresh)[0]
            if pos.size == 0:
                continue
            c = centres[pos]
            scores.append(sc[pos])
            boxes.append(distance2bbox(c, outs[i + fmc].reshape(-1, 4)[pos] * stride))
            if self.use_kps:
                kpss.append(distance2kps(c, outs[i + 2 * fmc].reshape(len(sc), -1)[pos] * stride))
        return scores, boxes, kpss

    @staticmethod
    def blob(rgb: np.ndarray) -> np.ndarray:
        """RGB uint8 HxWx3 -> 1x3xHxW float32, (x - 127.5) / 128 (SCRFD's training input)."""
        x = (rgb.astype(np.float32) - np.float32(127.5)) / np.float32(128.0)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])

    def detect(self, rgb_image: np.ndarray) -> list[Detection]:
        img = np.asarray(rgb_image)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"SCRFD.detect needs an HxWx3 uint8 RGB image, got {img.shape} {img.dtype}")
        det_img, scale = letterbox(img, self.input_size)
        scores, boxes, kpss = self._forward(self.blob(det_img))
        if not scores:
            return []
        scores = np.concatenate(scores).astype(np.float64)
        boxes = np.concatenate(boxes).astype(np.float64) / scale
        kps = np.concatenate(kpss).astype(np.float64) / scale if self.use_kps else None
        keep = nms(boxes, scores, self.nms_thresh)
        return [
            Detection(boxes[i].copy(), float(scores[i]), None if kps is None else kps[i, :5].copy())
            for i in keep
        ]

    @cached_property
    def sha256(self) -> str:
        return sha256_file(self.path)

    def info(self) -> dict:
        """What a run record should say about the detector."""
        return {
            "name": self.name, "file": str(self.path), "sha256": self.sha256,
            "input_size": list(self.input_size), "strides": list(self.strides),
            "num_anchors": self.num_anchors, "keypoints": self.use_kps,
            "det_thresh": self.det_thresh, "nms_thresh": self.nms_thresh,
            "provider": self.provider,
        }

    def __repr__(self):
        return f"SCRFD({self.name!r}, provider={self.provider}, input_size={self.input_size})"


__all__ = ["SCRFD", "letterbox", "anchor_centers", "distance2bbox", "distance2kps", "nms"]
