"""ONNX side of the model zoo: insightface SCRFD detectors and ArcFace-style
recognisers run through ONNX Runtime.

Design follows insightface's ``model_zoo``: one small class per model family, and
the family is chosen by inspecting the graph (inputs / outputs), never by file
name.  Nothing here imports insightface.

* :func:`select_session` opens a session on the requested device and reports the
  provider the session *really* got (``session.get_providers()``): onnxruntime-gpu
  lists ``CUDAExecutionProvider`` as available even on a machine without CUDA and
  silently falls back to the CPU.
* :func:`inspect_onnx` / :func:`find_model` tell a pack's detector from its
  recogniser (and from its landmark / gender-age models, which are ignored).
* :class:`SCRFD` -> ``list[Detection]`` with the 5 ArcFace points.
* :class:`ArcFaceONNX` -> ``(N, D)`` float32 embeddings, not normalised.
* :func:`load_model` routes a file or pack directory to one of the two classes.

All errors a user can cause (missing onnxruntime, unknown graph, CUDA asked for but
not obtained, ...) raise :class:`OnnxModelError` with a message meant for humans.
"""

from __future__ import annotations

import mmap
import os
import warnings
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np

from ..records import Detection

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")

#: default batch sizes for graphs with a dynamic batch dimension
DEFAULT_BATCH = {CPU_PROVIDER: 32, CUDA_PROVIDER: 256}

INSTALL_HINT = "pip install 'facecurate[cpu]'  or '[gpu]' on a CUDA machine"
GPU_HINT = (
    "install the GPU build with pip install 'facecurate[gpu]' (onnxruntime-gpu; never "
    "together with the CPU package onnxruntime: pip uninstall onnxruntime first) and "
    "make sure its CUDA / cuDNN versions match the ones on this machine"
)


class OnnxModelError(RuntimeError):
    """A model file, pack or runtime problem, explained for the user."""


# ---------------------------------------------------------------------------------
# onnxruntime sessions
# ---------------------------------------------------------------------------------


def _ort():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise OnnxModelError(
            f"ONNX models need ONNX Runtime, which is not installed: {INSTALL_HINT}"
        ) from e
    return onnxruntime


def _session_options(threads: Optional[int], quiet: bool = False):
    ort = _ort()
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Same inputs => same outputs (deterministic kernels where ORT has a choice).
    so.use_deterministic_compute = True
    if quiet:
        so.log_severity_level = 3  # errors only (the CUDA fallback warning is ours to report)
    return so


def _check_device(device: str) -> str:
    device = (device or "auto").lower()
    if device == "gpu":
        device = "cuda"
    if device not in DEVICES:
        raise OnnxModelError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    return device


_CUDA_UNUSABLE = False


def _note_cuda_unusable():
    global _CUDA_UNUSABLE
    _CUDA_UNUSABLE = True


def select_session(path, device: str = "auto", threads: Optional[int] = None):
    """Open ``path`` with ONNX Runtime on ``device`` ("auto", "cpu" or "cuda").

    Returns ``(session, provider)`` where ``provider`` is the execution provider the
    session really runs on (``"CUDAExecutionProvider"`` or ``"CPUExecutionProvider"``),
    read back from ``session.get_providers()``.  "auto" asks for CUDA when ONNX
    Runtime lists it and takes what it gets; "cuda" raises :class:`OnnxModelError`
    unless the session really obtained CUDA.  ``threads`` sets the intra-op thread
    count (None: ONNX Runtime's default, all physical cores).
    """
    ort = _ort()
    device = _check_device(device)
    path = str(path)
    if not os.path.isfile(path):
        raise OnnxModelError(f"model file not found: {path}")
    available = list(ort.get_available_providers())
    want_cuda = device in ("auto", "cuda") and CUDA_PROVIDER in available
    if device == "auto" and _CUDA_UNUSABLE:
        want_cuda = False  # found out earlier in this process; don't retry per model
    if device == "cuda" and not want_cuda:
        raise OnnxModelError(
            f"--device cuda: this ONNX Runtime ({ort.__version__}) has no {CUDA_PROVIDER} "
            f"(available: {', '.join(available)}); {GPU_HINT}"
        )
    session = None
    if want_cuda:
        cuda_opts = {"cudnn_conv_algo_search": "HEURISTIC"}
        if device == "auto":
            # A failed CUDA provider logs two lines per session (per worker process);
            # "auto" reports the fallback once, as a Python warning, instead.
            ort.set_default_logger_severity(4)
        try:
            session = ort.InferenceSession(
                path,
                sess_options=_session_options(threads, quiet=True),
                providers=[(CUDA_PROVIDER, cuda_opts), CPU_PROVIDER],
            )
        except Exception as e:  # some builds raise instead of falling back
            if device == "cuda":
                raise OnnxModelError(f"--device cuda: could not start a CUDA session: {e}; {GPU_HINT}") from e
            session = None
        finally:
            if device == "auto":
                ort.set_default_logger_severity(2)  # ONNX Runtime's default (warnings)
        if session is not None and CUDA_PROVIDER not in session.get_providers():
            if device == "cuda":
                raise OnnxModelError(
                    f"--device cuda: ONNX Runtime lists {CUDA_PROVIDER} but the session fell "
                    f"back to {', '.join(session.get_providers())} (no usable GPU / CUDA "
                    f"libraries here); {GPU_HINT}"
                )
            # auto: rebuild the session cleanly on the CPU only.
            session = None
        if session is None:
            _note_cuda_unusable()
            warnings.warn(
                f"ONNX Runtime lists {CUDA_PROVIDER} but cannot use it here (no GPU, or "
                f"CUDA / cuDNN libraries missing or of another version): running on the CPU",
                RuntimeWarning, stacklevel=2,
            )
    if session is None:
        try:
            session = ort.InferenceSession(
                path, sess_options=_session_options(threads), providers=[CPU_PROVIDER]
            )
        except Exception as e:
            raise OnnxModelError(f"cannot load ONNX model {path}: {e}") from e
    got = session.get_providers()
    provider = CUDA_PROVIDER if CUDA_PROVIDER in got else got[0]
    return session, provider


# ---------------------------------------------------------------------------------
# Graph inspection
# ---------------------------------------------------------------------------------


def _dim(d):
    """Static dimension as int, dynamic (str / None / <=0) as None."""
    if isinstance(d, (int, np.integer)) and d > 0:
        return int(d)
    return None


def _signature(session):
    ins = [(i.name, list(i.shape), i.type) for i in session.get_inputs()]
    outs = [(o.name, list(o.shape), o.type) for o in session.get_outputs()]
    return ins, outs


def _io_signature(path):
    """(inputs, outputs) as lists of (name, shape, type) read with a light session."""
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    try:
        s = ort.InferenceSession(str(path), sess_options=so, providers=[CPU_PROVIDER])
    except Exception as e:
        raise OnnxModelError(f"cannot read ONNX model {path}: {e}") from e
    return _signature(s)


#: SCRFD layouts by number of outputs: (strides, anchors per location, has keypoints)
SCRFD_LAYOUTS = {
    6: ((8, 16, 32), 2, False),
    9: ((8, 16, 32), 2, True),
    10: ((8, 16, 32, 64, 128), 1, False),
    15: ((8, 16, 32, 64, 128), 1, True),
}


def _classify(ins, outs):
    """Return (kind, description). kind is "detector", "recognizer" or None."""
    if len(ins) != 1:
        return None, f"{len(ins)} inputs"
    shape = ins[0][1]
    if len(shape) != 4 or _dim(shape[1]) != 3:
        return None, f"input shape {shape} (not N x 3 x H x W)"
    h, w = _dim(shape[2]), _dim(shape[3])
    n_out = len(outs)
    if n_out in SCRFD_LAYOUTS:
        strides, _, kps = SCRFD_LAYOUTS[n_out]
        fmc = len(strides)
        want = [1] * fmc + [4] * fmc + ([10] * fmc if kps else [])
        last = [_dim(o[1][-1]) if o[1] else None for o in outs]
        rank_ok = all(len(o[1]) in (2, 3) for o in outs)
        if rank_ok and all(d is None or d == k for d, k in zip(last, want)):
            return "detector", f"SCRFD detector, {n_out} outputs, input {shape}"
        return None, f"{n_out} outputs that do not follow SCRFD's score/bbox/kps layout"
    if n_out == 1:
        oshape = outs[0][1]
        d = _dim(oshape[-1]) if oshape else None
        if len(oshape) == 2 and d is not None:
            if h is not None and h == w and 64 <= d <= 4096 and d % 32 == 0:
                return "recognizer", f"recognition model, input {shape}, output {oshape}"
            if d == 3:
                return None, f"gender/age attribute model (input {shape}, output {oshape})"
            if d in (212, 3309) or (h == 192 and w == 192):
                return None, f"landmark model (input {shape}, output {oshape})"
        return None, f"1 output of shape {oshape} with input {shape}"
    return None, f"{n_out} outputs with input {shape}"


def inspect_onnx(path) -> str:
    """Kind of model in ``path``: "detector" (SCRFD signature: one N x 3 x H x W input,
    6 / 9 / 10 / 15 outputs, scores / boxes / keypoints per stride, 2-D or batched 3-D)
    or "recognizer" (one square 3-channel input, one 2-D [N, D] output).  Anything
    else (landmark, gender/age, unrelated graphs) raises :class:`OnnxModelError`."""
    kind, desc = _classify(*_io_signature(path))
    if kind is None:
        raise OnnxModelError(
            f"{path}: not a face detector (SCRFD) or recognition model: {desc}"
        )
    return kind


def find_model(model_dir_or_file, kind: str) -> Path:
    """Path of the model of ``kind`` ("detector" or "recognizer") in a pack directory
    (e.g. ``~/.insightface/models/buffalo_l``), decided by inspecting every ``*.onnx``
    graph in it.  A file is checked and returned as is.  Errors list what was found."""
    if kind not in ("detector", "recognizer"):
        raise ValueError(f"kind must be 'detector' or 'recognizer', not {kind!r}")
    p = Path(os.path.expanduser(str(model_dir_or_file)))
    if p.is_file():
        got = inspect_onnx(p)
        if got != kind:
            raise OnnxModelError(f"{p} is a {got}, not a {kind}")
        return p
    if not p.is_dir():
        raise OnnxModelError(f"model directory or file not found: {p}")
    found = []
    for f in sorted(p.glob("*.onnx")):
        try:
            k, desc = _classify(*_io_signature(f))
        except OnnxModelError as e:
            k, desc = None, f"unreadable ({e})"
        found.append((f, k, desc))
    matches = [f for f, k, _ in found if k == kind]
    if len(matches) == 1:
        return matches[0]
    listing = "; ".join(f"{f.name}: {desc}" for f, _, desc in found) or "no .onnx files"
    if not matches:
        raise OnnxModelError(f"no {kind} model in {p} (found {listing})")
    raise OnnxModelError(
        f"several {kind} models in {p}: {', '.join(m.name for m in matches)}; pass the "
        f".onnx file you want instead of the directory (found {listing})"
    )


# ---------------------------------------------------------------------------------
# First node names (for ArcFace's input normalisation rule)
# ---------------------------------------------------------------------------------


def _varint(buf, pos):
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start, end):
    """Yield (field_number, wire_type, value_start, value_end) of a protobuf message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wt = key >> 3, key & 7
        if wt == 0:
            _, npos = _varint(buf, pos)
        elif wt == 1:
            npos = pos + 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            npos = pos + n
        elif wt == 5:
            npos = pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        yield field, wt, pos, npos
        pos = npos


def _first_nodes_protobuf(path, n):
    """(name, op_type) of the first ``n`` graph nodes, read straight from the
    protobuf (ModelProto.graph = 7, GraphProto.node = 1, NodeProto.name = 3,
    op_type = 4) without loading initializers."""
    out = []
    if os.path.getsize(path) == 0:
        return out
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for field, wt, a, b in _fields(buf, 0, len(buf)):
            if field != 7 or wt != 2:
                continue
            for gf, gwt, ga, gb in _fields(buf, a, b):
                if gf != 1 or gwt != 2:
                    continue
                name = op = ""
                for nf, nwt, na, nb in _fields(buf, ga, gb):
                    if nf == 3 and nwt == 2:
                        name = bytes(buf[na:nb]).decode("utf-8", "replace")
                    elif nf == 4 and nwt == 2:
                        op = bytes(buf[na:nb]).decode("utf-8", "replace")
                out.append((name, op))
                if len(out) >= n:
                    return out
            break
    return out


def first_nodes(path, n: int = 8) -> list[tuple[str, str]]:
    """(name, op_type) of the first ``n`` nodes of the graph (with the ``onnx``
    package when installed, else a minimal protobuf reader)."""
    try:
        import onnx
    except ImportError:
        return _first_nodes_protobuf(path, n)
    model = onnx.load(str(path), load_external_data=False)
    return [(node.name, node.op_type) for node in model.graph.node[:n]]


def input_normalisation(path) -> tuple[float, float]:
    """insightface's rule (``arcface_onnx.py``): if one of the first 8 nodes is named
    ``Sub*`` / ``_minus*`` and one ``Mul*`` / ``_mul*``, the graph normalises itself
    (MXNet-converted models) and expects 0..255 input: mean 0, std 1.  Otherwise the
    caller normalises with mean 127.5, std 127.5."""
    nodes = first_nodes(path, 8)
    has_sub = any(nm.startswith(("Sub", "_minus")) for nm, _ in nodes)
    has_mul = any(nm.startswith(("Mul", "_mul")) for nm, _ in nodes)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


# ---------------------------------------------------------------------------------
# SCRFD
# ---------------------------------------------------------------------------------


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
        self.session, self.provider = select_session(self.path, device, threads)
        ins, outs = _signature(self.session)
        kind, desc = _classify(ins, outs)
        if kind != "detector":
            raise OnnxModelError(f"{self.path} is not an SCRFD detector: {desc}")
        self.name = self.path.stem
        self.input_name = ins[0][0]
        self.output_names = [o[0] for o in outs]
        self.strides, self.num_anchors, self.use_kps = SCRFD_LAYOUTS[len(outs)]
        shape = ins[0][1]
        h, w = _dim(shape[2]), _dim(shape[3])
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
        from ..files import sha256_file

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


# ---------------------------------------------------------------------------------
# ArcFace-style recognisers
# ---------------------------------------------------------------------------------


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
        self.session, self.provider = select_session(self.path, device, threads)
        ins, outs = _signature(self.session)
        kind, desc = _classify(ins, outs)
        if kind != "recognizer":
            raise OnnxModelError(f"{self.path} is not a recognition model: {desc}")
        self.name = self.path.stem
        self.input_name = ins[0][0]
        self.output_name = outs[0][0]
        shape = ins[0][1]
        self.input_size = (_dim(shape[2]), _dim(shape[3]))  # (H, W)
        self.dim = _dim(outs[0][1][-1])
        self.input_mean, self.input_std = input_normalisation(self.path)
        self.fixed_batch = _dim(shape[0])  # None: dynamic
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
        from ..files import sha256_file

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


# ---------------------------------------------------------------------------------
# Router
# ---------------------------------------------------------------------------------


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
]
