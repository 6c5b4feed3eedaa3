"""review: the HTML contact sheet and review.csv, `review apply`, and the page in a
real headless Chromium (buttons, keyboard, CSV export, apply round trip).

The crops are real: dlib HOG + 5 landmarks + ArcFace warp (facecurate.align.align) on a
few identity folders of the shared photos. clean.csv is written here by hand so the
tests do not depend on clean's thresholds: per identity the faces get falling
scores, the top ones kept, the middle ones sent to review, the last ones dropped."""

from __future__ import annotations

import base64
import csv
import io
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest
from click.testing import CliRunner

from facecurate.common import constants as C
from facecurate.cli.review import review as review_cli
from facecurate.common.files import format_float, read_csv, write_csv_atomic
from facecurate.common.manifests import CleanRow, IdentityRow
from facecurate.common.workspace import Workspace
from facecurate.review.review import apply_decisions, build_sections, write_review

IDENTITIES = ("id00", "id01", "id02", "id03")


def align_subset(photos_dir: Path, root: Path, identities=IDENTITIES) -> Path:
    """Real crops of a few identity folders (RAW holds copies of the shared photos)."""
    from facecurate.align.align import AlignConfig, run_align

    raw = root / "raw"
    raw.mkdir(parents=True)
    for ident in identities:
        shutil.copytree(photos_dir / ident, raw / ident)
    out = root / "out"
    run_align(raw, out, AlignConfig(fallback="none"), workers=1, show_progress=False)
    return out


def write_clean_by_hand(out: Path) -> list[dict]:
    """clean.csv from align.csv: per identity, scores 0.95, 0.88, ... in source order;
    >= 0.8 keep (centre), < 0.55 drop (far_from_centre), between: review (uncertain)."""
    rows = [r for r in read_csv(out / C.ALIGN_MANIFEST) if r["aligned"]]
    rows.sort(key=lambda r: (r["identity"], r["source"], int(r["face"])))
    res, rank = [], {}
    for r in rows:
        i = rank[r["identity"]] = rank.get(r["identity"], -1) + 1
        s = 0.95 - 0.07 * i
        d, why = ("keep", "centre") if s >= 0.8 else (("drop", "far_from_centre") if s < 0.55 else
                                                       ("review", "uncertain"))
        res.append(dict(r, decision=d, reason=why, score=format_float(s), cluster=0, duplicate_of="",
                        previous_decision="", previous_reason=""))
    write_csv_atomic(out / C.CLEAN_CSV, C.CLEAN_COLUMNS, res)
    return read_csv(out / C.CLEAN_CSV)


@pytest.fixture(scope="module")
def aligned(photos_dir, tmp_path_factory) -> Path:
    out = align_subset(photos_dir, tmp_path_factory.mktemp("review"))
    assert (out / C.ALIGN_MANIFEST).exists()
    return out


@pytest.fixture
def run_dir(aligned, tmp_path) -> Path:
    """A private copy of the aligned OUT with a fresh hand-written clean.csv."""
    out = tmp_path / "out"
    shutil.copytree(aligned, out, symlinks=True)
    write_clean_by_hand(out)
    return out


def _review_rows(out: Path) -> list[dict]:
    return [r for r in read_csv(out / C.CLEAN_CSV) if r["decision"] == "review"]


# ----------------------------------------------------------------------------- the sheet
def test_sheet_holds_every_review_face_with_its_real_crop(run_dir, photos_dir):
    clean = read_csv(run_dir / C.CLEAN_CSV)
    want = _review_rows(run_dir)
    assert len(want) >= 8 and len({r["identity"] for r in want}) == len(IDENTITIES)
    summary = write_review(run_dir, references=3)
    assert summary["review_faces"] == len(want) and summary["missing_crops"] == 0

    table = read_csv(run_dir / C.REVIEW_CSV)
    assert list(table[0]) == list(C.REVIEW_COLUMNS)
    assert sorted(r["aligned"] for r in table) == sorted(r["aligned"] for r in want)
    assert all(r["decision"] == "" for r in table)
    ids = [r["identity"] for r in table]
    assert len({i for i, j in zip(ids, ids[1:]) if i != j}) == len(set(ids)) - 1  # grouped per identity

    page = (run_dir / C.REVIEW_HTML).read_text(encoding="utf-8")
    # self-contained: no external resources at all
    assert not re.search(r'(src|href)="(https?:|//)', page) and "<link" not in page
    assert page.count('<section id="s') == len(IDENTITIES)
    cards = re.findall(r'<figure class="card"[^>]*data-aligned="([^"]+)"[^>]*>(.*?)</figure>', page)
    assert [a for a, _ in cards] == [r["aligned"] for r in table]
    for aligned, body in cards:
        uri = re.search(r'data-src="data:image/jpeg;base64,([^"]+)"', body).group(1)
        assert base64.b64decode(uri) == (run_dir / aligned).read_bytes()
        row = next(r for r in want if r["aligned"] == aligned)
        assert f'<span class="score">{format_float(float(row["score"]), 3)}</span>' in body
        assert '<span class="reason">uncertain</span>' in body
        src = re.search(r'<a class="src" href="file://([^"]+)"', body).group(1)  # the source photo
        linked = Path(urllib.parse.unquote(src))  # RAW's copy of the shared photo
        assert linked.as_posix().endswith("/" + row["source"])
        assert linked.read_bytes() == (photos_dir / row["source"]).read_bytes()
    # references: the 3 highest-scoring kept faces of each identity
    sections = build_sections([CleanRow.from_csv(r) for r in clean], references=3)
    for s in sections:
        kept = sorted((r for r in clean if r["identity"] == s.identity and r["decision"] == "keep"),
                      key=lambda r: -float(r["score"]))[:3]
        assert [r.aligned for r in s.references] == [r["aligned"] for r in kept]
    assert page.count('<figure class="ref"') == sum(len(s.references) for s in sections)
    # deterministic
    first = (run_dir / C.REVIEW_HTML).read_bytes(), (run_dir / C.REVIEW_CSV).read_bytes()
    write_review(run_dir, references=3)
    assert ((run_dir / C.REVIEW_HTML).read_bytes(), (run_dir / C.REVIEW_CSV).read_bytes()) == first


def test_review_faces_and_identities_in_the_budgets_priority():
    """clean's budget order, not the cluster: identity candidates, occluded faces, then the
    rest by score; identities flagged lost, then weak_majority, then by their first face."""
    def face(ident, i, reason, score, cluster=0, decision="review"):
        return dict(identity=ident, aligned=f"{ident}/{i}.jpg", decision=decision, reason=reason,
                    score=str(score), cluster=str(cluster))
    rows = [face("a", 0, "uncertain", 0.5, 1), face("a", 1, "uncertain", 0.7), face("a", 2, "occluded", 0.3, 1),
            face("a", 3, "near_other_identity", 0.99), face("a", 4, "identity_candidate", 0.2, -1),
            face("a", 5, "identity_candidate", 0.25, 2), face("a", 6, "uncertain", "nan"),
            face("a", 7, "ambiguous_identity", 0.8), face("a", "k", "centre", 0.95, decision="keep")]
    rows += [face("b", 0, "uncertain", 0.95), face("c", 0, "uncertain", 0.6), face("c", 1, "identity_candidate", 0.1),
             face("d", 0, "occluded", 0.2), face("d", 1, "uncertain", 0.97), face("e", 0, "uncertain", 0.4),
             face("f", 0, "uncertain", 0.9), face("g", 0, "uncertain", 0.9), face("h", 0, "identity_candidate", 0.3)]
    flags = {"c": "weak_majority", "e": "lost", "g": "lost"}
    secs = build_sections([CleanRow.from_csv(r) for r in rows], references=2, flags=flags)
    a = next(s for s in secs if s.identity == "a")
    assert [r.aligned.split("/")[1] for r in a.review] == ["5.jpg", "4.jpg", "2.jpg", "3.jpg", "7.jpg", "1.jpg",
                                                         "0.jpg", "6.jpg"]
    assert [r.aligned for r in a.references] == ["a/k.jpg"] and a.kept == 1
    # lost (by first face), weak_majority, then the rest: candidates, occluded, the band by score
    assert [s.identity for s in secs] == ["g", "e", "c", "h", "a", "d", "b", "f"]
    assert [s.flag for s in secs] == ["lost", "lost", "weak_majority", "", "", "", "", ""]
    assert [s.identity for s in build_sections([CleanRow.from_csv(r) for r in rows])] == \
        ["h", "a", "c", "d", "b", "f", "g", "e"]  # without identities.csv: the faces' reasons alone


def _assert_budget_order(table: list[dict], flags: dict[str, str]) -> None:
    """review.csv rows in clean's budget order: identities whole, lost before weak_majority
    before the rest, faces by reason rank then score (highest first)."""
    rank = C.REVIEW_PRIORITY
    key = [(rank.get(r["reason"], rank["uncertain"]), -float(r["score"])) for r in table]
    ids = [r["identity"] for r in table]
    starts = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    assert len(starts) == len(set(ids))  # each identity in one block
    tiers = [C.AT_RISK_FLAGS.index(flags[ids[i]]) if ids[i] in flags else 2 for i in starts]
    assert tiers == sorted(tiers)
    for t in set(tiers):  # within a tier: by the identity's first face
        firsts = [key[i] for i, ti in zip(starts, tiers) if ti == t]
        assert firsts == sorted(firsts)
    for b, e in zip(starts, starts[1:] + [len(ids)]):
        assert key[b:e] == sorted(key[b:e])


def test_page_and_csv_follow_clean_budget_on_a_real_run(aligned, tmp_path):
    """The real embed + clean on the real crops, with a band so high that identities keep
    nothing or little (flagged lost / weak_majority, their best faces identity
    candidates): review.csv and the page put those first, as clean's budget does."""
    from facecurate.clean.clean import run_clean

    out = tmp_path / "out"
    shutil.copytree(aligned, out, symlinks=True)
    run_clean(out, show_progress=False, workers=1, max_review=1.0, model_overrides=dict(keep=0.992, drop=0.98))
    flags = {r.identity: f for r in Workspace(out).identities() for f in C.AT_RISK_FLAGS if f in r.flag_list}
    clean = read_csv(out / C.CLEAN_CSV)
    cand = [r for r in clean if r["reason"] == "identity_candidate"]
    # the run is one the old order (by name, then cluster and score) got wrong
    assert flags and cand and set(flags) != set(sorted({r["identity"] for r in _review_rows(out)})[:len(flags)])
    assert any(float(r["score"]) > float(c["score"]) for c in cand for r in _review_rows(out)
               if r["identity"] == c["identity"] and r["reason"] == "uncertain")
    s = write_review(out)
    table = read_csv(out / C.REVIEW_CSV)
    assert sorted(r["aligned"] for r in table) == sorted(r["aligned"] for r in _review_rows(out))
    _assert_budget_order(table, flags)
    assert table[0]["identity"] in flags and table[0]["reason"] == "identity_candidate"
    assert s["at_risk"] == len(flags) and s["identities_note"] == ""
    page = (out / C.REVIEW_HTML).read_text(encoding="utf-8")
    assert re.findall(r'<figure class="card"[^>]*data-aligned="([^"]+)"', page) == [r["aligned"] for r in table]
    heads = re.findall(r'<section id="s\d+" data-identity="([^"]+)"><h2>[^<]*(<span class="flag"[^>]*>([^<]*))?',
                       page)
    assert [(i, f) for i, _, f in heads] == [(i, flags.get(i, "")) for i in dict.fromkeys(r["identity"] for r in table)]


def test_page_marks_occluded_faces_and_flagged_identities(run_dir):
    """Real crops, reasons and flags written by hand: a weak_majority and a lost identity
    come first (lost first), an occluded face is marked and ahead of the band, whatever
    its score; without identities.csv the page says so and orders by the faces alone."""
    rows = read_csv(run_dir / C.CLEAN_CSV)
    band = {i: [r for r in rows if r["identity"] == i and r["decision"] == "review"] for i in IDENTITIES}
    band["id01"][-1]["reason"] = "occluded"  # its lowest-scoring review face
    band["id02"][-1]["reason"] = "identity_candidate"
    write_csv_atomic(run_dir / C.CLEAN_CSV, C.CLEAN_COLUMNS, rows)
    res = CliRunner().invoke(review_cli, [str(run_dir), "--page-size", "1"])
    assert res.exit_code == 0 and "warning: identities.csv not found" in res.stderr
    order = [r["identity"] for r in read_csv(run_dir / C.REVIEW_CSV)]
    assert list(dict.fromkeys(order)) == ["id02", "id01", "id00", "id03"]
    Workspace(run_dir).write_identities([IdentityRow(identity="id03", flags="merge_candidate;weak_majority"),
                                         IdentityRow(identity="id00", flags="lost"), IdentityRow(identity="id01")])
    s = write_review(run_dir, page_size=1)
    table = read_csv(run_dir / C.REVIEW_CSV)
    assert list(dict.fromkeys(r["identity"] for r in table)) == ["id00", "id03", "id02", "id01"]
    _assert_budget_order(table, {"id00": "lost", "id03": "weak_majority"})
    id01 = [r for r in table if r["identity"] == "id01"]
    assert id01[0]["aligned"] == band["id01"][-1]["aligned"] and float(id01[0]["score"]) < float(id01[1]["score"])
    # page 1 holds the most valuable identity, marked as the report marks it
    first = (run_dir / C.REVIEW_HTML).read_text(encoding="utf-8")
    assert s["at_risk"] == 2 and s["identities_note"] == ""
    assert re.search(r'data-identity="id00"><h2>id00 <span class="flag" title="[^"]+">lost</span>', first)
    assert '<span class="flag"' in first.split("<nav>")[1].split("</nav>")[0]
    pages = [(run_dir / f"review-{k}.html").read_text(encoding="utf-8") for k in range(2, s["pages"] + 1)]
    page = next(p for p in pages if 'data-identity="id01"' in p)
    assert page.count('<span class="reason first"') == 1 and "&#9650; occluded</span>" in page
    assert '<span class="reason">uncertain</span>' in page


def test_missing_crop_becomes_a_placeholder_not_a_crash(run_dir):
    victim = _review_rows(run_dir)[0]["aligned"]
    (run_dir / victim).unlink()
    res = CliRunner().invoke(review_cli, [str(run_dir), "--json"])
    assert res.exit_code == 0, res.output
    assert "1 crop file(s) missing" in res.stderr
    page = (run_dir / C.REVIEW_HTML).read_text()
    assert f'title="{victim}">missing crop<' in page
    assert len(read_csv(run_dir / C.REVIEW_CSV)) == len(_review_rows(run_dir))


def test_cli_default_subcommand_and_clear_errors(run_dir, tmp_path):
    runner = CliRunner()
    res = runner.invoke(review_cli, [str(run_dir), "--references", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert '"review_faces": %d' % len(_review_rows(run_dir)) in res.stdout
    assert "apply" in runner.invoke(review_cli, ["--help"]).output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(review_cli, [str(empty)])
    assert res.exit_code == 1 and "clean.csv not found" in res.output and "facecurate clean" in res.output
    assert not (empty / C.REVIEW_HTML).exists()


def test_nothing_to_review_still_writes_a_page(run_dir):
    rows = read_csv(run_dir / C.CLEAN_CSV)
    for r in rows:
        if r["decision"] == "review":
            r["decision"] = "keep"
    write_csv_atomic(run_dir / C.CLEAN_CSV, C.CLEAN_COLUMNS, rows)
    assert write_review(run_dir)["review_faces"] == 0
    assert "Nothing to review" in (run_dir / C.REVIEW_HTML).read_text()
    assert read_csv(run_dir / C.REVIEW_CSV) == []


def test_pages_split_between_identities_and_stale_pages_go(run_dir):
    want = _review_rows(run_dir)
    s = write_review(run_dir, page_size=3)
    names = [C.REVIEW_HTML] + [f"review-{k}.html" for k in range(2, s["pages"] + 1)]
    assert s["pages"] >= 2 and all((run_dir / n).exists() for n in names)
    seen, seen_ids = [], []
    for k, name in enumerate(names, 1):
        page = (run_dir / name).read_text()
        cards = re.findall(r'<figure class="card"[^>]*data-aligned="([^"]+)" data-identity="([^"]+)"', page)
        ids = sorted({i for _, i in cards})
        assert len(cards) <= 3 or len(ids) == 1  # over-size identities get a page of their own
        assert not set(ids) & set(seen_ids)  # an identity is never split
        seen += [a for a, _ in cards]
        seen_ids += ids
        assert f"page {k} of {len(names)}" in page and f'"download": "review-decisions-{k}.csv"' in page
    assert sorted(seen) == sorted(r["aligned"] for r in want)
    assert write_review(run_dir)["pages"] == 1
    assert not (run_dir / "review-2.html").exists() and "page 1 of" not in (run_dir / C.REVIEW_HTML).read_text()


# ----------------------------------------------------------------------------- apply
def _fill(out: Path, choose) -> Path:
    """review.csv with decisions filled in by ``choose(i, row)`` ('' = undecided)."""
    rows = read_csv(out / C.REVIEW_CSV)
    for i, r in enumerate(rows):
        r["decision"] = choose(i, r)
    path = out / "filled.csv"
    write_csv_atomic(path, C.REVIEW_COLUMNS, rows)
    return path


def test_apply_round_trip_audit_and_idempotence(run_dir):
    write_review(run_dir)
    before = read_csv(run_dir / C.CLEAN_CSV)
    filled = _fill(run_dir, lambda i, r: ("keep", "drop", "")[i % 3])
    res = CliRunner().invoke(review_cli, ["apply", str(run_dir), str(filled), "--json"])
    assert res.exit_code == 0, res.output
    after = read_csv(run_dir / C.CLEAN_CSV)
    table = read_csv(filled)
    want = {r["aligned"]: r["decision"] for r in table if r["decision"]}
    assert len(want) >= 5
    for b, a in zip(before, after):
        assert b["aligned"] == a["aligned"]
        if a["aligned"] in want:
            assert (a["decision"], a["reason"]) == (want[a["aligned"]], "manual")
            assert (a["previous_decision"], a["previous_reason"]) == ("review", "uncertain")
            assert {k: v for k, v in a.items() if k not in ("decision", "reason", "previous_decision",
                                                            "previous_reason")} == \
                   {k: v for k, v in b.items() if k not in ("decision", "reason", "previous_decision",
                                                            "previous_reason")}
        else:
            assert a == b
    left = sum(1 for r in after if r["decision"] == "review")
    assert left == len(table) - len(want)
    assert f'"review_left": {left}' in res.stdout

    # applying the same file again changes nothing, byte for byte
    once = (run_dir / C.CLEAN_CSV).read_bytes()
    s = apply_decisions(run_dir, filled)
    assert s["changed"] == 0 and s["unchanged"] == len(want) and not s["written"]
    assert (run_dir / C.CLEAN_CSV).read_bytes() == once

    # a person changes their mind: the audit still shows clean's original decision
    flip = next(a for a, d in want.items() if d == "keep")
    path = run_dir / "flip.csv"
    path.write_text(f"aligned,identity,decision\n{flip},{flip.split('/')[0]},DROP\n")
    assert apply_decisions(run_dir, path)["changed"] == 1
    row = next(r for r in read_csv(run_dir / C.CLEAN_CSV) if r["aligned"] == flip)
    assert (row["decision"], row["reason"], row["previous_decision"], row["previous_reason"]) == \
           ("drop", "manual", "review", "uncertain")


def test_apply_lists_bad_rows_applies_the_rest_and_strict_applies_nothing(run_dir):
    rev = _review_rows(run_dir)
    a0, a1, a2, a3 = (r["aligned"] for r in rev[:4])
    other = next(i for i in IDENTITIES if i != rev[2]["identity"])
    text = ("aligned,identity,decision\n"
            f"{a0},{rev[0]['identity']},keep\n"  # line 2: fine
            "nobody/ghost_0.jpg,nobody,keep\n"  # line 3: unknown crop
            f"{a1},{rev[1]['identity']},maybe\n"  # line 4: invalid decision
            f"{a2},{other},drop\n"  # line 5: wrong identity
            f"{a3},,keep\n"  # line 6: fine (identity optional)
            f"{a3},,drop\n")  # line 7: contradicts line 6 -> a3 not applied
    path = run_dir / "bad.csv"
    path.write_text(text)
    pristine = (run_dir / C.CLEAN_CSV).read_bytes()

    runner = CliRunner()
    res = runner.invoke(review_cli, ["apply", str(run_dir), str(path), "--strict"])
    assert res.exit_code == 1
    assert (run_dir / C.CLEAN_CSV).read_bytes() == pristine
    assert "--strict" in res.stderr

    res = runner.invoke(review_cli, ["apply", str(run_dir), str(path)])
    assert res.exit_code == 1
    err = res.stderr
    assert "line 3: nobody/ghost_0.jpg: not in clean.csv" in err
    assert f"line 4: {a1}: invalid decision 'maybe'" in err
    assert f"line 5: {a2}: identity '{other}' does not match" in err
    assert f"line 7: {a3}: contradicts line 6 (keep)" in err
    after = {r["aligned"]: r for r in read_csv(run_dir / C.CLEAN_CSV)}
    assert (after[a0]["decision"], after[a0]["reason"]) == ("keep", "manual")
    for a in (a1, a2, a3):
        assert (after[a]["decision"], after[a]["reason"]) == ("review", "uncertain")


def test_apply_several_files_and_contradictions_between_them(run_dir):
    rev = _review_rows(run_dir)
    (run_dir / "p1.csv").write_text(f"aligned,decision\n{rev[0]['aligned']},keep\n{rev[1]['aligned']},drop\n")
    (run_dir / "p2.csv").write_text(f"aligned,decision\n{rev[2]['aligned']},drop\n{rev[1]['aligned']},keep\n")
    s = apply_decisions(run_dir, [run_dir / "p1.csv", run_dir / "p2.csv"])
    assert s["problems"] == [f"p2.csv line 3: {rev[1]['aligned']}: contradicts p1.csv line 3 (drop)"]
    after = {r["aligned"]: r["decision"] for r in read_csv(run_dir / C.CLEAN_CSV)}
    assert [after[r["aligned"]] for r in rev[:3]] == ["keep", "review", "drop"]


def test_apply_dry_run_counts_but_writes_nothing(run_dir):
    write_review(run_dir)
    filled = _fill(run_dir, lambda i, r: "keep")
    pristine = (run_dir / C.CLEAN_CSV).read_bytes()
    res = CliRunner().invoke(review_cli, ["apply", str(run_dir), str(filled), "--dry-run", "--json"])
    assert res.exit_code == 0 and '"changed": %d' % len(read_csv(filled)) in res.stdout
    assert '"written": false' in res.stdout and '"review_left": 0' in res.stdout
    assert (run_dir / C.CLEAN_CSV).read_bytes() == pristine


def test_apply_refuses_a_file_without_the_needed_columns(run_dir):
    path = run_dir / "nohead.csv"
    path.write_text("path,choice\nid00/img1_0.jpg,keep\n")
    pristine = (run_dir / C.CLEAN_CSV).read_bytes()
    res = CliRunner().invoke(review_cli, ["apply", str(run_dir), str(path)])
    assert res.exit_code == 1 and "needs a header with columns 'aligned' and 'decision'" in res.output
    assert (run_dir / C.CLEAN_CSV).read_bytes() == pristine


#: One identity name per folder of the run, each holding what a CSV or an HTML page
#: could lose: CR LF, quotes and a comma; U+2028 and a tab; edge spaces; a formula
#: start with a right-to-left override.
WEIRD = ('new\r\nline, "quoted"', "sep\u2028arator\ttab", " lead and trail ", '=HYPERLINK("x")\u202eevil')


@pytest.fixture
def weird_run(run_dir) -> Path:
    for old, new in zip(IDENTITIES, WEIRD):
        _rename_identity(run_dir, old, new)
    return run_dir


def test_apply_takes_back_every_name_exactly(weird_run):
    write_review(weird_run)
    text = (weird_run / C.REVIEW_CSV).read_text(encoding="utf-8")
    assert '\n"\'=HYPERLINK(""x"")' in text and '\n"=HYPERLINK' not in text  # no formula for a spreadsheet
    filled = _fill(weird_run, lambda i, r: ("keep", "drop")[i % 2])  # saved back as a spreadsheet would
    table = read_csv(weird_run / C.REVIEW_CSV)
    assert {r["identity"].lstrip("'") for r in table} == set(WEIRD)
    s = apply_decisions(weird_run, filled)
    assert s["problems"] == [] and s["accepted"] == s["changed"] == len(table) >= 8
    after = {r["aligned"]: r for r in read_csv(weird_run / C.CLEAN_CSV)}
    for i, r in enumerate(table):
        a = r["aligned"][1:] if r["aligned"].startswith("'") else r["aligned"]
        assert (after[a]["decision"], after[a]["reason"]) == (("keep", "drop")[i % 2], "manual")


def test_apply_names_a_bad_line_and_reports_unknown_undecided_rows(run_dir):
    rev = _review_rows(run_dir)
    path = run_dir / "bad.csv"
    path.write_text(f"aligned,decision\n{rev[0]['aligned']},keep\n"
                    f"ghost/x_0.jpg,\n"  # line 3: unknown and undecided: still reported
                    f'"{rev[1]["aligned"]},drop\n{rev[2]["aligned"]},keep\n')  # line 4: a quote never closed
    res = CliRunner().invoke(review_cli, ["apply", str(run_dir), str(path)])
    assert res.exit_code == 1
    assert "line 3: ghost/x_0.jpg: not in clean.csv" in res.stderr
    assert "line 4: not a valid CSV row" in res.stderr
    after = {r["aligned"]: r["decision"] for r in read_csv(run_dir / C.CLEAN_CSV)}
    assert [after[r["aligned"]] for r in rev[:3]] == ["keep", "review", "review"]


def test_apply_dry_run_says_would_change(run_dir):
    rev = _review_rows(run_dir)
    path = run_dir / "d.csv"
    path.write_text(f"aligned,decision\n{rev[0]['aligned']},keep\n")
    res = CliRunner().invoke(review_cli, ["apply", str(run_dir), str(path), "--dry-run"])
    assert res.exit_code == 0
    assert res.stdout.splitlines()[0].startswith("review apply: 1 decision(s) would change (--dry-run")
    res = CliRunner().invoke(review_cli, ["apply", str(run_dir), str(path)])
    assert res.stdout.splitlines()[0].startswith("review apply: 1 decision(s) changed in ")


def test_names_on_the_terminal_are_shown_escaped(run_dir):
    path = run_dir / "d.csv"
    path.write_text("aligned,decision\n\x1b]0;owned\x07gh\u202eost/x_0.jpg,keep\n", encoding="utf-8")
    res = CliRunner().invoke(review_cli, ["apply", str(run_dir), str(path)])
    assert res.exit_code == 1
    assert "\x1b" not in res.stderr and "\x07" not in res.stderr and "\u202e" not in res.stderr
    assert "line 2: \\x1b]0;owned\\x07gh\\u202eost/x_0.jpg: not in clean.csv" in res.stderr


def test_review_page_shows_names_escaped_and_keeps_them_exact_for_export(weird_run):
    rows = read_csv(weird_run / C.CLEAN_CSV)
    next(r for r in rows if r["decision"] == "review")["cluster"] = 2  # a face of a smaller group
    write_csv_atomic(weird_run / C.CLEAN_CSV, C.CLEAN_COLUMNS, rows)
    write_review(weird_run)
    page = (weird_run / C.REVIEW_HTML).read_text(encoding="utf-8")
    assert page.count(">cluster 2</span>") == 1 and 'title="clean groups an identity' in page
    assert "\u202e" not in page and "\u2028" not in page and "\r" not in page
    assert "<h2>=HYPERLINK(&quot;x&quot;)\\u202eevil <small>" in page  # shown, not obeyed
    assert 'data-identity="new&#xd;\nline, &quot;quoted&quot;"' in page  # exact for the export
    assert ">cluster 0<" not in page and ">c2<" not in page


# ----------------------------------------------------------------------------- browser
def _chromium():
    """(chromium, chromedriver) or skip/fail: CI must run the browser test."""
    chromium = os.environ.get("FACECURATE_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = os.environ.get("FACECURATE_CHROMEDRIVER") or shutil.which("chromedriver")
    problem = None
    if not chromium or not driver:
        problem = "chromium and chromedriver not found (apt-get install chromium chromium-driver)"
    else:
        try:
            import selenium  # noqa: F401
        except ImportError:
            problem = "the selenium package is not installed"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem + " -- CI must run the browser test", pytrace=False)
        pytest.skip(problem)
    return chromium, driver


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="fc-chromium-", dir=tmp_path)
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        yield drv
    finally:
        drv.quit()


def _wait(fn, timeout=20.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = fn()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _rename_identity(out: Path, old: str, new: str) -> None:
    (out / old).rename(out / new)
    rows = read_csv(out / C.CLEAN_CSV)
    for r in rows:
        if r["identity"] == old:
            r["identity"] = new
            r["aligned"] = new + r["aligned"][len(old):]
            r["source"] = new + r["source"][len(old):]
    write_csv_atomic(out / C.CLEAN_CSV, C.CLEAN_COLUMNS, rows)


AWKWARD = 'O\'Brien & <Co>, "Ltd"'


@pytest.mark.browser
def test_review_page_in_headless_chromium(browser, run_dir, tmp_path):
    from selenium.webdriver.common.by import By

    # the last identity gets a name that needs HTML escaping and CSV quoting
    _rename_identity(run_dir, IDENTITIES[-1], IDENTITIES[-1] + AWKWARD)
    write_review(run_dir, references=4)
    assert "<Co>" not in (run_dir / C.REVIEW_HTML).read_text()  # escaped everywhere
    want = read_csv(run_dir / C.REVIEW_CSV)
    n = len(want)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    browser.get((run_dir / C.REVIEW_HTML).resolve().as_uri())

    cards = browser.find_elements(By.CSS_SELECTOR, "figure.card")
    assert len(cards) == n
    assert [c.get_attribute("data-aligned") for c in cards] == [r["aligned"] for r in want]
    # lazy images: bring every card into view, then every image (references too) must be decoded
    for c in cards:
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", c)
    n_img = browser.execute_script("return document.images.length")
    assert n_img == n + browser.execute_script("return document.querySelectorAll('figure.ref').length") > n
    _wait(lambda: browser.execute_script(
        "return Array.from(document.images).every(i => i.complete && i.naturalWidth === 112)"),
        what="all crops to decode at 112 px")
    assert browser.find_element(By.ID, "progress").text == f"0 / {n} decided"

    def click(i, what):
        b = cards[i].find_element(By.CSS_SELECTOR, f"button.{what}")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", b)
        b.click()

    click(0, "keep")
    click(1, "drop")
    click(2, "keep")
    click(2, "drop")  # changes its mind: drop wins
    click(3, "keep")
    click(3, "keep")  # second click undoes
    # keyboard: focus card 4, press d (drop) -> focus moves to card 5, press k (keep)
    browser.execute_script("arguments[0].focus()", cards[4])
    cards[4].send_keys("d")
    assert browser.switch_to.active_element.get_attribute("data-aligned") == want[5]["aligned"]
    browser.switch_to.active_element.send_keys("k")

    classes = [c.get_attribute("class") for c in cards]
    assert classes[0] == "card keep" and classes[1] == "card drop" and classes[2] == "card drop"
    assert classes[3] == "card" and classes[4] == "card drop" and classes[5] == "card keep"
    assert all(c == "card" for c in classes[6:])
    assert browser.find_element(By.ID, "progress").text == f"5 / {n} decided"
    expected = {want[0]["aligned"]: "keep", want[1]["aligned"]: "drop", want[2]["aligned"]: "drop",
                want[4]["aligned"]: "drop", want[5]["aligned"]: "keep"}
    # "drop all" in the last identity's section decides its cards, and only those
    last = browser.find_elements(By.CSS_SELECTOR, "section")[-1]
    last_cards = [c.get_attribute("data-aligned") for c in last.find_elements(By.CSS_SELECTOR, "figure.card")]
    assert last_cards and not set(last_cards) & set(expected)
    b = last.find_element(By.CSS_SELECTOR, 'button[data-all="drop"]')
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", b)
    b.click()
    assert all(a.startswith(IDENTITIES[-1] + AWKWARD + "/") for a in last_cards)
    expected.update({a: "drop" for a in last_cards})
    assert browser.find_element(By.ID, "progress").text == f"{len(expected)} / {n} decided"
    # "hide decided" hides exactly the decided cards
    browser.execute_script("window.scrollTo(0, 0)")
    browser.find_element(By.ID, "hide").click()
    shown = {c.get_attribute("data-aligned") for c in cards if c.is_displayed()}
    assert shown == {r["aligned"] for r in want} - set(expected)
    browser.find_element(By.ID, "hide").click()

    export = browser.find_element(By.ID, "export")
    browser.execute_script("window.scrollTo(0, 0)")
    export.click()
    target = downloads / "review-decisions.csv"
    _wait(lambda: target.exists() and not list(downloads.glob("*.crdownload")), what="the CSV download")
    text = target.read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert text.splitlines()[0] == "aligned,identity,decision"
    assert {r["aligned"]: r["decision"] for r in rows} == expected
    assert all(r["identity"] == r["aligned"].split("/")[0] for r in rows)
    assert f'"{IDENTITIES[-1]}O\'Brien & <Co>, ""Ltd""/' in text  # RFC 4180 quoting
    assert [r["aligned"] for r in rows] == [r["aligned"] for r in want if r["aligned"] in expected]

    # clicks survive a reload (localStorage), so a person can close the tab and come back
    browser.refresh()
    assert browser.find_element(By.ID, "progress").text == f"{len(expected)} / {n} decided"

    # the exported file goes back into clean.csv
    res = CliRunner().invoke(review_cli, ["apply", str(run_dir), str(target), "--json"])
    assert res.exit_code == 0, res.output
    after = {r["aligned"]: r for r in read_csv(run_dir / C.CLEAN_CSV)}
    for a, d in expected.items():
        assert (after[a]["decision"], after[a]["reason"], after[a]["previous_decision"]) == (d, "manual", "review")
    assert sum(1 for r in after.values() if r["decision"] == "review") == n - len(expected)


@pytest.mark.browser
def test_weird_names_round_trip_through_the_page_in_chromium(browser, weird_run, tmp_path):
    """review -> the page's export in a real browser -> apply: every name comes back
    exactly (CR LF, U+2028, tab, quotes, comma, edge spaces, a formula start)."""
    from selenium.webdriver.common.by import By

    write_review(weird_run)
    want = [r["aligned"] for r in read_csv(weird_run / C.CLEAN_CSV) if r["decision"] == "review"]
    browser.get((weird_run / C.REVIEW_HTML).resolve().as_uri())
    cards = browser.find_elements(By.CSS_SELECTOR, "figure.card")
    assert sorted(c.get_attribute("data-aligned") for c in cards) == sorted(want)
    heads = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "section h2")]
    assert any(h.startswith('=HYPERLINK("x")\\u202eevil') for h in heads)  # shown escaped, not reversed
    for i, c in enumerate(cards):
        b = c.find_element(By.CSS_SELECTOR, "button." + ("keep", "drop")[i % 2])
        browser.execute_script("arguments[0].click()", b)
    text = browser.execute_script("return window.facecurateDecisionsCSV()")
    head, body = text.split("\n", 1)
    rows = list(csv.reader(io.StringIO(body, newline="")))
    again = io.StringIO()
    csv.writer(again, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)
    assert head == "aligned,identity,decision" and again.getvalue() == body  # every field quoted
    assert '"\'=HYPERLINK(""x"")' in text  # the formula start neutralised, as in review.csv
    path = tmp_path / "review-decisions.csv"
    path.write_bytes(text.encode("utf-8"))
    s = apply_decisions(weird_run, path)
    assert s["problems"] == [] and s["accepted"] == s["changed"] == len(want)
    after = {r["aligned"]: r for r in read_csv(weird_run / C.CLEAN_CSV)}
    for i, c in enumerate(cards):
        a = c.get_attribute("data-aligned")
        assert (after[a]["decision"], after[a]["reason"]) == (("keep", "drop")[i % 2], "manual")
