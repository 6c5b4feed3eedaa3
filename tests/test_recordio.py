"""The pure-Python RecordIO framing against dmlc-core's rules and the real MXNet.

The MXNet checks (``@pytest.mark.oracle``) run arbitrary payloads through MXNet 1.9.1
in the oracle's own venv (``../shared/tools/mxnet-oracle`` builds it on first use).
They fail under CI when MXNet cannot run, and skip otherwise."""

from __future__ import annotations

import os
import pickle
import random
import struct
import subprocess
from pathlib import Path

import pytest

from facecurate.common.constants import RECORDIO_MAGIC
from facecurate.common.recordio import (
    MAGIC_BYTES,
    IndexedRecordReader,
    IndexedRecordWriter,
    RecordIOError,
    RecordWriter,
    frame,
    iter_records,
    pack_header,
    pack_record,
    read_idx,
    read_idx_arrays,
    unpack_record,
)

REPO = Path(__file__).resolve().parents[1]
M = MAGIC_BYTES


# ----------------------------------------------------------------------------- oracle
def _shared() -> Path:
    return Path(os.environ.get("FACECURATE_DATA", REPO.parent / "shared" / "data")).resolve().parent


def oracle_python() -> str:
    """Python of the MXNet oracle's venv (building it through the oracle script if
    needed); skip, or fail under CI, when MXNet cannot run."""
    venv = Path(os.environ.get("FACECURATE_ORACLE_VENV", Path.home() / ".cache" / "facecurate-oracle"))
    py = venv / "bin" / "python"

    def works() -> bool:
        return py.exists() and subprocess.run([str(py), "-c", "import mxnet, cv2"],
                                              capture_output=True).returncode == 0

    problem = ""
    if not works():
        tool = _shared() / "tools" / "mxnet-oracle"
        if tool.exists():
            r = subprocess.run([str(tool), "/nonexistent-prefix"], capture_output=True, text=True)
            problem = r.stderr[-500:]
        else:
            problem = f"{tool} not found"
    if not works():
        msg = f"MXNet oracle cannot run: {problem}"
        if os.environ.get("CI"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return str(py)


MX_RW = r"""
import pickle, sys
import mxnet as mx
payloads = pickle.load(open(sys.argv[1], "rb"))
ours = sys.argv[2]
r = mx.recordio.MXIndexedRecordIO(ours + ".idx", ours + ".rec", "r")
got = [r.read_idx(k) for k in range(len(payloads))]
r.close()
seq = mx.recordio.MXRecordIO(ours + ".rec", "r")
n = 0
while seq.read() is not None:
    n += 1
w = mx.recordio.MXIndexedRecordIO(sys.argv[3] + ".idx", sys.argv[3] + ".rec", "w")
for k, p in enumerate(payloads):
    w.write_idx(k, p)
w.close()
hdr = mx.recordio.pack(mx.recordio.IRHeader(0, [3.0, 7.5], 11, 0), b"img")
scal = mx.recordio.pack(mx.recordio.IRHeader(0, 2.0, 5, 9), b"jpg")
pickle.dump({"read": got, "sequential": n, "vector": hdr, "scalar": scal}, open(sys.argv[4], "wb"))
"""


def _payloads() -> list[bytes]:
    rng = random.Random(1)
    out = [b"", b"a", b"abcd", M, M + M, b"xx" + M + b"yy", b"abcd" + M + b"efgh" + M + M + b"z",
           b"q" * 7 + M, b"\xff\xd8" + bytes(range(256)) * 3 + M + b"tail\xff\xd9"]
    for _ in range(40):
        n = rng.randrange(0, 300)
        b = bytearray(rng.randbytes(n))
        for _ in range(rng.randrange(0, 4)):
            if n >= 4:
                i = rng.randrange(0, n - 3)
                b[i:i + 4] = M
        out.append(bytes(b))
    return out


# ----------------------------------------------------------------------------- framing
def _parts(buf: bytes) -> list[tuple[int, int]]:
    """(cflag, length) of every part, walking the raw framing."""
    out, pos = [], 0
    while pos < len(buf):
        magic, lrec = struct.unpack_from("<II", buf, pos)
        assert magic == RECORDIO_MAGIC
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        out.append((cflag, length))
        pos += 8 + ((length + 3) & ~3)
    return out


def test_frame_plain_record_layout():
    b = frame(b"hello")
    assert b[:4] == bytes.fromhex("0a23d7ce")  # little-endian magic on disk
    assert struct.unpack_from("<I", b, 4)[0] == 5
    assert b[8:13] == b"hello" and b[13:] == b"\0\0\0" and len(b) % 4 == 0
    assert frame(b"") == M + b"\0\0\0\0"


def test_frame_splits_at_aligned_magic_only():
    assert _parts(frame(b"xx" + M + b"yy")) == [(0, 8)]  # unaligned: not split
    assert _parts(frame(b"abcd" + M + b"ef")) == [(1, 4), (3, 2)]
    assert _parts(frame(M)) == [(1, 0), (3, 0)]
    assert _parts(frame(b"abcd" + M + b"efgh" + M + M + b"z")) == [(1, 4), (2, 4), (2, 0), (3, 1)]
    # The four magic bytes at each split point are not stored.
    assert len(frame(b"abcd" + M + b"ef")) == 8 + 4 + 8 + 4


def test_roundtrip_through_our_reader(tmp_path):
    payloads = _payloads()
    with IndexedRecordWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        for k, p in enumerate(payloads):
            w.write(k, p)
    with open(tmp_path / "a.rec", "rb") as f:
        recs = list(iter_records(f))
    assert [r.payload for r in recs] == payloads
    assert any(r.parts > 1 for r in recs)
    assert [o for _, o in read_idx(tmp_path / "a.idx")] == [r.offset for r in recs]
    with IndexedRecordReader(tmp_path / "a.rec", tmp_path / "a.idx") as r:
        assert [r.read_idx(k) for k in range(len(payloads))] == payloads


def test_idx_arrays_match_line_parser(tmp_path):
    p = tmp_path / "a.idx"
    p.write_text("0\t0\n1\t40\n\n7\t96")
    keys, offs = read_idx_arrays(p)
    assert keys.tolist() == [0, 1, 7] and offs.tolist() == [0, 40, 96]
    assert list(zip(keys.tolist(), offs.tolist())) == read_idx(p)
    p.write_text("0\t0\n1\t4x0\n")
    with pytest.raises(RecordIOError, match="line 2"):
        read_idx_arrays(p)
    p.write_text("0\t0\t5\n")
    with pytest.raises(RecordIOError, match="line 1"):
        read_idx_arrays(p)


def test_writer_image_fast_path_equals_general_framing(tmp_path):
    data = b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9"
    with_magic = b"\xff\xd8\x00\x00" + M + b"rest\xff\xd9"  # aligned in the payload (24 + 4)
    for img in (data, with_magic):
        p = tmp_path / "w.rec"
        with open(p, "wb") as f:
            w = RecordWriter(f)
            w.write_image(3.0, img, 7, 0)
            w.flush()
        assert p.read_bytes() == frame(pack_record(3.0, img, 7, 0))
    assert len(_parts(frame(pack_record(3.0, with_magic, 7, 0)))) == 2


def test_batch_writer_escapes_like_frame(tmp_path):
    """RecordWriter.write_images (pack's vectorised path) = frame() record by record,
    including images with the magic at aligned and unaligned payload offsets."""
    rng = random.Random(5)
    items = []
    for k in range(60):
        b = bytearray(rng.randbytes(rng.randrange(0, 400)))
        if k % 3 == 0 and len(b) >= 12:
            i = rng.randrange(0, len(b) - 4)
            b[i:i + 4] = M  # aligned in the payload when (24 + i) % 4 == 0
        items.append((float(k % 7), bytes(b), k))
    items.append((1.0, b"abcd" + M + b"ef", 60))  # 24 + 4: aligned, must split
    p = tmp_path / "b.rec"
    with open(p, "wb") as f:
        w = RecordWriter(f)
        offs = w.write_images(items[:30]) + w.write_images(items[30:])
    expected = [frame(pack_record(lab, img, k)) for lab, img, k in items]
    assert p.read_bytes() == b"".join(expected)
    assert offs == [sum(map(len, expected[:i])) for i in range(len(items))]
    assert len(_parts(expected[-1])) == 2
    with open(p, "rb") as f:
        assert [unpack_record(r.payload)[1] for r in iter_records(f)] == [img for _, img, _ in items]


def test_irheader_scalar_and_vector():
    h = pack_header(5.0, 12, 0)
    assert h == struct.pack("<IfQQ", 0, 5.0, 12, 0)
    hdr, img = unpack_record(h + b"JPEG")
    assert (hdr.flag, hdr.label, hdr.id, img) == (0, 5.0, 12, b"JPEG")
    v = pack_record([3.0, 7.5], b"img", 11)
    assert v[:24] == struct.pack("<IfQQ", 2, 0.0, 11, 0) and v[24:32] == struct.pack("<2f", 3.0, 7.5)
    hdr, img = unpack_record(v)
    assert hdr.flag == 2 and hdr.label == (3.0, 7.5) and hdr.scalar_label == 3.0 and img == b"img"
    with pytest.raises(RecordIOError):
        unpack_record(b"short")
    with pytest.raises(RecordIOError):
        unpack_record(struct.pack("<IfQQ", 9, 0.0, 0, 0) + b"abc")  # 9 floats announced, 3 bytes


def test_reader_reports_corruption(tmp_path):
    payloads = [b"a" * 10, b"b" * 20, b"c" * 30]
    blob = b"".join(frame(p) for p in payloads)

    def err(buf: bytes) -> RecordIOError:
        p = tmp_path / "x.rec"
        p.write_bytes(buf)
        with open(p, "rb") as f, pytest.raises(RecordIOError) as e:
            list(iter_records(f))
        return e.value

    e = err(blob[:-5])  # truncated inside the last record
    assert e.record == 2 and e.offset == 20 + 28 and "truncated" in str(e)
    bad = bytearray(blob)
    bad[20] ^= 0xFF  # first byte of record 1's magic
    e = err(bytes(bad))
    assert e.record == 1 and e.offset == 20 and "bad magic" in str(e)
    bad = bytearray(blob)
    bad[7] = 0x40  # cflag 2 on the first record
    e = err(bytes(bad))
    assert e.record == 0 and "flag" in str(e)


# ----------------------------------------------------------------------------- MXNet
@pytest.mark.oracle
def test_mxnet_reads_ours_and_we_read_mxnet(tmp_path):
    """Payloads with the magic at aligned offsets: MXNet reads what we write, and our
    writer produces byte for byte what MXNet's writer produces."""
    py = oracle_python()
    payloads = _payloads()
    assert any(p.find(M) % 4 == 0 for p in payloads if M in p)
    with IndexedRecordWriter(tmp_path / "ours.rec", tmp_path / "ours.idx") as w:
        for k, p in enumerate(payloads):
            w.write(k, p)
    (tmp_path / "p.pkl").write_bytes(pickle.dumps(payloads))
    subprocess.run([py, "-c", MX_RW, str(tmp_path / "p.pkl"), str(tmp_path / "ours"), str(tmp_path / "mx"),
                    str(tmp_path / "out.pkl")], check=True, capture_output=True)
    got = pickle.loads((tmp_path / "out.pkl").read_bytes())
    assert got["read"] == payloads
    assert got["sequential"] == len(payloads)  # sequential reader sees no extra records
    assert (tmp_path / "mx.rec").read_bytes() == (tmp_path / "ours.rec").read_bytes()
    assert (tmp_path / "mx.idx").read_text() == (tmp_path / "ours.idx").read_text()
    with IndexedRecordReader(tmp_path / "mx.rec", tmp_path / "mx.idx") as r:
        assert [r.read_idx(k) for k in range(len(payloads))] == payloads
    assert got["vector"] == pack_record([3.0, 7.5], b"img", 11)
    assert got["scalar"] == pack_record(2.0, b"jpg", 5, 9)

