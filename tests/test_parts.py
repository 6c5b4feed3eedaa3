"""The run machinery without Ray: --part K/N, the fixed shard plan, a shard that
keeps failing, and the one machinery under align and embed (real models, real photos)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from facecurate.align.align import AlignConfig, run_align
from facecurate.embed.embed import run_embed
from facecurate.engines.runner import parse_part, plan_shards, RunError

STORE = ("embeddings.npy", "embeddings.csv", "embeddings.json")


def lfw_raw(lfw_dir: Path, ids, dest: Path, n_ids: int = 6, per_id: int = 3) -> Path:
    raw = dest / "raw"
    picked = [i for i in ids if len(os.listdir(lfw_dir / i)) >= per_id][:n_ids]
    for ident in picked:
        (raw / ident).mkdir(parents=True)
        for f in sorted(os.listdir(lfw_dir / ident))[:per_id]:
            shutil.copyfile(lfw_dir / ident / f, raw / ident / f)
    return raw


def tree_bytes(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".facecurate" not in p.parts and p.name not in STORE}


@pytest.fixture(scope="module")
def ref(lfw_dir, lfw_dev_ids, tmp_path_factory):
    """A local run (2 workers): align then embed."""
    tmp = tmp_path_factory.mktemp("parts")
    raw = lfw_raw(lfw_dir, lfw_dev_ids, tmp)
    out = tmp / "ref"
    run_align(raw, out, AlignConfig(), workers=2, shard_size=2, show_progress=False)
    run_embed(out, workers=2, chunk_size=4, show_progress=False)
    return raw, out


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.Popen([sys.executable, "-m", "facecurate", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def test_plan_ignores_workers_and_parts():
    items = [f"f{i:03d}" for i in range(10)]
    shards = plan_shards(items, str, 4)
    assert [len(s.items) for s in shards] == [4, 4, 2]
    assert shards[1].items == ("f004", "f005", "f006", "f007")
    assert plan_shards(items, str, 4) == shards  # same inputs, same plan
    assert parse_part("2/3") == (2, 3)
    for bad in ("0/3", "4/3", "x", "1/2/3"):
        with pytest.raises(RunError):
            parse_part(bad)


def test_parts_run_concurrently_then_merge_byte_identical(ref, tmp_path):
    raw, refout = ref
    out = tmp_path / "out"
    procs = [_cli("align", str(raw), str(out), "--workers", "1", "--shard-size", "2", "--part", f"{k}/3",
                  "--json") for k in (1, 2, 3)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (so, se) in zip(procs, results):
        assert p.returncode == 0, se[-2000:]
    summaries = [json.loads(so.strip().splitlines()[-1]) for so, _ in results]
    # Disjoint shards: every file processed exactly once over the three parts.
    assert sum(s["processed_now"] for s in summaries) == len(list(raw.rglob("*.jpg")))
    assert any(s["merged"] for s in summaries)  # the part that found every shard finished merged them
    # Or a later run without --part merges (and does nothing else).
    p = _cli("align", str(raw), str(out), "--json")
    so, se = p.communicate(timeout=600)
    assert p.returncode == 0, se
    assert json.loads(so.strip().splitlines()[-1])["processed_now"] == 0
    assert tree_bytes(out) == tree_bytes(refout)

    procs = [_cli("embed", str(out), "--workers", "1", "--shard-size", "4", "--part", f"{k}/2", "--json")
             for k in (1, 2)]
    for p in procs:
        so, se = p.communicate(timeout=600)
        assert p.returncode == 0, se[-2000:]
    p = _cli("embed", str(out), "--json")
    so, se = p.communicate(timeout=600)
    assert p.returncode == 0, se
    assert json.loads(so.strip().splitlines()[-1])["embedded_now"] == 0
    for name in STORE:
        assert (out / name).read_bytes() == (refout / name).read_bytes(), name


def test_a_part_with_another_shard_size_is_refused(ref, tmp_path):
    raw, _ = ref
    out = tmp_path / "out"
    run_align(raw, out, AlignConfig(), workers=1, shard_size=2, part="1/4", show_progress=False)
    p = _cli("align", str(raw), str(out), "--shard-size", "3", "--part", "2/4")
    _, se = p.communicate(timeout=300)
    assert p.returncode == 1 and "--shard-size" in se and "Traceback" not in se
    p = _cli("align", str(raw), str(out), "--part", "2/4", "--overwrite")
    _, se = p.communicate(timeout=300)
    assert p.returncode == 1 and "--overwrite cannot be combined with --part" in se


def test_a_shard_that_keeps_failing_is_named_and_a_rerun_completes_it(ref, tmp_path):
    raw, refout = ref
    out = tmp_path / "out"
    blocker = out / ".facecurate" / "align" / "shard_000001.csv"
    blocker.mkdir(parents=True)  # the shard's manifest cannot be written: it fails on every try
    p = _cli("align", str(raw), str(out), "--workers", "2", "--shard-size", "2")
    _, se = p.communicate(timeout=600)
    assert p.returncode == 1, se
    assert "shard_000001" in se and "kept failing" in se and "Traceback" not in se
    assert not (out / "align.csv").exists()  # no merge of an incomplete run
    blocker.rmdir()
    p = _cli("align", str(raw), str(out), "--workers", "2", "--json")
    so, se = p.communicate(timeout=600)
    assert p.returncode == 0, se
    assert json.loads(so.strip().splitlines()[-1])["processed_now"] == 2  # only the failed shard
    assert tree_bytes(out) == tree_bytes(refout)


def test_a_killed_runs_temporaries_go_when_their_shard_reruns(ref, tmp_path):
    """What a killed run leaves under temporary names (crops, a shard's data and
    record, a merged output) is removed when that shard runs again; temporaries of
    finished shards, which no run will write again, are left to the user."""
    raw, refout = ref
    out = tmp_path / "out"
    shutil.copytree(refout, out)
    work, ework = out / ".facecurate" / "align", out / ".facecurate" / "embed"
    with open(work / "shard_000003.csv", newline="") as f:
        crops = [r["aligned"] for r in csv.DictReader(f)]
    assert len(crops) == 2 and all(c.endswith("_0.jpg") for c in crops)
    (work / "shard_000003.json").unlink()  # shard 3 of align and shard 1 of embed were killed
    (ework / "shard_000001.json").unlink()
    planted = [out / Path(c).parent / f".{Path(c).name}.k1ll3d_.tmp" for c in crops] + [
        work / ".shard_000003.csv.ab12cd34.tmp", work / ".shard_000003.json.4242.tmp",
        out / ".align.csv.zz9x8y7w.tmp", ework / ".shard_000001.npz.q1w2e3r4.tmp",
        out / ".embeddings.npy.a1b2c3d4.tmp"]
    kept = [work / ".shard_000005.json.ab12cd34.tmp", out / ".notes.txt.ab12cd34.tmp"]
    for p in planted + kept:
        p.write_bytes(b"half")
    s = run_align(raw, out, AlignConfig(), workers=1, show_progress=False)
    e = run_embed(out, workers=1, show_progress=False)
    assert s["processed_now"] == 2 and e["embedded_now"] == 4
    assert [p for p in planted if p.exists()] == []
    assert all(p.exists() for p in kept)
    for p in kept:
        p.unlink()
    assert tree_bytes(out) == tree_bytes(refout)
    for name in STORE:
        assert (out / name).read_bytes() == (refout / name).read_bytes(), name
    assert not list(out.rglob("*.tmp"))


def test_align_then_embed_in_one_process_never_forks(ref, tmp_path, monkeypatch):
    """eval-pairs runs align in-process (cv2's threads start) and then embed: its
    workers must be spawned, never forked (a forked child of a threaded process can
    deadlock). Spawn starts children with fork+exec in C, never os.fork."""
    raw, refout = ref

    def no_fork():
        raise AssertionError("os.fork called")

    monkeypatch.setattr(os, "fork", no_fork)
    out = tmp_path / "out"
    run_align(raw, out, AlignConfig(), workers=2, show_progress=False)
    s = run_embed(out, workers=2, chunk_size=4, runtime="dlib", show_progress=False)  # dlib: processes
    assert s["workers"] == 2  # a spawned child and this process
    assert s["embedded"] == s["embedded_now"] > 0
