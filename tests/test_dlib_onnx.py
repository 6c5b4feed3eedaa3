"""dlib's ResNet on ONNX Runtime: the reader of dlib's serialization, the graph built
from the shipped weights, its cache, and the real network against dlib itself on
real LFW *dev* chips (the chips `embed` feeds dlib), batched, with I/O binding,
through the recogniser door and through `embed --runtime`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from facecurate.cli import main  # noqa: E402
from facecurate.embed.embed import EmbedError, Loader, items_from_align, load_store, run_embed  # noqa: E402
from facecurate.common.files import sha256_file  # noqa: E402
from facecurate.models import dlib_onnx  # noqa: E402
from facecurate.models.dlib_models import dlib_descriptors  # noqa: E402
from facecurate.models.dlib_onnx import DlibOnnxError, dlib_resnet_onnx, synthetic_chip  # noqa: E402
from facecurate.models.dlib_resnet import DlibEmbedder  # noqa: E402
from facecurate.models.dlib_serial import DlibFormatError, read_dlib_net  # noqa: E402
from facecurate.models.onnx_models import ArcFaceONNX, OnnxModelError, load_model  # noqa: E402


@pytest.fixture(scope="module")
def dat() -> Path:
    return dlib_onnx.dat_path()


@pytest.fixture(scope="module")
def dat_bytes(dat) -> bytes:
    return dat.read_bytes()


@pytest.fixture(scope="module")
def graph() -> Path:
    return dlib_resnet_onnx()


# ----------------------------------------------------------------------------- reader
def test_reader_reads_the_shipped_network(dat):
    net = read_dlib_net(dat)
    counts = {k: net.count(k) for k in ("con", "affine", "relu", "add_prev", "max_pool", "avg_pool", "fc")}
    assert counts == {"con": 29, "affine": 29, "relu": 29, "add_prev": 14, "max_pool": 1, "avg_pool": 5, "fc": 1}
    assert net.num_params() == 5_614_592
    assert net.input_size == (150, 150)
    np.testing.assert_allclose(net.input_mean, (122.782, 117.001, 104.298), atol=1e-3)
    assert net.loss == pytest.approx({"margin": 0.04, "distance_threshold": 0.6}, abs=1e-6)
    assert net.versions.count(1) == 22 and net.versions.count(2) == 107 and net.versions[-1] == 3
    first = net.layers[0]
    assert first.attrs == {"filters": 32, "kernel": (7, 7), "stride": (2, 2), "padding": (0, 0)}
    assert first.params["weight"].shape == (32, 3, 7, 7)
    assert net.layers[-1].params["weight"].shape == (256, 128)
    # dlib's padding rule, read from the file: strided con 0, unstrided size/2
    strided = [x.attrs["padding"] for x in net.layers if x.kind == "con" and x.attrs["stride"] == (2, 2)]
    plain = [x.attrs["padding"] for x in net.layers if x.kind == "con" and x.attrs["stride"] == (1, 1)]
    assert set(strided) == {(0, 0)} and set(plain) == {(1, 1)}


def test_reader_names_what_it_does_not_know(dat_bytes):
    relu = b"\x01\x05relu_"
    i = dat_bytes.index(relu)
    bad = dat_bytes[:i] + b"\x01\x05gelu_" + dat_bytes[i + len(relu):]
    with pytest.raises(DlibFormatError, match="unsupported dlib layer 'gelu_'"):
        read_dlib_net(bad)
    # the loss wrapper's version, then the first layer wrapper's version
    with pytest.raises(DlibFormatError, match="unsupported loss wrapper version 7"):
        read_dlib_net(b"\x01\x07" + dat_bytes[2:])
    j = dat_bytes.index(b"loss_metric_2") + len("loss_metric_2") + 12  # two floats of 6 bytes
    assert dat_bytes[j:j + 2] == b"\x01\x02"
    with pytest.raises(DlibFormatError, match="unsupported layer wrapper version 5"):
        read_dlib_net(dat_bytes[:j] + b"\x01\x05" + dat_bytes[j + 2:])
    with pytest.raises(DlibFormatError, match="unsupported dlib loss layer 'loss_mmod'"):
        read_dlib_net(b"\x01\x01\x01\x09loss_mmod" + dat_bytes[17:])
    with pytest.raises(DlibFormatError, match="end of the file|end of file"):
        read_dlib_net(dat_bytes[:-100])
    with pytest.raises(DlibFormatError, match="1 bytes left"):
        read_dlib_net(dat_bytes + b"\x00")


def test_the_mmod_detector_is_refused_with_its_layer_named():
    from facecurate.models.dlib_models import MMOD, model_file

    with pytest.raises(DlibFormatError, match="loss_mmod"):
        read_dlib_net(model_file(MMOD))


# ----------------------------------------------------------------------------- graph + cache
def test_graph_metadata_and_door(graph, dat):
    meta = dlib_onnx.read_metadata(graph)
    assert meta["source_sha256"] == sha256_file(dat)
    assert dat.name in meta["origin"] and "256" in meta["normalisation"]
    import onnx

    model = onnx.load(str(graph))
    assert model.opset_import[0].version >= 13
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, 150, 150]
    m = load_model(graph, kind="recognizer")  # the insightface door, unchanged
    assert isinstance(m, ArcFaceONNX) and m.dim == 128 and m.input_size == (150, 150)
    assert (m.input_mean, m.input_std) == (0.0, 1.0)  # the graph normalises itself
    assert m.fixed_batch is None


def test_cache_location_key_and_atomic_write(tmp_path, monkeypatch, dat):
    sha = sha256_file(dat)
    monkeypatch.delenv("FACECURATE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dlib_onnx.models_cache_dir() == tmp_path / "xdg" / "facecurate" / "models"
    monkeypatch.setenv("FACECURATE_CACHE", str(tmp_path / "fc"))
    p = dlib_resnet_onnx()
    assert p.parent == tmp_path / "fc" / "models" and sha[:16] in p.name
    assert [f.name for f in p.parent.iterdir()] == [p.name]  # no temporary left
    stamp = p.stat().st_mtime_ns
    assert dlib_resnet_onnx() == p and p.stat().st_mtime_ns == stamp  # not converted again


def test_a_graph_that_disagrees_with_dlib_is_not_cached(tmp_path, monkeypatch, dat):
    """Flipped kernels (a classic conversion bug) must be caught by the built-in check."""
    monkeypatch.setenv("FACECURATE_CACHE", str(tmp_path))
    real = dlib_onnx.read_dlib_net

    def flipped(path):
        net = real(path)
        for layer in net.layers:
            if layer.kind == "con":
                layer.params["weight"] = np.ascontiguousarray(layer.params["weight"][:, :, ::-1, ::-1])
        return net

    monkeypatch.setattr(dlib_onnx, "read_dlib_net", flipped)
    with pytest.raises(DlibOnnxError, match="disagrees with dlib"):
        dlib_resnet_onnx()
    assert not any((tmp_path / "models").glob("*")) if (tmp_path / "models").exists() else True


def test_synthetic_check_is_sensitive(graph):
    """The built-in check compares against dlib on synthetic chips: a wrong channel
    order would be caught by far more than the tolerance."""
    data = graph.read_bytes()
    chips = [synthetic_chip(), synthetic_chip(variant=1)]
    assert dlib_onnx.verify_against_dlib(data, chips) < 1e-5
    assert dlib_onnx.verify_against_dlib(data, [c[:, :, ::-1].copy() for c in chips]) < 1e-5
    bgr_vs_rgb = np.abs(dlib_descriptors([c[:, :, ::-1].copy() for c in chips]) - dlib_descriptors(chips)).max()
    assert bgr_vs_rgb > 100 * dlib_onnx.VERIFY_TOLERANCE


# ----------------------------------------------------------------------------- real chips
N_CHIPS = 500


@pytest.fixture(scope="module")
def lfw_chips(lfw_dir, lfw_dev_ids, tmp_path_factory) -> list:
    """The 150x150 chips `embed` feeds dlib (default feed: dlib's chip geometry from
    align's five points, cut from the source photo), for >= 500 faces of LFW dev photos."""
    from facecurate.align.align import AlignConfig, run_align

    root = tmp_path_factory.mktemp("lfwchips")
    raw = root / "raw"
    n = 0
    for ident in sorted(lfw_dev_ids):
        for f in sorted((lfw_dir / ident).glob("*.jpg"))[:2]:
            (raw / ident).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, raw / ident / f.name)
            n += 1
        if n >= N_CHIPS + 10:
            break
    out = root / "out"
    run_align(raw, out, AlignConfig(fallback="none"), workers=2, show_progress=False)
    items, _ = items_from_align(out)
    emb, loader = DlibEmbedder("five"), Loader()
    chips = [emb.chip(it, loader) for it in items]
    assert {how for _, how in chips} == {"source"}
    return [c for c, _ in chips]


def _dlib_on_all_cores(chips: list) -> np.ndarray:
    """dlib's descriptors, the chips split over one process per core (dlib's network
    runs single-threaded)."""
    import multiprocessing as mp

    procs = max(1, min(os.cpu_count() or 1, 4))
    parts = [list(p) for p in np.array_split(np.arange(len(chips)), procs)]
    with mp.get_context("fork").Pool(procs) as pool:
        outs = pool.map(dlib_descriptors, [[chips[i] for i in p] for p in parts])
    return np.concatenate(outs).astype(np.float64)


@pytest.mark.slow
def test_onnx_reproduces_dlib_on_real_lfw_dev_chips(lfw_chips, graph):
    assert len(lfw_chips) >= N_CHIPS
    m = load_model(graph, kind="recognizer", batch_size=32)
    got = m.embed([c[:, :, ::-1] for c in lfw_chips])  # the door takes BGR
    ref = _dlib_on_all_cores(lfw_chips)
    diff = np.abs(got.astype(np.float64) - ref).max()
    cos = np.sum(got * ref, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert diff <= 1e-4, diff
    assert cos.min() >= 0.99999, cos.min()


def test_real_network_batching_io_binding_and_threads_agree_bitwise(graph, lfw_chips):
    chips = [c[:, :, ::-1] for c in lfw_chips[:11]]
    full = load_model(graph, kind="recognizer", batch_size=32)
    ref = full.embed(chips)
    for kw in ({"batch_size": 1}, {"batch_size": 4}, {"io_binding": True, "batch_size": 5}, {"threads": 1}):
        m = load_model(graph, kind="recognizer", **kw)
        assert m.use_io_binding == bool(kw.get("io_binding"))
        assert np.array_equal(m.embed(chips), ref), kw


def test_provider_choice_on_the_real_network(graph):
    import onnxruntime as ort

    m = load_model(graph, kind="recognizer", device="auto")
    assert m.provider in m.session.get_providers()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has CUDA: the refusal below is for CPU-only installs")
    assert m.provider == "CPUExecutionProvider" and not m.use_io_binding
    with pytest.raises(OnnxModelError, match="--device cuda"):
        load_model(graph, kind="recognizer", device="cuda")
    with pytest.warns(UserWarning, match="fp16 ignored"):
        assert load_model(graph, kind="recognizer", fp16=True).fp16 is False


# ----------------------------------------------------------------------------- embed --runtime
@pytest.fixture(scope="module")
def aligned(photos_dir, tmp_path_factory) -> Path:
    from facecurate.align.align import AlignConfig, run_align

    root = tmp_path_factory.mktemp("rt")
    raw = root / "raw"
    for ident in sorted(p.name for p in photos_dir.iterdir() if p.is_dir())[:3]:
        (raw / ident).mkdir(parents=True)
        for f in sorted(x for x in (photos_dir / ident).iterdir() if x.suffix.lower() in (".jpg", ".jpeg"))[:3]:
            shutil.copyfile(f, raw / ident / f.name)
    run_align(raw, root / "out", AlignConfig(), workers=2, show_progress=False)
    return root / "out"


def test_embed_runtimes_agree_and_never_mix(aligned, tmp_path):
    sd, so = tmp_path / "dlib", tmp_path / "onnx"
    d = run_embed(aligned, runtime="dlib", store_dir=sd, show_progress=False)
    o = run_embed(aligned, runtime="auto", store_dir=so, show_progress=False)  # ORT installed: onnx
    assert d["runtime"] == "dlib" and o["runtime"] == "onnxruntime"
    assert o["provider"] == "CPUExecutionProvider" and d["provider"] == "CPU (dlib)"
    vd, rd, md = load_store(sd)
    vo, ro, mo = load_store(so)
    assert rd == ro and len(rd) >= 6
    assert np.sum(vd * vo, axis=1).min() >= 0.99999
    assert "runtime" not in md["signature"] and mo["signature"]["runtime"] == "onnxruntime"
    assert mo["sha256"] == md["sha256"] and mo["model"] == md["model"]  # same model, another runtime
    with pytest.raises(EmbedError, match="runtime"):
        run_embed(aligned, runtime="onnx", store_dir=sd, show_progress=False)
    with pytest.raises(EmbedError, match="runtime"):
        run_embed(aligned, runtime="dlib", store_dir=so, show_progress=False)


def test_onnx_runtime_store_is_identical_whatever_the_workers_and_chunks(aligned, tmp_path):
    run_embed(aligned, runtime="onnx", workers=1, store_dir=tmp_path / "a", show_progress=False)
    run_embed(aligned, runtime="onnx", workers=2, batch_size=3, chunk_size=4, store_dir=tmp_path / "b",
              show_progress=False)
    for name in ("embeddings.npy", "embeddings.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_cli_runtime_option_and_clear_errors(aligned, tmp_path):
    r = CliRunner().invoke(main, ["embed", str(aligned), "--out", str(tmp_path / "s"), "--runtime", "onnx",
                                  "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["runtime"] == "onnxruntime" and s["provider"] == "CPUExecutionProvider"
    r = CliRunner().invoke(main, ["embed", str(aligned), "--out", str(tmp_path / "s"), "--runtime", "dlib"])
    assert r.exit_code == 1 and "runtime" in r.output and "Traceback" not in r.output
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        r = CliRunner().invoke(main, ["embed", str(aligned), "--out", str(tmp_path / "c"), "--device", "cuda"])
        assert r.exit_code == 1 and "--device cuda" in r.output and "Traceback" not in r.output


def test_models_cli_export_and_list(tmp_path, graph, dat):
    dest = tmp_path / "dlib.onnx"
    r = CliRunner().invoke(main, ["models", "export", "dlib-resnet", str(dest), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert dest.read_bytes() == graph.read_bytes() and s["sha256"] == sha256_file(dest)
    assert s["source_sha256"] == sha256_file(dat)
    assert isinstance(load_model(dest, kind="recognizer"), ArcFaceONNX)
    r = CliRunner().invoke(main, ["models", "list", "--json"])
    assert r.exit_code == 0, r.output
    inv = json.loads(r.output)
    assert any(c["file"] == graph.name and c["current"] for c in inv["cached"])
    assert inv["dlib_runtime_auto"] == "onnx" and inv["runtimes"]["onnxruntime"]
    r = CliRunner().invoke(main, ["models", "list"])
    assert r.exit_code == 0 and "dlib_face_recognition_resnet_model_v1.dat" in r.output
    assert os.path.basename(str(graph)) in r.output


def test_clean_continues_a_store_on_its_own_runtime(photos_dir, tmp_path):
    """A store made on ONNX Runtime, then new photos: clean --runtime dlib embeds the new
    crops on the store's runtime (never a mixed store) instead of failing or mixing."""
    from facecurate.align.align import AlignConfig, run_align
    from facecurate.clean.clean import run_clean

    raw, out = tmp_path / "raw", tmp_path / "out"
    idents = sorted(p.name for p in photos_dir.iterdir() if p.is_dir())[:3]
    for k, ident in enumerate(idents):
        (raw / ident).mkdir(parents=True)
        for f in sorted(x for x in (photos_dir / ident).iterdir() if x.suffix.lower() in (".jpg", ".jpeg"))[:3]:
            shutil.copyfile(f, raw / ident / f.name)
        if k == 1:
            run_align(raw, out, AlignConfig(), workers=1, show_progress=False)
            run_embed(out, runtime="onnx", show_progress=False)
    before = len(load_store(out)[1])
    run_align(raw, out, AlignConfig(), workers=1, show_progress=False)
    run_clean(out, runtime="dlib", show_progress=False)
    _, rows, meta = load_store(out)
    assert len(rows) > before and meta["signature"]["runtime"] == "onnxruntime"
