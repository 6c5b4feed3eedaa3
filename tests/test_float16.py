"""embed --dtype float16 (issue 21, item 4): the store holds the float32 vectors rounded
to float16, every reader computes in float32, and clean on it decides exactly what it
decides on the float32 store rounded through float16 (folder and .rec flows). Real
photos: 7 identities of ../shared/data/photos, aligned and embedded by the real stages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facecurate.align.align import AlignConfig, run_align
from facecurate.clean.clean import run_clean
from facecurate.clean.clean_rec import _unit_rows
from facecurate.cli import main
from facecurate.common import constants as C
from facecurate.common.recordio import IndexedRecordWriter, pack_record
from facecurate.common.workspace import ManifestError, Workspace
from facecurate.embed.embed import EmbedError, load_store, run_embed

IDS = 7
OUTPUTS = (C.CLEAN_CSV, C.IDENTITIES_CSV, C.MERGES_CSV)


@pytest.fixture(scope="module")
def aligned(photos_dir, tmp_path_factory) -> Path:
    """align OUT of 7 real identities (44 photos), each folder with noise for clean to
    find: a photo of another person and a copy of one of its own photos; no store."""
    root = tmp_path_factory.mktemp("f16")
    raw = root / "raw"
    ids = sorted(p.name for p in photos_dir.iterdir() if p.is_dir())
    for i, ident in enumerate(ids[:IDS]):
        shutil.copytree(photos_dir / ident, raw / ident)
        own = sorted((raw / ident).iterdir())
        shutil.copyfile(own[0], raw / ident / f"copy_{own[0].name}")
        other = sorted((photos_dir / ids[IDS + i % (len(ids) - IDS)]).iterdir())
        shutil.copyfile(other[i % len(other)], raw / ident / f"intruder_{other[0].suffix}")
    out = root / "aligned"
    run_align(raw, out, AlignConfig(), workers=2, show_progress=False)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(C.WORK_DIR))
    return dst


def _rounded_copy(src: Path, dst: Path) -> Path:
    """A copy of the float32 store in ``src`` whose vectors are rounded through float16
    (still a float32 .npy): what a float16 store should read as."""
    _copy(src, dst)
    v = np.load(src / C.EMBEDDINGS_NPY)
    assert v.dtype == np.float32
    np.save(dst / C.EMBEDDINGS_NPY, v.astype(np.float16).astype(np.float32))
    return dst


def _decisions(out: Path) -> dict:
    return {r.aligned: r.decision for r in Workspace(out).clean_rows()}


def _assert_same_clean(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ja, jb = (json.loads((d / C.CLEAN_META).read_text()) for d in (a, b))
    assert (ja["summary"], ja["params"]) == (jb["summary"], jb["params"])


def _few_changes(a: Path, b: Path) -> int:
    da, db = _decisions(a), _decisions(b)
    assert da.keys() == db.keys() and len(da) > 30
    changed = sum(da[k] != db[k] for k in da)
    assert changed <= max(1, len(da) // 50), (changed, len(da))  # at most 2%
    return changed


def test_folder_store_float16_equals_float32_rounded_and_clean_decides_the_same(aligned, tmp_path):
    o32, o16 = _copy(aligned, tmp_path / "o32"), _copy(aligned, tmp_path / "o16")
    s32 = run_embed(o32, workers=2, show_progress=False)
    s16 = run_embed(o16, workers=2, show_progress=False, dtype="float16")
    assert (s32["dtype"], s16["dtype"]) == ("float32", "float16")
    raw16 = np.load(o16 / C.EMBEDDINGS_NPY)
    v32, rows32, meta32 = load_store(o32)
    v16, rows16, meta16 = load_store(o16)
    assert raw16.dtype == np.float16 and raw16.shape == v32.shape and len(rows32) > 30
    assert rows16 == rows32
    assert np.array_equal(raw16, v32.astype(np.float16))  # the same rows, cast at the merge
    assert v16.dtype == np.float32 and np.array_equal(v16, v32.astype(np.float16).astype(np.float32))
    assert (meta32["dtype"], meta16["dtype"]) == ("float32", "float16")
    assert "dtype" not in meta32["signature"] and meta16["signature"]["dtype"] == "float16"
    assert Workspace(o16).store_vectors(mmap=True).dtype == np.float16  # mapped as stored
    assert (o16 / C.EMBEDDINGS_NPY).stat().st_size < 0.6 * (o32 / C.EMBEDDINGS_NPY).stat().st_size

    oR = _rounded_copy(o32, tmp_path / "oR")
    for o in (o32, o16, oR):
        run_clean(o, show_progress=False, workers=1)
    _assert_same_clean(o16, oR)
    _few_changes(o16, o32)
    assert json.loads((o16 / C.CLEAN_META).read_text())["summary"]["faces"] == len(rows32)

    # the other dtype is refused, in one line naming both and --overwrite; nothing changes
    before = (o16 / C.EMBEDDINGS_NPY).read_bytes()
    r = CliRunner().invoke(main, ["embed", str(o16)])
    assert r.exit_code == 1, r.output
    line = r.output.strip()
    assert "\n" not in line and "Traceback" not in r.output
    assert "dtype: 'float16' in the store, 'float32' now" in line and "--overwrite" in line
    assert (o16 / C.EMBEDDINGS_NPY).read_bytes() == before
    with pytest.raises(EmbedError, match="dtype: 'float32' in the store, 'float16' now"):
        run_embed(o32, show_progress=False, dtype="float16")


def _write_rec(aligned: Path, dest: Path) -> int:
    """dest/train.rec (+ .idx) of align's ok crops, labelled by identity (0, 1, ...)."""
    rows = [r for r in Workspace(aligned).align_rows() if r.status == C.STATUS_OK]
    labels = {n: i for i, n in enumerate(sorted({r.identity for r in rows}))}
    dest.mkdir()
    with IndexedRecordWriter(dest / C.REC_NAME, dest / C.IDX_NAME) as w:
        for k, r in enumerate(rows):
            w.write(k, pack_record(float(labels[r.identity]), (aligned / r.aligned).read_bytes()))
    return len(rows)


def test_rec_store_float16_refused_on_resume_then_clean_decides_the_same(aligned, tmp_path):
    d32 = tmp_path / "d32"
    n = _write_rec(aligned, d32)
    d16 = _copy(d32, tmp_path / "d16")
    run_embed(d32 / C.REC_NAME, show_progress=False)
    run_embed(d16 / C.REC_NAME, show_progress=False)  # float32 first: a resume as float16 is refused
    r = CliRunner().invoke(main, ["embed", str(d16 / C.REC_NAME), "--dtype", "float16"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "Traceback" not in r.output
    assert "dtype: 'float32' in the store, 'float16' now" in r.output and "--overwrite" in r.output
    r = CliRunner().invoke(main, ["embed", str(d16 / C.REC_NAME), "--dtype", "float16", "--overwrite"])
    assert r.exit_code == 0, r.output
    raw16, v32 = np.load(d16 / C.EMBEDDINGS_NPY), np.load(d32 / C.EMBEDDINGS_NPY)
    assert raw16.dtype == np.float16 and len(v32) == n and np.array_equal(raw16, v32.astype(np.float16))
    assert (d16 / C.EMBEDDINGS_CSV).read_bytes() == (d32 / C.EMBEDDINGS_CSV).read_bytes()
    assert Workspace(d16).store_meta()["dtype"] == "float16"
    # the .rec flow's reader hands clean float32 even when it passes the mapped store on whole
    rows = _unit_rows(Workspace(d16).store_vectors(mmap=True), np.arange(n))
    assert rows.dtype == np.float32 and np.array_equal(rows, raw16.astype(np.float32))

    dR = _rounded_copy(d32, tmp_path / "dR")
    for d in (d32, d16, dR):
        run_clean(d, show_progress=False, workers=1)
    _assert_same_clean(d16, dR)
    _few_changes(d16, d32)


def test_a_store_of_other_numbers_is_refused_in_one_line(tmp_path):
    """A crafted .npy of integers is not a store: ManifestError naming the type."""
    ws = Workspace(tmp_path)
    np.save(tmp_path / C.EMBEDDINGS_NPY, np.ones((2, 4), np.int32))
    with pytest.raises(ManifestError, match="holds int32 numbers, not one of float32, float16"):
        ws.store_vectors(mmap=True)
    np.save(tmp_path / C.EMBEDDINGS_NPY, np.ones((2, 4), np.float16))
    v = ws.store_vectors()
    assert v.dtype == np.float32 and v.shape == (2, 4)
