"""Reading photos from a crawl without surprises.

``read_image`` returns an 8-bit RGB array with EXIF orientation applied, or raises
``ImageError`` whose ``status`` is one of the align.csv statuses and whose message
says what is wrong. Grey, alpha (composited on white), CMYK and 16-bit images are
converted; the pixel count is checked from the file header *before* decoding, so a
decompression bomb is refused without allocating it. Files are read through
:func:`facecurate.common.filetree.read_regular`: regular files only (a FIFO or device is
``unsupported``, never opened), at most ``max_bytes`` (``too_large``).
"""

from __future__ import annotations

import os
import struct
from typing import Optional, Tuple

import cv2
import numpy as np

from facecurate.common.constants import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    MAX_INPUT_BYTES,
    STATUS_DECODE_ERROR,
    STATUS_TOO_LARGE,
    STATUS_UNREADABLE,
    STATUS_UNSUPPORTED,
)
from facecurate.common.filetree import FileProblem, read_regular

#: JPEG start-of-image and end-of-image markers; the PNG file signature.
JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageError(FileProblem):
    """An image that cannot be used: ``status`` (an align.csv status) and ``message``."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def header_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) from the header of a JPEG, PNG, GIF, BMP, WebP or TIFF, without
    decoding; None when the header is not understood."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
            w, h = struct.unpack(">II", data[16:24])
            return w, h
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", data[6:10])
        if data[:2] == b"BM" and len(data) >= 26:
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_size(data)
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(data)
    except (struct.error, IndexError, ValueError):
        return None
    return None


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers


def jpeg_sof(data: bytes, lenient: bool = False) -> Optional[Tuple[int, int, int]]:
    """(width, height, end) from a JPEG's start-of-frame segment, without decoding;
    ``end`` is the offset just past its size fields. None if not a JPEG or the header
    is not understood. Strict by default (every segment must follow the previous
    one); ``lenient`` skips stray bytes between segments, as libjpeg does (with a
    warning)."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    try:
        while i + 4 <= n:
            if data[i] != 0xFF:
                if not lenient:
                    return None
                i += 1
                continue
            m = data[i + 1]
            if m == 0xFF:
                i += 1
                continue
            if m == 0x01 or 0xD0 <= m <= 0xD8:
                i += 2
                continue
            if m in (0xD9, 0xDA):  # end of image, start of scan: no frame header before it
                return None
            if m in _SOF:
                h, w = struct.unpack_from(">HH", data, i + 5)
                return w, h, i + 9
            i += 2 + struct.unpack_from(">H", data, i + 2)[0]
    except struct.error:
        return None
    return None


def _jpeg_size(data: bytes) -> Optional[Tuple[int, int]]:
    s = jpeg_sof(data, lenient=True)
    return None if s is None else (s[0], s[1])


def _webp_size(data: bytes) -> Optional[Tuple[int, int]]:
    chunk = data[12:16]
    if chunk == b"VP8X":
        w = 1 + int.from_bytes(data[24:27], "little")
        h = 1 + int.from_bytes(data[27:30], "little")
        return w, h
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":
        b = int.from_bytes(data[21:25], "little")
        return (b & 0x3FFF) + 1, ((b >> 14) & 0x3FFF) + 1
    return None


def _tiff_size(data: bytes) -> Optional[Tuple[int, int]]:
    e = "<" if data[:2] == b"II" else ">"
    off = struct.unpack(e + "I", data[4:8])[0]
    count = struct.unpack(e + "H", data[off:off + 2])[0]
    w = h = None
    for k in range(count):
        p = off + 2 + 12 * k
        tag, typ = struct.unpack(e + "HH", data[p:p + 4])
        val = struct.unpack(e + ("H" if typ == 3 else "I"), data[p + 8:p + (10 if typ == 3 else 12)])[0]
        if tag == 256:
            w = val
        elif tag == 257:
            h = val
    return (w, h) if w and h else None


def jpeg_complete(data: bytes) -> bool:
    """True when JPEG bytes end with the end-of-image marker; zero bytes after it are
    allowed (some writers pad), so only the last 64 bytes are looked at. The one
    truncation check of the project: align's reader, pack and inspect use it."""
    return data[-64:].rstrip(b"\0").endswith(JPEG_EOI)


def jpeg_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) from a JPEG's SOF segment with the strict parser (what pack
    trusts to store a crop byte-for-byte); None if not a JPEG or not understood."""
    s = jpeg_sof(data)
    return None if s is None else (s[0], s[1])


def image_kind(data: bytes) -> str:
    """``jpg`` or ``png`` from the first bytes, else ``""`` (the two formats a .rec
    holds; the file extension unpack gives a record)."""
    if data[:2] == JPEG_SOI:
        return "jpg"
    if data[:8] == PNG_SIGNATURE:
        return "png"
    return ""


def _to_rgb8(img: np.ndarray) -> np.ndarray:
    """Any cv2-decoded array (grey, BGR, BGRA, 16-bit, float) -> 8-bit RGB."""
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img.astype(np.float64) * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        bgr = img[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)  # on white
        return cv2.cvtColor(np.round(bgr).astype(np.uint8), cv2.COLOR_BGR2RGB)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB)


def decode_image(data: bytes, name: str = "", max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to 8-bit RGB (EXIF orientation applied)."""
    if not data:
        raise ImageError(STATUS_DECODE_ERROR, "empty file (0 bytes)")
    size = header_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageError(STATUS_TOO_LARGE, f"{size[0]}x{size[1]} pixels is more than the limit of {max_pixels}")
    if data[:2] == JPEG_SOI and not jpeg_complete(data):
        raise ImageError(STATUS_DECODE_ERROR, "truncated JPEG (no end-of-image marker)")
    buf = np.frombuffer(data, np.uint8)
    # IMREAD_COLOR applies EXIF orientation and converts grey/CMYK/16-bit to 8-bit BGR.
    # Only images with an alpha channel are decoded unchanged, to composite them on white.
    img = None
    if _may_have_alpha(data):
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        if img is not None and not (img.ndim == 3 and img.shape[2] == 4):
            img = None
    if img is None:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        kind = "not an image this tool can read" if size is None else "corrupt image data"
        raise ImageError(STATUS_DECODE_ERROR, f"could not decode: {kind}")
    h, w = img.shape[:2]
    if h * w > max_pixels:
        raise ImageError(STATUS_TOO_LARGE, f"{w}x{h} pixels is more than the limit of {max_pixels}")
    return _to_rgb8(img)


def _may_have_alpha(data: bytes) -> bool:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return data[25:26] in (b"\x04", b"\x06")  # colour type grey+alpha / RGBA
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return data[12:16] == b"VP8L" or (data[12:16] == b"VP8X" and bool(data[20] & 0x10))
    return data[:4] in (b"II*\x00", b"MM\x00*")


def read_bytes(path: str | os.PathLike, max_bytes: int = MAX_INPUT_BYTES) -> bytes:
    """A regular file of at most ``max_bytes`` (:func:`facecurate.common.filetree.read_regular`);
    raise ImageError (unsupported, too_large, unreadable) with the reason."""
    try:
        return read_regular(path, max_bytes)
    except FileProblem as e:
        raise ImageError(e.status, e.message) from None
    except OSError as e:
        raise ImageError(STATUS_UNREADABLE, f"cannot read: {e.strerror or e}") from None


def read_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS,
               max_bytes: int = MAX_INPUT_BYTES) -> np.ndarray:
    """Read a photo from disk as 8-bit RGB; raise ImageError with a status and reason."""
    name = os.fspath(path)
    if not is_image_name(name):
        raise ImageError(STATUS_UNSUPPORTED, f"not an image file type ({os.path.splitext(name)[1] or 'no extension'})")
    return decode_image(read_bytes(name, max_bytes), name, max_pixels)
