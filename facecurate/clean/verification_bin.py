"""Reading an insightface verification ``.bin`` (``lfw.bin``, ``cfp_fp.bin``, ...) with
no code run: the one reader of such files (``clean --exclude X.bin``).

The file is a pickle of ``(bins, issame_list)``: encoded images (Python 2 ``str`` or
Python 3 ``bytes``; numpy ``uint8`` arrays in some conversions) and one bool per pair
(a list of bools, of numpy bools, or a numpy bool array). ``pickle.load`` would call
whatever the file names (``os.system``...). Here the unpickler's ``find_class`` hands
out only inert stand-ins for the few globals such files really contain, found by
pickling these shapes with protocols 0-5 under numpy 1.x and 2.x (``pack-pairs``
writes them with protocol 4):

- ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``,
  ``numpy.ndarray``, ``numpy.dtype`` (an array, protocols 0-4);
- ``numpy.core.numeric._frombuffer`` / ``numpy._core.numeric._frombuffer`` (protocol 5);
- ``numpy.core.multiarray.scalar`` / ``numpy._core.multiarray.scalar`` (a numpy bool);
- ``_codecs.encode`` (bytes in protocols 0-2 written by Python 3, latin-1 only).

Any other global is refused with a message naming it, before anything is called. The
stand-ins only record their arguments; numpy's own unpickling never sees the file.
An array is rebuilt afterwards by :func:`np.frombuffer`, only for a bool or integer
dtype and only when its shape times its item size equals the bytes the file holds,
so no count in the file makes anything larger than the file. The file itself must be
a regular file under ``MAX_VERIFICATION_BIN_BYTES``.
"""

from __future__ import annotations

import io
import math
import os
import pickle

import numpy as np

from facecurate.common.constants import MAX_VERIFICATION_BIN_BYTES
from facecurate.common.filetree import FileProblem, read_regular

__all__ = ["BinError", "read_verification_bin", "ALLOWED_GLOBALS"]


class BinError(ValueError):
    """Not a verification .bin this reader accepts (the message says why, in one line)."""


#: numpy dtype strings an array in a .bin may have (bools, bytes, integers).
_DTYPES = {"b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "?"}


def _text(v) -> str:
    """A str, or Python 2 ``str`` read as bytes."""
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("latin-1")
    if isinstance(v, str):
        return v
    raise BinError(f"expected a string in the pickle, found {type(v).__name__}")


class _NDArrayType:
    """Stands for ``numpy.ndarray`` (only passed to ``_reconstruct``)."""


class _Dtype:
    __slots__ = ("spec", "order")

    def __init__(self, spec, align=False, copy=False):
        self.spec, self.order = _text(spec), "|"

    def __setstate__(self, state):  # (version, byte order, subarray, names, fields, ...): plain dtypes only
        if not isinstance(state, tuple) or len(state) < 5 or any(v is not None for v in state[2:5]):
            raise BinError("a numpy dtype other than a plain bool or integer")
        self.order = _text(state[1])

    def numpy(self) -> np.dtype:
        if self.spec not in _DTYPES or self.order not in "|<>=":
            raise BinError(f"numpy dtype {self.order}{self.spec} is not one of a verification .bin")
        return np.dtype(self.order.replace("|", "=") + self.spec)


class _Array:
    __slots__ = ("shape", "dtype", "data", "order")

    def __init__(self, shape=(), dtype=None, data=b"", order="C"):
        self.shape, self.dtype, self.data, self.order = shape, dtype, data, order

    def __setstate__(self, state):  # ndarray.__reduce__: (version,) shape, dtype, fortran, raw bytes
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise BinError("bad numpy array state")
        self.shape, self.dtype, fortran, self.data = state[-4:]
        self.order = "F" if fortran else "C"

    def numpy(self) -> np.ndarray:
        shape = self.shape
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
            raise BinError("bad numpy array shape")
        if not isinstance(self.dtype, _Dtype) or not isinstance(self.data, (bytes, bytearray)):
            raise BinError("numpy array without a dtype or raw bytes")
        dt = self.dtype.numpy()
        if math.prod(shape) * dt.itemsize != len(self.data):  # Python ints: nothing allocated
            raise BinError(f"numpy array of shape {shape} does not match its {len(self.data)} bytes")
        return np.frombuffer(bytes(self.data), dt).reshape(shape, order=self.order)


def _reconstruct(cls, shape, typecode):
    if cls is not _NDArrayType or tuple(shape) != (0,):
        raise BinError("numpy _reconstruct of something other than an empty ndarray")
    return _Array()


def _frombuffer(buf, dtype, shape, order="C"):
    if not isinstance(buf, (bytes, bytearray)) or _text(order) not in ("C", "F"):
        raise BinError("bad numpy _frombuffer arguments")
    return _Array(tuple(shape) if isinstance(shape, (tuple, list)) else shape, dtype, buf, _text(order))


def _scalar(dtype, data=b""):
    return _Array((), dtype, data)


def _encode(obj, encoding="utf-8", errors="strict"):
    if not isinstance(obj, str) or _text(encoding).replace("-", "").lower() != "latin1":
        raise BinError("_codecs.encode other than a latin-1 string")
    return obj.encode("latin-1")


#: (module, name) -> the inert stand-in the unpickler hands out.
ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _encode,
    ("numpy", "dtype"): _Dtype,
    ("numpy", "ndarray"): _NDArrayType,
    **{(m, "_reconstruct"): _reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        fn = ALLOWED_GLOBALS.get((module, name))
        if fn is None:
            raise BinError(f"refused: the pickle calls {module}.{name}, which a verification .bin never "
                           "contains (nothing was run)")
        return fn

    def persistent_load(self, pid):
        raise BinError("refused: the pickle uses a persistent id")


def _plain(v):
    """A stand-in array as numpy; anything else as it is."""
    return v.numpy() if isinstance(v, _Array) else v


def _images(bins) -> list[bytes]:
    bins = _plain(bins)
    if not isinstance(bins, (list, tuple)):
        raise BinError(f"its images are a {type(bins).__name__}, not a list")
    out = []
    for i, b in enumerate(bins):
        b = _plain(b)
        if isinstance(b, np.ndarray) and b.dtype == np.uint8:
            b = b.tobytes()
        if not isinstance(b, (bytes, bytearray)):
            raise BinError(f"image {i} is a {type(b).__name__}, not encoded image bytes")
        out.append(bytes(b))
    return out


def _flags(issame) -> list[bool]:
    issame = _plain(issame)
    if isinstance(issame, np.ndarray):
        issame = issame.reshape(-1).tolist()
    if not isinstance(issame, (list, tuple)):
        raise BinError(f"its issame_list is a {type(issame).__name__}, not a list")
    out = []
    for i, v in enumerate(issame):
        v = _plain(v)
        if isinstance(v, np.ndarray) and v.shape == ():
            v = v.item()
        if type(v) not in (bool, int) or v not in (0, 1):
            raise BinError(f"issame_list[{i}] is not a bool")
        out.append(bool(v))
    return out


def read_verification_bin(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    """(encoded images, one bool per pair) of a verification .bin, read with no code
    run. Raises :class:`BinError` (one line, naming the file) for anything else."""
    try:
        data = read_regular(path, MAX_VERIFICATION_BIN_BYTES)
    except FileProblem as e:
        raise BinError(f"{path}: {e.message}") from None
    except OSError as e:
        raise BinError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        obj = _Unpickler(io.BytesIO(data), encoding="bytes").load()
        if not isinstance(obj, (tuple, list)) or len(obj) != 2:
            raise BinError(f"a pickle of a {type(obj).__name__}, not (bins, issame_list)")
        bins, issame = _images(obj[0]), _flags(obj[1])
    except BinError as e:
        raise BinError(f"{path}: not a verification .bin: {e}") from None
    except Exception as e:  # noqa: BLE001 - a damaged pickle: any unpickling error, said in one line
        raise BinError(f"{path}: not a verification .bin (pickle of (bins, issame_list)): "
                       f"{type(e).__name__}: {e}") from None
    if sum(map(len, bins)) + len(bins) > len(data):  # each image once in the file: no count beyond its size
        raise BinError(f"{path}: not a verification .bin: its images hold more bytes than the file "
                       "(one image referenced many times)")
    if len(bins) != 2 * len(issame):
        raise BinError(f"{path}: not a verification .bin: {len(bins)} images for {len(issame)} pairs "
                       "(two images per pair)")
    return bins, issame
