"""The Ray engine on a real multi-node Ray cluster on this host (never a mock):
byte-identical outputs to the local engine, a node removed mid-run, a run started
under one engine and finished under the other, workers that cannot see RAW, and
GPU workers asking Ray for a GPU. One cluster for the whole module (Ray starts in
seconds, not milliseconds); small object stores and no dashboard (2-core CI)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from facecurate.align.align import AlignConfig, run_align  # noqa: E402
from facecurate.embed.embed import run_embed  # noqa: E402
from facecurate.engines.ray_engine import RayEngine  # noqa: E402

from test_parts import STORE, lfw_raw, tree_bytes  # noqa: E402

NODE = {"num_cpus": 1, "object_store_memory": 200 * 1024 * 1024}


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args=dict(NODE, include_dashboard=False))
    c.add_node(**NODE)
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def ref(lfw_dir, lfw_dev_ids, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    raw = lfw_raw(lfw_dir, lfw_dev_ids, tmp, n_ids=12, per_id=3)
    out = tmp / "ref"
    run_align(raw, out, AlignConfig(), workers=2, shard_size=2, show_progress=False)
    run_embed(out, workers=2, chunk_size=4, show_progress=False)
    return raw, out


def test_align_and_embed_on_two_nodes_identical_to_local(cluster, ref, tmp_path):
    raw, refout = ref
    out = tmp_path / "out"
    s = run_align(raw, out, AlignConfig(), engine="ray", shard_size=2, show_progress=False)
    assert s["engine"]["name"] == "ray" and s["engine"]["workers"] == 2
    assert len(s["engine"]["nodes"]) == 2  # both nodes did shards
    assert s["processed_now"] == 36 and not s["engine"]["failed"]
    assert tree_bytes(out) == tree_bytes(refout)
    e = run_embed(out, engine="ray", chunk_size=4, show_progress=False)
    assert e["engine"]["name"] == "ray" and e["embedded_now"] == e["embedded"]
    for name in STORE:
        assert (out / name).read_bytes() == (refout / name).read_bytes(), name
    assert ray.is_initialized()  # a cluster the run connected to is left running


def test_interrupted_locally_finished_on_ray_and_back(cluster, ref, tmp_path):
    raw, refout = ref
    out = tmp_path / "out"
    run_align(raw, out, AlignConfig(), workers=1, shard_size=2, part="1/3", show_progress=False)
    s = run_align(raw, out, AlignConfig(), engine="ray", show_progress=False)
    assert s["resumed"] == 12 and s["processed_now"] == 24  # shards 0, 3, 6, ... were done
    assert tree_bytes(out) == tree_bytes(refout)
    run_embed(out, engine="ray", chunk_size=4, part="2/2", show_progress=False)
    e = run_embed(out, workers=1, show_progress=False)  # the local engine finishes the store
    assert e["resumed"] > 0 and e["embedded_now"] > 0
    for name in STORE:
        assert (out / name).read_bytes() == (refout / name).read_bytes(), name


def test_worker_that_cannot_see_raw_fails_clearly(cluster, tmp_path):
    from facecurate.engines.runner import WorkerSpec, WorkerSetupError, plan_shards

    spec = WorkerSpec(dict, (), str(tmp_path), must_see=(str(tmp_path / "not-mounted"),))
    t0 = time.monotonic()
    with pytest.raises(WorkerSetupError, match="cannot see .*not-mounted.*same path"):
        list(RayEngine().run(spec, plan_shards(["a", "b"], str, 1)))
    assert time.monotonic() - t0 < 60  # no hang


def test_gpu_workers_ask_for_a_gpu(cluster):
    from facecurate.engines.runner import WorkerSpec

    spec = WorkerSpec(dict, (), "/tmp", gpu=True)
    eng = RayEngine()
    assert eng.lanes(WorkerSpec(dict, (), "/tmp"), 10) == 2 and eng.resources["num_gpus"] == 0
    node = cluster.add_node(num_cpus=0, num_gpus=1, object_store_memory=NODE["object_store_memory"])
    try:
        cluster.wait_for_nodes()
        assert eng.lanes(spec, 10) == 1  # one worker per GPU of the cluster
        assert eng.resources == {"num_cpus": 0, "num_gpus": 1}
    finally:
        cluster.remove_node(node)


def test_node_removed_mid_run_costs_only_its_shards(cluster, ref, tmp_path):
    """A third, slow node joins; when its worker has finished one shard (and holds
    the next), the worker is killed and the node removed. Its shards in flight are retried elsewhere: nothing lost or doubled."""
    raw, refout = ref
    node = cluster.add_node(**NODE, env_vars={"FACECURATE_SHARD_DELAY": "3"})  # a slow node
    cluster.wait_for_nodes()
    out = tmp_path / "out"
    removed = []

    def remove_once(rec):  # once the new node's worker has finished a shard (and holds another)
        if not removed and rec["node"].endswith(node.node_id[:8]):
            removed.append(rec)
            cluster.remove_node(node, allow_graceful=False)

    s = run_align(raw, out, AlignConfig(), engine="ray", shard_size=3, show_progress=False,
                  on_shard=remove_once)
    assert removed, s["engine"]
    assert s["engine"]["workers"] == 3
    assert s["engine"]["retries"] >= 1  # the removed node held shards in flight
    assert not s["engine"]["failed"] and s["processed_now"] == 36
    assert tree_bytes(out) == tree_bytes(refout)
    records = sorted((out / ".facecurate" / "align").glob("shard_*.json"))
    assert len(records) == 12 and not list(out.rglob("*.tmp"))


def test_a_shard_that_keeps_failing_on_ray_is_named_and_a_rerun_completes_it(cluster, ref, tmp_path):
    """A shard whose manifest can never be written fails on every worker it is tried
    on; the run names it, merges nothing and raises; the same call then redoes only it."""
    from facecurate.align.align import AlignError
    from facecurate.engines.runner import MAX_SHARD_RETRIES

    raw, refout = ref
    out = tmp_path / "out"
    blocker = out / ".facecurate" / "align" / "shard_000004.csv"
    blocker.mkdir(parents=True)
    with pytest.raises(AlignError, match=r"1 shard\(s\) kept failing .*shard_000004 \(2 items\)") as e:
        run_align(raw, out, AlignConfig(), engine="ray", shard_size=2, show_progress=False)
    assert f"cannot write: Is a directory: '{blocker}'" in str(e.value)
    assert not list(out.rglob("*.tmp"))
    assert not (out / "align.csv").exists()  # no merge of an incomplete run
    records = list((out / ".facecurate" / "align").glob("shard_*.json"))
    assert len(records) == 17  # every other shard finished, each once
    blocker.rmdir()
    s = run_align(raw, out, AlignConfig(), engine="ray", show_progress=False)
    assert s["processed_now"] == 2 and s["resumed"] == 34 and MAX_SHARD_RETRIES >= 1
    assert tree_bytes(out) == tree_bytes(refout)


def test_cli_driver_killed_then_rerun_continues(cluster, ref, tmp_path):
    """The real CLI on the cluster: kill the driver (SIGKILL) once shards are done;
    no half-written file remains, Ray ends its workers, and the rerun (local engine)
    finishes byte-identical."""
    import subprocess
    import sys

    raw, refout = ref
    out = tmp_path / "out"
    env = dict(os.environ, RAY_ADDRESS=cluster.address)
    cmd = [sys.executable, "-m", "facecurate", "align", str(raw), str(out), "--shard-size", "1"]
    proc = subprocess.Popen(cmd + ["--engine", "ray"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    work = out / ".facecurate" / "align"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(work.glob("shard_*.json"))) < 4:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done = len(list(work.glob("shard_*.json")))
    assert 4 <= done < 36 and not (out / "align.csv").exists()
    res = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    import json

    s = json.loads(res.stdout.strip().splitlines()[-1])
    assert s["resumed"] >= done and s["processed_now"] + s["resumed"] == 36
    assert tree_bytes(out) == tree_bytes(refout)
    assert not [p for p in out.rglob("*") if p.is_file() and ".tmp" in p.name and ".facecurate" not in p.parts]


def test_onnx_embed_runs_on_the_gpu_node(cluster, ref, tmp_path):
    """An ONNX recogniser's workers ask Ray for a GPU: on a cluster whose only GPU (a
    logical one) is on a third node, every shard runs there; the store equals the
    local engine's (ONNX Runtime falls back to its CPU provider on this machine)."""
    pytest.importorskip("onnxruntime")
    from test_embed import build_recognizer

    _, refout = ref
    model = build_recognizer(tmp_path / "tiny.onnx")
    local = run_embed(refout, model=str(model), flip=False, chunk_size=8, store_dir=tmp_path / "local",
                      show_progress=False)
    node = cluster.add_node(num_cpus=0, num_gpus=1, object_store_memory=NODE["object_store_memory"])
    try:
        cluster.wait_for_nodes()
        s = run_embed(refout, model=str(model), flip=False, engine="ray", chunk_size=8,
                      store_dir=tmp_path / "ray", show_progress=False)
    finally:
        cluster.remove_node(node)
    assert s["engine"]["workers"] == 1 and list(s["engine"]["nodes"]) == [
        next(k for k in s["engine"]["nodes"] if k.endswith(node.node_id[:8]))]
    assert s["embedded"] == local["embedded"] > 0
    for name in STORE:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


def test_an_address_where_no_cluster_answers_fails_at_once(photos_dir, tmp_path):
    """--ray-address (or RAY_ADDRESS) where nothing listens: one line within seconds
    (Ray alone retries such an address for minutes). A fresh process: this module's
    driver is already connected. Needs no cluster."""
    import socket
    import subprocess
    import sys

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # a port nothing listens on
    raw = tmp_path / "raw" / "someone"
    raw.mkdir(parents=True)
    (raw / "a.jpg").write_bytes((photos_dir / "id00" / "img10.jpg").read_bytes())
    cmd = [sys.executable, "-m", "facecurate", "align", str(raw.parent), str(tmp_path / "out"), "--engine", "ray"]
    for extra, env in ((["--ray-address", f"127.0.0.1:{port}"], {}), ([], {"RAY_ADDRESS": f"127.0.0.1:{port}"})):
        p = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=60, env=dict(os.environ, **env))
        assert p.returncode == 1, p.stderr
        assert p.stderr.strip() == (f"Error: cannot connect to the Ray cluster at 127.0.0.1:{port}: nothing answers "
                                    "there (Connection refused); start it first (ray start --head) or fix "
                                    "--ray-address / RAY_ADDRESS"), p.stderr


def test_a_worker_setup_error_is_named_in_one_line(cluster, tmp_path):
    """A worker whose setup raises (here the stage's factory: int('x')) fails the
    shard with that error's own line, not a Ray traceback nor only "no Ray worker
    left"."""
    from facecurate.engines.runner import WorkerSpec, plan_shards

    spec = WorkerSpec(int, ("x",), str(tmp_path))
    t0 = time.monotonic()
    out = list(RayEngine(max_retries=0).run(spec, plan_shards(["a"], str, 1)))
    assert time.monotonic() - t0 < 120
    assert len(out) == 1 and out[0].record is None and "\n" not in out[0].error
    assert "worker setup failed: ValueError: invalid literal for int() with base 10: 'x'" in out[0].error


def _align_on_a_new_ray(photos_dir, tmp_path, cwd: Path, stale_cluster_file: bool):
    """`facecurate align --engine ray` in a fresh process that starts its own Ray, in
    a private Ray temp folder (short: Ray's socket paths), from ``cwd``."""
    import shutil
    import subprocess
    import sys
    import tempfile

    raw = tmp_path / "raw" / "someone"
    raw.mkdir(parents=True)
    for name in ("img10.jpg", "img11.jpg"):
        (raw / name).write_bytes((photos_dir / "id00" / name).read_bytes())
    ray_tmp = Path(tempfile.mkdtemp(prefix="fcray", dir="/tmp"))
    try:
        if stale_cluster_file:  # what a cluster that is gone leaves behind
            (ray_tmp / "ray").mkdir()
            (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:6999\n")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = str(ray_tmp)
        cli = Path(sys.executable).parent / "facecurate"  # the console script, as a user runs it
        return subprocess.run([str(cli), "align", str(raw.parent), str(tmp_path / "out"), "--engine", "ray",
                               "--json"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_stale_cluster_file_still_starts_a_new_local_instance(photos_dir, tmp_path):
    """No address and no Ray running, but Ray's temp folder names an old cluster: the
    run starts its own instance (it used to fail: "When connecting to an existing
    cluster, object_store_memory must not be provided"). Needs no cluster."""
    import json

    p = _align_on_a_new_ray(photos_dir, tmp_path, tmp_path, stale_cluster_file=True)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["engine"]["name"] == "ray" and s["crops"] == 2


def test_ray_workers_import_facecurate_from_any_working_folder(photos_dir, tmp_path):
    """Run from the folder that holds a checkout named `facecurate`: Ray puts the
    driver's working folder on the workers' path, where that folder used to shadow
    the package ("cannot import name '__version__' from 'facecurate'")."""
    import json

    home = tmp_path / "home"
    home.mkdir()
    (home / "facecurate").symlink_to(Path(__file__).resolve().parent.parent, target_is_directory=True)
    assert not (home / "facecurate" / "__init__.py").exists()  # a namespace package there
    p = _align_on_a_new_ray(photos_dir, tmp_path, home, stale_cluster_file=False)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["crops"] == 2


def test_clean_of_a_packed_dataset_on_two_nodes_identical_to_local(cluster, tmp_path):
    """clean's four steps on the cluster's two nodes; then again with a third, slow node
    removed once it has finished a shard (its shards in flight are retried elsewhere)."""
    from facecurate.clean.clean_rec import run_clean_rec
    from test_clean_staged import fresh, outputs, synthetic

    src = synthetic(tmp_path, 12_000, 1_200)
    ref = fresh(src, tmp_path / "ref")
    run_clean_rec(ref, shard_faces=1_500, workers=2, show_progress=False)
    dest = fresh(src, tmp_path / "ray")
    s = run_clean_rec(dest, engine="ray", shard_faces=1_500, show_progress=False)
    assert s["engine"]["name"] == "ray"
    assert len(s["engine"]["steps"]["analyse"]["nodes"]) == 2  # both nodes did shards
    assert outputs(dest) == outputs(ref)

    node = cluster.add_node(**NODE, env_vars={"FACECURATE_SHARD_DELAY": "2"})
    cluster.wait_for_nodes()
    removed = []

    def remove_once(step, rec):
        if not removed and step == "decide" and rec["node"].endswith(node.node_id[:8]):
            removed.append(rec)
            cluster.remove_node(node, allow_graceful=False)

    dest = fresh(src, tmp_path / "ray-removed")
    s = run_clean_rec(dest, engine="ray", shard_faces=1_500, show_progress=False, on_shard=remove_once)
    assert removed, s["engine"]
    # whether the node held another shard when it went depends on timing (a retry if so):
    # either way every shard is recorded once and the outputs are the same bytes
    assert all(not v.get("failed") for v in s["engine"]["steps"].values())
    assert outputs(dest) == outputs(ref)
