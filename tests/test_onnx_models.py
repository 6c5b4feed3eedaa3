"""ONNX model zoo (SCRFD, ArcFace ONNX) on tiny graphs the tests build with ``onnx``:
graph inspection, anchor decoding, letterbox, NMS, normalisation, batching, providers."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from facecurate.models import onnx_models as om  # noqa: E402
from facecurate.models.onnx_models import (  # noqa: E402
    ArcFaceONNX,
    OnnxModelError,
    SCRFD,
    find_model,
    inspect_onnx,
    letterbox,
    load_model,
    select_session,
)

OPSET = [helper.make_opsetid("", 13)]


def _save(graph, path):
    model = helper.make_model(graph, opset_imports=OPSET, producer_name="facecurate-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _const(name, arr):
    arr = np.asarray(arr, dtype=np.float32)
    return helper.make_node("Constant", [], [name], name=f"const_{name}",
                            value=numpy_helper.from_array(arr, name=f"{name}_value"))


# ------------------------------------------------------------------------------------
# SCRFD-signature graphs
# ------------------------------------------------------------------------------------


def scrfd_graph(path, size=(32, 32), strides=(8, 16, 32), anchors=2, kps=True, batched=False,
                dynamic=False, plants=(), image_driven_stride8=False):
    """Build a graph with SCRFD's output signature (insightface order: scores per stride,
    then boxes per stride, then keypoints per stride).  Outputs are constants: zero
    scores except the ``plants`` = (stride, row index, score, bbox distances[4],
    kps offsets[10]) given in stride units, like the real network.  With
    ``image_driven_stride8`` the stride-8 scores are the mean of the normalised red
    channel over each 8x8 cell, so they depend on the image fed in."""
    W, H = size
    in_shape = [1, 3, "h", "w"] if dynamic else [1, 3, H, W]
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, in_shape)
    nodes, outputs = [], []
    tensors = {}
    for s in strides:
        n = (H // s) * (W // s) * anchors
        tensors[s] = {
            "score": np.zeros((n, 1), np.float32),
            "bbox": np.ones((n, 4), np.float32),
            "kps": np.zeros((n, 10), np.float32),
        }
    for s, idx, score, dist, off in plants:
        tensors[s]["score"][idx, 0] = score
        tensors[s]["bbox"][idx] = dist
        tensors[s]["kps"][idx] = off
    names = {key: [f"{key}_{s}" for s in strides] for key in ("score", "bbox", "kps")}
    groups = ["score", "bbox"] + (["kps"] if kps else [])
    for key in groups:
        for s, name in zip(strides, names[key]):
            arr = tensors[s][key]
            if batched:
                arr = arr[None]
            if key == "score" and s == 8 and image_driven_stride8:
                n8 = (H // 8) * (W // 8)
                for cname, val in (("sl_start", [0]), ("sl_end", [1]), ("sl_axes", [1]),
                                   ("shape_n1", [n8, 1]),
                                   ("shape_out", ([1] if batched else []) + [n8 * anchors, 1])):
                    nodes.append(helper.make_node(
                        "Constant", [], [cname], value=numpy_helper.from_array(np.array(val, np.int64))))
                nodes += [
                    helper.make_node("AveragePool", ["input.1"], ["pool8"], kernel_shape=[8, 8], strides=[8, 8]),
                    helper.make_node("Slice", ["pool8", "sl_start", "sl_end", "sl_axes"], ["red8"]),
                    helper.make_node("Transpose", ["red8"], ["red8t"], perm=[0, 2, 3, 1]),
                    helper.make_node("Reshape", ["red8t", "shape_n1"], ["red8f"]),
                    helper.make_node("Concat", ["red8f"] * anchors, ["red8a"], axis=1),
                    helper.make_node("Reshape", ["red8a", "shape_out"], [name]),
                ]
            else:
                nodes.append(_const(name, arr))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(arr.shape)))
    graph = helper.make_graph(nodes, "scrfd_like", [inp], outputs)
    return _save(graph, path)


def _plant(stride, loc_xy, anchor, anchors, grid_w, box_net, kps_net, score):
    """Distances (stride units) that decode to ``box_net`` / ``kps_net`` (network pixels)
    at the anchor centre of grid location ``loc_xy``."""
    cx, cy = loc_xy[0] * stride, loc_xy[1] * stride
    idx = (loc_xy[1] * grid_w + loc_xy[0]) * anchors + anchor
    x1, y1, x2, y2 = box_net
    dist = np.array([cx - x1, cy - y1, x2 - cx, y2 - cy], np.float32) / stride
    off = (np.asarray(kps_net, np.float32) - [cx, cy]).reshape(-1) / stride
    return (stride, idx, score, dist, off)


KPS_A = [[10, 6], [18, 6], [14, 9], [11, 12], [17, 12]]  # network px, ArcFace order


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """32x32 SCRFD-like graph: a face A (score 0.9) at stride 8, an overlapping duplicate
    of A (0.8, other anchor), a separate face B (0.7) at stride 16 and a weak one (0.3)."""
    d = tmp_path_factory.mktemp("scrfd")
    box_a = (8.0, 2.0, 20.0, 14.0)
    dup_a = (9.0, 2.5, 20.5, 14.0)
    box_b = (20.0, 4.0, 31.0, 15.0)
    kps_b = [[23, 7], [28, 7], [25.5, 9], [23.5, 12], [27.5, 12]]
    plants = [
        _plant(8, (1, 1), 0, 2, 4, box_a, KPS_A, 0.9),
        _plant(8, (1, 1), 1, 2, 4, dup_a, KPS_A, 0.8),
        _plant(16, (1, 0), 0, 2, 2, box_b, kps_b, 0.7),
        _plant(32, (0, 0), 1, 2, 1, (0, 0, 4, 4), np.zeros((5, 2)), 0.3),
    ]
    path = scrfd_graph(d / "scrfd_like.onnx", plants=plants)
    return path, box_a, box_b, kps_b


def test_scrfd_decodes_planted_faces_and_suppresses_duplicates(planted):
    path, box_a, box_b, kps_b = planted
    det = SCRFD(path, det_size=(640, 640), det_thresh=0.5, nms_thresh=0.4)
    assert det.input_size == (32, 32)  # fixed by the graph, det_size ignored
    assert det.provider == "CPUExecutionProvider"
    # 128 x 64 image -> resized to 32 x 16 (scale 0.25), padded below
    img = np.full((64, 128, 3), 90, np.uint8)
    faces = det.detect(img)
    assert [round(f.score, 4) for f in faces] == [0.9, 0.7]  # duplicate gone, weak one gone
    np.testing.assert_allclose(faces[0].box, np.array(box_a) / 0.25, atol=1e-4)
    np.testing.assert_allclose(faces[0].landmarks, np.array(KPS_A) / 0.25, atol=1e-4)
    np.testing.assert_allclose(faces[1].box, np.array(box_b) / 0.25, atol=1e-4)
    np.testing.assert_allclose(faces[1].landmarks, np.array(kps_b) / 0.25, atol=1e-4)
    assert faces[0].landmarks.shape == (5, 2)
    # a looser NMS keeps the duplicate; a higher threshold keeps only A
    assert len(SCRFD(path, nms_thresh=0.95).detect(img)) == 3
    assert [round(f.score, 2) for f in SCRFD(path, det_thresh=0.85).detect(img)] == [0.9]
    # deterministic
    again = det.detect(img)
    assert all(np.array_equal(a.box, b.box) for a, b in zip(faces, again))


def test_scrfd_tall_image_scale(planted):
    path, box_a, _, _ = planted
    # 40 wide x 80 high -> 16 x 32 (scale 0.4); A lies inside the 16-px-wide image part
    faces = SCRFD(path).detect(np.zeros((80, 40, 3), np.uint8))
    np.testing.assert_allclose(faces[0].box, np.array(box_a) / 0.4, atol=1e-3)


def test_scrfd_dynamic_input_batched_outputs_five_strides(tmp_path):
    """15 outputs (5 strides, 1 anchor), 3-D batched outputs, dynamic input size."""
    strides = (8, 16, 32, 64, 128)
    box = (40.0, 20.0, 100.0, 90.0)
    kp = [[55, 45], [85, 45], [70, 60], [58, 75], [82, 75]]
    plants = [_plant(64, (1, 1), 0, 1, 2, box, kp, 0.95)]
    path = scrfd_graph(tmp_path / "m.onnx", size=(128, 128), strides=strides, anchors=1,
                       batched=True, dynamic=True, plants=plants)
    assert inspect_onnx(path) == "detector"
    det = SCRFD(path, det_size=(128, 128))
    assert det.input_size == (128, 128) and det.strides == strides and det.num_anchors == 1
    faces = det.detect(np.zeros((256, 256, 3), np.uint8))
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0].box, np.array(box) * 2, atol=1e-4)
    np.testing.assert_allclose(faces[0].landmarks, np.array(kp) * 2, atol=1e-4)
    # a det_size the graph's outputs do not fit gives a clear error
    with pytest.raises(OnnxModelError, match="stride"):
        SCRFD(path, det_size=(64, 64)).detect(np.zeros((64, 64, 3), np.uint8))


def test_scrfd_without_keypoints(tmp_path):
    box = (8.0, 4.0, 24.0, 20.0)
    path = scrfd_graph(tmp_path / "nokps.onnx", kps=False,
                       plants=[_plant(8, (2, 1), 0, 2, 4, box, np.zeros((5, 2)), 0.9)])
    faces = SCRFD(path).detect(np.zeros((32, 32, 3), np.uint8))
    assert len(faces) == 1 and faces[0].landmarks is None
    np.testing.assert_allclose(faces[0].box, box, atol=1e-4)


def test_scrfd_feeds_letterboxed_rgb_normalised_image(tmp_path):
    """Stride-8 scores are the mean normalised red value of each 8x8 cell: a red block
    must fire exactly at its letterboxed cell with score (255 - 127.5) / 128."""
    path = scrfd_graph(tmp_path / "img.onnx", image_driven_stride8=True)
    det = SCRFD(path, det_thresh=0.5)
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:32, 32:48, 0] = 255  # red in RGB -> network cell (x=2, y=1) after 2x downscale
    faces = det.detect(img)
    assert len(faces) == 1  # the two anchors of the cell are duplicates
    assert faces[0].score == pytest.approx(127.5 / 128, abs=1e-6)
    # bbox distances are 1 stride on each side of the centre (16, 8) -> /0.5 scale
    np.testing.assert_allclose(faces[0].box, np.array([8, 0, 24, 16]) * 2, atol=1e-4)
    # blue block (only red counts): nothing; red block on a wide image lands after resize
    img_b = np.zeros((64, 64, 3), np.uint8)
    img_b[16:32, 32:48, 2] = 255
    assert det.detect(img_b) == []
    wide = np.zeros((32, 128, 3), np.uint8)  # -> 32 x 8, rows 8.. are padding
    wide[:, 64:96, 0] = 255  # -> network cols 16..24 (cell x=2, centre (16, 0))
    faces = det.detect(wide)
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0].box, np.array([8, -8, 24, 8]) * 4, atol=1e-4)


def test_preprocessing_matches_opencv_dnn_blobs(rec_path, crops):
    """The blobs equal what insightface builds with cv2.dnn.blobFromImage(s)."""
    import cv2

    rgb = crops[0][..., ::-1].copy()
    ref = cv2.dnn.blobFromImage(rgb, 1.0 / 128, (112, 112), (127.5, 127.5, 127.5), swapRB=False)
    np.testing.assert_allclose(SCRFD.blob(rgb), ref, atol=1e-6)
    m = ArcFaceONNX(rec_path)
    ref = cv2.dnn.blobFromImages(crops, 1.0 / 127.5, (112, 112), (127.5, 127.5, 127.5), swapRB=True)
    np.testing.assert_allclose(m.preprocess(crops), ref, atol=1e-6)


def test_letterbox_pads_bottom_right():
    img = np.full((50, 100, 3), 200, np.uint8)
    out, scale = letterbox(img, (64, 64))
    assert out.shape == (64, 64, 3) and scale == pytest.approx(32 / 50)
    assert (out[:32, :64] == 200).all() and (out[32:] == 0).all()
    tall = np.full((100, 50, 3), 7, np.uint8)
    out, scale = letterbox(tall, (64, 32))  # (width, height)
    assert out.shape == (32, 64, 3) and scale == pytest.approx(0.32)
    assert (out[:, :16] == 7).all() and (out[:, 16:] == 0).all()


# ------------------------------------------------------------------------------------
# Recognizer graphs
# ------------------------------------------------------------------------------------

RNG = np.random.default_rng(0)
WEIGHTS = RNG.standard_normal((48, 64)).astype(np.float32)


def rec_graph(path, batch="N", self_normalising=False, size=112, out_dim=64, weights=None):
    """input N x 3 x S x S -> (optional Sub 127.5 / Mul 1/127.5 named like MXNet exports)
    -> 28x28 average pool -> flatten -> MatMul -> [N, out_dim]."""
    k = size // 4
    w = WEIGHTS if weights is None else weights
    if w.shape[1] != out_dim:
        w = RNG.standard_normal((48, out_dim)).astype(np.float32)
    inp = helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, size, size])
    out = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [batch, out_dim])
    nodes, x = [], "data"
    inits = [numpy_helper.from_array(w, "W")]
    if self_normalising:
        inits += [numpy_helper.from_array(np.array(127.5, np.float32), "m"),
                  numpy_helper.from_array(np.array(1 / 127.5, np.float32), "s")]
        nodes += [helper.make_node("Sub", ["data", "m"], ["sub"], name="_minusscalar0"),
                  helper.make_node("Mul", ["sub", "s"], ["mul"], name="_mulscalar0")]
        x = "mul"
    nodes += [
        helper.make_node("AveragePool", [x], ["pool"], name="pool0", kernel_shape=[k, k], strides=[k, k]),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten0"),
        helper.make_node("MatMul", ["flat", "W"], ["fc1"], name="fc1"),
    ]
    return _save(helper.make_graph(nodes, "rec_like", [inp], [out], initializer=inits), path)


def reference_embedding(bgr_crops):
    x = np.stack(bgr_crops).astype(np.float64)[..., ::-1]
    x = (x - 127.5) / 127.5
    n = len(x)
    pooled = x.reshape(n, 4, 28, 4, 28, 3).mean(axis=(2, 4))  # n, 4, 4, 3
    return pooled.transpose(0, 3, 1, 2).reshape(n, 48) @ WEIGHTS.astype(np.float64)


@pytest.fixture(scope="module")
def crops():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(7)]


@pytest.fixture(scope="module")
def rec_path(tmp_path_factory):
    return rec_graph(tmp_path_factory.mktemp("rec") / "rec.onnx")


def test_arcface_batch_equals_single_and_reference(rec_path, crops):
    m = ArcFaceONNX(rec_path, batch_size=3)
    assert m.input_size == (112, 112) and m.dim == 64 and m.batch_size == 3
    assert (m.input_mean, m.input_std) == (127.5, 127.5)
    assert m.provider == "CPUExecutionProvider" and m.name == "rec"
    assert len(m.sha256) == 64
    batch = m.embed(crops)
    assert batch.shape == (7, 64) and batch.dtype == np.float32
    single = np.concatenate([m.embed([c]) for c in crops])
    np.testing.assert_allclose(batch, single, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch, reference_embedding(crops), rtol=1e-4, atol=1e-4)
    # order preserved; array input accepted; not normalised
    np.testing.assert_allclose(m.embed(np.stack(crops[::-1])), batch[::-1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.linalg.norm(batch, axis=1), 1.0)
    # BGR input: swapping channels changes the result
    assert not np.allclose(m.embed([crops[0][..., ::-1]]), batch[:1], atol=1e-3)
    assert m.embed([]).shape == (0, 64)


def test_arcface_default_batch_and_fixed_batch_graphs(tmp_path, rec_path, crops):
    assert ArcFaceONNX(rec_path).batch_size == om.DEFAULT_BATCH["CPUExecutionProvider"]
    ref = ArcFaceONNX(rec_path).embed(crops)
    one = ArcFaceONNX(rec_graph(tmp_path / "b1.onnx", batch=1))
    assert one.fixed_batch == 1 and one.batch_size == 1
    np.testing.assert_allclose(one.embed(crops), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(one.forward(one.preprocess(crops)), ref, rtol=1e-5, atol=1e-5)
    four = ArcFaceONNX(rec_graph(tmp_path / "b4.onnx", batch=4), batch_size=64)
    assert four.batch_size == 4  # the graph decides
    np.testing.assert_allclose(four.embed(crops), ref, rtol=1e-5, atol=1e-5)  # 7 = 4 + 3 padded


def test_arcface_normalisation_read_from_graph(tmp_path, rec_path, crops):
    selfnorm = rec_graph(tmp_path / "mx.onnx", self_normalising=True)
    m = ArcFaceONNX(selfnorm)
    assert (m.input_mean, m.input_std) == (0.0, 1.0)
    # the graph normalises inside, we feed 0..255: same vectors as the plain graph
    np.testing.assert_allclose(m.embed(crops), ArcFaceONNX(rec_path).embed(crops), rtol=1e-4, atol=1e-4)
    # the minimal protobuf reader agrees with the onnx package
    from facecurate.models.onnx_inspect import _first_nodes_protobuf

    for p in (selfnorm, rec_path):
        assert _first_nodes_protobuf(p, 8) == om.first_nodes(p, 8)
    assert _first_nodes_protobuf(selfnorm, 2) == [("_minusscalar0", "Sub"), ("_mulscalar0", "Mul")]


def test_arcface_resizes_other_crop_sizes(rec_path, crops):
    import cv2

    m = ArcFaceONNX(rec_path)
    big = [cv2.resize(c, (224, 224), interpolation=cv2.INTER_NEAREST) for c in crops[:2]]
    np.testing.assert_allclose(m.embed(big), m.embed(crops[:2]), rtol=1e-4, atol=1e-4)


def test_arcface_fp16_ignored_on_cpu(rec_path, crops):
    with pytest.warns(UserWarning, match="fp16"):
        m = ArcFaceONNX(rec_path, fp16=True)
    assert m.fp16 is False and m.provider == "CPUExecutionProvider"


# ------------------------------------------------------------------------------------
# Inspection, packs, routing, providers
# ------------------------------------------------------------------------------------


def head_graph(path, size, out_dim):
    """Landmark / gender-age lookalikes: input 1x3xSxS -> pool -> flatten -> [1, out_dim]."""
    w = np.ones((3, out_dim), np.float32)
    inp = helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, size, size])
    out = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, out_dim])
    nodes = [helper.make_node("GlobalAveragePool", ["data"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "W"], ["fc1"])]
    g = helper.make_graph(nodes, "head", [inp], [out], initializer=[numpy_helper.from_array(w, "W")])
    return _save(g, path)


@pytest.fixture()
def pack(tmp_path, planted):
    """A buffalo_l-like pack whose file names lie: the detector is called w600k_r50.onnx."""
    import shutil

    d = tmp_path / "buffalo_fake"
    d.mkdir()
    shutil.copy(planted[0], d / "w600k_r50.onnx")
    rec_graph(d / "det_10g.onnx", out_dim=512)
    head_graph(d / "2d106det.onnx", 192, 212)
    head_graph(d / "1k3d68.onnx", 192, 3309)
    head_graph(d / "genderage.onnx", 96, 3)
    (d / "notes.txt").write_text("not a model")
    return d


def test_inspect_and_find_model_by_graph(pack):
    assert inspect_onnx(pack / "w600k_r50.onnx") == "detector"
    assert inspect_onnx(pack / "det_10g.onnx") == "recognizer"
    for other in ("2d106det.onnx", "1k3d68.onnx", "genderage.onnx"):
        with pytest.raises(OnnxModelError, match="not a face detector"):
            inspect_onnx(pack / other)
    assert find_model(pack, "detector") == pack / "w600k_r50.onnx"
    assert find_model(pack, "recognizer") == pack / "det_10g.onnx"
    assert find_model(pack / "det_10g.onnx", "recognizer") == pack / "det_10g.onnx"
    with pytest.raises(OnnxModelError, match="is a recognizer, not a detector"):
        find_model(pack / "det_10g.onnx", "detector")


def test_find_model_errors_list_what_was_found(pack, tmp_path):
    rec_graph(pack / "glintr100.onnx")
    with pytest.raises(OnnxModelError, match="several recognizer models") as e:
        find_model(pack, "recognizer")
    assert "det_10g.onnx" in str(e.value) and "glintr100.onnx" in str(e.value)
    assert "landmark model" in str(e.value) and "gender/age" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(OnnxModelError, match="no detector model.*broken.onnx: unreadable"):
        find_model(empty, "detector")
    with pytest.raises(OnnxModelError, match="not found"):
        find_model(tmp_path / "nowhere", "detector")


def test_load_model_routes(pack):
    det = load_model(pack, "detector", det_thresh=0.6)
    rec = load_model(pack / "det_10g.onnx")
    assert isinstance(det, SCRFD) and det.det_thresh == 0.6
    assert isinstance(rec, ArcFaceONNX) and rec.dim == 512
    with pytest.raises(OnnxModelError, match="directory"):
        load_model(pack)
    with pytest.raises(OnnxModelError, match="not a face detector"):
        load_model(pack / "genderage.onnx")
    with pytest.raises(OnnxModelError, match="not an SCRFD detector"):
        SCRFD(pack / "det_10g.onnx")


def test_select_session_providers(rec_path):
    session, provider = select_session(rec_path, "auto", threads=1)
    assert provider == "CPUExecutionProvider"
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert select_session(rec_path, "cpu")[1] == "CPUExecutionProvider"
    # no GPU here: asking for CUDA must fail loudly, not fall back silently
    with pytest.raises(OnnxModelError, match="cuda") as e:
        select_session(rec_path, "cuda")
    assert "facecurate[gpu]" in str(e.value)
    with pytest.raises(OnnxModelError, match="unknown device"):
        select_session(rec_path, "tpu")
    with pytest.raises(OnnxModelError, match="not found"):
        select_session(rec_path.parent / "missing.onnx")
