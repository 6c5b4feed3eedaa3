"""Typed manifests (facecurate.common.manifests) and the workspace (facecurate.common.workspace) on
the real outputs of align -> embed -> clean -> review, and of clean on a packed
dataset: every CSV a stage writes goes through its row type and back to the same
bytes; a malformed file gives one clear message naming the file, line and column."""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from facecurate.common import constants as C
from facecurate.cli import main as cli
from facecurate.common.files import csv_text
from facecurate.common.manifests import (AlignRow, CleanRow, EmbeddingRow, IdentityRow, MergeRow, ReviewRow, RowError,
                                         parse_float)
from facecurate.common.workspace import ManifestError, MissingFile, Workspace

IDENTITIES = ("id00", "id01", "id02")


@pytest.fixture(scope="module")
def run(photos_dir, tmp_path_factory) -> Path:
    """A real OUT: align (with a file align cannot read), embed (dlib), clean with a
    review band, review; then clean on the packed dataset (DEST/clean.csv by key)."""
    from facecurate.align.align import AlignConfig, run_align
    from facecurate.clean.clean import run_clean
    from facecurate.embed.embed import run_embed
    from facecurate.review.review import write_review

    root = tmp_path_factory.mktemp("manifests")
    raw = root / "raw"
    raw.mkdir()
    for ident in IDENTITIES:
        shutil.copytree(photos_dir / ident, raw / ident)
    (raw / "zz_notes").mkdir()
    (raw / "zz_notes" / "notes.txt").write_text("not an image\n")
    out = root / "out"
    run_align(raw, out, AlignConfig(fallback="none"), workers=1, show_progress=False)
    run_embed(out, runtime="dlib", workers=1, show_progress=False)
    run_clean(out, model_overrides={"keep": 0.99}, max_review=0.5, runtime="dlib", workers=1, show_progress=False)
    write_review(out)
    return out


@pytest.fixture(scope="module")
def rec_run(run, tmp_path_factory) -> Path:
    from facecurate.clean.clean import run_clean
    from facecurate.pack.packer import pack

    dest = tmp_path_factory.mktemp("manifests-rec") / "pack"
    pack(run, dest)
    run_clean(dest, runtime="dlib", workers=1, show_progress=False)
    return dest


def _round_trip(path: Path, row_type, columns) -> list:
    text = path.read_text(encoding="utf-8")
    rows = [row_type.from_csv(r) for r in csv.DictReader(io.StringIO(text, newline=""))]
    assert csv_text(columns, [r.to_csv(columns) for r in rows]) == text, f"{path.name} changed on the round trip"
    return rows


@pytest.mark.parametrize("name,row_type,columns", [
    (C.ALIGN_MANIFEST, AlignRow, C.ALIGN_COLUMNS),
    (C.EMBEDDINGS_CSV, EmbeddingRow, C.EMBEDDINGS_COLUMNS),
    (C.CLEAN_CSV, CleanRow, C.CLEAN_COLUMNS),
    (C.IDENTITIES_CSV, IdentityRow, C.IDENTITY_COLUMNS),
    (C.MERGES_CSV, MergeRow, C.MERGE_COLUMNS),
    (C.REVIEW_CSV, ReviewRow, C.REVIEW_COLUMNS),
])
def test_every_out_csv_round_trips_to_the_same_bytes(run, name, row_type, columns):
    rows = _round_trip(run / name, row_type, columns)
    if name != C.MERGES_CSV:  # three people who do not look alike: no merge candidates
        assert rows, f"{name} is empty: the round trip proves nothing"
    # ... and written back through the workspace, too
    ws = Workspace(run)
    text = (run / name).read_bytes()
    ws.write_table(name, columns, rows)
    assert (run / name).read_bytes() == text


def test_align_rows_are_typed(run):
    rows = Workspace(run).align_rows()
    ok = [r for r in rows if r.is_ok]
    assert ok and all(isinstance(r.face, int) and r.face >= 0 for r in ok)
    assert all(r.box is not None and r.points is not None and r.sharpness > 0 for r in ok)
    assert all(isinstance(r.img_w, int) and r.img_w > 0 for r in ok)
    bad = [r for r in rows if r.source.endswith("notes.txt")]
    assert len(bad) == 1 and bad[0].status == C.STATUS_UNSUPPORTED and bad[0].face == -1
    assert not bad[0].has_face and bad[0].box is None and math.isnan(bad[0].sharpness) and bad[0].img_w is None
    # the one test of "a crop of the photo's subject", against the raw cells
    with open(run / C.ALIGN_MANIFEST, newline="") as f:
        raw = list(csv.DictReader(f))
    assert [r.is_primary_ok for r in rows] == [r["status"] == "ok" and r["primary"] == "1" for r in raw]
    assert any(r.is_ok and not r.is_primary_ok for r in rows) or all(r.primary for r in ok)


def test_clean_and_review_rows_are_typed(run):
    layout, rows = Workspace(run).clean_table()
    assert layout == C.CLEAN_COLUMNS and not any(r.is_rec for r in rows)
    assert {r.decision for r in rows} <= {C.DECISION_KEEP, C.DECISION_DROP, C.DECISION_REVIEW}
    assert all(isinstance(r.cluster, int) and -1.5 < r.score < 1.5 for r in rows if r.score == r.score)
    review = [r for r in rows if r.decision == C.DECISION_REVIEW]
    assert review, "clean --keep 0.99 should leave faces to review"
    table = Workspace(run).read_table(C.REVIEW_CSV, ReviewRow)[1]
    assert sorted(r.aligned for r in table) == sorted(r.aligned for r in review)
    assert all(r.decision == "" for r in table)
    idents = Workspace(run).identities()
    assert [i.identity for i in idents] == list(IDENTITIES) + ["zz_notes"]
    assert all(i.kept + i.dropped + i.review == i.faces for i in idents)


def test_rec_clean_csv_round_trips_in_its_own_layout(rec_run):
    rows = _round_trip(rec_run / C.CLEAN_CSV, CleanRow, C.REC_CLEAN_COLUMNS)
    assert rows and all(r.is_rec and r.aligned == f"{C.REC_KEY_PREFIX}{r.key}" for r in rows)
    assert [r.key for r in rows] == sorted(r.key for r in rows)
    layout, typed = Workspace(rec_run).clean_table()
    assert layout == C.REC_CLEAN_COLUMNS and typed == rows and rows[0].columns() == C.REC_CLEAN_COLUMNS
    _round_trip(rec_run / C.IDENTITIES_CSV, IdentityRow, C.IDENTITY_COLUMNS)


def test_manual_decision_keeps_the_first_audit():
    r = CleanRow(identity="a", aligned="a/1.jpg", decision="review", reason="uncertain", score=0.61)
    m = r.manual("keep")
    assert (m.decision, m.reason, m.previous_decision, m.previous_reason) == ("keep", "manual", "review", "uncertain")
    m2 = m.manual("drop")
    assert (m2.decision, m2.previous_decision, m2.previous_reason) == ("drop", "review", "uncertain")
    assert m2.to_dict()["score"] == "0.6100"


# ----------------------------------------------------------------------------- malformed input
def test_a_malformed_cell_names_its_column_and_text():
    good = dict(source="a/1.jpg", identity="a", face="0", status="ok", primary="1", aligned="a/1_0.jpg", x1="3.5")
    assert AlignRow.from_csv(good).x1 == 3.5
    with pytest.raises(RowError, match=r"column 'face': 'zero' is not an integer"):
        AlignRow.from_csv(dict(good, face="zero"))
    with pytest.raises(RowError, match=r"column 'x1': '3,5' is not a number"):
        AlignRow.from_csv(dict(good, x1="3,5"))
    with pytest.raises(RowError, match=r"column 'primary': 'yes' is not 0 or 1"):
        AlignRow.from_csv(dict(good, primary="yes"))
    with pytest.raises(RowError, match=r"column 'similarity'"):
        MergeRow.from_csv(dict(a="x", b="y", similarity="high"))
    assert math.isnan(parse_float("")) and parse_float(" 0.25 ") == 0.25


def test_a_malformed_file_names_path_and_line(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lines = (run / C.ALIGN_MANIFEST).read_text().splitlines(keepends=True)
    cells = next(csv.reader([lines[2]]))
    cells[C.ALIGN_COLUMNS.index("det_score")] = "n/a"
    lines[2] = csv_text(C.ALIGN_COLUMNS, [cells]).split("\n", 1)[1]
    (out / C.ALIGN_MANIFEST).write_text("".join(lines))
    with pytest.raises(ManifestError, match=rf"{out / C.ALIGN_MANIFEST} line 3: column 'det_score': 'n/a'"):
        Workspace(out).align_rows()
    # through the CLI: one line, exit 1, no traceback
    res = CliRunner().invoke(cli, ["clean", str(out)])
    assert res.exit_code == 1 and "line 3: column 'det_score'" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["pack", str(out), str(tmp_path / "d")])
    assert res.exit_code == 1 and "line 3: column 'det_score'" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "d").exists()


def test_a_missing_file_names_path_and_the_stage_to_run(tmp_path):
    ws = Workspace(tmp_path)
    with pytest.raises(MissingFile, match=rf"{tmp_path / C.ALIGN_MANIFEST} not found: run `facecurate align RAW"):
        ws.align_rows()
    with pytest.raises(MissingFile, match=rf"{tmp_path / C.CLEAN_CSV} not found: run `facecurate clean {tmp_path}`"):
        ws.clean_rows()
    with pytest.raises(MissingFile, match="no embedding store"):
        ws.store()
    assert ws.align_meta() == {} and ws.raw_dir() is None and ws.crop_size() is None


def test_a_clean_csv_without_needed_columns_is_refused(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / C.CLEAN_CSV).write_text("aligned,identity\na/1.jpg,a\n")
    with pytest.raises(ManifestError, match=r"lacks column\(s\) decision"):
        Workspace(out).clean_rows()
    res = CliRunner().invoke(cli, ["review", str(out)])
    assert res.exit_code == 1 and "lacks column(s) decision, reason, score" in res.output


def test_store_whose_csv_and_npy_disagree_is_refused(run, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    for n in (C.EMBEDDINGS_NPY, C.EMBEDDINGS_CSV, C.EMBEDDINGS_META):
        shutil.copyfile(run / n, out / n)
    st = Workspace(out).store()
    assert len(st.rows) == len(st.vecs) and isinstance(st.rows[0], EmbeddingRow) and st.meta["dim"] == 128
    lines = (out / C.EMBEDDINGS_CSV).read_text().splitlines(keepends=True)
    (out / C.EMBEDDINGS_CSV).write_text("".join(lines[:-1]))
    with pytest.raises(ManifestError, match=rf"has {len(lines) - 2} rows but {C.EMBEDDINGS_NPY} {len(lines) - 1}"):
        Workspace(out).store()


# ----------------------------------------------------------------------------- compiled converters
def _reference_cells(row, columns) -> list[str]:
    from facecurate.common.manifests import _CODECS

    return [_CODECS[type(row)._codecs()[c]][1](getattr(row, c)) for c in columns]


def _same_row(a, b) -> bool:
    return _reference_cells(a, a.COLUMNS) == _reference_cells(b, b.COLUMNS)


@pytest.mark.parametrize("cells", [
    ["a/1.jpg", "a", "0", "ok", "1", "a/1_0.jpg", "3.5"],  # short row: the rest reads as missing
    ["a/1.jpg", "a", "3.0", "ok", " 1", "", " 2.5 ", " "],  # the cells only the slow parser takes
    ["a/1.jpg", "a", "", "no_face", "", "", "nan", "inf", "-inf", "-0.0", "1e3"],
    ["a/1.jpg", "a", "-1", "ok", "0", "x", *["1.25"] * 19, "640", "480", "dlib", "m", "extra cell"],
])
def test_the_compiled_reader_gives_from_csv_rows(cells):
    """Row.reader (positional, compiled) equals from_csv on csv.DictReader's dict for
    the same row, also for the rows the fast path hands to the slow one."""
    header = list(C.ALIGN_COLUMNS)
    fast = AlignRow.reader(header)(cells)
    slow = AlignRow.from_csv(next(csv.DictReader(io.StringIO(csv_text(header, [cells]), newline=""))))
    assert _same_row(fast, slow) and fast.face == slow.face and fast.primary == slow.primary
    # a header in another order, with a column missing and one repeated (the last one counts)
    header2 = ["identity", "source", "face", "face", "status"]
    fast = AlignRow.reader(header2)(["a", "a/1.jpg", "7", "2", "ok"])
    assert (fast.identity, fast.source, fast.face, fast.status, fast.aligned) == ("a", "a/1.jpg", 2, "ok", "")


def test_the_compiled_reader_raises_the_same_row_errors():
    read = AlignRow.reader(C.ALIGN_COLUMNS)
    with pytest.raises(RowError, match=r"column 'face': 'zero' is not an integer"):
        read(["a/1.jpg", "a", "zero", "ok"])
    with pytest.raises(RowError, match=r"column 'primary': 'yes' is not 0 or 1"):
        read(["a/1.jpg", "a", "0", "ok", "yes"])
    with pytest.raises(RowError, match=r"column 'x1': '3,5' is not a number"):
        read(["a/1.jpg", "a", "0", "ok", "1", "x", "3,5"])


def test_the_compiled_writer_formats_as_format_float():
    """One % operation per row gives each float cell format_float's text (NaN empty,
    -0.0000 without its sign), ints and flags as the reference codecs."""
    from facecurate.common.files import format_float

    vals = [math.nan, -0.0, 0.0, -0.00004, -0.00005, -0.00006, 0.00005, -1.23456, 123.99995, 1e20, math.inf,
            -math.inf, -0.5, 2.0000499]
    for v in vals:
        assert MergeRow(a="x", b="y", similarity=v).to_csv() == ["x", "y", format_float(v)]
    row = CleanRow(identity="nan", aligned="-0.0000", decision="keep", reason="centre", score=-0.00001, cluster=0,
                   face=3, primary=False, x1=math.nan, y1=-0.0, key=None)
    assert row.to_csv() == _reference_cells(row, C.CLEAN_COLUMNS)
    assert row.to_csv()[:4] == ["", "nan", "3", "-0.0000"]  # text cells are never touched
    rec = row.replace(key=12, label=3)
    assert rec.to_csv(C.REC_CLEAN_COLUMNS) == _reference_cells(rec, C.REC_CLEAN_COLUMNS)


def test_the_streaming_store_writer_equals_the_whole_store_and_is_atomic(tmp_path):
    """store_writer, piece by piece, leaves the bytes write_store leaves; a writer
    that fails (or gets fewer rows than announced) leaves no file behind."""
    import io as _io

    import numpy as np

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((5, 4)).astype(np.float32)
    rows = [EmbeddingRow(aligned=f"rec:{i}", source=f"train.rec:{i}", identity=str(i % 2), face="0") for i in range(5)]
    whole, streamed = Workspace(tmp_path / "a"), Workspace(tmp_path / "b")
    whole.out.mkdir()
    streamed.out.mkdir()
    buf = _io.BytesIO()
    np.save(buf, vecs)
    whole.write_store(buf.getvalue(), rows)
    with streamed.store_writer(5, 4) as w:
        w.add(vecs[:2], rows[:2])
        w.add(vecs[2:], [r.to_csv() for r in rows[2:]])
    for n in (C.EMBEDDINGS_NPY, C.EMBEDDINGS_CSV):
        assert (whole.path(n)).read_bytes() == (streamed.path(n)).read_bytes()
    assert [tuple(r) for r in streamed.store_columns("aligned", "identity")] == [(r.aligned, r.identity) for r in rows]
    bad = Workspace(tmp_path / "c")
    bad.out.mkdir()
    with pytest.raises(ValueError, match="3 rows given for a store of 5"):
        with bad.store_writer(5, 4) as w:
            w.add(vecs[:3], rows[:3])
    assert sorted(p.name for p in bad.out.iterdir()) == []


def test_a_cut_off_csv_is_refused_naming_the_line(tmp_path):
    """A row with fewer cells than the header (a file cut off by a full disk or an
    interrupted copy) is a ManifestError naming the file and line, not a row whose
    missing cells silently read as empty."""
    full = ["a/1.jpg", "a", "0", "ok", "1", "a/1_0.jpg", *["1.25"] * 19, "640", "480", "dlib", ""]
    text = csv_text(list(C.ALIGN_COLUMNS), [full, full[:7]])
    (tmp_path / C.ALIGN_MANIFEST).write_text(text.rstrip("\n"))
    with pytest.raises(ManifestError, match=r"align.csv line 3: 7 cells, \d+ columns \(truncated or corrupt"):
        Workspace(tmp_path).align_rows()
