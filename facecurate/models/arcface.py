"""ArcFace-style recognisers (w600k_r50, glintr100, w600k_mbf, ...) on ONNX Runtime:
:class:`ArcFaceONNX` (the graph: batching, I/O binding, fp16) and
:class:`OnnxEmbedder` (the embed stage's face of it: aligned BGR crops in, unit
vectors out, flip averaging)."""

from __future__ import annotations

import warnings
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np

from facecurate.common.files import sha256_file

from .base import ONNX_RUNTIME_TAG, l2_rows
from .onnx_inspect import input_normalisation, open_checked, static_dim
from .onnx_session import CUDA_PROVIDER, DEFAULT_BATCH, OnnxModelError, select_session


class ArcFaceONNX:
    """ArcFace-style recognition model (w600k_r50, glintr100, w600k_mbf, ...).

    ``embed(crops)`` takes aligned BGR uint8 crops (a list of HxWx3 arrays or an
    N x H x W x 3 array; resized when not ``input_size``) and returns (N, D) float32
    embeddings, not normalised, in input order.  Input size, normalisation and batch
    dimension are read from the graph.  On CUDA it runs through I/O binding; ``fp16``
    converts the graph to float16 on CUDA (needs ``onnxconverter-common``; ignored on
    the CPU, where it would be slower).
    """

    kind = "recognizer"

    def __init__(self, path, device: str = "auto", batch_size: Optional[int] = None,
                 fp16: bool = False, threads: Optional[int] = None, io_binding: Optional[bool] = None):
        self.path = Path(path)
        self.session, self.provider, ins, outs = open_checked(self.path, "recognizer", "a recognition model", device, threads)
        self.name = self.path.stem
        self.input_name = ins[0][0]
        self.output_name = outs[0][0]
        shape = ins[0][1]
        self.input_size = (static_dim(shape[2]), static_dim(shape[3]))  # (H, W)
        self.dim = static_dim(outs[0][1][-1])
        self.input_mean, self.input_std = input_normalisation(self.path)
        self.fixed_batch = static_dim(shape[0])  # None: dynamic
        self.fp16 = False
        if fp16:
            if self.provider == CUDA_PROVIDER:
                self._to_fp16(threads)
            else:
                warnings.warn("fp16 ignored: the model runs on the CPU", stacklevel=2)
        self.input_dtype = np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32
        if self.fixed_batch is not None:
            self.batch_size = self.fixed_batch
        elif batch_size:
            self.batch_size = int(batch_size)
        else:
            self.batch_size = DEFAULT_BATCH.get(self.provider, 32)
        # I/O binding: the output stays on the device until copied once (default: on CUDA)
        self.use_io_binding = self.provider == CUDA_PROVIDER if io_binding is None else bool(io_binding)

    def _to_fp16(self, threads):  # pragma: no cover - needs a CUDA machine
        try:
            import onnx
            from onnxconverter_common import float16
        except ImportError as e:
            raise OnnxModelError(
                "fp16 needs the onnx and onnxconverter-common packages: "
                "pip install onnx onnxconverter-common"
            ) from e
        import tempfile

        model = float16.convert_float_to_float16(onnx.load(str(self.path)), keep_io_types=True)
        with tempfile.TemporaryDirectory() as td:
            tmp = Path(td) / f"{self.name}.fp16.onnx"
            onnx.save(model, str(tmp))
            self.session, self.provider = select_session(tmp, "cuda", threads)
        self.fp16 = True

    @cached_property
    def sha256(self) -> str:
        return sha256_file(self.path)

    def preprocess(self, images) -> np.ndarray:
        """BGR uint8 crops -> N x 3 x H x W blob (RGB, (x - mean) / std)."""
        import cv2

        H, W = self.input_size
        arrs = []
        for im in images:
            im = np.asarray(im)
            if im.ndim != 3 or im.shape[2] != 3:
                raise ValueError(f"embed needs HxWx3 BGR crops, got shape {im.shape}")
            if im.shape[:2] != (H, W):
                im = cv2.resize(im, (W, H))
            arrs.append(im)
        x = np.stack(arrs).astype(np.float32)[..., ::-1]  # BGR -> RGB
        x = (x - np.float32(self.input_mean)) / np.float32(self.input_std)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=self.input_dtype)

    def forward(self, blob: np.ndarray) -> np.ndarray:
        """Run one preprocessed batch (at most ``batch_size``; see :meth:`preprocess`)
        -> (n, D) float32.  Split out so a caller can preprocess in another thread."""
        n = len(blob)
        fb = self.fixed_batch
        if fb is not None and n > fb:
            return np.concatenate([self.forward(blob[i:i + fb]) for i in range(0, n, fb)])
        if fb is not None and n < fb:  # pad a short last batch
            pad = np.zeros((self.fixed_batch - n,) + blob.shape[1:], blob.dtype)
            blob = np.concatenate([blob, pad])
        if self.use_io_binding:
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.input_name, blob)
            binding.bind_output(self.output_name, "cuda" if self.provider == CUDA_PROVIDER else "cpu")
            self.session.run_with_iobinding(binding)
            out = binding.copy_outputs_to_cpu()[0]
        else:
            out = self.session.run([self.output_name], {self.input_name: blob})[0]
        return np.asarray(out, dtype=np.float32).reshape(len(blob), -1)[:n]

    def embed(self, images) -> np.ndarray:
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = images[None]
        images = list(images)
        if not images:
            return np.zeros((0, self.dim or 0), np.float32)
        out = []
        for i in range(0, len(images), self.batch_size):
            out.append(self.forward(self.preprocess(images[i:i + self.batch_size])))
        return np.concatenate(out).astype(np.float32, copy=False)

    def info(self) -> dict:
        """What a store should record about the model."""
        return {
            "name": self.name, "file": str(self.path), "sha256": self.sha256, "dim": self.dim,
            "input_size": list(self.input_size), "input_mean": self.input_mean,
            "input_std": self.input_std, "color": "RGB", "provider": self.provider,
            "fp16": self.fp16,
        }

    def __repr__(self):
        return (f"ArcFaceONNX({self.name!r}, provider={self.provider}, input_size={self.input_size}, "
                f"dim={self.dim}, batch_size={self.batch_size})")


class OnnxEmbedder:
    """An ArcFace-style recogniser (an :class:`ArcFaceONNX`) fed the aligned crops (BGR);
    the :class:`~facecurate.models.base.Embedder` of ``--model arcface``."""

    runtime = ONNX_RUNTIME_TAG
    per_core = False

    def __init__(self, model: ArcFaceONNX):
        self.model = model
        self.name = self.model.name
        self.dim = self.model.dim
        self.input_size = self.model.input_size
        self.provider = self.model.provider
        self.batch_size = self.model.batch_size
        self.feed = "crop"

    def info(self) -> dict:
        d = self.model.info()
        d["feed"] = "crop"
        return d

    def prepare(self, item, loader) -> tuple[np.ndarray, str]:
        return loader.crop_bgr(item), "crop"

    def from_crop(self, rgb: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(rgb[:, :, ::-1])

    def blob(self, crops: list[np.ndarray], flip: bool) -> np.ndarray:
        if flip:
            crops = list(crops) + [np.ascontiguousarray(c[:, ::-1]) for c in crops]
        return self.model.preprocess(crops)

    def forward(self, blob: np.ndarray, n: int, flip: bool) -> np.ndarray:
        bs = self.model.batch_size
        out = np.concatenate([self.model.forward(blob[i:i + bs]) for i in range(0, len(blob), bs)])
        out = out.astype(np.float64)
        if flip:
            out = out[:n] + out[n:]
        return l2_rows(out)

    def run(self, crops: list[np.ndarray], flip: bool) -> np.ndarray:
        if not crops:
            return np.zeros((0, self.dim), np.float32)
        return self.forward(self.blob(crops, flip), len(crops), flip)


__all__ = ["ArcFaceONNX", "OnnxEmbedder"]
