"""The sharded clean of a packed dataset (issue 21, facecurate.clean.staged): the same
bytes as the in-memory clean, for any shard size, workers or parts; a worker or the
driver killed mid-run; the driver's memory does not grow with the faces. (Ray: in
tests/test_ray.py, on the module's real two-node cluster.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from facecurate.clean.clean_rec import run_clean_rec
from facecurate.clean.staged import exact_median
from facecurate.common.procs import descendants
from test_clean_rec import _copy, embedded_recs, face_crops  # noqa: F401 - fixtures

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synthetic_rec import Plan, write_dataset  # noqa: E402

OUTPUTS = ("clean.csv", "identities.csv", "merges.csv", "clean.json")


def outputs(dest: Path) -> dict:
    return {n: (dest / n).read_bytes() for n in OUTPUTS}


def synthetic(root: Path, faces: int, ids: int, dim: int = 128) -> Path:
    dest = root / f"syn-{faces}-{ids}-{dim}"
    if not dest.exists():
        write_dataset(dest, Plan(faces, ids, dim), "float32")
    return dest


def fresh(src: Path, dest: Path) -> Path:
    """A copy of a packed dataset without clean's outputs or work (hard links: cheap)."""
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in OUTPUTS:
            os.link(f, dest / f.name)
    return dest


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> tuple[Path, dict]:
    """A synthetic packed dataset of 24,000 faces in 2,400 identities (cohort, crowding,
    duplicates, planted merges all active) and the in-memory clean's outputs."""
    root = tmp_path_factory.mktemp("syn")
    src = synthetic(root, 24_000, 2_400)
    ref = fresh(src, root / "ref")
    run_clean_rec(ref, sharded=False, show_progress=False)
    out = outputs(ref)
    assert b",duplicate," in out["clean.csv"] and b",review," in out["clean.csv"]
    assert len(out["merges.csv"].splitlines()) > 3
    return src, out


@pytest.fixture(scope="module")
def in_memory(embedded_recs, tmp_path_factory) -> dict:
    """The in-memory clean's outputs of the grouped (insightface-layout) .rec of real crops."""
    src, _ = embedded_recs["insightface"]
    dest = _copy(src, tmp_path_factory.mktemp("mem") / "DEST")
    run_clean_rec(dest, sharded=False, show_progress=False)
    return outputs(dest)


@pytest.mark.slow
@pytest.mark.parametrize("shard_faces,workers", [(5, 2), (1000, 1)])
def test_sharded_clean_of_real_crops_equals_the_in_memory_clean(embedded_recs, in_memory, tmp_path, shard_faces,
                                                                 workers):
    src, _ = embedded_recs["insightface"]
    dest = _copy(src, tmp_path / "DEST")
    s = run_clean_rec(dest, shard_faces=shard_faces, workers=workers, show_progress=False)
    assert (s["engine"]["shards"] > 1) == (shard_faces == 5)
    assert outputs(dest) == in_memory
    assert b",duplicate," in in_memory["clean.csv"] and b",far_from_centre," in in_memory["clean.csv"]


def test_a_store_not_grouped_by_label_is_cleaned_in_memory(embedded_recs, tmp_path):
    """The plain layout's labels are shuffled over the keys: no shards of whole
    identities; the clean runs in one process, and --part says why it cannot."""
    src, _ = embedded_recs["plain"]
    dest = _copy(src, tmp_path / "DEST")
    s = run_clean_rec(dest, show_progress=False)
    assert "engine" not in s and s["faces"] == 22
    with pytest.raises(ValueError, match="not in key order with each label's records together"):
        run_clean_rec(_copy(src, tmp_path / "D2"), part=(1, 2), show_progress=False)


@pytest.mark.parametrize("shard_faces,workers", [(2_000, 2), (9_000, 1)])
def test_sharded_clean_equals_the_in_memory_clean(syn, tmp_path, shard_faces, workers):
    src, ref = syn
    dest = fresh(src, tmp_path / "DEST")
    s = run_clean_rec(dest, shard_faces=shard_faces, workers=workers, show_progress=False)
    assert s["engine"]["shards"] == len(list((dest / ".facecurate" / "clean").glob("*/analyse/shard_*.json")))
    assert set(s["engine"]["steps"]) == {"analyse", "centres", "cohort", "decide", "write"}
    assert outputs(dest) == ref


def test_a_store_of_rows_not_of_unit_length_is_renormalised_as_in_memory(syn, tmp_path):
    src, _ = syn
    outs = []
    for sharded in (False, True):
        dest = fresh(src, tmp_path / f"D{sharded}")
        (dest / "embeddings.npy").unlink()
        v = np.load(src / "embeddings.npy")
        np.save(dest / "embeddings.npy", v * np.float32(1.5))  # what another tool may store
        run_clean_rec(dest, sharded=sharded, shard_faces=5_000, show_progress=False)
        outs.append(outputs(dest))
        assert (dest / ".facecurate" / "clean").exists() == sharded
    assert outs[0] == outs[1]


def test_parts_then_a_merging_run_equal_one_run(syn, tmp_path):
    src, ref = syn
    dest = fresh(src, tmp_path / "DEST")
    a = run_clean_rec(dest, part=(1, 2), shard_faces=2_000, workers=1, show_progress=False)
    assert a["complete"] is False and a["step"] == "analyse" and "every part" in a["note"]
    assert not (dest / "clean.csv").exists()
    b = run_clean_rec(dest, part=(2, 2), shard_faces=2_000, workers=1, show_progress=False)
    assert b["complete"] is False and b["step"] == "cohort"  # part 2 found the analyse step whole
    c = run_clean_rec(dest, shard_faces=2_000, workers=2, show_progress=False)
    steps = c["engine"]["steps"]
    assert steps["analyse"]["shards_now"] == 0  # both parts' shards were kept
    assert steps["cohort"]["shards_now"] == -(-steps["cohort"]["shards"] // 2)  # part 2 did its half
    assert outputs(dest) == ref


def _cli(dest: Path, *extra, env=None):
    return subprocess.Popen([sys.executable, "-m", "facecurate", "clean", str(dest), "--json", "--shard-faces",
                             "2000", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})), start_new_session=True)


def _wait_for(pred, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.1)


def _slow_run_until(dest: Path, step: str) -> subprocess.Popen:
    """The CLI on 2 workers, each shard delayed, once 2 shards of ``step`` are recorded."""
    p = _cli(dest, "--workers", "2", env={"FACECURATE_SHARD_DELAY": "0.3"})
    _wait_for(lambda: len(list((dest / ".facecurate" / "clean").glob(f"*/{step}/shard_*.json"))) >= 2)
    return p


def test_a_worker_killed_mid_run_costs_a_retry_not_a_byte(syn, tmp_path):
    src, ref = syn
    dest = fresh(src, tmp_path / "DEST")
    p = _slow_run_until(dest, "analyse")
    kids = [c for c in descendants(p.pid) if "resource_tracker" not in Path(f"/proc/{c}/cmdline").read_text()]
    assert kids, "no worker process"
    os.kill(kids[0], signal.SIGKILL)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    s = json.loads(out)
    assert sum(v.get("retries", 0) for v in s["engine"]["steps"].values()) >= 1
    assert outputs(dest) == ref


def test_the_driver_killed_mid_run_then_a_rerun_continues(syn, tmp_path):
    src, ref = syn
    dest = fresh(src, tmp_path / "DEST")
    p = _slow_run_until(dest, "decide")
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    _wait_for(lambda: not descendants(p.pid), 30)
    q = _cli(dest, "--workers", "2")
    out, err = q.communicate(timeout=600)
    assert q.returncode == 0, err[-2000:]
    steps = json.loads(out)["engine"]["steps"]
    assert steps["analyse"]["shards_now"] == 0 and steps["cohort"]["shards_now"] == 0
    assert 0 < steps["decide"]["shards_now"] < steps["decide"]["shards"]
    assert outputs(dest) == ref
    assert not list(dest.glob(".*.tmp")) and not list((dest / ".facecurate").rglob(".*.tmp"))


def _driver_peak(src: Path, dest: Path, **kw) -> int:
    dest = fresh(src, dest)
    tracemalloc.start()
    try:
        run_clean_rec(dest, show_progress=False, **kw)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_the_drivers_memory_does_not_grow_with_the_faces(tmp_path):
    """4x the faces, the same identities: the in-memory clean's peak grows with them,
    the sharded driver's stays (its shards of 5,000 faces run in worker processes)."""
    small, big = synthetic(tmp_path, 30_000, 1_500), synthetic(tmp_path, 120_000, 1_500)
    staged = [_driver_peak(src, tmp_path / f"s{i}", shard_faces=5_000, workers=3) for i, src in enumerate((small, big))]
    mem = [_driver_peak(src, tmp_path / f"m{i}", sharded=False, workers=2) for i, src in enumerate((small, big))]
    print("driver peaks: sharded", staged, "in memory", mem)
    assert mem[1] > 1.8 * mem[0], mem  # the control: per-face arrays in this process
    assert staged[1] < 1.25 * staged[0], staged
    assert staged[1] < mem[1] / 3, (staged, mem)


def test_exact_median_of_parts():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 1000, 1001):
        v = rng.standard_normal(n).astype(np.float32)
        v[: n // 3] = v[0]  # ties
        parts = [v[i:i + 97] for i in range(0, n, 97)]
        assert exact_median(lambda: iter(parts)) == float(np.median(v))
    assert np.isnan(exact_median(lambda: iter([np.array([1.0, np.nan], np.float32)])))


def test_a_float16_store_is_cleaned_as_in_memory(tmp_path):
    """embed --dtype float16's store: rows read as float32; rows that miss unit length
    by float16 rounding are renormalised, as the in-memory clean does (one pass tells)."""
    src = tmp_path / "f16"
    write_dataset(src, Plan(12_000, 1_200, 128), "float16")
    assert np.load(src / "embeddings.npy", mmap_mode="r").dtype == np.float16
    outs = []
    for sharded in (False, True):
        dest = fresh(src, tmp_path / f"D{sharded}")
        run_clean_rec(dest, sharded=sharded, shard_faces=3_000, show_progress=False)
        outs.append(outputs(dest))
    assert outs[0] == outs[1]


def test_a_review_applied_then_a_rerun_keeps_the_manual_decisions(syn, tmp_path):
    """The steps before write are reused (same settings), the write step is redone with
    the new manual decisions, and the outputs equal the in-memory run's."""
    from click.testing import CliRunner

    from facecurate.cli import main as cli

    src, _ = syn
    outs = []
    for sharded in (True, False):
        dest = fresh(src, tmp_path / f"D{sharded}")
        run_clean_rec(dest, sharded=sharded, shard_faces=5_000, show_progress=False)
        rows = (dest / "clean.csv").read_text().splitlines()
        review = [r.split(",")[3] for r in rows if ",review," in r][:3]
        assert len(review) == 3
        (tmp_path / "dec.csv").write_text("aligned,decision\n" + "".join(f"{a},keep\n" for a in review))
        assert CliRunner().invoke(cli, ["review", "apply", str(dest), str(tmp_path / "dec.csv")]).exit_code == 0
        s = run_clean_rec(dest, sharded=sharded, shard_faces=5_000, show_progress=False)
        assert s["manual_kept"] == 3
        if sharded:
            steps = s["engine"]["steps"]
            assert steps["analyse"]["shards_now"] == 0 and steps["decide"]["shards_now"] == 0
            assert steps["write"]["shards_now"] == steps["write"]["shards"]
        outs.append(outputs(dest))
    assert outs[0] == outs[1]
    assert outs[0]["clean.csv"].count(b",keep,manual,") == 3
