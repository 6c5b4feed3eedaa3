"""facecurate align on real photos with the embedded dlib models."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from facecurate.align.align import AlignConfig, AlignError, run_align
from facecurate.cli import main
from facecurate.common.constants import ALIGN_COLUMNS, ARCFACE_TEMPLATE_112
from facecurate.common.files import read_csv
from facecurate.common.geometry import template
from facecurate.models.dlib_models import DlibHOGDetector, DlibLandmarks68


@pytest.fixture(scope="module")
def photos_out(photos_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("photos_out")
    summary = run_align(photos_dir, out, AlignConfig(), workers=2, show_progress=False)
    return out, summary


# ------------------------------------------------------------------ alignment quality
def _five_on_crop(crop_rgb, det, lm):
    """Re-detect the 68 landmarks on a crop and return its 5 ArcFace points."""
    big = cv2.resize(crop_rgb, (224, 224), interpolation=cv2.INTER_CUBIC)
    dets = det.detect(big)
    box = max(dets, key=lambda d: d.size).box if dets else np.array([20, 20, 204, 204], float)
    return lm.five(lm.predict(big, box)) / 2.0


def test_crops_land_on_the_template(photos_out, photos_dir):
    out, summary = photos_out
    rows = [r for r in read_csv(out / "align.csv") if r["status"] == "ok" and r["primary"] == "1"]
    assert len(rows) >= 55
    det, lm = DlibHOGDetector(), DlibLandmarks68()
    aligned_err, centre_err = [], []
    for r in rows:
        crop = cv2.cvtColor(cv2.imread(str(out / r["aligned"])), cv2.COLOR_BGR2RGB)
        assert crop.shape == (112, 112, 3)
        aligned_err.extend(np.linalg.norm(_five_on_crop(crop, det, lm) - ARCFACE_TEMPLATE_112, axis=1))
        # Baseline: a plain crop of the detected box, resized to 112 (no landmarks used).
        src = cv2.cvtColor(cv2.imread(str(photos_dir / r["source"])), cv2.COLOR_BGR2RGB)
        x1, y1, x2, y2 = (int(float(r[k])) for k in ("x1", "y1", "x2", "y2"))
        box = src[max(0, y1):y2, max(0, x1):x2]
        plain = cv2.resize(box, (112, 112))
        centre_err.extend(np.linalg.norm(_five_on_crop(plain, det, lm) - ARCFACE_TEMPLATE_112, axis=1))
    med, med_plain = float(np.median(aligned_err)), float(np.median(centre_err))
    assert med < 4.5, f"median landmark error on crops {med:.2f} px"
    assert med_plain > med + 2.0, f"a plain box crop ({med_plain:.2f} px) should be clearly worse than alignment"


def test_template_scales_with_size():
    assert np.allclose(template(224), ARCFACE_TEMPLATE_112 * 2)
    with pytest.raises(ValueError):
        template(100)


def test_packaged_hog_detector_is_dlibs_own(photos_dir):
    """The detector file shipped in the package (read in 1 ms instead of dlib's 0.3 s
    rebuild) is the installed dlib's built-in detector, byte for byte, and finds the
    same faces with the same scores."""
    import pickle

    import dlib

    from facecurate.models.dlib_models import HOG_FILE, frontal_face_detector

    own, shipped = dlib.get_frontal_face_detector(), frontal_face_detector()
    assert os.path.isfile(HOG_FILE)
    assert pickle.dumps(shipped) == pickle.dumps(own)
    grey = cv2.cvtColor(cv2.imread(str(sorted(photos_dir.rglob("*.jpg"))[0])), cv2.COLOR_BGR2GRAY)
    got, want = shipped.run(grey, 1, 0.0), own.run(grey, 1, 0.0)
    assert len(want[0]) >= 1
    assert [(r.left(), r.top(), r.right(), r.bottom()) for r in got[0]] == \
        [(r.left(), r.top(), r.right(), r.bottom()) for r in want[0]]
    assert list(got[1]) == list(want[1])


def test_manifest_columns_and_paths(photos_out):
    out, summary = photos_out
    text = (out / "align.csv").read_text(encoding="utf-8")
    header = text.splitlines()[0].split(",")
    assert tuple(header) == ALIGN_COLUMNS
    rows = read_csv(out / "align.csv")
    assert summary["files"] == 61 and summary["files_with_crop"] == 61
    for r in rows:
        assert (out / r["aligned"]).is_file()
        assert r["identity"] == r["source"].split("/")[0]
        assert "\\" not in r["source"]
    # exactly one primary per photo
    per_src: dict = {}
    for r in rows:
        per_src[r["source"]] = per_src.get(r["source"], 0) + int(r["primary"])
    assert set(per_src.values()) == {1}
    assert float(rows[0]["sharpness"]) > 0
    # ordinary photos (up to 1.66 here) stay under clean's blocky default
    assert all(0.5 < float(r["blockiness"]) < 2.0 for r in rows)
    # flat_share is the crop as written, as clean's occlusion check reads it back
    from facecurate.clean.clean_common import CropSimilarity

    sim = CropSimilarity([out / r["aligned"] for r in rows])
    assert [float(r["flat_share"]) for r in rows] == pytest.approx([sim.flat_share(i) for i in range(len(rows))],
                                                                    abs=1e-4)


def test_blockiness_finds_heavy_jpeg_and_only_it(lfw_dev_ids, lfw_dir):
    """A heavily compressed photo, saved again at ordinary quality as a crawler would,
    shows its 8x8 grid over the face; the same photo at its own quality, blurred, or
    resized after the compression (the grid moved off the 8-pixel lattice) does not."""
    from facecurate.common.quality import blockiness

    def reencode(img, q):
        return cv2.imdecode(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])[1], cv2.IMREAD_GRAYSCALE)

    box = (70.0, 70.0, 180.0, 180.0)  # the face of an LFW deep-funneled photo
    seen = 0
    for name in lfw_dev_ids[:6]:
        src = sorted((lfw_dir / name).glob("*.jpg"))[0]
        bgr = cv2.imread(str(src))
        grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        heavy = cv2.imdecode(cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 6])[1], cv2.IMREAD_COLOR)
        assert blockiness(grey, box) < 1.6
        rgb = cv2.cvtColor(heavy, cv2.COLOR_BGR2RGB)  # an RGB image: only the box is made grey, same value
        assert blockiness(rgb, box) == blockiness(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), box)
        assert blockiness(reencode(heavy, 92), box) > 2.0
        assert blockiness(reencode(cv2.GaussianBlur(bgr, (0, 0), 2.5), 92), box) < 1.6
        moved = cv2.resize(heavy, (225, 225), interpolation=cv2.INTER_AREA)
        assert blockiness(reencode(moved, 92), (63.0, 63.0, 162.0, 162.0)) < 1.6
        seen += 1
    assert seen == 6
    assert np.isnan(blockiness(np.zeros((250, 250), np.uint8), (10, 10, 30, 30)))  # under 3 blocks a side


# ------------------------------------------------------------------ group photos
def _annotations(dlib_faces_dir):
    out = {}
    for name in ("training.xml", "testing.xml"):
        for im in ET.parse(dlib_faces_dir / name).getroot().iter("image"):
            out[im.get("file")] = [
                (int(b.get("left")), int(b.get("top")),
                 int(b.get("left")) + int(b.get("width")), int(b.get("top")) + int(b.get("height")))
                for b in im.iter("box")]
    return out


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


#: The face a person would pick as the photo's subject (hand-labelled annotated box).
HAND_PRIMARY = {
    "2008_001009.jpg": (125, 214, 215, 304),  # the woman in front, not the one behind her
    "2009_004587.jpg": (154, 46, 229, 121),  # the standing man, not the seated woman
    "2008_007676.jpg": (107, 141, 159, 193),  # the girl nearest the camera
}


def test_group_photos_every_face_found_and_primary(dlib_faces_dir, tmp_path):
    raw = tmp_path / "raw" / "group"
    raw.mkdir(parents=True)
    for f in dlib_faces_dir.glob("*.jpg"):
        shutil.copyfile(f, raw / f.name)
    out = tmp_path / "out"
    run_align(raw.parent, out, AlignConfig(), workers=2, show_progress=False)
    rows = read_csv(out / "align.csv")
    by_file: dict = {}
    for r in rows:
        by_file.setdefault(r["source"].split("/")[1], []).append(r)
    ann = _annotations(dlib_faces_dir)
    assert sum(len(v) for v in ann.values()) == 43
    for fname, boxes in ann.items():
        found = [tuple(float(r[k]) for k in ("x1", "y1", "x2", "y2")) for r in by_file[fname] if r["face"] != "-1"]
        for b in boxes:
            assert max((_iou(b, f) for f in found), default=0) >= 0.3, f"missed annotated face {b} in {fname}"
    for fname, want in HAND_PRIMARY.items():
        prim = [r for r in by_file[fname] if r["primary"] == "1"]
        assert len(prim) == 1
        got = tuple(float(prim[0][k]) for k in ("x1", "y1", "x2", "y2"))
        assert _iou(want, got) >= 0.3, f"{fname}: primary {got}, a person picks {want}"
    dogs = by_file["dogs.jpg"]
    assert [(r["face"], r["status"]) for r in dogs] == [("-1", "no_face")]


# ------------------------------------------------------------------ bad input
def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    app1 = b"Exif\x00\x00" + b"MM\x00*" + struct.pack(">I", 8) + ifd
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def _bomb_png(w: int, h: int) -> bytes:
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bad_raw(photos_dir, dlib_faces_dir, tmp_path_factory):
    from PIL import Image

    raw = tmp_path_factory.mktemp("bad") / "raw"
    face_path = photos_dir / "id00" / "img10.jpg"  # a 408x594 portrait
    jpeg = face_path.read_bytes()
    bgr = cv2.imread(str(face_path))
    d = raw / "Ünïcode person"
    d.mkdir(parents=True)
    (d / "ok photo.jpg").write_bytes(jpeg)
    (d / "empty.jpg").write_bytes(b"")
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000) + b"\xff\xd9")
    (d / "notes.txt").write_text("not an image")
    (d / "bomb.png").write_bytes(_bomb_png(40000, 40000))
    cv2.imwrite(str(d / "grey.png"), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(d / "deep16.png"), bgr.astype(np.uint16) * 257)
    rgba = np.dstack([bgr, np.full(bgr.shape[:2], 255, np.uint8)])
    rgba[:40, :, 3] = 0  # a transparent band
    cv2.imwrite(str(d / "alpha.png"), rgba)
    Image.open(face_path).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    rotated = cv2.rotate(bgr, cv2.ROTATE_90_COUNTERCLOCKWISE)  # stored sideways ...
    (d / "exif_rotated.jpg").write_bytes(_with_exif_orientation(cv2.imencode(".jpg", rotated)[1].tobytes(), 6))
    (d / ".hidden.jpg").write_bytes(jpeg)
    (d / "broken_link.jpg").symlink_to(raw / "does-not-exist.jpg")
    nested = d / "sub" / "deeper"
    nested.mkdir(parents=True)
    (nested / "nested.jpg").write_bytes(jpeg)
    (d / "sub" / "loop").symlink_to(d)  # a symlink loop
    (raw / "stray.jpg").write_bytes(jpeg)  # no identity folder
    nf = raw / "no faces here"
    nf.mkdir()
    shutil.copyfile(dlib_faces_dir / "dogs.jpg", nf / "dogs.jpg")
    return raw


EXPECTED_BAD = {
    "Ünïcode person/ok photo.jpg": "ok",
    "Ünïcode person/empty.jpg": "decode_error",
    "Ünïcode person/truncated.jpg": "decode_error",
    "Ünïcode person/corrupt.jpg": "decode_error",
    "Ünïcode person/notes.txt": "unsupported",
    "Ünïcode person/bomb.png": "too_large",
    "Ünïcode person/grey.png": "ok",
    "Ünïcode person/deep16.png": "ok",
    "Ünïcode person/alpha.png": "ok",
    "Ünïcode person/cmyk.jpg": "ok",
    "Ünïcode person/exif_rotated.jpg": "ok",
    "Ünïcode person/broken_link.jpg": "unreadable",
    "Ünïcode person/sub/deeper/nested.jpg": "ok",
    "stray.jpg": "unsupported",
    "no faces here/dogs.jpg": "no_face",
}


def test_bad_inputs_each_recorded_with_a_reason(bad_raw, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["align", str(bad_raw), str(out), "--workers", "2", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    rows = read_csv(out / "align.csv")
    status = {}
    for r in rows:
        if r["primary"] == "1" or r["face"] == "-1":
            status[r["source"]] = r["status"]
        if r["status"] != "ok":
            assert r["message"], f"{r['source']}: a non-ok row needs a message"
    assert status == EXPECTED_BAD
    assert ".hidden.jpg" not in (out / "align.csv").read_text(encoding="utf-8")
    assert summary["files"] == len(EXPECTED_BAD)
    assert any("loop" in w for w in summary["warnings"])
    ok = {r["source"]: r for r in rows if r["primary"] == "1"}
    # The EXIF-rotated photo was read upright: same size and landmarks as the original.
    a, b = ok["Ünïcode person/ok photo.jpg"], ok["Ünïcode person/exif_rotated.jpg"]
    assert (a["img_w"], a["img_h"]) == (b["img_w"], b["img_h"])
    assert abs(float(a["le_x"]) - float(b["le_x"])) < 4 and abs(float(a["le_y"]) - float(b["le_y"])) < 4
    assert ok["Ünïcode person/sub/deeper/nested.jpg"]["identity"] == "Ünïcode person"
    # alpha was composited on white, not black
    crop = cv2.imread(str(out / ok["Ünïcode person/alpha.png"]["aligned"]))
    assert crop is not None and crop.shape == (112, 112, 3)


# ------------------------------------------------------------------ resume and determinism
def _lfw_raw(lfw_dir, lfw_dev_ids, root: Path, n_ids=12):
    raw = root / "raw"
    raw.mkdir(parents=True)
    picked = [i for i in lfw_dev_ids if len(list((lfw_dir / i).glob("*.jpg"))) >= 3][:n_ids]
    for i in picked:
        shutil.copytree(lfw_dir / i, raw / i)
    return raw


def _tree_bytes(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".facecurate" not in p.parts}


def test_kill_and_rerun_resumes_and_is_byte_identical(lfw_dir, lfw_dev_ids, tmp_path):
    raw = _lfw_raw(lfw_dir, lfw_dev_ids, tmp_path)
    ref = tmp_path / "ref"
    run_align(raw, ref, AlignConfig(), workers=2, show_progress=False)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "facecurate", "align", str(raw), str(out), "--workers", "1",
           "--shard-size", "2", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    shard_dir = out / ".facecurate" / "align"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shard_dir.glob("shard_*.csv"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(shard_dir.glob("shard_*.csv")))
    assert 3 <= done_before
    assert not (out / "align.csv").exists()
    # What the kill left under temporary names: hidden, never a final name.
    assert all(p.name.startswith(".") for p in out.rglob("*.tmp"))

    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["resumed"] >= 2 * done_before
    assert summary["processed_now"] + summary["resumed"] == summary["files"]
    assert _tree_bytes(out) == _tree_bytes(ref)  # crops and manifest identical, workers 1 vs 2
    assert not list(out.rglob("*.tmp"))  # the rerun removed the killed run's temporaries
    # A second rerun redoes nothing.
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert json.loads(res.stdout.strip().splitlines()[-1])["processed_now"] == 0


def test_other_settings_refused_then_overwrite(photos_dir, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copytree(photos_dir / "id01", raw / "id01")
    out = tmp_path / "out"
    run_align(raw, out, AlignConfig(), workers=1, show_progress=False)
    with pytest.raises(AlignError, match="other settings"):
        run_align(raw, out, AlignConfig(faces="primary"), workers=1, show_progress=False)
    s = run_align(raw, out, AlignConfig(faces="primary", size=224, fmt="png"), workers=1,
                  overwrite=True, show_progress=False)
    assert s["processed_now"] == s["files"]
    rows = read_csv(out / "align.csv")
    for r in rows:
        if r["status"] == "ok":
            assert r["primary"] == "1" and r["aligned"].endswith(".png")
            assert cv2.imread(str(out / r["aligned"])).shape == (224, 224, 3)


def _hostile_raw(photos_dir: Path, root: Path) -> Path:
    """issue 23's reproductions: a FIFO, a link to /dev/zero, a link to /etc and a link to /
    under RAW, beside a real photo, a link to it inside RAW and a folder linked inside RAW."""
    raw = root / "raw"
    (raw / "x").mkdir(parents=True)
    shutil.copyfile(sorted((photos_dir / "id00").glob("*.jpg"))[0], raw / "x" / "ok.jpg")
    os.mkfifo(raw / "x" / "fifo.jpg")
    (raw / "x" / "zero.jpg").symlink_to("/dev/zero")
    (raw / "x" / "etcdir").symlink_to("/etc")
    (raw / "root").symlink_to("/")
    (raw / "x" / "same.jpg").symlink_to(raw / "x" / "ok.jpg")  # inside RAW: followed
    (raw / ".store" / "pics").mkdir(parents=True)  # hidden: listed only through the link
    shutil.copyfile(raw / "x" / "ok.jpg", raw / ".store" / "pics" / "ok.jpg")
    (raw / "y").symlink_to(raw / ".store" / "pics")  # a folder inside RAW: followed
    return raw


def _align_cli(raw: Path, out: Path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    """align in a subprocess with a timeout: a hang fails the test instead of blocking it."""
    proc = subprocess.run([sys.executable, "-m", "facecurate", "align", str(raw), str(out), "--workers", "1",
                           "--fallback", "none", "--json", *flags], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc, {r["source"]: r for r in read_csv(out / "align.csv") if r["face"] in ("-1", "0")}


def test_special_files_and_links_out_of_raw_finish_with_their_rows(photos_dir, tmp_path):
    """issue 23: `mkfifo RAW/x/fifo.jpg` blocked align forever, `ln -s /dev/zero` read until
    memory ran out, `ln -s /etc` listed and opened /etc/passwd, a link to / walked the whole
    file system. Each is now one row with its reason, in seconds, and nothing is read."""
    raw = _hostile_raw(photos_dir, tmp_path)
    t0 = time.monotonic()
    proc, rows = _align_cli(raw, tmp_path / "out")
    assert time.monotonic() - t0 < 60
    assert set(rows) == {"x/ok.jpg", "x/fifo.jpg", "x/zero.jpg", "x/etcdir", "root", "x/same.jpg", "y/ok.jpg"}
    assert (rows["x/fifo.jpg"]["status"], rows["x/fifo.jpg"]["message"]) == ("unsupported", "not a regular file (FIFO)")
    for src, target in (("x/zero.jpg", "/dev/zero"), ("x/etcdir", "/etc"), ("root", "/")):
        assert rows[src]["status"] == "unsupported"
        assert f"to {target}:" in rows[src]["message"] and "--follow-external-links" in rows[src]["message"]
    assert {rows[s]["status"] for s in ("x/ok.jpg", "x/same.jpg", "y/ok.jpg")} == {"ok"}
    assert rows["root"]["identity"] == "root" and rows["x/etcdir"]["identity"] == "x"
    assert "passwd" not in (tmp_path / "out" / "align.csv").read_text()
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any("3 link(s) lead out of RAW" in w for w in summary["warnings"])


def test_follow_external_links_still_reads_only_regular_files_up_to_max_bytes(photos_dir, tmp_path):
    """--follow-external-links follows /dev/zero and /etc but still opens no device or FIFO,
    and --max-bytes records a larger photo as too_large with both sizes, unread."""
    raw = _hostile_raw(photos_dir, tmp_path)
    (raw / "root").unlink()  # the whole file system is more than a test should walk
    (raw / "x" / "etcdir").unlink()
    etc = tmp_path / "etc-like"  # a small folder outside RAW stands for /etc
    (etc / "deep").mkdir(parents=True)
    shutil.copyfile(raw / "x" / "ok.jpg", etc / "deep" / "outside.jpg")
    (etc / "deep" / "back").symlink_to(etc)  # a loop outside RAW is still detected
    (raw / "x" / "etcdir").symlink_to(etc)
    size = (raw / "x" / "ok.jpg").stat().st_size
    proc, rows = _align_cli(raw, tmp_path / "out", "--follow-external-links")
    assert rows["x/zero.jpg"]["status"] == "unsupported"
    assert rows["x/zero.jpg"]["message"] == "not a regular file (character device)"
    assert rows["x/etcdir/deep/outside.jpg"]["status"] == "ok"
    assert "loop" in proc.stdout
    _, rows = _align_cli(raw, tmp_path / "small", "--max-bytes", str(size - 1))
    assert rows["x/ok.jpg"]["status"] == "too_large"
    assert rows["x/ok.jpg"]["message"] == f"file is {size} bytes, more than --max-bytes {size - 1}"
    settings = json.loads((tmp_path / "small" / "align.json").read_text())["settings"]
    assert settings["max_bytes"] == size - 1 and settings["follow_external_links"] is False


def test_cli_help_and_version():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and "facecurate" in r.output
    r = CliRunner().invoke(main, ["align", "--help"])
    assert r.exit_code == 0 and "--detector" in r.output and "align.csv" in r.output
    r = CliRunner().invoke(main, ["align", "/nonexistent/raw", "/tmp/x"])
    assert r.exit_code != 0 and "does not exist" in r.output


# ------------------------------------------------------------------ SCRFD through ONNX Runtime
def test_align_with_an_scrfd_graph(photos_dir, tmp_path):
    """`align --detector scrfd` on a tiny graph with SCRFD's signature whose outputs
    plant two faces: the crops and manifest carry exactly the planted geometry."""
    pytest.importorskip("onnxruntime")
    from test_onnx_models import KPS_A, _plant, scrfd_graph

    box_a, box_b = (8.0, 2.0, 20.0, 14.0), (20.0, 4.0, 31.0, 15.0)
    kps_b = [[23, 7], [28, 7], [25.5, 9], [23.5, 12], [27.5, 12]]
    graph = scrfd_graph(tmp_path / "det.onnx", plants=[
        _plant(8, (1, 1), 0, 2, 4, box_a, KPS_A, 0.9),
        _plant(16, (1, 0), 0, 2, 2, box_b, kps_b, 0.7),
    ])
    raw = tmp_path / "raw" / "someone"
    raw.mkdir(parents=True)
    img = cv2.resize(cv2.imread(str(photos_dir / "id00" / "img10.jpg")), (320, 320))
    cv2.imwrite(str(raw / "photo.png"), img)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["align", str(raw.parent), str(out), "--detector", "scrfd",
                                    "--model-dir", str(graph), "--workers", "1", "--json"])
    assert res.exit_code == 0, res.output
    rows = read_csv(out / "align.csv")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(r["detector"] == "scrfd/CPUExecutionProvider" for r in rows)
    by_score = sorted(rows, key=lambda r: -float(r["det_score"]))
    s = 320 / 32  # letterbox scale back to the image
    for r, box, kps in ((by_score[0], box_a, KPS_A), (by_score[1], box_b, kps_b)):
        got_box = [float(r[k]) for k in ("x1", "y1", "x2", "y2")]
        assert np.allclose(got_box, np.array(box) * s, atol=0.01)
        got_kps = [float(r[k]) for k in ("le_x", "le_y", "re_x", "re_y", "nose_x", "nose_y",
                                          "ml_x", "ml_y", "mr_x", "mr_y")]
        assert np.allclose(got_kps, np.array(kps, float).reshape(-1) * s, atol=0.01)
        assert cv2.imread(str(out / r["aligned"])).shape == (112, 112, 3)


def test_face_zero_is_the_primary_even_beside_a_centred_small_face(photos_dir):
    """A small face in the centre scores high on centrality but is below --min-face:
    the usable face in the corner is the primary and comes first."""
    from facecurate.align.align import Aligner

    face = cv2.cvtColor(cv2.imread(str(photos_dir / "id00" / "img10.jpg")), cv2.COLOR_BGR2RGB)  # 408x594
    canvas = np.full((1400, 1400, 3), 128, np.uint8)
    canvas[:594, :408] = face  # big face in the top-left corner
    canvas[448:953, 527:874] = cv2.resize(face, (347, 505))  # a 0.85x copy in the centre
    # Found sizes ~247 px (corner) and ~205 px (centre); centrality alone ranks the centre first.
    al = Aligner(AlignConfig(min_face=220))
    res = al.process(canvas)
    assert len(res) == 2
    assert res[0].primary and res[0].status == "ok" and res[0].det.box[0] < 300
    assert res[1].status == "too_small" and not res[1].primary


def _one_line_error(res, code: int = 1, match: str = "") -> str:
    """The CLI's answer to a mistake: exit ``code``, no traceback, one 'Error:' line."""
    assert isinstance(res.exception, SystemExit) and res.exit_code == code, res.output
    assert "Traceback" not in res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("Error:") and match in last, res.output
    if code == 1:
        assert len(res.output.strip().splitlines()) == 1, res.output
    return last


def test_user_mistakes_get_one_line_and_no_traceback(photos_dir, tmp_path):
    """A --model-dir without a detector, a corrupt OUT/align.json and option values
    that would turn every file into an error each get one clear line, never a
    traceback or a run that "succeeds" with nothing aligned."""
    raw = tmp_path / "raw" / "someone"
    raw.mkdir(parents=True)
    (raw / "a.jpg").write_bytes((photos_dir / "id00" / "img10.jpg").read_bytes())
    (tmp_path / "models").mkdir()
    res = CliRunner().invoke(main, ["align", str(raw.parent), str(tmp_path / "o1"), "--detector", "scrfd",
                                    "--model-dir", str(tmp_path / "models")])
    _one_line_error(res, match="no detector model")
    (tmp_path / "bad.onnx").write_text("not a graph")
    res = CliRunner().invoke(main, ["align", str(raw.parent), str(tmp_path / "o1"), "--detector", "scrfd",
                                    "--model-dir", str(tmp_path / "bad.onnx")])
    _one_line_error(res, match="cannot read ONNX model")
    assert not (tmp_path / "o1").exists()  # a corrected --model-dir then starts cleanly

    out = tmp_path / "out"
    out.mkdir()
    for text in ("{", "", "[1]"):
        (out / "align.json").write_text(text)
        res = CliRunner().invoke(main, ["align", str(raw.parent), str(out), "--workers", "1"])
        _one_line_error(res, match="align.json is not a readable record of an earlier run")
    assert not (out / "align.csv").exists()

    for opt, value in (("--detect-max-side", "0"), ("--max-pixels", "0"), ("--min-face", "-1")):
        res = CliRunner().invoke(main, ["align", str(raw.parent), str(tmp_path / "o2"), opt, value])
        _one_line_error(res, code=2, match=opt)
        name = opt[2:].replace("-", "_")
        with pytest.raises(AlignError, match=opt):
            AlignConfig(**{name: int(value)}).validate()
    assert not (tmp_path / "o2").exists()
