"""Golden test: the whole pipeline on real photos, every output file pinned by sha256.

align -> embed -> clean -> review -> report -> pack (both layouts) runs through the CLI
on a RAW folder built from the shared data: the 13 people of ``photos/``, four LFW
*dev* identities, an intruder, a re-hosted copy, a group photo, a photo without a
human face, a truncated JPEG, a text file and a file directly under RAW. clean runs
with a review band (``--keep 0.97``) so that review has faces to show.

The expected digests live in ``tests/golden/pipeline.json``; they belong to the library
versions in ``tests/golden/versions.json``, those of the committed lock
(``requirements/ci-py311.txt``): another OpenCV, numpy or dlib gives other crops and
other bytes (OpenCV 5.1 against 4.14 changed every crop). Under other versions the
pipeline still runs with all its structural checks, and only the byte comparison is
skipped, with a reason naming both sets of versions; with
``FACECURATE_GOLDEN_REQUIRED=1`` (``.ci/run`` sets it) that skip is a failure. A deliberate change of
an output (a fixed defect, never a refactoring) is recorded by running this test with
``FACECURATE_GOLDEN_UPDATE=1`` and committing the new file with the reason; the diff
then shows exactly which outputs changed. Absolute paths of the temporary folder are
replaced by ``<TMP>`` before hashing, so the digests do not depend on where it ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from facecurate.common.provenance import describe, differences

GOLDEN = Path(__file__).resolve().parent / "golden" / "pipeline.json"
GOLDEN_VERSIONS = GOLDEN.with_name("versions.json")
REQUIRED_ENV = "FACECURATE_GOLDEN_REQUIRED"
LFW_IDS = 4          # dev identities with at least 6 photos, first in split order
LFW_PHOTOS = 6
SKIP_DIRS = {".facecurate"}   # per-shard resume records: internal, not outputs


def build_raw(data: Path, raw: Path) -> None:
    """RAW/<identity>/<photo> with the usual crawl noise (deterministic)."""
    shutil.copytree(data / "photos", raw)
    dev = [s.strip() for s in (data / "splits" / "lfw-dev.txt").read_text().splitlines() if s.strip()]
    picked: list[tuple[str, list[str]]] = []
    for ident in dev:
        files = sorted(os.listdir(data / "lfw" / ident))
        if len(files) >= LFW_PHOTOS:
            picked.append((ident, files[:LFW_PHOTOS]))
        if len(picked) == LFW_IDS:
            break
    for ident, files in picked:
        (raw / ident).mkdir()
        for f in files:
            shutil.copyfile(data / "lfw" / ident / f, raw / ident / f)
    (id1, f1), (id2, f2) = picked[0], picked[1]
    shutil.copyfile(data / "lfw" / id2 / f2[-1], raw / id1 / "intruder.jpg")
    shutil.copyfile(raw / id1 / f1[0], raw / id1 / "copy_of_first.jpg")
    shutil.copyfile(data / "photos-unlabeled" / "couple.jpg", raw / "id00" / "couple.jpg")
    shutil.copyfile(data / "dlib-faces" / "dogs.jpg", raw / "id01" / "dogs.jpg")
    jpeg = (raw / id1 / f1[1]).read_bytes()
    (raw / "id02" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (raw / "id02" / "notes.txt").write_text("not an image\n")
    shutil.copyfile(data / "lfw" / id2 / f2[-2], raw / "stray.jpg")


STEPS = [
    ["align", "raw", "out", "--workers", "2"],
    ["embed", "out", "--workers", "2", "--runtime", "dlib"],
    ["clean", "out", "--keep", "0.97"],
    ["review", "out"],
    ["report", "out"],
    ["pack", "out", "out/pack"],
    ["pack", "out", "out/pack-insightface", "--layout", "insightface"],
]


def run_pipeline(tmp: Path) -> None:
    env = dict(os.environ, PYTHONHASHSEED="0")
    for step in STEPS:
        proc = subprocess.run([sys.executable, "-m", "facecurate", *step], cwd=tmp, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"facecurate {' '.join(step)} failed:\n{proc.stderr[-3000:]}"


def digests(out: Path, tmp: Path) -> dict[str, str]:
    """sha256 of every output file under OUT, with the temporary folder's absolute
    path replaced by <TMP> (align.json records RAW, for example)."""
    found: dict[str, str] = {}
    marker = str(tmp).encode()
    for root, dirs, files in os.walk(out):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            path = Path(root) / name
            data = path.read_bytes().replace(marker, b"<TMP>")
            found[path.relative_to(out).as_posix()] = hashlib.sha256(data).hexdigest()
    return found


@pytest.mark.slow
def test_pipeline_outputs_are_pinned(tmp_path, data_dir):
    build_raw(data_dir, tmp_path / "raw")
    run_pipeline(tmp_path)
    got = digests(tmp_path / "out", tmp_path)
    # the run must be a real one: faces, embeddings, review faces and both packs
    assert sum(1 for k in got if k.endswith("_0.jpg")) > 60
    assert {"review.html", "pack/train.rec", "pack-insightface/train.rec"} <= set(got)
    review = (tmp_path / "out" / "review.csv").read_text().splitlines()
    assert len(review) > 1, "the golden run must send faces to review"
    made_under = json.loads((tmp_path / "out" / "align.json").read_text())["versions"]
    for name in ("embeddings.json", "clean.json", "pack/pack.json"):  # one set of versions made the run
        assert json.loads((tmp_path / "out" / name).read_text())["versions"].items() >= made_under.items(), name
    if os.environ.get("FACECURATE_GOLDEN_UPDATE"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        GOLDEN_VERSIONS.write_text(json.dumps(made_under, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"golden digests rewritten: {GOLDEN}")
    pinned = json.loads(GOLDEN_VERSIONS.read_text())
    if differences(pinned, made_under):
        why = (f"golden bytes belong to {describe(pinned)}; this run used {describe(made_under)} "
               "(pip install -c requirements/ci-py311.txt gives the pinned set); structure checked, bytes not")
        if os.environ.get(REQUIRED_ENV):
            pytest.fail(f"{REQUIRED_ENV} is set and {why}", pytrace=False)
        pytest.skip(why)
    want = json.loads(GOLDEN.read_text())
    changed = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    assert not changed, f"{len(changed)} outputs differ from the golden run: {changed[:20]}"
