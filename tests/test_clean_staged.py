"""The sharded clean of a packed dataset (issue 21, facecurate.clean.staged): the same
bytes as the in-memory clean, for any shard size, workers, engine or parts; resumable
after a kill; the driver's memory does not grow with the faces."""

from __future__ import annotations

from pathlib import Path

import pytest

from facecurate.clean.clean_rec import run_clean_rec
from test_clean_rec import _copy, embedded_recs, face_crops  # noqa: F401 - fixtures

OUTPUTS = ("clean.csv", "identities.csv", "merges.csv", "clean.json")


def outputs(dest: Path) -> dict:
    return {n: (dest / n).read_bytes() for n in OUTPUTS}


@pytest.fixture(scope="module")
def in_memory(embedded_recs, tmp_path_factory) -> dict:
    """The in-memory clean's outputs of the grouped (insightface-layout) .rec."""
    src, _ = embedded_recs["insightface"]
    dest = _copy(src, tmp_path_factory.mktemp("mem") / "DEST")
    run_clean_rec(dest, sharded=False, show_progress=False)
    return outputs(dest)


@pytest.mark.slow
@pytest.mark.parametrize("shard_faces,workers", [(5, 2), (1000, 1)])
def test_sharded_clean_equals_the_in_memory_clean(embedded_recs, in_memory, tmp_path, shard_faces, workers):
    src, _ = embedded_recs["insightface"]
    dest = _copy(src, tmp_path / "DEST")
    s = run_clean_rec(dest, shard_faces=shard_faces, workers=workers, show_progress=False)
    assert (s["engine"]["shards"] > 1) == (shard_faces == 5)
    assert outputs(dest) == in_memory
    assert b",duplicate," in in_memory["clean.csv"] and b",far_from_centre," in in_memory["clean.csv"]
