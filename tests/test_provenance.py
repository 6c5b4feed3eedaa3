"""Provenance: every stage's JSON records the library versions that decided its
bytes; a resumed align or embed refuses to mix versions; a later stage warns when it
reads an OUT made under other versions (real models on real photos)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from facecurate.common.constants import VERSIONS_FILE
from facecurate.common.provenance import (describe, differences, library_version, library_versions, resume_message,
                                          warn_if_other, VersionsWarning)
from test_parts import lfw_raw

OTHER_OPENCV = "opencv-python-headless 3.4.18.65"  # never the installed one
OTHER_DLIB = "dlib-bin 19.7.0"  # never the installed one


def _cli(*args, cwd=None):
    env = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.run([sys.executable, "-m", "facecurate", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def _set_versions(path: Path, key: str = "opencv", value: str = OTHER_OPENCV, nested: bool = False) -> None:
    obj = json.loads(path.read_text())
    (obj["versions"] if nested else obj)[key] = value
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def pipeline(lfw_dir, lfw_dev_ids, tmp_path_factory):
    """align -> embed (dlib itself) -> clean -> pack on 4 dev identities x 3 photos."""
    tmp = tmp_path_factory.mktemp("prov")
    raw = lfw_raw(lfw_dir, lfw_dev_ids, tmp, n_ids=4, per_id=3)
    out = tmp / "out"
    for step in (["align", str(raw), str(out), "--workers", "1", "--shard-size", "4"],
                 ["embed", str(out), "--workers", "1", "--runtime", "dlib"],
                 ["clean", str(out)],
                 ["pack", str(out), str(tmp / "pack")]):
        p = _cli(*step)
        assert p.returncode == 0, p.stderr
    return raw, out, tmp / "pack"


def test_the_installed_versions_are_named():
    v = library_versions(["onnxruntime", "no-such-library"])
    assert v["facecurate"].startswith("facecurate ")
    assert v["opencv"].split()[0].startswith("opencv") and v["numpy"].startswith("numpy ")
    assert v["dlib"].split()[0] in ("dlib-bin", "dlib")
    assert "no-such-library" not in v  # an extra that is not installed is not recorded
    import cv2
    import numpy
    assert cv2.__version__ in v["opencv"] and numpy.__version__ in v["numpy"]
    assert differences(v) == [] and differences(dict(v, opencv=OTHER_OPENCV)) == ["opencv"]
    msg = resume_message("OUT/.facecurate/align", dict(v, opencv=OTHER_OPENCV), v)
    assert OTHER_OPENCV in msg and library_version("opencv") in msg and "--overwrite" in msg
    assert "\n" not in msg and resume_message("x", v, v) is None
    assert "did not record" in resume_message("x", None, v)
    assert describe({}) == "no versions"


def test_every_stage_records_its_versions(pipeline):
    raw, out, pack = pipeline
    now = library_versions()
    for path in (out / "align.json", out / "embeddings.json", out / "clean.json", pack / "pack.json"):
        rec = json.loads(path.read_text())["versions"]
        for k in ("facecurate", "opencv", "numpy", "dlib"):
            assert rec[k] == now[k], (path, k)
    assert "onnxruntime" not in json.loads((out / "embeddings.json").read_text())["versions"]  # dlib ran it
    assert json.loads((out / ".facecurate" / "align" / VERSIONS_FILE).read_text()) == now


def test_a_resumed_align_under_other_versions_is_refused(pipeline, tmp_path):
    raw, out, _ = pipeline
    work = tmp_path / "out"
    p = _cli("align", str(raw), str(work), "--workers", "1", "--shard-size", "4")
    assert p.returncode == 0, p.stderr
    before = (work / "align.csv").read_bytes()
    _set_versions(work / ".facecurate" / "align" / VERSIONS_FILE)  # shards made under another OpenCV
    p = _cli("align", str(raw), str(work), "--workers", "1", "--shard-size", "4")
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert OTHER_OPENCV in lines[0] and library_version("opencv") in lines[0] and "--overwrite" in lines[0]
    assert (work / "align.csv").read_bytes() == before  # nothing rewritten
    assert "3.4.18" not in (work / "align.json").read_text()
    p = _cli("align", str(raw), str(work), "--workers", "1", "--shard-size", "4", "--overwrite")
    assert p.returncode == 0, p.stderr
    assert (work / "align.csv").read_bytes() == before


def test_shards_without_a_versions_record_are_refused(pipeline, tmp_path):
    """An OUT whose shards an older facecurate made (no record of versions)."""
    raw, out, _ = pipeline
    work = tmp_path / "out"
    assert _cli("align", str(raw), str(work), "--workers", "1", "--shard-size", "4").returncode == 0
    (work / ".facecurate" / "align" / VERSIONS_FILE).unlink()
    p = _cli("align", str(raw), str(work), "--workers", "1", "--shard-size", "4")
    assert p.returncode == 1 and "did not record library versions" in p.stderr, p.stderr


def test_a_resumed_embed_under_other_versions_is_refused(pipeline, tmp_path):
    raw, out, _ = pipeline
    work = tmp_path / "out"
    assert _cli("align", str(raw), str(work), "--workers", "1", "--shard-size", "4").returncode == 0
    p = _cli("embed", str(work), "--workers", "1", "--runtime", "dlib")
    assert p.returncode == 0, p.stderr
    _set_versions(work / ".facecurate" / "embed" / VERSIONS_FILE, "dlib", OTHER_DLIB)
    p = _cli("embed", str(work), "--workers", "1", "--runtime", "dlib")
    assert p.returncode == 1 and OTHER_DLIB in p.stderr and "--overwrite" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_a_later_stage_warns_about_an_out_made_under_other_versions(pipeline, tmp_path):
    raw, out, _ = pipeline
    work = tmp_path / "out"
    assert _cli("align", str(raw), str(work), "--workers", "1", "--shard-size", "4").returncode == 0
    _set_versions(work / "align.json", nested=True)
    p = _cli("embed", str(work), "--workers", "1", "--runtime", "dlib")
    assert p.returncode == 0, p.stderr
    warn = [ln for ln in p.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "align.json" in warn[0] and OTHER_OPENCV in warn[0], p.stderr
    with pytest.warns(VersionsWarning):
        warn_if_other(work / "align.json", json.loads((work / "align.json").read_text()))
    p = _cli("clean", str(out))  # made under these versions: no warning
    assert p.returncode == 0 and "warning:" not in p.stderr, p.stderr
