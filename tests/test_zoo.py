"""The model door: every stage gets its models from facecurate.models.zoo, and every
model the zoo hands out speaks the whole protocol of its role (real dlib models and
real photos; SCRFD as a small graph with SCRFD's signature)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

import facecurate
from facecurate.align.align import AlignConfig, Aligner
from facecurate.models.base import Detector, Embedder, Landmarker
from facecurate.models.zoo import make_detector, make_embedder, make_landmarker

PKG = Path(facecurate.__file__).parent
#: what only facecurate/models/ may construct or call
MODEL_NAMES = {"DlibHOGDetector", "DlibCNNDetector", "DlibLandmarks68", "SCRFD", "ArcFaceONNX", "DlibEmbedder",
               "DlibOnnxEmbedder", "OnnxEmbedder", "load_model", "select_session", "dlib_descriptor_model",
               "shape_predictor", "cnn_face_detection_model_v1", "get_frontal_face_detector",
               "face_recognition_model_v1", "InferenceSession"}
RUNTIMES = ["dlib"] + (["onnx"] if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx")
                       else [])


def _stage_modules():
    return [p for p in PKG.rglob("*.py") if "models" not in p.relative_to(PKG).parts[:1]]


def test_no_stage_builds_or_imports_a_model_family_itself():
    """Outside facecurate/models/, models come only from the zoo: no stage calls a model
    class or a runtime's constructor, or imports a model family's module (the `models`
    command's own dlib_onnx export / inventory aside)."""
    found = []
    for path in _stage_modules():
        rel = path.relative_to(PKG).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if name in MODEL_NAMES:
                    found.append(f"{rel}:{node.lineno} calls {name}")
            elif isinstance(node, ast.ClassDef) and node.name in MODEL_NAMES:
                found.append(f"{rel}:{node.lineno} defines {node.name}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("facecurate.models."):
                allowed = {"facecurate.models.zoo", "facecurate.models.base"}
                if rel == "cli/models.py":
                    allowed.add("facecurate.models.dlib_onnx")
                if node.module not in allowed:
                    found.append(f"{rel}:{node.lineno} imports {node.module}")
    assert not found, found


@pytest.fixture(scope="module")
def photo(photos_dir):
    return cv2.cvtColor(cv2.imread(str(photos_dir / "id00" / "img10.jpg")), cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize("name", ["dlib", "dlib-cnn"])
def test_dlib_detectors_from_the_zoo_speak_the_protocol(name, photo):
    det = make_detector(name, max_upsample=0, min_side=0)
    assert isinstance(det, Detector) and det.name == name
    assert det.provider is None and det.has_landmarks is False and det.info()["name"] == name
    faces = det.detect(photo)
    assert len(faces) >= 1 and all(f.landmarks is None for f in faces)
    lm = make_landmarker()
    assert isinstance(lm, Landmarker)
    five = lm.five(lm.predict(photo, faces[0].box))
    assert five.shape == (5, 2) and five[0, 0] < five[1, 0]  # left eye left of the right eye
    al = Aligner(AlignConfig(detector=name, fallback="none"))
    assert type(al.detector) is type(det) and isinstance(al._landmarks, Landmarker)
    assert al.main_label == name  # no ONNX provider in the label


def test_scrfd_from_the_zoo_speaks_the_protocol(tmp_path, photo):
    pytest.importorskip("onnxruntime")
    from test_onnx_models import KPS_A, _plant, scrfd_graph

    graph = scrfd_graph(tmp_path / "det.onnx", plants=[_plant(8, (1, 1), 0, 2, 4, (8.0, 2.0, 20.0, 14.0), KPS_A, 0.9)])
    det = make_detector("scrfd", model_dir=str(graph), device="cpu")
    assert isinstance(det, Detector) and det.provider == "CPUExecutionProvider" and det.has_landmarks is True
    faces = det.detect(photo)
    assert len(faces) == 1 and faces[0].landmarks.shape == (5, 2)
    al = Aligner(AlignConfig(detector="scrfd", model_dir=str(graph), device="cpu", fallback="none"))
    assert al._landmarks is None  # SCRFD brings its five points: no 68-point model loaded
    assert al.main_label == "scrfd/CPUExecutionProvider"
    nokps = scrfd_graph(tmp_path / "nokps.onnx", kps=False)
    assert make_detector("scrfd", model_dir=str(nokps), device="cpu").has_landmarks is False


@pytest.fixture(scope="module")
def crops(photos_dir):
    """Aligned RGB crops of real faces (dlib HOG + 68 points), as JPEG bytes and arrays."""
    from facecurate.align.align import centre_face_jpeg

    det, lm = make_detector("dlib"), make_landmarker()
    out = []
    for p in sorted((photos_dir / "id00").glob("*.jpg"))[:3]:
        rgb = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
        jpg = centre_face_jpeg(rgb, det, lm)
        if jpg is not None:
            out.append(jpg)
    assert len(out) >= 2
    return out


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_dlib_embedders_from_the_zoo_and_clean_exclude_use_the_same_door(runtime, crops):
    """The zoo's embedder speaks the protocol on each runtime, and clean's --exclude
    embedding (clean.embed_images) gives exactly the zoo embedder's vectors."""
    from facecurate.clean.clean import embed_images

    emb = make_embedder("dlib", feed="crop", runtime=runtime)
    assert isinstance(emb, Embedder) and emb.dim == 128 and emb.feed == "crop"
    assert emb.per_core is (runtime == "dlib")
    assert emb.runtime == ("dlib" if runtime == "dlib" else "onnxruntime")
    assert emb.info()["feed"] == "crop" and emb.batch_size >= 1
    rgb = [cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
           for b in crops]
    chips = [emb.from_crop(c) for c in rgb]
    assert all(c.shape == (150, 150, 3) for c in chips)
    vecs = emb.run(chips, True)
    assert vecs.shape == (len(crops), 128) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    blob = emb.blob(chips, True)
    assert (blob is None) is (runtime == "dlib")
    if blob is not None:
        assert np.array_equal(emb.forward(blob, len(chips), True), vecs)
    got = embed_images(crops, {"model": "dlib_face_recognition_resnet_model_v1", "flip": True}, runtime)
    assert np.allclose(got, vecs, atol=1e-6)


def test_the_two_runtimes_of_dlibs_model_agree(crops):
    if len(RUNTIMES) < 2:
        pytest.skip("needs onnxruntime and onnx")
    rgb = [cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
           for b in crops]
    a, b = (make_embedder("dlib", feed="crop", runtime=rt) for rt in ("dlib", "onnx"))
    va, vb = a.run([a.from_crop(c) for c in rgb], False), b.run([b.from_crop(c) for c in rgb], False)
    assert np.sum(va * vb, axis=1).min() >= 0.9999
