"""dlib's 128-D face-recognition ResNet as an ONNX graph, converted from the weights
``face_recognition_models`` ships (``dlib_face_recognition_resnet_model_v1.dat``).

* :class:`DlibResNetONNX` checks a parsed network (:mod:`.dlib_serial`) against dlib's
  ``anet_type`` for this model (the file does not store where the tag / skip layers
  sit, only that they are there: the layer sequence and the wrapper versions are
  both checked) and builds the graph: opset 13, input ``N x 3 x 150 x 150`` RGB
  0..255, output ``N x 128`` (the raw descriptor, not normalised, as dlib's
  ``compute_face_descriptor``). The graph normalises its input itself (a ``Sub`` of
  the per-channel means, a ``Mul`` by 1/256: insightface's rule for "the graph
  normalises" then tells :func:`~facecurate.models.onnx_models.input_normalisation`
  to feed 0..255), so it loads through the same door as insightface recognisers.
  Its metadata names the origin, the ``.dat``'s sha256 and the normalisation.
* :func:`dlib_resnet_onnx` converts at first use and caches the graph in
  ``$FACECURATE_CACHE/models`` (else ``$XDG_CACHE_HOME/facecurate/models``, else
  ``~/.cache/facecurate/models``), keyed by the ``.dat``'s sha256; a graph is cached
  only after ONNX Runtime reproduced dlib on a built-in synthetic chip
  (:func:`verify_against_dlib`), and it is written atomically.

dlib's rules the graph follows: a strided con / pool has zero padding, others
size/2 (the values are read from the file); output = 1 + (in + 2p - k) div s; a pool
window averages only the pixels inside the image; ``add_prev`` of two tensors of
different shapes zero-pads each at the end (channels, bottom rows, right columns)
to the larger shape, then adds.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

import numpy as np

from facecurate import __version__
from facecurate.common.files import sha256_file, write_bytes_atomic
from facecurate.models import dlib_models as dm
from facecurate.models.base import ModelError
from facecurate.models.dlib_models import DESCRIPTOR, dlib_descriptors, model_file
from facecurate.models.dlib_resnet import dlib_sha
from facecurate.models.dlib_serial import DlibFormatError, DlibNet, read_dlib_net

MODEL_NAME = "dlib_face_recognition_resnet_model_v1"
EXPORT_NAMES = ("dlib-resnet",)  # names `facecurate models export` takes
#: bumped whenever the builder changes what it writes (part of the cache key)
CONVERTER_VERSION = 1
OPSET = 13
INPUT_NAME, OUTPUT_NAME = "input", "embedding"
#: a converted graph must reproduce dlib within this (max abs difference)
VERIFY_TOLERANCE = 1e-4
CACHE_ENV = "FACECURATE_CACHE"
#: What runs dlib's ResNet: ``onnx`` = the graph converted from dlib's weights
#: (:mod:`facecurate.models.dlib_onnx`) on ONNX Runtime, batched, CUDA when a session
#: gets it; ``dlib`` = dlib itself (CPU, one process per core); ``auto`` = onnx when
#: ONNX Runtime is installed, else dlib.
RUNTIMES = ("auto", "dlib", "onnx")


class DlibOnnxError(RuntimeError):
    """Conversion impossible or refused (message for the user)."""


# ----------------------------------------------------------------------------- cache
def cache_root() -> Path:
    """facecurate's cache folder: ``$FACECURATE_CACHE``, else
    ``$XDG_CACHE_HOME/facecurate``, else ``~/.cache/facecurate``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "facecurate"


def models_cache_dir() -> Path:
    return cache_root() / "models"


def cached_path(sha256: str) -> Path:
    """Where the graph converted from the ``.dat`` with this sha256 is cached."""
    return models_cache_dir() / f"{MODEL_NAME}-{sha256[:16]}-c{CONVERTER_VERSION}.onnx"


def dat_path() -> Path:
    return Path(model_file(DESCRIPTOR))


# ----------------------------------------------------------------------------- builder
RESIDUAL = ("con", "affine", "relu", "con", "affine", "add_prev", "relu")
DOWN = ("con", "affine", "relu", "con", "affine", "avg_pool", "add_prev", "relu")
STEM = ("con", "affine", "relu", "max_pool")
#: wrapper versions, top down, of each part (2 = add_layer, 1 = tag/skip, 3 = bottom)
VERSIONS = {"residual": [2, 2, 2, 2, 2, 2, 2, 1], "down": [2, 2, 2, 1, 1, 2, 2, 2, 2, 2, 1],
            "stem": [2, 2, 2, 3], "head": [2, 2]}


class DlibResNetONNX:
    """dlib's metric-learning ResNet (``anet_type`` of dlib's
    ``dnn_face_recognition_ex``): stem con 7x7/2 + affine + relu + max_pool 3x3/2,
    residual blocks (``ares``) and downsampling blocks (``ares_down``: the shortcut is
    a 2x2/2 average pool, zero-padded to the main branch's shape), global average pool,
    fc without bias."""

    def __init__(self, net: DlibNet):
        self.net = net
        self.blocks = self._match(net)

    @staticmethod
    def _match(net: DlibNet) -> list:
        kinds = [layer.kind for layer in net.layers]
        if net.input_name != "input_rgb_image_sized" or tuple(kinds[:4]) != STEM:
            raise DlibFormatError(f"not dlib's face ResNet: starts with {net.input_name}, {kinds[:4]}")
        blocks, i = [], 4
        while i < len(kinds) and kinds[i] == "con":
            if tuple(kinds[i:i + 7]) == RESIDUAL:
                blocks.append(("residual", i))
                i += 7
            elif tuple(kinds[i:i + 8]) == DOWN:
                blocks.append(("down", i))
                i += 8
            else:
                raise DlibFormatError(f"not dlib's face ResNet: unexpected layers {kinds[i:i + 8]} at layer {i}")
        tail = net.layers[i:]
        if [x.kind for x in tail] != ["avg_pool", "fc"] or tail[0].attrs["kernel"] != (0, 0):
            raise DlibFormatError(f"not dlib's face ResNet: ends with {[x.kind for x in tail]}, expected "
                                  "avg_pool_everything, fc")
        want = VERSIONS["head"] + [v for kind, _ in reversed(blocks) for v in VERSIONS[kind]] + VERSIONS["stem"]
        if net.versions != want:
            raise DlibFormatError("not dlib's face ResNet: its tag/skip layers are not where dlib's "
                                  "anet_type puts them")
        return blocks

    # -- graph
    def build(self, sha256: str = "", origin: str = ""):
        """The ``onnx.ModelProto``."""
        g = _Graph()
        x = g.normalise(INPUT_NAME, self.net.input_mean)
        shape = (3,) + tuple(self.net.input_size)
        layers = self.net.layers
        x, shape = g.con(x, shape, layers[0])
        x = g.affine(x, layers[1])
        x = g.relu(x)
        x, shape = g.pool(x, shape, layers[3])
        for kind, i in self.blocks:
            tag, tag_shape = x, shape
            x, shape = g.con(x, shape, layers[i])
            x = g.affine(x, layers[i + 1])
            x = g.relu(x)
            x, shape = g.con(x, shape, layers[i + 3])
            x = g.affine(x, layers[i + 4])
            if kind == "down":
                tag, tag_shape = g.pool(tag, tag_shape, layers[i + 5])
            x, shape = g.add_prev(x, shape, tag, tag_shape)
            x = g.relu(x)
        x = g.node("GlobalAveragePool", [x])
        x = g.node("Flatten", [x], axis=1)
        fc = layers[-1]
        g.node("MatMul", [x, g.const(fc.params["weight"])], out=OUTPUT_NAME)
        return g.model(self.net, fc.attrs["outputs"], sha256, origin)


class _Graph:
    """Collects nodes and initialisers; tracks (C, H, W) shapes (the batch is dynamic)."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def _name(self, op: str) -> str:
        self.n += 1
        return f"{op}_{self.n}"

    def const(self, value, dtype=np.float32) -> str:
        from onnx import numpy_helper

        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(np.asarray(value, dtype)), name))
        return name

    def node(self, op: str, inputs: list, out: Optional[str] = None, **attrs) -> str:
        from onnx import helper

        name = self._name(op)
        out = out or name
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def normalise(self, x: str, mean) -> str:
        # node names "Sub..." / "Mul..." first: insightface's sign of a self-normalising graph
        m = self.const(np.asarray(mean, np.float32).reshape(1, 3, 1, 1))
        x = self.node("Sub", [x, m])
        return self.node("Mul", [x, self.const(np.float32(1.0 / 256.0))])

    def con(self, x: str, shape: tuple, layer) -> tuple:
        (kh, kw), (sy, sx), (py, px) = layer.attrs["kernel"], layer.attrs["stride"], layer.attrs["padding"]
        w = layer.params["weight"]
        if w.shape[1] != shape[0]:
            raise DlibFormatError(f"con with {w.shape[1]} input channels after a tensor of {shape[0]}")
        y = self.node("Conv", [x, self.const(w), self.const(layer.params["bias"])], kernel_shape=[kh, kw],
                      strides=[sy, sx], pads=[py, px, py, px])
        return y, (w.shape[0], 1 + (shape[1] + 2 * py - kh) // sy, 1 + (shape[2] + 2 * px - kw) // sx)

    def affine(self, x: str, layer) -> str:
        c = layer.params["gamma"].size
        x = self.node("Mul", [x, self.const(layer.params["gamma"].reshape(1, c, 1, 1))])
        return self.node("Add", [x, self.const(layer.params["beta"].reshape(1, c, 1, 1))])

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def pool(self, x: str, shape: tuple, layer) -> tuple:
        (kh, kw), (sy, sx), (py, px) = layer.attrs["kernel"], layer.attrs["stride"], layer.attrs["padding"]
        op = "MaxPool" if layer.kind == "max_pool" else "AveragePool"
        kw_ = dict(kernel_shape=[kh, kw], strides=[sy, sx], pads=[py, px, py, px])
        if op == "AveragePool":
            kw_["count_include_pad"] = 0  # dlib averages only the pixels inside the image
        y = self.node(op, [x], **kw_)
        return y, (shape[0], 1 + (shape[1] + 2 * py - kh) // sy, 1 + (shape[2] + 2 * px - kw) // sx)

    def _pad_to(self, x: str, shape: tuple, to: tuple) -> str:
        if shape == to:
            return x
        ends = [0, to[0] - shape[0], to[1] - shape[1], to[2] - shape[2]]
        return self.node("Pad", [x, self.const(np.array([0, 0, 0, 0] + ends, np.int64), np.int64)], mode="constant")

    def add_prev(self, x: str, shape: tuple, prev: str, prev_shape: tuple) -> tuple:
        to = tuple(max(a, b) for a, b in zip(shape, prev_shape))
        return self.node("Add", [self._pad_to(x, shape, to), self._pad_to(prev, prev_shape, to)]), to

    def model(self, net: DlibNet, dim: int, sha256: str, origin: str):
        from onnx import TensorProto, helper

        h, w = net.input_size
        graph = helper.make_graph(
            self.nodes, MODEL_NAME,
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, h, w])],
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", dim])],
            initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="facecurate", producer_version=__version__)
        model.ir_version = 7  # readable by every ONNX Runtime facecurate supports
        mean = ", ".join(f"{m:.6f}" for m in net.input_mean)
        helper.set_model_props(model, {
            "facecurate.model": MODEL_NAME,
            "facecurate.converter_version": str(CONVERTER_VERSION),
            "source_sha256": sha256,
            "origin": origin,
            "input": f"N x 3 x {h} x {w}, RGB, pixel values 0..255 (dlib's {h}x{w} face chip)",
            "normalisation": f"inside the graph: (x - mean) / 256, mean (R, G, B) = {mean}",
            "output": f"N x {dim}, dlib's descriptor before any normalisation",
        })
        model.doc_string = (f"dlib's face-recognition ResNet converted by facecurate {__version__} from "
                            f"{origin} (sha256 {sha256})")
        return model


# ----------------------------------------------------------------------------- verification
def synthetic_chip(size: int = 150, variant: int = 0) -> np.ndarray:
    """A deterministic 150x150 RGB test chip (smooth gradients, a face-like layout of
    dark blobs and a hashed texture), the same bytes on every machine."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    img = np.empty((size, size, 3), np.float64)
    for c in range(3):
        img[..., c] = 120 + 60 * np.sin((5 + c + variant) * x + (3 - c) * y) + 40 * (y - 0.5)
    for cx, cy, r in ((0.33, 0.35, 0.07), (0.67, 0.35, 0.07), (0.5, 0.55, 0.05), (0.5, 0.72, 0.1)):
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] *= 0.35
    yi, xi = np.mgrid[0:size, 0:size]
    img += (((xi * 7919 + yi * 104729 + variant * 31) % 61) - 30)[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def verify_against_dlib(model_bytes: bytes, chips: Optional[list] = None) -> float:
    """Max abs difference between ONNX Runtime (CPU) running ``model_bytes`` and dlib's
    ``compute_face_descriptor`` on ``chips`` (default: two synthetic chips)."""
    import onnxruntime as ort

    chips = chips if chips is not None else [synthetic_chip(), synthetic_chip(variant=1)]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, sess_options=so, providers=["CPUExecutionProvider"])
    blob = np.stack(chips).astype(np.float32).transpose(0, 3, 1, 2)
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(blob)})[0]
    ref = dlib_descriptors(chips)
    return float(np.abs(got - ref).max())


def convert(dat=None, *, sha256: Optional[str] = None) -> bytes:
    """Serialized, verified ONNX graph of the ``.dat`` (default: the installed one)."""
    dat = Path(dat) if dat else dat_path()
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401  (the built-in check runs the graph)
    except ImportError as e:
        raise DlibOnnxError(f"converting dlib's ResNet to ONNX needs {e.name}: "
                            "pip install 'facecurate[cpu]' (or [gpu])") from e
    sha256 = sha256 or sha256_file(dat)
    try:
        net = read_dlib_net(dat)
        model = DlibResNetONNX(net).build(sha256, _origin(dat))
    except DlibFormatError as e:
        raise DlibOnnxError(f"cannot convert {dat}: {e}") from None
    data = model.SerializeToString()
    check_and_raise(data, dat)
    return data


def check_and_raise(model_bytes: bytes, dat) -> None:
    diff = verify_against_dlib(model_bytes)
    if not diff <= VERIFY_TOLERANCE:
        raise DlibOnnxError(f"the ONNX graph converted from {dat} disagrees with dlib on the built-in "
                            f"check (max abs difference {diff:.3g} > {VERIFY_TOLERANCE:g}); not cached")


def _origin(dat: Path) -> str:
    try:
        from importlib.metadata import version

        pkg = f"face_recognition_models {version('face_recognition_models')}"
    except Exception:  # noqa: BLE001 - the version is informative only
        pkg = "face_recognition_models"
    return f"{dat.name} ({pkg})"


def dlib_resnet_onnx(dat=None, sha256: Optional[str] = None) -> Path:
    """Path of the cached ONNX graph of dlib's ResNet, converting (and verifying) it
    first when it is not cached yet."""
    dat = Path(dat) if dat else dat_path()
    sha256 = sha256 or sha256_file(dat)
    path = cached_path(sha256)
    if path.is_file():
        return path
    data = convert(dat, sha256=sha256)
    try:
        write_bytes_atomic(path, data)
    except OSError as e:
        raise DlibOnnxError(f"cannot write the converted model to {path}: {e} (set {CACHE_ENV} to a "
                            "writable folder)") from None
    return path


def export(dest, name: str = "dlib-resnet") -> dict:
    """Write the converted graph to ``dest`` (atomically). Returns what was written."""
    if name not in EXPORT_NAMES:
        raise DlibOnnxError(f"unknown model {name!r}: facecurate can export {', '.join(EXPORT_NAMES)}")
    src = dlib_resnet_onnx()
    write_bytes_atomic(dest, src.read_bytes())
    return {"model": MODEL_NAME, "file": str(dest), "bytes": Path(dest).stat().st_size,
            "sha256": sha256_file(dest), "source_sha256": sha256_file(dat_path()), "cached": str(src)}


def inventory() -> dict:
    """What is installed and cached: dlib's weight files, the runtimes, converted graphs."""
    from importlib.metadata import PackageNotFoundError, version

    weights = []
    for name in (dm.DESCRIPTOR, dm.SHAPE68, dm.SHAPE5, dm.MMOD):
        try:
            p = Path(dm.model_file(name))
            weights.append({"file": name, "path": str(p), "bytes": p.stat().st_size})
        except dm.ModelNotFound as e:
            weights.append({"file": name, "missing": str(e)})
    runtimes = {}
    for pkg in ("dlib-bin", "onnxruntime", "onnxruntime-gpu", "onnx", "onnxconverter-common"):
        try:
            runtimes[pkg] = version(pkg)
        except PackageNotFoundError:
            runtimes[pkg] = None
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        runtimes["onnxruntime_providers"] = list(ort.get_available_providers())
    current = sha256_file(dat_path()) if weights[0].get("path") else ""
    cached = []
    folder = models_cache_dir()
    for f in sorted(folder.glob("*.onnx")) if folder.is_dir() else []:
        meta = {}
        try:
            meta = read_metadata(f)
        except Exception:  # noqa: BLE001 - listed as unreadable
            pass
        cached.append({"file": f.name, "bytes": f.stat().st_size, "model": meta.get("facecurate.model", "?"),
                       "source_sha256": meta.get("source_sha256", "?"),
                       "current": bool(current) and meta.get("source_sha256") == current})
    return {"weights": weights, "runtimes": runtimes, "cache": str(folder), "cached": cached,
            "dlib_runtime_auto": _auto_runtime()}


def resolve_runtime(runtime: str = "auto") -> str:
    """``dlib`` or ``onnx``: what ``runtime`` means on this installation."""
    if runtime not in RUNTIMES:
        raise ModelError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime != "auto":
        return runtime
    if importlib.util.find_spec("onnxruntime") is None:
        return "dlib"
    if importlib.util.find_spec("onnx") is None:  # cannot convert; a cached graph will do
        return "onnx" if cached_path(dlib_sha()).is_file() else "dlib"
    return "onnx"


def _auto_runtime() -> str:
    try:
        return resolve_runtime("auto")
    except Exception as e:  # noqa: BLE001 - informative only
        return f"unknown ({e})"


def read_metadata(path) -> dict:
    """The metadata properties of a converted graph (no weights loaded)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


__all__ = ["DlibResNetONNX", "DlibOnnxError", "dlib_resnet_onnx", "convert", "export", "cached_path",
           "models_cache_dir", "cache_root", "synthetic_chip", "verify_against_dlib", "MODEL_NAME", "RUNTIMES",
           "resolve_runtime"]
