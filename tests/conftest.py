"""Shared fixtures. The real photos live outside the repository (research data):
``$FACECURATE_DATA`` or ``../shared/data`` beside the checkout. Tests that need them
skip when they are absent, except under CI (``CI`` set), where that is a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("FACECURATE_DATA", REPO.parent / "shared" / "data")).resolve()


def _need(path: Path) -> Path:
    if not path.exists():
        msg = f"test data not found: {path} (set FACECURATE_DATA)"
        if os.environ.get("CI"):
            pytest.fail(msg + " -- CI must not skip data tests", pytrace=False)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _need(data_root())


@pytest.fixture(scope="session")
def lfw_dir(data_dir) -> Path:
    return _need(data_dir / "lfw")


@pytest.fixture(scope="session")
def photos_dir(data_dir) -> Path:
    return _need(data_dir / "photos")


@pytest.fixture(scope="session")
def dlib_faces_dir(data_dir) -> Path:
    return _need(data_dir / "dlib-faces")


@pytest.fixture(scope="session")
def lfw_dev_ids(data_dir) -> list[str]:
    p = _need(data_dir / "splits" / "lfw-dev.txt")
    return [s.strip() for s in p.read_text().splitlines() if s.strip()]


@pytest.fixture(scope="session", autouse=True)
def _private_model_cache(tmp_path_factory):
    """Converted models (dlib's ResNet as ONNX) go to a cache of this test session,
    never to the user's ~/.cache."""
    old = os.environ.get("FACECURATE_CACHE")
    os.environ["FACECURATE_CACHE"] = str(tmp_path_factory.mktemp("fc-cache"))
    yield
    if old is None:
        os.environ.pop("FACECURATE_CACHE", None)
    else:
        os.environ["FACECURATE_CACHE"] = old
