"""unpack and pack never write over their inputs, and unpack never merges or skips a
class silently (issue 23, items 5/6 and 8). Real LFW photos and a real align run."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from facecurate.cli import main as cli
from facecurate.common.constants import UNPACK_MAX_NAME_BYTES
from facecurate.pack.packer import PackError, pack
from facecurate.common.recordio import IndexedRecordWriter, pack_record
from facecurate.pack.unpack import UnpackError, unpack
from test_recdata import photos  # noqa: F401  (fixture: six real LFW JPEGs)


def _rec(d: Path, photos: list[bytes], keys=None, names: dict | None = None) -> Path:  # noqa: F811
    """d/train.rec of the photos, labels 0, 0, 1, 1, 2, 2 (``keys``: the .idx keys);
    ``names``: labels.csv beside it."""
    d.mkdir(parents=True, exist_ok=True)
    with IndexedRecordWriter(d / "train.rec", d / "train.idx") as w:
        for i, (k, img) in enumerate(zip(keys or range(len(photos)), photos)):
            w.write(k, pack_record(float(i // 2), img))
    if names is not None:
        (d / "labels.csv").write_text("identity,label,images\n" + "".join(
            f'"{n}",{lab},2\n' for lab, n in sorted(names.items())), encoding="utf-8")
    return d / "train.rec"


def _tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


# ----------------------------------------------------------------------------- unpack: names and keys
def test_labels_sharing_a_name_get_folders_of_their_own(photos, tmp_path):  # noqa: F811
    """Two labels named alike in labels.csv went into one folder (a repack made one
    class of two, errors 0); a 300-byte name aborted the unpack ("File name too long")."""
    long = "Ä" * 150  # 300 bytes of UTF-8
    rec = _rec(tmp_path / "a", photos, names={0: "Same Name", 1: "Same Name", 2: long})
    u = unpack(rec, tmp_path / "u")
    folders = sorted(p.name for p in (tmp_path / "u").iterdir() if p.is_dir())
    short = [f for f in folders if f.startswith("Ä")]
    assert folders[:2] == ["Same Name__0", "Same Name__1"] and len(short) == 1
    tag = "__" + hashlib.sha256(long.encode()).hexdigest()[:12]
    assert short[0].endswith(tag) and len(short[0].encode()) <= UNPACK_MAX_NAME_BYTES
    assert short[0][:-len(tag)] == "Ä" * ((UNPACK_MAX_NAME_BYTES - len(tag)) // 2)
    assert (u.written, u.classes, u.errors, u.shared_names, u.shortened_names) == (6, 3, [], 2, 1)
    assert "2 labels share their name with another label in labels.csv" in u.notes[0]
    # deterministic: a fresh unpack makes the same folders
    unpack(rec, tmp_path / "v")
    assert _tree(tmp_path / "u") == _tree(tmp_path / "v")
    # a repack keeps the three classes
    res = pack(tmp_path / "u", tmp_path / "p", shuffle=False, size=250)
    assert res.classes == 3
    r = CliRunner().invoke(cli, ["unpack", str(rec), str(tmp_path / "w")])
    assert r.exit_code == 0 and "note: 2 labels share their name" in r.output, r.output


def test_a_record_skipped_for_a_duplicate_key_is_an_error(photos, tmp_path):  # noqa: F811
    """A key listed twice in the .idx skipped a record as already_present, errors 0."""
    rec = _rec(tmp_path / "a", photos, keys=[0, 1, 2, 3, 3, 5])
    u = unpack(rec, tmp_path / "u")
    assert (u.written, u.existing) == (5, 0)
    assert len(u.errors) == 1 and u.errors[0].startswith("key 3: listed more than once in train.idx")
    r = CliRunner().invoke(cli, ["unpack", str(rec), str(tmp_path / "v"), "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["errors"] == 1


# ----------------------------------------------------------------------------- unpack: DEST
def test_unpack_refuses_a_folder_it_did_not_make(photos, tmp_path, lfw_dir, lfw_dev_ids):  # noqa: F811
    """`unpack DEST/train RAW` wrote its crops into RAW's identity folders, exit 0."""
    rec = _rec(tmp_path / "a", photos)
    raw = tmp_path / "raw" / lfw_dev_ids[0]
    raw.mkdir(parents=True)
    src = sorted((lfw_dir / lfw_dev_ids[0]).iterdir())[0]
    shutil.copy(src, raw / src.name)
    before = _tree(tmp_path / "raw")
    with pytest.raises(UnpackError, match="is not empty and holds no unpack.json"):
        unpack(rec, tmp_path / "raw")
    r = CliRunner().invoke(cli, ["unpack", str(tmp_path / "a" / "train"), str(tmp_path / "raw")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "holds no unpack.json" in r.output, r.output
    assert _tree(tmp_path / "raw") == before
    # its own earlier unpack is continued; another .rec's is refused
    u = unpack(rec, tmp_path / "u")
    meta = json.loads((tmp_path / "u" / "unpack.json").read_text())
    assert meta["fingerprint"]["size"] == rec.stat().st_size
    next(p for p in (tmp_path / "u").rglob("*.jpg")).unlink()
    u2 = unpack(rec, tmp_path / "u")
    assert (u.written, u2.written, u2.existing) == (6, 1, 5)
    other = _rec(tmp_path / "b", photos[:4])
    with pytest.raises(UnpackError, match="holds the unpack of another .rec"):
        unpack(other, tmp_path / "u")
    unpack(other, tmp_path / "empty")  # an empty (or new) folder is fine
    (tmp_path / "e2").mkdir()
    assert unpack(other, tmp_path / "e2").written == 4


# ----------------------------------------------------------------------------- pack: DEST
@pytest.fixture(scope="module")
def aligned(tmp_path_factory, lfw_dir, lfw_dev_ids) -> tuple[Path, Path]:
    """(RAW, OUT): two dev identities with two photos each, aligned for real."""
    from facecurate.align.align import AlignConfig, run_align

    root = tmp_path_factory.mktemp("aligned")
    raw = root / "raw"
    for ident in lfw_dev_ids[:2]:
        (raw / ident).mkdir(parents=True)
        for f in sorted((lfw_dir / ident).iterdir())[:2]:
            shutil.copy(f, raw / ident / f.name)
    run_align(raw, root / "out", AlignConfig(), workers=1, show_progress=False)
    return raw, root / "out"


def test_pack_refuses_a_dest_over_its_inputs(aligned, tmp_path):
    """`pack OUT RAW/<identity>` and `pack OUT OUT` succeeded."""
    raw, out = aligned
    ident = sorted(p.name for p in raw.iterdir())[0]
    before = _tree(raw), _tree(out)
    cases = {raw / ident: "is inside RAW", raw: "DEST is RAW itself", out: "DEST is OUT itself",
             out / ident: "is OUT's identity folder", out / ident / "sub": "is inside OUT's identity folder",
             raw.parent: "holds RAW"}
    for dest, why in cases.items():
        with pytest.raises(PackError, match=why):
            pack(out, dest)
        r = CliRunner().invoke(cli, ["pack", str(out), str(dest)])
        assert r.exit_code == 1 and r.output.count("\n") == 1 and why in r.output, r.output
    assert (_tree(raw), _tree(out)) == before
    assert not (out / ident / "sub").exists()
    # a new folder beside the identity folders, or elsewhere, is fine
    assert pack(out, out / "packed").images == pack(out, tmp_path / "d").images > 0
