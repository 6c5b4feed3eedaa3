"""What a new user hits in the first hour (issue #10): pack follows align's --size and
explains a failure, the detector column names the detector that found *this* image's
face, ordinary mistakes give one line and an exit status (never a traceback or a
silent success), files directly under RAW belong to no identity, and the report,
review page and help say what they mean. Real photos, real dlib models, real
read-only mounts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from facecurate.common import constants as C
from facecurate.align.align import AlignConfig, run_align
from facecurate.cli import main as cli
from facecurate.common.files import format_float, read_csv, write_csv_atomic

#: An LFW-dev photo where dlib's HOG finds no face and the MMOD fallback finds one.
FALLBACK_PHOTO = ("Abdoulaye_Wade", "Abdoulaye_Wade_0003.jpg")


def _photos(photos_dir: Path, ident: str, n: int) -> list[Path]:
    return sorted(f for f in (photos_dir / ident).iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]


@pytest.fixture(scope="module")
def pipeline(photos_dir, tmp_path_factory) -> Path:
    """align -> embed -> clean on 3 identity folders of real photos plus one photo
    directly under RAW (which belongs to no identity)."""
    from facecurate.clean.clean import run_clean
    from facecurate.embed.embed import run_embed

    root = tmp_path_factory.mktemp("pipeline")
    raw = root / "raw"
    for ident in ("id00", "id01", "id02"):
        (raw / ident).mkdir(parents=True)
        for f in _photos(photos_dir, ident, 4):
            shutil.copyfile(f, raw / ident / f.name)
    shutil.copy(_photos(photos_dir, "id03", 1)[0], raw / "loose.jpg")
    out = root / "out"
    s = run_align(raw, out, AlignConfig(fallback="none"), workers=2, show_progress=False)
    run_embed(out, workers=2, show_progress=False)
    run_clean(out, show_progress=False)
    (root / "align_warnings.json").write_text(json.dumps(s["warnings"]))
    return out


def _one_line_error(res, *needles: str) -> str:
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), \
        f"traceback: {res.exception!r}"
    err = res.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("Error: "), err
    for n in needles:
        assert n in err, err
    return err


# --------------------------------------------------------------------------- 1. pack
def test_pack_uses_align_size_and_explains_a_failure(photos_dir, tmp_path):
    raw = tmp_path / "raw"
    (raw / "id00").mkdir(parents=True)
    for f in _photos(photos_dir, "id00", 3):
        shutil.copyfile(f, raw / "id00" / f.name)
    out = tmp_path / "out"
    run_align(raw, out, AlignConfig(size=224, fallback="none"), workers=1, show_progress=False)
    runner = CliRunner()
    res = runner.invoke(cli, ["pack", str(out), str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "d" / "property").read_text() == "1,224,224\n"

    # a pack that fails says why: per crop on stderr, pack_errors.csv, JSON summary
    res = runner.invoke(cli, ["pack", str(out), str(tmp_path / "e"), "--size", "112", "--json"])
    assert res.exit_code == 1
    summary = json.loads(res.stdout)
    n = summary["input_errors_by_reason"]["wrong_size"]
    assert n >= 2 and summary["packed"] is False and summary["images"] == 0
    per_crop = [ln for ln in res.stderr.splitlines() if ln.startswith("  id00/img")]
    assert len(per_crop) == n and all("wrong_size: 224x224, expected 112x112" in ln for ln in per_crop)
    rows = read_csv(tmp_path / "e" / "pack_errors.csv")
    assert sum(r["reason"] == "wrong_size" for r in rows) == n
    assert summary["errors_file"] == str(tmp_path / "e" / "pack_errors.csv")
    assert not (tmp_path / "e" / "train.rec").exists()


# --------------------------------------------------------------------------- 3. detector
def test_detector_column_names_the_detector_of_this_image(lfw_dir, photos_dir, tmp_path):
    raw = tmp_path / "raw"
    (raw / "a").mkdir(parents=True)
    (raw / "b").mkdir()
    ident, name = FALLBACK_PHOTO
    shutil.copyfile(lfw_dir / ident / name, raw / "a" / name)  # found only by the fallback
    shutil.copyfile(_photos(photos_dir, "id00", 1)[0], raw / "b" / "hog.jpg")  # found by HOG, processed next
    s = run_align(raw, tmp_path / "out", AlignConfig(), workers=1, show_progress=False)
    by_src = {r["source"]: r["detector"] for r in read_csv(tmp_path / "out" / "align.csv") if r["face"] == "0"}
    assert by_src == {f"a/{name}": "dlib-cnn", "b/hog.jpg": "dlib"}
    assert s["found_by"].get("dlib-cnn") == 1


# --------------------------------------------------------------------------- 4. mistakes
@pytest.fixture()
def one_photo_raw(photos_dir, tmp_path) -> Path:
    raw = tmp_path / "raw"
    (raw / "id00").mkdir(parents=True)
    shutil.copyfile(_photos(photos_dir, "id00", 1)[0], raw / "id00" / "a.jpg")
    return raw


@pytest.mark.parametrize("args", [["--size", "100"], ["--size", "0"], ["--size", "-112"], ["--workers", "0"],
                                  ["--workers", "-2"]])
def test_align_bad_numbers_are_usage_errors(one_photo_raw, tmp_path, args):
    res = CliRunner().invoke(cli, ["align", str(one_photo_raw), str(tmp_path / "out"), *args])
    assert res.exit_code == 2, (res.output, res.exception)
    assert "Usage:" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["same", "inside"])
def test_align_refuses_out_in_raw(one_photo_raw, where):
    out = one_photo_raw if where == "same" else one_photo_raw / "id00" / "out"
    res = CliRunner().invoke(cli, ["align", str(one_photo_raw), str(out)])
    assert res.exit_code == 2 and "outside RAW" in res.stderr, res.output
    assert not (one_photo_raw / "align.csv").exists() and not (one_photo_raw / "id00" / "out").exists()


@pytest.mark.parametrize("layout", ["empty", "loose"])
def test_align_says_what_raw_should_hold(photos_dir, tmp_path, layout):
    raw = tmp_path / "raw"
    raw.mkdir()
    if layout == "loose":
        for f in _photos(photos_dir, "id00", 2):
            shutil.copy(f, raw / f.name)
    res = CliRunner().invoke(cli, ["align", str(raw), str(tmp_path / "out")])
    assert res.exit_code == 1
    _one_line_error(res, "RAW/<identity>/<photo>")


def test_align_warns_about_files_directly_under_raw(pipeline):
    warnings = json.loads((pipeline.parent / "align_warnings.json").read_text())
    assert any("1 file(s) directly under" in w and "RAW/<identity>/<photo>" in w for w in warnings), warnings


def test_inspect_of_a_missing_rec_prints_nothing_on_stdout(tmp_path):
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "nonexistent")])
    assert res.exit_code == 1 and res.stdout == ""
    _one_line_error(res, "does not exist")


@pytest.fixture()
def readonly_out(pipeline, tmp_path):
    """A copy of a finished OUT on a read-only bind mount (tests run as root, whom
    chmod does not stop); without the right to mount, a non-root user gets chmod."""
    src = tmp_path / "src"
    shutil.copytree(pipeline, src, symlinks=True)
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        ok = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True).returncode == 0 and \
            subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True).returncode == 0
        if not ok:
            subprocess.run(["umount", str(ro)], capture_output=True)
            pytest.skip("cannot make a read-only mount here (root without CAP_SYS_ADMIN)")
        try:
            (ro / "probe").write_text("x")
            pytest.fail("the read-only mount accepted a write")
        except OSError:
            pass
        yield ro
        subprocess.run(["umount", "-l", str(ro)], check=True)
    else:
        for d, _dirs, files in os.walk(src):
            os.chmod(d, 0o555)
        yield src
        for d, _dirs, files in os.walk(src):
            os.chmod(d, 0o755)


@pytest.mark.parametrize("stage", ["align-new", "align-existing", "embed", "clean", "pack", "report"])
def test_read_only_out_gives_one_line(readonly_out, pipeline, stage):
    raw = pipeline.parent / "raw"
    args = {"align-new": ["align", raw, readonly_out / "new"], "align-existing": ["align", raw, readonly_out, "--fallback", "none"],
            "embed": ["embed", readonly_out], "clean": ["clean", readonly_out],
            "pack": ["pack", readonly_out, readonly_out / "pack"], "report": ["report", readonly_out]}[stage]
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 1, res.output
    err = _one_line_error(res, str(readonly_out))
    assert "Read-only file system" in err or "Permission denied" in err


# --------------------------------------------------------------------------- 5. loose files
def test_files_directly_under_raw_belong_to_no_identity(pipeline):
    from facecurate.review.report import collect

    rows = read_csv(pipeline / "align.csv")
    assert [r["status"] for r in rows if r["source"] == "loose.jpg"] == ["unsupported"]  # recorded as before
    assert sorted(r["identity"] for r in read_csv(pipeline / "identities.csv")) == ["id00", "id01", "id02"]
    assert "" not in {r["identity"] for r in read_csv(pipeline / "clean.csv")}
    assert json.loads((pipeline / "clean.json").read_text())["summary"]["identities"] == 3
    d = collect(pipeline)
    assert d["align"]["identities"] == 3 and d["clean"]["identities"] == 3
    assert "" not in {r["identity"] for r in d["noisiest"]}


# --------------------------------------------------------------------------- 6. smaller things
def test_report_noisiest_sorted_by_share_of_faces_not_kept(tmp_path):
    from facecurate.review.report import collect

    clean, idents = [], []
    # A: half its faces not kept, low noise estimate; B: 2 of 10 not kept, high estimate
    for ident, kept, noise in (("A", 5, 0.1), ("B", 8, 0.3)):
        for i in range(10):
            d = "keep" if i < kept else "drop"
            clean.append(dict(source=f"{ident}/{i}.jpg", identity=ident, face=0, aligned=f"{ident}/{i}_0.jpg",
                              decision=d, reason="centre" if d == "keep" else "far_from_centre",
                              score=format_float(0.9)))
        idents.append(dict(identity=ident, images=10, faces=10, kept=kept, dropped=10 - kept, review=0,
                           noise=format_float(noise)))
    write_csv_atomic(tmp_path / C.CLEAN_CSV, C.CLEAN_COLUMNS, clean)
    write_csv_atomic(tmp_path / C.IDENTITIES_CSV, list(idents[0]), idents)
    assert [r["identity"] for r in collect(tmp_path)["noisiest"]] == ["A", "B"]


def test_report_histogram_axis_says_corrected_score():
    from facecurate.review.report import svg_histograms

    svg = svg_histograms({"keep": [0.95, 1.0033], "drop": [0.5]}, {"keep": 0.945, "drop": 0.92})
    label = svg.rsplit("<text", 1)[1]
    assert "corrected" in label and "can pass 1.0" in label


def test_help_lists_every_stage_and_format():
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"]).output
    for stage in ("align RAW OUT", "embed OUT", "clean OUT", "review OUT", "report OUT", "pack OUT DEST",
                  "inspect DEST"):
        assert f"facecurate {stage}" in top, stage
    align_help = " ".join(runner.invoke(cli, ["align", "--help"]).output.split())
    assert "--format [jpg|png] Crop file format" in align_help


def test_review_page_without_review_faces_shows_a_proper_empty_state(pipeline, tmp_path):
    from facecurate.review.review import write_review

    out = tmp_path / "out"
    shutil.copytree(pipeline, out, symlinks=True)
    rows = read_csv(out / C.CLEAN_CSV)
    for r in rows:
        if r["decision"] == "review":
            r["decision"] = "keep"
    write_csv_atomic(out / C.CLEAN_CSV, C.CLEAN_COLUMNS, rows)
    s = write_review(out)
    assert s["review_faces"] == 0
    html = (out / C.REVIEW_HTML).read_text()
    assert '<section class="empty"><h2>Nothing to review</h2>' in html
    assert "section.empty{" in html and "margin:48px auto" in html  # a centred block, not flush left
    assert 'id="export"' not in html  # nothing to export


def _quickstart(tmp_path: Path, args: list, data: Path | None) -> subprocess.CompletedProcess:
    """examples/quickstart.sh run from a copy of the checkout outside this workspace
    (no shared/data beside it), with `facecurate` on PATH replaced by a recorder of
    its arguments: what is under test is the script's choice of RAW, not the stages."""
    repo = Path(__file__).resolve().parent.parent
    checkout = tmp_path / "elsewhere" / "facecurate"
    (checkout / "examples").mkdir(parents=True, exist_ok=True)
    shutil.copy(repo / "examples" / "quickstart.sh", checkout / "examples")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    rec = bin_dir / "facecurate"
    rec.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls.txt"}\n')
    rec.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "FACECURATE_DATA"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    if data is not None:
        env["FACECURATE_DATA"] = str(data)
    return subprocess.run(["bash", "examples/quickstart.sh", *args], cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=60)


def test_quickstart_without_the_shared_photos_says_where_they_come_from(tmp_path, photos_dir):
    p = _quickstart(tmp_path, [], None)
    assert p.returncode == 2 and not (tmp_path / "calls.txt").exists()
    assert "no photo folder at" in p.stderr and "not part of the repository" in p.stderr
    assert "RAW/<identity>/*.jpg" in p.stderr and "FACECURATE_DATA" in p.stderr
    p = _quickstart(tmp_path, [str(tmp_path / "nowhere"), "out"], None)
    assert p.returncode == 2 and f"no photo folder at {tmp_path / 'nowhere'}" in p.stderr
    # without RAW, FACECURATE_DATA/photos is used; with RAW, RAW is
    p = _quickstart(tmp_path, [], photos_dir.parent)
    assert p.returncode == 0, p.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls[0] == f"align {photos_dir.parent}/photos out" and len(calls) == 7
    (tmp_path / "calls.txt").unlink()
    p = _quickstart(tmp_path, [str(photos_dir / "id00"), "o2"], tmp_path / "nowhere")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "calls.txt").read_text().splitlines()[0] == f"align {photos_dir / 'id00'} o2"
