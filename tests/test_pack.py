"""facecurate pack / inspect / unpack / pack-pairs on real ArcFace crops of LFW dev
photos (align.centre_face_jpeg: dlib HOG + 68 landmarks -> 5 points -> align_face).

The MXNet checks (``@pytest.mark.oracle``) run ``../shared/tools/mxnet-oracle`` (the
real MXNet 1.9.1 reader); they fail under CI when it cannot run, and skip otherwise."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from facecurate.cli import main as cli
from facecurate.common.constants import (
    ALIGN_COLUMNS,
    CLEAN_COLUMNS,
    PACK_BELOW_MIN,
    PACK_DUPLICATE,
    PACK_EMPTY_IDENTITY,
    PACK_ERRORS_CSV,
    PACK_MISSING,
    PACK_NOT_IMAGE,
    PACK_WRONG_SIZE,
)
from facecurate.common.files import read_csv, write_csv_atomic
from facecurate.pack.inspect_rec import inspect
from facecurate.pack.packer import PackError, pack
from facecurate.pack.pairs import pack_pairs
from facecurate.pack.unpack import unpack
from facecurate.clean.verification_bin import read_verification_bin
from test_recordio import _shared, oracle_python

from facecurate.common.recordio import IndexedRecordReader, IndexedRecordWriter, pack_header, pack_record, unpack_record

REPO = Path(__file__).resolve().parents[1]
FILES = ("train.rec", "train.idx", "train.lst", "train.sums", "property", "labels.csv", "pack_errors.csv", "pack.json")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def crops_dir(tmp_path_factory, lfw_dir, lfw_dev_ids) -> Path:
    """OUT-like folder <identity>/<Name>_NNNN.jpg of real 112x112 q95 crops: five dev
    identities with 4 photos each and one with 2."""
    from facecurate.align.align import centre_face_jpeg
    from facecurate.models.dlib_models import DlibHOGDetector, DlibLandmarks68

    det, lm = DlibHOGDetector(max_upsample=1), DlibLandmarks68()
    root = tmp_path_factory.mktemp("crops")
    want = [4, 4, 4, 4, 4, 2]
    for ident in lfw_dev_ids:
        if not want:
            break
        files = sorted(os.listdir(lfw_dir / ident))
        if len(files) < want[0]:
            continue
        made = 0
        for f in files:
            jpg = centre_face_jpeg(cv2.cvtColor(cv2.imread(str(lfw_dir / ident / f)), cv2.COLOR_BGR2RGB), det, lm)
            if jpg is None:
                continue
            (root / ident).mkdir(exist_ok=True)
            (root / ident / f).write_bytes(jpg)
            made += 1
            if made == want[0]:
                break
        if made == want[0]:
            want.pop(0)
        elif made:
            shutil.rmtree(root / ident)
    assert not want, "could not make enough real crops"
    return root


def _expected(crops: Path) -> dict[str, tuple[str, bytes]]:
    """sha1 of each crop file -> (identity, bytes)."""
    out = {}
    for d in sorted(crops.iterdir()):
        if d.is_dir():
            for f in sorted(d.iterdir()):
                b = f.read_bytes()
                out[hashlib.sha1(b).hexdigest()] = (d.name, b)
    return out


def _oracle(prefix: Path) -> dict:
    """The real MXNet reader's summary of PREFIX.rec/.idx (skips, or fails under CI,
    when MXNet cannot run at all; fails when MXNet runs and rejects the file)."""
    oracle_python()  # builds the venv on first use; skip/fail when impossible
    tool = _shared() / "tools" / "mxnet-oracle"
    r = subprocess.run([str(tool), str(prefix)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"MXNet rejected {prefix}:\n{r.stderr[-1500:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _mxfacedataset(prefix: Path) -> list[tuple[int, bytes]]:
    """arcface_torch's MXFaceDataset, with our reader instead of mx.recordio:
    read key 0; flag > 0 -> images are keys 1..label[0]-1, else every key in the .idx;
    each item is (label, image bytes), a vector label reduced to its first value."""
    rec = IndexedRecordReader(f"{prefix}.rec", f"{prefix}.idx")
    header, _ = unpack_record(rec.read_idx(0))
    if header.flag > 0:
        imgidx = list(range(1, int(header.label[0])))
    else:
        imgidx = list(rec.keys)
    out = []
    for k in imgidx:
        h, img = unpack_record(rec.read_idx(k))
        label = h.label
        if isinstance(label, tuple):
            label = label[0]
        out.append((int(label), img))
    rec.close()
    return out


# ----------------------------------------------------------------------------- pack + MXNet
@pytest.mark.oracle
@pytest.mark.parametrize("layout,shuffle", [("plain", True), ("insightface", True), ("insightface", False)])
def test_mxnet_reads_both_layouts(crops_dir, tmp_path, layout, shuffle):
    # without shuffle the insightface header is written last, over a placeholder
    res = pack(crops_dir, tmp_path / "d", layout=layout, shuffle=shuffle)
    assert (res.images, res.classes, res.errors) == (22, 6, [])
    o = _oracle(tmp_path / "d" / "train")
    assert o["images"] == 22 and o["classes"] == 6
    assert (o["label_min"], o["label_max"]) == (0, 5)
    assert o["shapes"] == [[112, 112, 3]]
    if layout == "plain":
        assert o["layout"] == "plain" and o["records"] == 22 and o["dali_compatible"] is True
    else:
        assert o["layout"] == "insightface-header" and o["identity_records"] == 6
        assert o["records"] == 1 + 22 + 6 and o["dali_compatible"] is False
    assert (tmp_path / "d" / "property").read_text() == "6,112,112\n"


@pytest.mark.oracle
def test_crop_containing_the_magic_round_trips_through_mxnet(crops_dir, tmp_path):
    """A real crop with the RecordIO magic at a 4-byte-aligned payload offset (inside a
    JPEG comment segment): pack splits the record; MXNet and our loader get the exact
    bytes back, and the image still decodes."""
    from facecurate.common.recordio import MAGIC_BYTES

    out = tmp_path / "out"
    shutil.copytree(crops_dir, out)
    victim = sorted(out.rglob("*.jpg"))[0]
    jpg = victim.read_bytes()
    # payload = 24-byte IRHeader + JPEG: the comment text starts at JPEG byte 6 -> payload 30;
    # two filler bytes put the magic at payload offset 32 (aligned).
    com = b"xx" + MAGIC_BYTES + b"yy"
    jpg2 = jpg[:2] + b"\xff\xfe" + struct.pack(">H", 2 + len(com)) + com + jpg[2:]
    assert (24 + jpg2.index(MAGIC_BYTES)) % 4 == 0
    victim.write_bytes(jpg2)
    res = pack(out, tmp_path / "d")
    assert res.stored_as_is == 22 and not res.errors
    rec = (tmp_path / "d" / "train.rec").read_bytes()
    assert rec.count(MAGIC_BYTES) == 23  # 22 record heads + 1 split point; the escaped copy is not stored
    got = [img for _, img in _mxfacedataset(tmp_path / "d" / "train")]
    assert jpg2 in got
    py = oracle_python()
    script = ("import mxnet as mx, sys, hashlib\n"
              "r = mx.recordio.MXIndexedRecordIO(sys.argv[1] + '.idx', sys.argv[1] + '.rec', 'r')\n"
              "imgs = [mx.recordio.unpack(r.read_idx(k))[1] for k in r.keys]\n"
              "print(sorted({mx.image.imdecode(i).shape for i in imgs}))\n"
              "print(sorted(hashlib.sha1(i).hexdigest() for i in imgs))")
    r = subprocess.run([py, "-c", script, str(tmp_path / "d" / "train")], capture_output=True, text=True, check=True)
    shapes, shas = r.stdout.strip().splitlines()
    assert shapes == "[(112, 112, 3)]"
    assert hashlib.sha1(jpg2).hexdigest() in shas
    assert shas == str(sorted(hashlib.sha1(g).hexdigest() for g in got))


@pytest.mark.parametrize("layout", ["plain", "insightface"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_mxfacedataset_loader_gets_every_image_with_its_label(crops_dir, tmp_path, layout, shuffle):
    pack(crops_dir, tmp_path / "d", layout=layout, seed=3, shuffle=shuffle)
    labels = {r["identity"]: int(r["label"]) for r in read_csv(tmp_path / "d" / "labels.csv")}
    assert sorted(labels) == sorted(d.name for d in crops_dir.iterdir())
    assert sorted(labels.values()) == list(range(6))
    expected = _expected(crops_dir)
    items = _mxfacedataset(tmp_path / "d" / "train")
    assert len(items) == len(expected) == 22
    got = {}
    for label, img in items:
        sha = hashlib.sha1(img).hexdigest()
        assert sha in expected, "an image was altered (crops are JPEGs of 112x112: stored byte-for-byte)"
        assert label == labels[expected[sha][0]]
        got[sha] = label
    assert set(got) == set(expected)
    # labels.csv counts and the .lst agree with what was packed
    counts = {r["identity"]: int(r["images"]) for r in read_csv(tmp_path / "d" / "labels.csv")}
    assert counts == {i: sum(1 for v in expected.values() if v[0] == i) for i in counts}
    lst = [line.split("\t") for line in (tmp_path / "d" / "train.lst").read_text().splitlines()]
    assert len(lst) == 22
    for key, lab, path in lst:
        assert labels[path.split("/")[0]] == int(float(lab))
        h, img = unpack_record(IndexedRecordReader(tmp_path / "d" / "train.rec",
                                                   tmp_path / "d" / "train.idx").read_idx(int(key)))
        assert img == (crops_dir / path).read_bytes()


def test_deterministic_and_seeded(crops_dir, tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        pack(crops_dir, tmp_path / name, seed=seed, threads=2 if name == "a" else 1)
    for f in FILES:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "train.rec").read_bytes() != (tmp_path / "c" / "train.rec").read_bytes()
    # in reading order too, with units read ahead by threads
    for name, threads in (("o1", 1), ("o2", 2)):
        pack(crops_dir, tmp_path / name, shuffle=False, threads=threads)
    for f in FILES:
        assert (tmp_path / "o1" / f).read_bytes() == (tmp_path / "o2" / f).read_bytes(), f
    a = sorted(_mxfacedataset(tmp_path / "a" / "train"))
    assert a == sorted(_mxfacedataset(tmp_path / "c" / "train"))


@pytest.mark.parametrize("layout", ["plain", "insightface"])
def test_pack_unpack_pack_is_byte_identical(crops_dir, tmp_path, layout):
    pack(crops_dir, tmp_path / "a", layout=layout, shuffle=False)
    u = unpack(tmp_path / "a" / "train", tmp_path / "u")
    assert (u.written, u.existing, u.classes, u.names, u.errors) == (22, 0, 6, "labels.csv", [])
    folders = sorted(p.name for p in (tmp_path / "u").iterdir() if p.is_dir())
    assert folders == sorted(p.name for p in crops_dir.iterdir())
    assert (tmp_path / "u" / "unpack.json").is_file()  # which .rec this folder unpacks
    pack(tmp_path / "u", tmp_path / "b", layout=layout, shuffle=False)
    for f in ("train.rec", "train.idx", "property", "labels.csv"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_unpack_without_names_and_resume(crops_dir, tmp_path):
    pack(crops_dir, tmp_path / "a")
    (tmp_path / "a" / "labels.csv").unlink()
    u = unpack(tmp_path / "a" / "train.rec", tmp_path / "u")
    assert u.written == 22 and u.names == "label"
    folders = sorted(p.name for p in (tmp_path / "u").iterdir() if p.is_dir())
    assert folders == [f"{i:06d}" for i in range(6)]
    files = sorted((tmp_path / "u").rglob("*.jpg"))
    before = {p: p.read_bytes() for p in files}
    for p in files[:5]:
        p.unlink()
    (files[6].parent / f".{files[6].name}.123.tmp").write_bytes(b"partial")  # a killed run's leftover
    u2 = unpack(tmp_path / "a" / "train.rec", tmp_path / "u")
    assert (u2.written, u2.existing) == (5, 17)
    assert {p: p.read_bytes() for p in sorted((tmp_path / "u").rglob("*.jpg"))} == before
    # a re-pack of the label folders gives the same labels
    pack(tmp_path / "u", tmp_path / "b", shuffle=False)
    assert sorted(_mxfacedataset(tmp_path / "b" / "train")) == sorted(_mxfacedataset(tmp_path / "a" / "train"))


def test_unpack_refuses_path_tricks_in_labels_csv(crops_dir, tmp_path):
    pack(crops_dir, tmp_path / "a")
    rows = read_csv(tmp_path / "a" / "labels.csv")
    rows[0]["identity"] = "../escaped"
    write_csv_atomic(tmp_path / "a" / "labels.csv", ("identity", "label", "images"), rows)
    u = unpack(tmp_path / "a", tmp_path / "u")
    assert u.written == 22 and not (tmp_path / "escaped").exists()
    assert (tmp_path / "u" / "000000").is_dir()


# ----------------------------------------------------------------------------- inspect
def test_inspect_describes_both_layouts(crops_dir, tmp_path):
    pack(crops_dir, tmp_path / "p")
    pack(crops_dir, tmp_path / "i", layout="insightface")
    r = inspect(tmp_path / "p" / "train", full=True)
    assert r.ok, r.errors
    assert (r.layout, r.records, r.images, r.classes, r.label_min, r.label_max) == ("plain", 22, 22, 6, 0, 5)
    assert r.dali_compatible and r.decoded == 22 and r.shapes == [(112, 112, 3)]
    r = inspect(tmp_path / "i")
    assert r.ok, r.errors
    assert (r.layout, r.records, r.images, r.classes, r.identity_records) == ("insightface-header", 29, 22, 6, 6)
    assert r.grouped_by_class and not r.dali_compatible


def _corrupt(src: Path, dst: Path, fn) -> Path:
    shutil.copytree(src, dst)
    fn(dst)
    return dst


def test_inspect_catches_corruption(crops_dir, tmp_path):
    pack(crops_dir, tmp_path / "ok", shuffle=False)
    idx = [line.split("\t") for line in (tmp_path / "ok" / "train.idx").read_text().splitlines()]
    off5, off6 = int(idx[5][1]), int(idx[6][1])
    size = (tmp_path / "ok" / "train.rec").stat().st_size

    def truncate(d):
        with open(d / "train.rec", "r+b") as f:
            f.truncate(size - 100)

    def flip(pos):
        def fn(d):
            b = bytearray((d / "train.rec").read_bytes())
            b[pos] ^= 0x5A
            (d / "train.rec").write_bytes(bytes(b))
        return fn

    def bad_idx(d):
        lines = (d / "train.idx").read_text().splitlines()
        k, o = lines[9].split("\t")
        lines[9] = f"{k}\t{int(o) + 4}"
        (d / "train.idx").write_text("\n".join(lines) + "\n")

    cases = {
        "truncated": (truncate, "truncated"),
        "magic": (flip(off5 + 1), "record #5"),
        "length": (flip(off5 + 5), "record #"),
        "idx": (bad_idx, "key 9"),
    }
    for name, (fn, needle) in cases.items():
        d = _corrupt(tmp_path / "ok", tmp_path / name, fn)
        r = inspect(d)
        assert not r.ok, name
        assert any(needle in e for e in r.errors), (name, r.errors)
        res = CliRunner().invoke(cli, ["inspect", str(d / "train")])
        assert res.exit_code == 1 and needle in res.output, (name, res.output)
    # A flipped byte inside image data is found by decoding (--full) or the JPEG end check:
    # the last byte of record 5's JPEG (its end marker), wherever the record's padding
    # puts it (the crop's length, and so the padding, depends on the OpenCV version).
    head = (tmp_path / "ok" / "train.rec").read_bytes()[off5:off5 + 8]
    payload_end = off5 + 8 + (int.from_bytes(head[4:], "little") & ((1 << 29) - 1))
    d = _corrupt(tmp_path / "ok", tmp_path / "tail", flip(payload_end - 1))
    assert not inspect(d).ok
    assert CliRunner().invoke(cli, ["inspect", str(tmp_path / "ok")]).exit_code == 0


def test_inspect_vector_labels_and_header_layout(tmp_path, crops_dir):
    """A hand-made insightface-style .rec with vector image labels [label, x] (as in
    some public datasets) and a wrong one with a gap in the labels."""
    jpgs = [p.read_bytes() for p in sorted(crops_dir.rglob("*.jpg"))][:6]
    with IndexedRecordWriter(tmp_path / "v.rec", tmp_path / "v.idx") as w:
        w.write(0, pack_header([7.0, 10.0]))  # 6 images at 1..6, 3 identity records 7..9
        for k, img in enumerate(jpgs, 1):
            w.write(k, pack_record([float((k - 1) // 2), 0.5], img, k))
        for c in range(3):
            w.write(7 + c, pack_header([1.0 + 2 * c, 3.0 + 2 * c]))
    r = inspect(tmp_path / "v.rec", full=True)
    assert r.ok, r.errors
    assert (r.layout, r.images, r.classes, r.vector_labels, r.identity_records) == ("insightface-header", 6, 3, 6, 3)
    assert _mxfacedataset(tmp_path / "v")[2][0] == 1
    u = unpack(tmp_path / "v.rec", tmp_path / "u")  # header + identity records skipped
    assert (u.written, u.classes, u.errors) == (6, 3, [])
    assert sorted(p.relative_to(tmp_path / "u").as_posix() for p in (tmp_path / "u").rglob("*.jpg"))[:2] == [
        "000000/00000001.jpg", "000000/00000002.jpg"]
    assert (tmp_path / "u" / "000002" / "00000006.jpg").read_bytes() == jpgs[5]
    with IndexedRecordWriter(tmp_path / "g.rec", tmp_path / "g.idx") as w:
        for k, img in enumerate(jpgs):
            w.write(k, pack_record(float(0 if k < 3 else 2), img, k))  # label 1 missing
    r = inspect(tmp_path / "g.rec")
    assert not r.ok and any("contiguous" in e for e in r.errors)


# ----------------------------------------------------------------------------- bad input
def _clean_row(ident, aligned, decision="keep"):
    return {"source": aligned, "identity": ident, "face": 0, "aligned": aligned, "primary": 1,
            "decision": decision, "reason": "centre"}


def test_bad_inputs_are_reported_not_silently_skipped(crops_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(crops_dir, out)
    ids = sorted(p.name for p in crops_dir.iterdir())
    rows = [_clean_row(i, f"{i}/{f.name}") for i in ids for f in sorted((crops_dir / i).iterdir())]
    a, b = ids[0], ids[1]
    (out / a / "text.jpg").write_text("not an image")
    img = cv2.imdecode(np.frombuffer((crops_dir / rows[0]["aligned"]).read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    cv2.imwrite(str(out / a / "small.jpg"), cv2.resize(img, (100, 100)))
    good = (out / rows[1]["aligned"]).read_bytes()
    (out / a / "cut.jpg").write_bytes(good[: len(good) // 2])
    cv2.imwrite(str(out / a / "crop.png"), img)  # right size, PNG: encoded once as JPEG
    (out / "Nobody").mkdir()
    (out / "Nobody" / "x.jpg").write_text("junk")
    rows += [_clean_row(a, f"{a}/text.jpg"), _clean_row(a, f"{a}/small.jpg"), _clean_row(a, f"{a}/cut.jpg"),
             _clean_row(a, f"{a}/crop.png"), _clean_row(a, f"{a}/gone.jpg"), _clean_row("Nobody", "Nobody/x.jpg"),
             _clean_row(b, rows[4]["aligned"]), _clean_row(b, f"{b}/dropped.jpg", "drop")]
    write_csv_atomic(out / "clean.csv", CLEAN_COLUMNS, rows)

    res = pack(out, tmp_path / "d", min_images=3)
    reasons = {(e.path, e.reason) for e in res.errors}
    assert (f"{a}/text.jpg", PACK_NOT_IMAGE) in reasons
    assert (f"{a}/small.jpg", PACK_WRONG_SIZE) in reasons
    assert (f"{a}/cut.jpg", PACK_NOT_IMAGE) in reasons
    assert (f"{a}/gone.jpg", PACK_MISSING) in reasons
    assert ("Nobody/x.jpg", PACK_NOT_IMAGE) in reasons and ("Nobody/", PACK_EMPTY_IDENTITY) in reasons
    assert (rows[4]["aligned"], PACK_DUPLICATE) in reasons
    small = [i for i in ids if len(list((crops_dir / i).iterdir())) == 2][0]
    assert (f"{small}/", PACK_BELOW_MIN) in reasons
    assert res.dropped_identities == 1 and res.dropped_images == 2
    assert res.classes == 5 and res.images == 21  # 20 crops of the 4-photo identities + the PNG
    assert res.reencoded == 1 and res.stored_as_is == 20
    csv_rows = read_csv(tmp_path / "d" / "pack_errors.csv")
    assert {(r["path"], r["reason"]) for r in csv_rows} == reasons and all(r["message"] for r in csv_rows)
    labels = {r["identity"]: int(r["label"]) for r in read_csv(tmp_path / "d" / "labels.csv")}
    assert small not in labels and "Nobody" not in labels and sorted(labels.values()) == list(range(5))
    r = inspect(tmp_path / "d", full=True)
    assert r.ok and r.classes == 5 and r.images == 21

    # --strict: fails, and DEST keeps the previous pack
    before = {f: (tmp_path / "d" / f).read_bytes() for f in FILES}
    with pytest.raises(PackError, match="strict"):
        pack(out, tmp_path / "d", strict=True)
    assert {f: (tmp_path / "d" / f).read_bytes() for f in FILES} == before
    res = CliRunner().invoke(cli, ["pack", str(out), str(tmp_path / "d"), "--strict"])
    assert res.exit_code == 1 and "strict" in res.output
    # wrong-size crops can be resized instead
    res = pack(out, tmp_path / "r", resize=True)
    assert (f"{a}/small.jpg", PACK_WRONG_SIZE) not in {(e.path, e.reason) for e in res.errors}


def test_interrupted_pack_leaves_previous_dest(crops_dir, tmp_path):
    pack(crops_dir, tmp_path / "d", seed=1)
    before = {f: (tmp_path / "d" / f).read_bytes() for f in FILES}

    def stop(n):
        if n == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack(crops_dir, tmp_path / "d", seed=2, layout="insightface", on_record=stop)
    assert {f: (tmp_path / "d" / f).read_bytes() for f in FILES} == before
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(FILES)
    # a killed run's temporary files are cleared by the next run
    (tmp_path / "d" / ".train.rec.pack-tmp").write_bytes(b"half")
    pack(crops_dir, tmp_path / "d", seed=1)
    assert {f: (tmp_path / "d" / f).read_bytes() for f in FILES} == before
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(FILES)


def test_streamed_and_shuffled_packs_hold_the_same_records(crops_dir, tmp_path):
    """Without shuffle each identity is written as soon as it is read. A manifest
    identity with more crops than one work unit (256) and an identity dropped by
    --min-images in the middle must give the same labels and records as the shuffled
    path, in sorted order, with nothing lost or duplicated."""
    out = tmp_path / "out"
    shutil.copytree(crops_dir, out)
    ids = sorted(p.name for p in crops_dir.iterdir())
    big = ids[2]
    first = sorted((out / big).iterdir())[0].read_bytes()
    for i in range(300):  # distinct files (two bytes before the end-of-image marker)
        (out / big / f"copy_{i:03d}.jpg").write_bytes(first[:-2] + i.to_bytes(2, "big") + b"\xff\xd9")
    rows = []
    for d in ids:
        for f in sorted((out / d).iterdir()):
            rows.append({"source": f"{d}/{f.name}", "identity": d, "face": 0, "aligned": f"{d}/{f.name}",
                         "decision": "keep"})
    small = [d for d in ids if len(list((out / d).iterdir())) == 2][0]
    write_csv_atomic(out / "clean.csv", CLEAN_COLUMNS, rows)
    stream = pack(out, tmp_path / "s", shuffle=False, min_images=3)
    shuffled = pack(out, tmp_path / "h", shuffle=True, min_images=3)
    n = 22 + 300 - 2
    assert (stream.images, stream.classes, stream.dropped_identities) == (n, 5, 1)
    assert (shuffled.images, shuffled.classes, shuffled.dropped_identities) == (n, 5, 1)
    assert [e.reason for e in stream.errors] == [PACK_BELOW_MIN] and stream.errors[0].identity == small
    for f in ("labels.csv", "property", "pack_errors.csv"):
        assert (tmp_path / "s" / f).read_bytes() == (tmp_path / "h" / f).read_bytes(), f
    labels = {r["identity"]: int(r["label"]) for r in read_csv(tmp_path / "s" / "labels.csv")}
    assert sorted(labels.values()) == list(range(5)) and small not in labels
    s_items = _mxfacedataset(tmp_path / "s" / "train")
    assert sorted(s_items) == sorted(_mxfacedataset(tmp_path / "h" / "train"))
    assert len({img for _, img in s_items}) == n
    assert [lab for lab, _ in s_items] == sorted(lab for lab, _ in s_items)  # streamed: in label order
    lst = [line.split("\t") for line in (tmp_path / "s" / "train.lst").read_text().splitlines()]
    assert [row[2] for row in lst] == sorted(row[2] for row in lst)
    assert [int(row[0]) for row in lst] == list(range(n))


def test_shuffled_pack_predicts_identities_again_when_crops_fail(crops_dir, tmp_path):
    """The shuffled path predicts the packed identities (and labels) from the listing.
    An identity whose failed crops take it below --min-images, and one whose crops all
    fail, must be dropped and reported exactly as the in-order path does; an identity
    folder with no image file is reported once."""
    out = tmp_path / "out"
    shutil.copytree(crops_dir, out)
    ids = sorted(p.name for p in crops_dir.iterdir())
    a = ids[1]  # 4 good crops + 2 broken ones: 6 listed >= 5, but only 4 usable
    (out / a / "junk.jpg").write_text("not an image")
    good = sorted((out / a).iterdir())[0].read_bytes()
    (out / a / "cut.jpg").write_bytes(good[: len(good) // 2])
    (out / "Broken").mkdir()  # 5 listed, none usable
    for i in range(5):
        (out / "Broken" / f"{i}.jpg").write_bytes(b"\xff\xd8 junk")
    (out / "Empty").mkdir()
    (out / "Empty" / "notes.txt").write_text("no images here")
    for name in (ids[0], ids[3]):  # two identities big enough for --min-images 5
        first = sorted((out / name).iterdir())[0].read_bytes()
        (out / name / "extra.jpg").write_bytes(first[:-2] + b"\x00\x00\xff\xd9")
    results = {}
    for shuffle in (True, False):
        d = tmp_path / ("s" if shuffle else "o")
        res = results[shuffle] = pack(out, d, shuffle=shuffle, min_images=5)
        assert (res.images, res.classes) == (10, 2)
        got = {(e.path, e.reason) for e in res.errors}
        assert (f"{a}/", PACK_BELOW_MIN) in got and res.dropped_identities == 4  # a and the 3 others below 5
        assert [e.reason for e in res.errors if e.identity == "Broken"].count(PACK_EMPTY_IDENTITY) == 1
        assert [e for e in res.errors if e.identity == "Empty" and e.reason == PACK_EMPTY_IDENTITY][0].message \
            == "identity folder has no image files"
        assert len([e for e in res.errors if e.identity == "Empty" and e.reason == PACK_EMPTY_IDENTITY]) == 1
        below = {e.identity: e.message for e in res.errors if e.reason == PACK_BELOW_MIN}
        assert below[a].startswith("4 image(s)")
        assert inspect(d, full=True).ok
    for f in ("labels.csv", "pack_errors.csv", "property"):
        assert (tmp_path / "s" / f).read_bytes() == (tmp_path / "o" / f).read_bytes(), f
    assert sorted(_mxfacedataset(tmp_path / "s" / "train")) == sorted(_mxfacedataset(tmp_path / "o" / "train"))


def test_strict_with_min_images_drops_small_identities_without_failing(crops_dir, tmp_path):
    """--min-images is a choice, not an input problem: with --strict the identities below
    it are left out and listed in pack_errors.csv, and the pack succeeds."""
    small = [d.name for d in crops_dir.iterdir() if len(list(d.iterdir())) == 2]
    for shuffle in (False, True):
        res = pack(crops_dir, tmp_path / f"d{shuffle}", shuffle=shuffle, min_images=3, strict=True)
        assert (res.classes, res.images, res.dropped_identities) == (5, 20, 1)
        assert [(e.identity, e.reason) for e in res.errors] == [(small[0], PACK_BELOW_MIN)]
        assert [r["reason"] for r in read_csv(tmp_path / f"d{shuffle}" / "pack_errors.csv")] == [PACK_BELOW_MIN]
    r = CliRunner().invoke(cli, ["pack", str(crops_dir), str(tmp_path / "c"), "--min-images", "3", "--strict",
                                 "--no-shuffle", "--json"])
    assert r.exit_code == 0, r.output
    # a real problem still fails under --strict, with --min-images too
    bad = tmp_path / "bad"
    shutil.copytree(crops_dir, bad)
    (bad / small[0] / "junk.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(PackError, match="strict"):
        pack(bad, tmp_path / "e", min_images=3, strict=True)


def test_failed_pack_into_a_new_dest_leaves_nothing(crops_dir, tmp_path):
    def stop(n):
        if n == 5:
            raise KeyboardInterrupt

    for shuffle in (False, True):
        with pytest.raises(KeyboardInterrupt):
            pack(crops_dir, tmp_path / "new", shuffle=shuffle, on_record=stop)
        assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackError, match="nothing to pack"):
        pack(tmp_path / "empty", tmp_path / "new2", shuffle=False)
    assert not (tmp_path / "new2").exists()


def test_align_csv_source(crops_dir, tmp_path):
    """Without clean.csv: status ok and primary == 1 rows of align.csv."""
    out = tmp_path / "out"
    shutil.copytree(crops_dir, out)
    rows = []
    for d in sorted(crops_dir.iterdir()):
        for i, f in enumerate(sorted(d.iterdir())):
            rows.append({"source": f"{d.name}/{f.name}", "identity": d.name, "face": 0, "status": "ok",
                         "primary": 0 if i == 0 else 1, "aligned": f"{d.name}/{f.name}"})
    rows.append({"source": "X/x.jpg", "identity": "X", "face": -1, "status": "no_face", "primary": 0, "aligned": ""})
    write_csv_atomic(out / "align.csv", ALIGN_COLUMNS, rows)
    res = pack(out, tmp_path / "d")
    assert res.source == "align.csv" and res.images == 22 - 6 and res.classes == 6 and not res.errors


# ----------------------------------------------------------------------------- hostile crop folders
def _pack_cli(src: Path, dest: Path, *flags: str, shuffle: bool) -> dict:
    """pack in a subprocess with a timeout (a hang fails the test); pack_errors.csv by path."""
    proc = subprocess.run([sys.executable, "-m", "facecurate", "pack", str(src), str(dest), "--json",
                           "--shuffle" if shuffle else "--no-shuffle", *flags],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return {r["path"]: r for r in read_csv(dest / PACK_ERRORS_CSV)}


@pytest.mark.parametrize("shuffle", [True, False])
def test_crop_folder_special_files_links_and_sizes(crops_dir, tmp_path, shuffle):
    """issue 23: a FIFO in a crop folder hung `pack DIR DEST`. Now a FIFO, a link to
    /dev/zero, and links leading out of the folder are reported as unsupported (the
    links with their targets) and a crop over --max-bytes as too_large, in seconds;
    --follow-external-links packs the crops outside but still opens no device."""
    src = tmp_path / "crops"
    shutil.copytree(crops_dir, src)
    ids = sorted(p.name for p in src.iterdir())
    a, b = src / ids[0], ids[1]
    os.mkfifo(a / "fifo.jpg")
    (a / "zero.jpg").symlink_to("/dev/zero")
    outside = sorted((crops_dir / ids[0]).iterdir())[0]
    (a / "outside.jpg").symlink_to(outside)
    shutil.rmtree(src / b)
    (src / b).symlink_to(crops_dir / b)  # an identity folder outside
    (a / "inside.jpg").symlink_to(sorted(a.glob("*.jpg"))[0])  # inside: packed
    big = a / "big.jpg"
    big.write_bytes(outside.read_bytes() + b"\0" * 20_000)
    errors = _pack_cli(src, tmp_path / "d", "--max-bytes", "20000", shuffle=shuffle)
    rel = lambda n: f"{ids[0]}/{n}"  # noqa: E731
    assert (errors[rel("fifo.jpg")]["reason"], errors[rel("fifo.jpg")]["message"]) == \
        ("unsupported", "not a regular file (FIFO)")
    for path, target in ((rel("zero.jpg"), "/dev/zero"), (rel("outside.jpg"), str(outside.resolve())),
                         (f"{b}/", str((crops_dir / b).resolve()))):
        assert errors[path]["reason"] == "unsupported"
        assert errors[path]["message"].startswith(f"a link leading out of the crop folder, to {target}:")
    assert (errors[rel("big.jpg")]["reason"], errors[rel("big.jpg")]["message"]) == \
        ("too_large", f"file is {big.stat().st_size} bytes, more than --max-bytes 20000")
    assert rel("inside.jpg") not in errors
    labels = {r["identity"]: int(r["images"]) for r in read_csv(tmp_path / "d" / "labels.csv")}
    assert b not in labels and labels[ids[0]] == len(list((crops_dir / ids[0]).iterdir())) + 1
    errors = _pack_cli(src, tmp_path / "d2", "--follow-external-links", shuffle=shuffle)
    assert errors[rel("zero.jpg")]["message"] == "not a regular file (character device)"
    assert errors[rel("fifo.jpg")]["message"] == "not a regular file (FIFO)"
    assert rel("outside.jpg") not in errors and f"{b}/" not in errors
    labels = {r["identity"]: int(r["images"]) for r in read_csv(tmp_path / "d2" / "labels.csv")}
    assert labels[b] == len(list((crops_dir / b).iterdir()))


# ----------------------------------------------------------------------------- pack-pairs
def test_pack_pairs(crops_dir, tmp_path):
    ids = sorted(p.name for p in crops_dir.iterdir())
    num = {i: sorted(int(f.stem.rsplit("_", 1)[1]) for f in (crops_dir / i).iterdir()) for i in ids}
    a, b = ids[0], ids[1]
    lines = ["2\t3", f"{a}\t{num[a][0]}\t{num[a][1]}", f"{a}\t{num[a][2]}\t{b}\t{num[b][0]}",
             f"{b}\t{num[b][1]}\t{num[b][2]}", f"{a}\t9999\t{b}\t{num[b][0]}", "garbage line here x y"]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    res = pack_pairs(tmp_path / "pairs.txt", crops_dir, tmp_path / "my.bin")
    assert (res.pairs, res.same, res.different) == (3, 2, 1)
    assert len(res.unresolved) == 2 and "line 5" in res.unresolved[0] and "line 6" in res.unresolved[1]
    assert (tmp_path / "my.bin.unresolved.txt").read_text().splitlines() == res.unresolved
    bins, issame = pickle.loads((tmp_path / "my.bin").read_bytes())
    assert issame == [True, False, True] and len(bins) == 6
    # clean --exclude's reader (no code run) reads what pack-pairs wrote, exactly
    assert read_verification_bin(tmp_path / "my.bin") == (bins, issame)
    f = lambda i, n: (crops_dir / i / f"{i}_{n:04d}.jpg").read_bytes()  # noqa: E731
    assert bins[0] == f(a, num[a][0]) and bins[1] == f(a, num[a][1])
    assert bins[2] == f(a, num[a][2]) and bins[3] == f(b, num[b][0])
    # what insightface's load_bin does: decode every bin
    assert all(cv2.imdecode(np.frombuffer(x, np.uint8), cv2.IMREAD_COLOR).shape == (112, 112, 3) for x in bins)
    with pytest.raises(PackError):
        pack_pairs(tmp_path / "pairs.txt", crops_dir, tmp_path / "s.bin", strict=True)
    assert not (tmp_path / "s.bin").exists()

    # an align OUT folder: crop names differ from the photo names; align.csv maps them
    out = tmp_path / "out"
    rows = []
    for i in ids:
        for n in num[i]:
            (out / i).mkdir(parents=True, exist_ok=True)
            shutil.copy(crops_dir / i / f"{i}_{n:04d}.jpg", out / i / f"{i}_{n:04d}_0.jpg")
            rows.append({"source": f"{i}/{i}_{n:04d}.jpg", "identity": i, "face": 0, "status": "ok",
                         "primary": 1, "aligned": f"{i}/{i}_{n:04d}_0.jpg"})
    write_csv_atomic(out / "align.csv", ALIGN_COLUMNS, rows)
    res = CliRunner().invoke(cli, ["pack-pairs", str(tmp_path / "pairs.txt"), str(out), str(tmp_path / "o.bin"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["pairs"] == 3
    assert pickle.loads((tmp_path / "o.bin").read_bytes()) == (bins, issame)


def test_cli_pack_summary_and_help(crops_dir, tmp_path):
    r = CliRunner().invoke(cli, ["pack", str(crops_dir), str(tmp_path / "d"), "--json", "--min-images", "3"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["images"] == 20 and s["classes"] == 5 and s["dropped_identities"] == 1
    assert s["arcface_torch"] == {"num_classes": 5, "num_image": 20}
    r = CliRunner().invoke(cli, ["pack", str(crops_dir), str(tmp_path / "e")])
    assert "config.num_classes = 6" in r.output and "config.num_image = 22" in r.output
    h = CliRunner().invoke(cli, ["pack", "--help"]).output
    assert "index<TAB>label<TAB>path" in h
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "d"), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["dali_compatible"] is True
    # unpack takes the same REC forms as inspect: DEST/train, DEST, a .rec path
    for i, rec in enumerate((tmp_path / "e" / "train", tmp_path / "e", tmp_path / "e" / "train.rec")):
        r = CliRunner().invoke(cli, ["unpack", str(rec), str(tmp_path / f"u{i}"), "--json"])
        assert r.exit_code == 0 and json.loads(r.output)["written"] == 22, r.output
    r = CliRunner().invoke(cli, ["unpack", str(tmp_path / "nothing" / "train"), str(tmp_path / "u9")])
    assert r.exit_code == 1 and "train.rec does not exist" in r.output and not (tmp_path / "u9").exists()


def test_pack_pairs_of_a_binary_file_is_one_line(crops_dir, tmp_path):
    """A PAIRS file that is not text (a .bin given by mistake) is one line, no traceback."""
    (tmp_path / "pairs.txt").write_bytes(b"\x80\x04\x95binary pickle\xff")
    res = CliRunner().invoke(cli, ["pack-pairs", str(tmp_path / "pairs.txt"), str(crops_dir),
                                   str(tmp_path / "my.bin")])
    assert isinstance(res.exception, SystemExit) and res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "not a pairs file (not UTF-8 text" in res.output
    assert not (tmp_path / "my.bin").exists()
