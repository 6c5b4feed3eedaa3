"""facecurate embed: the store, resume after a real kill, batch == single, model
mixing refused, the ONNX path on a graph built here, plain crop folders and .rec
input, all on real photos with dlib's real models."""

from __future__ import annotations

import shutil

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from facecurate.align.align import AlignConfig, run_align
from facecurate.cli import main
from facecurate.embed.embed import EmbedError, Loader, items_from_align, load_store, run_embed
from facecurate.common.files import read_csv, sha256_file
from facecurate.models.dlib_resnet import DLIB_CHIP_TEMPLATE_150, DlibEmbedder, dlib_chip

IDS_PER_RUN = 5
PHOTOS_PER_ID = 4


@pytest.fixture(scope="session")
def aligned(photos_dir, tmp_path_factory) -> Path:
    """RAW of copies of 5 identities x 4 real photos, aligned by the real align stage."""
    root = tmp_path_factory.mktemp("embed")
    raw = root / "raw"
    ids = sorted(p.name for p in photos_dir.iterdir() if p.is_dir())[:IDS_PER_RUN]
    for ident in ids:
        (raw / ident).mkdir(parents=True)
        files = sorted(f for f in (photos_dir / ident).iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        for f in files[:PHOTOS_PER_ID]:
            shutil.copyfile(f, raw / ident / f.name)
    out = root / "out"
    run_align(raw, out, AlignConfig(), workers=2, show_progress=False)
    return out


@pytest.fixture(scope="session")
def store(aligned, tmp_path_factory) -> Path:
    s = tmp_path_factory.mktemp("store")
    run_embed(aligned, workers=2, show_progress=False, store_dir=s)
    return s


def _ok_rows(out: Path) -> list[dict]:
    return [r for r in read_csv(out / "align.csv") if r["status"] == "ok"]


def test_store_layout_order_and_metadata(aligned, store):
    from facecurate.models.dlib_models import DESCRIPTOR, model_file

    vecs, rows, meta = load_store(store)
    ok = _ok_rows(aligned)
    assert len(ok) >= IDS_PER_RUN * PHOTOS_PER_ID - 2
    assert [r.aligned for r in rows] == [r["aligned"] for r in ok]
    assert [(r.source, r.identity, r.face) for r in rows] == [(r["source"], r["identity"], r["face"]) for r in ok]
    assert vecs.dtype == np.float32 and vecs.shape == (len(ok), 128)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert meta["model"] == "dlib_face_recognition_resnet_model_v1"
    assert meta["sha256"] == sha256_file(model_file(DESCRIPTOR))
    assert meta["dim"] == 128 and meta["input_size"] == [150, 150]
    assert meta["normalisation"] == "l2" and meta["flip"] is True and meta["feed"] == "five"
    assert meta["count"] == len(ok) and meta["failed"] == []


def test_same_person_scores_higher_than_different_people(store):
    vecs, rows, _ = load_store(store)
    ids = np.array([r.identity for r in rows])
    sim = vecs @ vecs.T
    iu = np.triu_indices(len(rows), 1)
    same = (ids[:, None] == ids[None, :])[iu]
    s = sim[iu]
    assert same.sum() >= 10 and (~same).sum() >= 50
    assert s[same].mean() > s[~same].mean() + 0.1
    # ROC AUC of same vs different: the probability a same-person pair outscores a different one
    auc = (s[same][:, None] > s[~same][None, :]).mean()
    assert auc > 0.95, auc
    # and one threshold separates nearly all pairs
    best = max(np.mean((s > t) == same) for t in np.unique(s))
    assert best > 0.95, best


def test_chip_from_five_points_matches_dlibs_own_chip(aligned):
    """The default feed (dlib chip geometry from align's 5 points) gives nearly the
    descriptor of dlib's exact chain (68 landmarks + get_face_chip); the chip warped
    from the 112 crop is further off. A wrong template would fail the first bound."""
    items, _ = items_from_align(aligned)
    items = items[:8]
    loader = Loader()
    five, e68, crop = DlibEmbedder("five"), DlibEmbedder("68"), DlibEmbedder("crop")
    c5 = [five.chip(it, loader) for it in items]
    c68 = [e68.chip(it, loader) for it in items]
    cc = [crop.chip(it, loader) for it in items]
    assert {h for _, h in c5} == {"source"} and {h for _, h in c68} == {"source68"} and {h for _, h in cc} == {"crop"}
    v5 = five.run([c for c, _ in c5], False)
    v68 = five.run([c for c, _ in c68], False)
    vc = five.run([c for c, _ in cc], False)
    agree = np.sum(v5 * v68, axis=1)
    assert agree.min() > 0.95, agree
    assert np.mean(agree) > np.mean(np.sum(vc * v68, axis=1)) - 0.01
    # and the chip really is 150x150 with the eyes where the template says
    assert c5[0][0].shape == (150, 150, 3)
    assert DLIB_CHIP_TEMPLATE_150[1, 0] - DLIB_CHIP_TEMPLATE_150[0, 0] > 45


def test_batch_and_single_agree(aligned, store, tmp_path):
    run_embed(aligned, batch_size=1, workers=1, show_progress=False, store_dir=tmp_path)
    a, rows_a, _ = load_store(store)
    b, rows_b, _ = load_store(tmp_path)
    assert rows_a == rows_b
    np.testing.assert_allclose(a, b, atol=1e-6)


KILLER = """
import os, signal, sys
from facecurate.embed.embed import run_embed
def kill(res):
    os.kill(os.getpid(), signal.SIGKILL)
run_embed(sys.argv[1], workers=1, chunk_size=3, show_progress=False, store_dir=sys.argv[2], on_chunk=kill)
"""


def test_store_survives_kill_and_rerun(aligned, store, tmp_path):
    s = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(aligned), str(s)], capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    records = list((s / ".facecurate" / "embed").glob("shard_*.json"))
    assert len(records) == 1  # exactly the first shard survived, its data and then its record
    assert not (s / "embeddings.npy").exists()
    assert not [p for p in s.rglob("*.tmp")]
    summary = run_embed(aligned, show_progress=False, store_dir=s)
    assert summary["resumed"] == 3 and summary["embedded_now"] == summary["embedded"] - 3
    for name in ("embeddings.npy", "embeddings.csv", "embeddings.json"):
        assert (s / name).read_bytes() == (store / name).read_bytes(), name
    # a rerun with nothing left to do changes nothing
    again = run_embed(aligned, show_progress=False, store_dir=s)
    assert again["embedded_now"] == 0
    assert (s / "embeddings.npy").read_bytes() == (store / "embeddings.npy").read_bytes()


# ------------------------------------------------------------------ ONNX on a built graph
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

W = np.random.default_rng(7).standard_normal((48, 64)).astype(np.float32)


def build_recognizer(path: Path, batch="N") -> Path:
    """input N x 3 x 112 x 112 -> 28x28 average pool -> flatten -> MatMul -> N x 64
    (an ArcFace-style signature; insightface normalisation read as 127.5 / 127.5)."""
    inp = helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, 112, 112])
    out = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [batch, 64])
    nodes = [
        helper.make_node("AveragePool", ["data"], ["pool"], kernel_shape=[28, 28], strides=[28, 28]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["fc1"]),
    ]
    graph = helper.make_graph(nodes, "tiny_arcface", [inp], [out], initializer=[numpy_helper.from_array(W, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def reference(bgr_crops, flip=False) -> np.ndarray:
    def raw(crops):
        x = (np.stack(crops).astype(np.float64)[..., ::-1] - 127.5) / 127.5
        n = len(x)
        pooled = x.reshape(n, 4, 28, 4, 28, 3).mean(axis=(2, 4)).transpose(0, 3, 1, 2).reshape(n, 48)
        return pooled @ W.astype(np.float64)

    v = raw(bgr_crops)
    if flip:
        v = v + raw([c[:, ::-1] for c in bgr_crops])
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def recognizer(tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    return build_recognizer(tmp_path_factory.mktemp("pack") / "w600k_tiny.onnx")


def test_onnx_path_normalised_in_order_and_batch_equals_single(aligned, recognizer, tmp_path):
    s1 = run_embed(aligned, model=str(recognizer), batch_size=5, flip=False, show_progress=False,
                   store_dir=tmp_path / "b5")
    assert s1["provider"] == "CPUExecutionProvider" and s1["dim"] == 64
    vecs, rows, meta = load_store(tmp_path / "b5")
    crops = [cv2.imread(str(aligned / r.aligned)) for r in rows]
    assert [r.aligned for r in rows] == [r["aligned"] for r in _ok_rows(aligned)]
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vecs, reference(crops), atol=2e-5)
    assert meta["model"] == "w600k_tiny" and meta["sha256"] == sha256_file(recognizer)
    assert meta["input_size"] == [112, 112] and meta["dim"] == 64
    run_embed(aligned, model=str(recognizer), batch_size=1, workers=2, flip=False, show_progress=False,
              store_dir=tmp_path / "b1")
    v1, _, _ = load_store(tmp_path / "b1")
    np.testing.assert_allclose(vecs, v1, atol=1e-6)
    run_embed(aligned, model=str(recognizer), flip=True, show_progress=False, store_dir=tmp_path / "flip")
    vf, _, mf = load_store(tmp_path / "flip")
    assert mf["flip"] is True
    np.testing.assert_allclose(vf, reference(crops, flip=True), atol=2e-5)


def test_cli_arcface_model_dir_and_cpu_fallback(aligned, recognizer, tmp_path):
    r = CliRunner().invoke(main, ["embed", str(aligned), "--model", "arcface", "--model-dir",
                                  str(recognizer.parent), "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["provider"] == "CPUExecutionProvider" and summary["embedded"] == len(_ok_rows(aligned))
    r = CliRunner().invoke(main, ["embed", str(aligned), "--model", "arcface", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "--model-dir" in r.output


def test_mixing_models_or_settings_is_refused(aligned, recognizer, tmp_path):
    run_embed(aligned, model=str(recognizer), flip=False, show_progress=False, store_dir=tmp_path)
    before = (tmp_path / "embeddings.npy").read_bytes()
    with pytest.raises(EmbedError, match="flip"):
        run_embed(aligned, model=str(recognizer), flip=True, show_progress=False, store_dir=tmp_path)
    r = CliRunner().invoke(main, ["embed", str(aligned), "--out", str(tmp_path)])  # dlib into an ONNX store
    assert r.exit_code != 0
    assert "already holds embeddings made differently" in r.output and "w600k_tiny" in r.output
    assert (tmp_path / "embeddings.npy").read_bytes() == before
    # --overwrite starts again with the new model
    run_embed(aligned, model=str(recognizer), flip=True, overwrite=True, show_progress=False, store_dir=tmp_path)
    assert load_store(tmp_path)[2]["flip"] is True


def test_plain_folder_of_crops_with_a_broken_file(aligned, store, recognizer, tmp_path):
    folder = tmp_path / "crops"
    ok = _ok_rows(aligned)[:6]
    for r in ok:
        dst = folder / r["identity"] / Path(r["aligned"]).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(aligned / r["aligned"], dst)
    (folder / ok[0]["identity"] / "zz_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
    s = run_embed(folder, workers=1, show_progress=False, store_dir=tmp_path / "s")
    assert s["input"] == "folder" and s["embedded"] == 6 and s["failed"] == 1
    assert s["failures"][0]["aligned"].endswith("zz_broken.jpg") and "decode" in s["failures"][0]["reason"]
    assert s["feeds"] == {"crop": 6}
    vecs, rows, meta = load_store(tmp_path / "s")
    assert meta["input"] == "folder"
    assert [r.identity for r in rows] == [r["identity"] for r in ok]
    # chips warped from the 112 crops are close to the ones from the source photos
    ref, ref_rows, _ = load_store(store)
    idx = {r.aligned: i for i, r in enumerate(ref_rows)}
    cos = [float(vecs[i] @ ref[idx[r["aligned"]]]) for i, r in enumerate(ok)]
    assert min(cos) > 0.9, cos


def test_crop_folder_reads_only_regular_files_inside_it(aligned, tmp_path):
    """issue 23: a FIFO in a crop folder hung `embed DIR --out S`, and a link to /dev/zero
    read until memory ran out. Now each is a failure with its reason, in seconds; a link
    leading out of the folder is not read unless --follow-external-links."""
    import os
    import time

    folder = tmp_path / "crops"
    ok = _ok_rows(aligned)[:2]
    a = folder / ok[0]["identity"]
    a.mkdir(parents=True)
    for r in ok:
        shutil.copyfile(aligned / r["aligned"], a / Path(r["aligned"]).name)
    os.mkfifo(a / "fifo.jpg")
    (a / "zero.jpg").symlink_to("/dev/zero")
    (a / "outside.jpg").symlink_to(aligned / ok[0]["aligned"])  # a real crop, outside the folder
    (folder / "elsewhere").symlink_to(aligned / ok[1]["identity"])  # a folder outside
    (a / "inside.jpg").symlink_to(a / Path(ok[0]["aligned"]).name)  # inside: followed

    def run(store, *flags):
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "facecurate", "embed", str(folder), "--out", str(store),
                               "--runtime", "dlib", "--workers", "1", "--json", *flags],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert time.monotonic() - t0 < 60
        meta = json.loads((store / "embeddings.json").read_text())
        return meta["count"], {f["aligned"].rsplit("/", 1)[-1]: f["reason"] for f in meta["failed"]}

    count, failed = run(tmp_path / "s")
    assert count == 3  # the two crops and the link inside the folder
    assert failed["fifo.jpg"] == "unsupported: not a regular file (FIFO)"
    for name, target in (("zero.jpg", "/dev/zero"), ("outside.jpg", str((aligned / ok[0]["aligned"]).resolve())),
                         ("elsewhere", str((aligned / ok[1]["identity"]).resolve()))):
        assert failed[name].startswith(f"unsupported: a link leading out of the crop folder, to {target}:"), failed
    count, failed = run(tmp_path / "s2", "--follow-external-links", "--max-bytes", "100000")
    assert failed["zero.jpg"] == "unsupported: not a regular file (character device)"
    assert failed["fifo.jpg"] == "unsupported: not a regular file (FIFO)"
    assert "outside.jpg" not in failed and count >= 4
    big = a / "big.jpg"
    big.write_bytes((aligned / ok[0]["aligned"]).read_bytes() + b"\0" * 100_000)
    count, failed = run(tmp_path / "s3", "--max-bytes", "100000")
    assert failed["big.jpg"] == f"too_large: file is {big.stat().st_size} bytes, more than --max-bytes 100000"


def test_a_folder_with_nothing_to_embed_is_one_line(tmp_path):
    """The wrong folder (no align.csv, no images, no .rec): one line naming what
    embed looks for, exit 1, and no store written."""
    (tmp_path / "notes.txt").write_text("not a crop")
    r = CliRunner().invoke(main, ["embed", str(tmp_path)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().startswith(f"Error: nothing to embed in {tmp_path}: no align.csv")
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name not in ("notes.txt", "embed.lock")]


def test_rec_input(aligned, recognizer, tmp_path):
    from facecurate.common.recordio import IndexedRecordWriter, pack_record

    ok = _ok_rows(aligned)[:5]
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    with IndexedRecordWriter(rec, idx) as w:
        for k, r in enumerate(ok):
            w.write(k, pack_record(float(k % 2), (aligned / r["aligned"]).read_bytes()))
    s = run_embed(rec, model=str(recognizer), flip=False, show_progress=False)
    assert s["input"] == "rec" and s["embedded"] == 5
    vecs, rows, _ = load_store(tmp_path)
    assert [r.aligned for r in rows] == [f"rec:{k}" for k in range(5)]
    assert [r.identity for r in rows] == ["0", "1", "0", "1", "0"]
    crops = [cv2.imread(str(aligned / r["aligned"])) for r in ok]
    np.testing.assert_allclose(vecs, reference(crops), atol=2e-5)


def test_dlib_chip_downscales_large_images_without_aliasing():
    """A face 8x larger than the chip: a 1-pixel checkerboard must come out as flat
    grey (area averaging), not as the moire a plain bilinear warp samples."""
    from facecurate.common.geometry import similarity_transform

    yy, xx = np.mgrid[0:1200, 0:1200]
    board = np.where((xx + yy) % 2 == 0, 255, 0).astype(np.uint8)
    big = np.dstack([board] * 3)
    pts = DLIB_CHIP_TEMPLATE_150 * 8.0
    chip = dlib_chip(big, pts)
    assert chip.shape == (150, 150, 3)
    inner = chip[10:-10, 10:-10].astype(float)
    assert abs(inner.mean() - 127.5) < 10 and inner.std() < 20
    naive = cv2.warpAffine(big, similarity_transform(pts, DLIB_CHIP_TEMPLATE_150), (150, 150))
    nv = naive[10:-10, 10:-10].astype(float)
    assert abs(nv.mean() - 127.5) > 60 or nv.std() > 60  # the aliasing the pre-shrink avoids
