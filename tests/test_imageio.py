"""JPEG header parsing without decoding: the strict parser pack uses to store crops
byte-for-byte, the lenient one align's decompression-bomb guard uses, and pack's
header-prefix shortcut. JPEGs are encoded by OpenCV, as align writes them."""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest

from facecurate.common.constants import STATUS_TOO_LARGE
from facecurate.common.imageio import ImageError, decode_image, header_size, jpeg_size, jpeg_sof
from facecurate.pack.pack_inputs import SizeCheck


def _jpeg(w: int, h: int, seed: int = 0) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("w,h", [(112, 112), (100, 80), (640, 480)])
def test_jpeg_sof_reads_the_frame_size(w, h):
    data = _jpeg(w, h)
    sw, sh, end = jpeg_sof(data)
    assert (sw, sh) == (w, h) == jpeg_size(data) == header_size(data)
    assert data[end - 4:end] == struct.pack(">HH", h, w)


def test_strict_and_lenient_on_stray_bytes_and_non_jpegs():
    data = _jpeg(112, 112)
    app0_end = 4 + struct.unpack(">H", data[4:6])[0]  # SOI + APP0 segment
    stray = data[:app0_end] + b"\x00\x00\x00" + data[app0_end:]
    assert jpeg_sof(stray) is None  # pack: not stored as-is
    assert jpeg_sof(stray, lenient=True)[:2] == (112, 112)  # the bomb guard still sees the size
    assert header_size(stray) == (112, 112)
    assert jpeg_sof(b"\x89PNG\r\n\x1a\n" + data[2:]) is None
    assert jpeg_sof(data[:app0_end]) is None  # cut before the frame header
    assert jpeg_sof(b"\xff\xd8\xff\xda\x00\x08" + b"\x00" * 40) is None  # scan before any frame header


def test_bomb_guard_refuses_a_jpeg_declaring_too_many_pixels():
    data = bytearray(_jpeg(64, 64))
    _, _, end = jpeg_sof(bytes(data))
    data[end - 4:end] = struct.pack(">HH", 60000, 60000)
    with pytest.raises(ImageError) as e:
        decode_image(bytes(data), max_pixels=50_000_000)
    assert e.value.status == STATUS_TOO_LARGE


def test_size_check_reuses_a_header_prefix_only_when_it_fits():
    check = SizeCheck(112)
    a, b = _jpeg(112, 112, 1), _jpeg(112, 112, 2)
    assert check.prefix is None and check(a)
    assert check.prefix is not None and b.startswith(check.prefix) and check(b)  # the shortcut
    assert not check(_jpeg(100, 100))  # same encoder, other size: the prefix differs at the size
    assert not check(b"\xff\xd8 junk") and not check(b"")
    assert check.prefix == a[:jpeg_sof(a)[2]]
