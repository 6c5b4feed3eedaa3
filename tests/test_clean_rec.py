"""Cleaning a packed dataset (issue 14): embed -> clean -> review -> pack on a .rec of
real LFW-dev face crops, in both layouts and with vector labels; checksums
(train.sums, inspect --verify, facecurate checksum).

The .rec fixtures hold five dev identities of four photos each, plus, in the first
identity, an intruder (a photo of the fifth person) and an exact copy of its first
photo: clean must drop the intruder and keep the copy once."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import pytest
from click.testing import CliRunner

from facecurate.pack.checksums import write_sums
from facecurate.cli import main as cli
from facecurate.common.constants import DECISION_DROP, DECISION_KEEP, REASON_DUPLICATE
from facecurate.common.files import read_csv
from facecurate.pack.inspect_rec import inspect
from facecurate.pack.packer import pack
from facecurate.common.recordio import IndexedRecordReader, IndexedRecordWriter, pack_header, pack_record, unpack_record
from test_recordio import _shared, oracle_python

INTRUDER_KEY_TAG = "intruder"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def face_crops(lfw_dir, lfw_dev_ids) -> dict[str, list[bytes]]:
    """identity -> 4 real 112x112 crops (five dev identities with >= 5 photos); a 5th
    crop of the last identity is kept aside as the intruder (key ``intruder``)."""
    from facecurate.align.align import centre_face_jpeg
    from facecurate.models.dlib_models import DlibHOGDetector, DlibLandmarks68

    det, lm = DlibHOGDetector(max_upsample=1), DlibLandmarks68()
    out: dict[str, list[bytes]] = {}
    for ident in lfw_dev_ids:
        files = sorted(os.listdir(lfw_dir / ident))
        if len(files) < 6:
            continue
        crops = []
        for f in files:
            jpg = centre_face_jpeg(cv2.cvtColor(cv2.imread(str(lfw_dir / ident / f)), cv2.COLOR_BGR2RGB), det, lm)
            if jpg is not None:
                crops.append(jpg)
            if len(crops) == 5:
                break
        if len(crops) == 5:
            out[ident] = crops
        if len(out) == 5:
            break
    assert len(out) == 5, "could not make enough real crops"
    names = sorted(out)
    intruder = out[names[-1]].pop()
    for n in names[:-1]:
        out[n].pop()
    out[INTRUDER_KEY_TAG] = [intruder]
    return out


def _records(crops: dict) -> list[tuple[int, bytes, str]]:
    """(label, image bytes, what) in a fixed shuffled order; label = sorted name index.
    The first identity also gets the intruder and a copy of its first crop."""
    names = sorted(k for k in crops if k != INTRUDER_KEY_TAG)
    recs = [(i, b, "genuine") for i, n in enumerate(names) for b in crops[n]]
    recs.append((0, crops[INTRUDER_KEY_TAG][0], "intruder"))
    recs.append((0, crops[names[0]][0], "copy"))
    order = [(i * 7) % len(recs) for i in range(len(recs))]  # 7 is prime to 22: a permutation
    assert len(set(order)) == len(recs)
    return [recs[j] for j in order]


def write_rec(dest: Path, crops: dict, layout: str, vector: bool) -> list[tuple[int, int, bytes, str]]:
    """DEST/train.rec/.idx (+ labels.csv, property) in ``layout`` (plain: keys 0..N-1 in
    the shuffled order; insightface: header, images grouped by class, identity
    records), image labels as vectors ``[label, 0.5]`` when ``vector``. Returns
    (key, label, image bytes, what) per image record."""
    names = sorted(k for k in crops if k != INTRUDER_KEY_TAG)
    recs = _records(crops)
    if layout == "insightface":
        recs = sorted(recs, key=lambda r: r[0])
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    with IndexedRecordWriter(dest / "train.rec", dest / "train.idx") as w:
        first = 0
        if layout == "insightface":
            first = 1
            w.write(0, pack_header([float(len(recs) + 1), float(len(recs) + 1 + len(names))]))
        for i, (lab, data, what) in enumerate(recs):
            key = first + i
            w.write(key, pack_record([float(lab), 0.5] if vector else float(lab), data, id=key))
            out.append((key, lab, data, what))
        if layout == "insightface":
            start = 1
            for c in range(len(names)):
                n = sum(1 for r in recs if r[0] == c)
                w.write(len(recs) + 1 + c, pack_header([float(start), float(start + n)]))
                start += n
    (dest / "labels.csv").write_text("identity,label,images\n" + "".join(
        f"{n},{i},{sum(1 for r in recs if r[0] == i)}\n" for i, n in enumerate(names)))
    (dest / "property").write_text(f"{len(names)},112,112\n")
    return out


@pytest.fixture(scope="session")
def embedded_recs(tmp_path_factory, face_crops) -> dict:
    """Both layouts (plain: scalar labels; insightface: vector labels), each embedded
    with the real dlib model (no flip: half the time, same code path)."""
    from facecurate.embed.embed import run_embed

    out = {}
    for layout, vector in (("plain", False), ("insightface", True)):
        d = tmp_path_factory.mktemp(f"rec_{layout}")
        recs = write_rec(d, face_crops, layout, vector)
        s = run_embed(d / "train.rec", flip=False, workers=2, show_progress=False)
        assert s["failed"] == 0 and s["embedded"] == 22
        out[layout] = (d, recs)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".facecurate"))
    return dst


def _images(prefix: Path) -> list[tuple[int, bytes]]:
    """(label, image bytes) of every image record, the way MXFaceDataset picks them."""
    r = IndexedRecordReader(f"{prefix}.rec", f"{prefix}.idx")
    h0, _ = unpack_record(r.read_idx(0))
    keys = range(1, int(h0.label[0])) if h0.flag > 0 else r.keys
    out = []
    for k in keys:
        h, img = unpack_record(r.read_idx(k))
        out.append((int(h.scalar_label), img))
    r.close()
    return out


def _oracle(prefix: Path) -> dict:
    oracle_python()
    r = subprocess.run([str(_shared() / "tools" / "mxnet-oracle"), str(prefix)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"MXNet rejected {prefix}:\n{r.stderr[-1500:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- clean -> review -> pack
@pytest.mark.slow
@pytest.mark.parametrize("src_layout", ["plain", "insightface"])
def test_clean_review_pack_on_a_rec(embedded_recs, tmp_path, src_layout):
    src, recs = embedded_recs[src_layout]
    dest = _copy(src, tmp_path / "DEST")
    r = CliRunner().invoke(cli, ["clean", str(dest), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["input"] == "rec" and summary["faces"] == 22 and summary["identities"] == 5
    assert "quality_lift" not in summary  # a packed dataset has no align.csv quality to lift by
    rows = read_csv(dest / "clean.csv")
    # one row per image record, in key order; identities named from labels.csv
    assert [int(x["key"]) for x in rows] == sorted(k for k, *_ in recs)
    what = {k: w for k, _, _, w in recs}
    assert sorted({x["identity"] for x in rows}) == [x["identity"] for x in read_csv(dest / "labels.csv")]
    by_key = {int(x["key"]): x for x in rows}
    intruder = next(k for k, w in what.items() if w == "intruder")
    assert by_key[intruder]["decision"] == DECISION_DROP
    copy = next(k for k, w in what.items() if w == "copy")
    data_of = {k: d for k, _, d, _ in recs}
    original = next(k for k, _, d, w in recs if w == "genuine" and d == data_of[copy])
    pair = {by_key[copy]["reason"], by_key[original]["reason"]}
    assert REASON_DUPLICATE in pair, (by_key[copy], by_key[original])
    dup_row = by_key[copy] if by_key[copy]["reason"] == REASON_DUPLICATE else by_key[original]
    assert dup_row["duplicate_of"] in (f"rec:{copy}", f"rec:{original}")
    for k, w in what.items():
        if w == "genuine" and k not in (copy, original):
            assert by_key[k]["decision"] == DECISION_KEEP, by_key[k]

    # review: thumbnails from the record bytes; decisions apply to records
    genuine = next(k for k, w in what.items() if w == "genuine" and k not in (copy, original))
    ident = by_key[genuine]["identity"]
    (tmp_path / "dec.csv").write_text(f"aligned,identity,decision\nrec:{genuine},{ident},drop\n")
    assert CliRunner().invoke(cli, ["review", "apply", str(dest), str(tmp_path / "dec.csv")]).exit_code == 0
    assert {x["key"]: x for x in read_csv(dest / "clean.csv")}[str(genuine)]["reason"] == "manual"

    for out_layout in ("plain", "insightface"):
        new = tmp_path / f"NEW_{out_layout}"
        res = pack(dest, new, layout=out_layout)
        kept = {int(x["key"]) for x in read_csv(dest / "clean.csv") if x["decision"] == DECISION_KEEP}
        assert res.images == len(kept) and res.classes == 5 and res.reencoded == 0
        # byte-identical image bytes, labels renumbered over the identities kept
        old = {k: (lab, data) for k, lab, data, _ in recs}
        got = _images(new / "train")
        assert sorted(d for _, d in got) == sorted(old[k][1] for k in kept)
        assert sorted({lab for lab, _ in got}) == list(range(5))
        labels = read_csv(new / "labels.csv")
        new_of_old = {int(x["old_label"]): int(x["label"]) for x in labels}
        assert sorted((new_of_old[old[k][0]], old[k][1]) for k in kept) == sorted(got)
        errs = {x["path"]: x for x in read_csv(new / "pack_errors.csv")}
        assert errs[f"rec:{intruder}"]["reason"] == "not_kept"
        assert errs[f"rec:{genuine}"]["message"] == "clean: drop (manual)"
        ins = inspect(new / "train", full=True, verify=True)
        assert ins.ok and ins.verified == ins.records, ins.errors
        assert (ins.label_min, ins.label_max, ins.classes) == (0, 4, 5)
        o = _oracle(new / "train")
        assert (o["images"], o["classes"], o["label_min"], o["label_max"]) == (len(kept), 5, 0, 4)
        assert o["dali_compatible"] is (out_layout == "plain")


@pytest.mark.slow
def test_pack_merges_confirmed_pairs(embedded_recs, tmp_path):
    src, _ = embedded_recs["plain"]
    dest = _copy(src, tmp_path / "DEST")
    assert CliRunner().invoke(cli, ["clean", str(dest)]).exit_code == 0
    names = [x["identity"] for x in read_csv(dest / "labels.csv")]
    (tmp_path / "merges.csv").write_text(f"a,b,similarity,decision\n{names[1]},{names[3]},0.98,merge\n"
                                         f"{names[0]},{names[2]},0.97,no\n")
    r = CliRunner().invoke(cli, ["pack", str(dest), str(tmp_path / "NEW"), "--merge-identities",
                                 str(tmp_path / "merges.csv"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["classes"] == 4
    labels = read_csv(tmp_path / "NEW" / "labels.csv")
    merged = [x for x in labels if ";" in x["old_label"]]
    assert [(x["old_label"], x["old_identity"]) for x in merged] == [("1;3", f"{names[1]};{names[3]}")]
    assert [int(x["label"]) for x in labels] == [0, 1, 2, 3]
    assert inspect(tmp_path / "NEW" / "train", verify=True).ok
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\nnobody,someone\n")
    r = CliRunner().invoke(cli, ["pack", str(dest), str(tmp_path / "NEW2"), "--merge-identities", str(bad)])
    assert r.exit_code == 1 and "'nobody' is no identity" in r.output and not (tmp_path / "NEW2").exists()


# ----------------------------------------------------------------------------- checksums
@pytest.mark.parametrize("layout", ["plain", "insightface"])
def test_pack_sums_equal_a_fresh_checksum_pass(face_crops, tmp_path, layout):
    """pack hashes in a background thread while it writes; the file must equal what
    `facecurate checksum` computes from the finished .rec (insightface: the header
    written last, in place)."""
    crops = tmp_path / "crops"
    for n, bs in face_crops.items():
        (crops / n).mkdir(parents=True)
        for i, b in enumerate(bs):
            (crops / n / f"{i}.jpg").write_bytes(b)
    pack(crops, tmp_path / "d", layout=layout, shuffle=False)
    written = (tmp_path / "d" / "train.sums").read_bytes()
    assert written.startswith(b"key\toffset\tlength\tsha256\n")
    lines = written.decode().splitlines()[1:]
    assert len(lines) == inspect(tmp_path / "d").records
    os.remove(tmp_path / "d" / "train.sums")
    write_sums(tmp_path / "d")
    assert (tmp_path / "d" / "train.sums").read_bytes() == written
    with open(tmp_path / "d" / "train.rec", "rb") as f:
        data = f.read()
    for ln in lines:  # each line's hash is the sha256 of that record's payload
        key, off, length, digest = ln.split("\t")
        assert hashlib.sha256(data[int(off) + 8:int(off) + 8 + int(length)]).hexdigest() == digest
    assert json.loads((tmp_path / "d" / "pack.json").read_text())["files"][3] == "train.sums"


def test_verify_catches_a_flipped_byte_inside_a_jpeg(face_crops, tmp_path):
    crops = tmp_path / "crops"
    for n, bs in face_crops.items():
        (crops / n).mkdir(parents=True)
        for i, b in enumerate(bs):
            (crops / n / f"{i}.jpg").write_bytes(b)
    d = tmp_path / "d"
    pack(crops, d, shuffle=False)
    assert inspect(d / "train", verify=True).ok
    key = 7
    off = dict(line.split("\t") for line in (d / "train.idx").read_text().splitlines())[str(key)]
    data = bytearray((d / "train.rec").read_bytes())
    at = int(off) + 8 + 24 + 600  # inside the JPEG's entropy-coded data, far from its markers
    data[at] ^= 0x01
    (d / "train.rec").write_bytes(bytes(data))
    plain = inspect(d / "train", full=True)
    assert plain.ok, plain.errors  # framing, JPEG markers and decoding all miss it
    res = inspect(d / "train", verify=True)
    assert not res.ok and res.checksum_errors == 1 and res.verified == res.records - 1
    assert res.errors[0].startswith(f"key {key}, record #{key}, offset {off}: payload sha256 differs")
    r = CliRunner().invoke(cli, ["inspect", str(d), "--verify"])
    assert r.exit_code == 1 and f"key {key}," in r.output


def test_checksum_command_protects_a_rec_without_sums(face_crops, tmp_path):
    d = tmp_path / "pub"
    write_rec(d, face_crops, "plain", vector=False)
    res = inspect(d / "train")
    assert res.ok and res.checksums == "none"
    assert any("payload" in w and "cannot be detected" in w and "facecurate checksum" in w for w in res.warnings)
    assert not inspect(d / "train", verify=True).ok  # nothing to verify against is an error under --verify
    r = CliRunner().invoke(cli, ["checksum", str(d), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["records"] == 22
    res = inspect(d / "train", verify=True)
    assert res.ok and res.verified == 22 and not res.warnings
    # a corrupt .sums line is named
    text = (d / "train.sums").read_text().splitlines()
    text[3] = text[3][:-4] + "zzzz"
    (d / "train.sums").write_text("\n".join(text) + "\n")
    res = inspect(d / "train", verify=True)
    assert not res.ok and any("train.sums line 4" in e for e in res.errors)


@pytest.mark.slow
def test_exclude_names_and_a_verification_bin(embedded_recs, face_crops, tmp_path):
    """--exclude on a rec: a text file of identity names (from labels.csv), and a .bin
    whose faces are embedded and matched to identity centres."""
    import pickle

    src, recs = embedded_recs["insightface"]
    dest = _copy(src, tmp_path / "DEST")
    names = [x["identity"] for x in read_csv(dest / "labels.csv")]
    (tmp_path / "names.txt").write_text(names[2] + "\n")
    last = sorted(k for k in face_crops if k != INTRUDER_KEY_TAG)[-1]
    with open(tmp_path / "eval.bin", "wb") as f:
        pickle.dump(([face_crops[last][1], face_crops[last][2]], [True]), f)
    r = CliRunner().invoke(cli, ["clean", str(dest), "--exclude", str(tmp_path / "names.txt"),
                                 "--exclude", str(tmp_path / "eval.bin"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["excluded"] == 2
    rows = read_csv(dest / "clean.csv")
    for x in rows:
        if x["identity"] in (names[2], last):
            assert (x["decision"], x["reason"]) == (DECISION_DROP, "excluded"), x
    flags = {x["identity"]: x["flags"] for x in read_csv(dest / "identities.csv")}
    assert "excluded" in flags[names[2]] and "excluded" in flags[last]
    assert not any("excluded" in flags[n] for n in names if n not in (names[2], last))


@pytest.mark.slow
def test_pack_reports_a_record_that_changed_since_clean(embedded_recs, tmp_path):
    import struct

    src, recs = embedded_recs["plain"]
    dest = _copy(src, tmp_path / "DEST")
    assert CliRunner().invoke(cli, ["clean", str(dest)]).exit_code == 0
    kept = [x for x in read_csv(dest / "clean.csv") if x["decision"] == DECISION_KEEP]
    victim = kept[0]
    off = dict(line.split("\t") for line in (dest / "train.idx").read_text().splitlines())[victim["key"]]
    with open(dest / "train.rec", "r+b") as f:  # IRHeader label (float32) of that record
        f.seek(int(off) + 8 + 4)
        f.write(struct.pack("<f", float(int(victim["label"]) + 1)))
    res = pack(dest, tmp_path / "NEW")
    assert res.images == len(kept) - 1
    bad = [e for e in res.errors if e.reason == "bad_record"]
    assert [(e.path, e.message) for e in bad] == [
        (f"rec:{victim['key']}", f"label {int(victim['label']) + 1} in the .rec, {victim['label']} in clean.csv "
                                 "(the .rec changed since clean)")]
    assert any(x["reason"] == "bad_record" for x in read_csv(tmp_path / "NEW" / "pack_errors.csv"))
    ins = inspect(tmp_path / "NEW" / "train", verify=True)
    assert ins.ok and ins.images == len(kept) - 1 and ins.label_max == ins.classes - 1


@pytest.mark.slow
def test_clean_of_a_rec_does_not_depend_on_workers(embedded_recs, tmp_path):
    """The per-identity pool gets the pixel check as a picklable subset of record
    offsets; the outputs are byte-identical whatever the number of workers."""
    from facecurate.clean.clean import run_clean

    src, _ = embedded_recs["insightface"]
    outs = []
    for w in (1, 2):
        dest = _copy(src, tmp_path / f"w{w}")
        run_clean(dest, workers=w, shard_faces=4, show_progress=False)
        outs.append({n: (dest / n).read_bytes() for n in ("clean.csv", "identities.csv", "merges.csv",
                                                           "clean.json")})
    assert outs[0] == outs[1]
    assert b",duplicate," in outs[0]["clean.csv"]  # the pixel check ran (it confirms the copy)
