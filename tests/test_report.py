"""report: the run overview page on real crops (align of a few shared photo folders)
with a hand-written clean.csv, identities.csv, merges.csv and clean.json."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facecurate.common import constants as C
from facecurate.cli.review import report as report_cli
from facecurate.common.manifests import CleanRow
from facecurate.common.files import read_csv, write_csv_atomic
from facecurate.review.report import histogram, noisiest, svg_histograms, write_report
from facecurate.review.review import apply_decisions
from facecurate.common.manifests import IdentityRow
from facecurate.common.workspace import Workspace
from test_review import _rename_identity, align_subset, write_clean_by_hand

IDS = ("id00", "id02", "id05")


@pytest.fixture(scope="module")
def aligned(photos_dir, tmp_path_factory) -> Path:
    return align_subset(photos_dir, tmp_path_factory.mktemp("report"), IDS)


@pytest.fixture
def run_dir(aligned, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(aligned, out, symlinks=True)
    rows = write_clean_by_hand(out)
    # id02 gets a bystander and a duplicate: the noisiest identity
    for r in rows:
        if r["identity"] == "id02" and r["decision"] == "keep" and float(r["score"]) < 0.9:
            r.update(decision="drop", reason="not_subject")
    write_csv_atomic(out / C.CLEAN_CSV, C.CLEAN_COLUMNS, rows)
    write_csv_atomic(out / C.IDENTITIES_CSV, ("identity", "images", "faces", "kept", "dropped", "review",
                                              "noise", "flags"),
                     [dict(identity=i, images=0, faces=0, kept=0, dropped=0, review=0,
                           noise="", flags="ambiguous" if i == "id05" else "") for i in IDS])
    write_csv_atomic(out / C.MERGES_CSV, ("a", "b", "similarity"), [dict(a="id00", b="id05", similarity="0.7100")])
    (out / "clean.json").write_text(json.dumps({"summary": {"model": "dlib", "thresholds": {
        "keep": 0.8, "drop": 0.55, "cw": 0.9}}}))
    np.save(out / C.EMBEDDINGS_NPY, np.zeros((len(rows), 128), np.float32))
    return out


def test_histogram_bins_and_clamping():
    assert histogram([0.0, 0.49, 0.5, 1.0, 7.0, -3.0], 0.0, 1.0, 2) == [3, 3]
    assert sum(histogram(list(np.linspace(-1, 1, 101)), -1, 1, 40)) == 101


def test_report_shows_every_stage_and_the_histograms(run_dir):
    res = CliRunner().invoke(report_cli, [str(run_dir), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    clean = read_csv(run_dir / C.CLEAN_CSV)
    align = read_csv(run_dir / C.ALIGN_MANIFEST)
    dec = {d: sum(r["decision"] == d for r in clean) for d in ("keep", "review", "drop")}
    assert summary["decisions"] == dec and summary["embeddings"] == len(clean)
    assert summary["crops"] == sum(1 for r in align if r["aligned"]) and summary["merge_candidates"] == 1
    assert summary["noisiest"][0] == "id02"

    page = (run_dir / C.REPORT_HTML).read_text(encoding="utf-8")
    assert not re.search(r'(src|href)="(https?:|//)', page) and "<script" not in page and "<link" not in page
    # histogram panels carry their n, and their bar titles add up to it
    hist = page[page.index("Similarity to the identity centre"):page.index("Noisiest identities")]
    for label, d in (("kept", "keep"), ("review", "review"), ("dropped", "drop")):
        assert f'class="pl">{label}</text><text x="102" y="' in hist and f">n={dec[d]}<" in hist
    bars = [int(n) for n in re.findall(r"<title>[-0-9.]+\.\.[-0-9.]+: (\d+)</title>", hist)]
    assert sum(bars) == len(clean)
    assert "keep 0.800" in hist and "drop 0.550" in hist and "cw " not in hist
    # per-stage counts: align status, embed, decisions by reason
    assert f"<title>ok: {sum(r['status'] == 'ok' for r in align)}</title>" in page
    assert f"<title>embed: vectors: {len(clean)}</title>" in page
    assert f"<title>drop: not_subject: {sum(r['reason'] == 'not_subject' for r in clean)}</title>" in page
    # noisiest table: id02 first, its thumbnails are the real crops
    table = page[page.index('<table class="noisy">'):]
    table = table[:table.index("</table>")]
    order = re.findall(r"<tr><td>(id\d\d)</td>", table)
    assert order[0] == "id02" and sorted(order) == sorted(IDS)
    assert table.count("data:image/jpeg;base64,") >= 6
    assert "ambiguous" in page and "<td>id00</td><td>id05</td><td>0.7100</td>" in page
    # deterministic
    first = (run_dir / C.REPORT_HTML).read_bytes()
    write_report(run_dir)
    assert (run_dir / C.REPORT_HTML).read_bytes() == first


def test_report_counts_manual_decisions(run_dir):
    rev = [r for r in read_csv(run_dir / C.CLEAN_CSV) if r["decision"] == "review"][:3]
    path = run_dir / "d.csv"
    path.write_text("aligned,decision\n" + "".join(f"{r['aligned']},{d}\n" for r, d in zip(rev, ("keep", "drop",
                                                                                               "keep"))))
    apply_decisions(run_dir, path)
    s = write_report(run_dir)
    assert s["manual"] == 3
    page = (run_dir / C.REPORT_HTML).read_text()
    assert '<div class="v">3 <small>3 changed</small></div><div class="k">decided by a person</div>' in page
    assert "<title>keep: manual: 2</title>" in page and "<title>drop: manual: 1</title>" in page


def test_report_after_align_only_and_on_an_empty_folder(run_dir, tmp_path):
    for f in (C.CLEAN_CSV, C.IDENTITIES_CSV, C.MERGES_CSV, "clean.json", C.EMBEDDINGS_NPY):
        (run_dir / f).unlink()
    s = write_report(run_dir)
    assert s["decisions"] is None and s["notes"] == ["clean.csv not found"]
    page = (run_dir / C.REPORT_HTML).read_text()
    assert "clean.csv not found" in page and "Similarity to the identity centre" not in page
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(report_cli, [str(empty)])
    assert res.exit_code == 1 and "nothing to report" in res.output
    assert not (empty / C.REPORT_HTML).exists()


def test_noisiest_falls_back_to_clean_counts_and_histogram_svg_is_well_formed():
    clean = [dict(identity="a", decision="keep", score="0.9", aligned="", source="1"),
             dict(identity="a", decision="drop", score="0.1", aligned="", source="2"),
             dict(identity="b", decision="keep", score="0.8", aligned="", source="3")]
    rows = noisiest([CleanRow.from_csv(r) for r in clean], [], 5)
    assert [(r["identity"], r["noise"]) for r in rows] == [("a", 0.5)]  # b: every face kept, not noisy
    import xml.etree.ElementTree as ET

    svg = svg_histograms({"keep": [0.9, 0.8], "drop": [0.1]}, {"keep": 0.7, "drop": 0.3})
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg") and len(root.findall(".//{*}rect") or root.findall(".//rect")) == 3


@pytest.mark.slow
def test_review_and_report_on_a_real_clean_run(aligned, tmp_path):
    """The real pipeline: embed (dlib) + clean on the aligned crops, then review and report."""
    from facecurate.clean.clean import run_clean
    from facecurate.review.review import write_review

    out = tmp_path / "out"
    shutil.copytree(aligned, out, symlinks=True)
    summary = run_clean(out, show_progress=False)
    clean = read_csv(out / C.CLEAN_CSV)
    assert list(clean[0]) == list(C.CLEAN_COLUMNS)
    s = write_review(out)
    assert s["review_faces"] == summary["review"] == sum(r["decision"] == "review" for r in clean)
    assert s["missing_crops"] == 0
    r = write_report(out)
    assert r["decisions"] == {k: summary[k] for k in ("keep", "review", "drop")}
    assert r["embeddings"] == len(clean) and r["files"] == len({x["source"] for x in read_csv(out / C.ALIGN_MANIFEST)})
    page = (out / C.REPORT_HTML).read_text()
    thr = json.loads((out / "clean.json").read_text())["summary"]["thresholds"]
    assert f"keep {thr['keep']:.3f}" in page and f"drop {thr['drop']:.3f}" in page


HOSTILE = "=cmd|' -C calc'!A0\u202egnp.exe\x1b[2J"


def test_report_names_align_counts_and_shows_hostile_names_escaped(run_dir):
    """align's two counts are labelled apart; a name with a formula start, a
    right-to-left override and a terminal escape is shown escaped, and
    identities.csv (written spreadsheet-safe) is read back exactly."""
    _rename_identity(run_dir, "id02", HOSTILE)
    Workspace(run_dir).write_identities([IdentityRow(identity=HOSTILE, flags="ambiguous"),
                                         IdentityRow(identity="id00"), IdentityRow(identity="id05")])
    raw = (run_dir / C.IDENTITIES_CSV).read_text(encoding="utf-8")
    assert "\n'=cmd|" in raw and "\n=cmd" not in raw  # no cell a spreadsheet would run
    assert Workspace(run_dir).identities()[0].identity == HOSTILE  # read back exactly
    s = write_report(run_dir)
    assert s["noisiest"][0] == HOSTILE
    page = (run_dir / C.REPORT_HTML).read_text(encoding="utf-8")
    assert "\u202e" not in page and "\x1b" not in page
    assert "=cmd|&#x27; -C calc&#x27;!A0\\u202egnp.exe\\x1b[2J" in page
    row = page[page.index('<table class="noisy">'):]
    row = row[row.index("<tr><td>=cmd"):]
    assert "<td>ambiguous</td>" in row[:row.index("</tr>")]  # its identities.csv row was matched
    align = read_csv(run_dir / C.ALIGN_MANIFEST)
    faces = len(align)
    align.append(dict(align[0], source="id00/blank.jpg", face="", status=C.STATUS_NO_FACE, aligned=""))
    write_csv_atomic(run_dir / C.ALIGN_MANIFEST, C.ALIGN_COLUMNS, align)  # a file without a face: one more row
    page = (Path(write_report(run_dir)["html"])).read_text(encoding="utf-8")
    assert f"<title>align: faces found: {faces}</title>" in page
    assert f"<title>align.csv: rows: {len(align)}</title>" in page and "face rows" not in page
def test_report_lists_lost_and_weak_identities_first(run_dir):
    """identities.csv's lost / weak_majority identities get their own table at the top
    of the page, lost first; the others are not in it."""
    write_csv_atomic(run_dir / C.IDENTITIES_CSV, ("identity", "images", "faces", "kept", "dropped", "review",
                                                  "noise", "flags"),
                     [dict(identity=i, images=3, faces=3, kept=0, dropped=3, review=0, noise="",
                           flags={"id00": "weak_majority", "id05": "lost"}.get(i, "")) for i in IDS])
    s = write_report(run_dir)
    page = (run_dir / C.REPORT_HTML).read_text(encoding="utf-8")
    assert s["at_risk"] == ["id05", "id00"]
    top = page[page.index("Identities lost or kept thin"):page.index("<h2>Counts")]
    assert re.findall(r"<tr><td>(id\d\d)</td>", top) == ["id05", "id00"]
    assert "2 flagged lost" in top and top.count("data:image/jpeg;base64,") >= 2


def test_report_shows_the_quality_lifts_and_ignores_a_malformed_record(run_dir):
    """clean.json's quality_lift appears as one line under the histograms; an entry that
    is not numbers (an edited or foreign clean.json) is left out, never shown raw."""
    meta = json.loads((run_dir / "clean.json").read_text())
    meta["summary"]["quality_lift"] = {
        "blurred": {"faces": 346, "inliers": 246, "lift": 0.0118},
        "compressed": {"faces": 112, "inliers": 110, "lift": 0.018},
        "<script>": {"faces": "many", "inliers": 1, "lift": 0.5},
        "occluded": "0.0134"}
    (run_dir / "clean.json").write_text(json.dumps(meta))
    res = CliRunner().invoke(report_cli, [str(run_dir)])
    assert res.exit_code == 0, res.output
    page = (run_dir / C.REPORT_HTML).read_text(encoding="utf-8")
    line = re.search(r"Quality lifts[^<]*", page).group(0)
    assert "blurred: 346 faces (246 inliers), +0.0118" in line and "compressed: 112 faces (110 inliers), +0.0180" in line
    assert "script" not in line and "occluded" not in line and "<script>" not in page
    del meta["summary"]["quality_lift"]  # an older clean.json: no line at all
    (run_dir / "clean.json").write_text(json.dumps(meta))
    assert CliRunner().invoke(report_cli, [str(run_dir)]).exit_code == 0
    assert "Quality lifts" not in (run_dir / C.REPORT_HTML).read_text(encoding="utf-8")
