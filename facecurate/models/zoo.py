"""The one door to the models: every stage (align, embed, eval-pairs through them,
clean's ``--exclude`` embedding) builds its detector, landmark model and embedder
here, by name, and talks to them only through the protocols of
:mod:`facecurate.models.base`. Errors a user can cause are :class:`ModelError`s.

=================  ==========================================  =======================
name               class                                       module
=================  ==========================================  =======================
detector dlib      :class:`DlibHOGDetector`                    :mod:`.dlib_models`
detector dlib-cnn  :class:`DlibCNNDetector` (MMOD)             :mod:`.dlib_models`
detector scrfd     :class:`SCRFD`                              :mod:`.scrfd`
landmarks          :class:`DlibLandmarks68`                    :mod:`.dlib_models`
embedder dlib      :class:`DlibEmbedder` / ``DlibOnnxEmbedder``  :mod:`.dlib_resnet`
embedder arcface   :class:`OnnxEmbedder` (an ``ArcFaceONNX``)  :mod:`.arcface`
=================  ==========================================  =======================
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .arcface import ArcFaceONNX, OnnxEmbedder
from .base import Detector, Embedder, Landmarker, ModelError
from .dlib_models import DlibCNNDetector, DlibHOGDetector, DlibLandmarks68
from .dlib_onnx import RUNTIMES, DlibOnnxError, dlib_resnet_onnx, resolve_runtime
from .dlib_resnet import DlibEmbedder, DlibOnnxEmbedder, dlib_sha
from .onnx_models import SCRFD, find_model
from .onnx_session import DEVICES

DETECTORS = ("dlib", "dlib-cnn", "scrfd")
MODELS = ("dlib", "arcface")


def make_detector(name: str, *, model_dir: Optional[str] = None, device: str = "auto", max_upsample: int = 1,
                  min_side: int = 512) -> Detector:
    """Detector ``name`` (one of :data:`DETECTORS`). dlib's: ``max_upsample`` /
    ``min_side`` (see :class:`DlibHOGDetector`); SCRFD: the detector of the pack or
    .onnx ``model_dir`` on ``device``."""
    if name == "dlib":
        return DlibHOGDetector(max_upsample=max_upsample, min_side=min_side)
    if name == "dlib-cnn":
        return DlibCNNDetector(max_upsample=max_upsample, min_side=min_side)
    if name != "scrfd":
        raise ModelError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
    return SCRFD(resolve_detector(model_dir), device=device)


def resolve_detector(model_dir: Optional[str]) -> Path:
    """The SCRFD detector .onnx of ``--model-dir`` (a pack directory or an .onnx file);
    ModelError naming what was found instead when there is none."""
    if not model_dir:
        raise ModelError("--detector scrfd needs --model-dir (a model pack directory or an .onnx file)")
    return Path(find_model(model_dir, "detector"))


def make_landmarker() -> Landmarker:
    """dlib's 68-point landmark model (fills in the five points dlib's detectors lack)."""
    return DlibLandmarks68()


def make_embedder(model: str = "dlib", *, model_dir: Optional[str] = None, feed: str = "five",
                  runtime: str = "auto", device: str = "auto", batch_size: Optional[int] = None,
                  fp16: bool = False, threads: Optional[int] = None) -> Embedder:
    """Embedder ``model``: ``dlib`` (dlib's ResNet fed ``feed`` chips, on ``runtime``),
    ``arcface`` (the recogniser of the pack or .onnx ``model_dir``) or a path to an
    .onnx recogniser. ``device``, ``batch_size``, ``fp16``, ``threads``: ONNX Runtime's."""
    onnx_kw = {"device": device, "batch_size": batch_size, "fp16": fp16, "threads": threads}
    if model == "dlib":
        if resolve_runtime(runtime) == "dlib":
            return DlibEmbedder(feed)
        chips = DlibEmbedder(feed)  # an unknown feed is refused before the graph is converted
        return DlibOnnxEmbedder(_dlib_graph(onnx_kw), chips)
    if model == "arcface" or str(model).endswith(".onnx"):
        # resolve_onnx has found a recogniser; ArcFaceONNX checks its graph once more as it opens it
        return OnnxEmbedder(ArcFaceONNX(resolve_onnx(model, model_dir), **onnx_kw))
    raise ModelError(f"unknown model {model!r}: use {', '.join(MODELS)} (with --model-dir) or a path to an .onnx")


def _dlib_graph(onnx_kw: dict):
    """dlib's ResNet converted to ONNX (cached), loaded as an ArcFaceONNX."""
    try:
        path = dlib_resnet_onnx(sha256=dlib_sha())
    except DlibOnnxError as e:
        raise ModelError(f"{e} (or use --runtime dlib)") from None
    return ArcFaceONNX(path, **onnx_kw)  # opened and checked to be a recogniser once


def resolve_onnx(model: str, model_dir: Optional[str]) -> Path:
    """The recogniser .onnx for ``--model arcface --model-dir DIR`` or ``--model X.onnx``."""
    target = model_dir if model == "arcface" else model
    if not target:
        raise ModelError("--model arcface needs --model-dir (a model pack directory or an .onnx file)")
    p = Path(target)
    if not p.exists():
        raise ModelError(f"model not found: {p}")
    try:
        return Path(find_model(p, "recognizer"))
    except Exception as e:  # noqa: BLE001 - report the model zoo's reason
        raise ModelError(f"no ArcFace-style recogniser in {p}: {e}") from None


__all__ = ["make_detector", "make_landmarker", "make_embedder", "resolve_runtime", "resolve_onnx",
           "resolve_detector",
           "DETECTORS", "DEVICES", "MODELS", "RUNTIMES", "ModelError"]
