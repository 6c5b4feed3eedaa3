"""What the stages ask of a model: the :class:`Detector`, :class:`Landmarker` and
:class:`Embedder` protocols, which every model family implements in full (the same
attributes on every class, so no caller probes with ``getattr`` or ``isinstance``),
and :class:`ModelError`, the base of every model error a user can cause.

Models are built only by :mod:`facecurate.models.zoo`.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from facecurate.common.records import Detection

#: the ``runtime`` an embedder on ONNX Runtime reports (and a dlib-on-ONNX store's signature records)
ONNX_RUNTIME_TAG = "onnxruntime"


class ModelError(RuntimeError):
    """A model file, pack, option or runtime problem, explained for the user."""


@runtime_checkable
class Detector(Protocol):
    """Finds faces in an RGB uint8 image."""

    #: family name (``dlib``, ``dlib-cnn``, or the SCRFD file's stem)
    name: str
    #: the ONNX Runtime execution provider the session really got; None for dlib
    provider: Optional[str]
    #: True when :meth:`detect` fills in the five ArcFace points; False when a
    #: :class:`Landmarker` must (dlib's detectors)
    has_landmarks: bool

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces of ``rgb`` (boxes and scores in its pixels; landmarks or None)."""

    def info(self) -> dict:
        """What a run record should say about the detector."""


@runtime_checkable
class Landmarker(Protocol):
    """Locates landmarks of one face given its box (dlib's 68-point model)."""

    name: str

    def predict(self, rgb: np.ndarray, box) -> np.ndarray:
        """(68, 2) points in the pixels of ``rgb``."""

    def five(self, pts: np.ndarray) -> np.ndarray:
        """The five ArcFace points (eyes, nose tip, mouth corners) of :meth:`predict`'s."""


@runtime_checkable
class Embedder(Protocol):
    """Turns faces into L2-normalised vectors: ``prepare`` (or ``from_crop``) makes
    one model input per face, ``run`` embeds a batch of inputs."""

    name: str
    dim: int
    input_size: tuple  # (H, W) the model sees
    #: what the model is fed: ``five`` / ``68`` / ``crop`` (dlib), ``crop`` (ArcFace)
    feed: str
    #: the device it runs on (``CPU (dlib)`` or an ONNX Runtime execution provider)
    provider: str
    #: ``dlib`` or ``onnxruntime``
    runtime: str
    #: True: single-threaded, run one worker process per core (dlib); False: one
    #: worker whose session uses the cores or the GPU
    per_core: bool
    #: faces per call of :meth:`run` when the caller does not say
    batch_size: int

    def info(self) -> dict:
        """The model's description; embed builds the store's signature from it and it
        must change whenever the vectors can."""

    def prepare(self, item: Any, loader: Any) -> tuple[np.ndarray, str]:
        """(model input, how it was made) of one :class:`facecurate.embed.embed.Item`."""

    def from_crop(self, rgb: np.ndarray) -> np.ndarray:
        """The model input made from an aligned RGB crop alone."""

    def blob(self, inputs: Sequence[np.ndarray], flip: bool) -> Optional[np.ndarray]:
        """The batched tensor of ``inputs`` (made ahead, e.g. in a prefetch thread),
        or None when the model takes the inputs themselves (dlib)."""

    def forward(self, blob: np.ndarray, n: int, flip: bool) -> np.ndarray:
        """(n, dim) unit vectors of a :meth:`blob` of ``n`` faces."""

    def run(self, inputs: Sequence[np.ndarray], flip: bool) -> np.ndarray:
        """(len(inputs), dim) float32 unit vectors; ``flip`` adds the mirrored face."""


def l2_rows(v: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), as float32."""
    v = np.asarray(v, np.float64)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    n[n == 0] = 1.0
    return (v / n).astype(np.float32)


__all__ = ["ModelError", "Detector", "Landmarker", "Embedder", "l2_rows", "ONNX_RUNTIME_TAG"]
