"""ONNX side of the model zoo: insightface SCRFD detectors and ArcFace-style
recognisers run through ONNX Runtime, one small module per role (as insightface's
``model_zoo``; nothing here imports insightface):

* :mod:`.onnx_session`: :func:`select_session` (the provider a session really got);
* :mod:`.onnx_inspect`: :func:`inspect_onnx` / :func:`find_model` (the family is
  read from the graph, never from the file name), :func:`input_normalisation`;
* :mod:`.scrfd`: :class:`SCRFD` -> ``list[Detection]`` with the 5 ArcFace points;
* :mod:`.arcface`: :class:`ArcFaceONNX` -> ``(N, D)`` float32, not normalised.

:func:`load_model` routes a file or pack directory to one of the two classes; the
stages reach it through :mod:`facecurate.models.zoo`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .arcface import ArcFaceONNX
from .onnx_inspect import find_model, first_nodes, input_normalisation, inspect_onnx
from .onnx_session import CPU_PROVIDER, CUDA_PROVIDER, DEFAULT_BATCH, OnnxModelError, select_session
from .scrfd import SCRFD, anchor_centers, distance2bbox, distance2kps, letterbox, nms


def load_model(path_or_dir, kind: Optional[str] = None, **kw):
    """Load an ONNX model as :class:`SCRFD` or :class:`ArcFaceONNX`.  A directory is
    searched for a model of ``kind`` (required then); a file is routed by
    :func:`inspect_onnx` (and must match ``kind`` when given).  ``kw`` goes to the
    class (device, det_size, batch_size, threads, ...)."""
    p = Path(os.path.expanduser(str(path_or_dir)))
    if p.is_dir():
        if kind is None:
            raise OnnxModelError(f"{p} is a directory: say which model to use (detector or recognizer)")
        p = find_model(p, kind)
        got = kind
    else:
        if not p.is_file():
            raise OnnxModelError(f"model file or directory not found: {p}")
        got = inspect_onnx(p)
        if kind is not None and got != kind:
            raise OnnxModelError(f"{p} is a {got}, not a {kind}")
    cls = SCRFD if got == "detector" else ArcFaceONNX
    return cls(p, **kw)


__all__ = [
    "OnnxModelError", "select_session", "inspect_onnx", "find_model", "first_nodes",
    "input_normalisation", "letterbox", "anchor_centers", "distance2bbox", "distance2kps",
    "nms", "SCRFD", "ArcFaceONNX", "load_model", "CPU_PROVIDER", "CUDA_PROVIDER",
    "DEFAULT_BATCH",
]
