"""Stage 2: L2-normalised face embeddings of the aligned crops.

``run_embed(OUT)`` embeds every ``ok`` crop of ``OUT/align.csv`` (or every image of a
plain ``<identity>/*`` folder of crops, or every image record of a ``.rec``) and
writes the store:

* ``OUT/embeddings.npy``  float32 (N, D), each row L2-normalised;
* ``OUT/embeddings.csv``  row i names vector i (``aligned, source, identity, face``),
  in the order of ``align.csv``;
* ``OUT/embeddings.json`` the model (name, file hash, dimension, input size,
  normalisation, flip, how crops were fed) and the run's counts.

Work is split in fixed shards of the row list by the run machinery
(:mod:`facecurate.runner`, any engine of :mod:`facecurate.engines`); each finished
shard is written atomically to ``OUT/.facecurate/embed/shard_NNNNNN.npz`` and then
recorded, so a killed run loses at most the shards in flight and a rerun embeds only
what is missing. The store files are merged from the shards at the end (atomic
writes), so they are byte-identical to an uninterrupted run's. A store made with
another model / flip / feeding is refused.

Models:

* ``dlib`` (default, offline): dlib's 128-D ResNet descriptor. dlib's network was
  trained on dlib's own 150x150 face chips (``get_face_chip(img, shape, 150, 0.25)``),
  which show more of the head than the 112x112 ArcFace crop. With ``align.csv`` at
  hand the chip is rebuilt from the *source photo*: a similarity transform maps the
  recorded five ArcFace points onto :data:`DLIB_CHIP_TEMPLATE_150` (dlib's chip
  geometry expressed in those five points, fitted once on LFW dev identities).
  Without a source (folder of crops, .rec) the chip is warped from the crop itself.
  ``runtime`` decides what runs the network: ``onnx`` (:class:`DlibOnnxEmbedder`: the
  graph converted from dlib's own weights on ONNX Runtime, batched, CUDA when a
  session gets it), ``dlib`` (:class:`DlibEmbedder`: dlib itself, one process per
  core) or ``auto`` (onnx when ONNX Runtime is installed). The store's signature
  records ``runtime`` for the ONNX runtime, so the two never share a store.
* ``arcface``: any insightface ArcFace-style ONNX recogniser (``--model-dir`` or an
  ``.onnx`` path), fed the aligned crops; see :class:`ArcFaceONNX`.
"""

from __future__ import annotations

import functools
import io
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Optional, Sequence

import numpy as np

from facecurate import __version__
from facecurate.constants import (
    ALIGN_MANIFEST,
    EMBEDDINGS_COLUMNS,
    EMBEDDINGS_CSV,
    EMBEDDINGS_META,
    EMBEDDINGS_NPY,
    EMBED_SIGNATURE,
    REC_NAME,
    SHARD_NPZ,
    WORK_DIR,
)
from facecurate.files import write_bytes_atomic
from facecurate.manifests import EmbeddingRow, _fmt_int
from facecurate.workspace import ManifestError, MissingFile, Workspace
from facecurate.engines import get_engine
from facecurate.procs import run_lock
from facecurate.runner import (RunError, WorkerSpec, check_meta, check_plan, clear, fail_message, in_part,
                               merge_if_due, parse_part, plan_shards, recorded_size, run_shards)

EMBED_DIR = "embed"
STORE_COLUMNS = EMBEDDINGS_COLUMNS

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
DLIB_FEEDS = ("five", "68", "crop")
MODELS = ("dlib", "arcface")
#: What runs dlib's ResNet: ``onnx`` = the graph converted from dlib's weights
#: (:mod:`facecurate.models.dlib_onnx`) on ONNX Runtime, batched, CUDA when a session
#: gets it; ``dlib`` = dlib itself (CPU, one process per core); ``auto`` = onnx when
#: ONNX Runtime is installed, else dlib.
RUNTIMES = ("auto", "dlib", "onnx")
ONNX_RUNTIME_TAG = "onnxruntime"  # the signature's ``runtime`` for the ONNX runtime


class EmbedError(RuntimeError):
    """A problem with the run as a whole (missing input, incompatible store)."""


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Item:
    """One face to embed. ``aligned`` is the store key."""

    aligned: str
    source: str
    identity: str
    face: str
    crop: str = ""  # absolute path of the crop image ("" for .rec records)
    raw: str = ""  # absolute path of the source photo ("" when unknown)
    pts5: Optional[tuple] = None  # 10 floats, the 5 points in source pixels
    box: Optional[tuple] = None  # x1, y1, x2, y2 in source pixels
    rec_offset: int = -1  # byte offset of the record in a .rec


def items_from_align(out: Path, primary_only: bool = False) -> tuple[list[Item], dict]:
    """The ``ok`` rows of OUT/align.csv (``primary_only``: of the photos' subjects),
    in the manifest's order, and align.json."""
    ws = Workspace(out)
    rows = ws.align_rows()
    meta = ws.align_meta()
    raw = meta.get("raw") or ""
    items = []
    for r in rows:
        if not r.is_ok or not r.aligned or (primary_only and not r.primary):
            continue
        items.append(Item(
            aligned=r.aligned, source=r.source, identity=r.identity, face=_fmt_int(r.face),
            crop=str(out / r.aligned),
            raw=str(Path(raw) / r.source) if raw else "",
            pts5=r.points, box=r.box,
        ))
    return items, meta


def items_from_folder(folder: Path) -> list[Item]:
    """Every image in a plain folder of crops ``<identity>/...``, sorted."""
    from facecurate.imageio import is_image_name

    items = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != WORK_DIR)
        for f in filenames:
            if f.startswith(".") or not is_image_name(f):
                continue
            p = Path(dirpath) / f
            rel = p.relative_to(folder).as_posix()
            parts = PurePosixPath(rel).parts
            items.append(Item(aligned=rel, source=rel, identity=parts[0] if len(parts) > 1 else "",
                              face="0", crop=str(p)))
    items.sort(key=lambda it: it.aligned)
    return items


def items_from_rec(rec: Path) -> list[Item]:
    """Every image record of a ``.rec`` (through its ``.idx``), keyed ``rec:<key>``, in
    .idx order. Which records are images is :mod:`facecurate.recdata`'s rule (the one
    inspect and unpack use): key 0 decides the layout, an insightface header and its
    identity records are skipped, and an image record with a vector label counts
    under its first value (as arcface_torch reads it)."""
    from facecurate.recdata import image_label, read_layout
    from facecurate.recordio import RecordIOError, read_idx, read_record, unpack_record

    idx = rec.with_suffix(".idx")
    if not idx.exists():
        raise EmbedError(f"{rec}: no {idx.name} beside it (needed to read a .rec)")
    entries = read_idx(idx)
    items = []
    with open(rec, "rb") as f:
        try:
            layout = read_layout(f, dict(entries).get(0))
            for key, off in entries:
                if not layout.is_image(key):  # header / identity record
                    continue
                label = image_label(unpack_record(read_record(f, off, key=key).payload)[0])
                ident = str(int(label)) if float(label).is_integer() else str(label)
                items.append(Item(aligned=f"rec:{key}", source=f"{rec.name}:{key}", identity=ident, face="0",
                                  crop=str(rec), rec_offset=off))
        except RecordIOError as e:
            raise EmbedError(f"{rec}: corrupt .rec at {e} (run `facecurate inspect` for details)") from None
    return items


# ----------------------------------------------------------------------------- models
def _l2(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    n[n == 0] = 1.0
    return (v / n).astype(np.float32)


def dlib_chip(rgb: np.ndarray, pts5, size: int = DLIB_CHIP_SIZE) -> np.ndarray:
    """dlib's 150x150 chip geometry from the five ArcFace points (RGB in, RGB out).
    Large downscales go through an area-averaged resize first (no aliasing), as
    dlib's own chip extraction does with its image pyramid."""
    import cv2

    from facecurate.geometry import similarity_transform

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

    from facecurate.models.dlib_models import SHAPE68, model_file

    items, _ = items_from_align(Path(align_out), primary_only=True)
    items = [it for it in items if it.pts5 is not None and it.box is not None]
    random.Random(seed).shuffle(items)
    sp = dlib.shape_predictor(model_file(SHAPE68))
    loader = Loader()
    pts = []
    for it in items[:limit]:
        img = loader.source(it.raw)
        if img is None:
            continue
        x1, y1, x2, y2 = (int(round(v)) for v in it.box)
        det = dlib.get_face_chip_details(sp(img, dlib.rectangle(x1, y1, x2, y2)), DLIB_CHIP_SIZE, 0.25)
        r, a = det.rect, det.angle
        c = np.array([(r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2])
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        corners = np.array([[r.left(), r.top()], [r.right(), r.top()], [r.right(), r.bottom()]], float)
        src = ((corners - c) @ rot.T + c).astype(np.float32)
        dst = np.float32([[0, 0], [det.cols - 1, 0], [det.cols - 1, det.rows - 1]])
        m = cv2.getAffineTransform(src, dst)  # dlib's get_mapping_to_chip
        p5 = np.asarray(it.pts5, float).reshape(5, 2)
        pts.append(p5 @ m[:, :2].T + m[:, 2])
    return np.mean(pts, axis=0)


def crop_points(crop: np.ndarray) -> np.ndarray:
    """Where the five points lie in an ArcFace-aligned crop of any size."""
    from facecurate.constants import ARCFACE_BASE_SIZE, ARCFACE_TEMPLATE_112

    h, w = crop.shape[:2]
    return ARCFACE_TEMPLATE_112 * np.array([w / ARCFACE_BASE_SIZE, h / ARCFACE_BASE_SIZE])


class DlibEmbedder:
    """dlib's 128-D ResNet descriptor on dlib chips built as described above."""

    name = "dlib_face_recognition_resnet_model_v1"
    dim = 128
    input_size = (DLIB_CHIP_SIZE, DLIB_CHIP_SIZE)

    def __init__(self, feed: str = "five"):
        if feed not in DLIB_FEEDS:
            raise EmbedError(f"unknown dlib feed {feed!r}; choose one of {', '.join(DLIB_FEEDS)}")
        self.feed = feed
        self._model = None  # loaded on first use: a parent that only hands out work never loads it
        self._sp = None
        self.provider = "CPU (dlib)"

    @property
    def model(self):
        if self._model is None:
            from facecurate.models.dlib_models import dlib_descriptor_model

            self._model = dlib_descriptor_model()
        return self._model

    def info(self) -> dict:
        from facecurate.models.dlib_models import DESCRIPTOR, model_file

        return {"name": self.name, "file": Path(model_file(DESCRIPTOR)).name,
                "sha256": _dlib_sha(), "dim": self.dim, "input_size": list(self.input_size),
                "color": "RGB", "feed": self.feed, "provider": self.provider}

    def chip(self, item: Item, loader: "Loader") -> tuple[np.ndarray, str]:
        """(150x150 RGB chip, how it was made)."""
        if self.feed != "crop" and item.raw and item.pts5 is not None:
            src = loader.source(item.raw)
            if src is not None:
                if self.feed == "68" and item.box is not None:
                    return self._chip68(src, item.box), "source68"
                return dlib_chip(src, item.pts5), "source"
        crop = loader.crop_rgb(item)
        return dlib_chip(crop, crop_points(crop)), "crop"

    def _chip68(self, rgb, box):
        import dlib

        from facecurate.models.dlib_models import SHAPE68, model_file

        if self._sp is None:
            self._sp = dlib.shape_predictor(model_file(SHAPE68))
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        shape = self._sp(rgb, dlib.rectangle(x1, y1, x2, y2))
        return dlib.get_face_chip(rgb, shape, DLIB_CHIP_SIZE, 0.25)

    def prepare(self, item: Item, loader: "Loader") -> tuple[np.ndarray, str]:
        return self.chip(item, loader)

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
        return _l2(vecs)


_DLIB_SHA: Optional[str] = None


def _dlib_sha() -> str:
    global _DLIB_SHA
    if _DLIB_SHA is None:
        from facecurate.files import sha256_file
        from facecurate.models.dlib_models import DESCRIPTOR, model_file

        _DLIB_SHA = sha256_file(model_file(DESCRIPTOR))
    return _DLIB_SHA


class OnnxEmbedder:
    """An insightface ArcFace-style ONNX recogniser fed the aligned crops (BGR)."""

    def __init__(self, model_path, device: str = "auto", batch_size: Optional[int] = None,
                 fp16: bool = False, threads: Optional[int] = None, io_binding: Optional[bool] = None):
        from facecurate.models.onnx_models import OnnxModelError, load_model

        try:
            self.model = load_model(model_path, kind="recognizer", device=device, batch_size=batch_size,
                                    fp16=fp16, threads=threads, io_binding=io_binding)
        except OnnxModelError as e:
            raise EmbedError(str(e)) from None
        self.name = self.model.name
        self.dim = self.model.dim
        self.input_size = self.model.input_size
        self.provider = self.model.provider
        self.feed = "crop"

    def info(self) -> dict:
        d = self.model.info()
        d["feed"] = "crop"
        return d

    def prepare(self, item: Item, loader: "Loader") -> tuple[np.ndarray, str]:
        return loader.crop_bgr(item), "crop"

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
        return _l2(out)

    def run(self, crops: list[np.ndarray], flip: bool) -> np.ndarray:
        if not crops:
            return np.zeros((0, self.dim), np.float32)
        return self.forward(self.blob(crops, flip), len(crops), flip)


class DlibOnnxEmbedder(OnnxEmbedder):
    """dlib's ResNet on ONNX Runtime: the graph converted from dlib's own weights
    (cached on first use), loaded through the same door as insightface recognisers,
    fed exactly the chips :class:`DlibEmbedder` feeds dlib (RGB)."""

    def __init__(self, feed: str = "five", device: str = "auto", batch_size: Optional[int] = None,
                 fp16: bool = False, threads: Optional[int] = None, io_binding: Optional[bool] = None):
        from facecurate.models.dlib_onnx import DlibOnnxError, dlib_resnet_onnx

        self._chips = DlibEmbedder(feed)  # chip geometry only; dlib's model is never loaded
        try:
            path = dlib_resnet_onnx(sha256=_dlib_sha())
        except DlibOnnxError as e:
            raise EmbedError(f"{e} (or use --runtime dlib)") from None
        super().__init__(path, device=device, batch_size=batch_size, fp16=fp16, threads=threads,
                         io_binding=io_binding)
        self.name, self.feed = DlibEmbedder.name, feed

    def info(self) -> dict:
        d = self.model.info()
        d.update(name=self.name, onnx_file=Path(d["file"]).name, onnx_sha256=d["sha256"], sha256=_dlib_sha(),
                 feed=self.feed, runtime=ONNX_RUNTIME_TAG + ("-fp16" if self.model.fp16 else ""))
        from facecurate.models.dlib_models import DESCRIPTOR

        d["file"] = DESCRIPTOR
        return d

    def prepare(self, item: Item, loader: "Loader") -> tuple[np.ndarray, str]:
        return self._chips.chip(item, loader)

    def blob(self, chips: list[np.ndarray], flip: bool) -> np.ndarray:
        # RGB chips; the recogniser door takes BGR (and turns it back into RGB)
        return super().blob([c[:, :, ::-1] for c in chips], flip)


def resolve_runtime(runtime: str = "auto") -> str:
    """``dlib`` or ``onnx``: what ``runtime`` means on this installation."""
    import importlib.util

    if runtime not in RUNTIMES:
        raise EmbedError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime != "auto":
        return runtime
    if importlib.util.find_spec("onnxruntime") is None:
        return "dlib"
    if importlib.util.find_spec("onnx") is None:  # cannot convert; a cached graph will do
        from facecurate.models.dlib_onnx import cached_path

        return "onnx" if cached_path(_dlib_sha()).is_file() else "dlib"
    return "onnx"


def dlib_embedder(feed: str = "five", runtime: str = "auto", **kw):
    """dlib's ResNet on ``runtime`` (kw: device, batch_size, fp16, threads for ONNX)."""
    if resolve_runtime(runtime) == "dlib":
        return DlibEmbedder(feed)
    return DlibOnnxEmbedder(feed, **kw)


def resolve_onnx(model: str, model_dir: Optional[str]) -> Path:
    """The recogniser .onnx for ``--model arcface --model-dir DIR`` or ``--model X.onnx``."""
    from facecurate.models.onnx_models import find_model

    target = model_dir if model == "arcface" else model
    if not target:
        raise EmbedError("--model arcface needs --model-dir (a model pack directory or an .onnx file)")
    p = Path(target)
    if not p.exists():
        raise EmbedError(f"model not found: {p}")
    try:
        return Path(find_model(p, "recognizer"))
    except Exception as e:  # noqa: BLE001 - report the model zoo's reason
        raise EmbedError(f"no ArcFace-style recogniser in {p}: {e}") from None


# ----------------------------------------------------------------------------- loading
class Loader:
    """Reads crops / sources / .rec records; keeps the last decoded source (rows of one
    photo are consecutive) so several faces of a photo decode it once."""

    def __init__(self):
        self._last: tuple[str, Optional[np.ndarray]] = ("", None)
        self._rec: dict[str, object] = {}

    def source(self, path: str) -> Optional[np.ndarray]:
        if self._last[0] == path:
            return self._last[1]
        from facecurate.imageio import ImageError, read_image

        try:
            img = read_image(path)
        except (ImageError, OSError):
            img = None
        self._last = (path, img)
        return img

    def _bytes(self, item: Item) -> bytes:
        if item.rec_offset >= 0:
            from facecurate.recordio import read_record, unpack_record

            f = self._rec.get(item.crop)
            if f is None:
                f = self._rec[item.crop] = open(item.crop, "rb")
            _hdr, data = unpack_record(read_record(f, item.rec_offset).payload)
            return data
        with open(item.crop, "rb") as f:
            return f.read()

    def crop_rgb(self, item: Item) -> np.ndarray:
        from facecurate.imageio import decode_image

        return decode_image(self._bytes(item), item.crop)

    def crop_bgr(self, item: Item) -> np.ndarray:
        return np.ascontiguousarray(self.crop_rgb(item)[:, :, ::-1])


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class EmbedConfig:
    model: str = "dlib"  # dlib | arcface | path to an .onnx
    model_dir: Optional[str] = None
    flip: bool = True
    dlib_feed: str = "five"
    device: str = "auto"
    batch_size: Optional[int] = None
    fp16: bool = False
    runtime: str = "auto"  # dlib's model: auto | dlib | onnx


def make_embedder(cfg: EmbedConfig, threads: Optional[int] = None):
    if cfg.model == "dlib":
        return dlib_embedder(cfg.dlib_feed, cfg.runtime, device=cfg.device, batch_size=cfg.batch_size,
                             fp16=cfg.fp16, threads=threads)
    if cfg.model == "arcface" or str(cfg.model).endswith(".onnx"):
        return OnnxEmbedder(resolve_onnx(cfg.model, cfg.model_dir), device=cfg.device,
                            batch_size=cfg.batch_size, fp16=cfg.fp16, threads=threads)
    raise EmbedError(f"unknown model {cfg.model!r}: use dlib, arcface (with --model-dir) or a path to an .onnx")


def signature(info: dict, flip: bool, source_kind: str) -> dict:
    """What must be the same for every vector of one store."""
    sig = {"name": info["name"], "sha256": info["sha256"], "dim": info["dim"],
           "input_size": info["input_size"], "feed": info.get("feed", ""), "flip": bool(flip),
           "input": source_kind}
    if info.get("runtime"):  # dlib's model on ONNX Runtime (a store made by dlib has none)
        sig["runtime"] = info["runtime"]
    return sig


# ----------------------------------------------------------------------------- worker
_EMBEDDERS: dict = {}


def cached_embedder(cfg: "EmbedConfig"):
    """One embedder per process and config: the run's own process builds it to read the
    model's signature, and its in-process worker lane reuses it (one ONNX session)."""
    if cfg not in _EMBEDDERS:
        _EMBEDDERS.clear()
        _EMBEDDERS[cfg] = make_embedder(cfg)
    return _EMBEDDERS[cfg]


def _prepare_chunk(embedder, loader: Loader, items: Sequence[Item]):
    inputs, keep, failed, feeds = [], [], [], {}
    for it in items:
        try:
            x, how = embedder.prepare(it, loader)
        except Exception as e:  # noqa: BLE001 - record every failure with its reason
            status = getattr(e, "status", None)
            failed.append((it.aligned, f"{status}: {e}" if status else f"{type(e).__name__}: {e}"))
            continue
        inputs.append(x)
        keep.append(it.aligned)
        feeds[how] = feeds.get(how, 0) + 1
    return inputs, keep, failed, feeds


def _embed_in_batches(embedder, inputs, flip: bool, batch_size: int) -> np.ndarray:
    out = [embedder.run(inputs[i:i + batch_size], flip) for i in range(0, len(inputs), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, embedder.dim), np.float32)


def shard_npz(work: Path, index: int) -> Path:
    return Path(work) / SHARD_NPZ.format(index=index)


class EmbedWorker:
    """One per worker process (model loaded once): embeds a shard of faces into
    ``shard_NNNNNN.npz``. With ``threads`` (ONNX), the next shard's crops are read
    and preprocessed by a thread pool while the model runs on this one (ordered
    read-ahead; cv2 decoding and warping release the GIL)."""

    def __init__(self, cfg: "EmbedConfig", batch_size: int, work: str, threads: int = 0):
        self.embedder = cached_embedder(cfg)
        self.cfg, self.batch_size, self.work = cfg, batch_size, Path(work)
        self.loader = Loader()
        self.threads = threads
        self._pool = self._lead = None
        if threads:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=threads)  # decodes a shard's crops
            self._lead = ThreadPoolExecutor(max_workers=1)  # prepares the next shard
        self._ahead: dict = {}
        self._local = threading.local()

    def _prep(self, items: Sequence[Item]):
        t0 = time.perf_counter()
        if not self.threads:
            return _prepare_chunk(self.embedder, self.loader, items), None, time.perf_counter() - t0

        def one(it):
            if not hasattr(self._local, "loader"):
                self._local.loader = Loader()
            return _prepare_chunk(self.embedder, self._local.loader, [it])

        inputs, keep, failed, feeds = [], [], [], {}
        for i, k, f, fd in self._pool.map(one, items):
            inputs += i
            keep += k
            failed += f
            for key, v in fd.items():
                feeds[key] = feeds.get(key, 0) + v
        blob = self.embedder.blob(inputs, self.cfg.flip) if isinstance(self.embedder, OnnxEmbedder) and inputs else None
        return (inputs, keep, failed, feeds), blob, time.perf_counter() - t0

    def prefetch(self, shard) -> None:
        if self.threads and shard.index not in self._ahead:
            self._ahead[shard.index] = self._lead.submit(self._prep, shard.items)

    def run(self, shard) -> dict:
        fut = self._ahead.pop(shard.index, None)
        (inputs, keep, failed, feeds), blob, t_prep = fut.result() if fut else self._prep(shard.items)
        t1 = time.perf_counter()
        if blob is not None:
            vecs = self.embedder.forward(blob, len(inputs), self.cfg.flip)
        else:
            vecs = _embed_in_batches(self.embedder, inputs, self.cfg.flip, self.batch_size)
        t_model = time.perf_counter() - t1
        res = {"keys": keep, "vectors": vecs, "failed": failed}
        write_bytes_atomic(shard_npz(self.work, shard.index), _part_bytes(res, self.embedder.dim))
        return {"embedded": len(keep), "failed": len(failed), "feeds": feeds,
                "t_prepare": round(t_prep, 4), "t_model": round(t_model, 4)}


# ----------------------------------------------------------------------------- parts
def _part_bytes(res: dict, dim: int) -> bytes:
    buf = io.BytesIO()
    fk = [k for k, _ in res["failed"]]
    fr = [r for _, r in res["failed"]]
    np.savez(buf, keys=np.array(res["keys"], dtype=str), vectors=np.asarray(res["vectors"], np.float32).reshape(-1, dim),
             failed_keys=np.array(fk, dtype=str), failed_reasons=np.array(fr, dtype=str))
    return buf.getvalue()


def _load_shards(work: Path, shards) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Vectors and failures of the plan's finished shards."""
    from facecurate.runner import finished

    vecs: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    for idx in sorted(finished(work, shards)):
        with np.load(shard_npz(work, idx)) as z:
            for k, v in zip(z["keys"].tolist(), z["vectors"]):
                vecs[k] = v
            for k, r in zip(z["failed_keys"].tolist(), z["failed_reasons"].tolist()):
                failed[k] = r
    return vecs, failed


# ----------------------------------------------------------------------------- run
def _resolve_input(target: Path, out: Optional[Path]) -> tuple[list[Item], str, Path, dict]:
    if target.is_file() and target.suffix == ".rec":
        return items_from_rec(target), "rec", (out or target.parent), {}
    from facecurate.recdata import is_rec_dataset

    if is_rec_dataset(target):  # a folder holding train.rec (+ .idx) and no align.csv
        return items_from_rec(target / REC_NAME), "rec", (out or target), {}
    if not target.is_dir():
        raise EmbedError(f"not found: {target} (expected an align OUT folder, a folder of crops or a .rec)")
    if (target / ALIGN_MANIFEST).exists():
        items, meta = items_from_align(target)
        return items, "align", (out or target), meta
    return items_from_folder(target), "folder", (out or target), {}


def default_workers(embedder) -> int:
    """dlib's descriptor is single-threaded: one process per usable core (as align); an
    ONNX session is one worker whose threads use the cores."""
    from facecurate.engines.local import default_workers as cores

    return cores() if isinstance(embedder, DlibEmbedder) else 1


def _hold_store_lock(fn):
    """Run ``fn`` holding the store's embed lock: a second run writing the same store
    at the same time is refused (:class:`facecurate.procs.LockedError`)."""
    @functools.wraps(fn)
    def locked(out_dir, *args, **kw):
        target = Path(out_dir)
        store = Path(kw["store_dir"]) if kw.get("store_dir") else \
            target if target.is_dir() else target.parent if target.suffix == ".rec" and target.is_file() else None
        if store is None:  # not an input run_embed takes: let it say so
            return fn(out_dir, *args, **kw)
        part = kw.get("part")
        try:
            part = parse_part(part) if isinstance(part, str) else part
        except RunError as e:
            raise EmbedError(str(e)) from None
        with run_lock(store, EMBED_DIR, part):
            return fn(out_dir, *args, **kw)
    return locked


@_hold_store_lock
def run_embed(out_dir, model: str = "dlib", model_dir: Optional[str] = None, batch_size: Optional[int] = None,
              workers: Optional[int] = None, flip: bool = True, device: str = "auto",
              show_progress: bool = True, *, fp16: bool = False, dlib_feed: str = "five",
              store_dir=None, overwrite: bool = False, chunk_size: Optional[int] = None,
              on_chunk: Optional[Callable[[dict], None]] = None, runtime: str = "auto", engine="local",
              ray_address: Optional[str] = None, part=None) -> dict:
    """Embed every crop of ``out_dir`` (an align OUT, a folder of crops, or a .rec) into
    the store in ``store_dir`` (default: ``out_dir``, or the .rec's folder). Resumes;
    refuses to mix models. ``engine``/``part`` as in :func:`facecurate.align.run_align`;
    ``chunk_size``: faces per shard. Returns a summary dict."""
    t_start = time.perf_counter()
    cfg = EmbedConfig(model=str(model), model_dir=model_dir, flip=bool(flip), dlib_feed=dlib_feed,
                      device=device, batch_size=batch_size, fp16=fp16, runtime=runtime)
    target = Path(out_dir)
    items, kind, store, _align_meta = _resolve_input(target, Path(store_dir) if store_dir else None)
    store.mkdir(parents=True, exist_ok=True)
    work = store / WORK_DIR / EMBED_DIR
    embedder = cached_embedder(cfg)  # tells the signature (and runs the in-process lane)
    info = embedder.info()
    sig = signature(info, cfg.flip, kind)
    part = _part(part, overwrite)
    if overwrite:
        clear(work, [store / n for n in (EMBEDDINGS_NPY, EMBEDDINGS_CSV, EMBEDDINGS_META)])
    _check_signature(store, work, sig)
    work.mkdir(parents=True, exist_ok=True)
    check_meta(work / EMBED_SIGNATURE, sig, lambda old, new: None, part=part)

    is_dlib = isinstance(embedder, DlibEmbedder)
    if batch_size is None:
        batch_size = 32 if is_dlib else getattr(embedder.model, "batch_size", 32)
    batch_size = max(1, int(batch_size))
    # Fixed shards of the full list, whatever the workers, engine or part: a rerun redoes
    # whole shards of the same composition, so its vectors equal an uninterrupted run's.
    size = int(chunk_size or recorded_size(work, DLIB_SHARD_SIZE if is_dlib else max(256, batch_size)))
    shards = plan_shards(items, lambda it: it.aligned, size)
    plan = check_plan(work, shards, size, part)
    eng, threads = _engine(engine, embedder, workers, ray_address)
    spec = WorkerSpec(EmbedWorker, (cfg, batch_size, str(work), threads), str(work),
                      must_see=(str(store),), gpu=not is_dlib and cfg.device != "cpu")
    stats, complete = run_shards(eng, spec, shards, part=part, desc="embed", unit="face",
                                 show_progress=show_progress, on_shard=on_chunk)
    if stats.failed:
        raise EmbedError(fail_message("embed", stats))
    summary = None
    if complete:
        summary = merge_if_due(store, EMBED_DIR, work, plan, part, lambda: _write_store(
            store, items, *_load_shards(work, shards), info, sig, cfg, kind))
    summary = summary or {"store": str(store), "input": kind, "model": info["name"], "dim": int(info["dim"]),
                          "faces": len(items)}
    summary = _summary(summary, stats, shards, part, complete, batch_size, embedder, t_start)
    summary["runtime"] = info.get("runtime") or ("dlib" if is_dlib else ONNX_RUNTIME_TAG)
    return summary


DLIB_SHARD_SIZE = 64


def _part(part, overwrite: bool):
    try:
        part = parse_part(part) if isinstance(part, str) else part
    except RunError as e:
        raise EmbedError(str(e)) from None
    if part is not None and overwrite:
        raise EmbedError("--overwrite cannot be combined with --part: clear the store with one run first")
    return part


def _engine(engine, embedder, workers: Optional[int], ray_address: Optional[str]):
    """(engine, prep threads per worker). dlib: one process per core; ONNX: one
    worker (per GPU under Ray) with ``workers`` threads preparing crops ahead."""
    if isinstance(embedder, DlibEmbedder):  # under Ray, default: one worker per CPU of the cluster
        n, threads = workers or (default_workers(embedder) if engine == "local" else None), 0
    else:
        n, threads = (1 if engine == "local" else None), max(1, int(workers or 1))
    if not isinstance(engine, str):
        return engine, threads
    try:
        return get_engine(engine, workers=n, address=ray_address), threads
    except RunError as e:
        raise EmbedError(str(e)) from None


def _summary(summary: dict, stats, shards, part, complete: bool, batch_size: int, embedder, t_start) -> dict:
    feeds: dict[str, int] = {}
    for rec in stats.records:
        for k, v in rec["stats"]["feeds"].items():
            feeds[k] = feeds.get(k, 0) + v
    now = sum(rec["units"] for rec in stats.records)
    elapsed = time.perf_counter() - t_start
    summary.update({
        "embedded_now": sum(rec["stats"]["embedded"] for rec in stats.records),
        "resumed": sum(len(s.items) for s in shards if in_part(s.index, part)) - now,
        "workers": stats.workers if now else 0, "batch_size": batch_size,
        "seconds": round(elapsed, 2),
        "faces_per_second": round(now / elapsed, 2) if now and elapsed > 0 else None,
        "feeds": dict(sorted(feeds.items())), "provider": embedder.provider,
        "timings": {"prepare": round(sum(r["stats"]["t_prepare"] for r in stats.records), 2),
                    "model": round(sum(r["stats"]["t_model"] for r in stats.records), 2)},
        "part": f"{part[0]}/{part[1]}" if part else None, "merged": complete, "engine": stats.summary(),
    })
    return summary


def _check_signature(store: Path, work: Path, sig: dict) -> None:
    old = None
    try:
        if (work / EMBED_SIGNATURE).exists():
            old = Workspace(work).read_json(EMBED_SIGNATURE, required=True)
        elif (store / EMBEDDINGS_META).exists():
            old = Workspace(store).read_json(EMBEDDINGS_META, required=True).get("signature")
    except ManifestError as e:
        raise EmbedError(str(e)) from None
    if old is not None and old != sig:
        diff = ", ".join(f"{k}: {old.get(k)!r} in the store, {sig.get(k)!r} now"
                         for k in sorted(set(old) | set(sig)) if old.get(k) != sig.get(k))
        raise EmbedError(
            f"{store} already holds embeddings made differently ({diff}); vectors of two models or "
            "settings cannot share one store. Rerun with the store's settings, use --overwrite to "
            "start again, or write to another folder (--out).")


def _write_store(store: Path, items: Sequence[Item], vecs: dict, failed: dict, info: dict, sig: dict,
                 cfg: EmbedConfig, kind: str) -> dict:
    rows, mats = [], []
    for it in items:
        v = vecs.get(it.aligned)
        if v is None:
            continue
        rows.append(EmbeddingRow(aligned=it.aligned, source=it.source, identity=it.identity, face=it.face))
        mats.append(v)
    dim = int(info["dim"])
    arr = np.ascontiguousarray(np.array(mats, np.float32).reshape(len(mats), dim))
    buf = io.BytesIO()
    np.save(buf, arr)
    fails = [{"aligned": it.aligned, "reason": failed[it.aligned]} for it in items if it.aligned in failed]
    meta = {
        "model": info["name"], "model_info": {k: v for k, v in info.items() if k not in ("provider", "file")},
        "model_file": info.get("file"), "sha256": info["sha256"], "dim": dim,
        "input_size": info["input_size"], "normalisation": "l2", "flip": cfg.flip,
        "feed": info.get("feed"), "input": kind, "count": len(rows), "failed": fails,
        "signature": sig, "version": __version__,
    }
    Workspace(store).write_store(buf.getvalue(), rows, meta)
    return {"store": str(store), "input": kind, "model": info["name"], "dim": dim, "flip": cfg.flip,
            "feed": info.get("feed"), "faces": len(items), "embedded": len(rows), "failed": len(fails),
            "failures": fails[:20]}


def load_store(out_dir, *, mmap: bool = False, missing_ok: bool = False):
    """(vectors float32 (N, D), rows [EmbeddingRow], meta) of the embedding store in
    ``out_dir`` (read by :meth:`facecurate.workspace.Workspace.store`), for embed,
    clean and eval-pairs. ``mmap``: map the vectors read-only instead of reading them
    (clean's large stores). A missing store is an EmbedError, or None with
    ``missing_ok``; a store whose .csv and .npy disagree is always an EmbedError."""
    ws = Workspace(out_dir)
    if missing_ok and not ws.has_store():
        return None
    try:
        st = ws.store(mmap=mmap)
    except (MissingFile, ManifestError) as e:
        raise EmbedError(str(e)) from None
    return st.vecs, st.rows, st.meta


__all__ = ["run_embed", "load_store", "EmbedError", "EmbedConfig", "DlibEmbedder", "OnnxEmbedder",
           "DlibOnnxEmbedder", "dlib_embedder", "resolve_runtime", "RUNTIMES",
           "dlib_chip", "DLIB_CHIP_TEMPLATE_150", "DLIB_FEEDS", "items_from_align"]
