"""A reader of dlib's DNN serialization (``dlib::serialize(net, file)``), for the
layers of dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``).

Format (see docs in the shared dlib-resnet notes; written from those facts, not from
dlib's code):

* integers: a control byte (low nibble = number of magnitude bytes, 0x80 = negative)
  followed by the magnitude, little-endian;
* float / double: a signed integer mantissa and a signed integer exponent,
  value = mantissa * 2**exponent (exponents 32000-32002 encode inf, -inf, NaN);
* strings: length, then the bytes; bools: one ASCII byte, ``0`` or ``1``;
* tensors: version 2, dims n, k, nr, nc, then n*k*nr*nc float32 little-endian.

A network is written as: the loss wrapper (version, loss details), then the version
of every layer wrapper from the top of the network down to the input (2 = add_layer,
1 = tag / skip, 3 = the bottom add_layer over the input layer), then the body of every
add_layer from the input upward. Tag and skip wrappers have no body, and the tag
numbers are not stored: the caller knows the network's type and checks the layers
against it (see :mod:`facecurate.models.dlib_onnx`).

:func:`read_dlib_net` returns a :class:`DlibNet`; anything it does not know (a layer
type, a layer or wrapper version, trailing bytes) raises :class:`DlibFormatError`
naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

#: wrapper versions in the version list
ADD_LAYER_VERSION = 2
TAG_VERSION = 1
BOTTOM_VERSION = 3


class DlibFormatError(ValueError):
    """The file is not a dlib network this reader understands (message names why)."""


@dataclass
class Layer:
    """One computational layer. ``kind``: con, affine, relu, max_pool, avg_pool,
    add_prev, fc; ``name``: the serialized type name (e.g. ``con_4``)."""

    kind: str
    name: str
    attrs: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)  # name -> float32 ndarray

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self.params.items()}
        return f"Layer({self.kind}, {self.attrs}, {shapes})"


@dataclass
class DlibNet:
    """A parsed network: the input layer, the layers from the input upward, the
    wrapper versions from the top down, and the loss layer's details."""

    input_name: str
    input_mean: tuple  # (red, green, blue) as float32 values
    input_size: tuple  # (rows, cols)
    layers: list
    versions: list
    loss: dict

    def count(self, kind: str) -> int:
        return sum(1 for layer in self.layers if layer.kind == kind)

    def num_params(self) -> int:
        return sum(int(v.size) for layer in self.layers for v in layer.params.values())


class _Reader:
    """Sequential reader of dlib's binary encodings over a bytes buffer."""

    def __init__(self, data: bytes, origin: str):
        self.data = memoryview(data)
        self.pos = 0
        self.origin = origin

    def fail(self, what: str) -> DlibFormatError:
        return DlibFormatError(f"{self.origin}: {what} (at byte {self.pos})")

    def _byte(self) -> int:
        if self.pos >= len(self.data):
            raise self.fail("unexpected end of file")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def int_(self, what: str = "integer") -> int:
        c = self._byte()
        n = c & 0x0F
        if c & 0x70 or n == 0 or n > 8:
            raise self.fail(f"bad {what} (control byte 0x{c:02x})")
        if self.pos + n > len(self.data):
            raise self.fail("unexpected end of file")
        v = int.from_bytes(self.data[self.pos:self.pos + n], "little")
        self.pos += n
        return -v if c & 0x80 else v

    def float_(self, what: str = "float") -> float:
        m, e = self.int_(what), self.int_(what)
        if e >= 32000:
            return {32000: math.inf, 32001: -math.inf}.get(e, math.nan)
        return math.ldexp(m, e)

    def string(self) -> str:
        n = self.int_("string length")
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"bad string length {n}")
        s = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return s.decode("latin-1")

    def bool_(self) -> bool:
        b = self._byte()
        if b not in (0x30, 0x31):
            raise self.fail(f"bad bool byte 0x{b:02x}")
        return b == 0x31

    def tensor(self) -> np.ndarray:
        v = self.int_("tensor version")
        if v != 2:
            raise self.fail(f"unsupported tensor version {v} (this reader knows 2)")
        dims = [self.int_("tensor dimension") for _ in range(4)]
        if min(dims) < 0:
            raise self.fail(f"bad tensor dimensions {dims}")
        count = int(np.prod(dims))
        end = self.pos + 4 * count
        if end > len(self.data):
            raise self.fail(f"tensor of {dims} runs past the end of the file")
        arr = np.frombuffer(self.data[self.pos:end], dtype="<f4").astype(np.float32).reshape(dims)
        self.pos = end
        return arr

    def alias_tensor(self) -> tuple:
        v = self.int_("alias_tensor version")
        if v != 1:
            raise self.fail(f"unsupported alias_tensor version {v} (this reader knows 1)")
        return tuple(self.int_("alias_tensor dimension") for _ in range(4))

    def expect_name(self, names: tuple, what: str) -> str:
        start = self.pos
        name = self.string()
        if name not in names:
            self.pos = start
            raise self.fail(f"unsupported {what} {name!r} (this reader knows {', '.join(names)})")
        return name


# ----------------------------------------------------------------------------- layers
def _read_con(r: _Reader, name: str) -> Layer:
    params = r.tensor().reshape(-1)
    nf, nr, nc = r.int_(), r.int_(), r.int_()
    sy, sx, py, px = r.int_(), r.int_(), r.int_(), r.int_()
    r.alias_tensor(), r.alias_tensor()  # filters, biases views of params
    for _ in range(4):  # learning-rate and weight-decay multipliers
        r.float_("double")
    nw = params.size - nf
    if nf <= 0 or nw % (nf * nr * nc):
        raise r.fail(f"{name}: {params.size} parameters do not fit {nf} filters of {nr}x{nc}")
    k = nw // (nf * nr * nc)
    return Layer("con", name, dict(filters=nf, kernel=(nr, nc), stride=(sy, sx), padding=(py, px)),
                 dict(weight=params[:nw].reshape(nf, k, nr, nc), bias=params[nw:]))


def _read_affine(r: _Reader, name: str) -> Layer:
    params = r.tensor().reshape(-1)
    r.alias_tensor(), r.alias_tensor()  # gamma, beta
    mode = r.int_("affine mode")
    if mode != 0:
        raise r.fail(f"{name}: unsupported affine mode {mode} (this reader knows 0, per channel)")
    c = params.size // 2
    return Layer("affine", name, dict(mode=mode), dict(gamma=params[:c], beta=params[c:]))


def _read_pool(kind: str) -> Callable:
    def read(r: _Reader, name: str) -> Layer:
        nr, nc, sy, sx, py, px = (r.int_() for _ in range(6))
        return Layer(kind, name, dict(kernel=(nr, nc), stride=(sy, sx), padding=(py, px)))
    return read


def _read_fc(r: _Reader, name: str) -> Layer:
    nout, nin = r.int_(), r.int_()
    params = r.tensor().reshape(-1)
    r.alias_tensor(), r.alias_tensor()  # weights, biases
    bias_mode = r.int_("fc bias mode")
    for _ in range(4):
        r.float_("double")
    if bias_mode != 1:
        raise r.fail(f"{name}: fc with a bias (bias mode {bias_mode}) is not supported")
    if params.size != nin * nout:
        raise r.fail(f"{name}: {params.size} parameters, expected {nin} x {nout}")
    return Layer("fc", name, dict(outputs=nout, inputs=nin), dict(weight=params.reshape(nin, nout)))


#: serialized layer names this reader knows -> body reader
LAYER_READERS: dict[str, Callable] = {
    "con_4": _read_con,
    "affine_": _read_affine,
    "relu_": lambda r, name: Layer("relu", name),
    "max_pool_2": _read_pool("max_pool"),
    "avg_pool_2": _read_pool("avg_pool"),
    "add_prev_": lambda r, name: Layer("add_prev", name),
    "fc_2": _read_fc,
}
INPUT_LAYERS = ("input_rgb_image_sized",)
LOSS_LAYERS = ("loss_metric_2",)


def _read_layer(r: _Reader) -> Layer:
    name = r.expect_name(tuple(LAYER_READERS), "dlib layer")
    return LAYER_READERS[name](r, name)


def _read_add_layer_tail(r: _Reader, bottom: bool) -> None:
    """The add_layer wrapper's own state after the layer details (not needed)."""
    for _ in range(3):  # setup_called, gradient_input_is_stale, output_disabled
        r.bool_()
    r.tensor(), r.tensor()  # x_grad, cached_output
    r.tensor()  # params_grad (bottom: grad_final)
    if bottom:
        r.int_("sample_expansion_factor")


# ----------------------------------------------------------------------------- network
def read_dlib_net(path_or_bytes, origin: str | None = None) -> DlibNet:
    """Parse a serialized dlib network (a path or the file's bytes)."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, origin = bytes(path_or_bytes), origin or "dlib network"
    else:
        path = Path(path_or_bytes)
        data, origin = path.read_bytes(), origin or str(path)
    r = _Reader(data, origin)
    v = r.int_("loss wrapper version")
    if v != 1:
        raise r.fail(f"unsupported loss wrapper version {v} (this reader knows 1)")
    r.expect_name(LOSS_LAYERS, "dlib loss layer")
    loss = {"margin": r.float_(), "distance_threshold": r.float_()}
    versions = []
    while True:
        v = r.int_("layer wrapper version")
        versions.append(v)
        if v == BOTTOM_VERSION:
            break
        if v not in (ADD_LAYER_VERSION, TAG_VERSION):
            raise r.fail(f"unsupported layer wrapper version {v} (this reader knows add_layer 2 "
                         f"and 3, tag/skip 1)")
    input_name = r.expect_name(INPUT_LAYERS, "dlib input layer")
    mean = tuple(float(np.float32(r.float_())) for _ in range(3))
    size = (r.int_(), r.int_())
    layers = [_read_layer(r)]
    _read_add_layer_tail(r, bottom=True)
    for _ in range(versions.count(ADD_LAYER_VERSION)):
        layers.append(_read_layer(r))
        _read_add_layer_tail(r, bottom=False)
    if r.pos != len(r.data):
        raise r.fail(f"{len(r.data) - r.pos} bytes left after the last layer")
    return DlibNet(input_name, mean, size, layers, versions, loss)


__all__ = ["read_dlib_net", "DlibNet", "Layer", "DlibFormatError", "LAYER_READERS"]
