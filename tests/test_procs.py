"""A killed or interrupted run leaves no process behind, Ctrl-C says the same in every
stage, and a second run on the same OUT is refused while the first lives. The real
CLI runs as a subprocess on real LFW-dev photos with dlib's real models; the signals
are real (SIGKILL, SIGTERM, SIGINT to the process group as a terminal sends it)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facecurate.align.align import AlignConfig, run_align

PHOTOS = 240  # enough work for a 2-worker run to be caught in the middle


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "facecurate", *map(str, args)]


@pytest.fixture(scope="module")
def lfw_raw(lfw_dir, lfw_dev_ids, tmp_path_factory) -> Path:
    """RAW of copies of the first PHOTOS LFW-dev photos (up to 3 per identity)."""
    raw = tmp_path_factory.mktemp("procs") / "raw"
    n = 0
    for ident in lfw_dev_ids:
        files = sorted((lfw_dir / ident).glob("*.jpg"))[:3]
        if not files:
            continue
        (raw / ident).mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, raw / ident / f.name)
            n += 1
        if n >= PHOTOS:
            break
    return raw


@pytest.fixture(scope="module")
def lfw_out(lfw_raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("procs") / "out"
    run_align(lfw_raw, out, AlignConfig(), workers=2, show_progress=False)
    return out


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid: int) -> set[int]:
    kids, out, todo = _children(), set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (whoever adopted it has not reaped it yet)


def _default_sigint() -> None:
    """In the child before exec: Ctrl-C as a terminal's program gets it. A pytest
    started in the background (``cmd &`` in a script) inherits an ignored SIGINT, and
    its children would too: the CLI would then never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    err = tmp_path / f"stderr-{len(list(tmp_path.glob('stderr-*')))}.txt"
    p = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=open(err, "wb"),
                         start_new_session=True, preexec_fn=_default_sigint)
    return p, err


def _wait_for_workers(p: subprocess.Popen, n: int, seconds: float = 60) -> set[int]:
    """Wait until the run has ``n`` descendants and they had a moment to load their
    models and start working; return them."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        assert p.poll() is None, "the run ended before it could be interrupted"
        kids = descendants(p.pid)
        if len(kids) >= n:
            time.sleep(2.0)
            assert p.poll() is None, "the run ended before it could be interrupted"
            return descendants(p.pid)
        time.sleep(0.05)
    raise AssertionError(f"no {n} worker processes appeared")


def _assert_all_gone(pids: set[int], seconds: float = 5.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        left = {q for q in pids if _alive(q)}
        if not left:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes still running {seconds:.0f} s after their parent died: {sorted(left)}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_align_leaves_no_process_and_reruns(lfw_raw, tmp_path, sig):
    out = tmp_path / "out"
    p, err = _start(["align", lfw_raw, out, "--workers", "2"], tmp_path)
    kids = _wait_for_workers(p, 2)  # a worker and the resource tracker
    os.kill(p.pid, sig)
    p.wait(30)
    _assert_all_gone(kids)
    # the dead run's lock does not block the rerun, which finishes the job
    done = subprocess.run(_cli("align", lfw_raw, out, "--workers", "2", "--json"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert '"files": ' in done.stdout and "resumed" in done.stdout


def test_second_align_on_the_same_out_is_refused(lfw_raw, tmp_path):
    out = tmp_path / "out"
    p, _ = _start(["align", lfw_raw, out, "--workers", "2"], tmp_path)
    try:
        _wait_for_workers(p, 2)
        second = subprocess.run(_cli("align", lfw_raw, out, "--workers", "1"), capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 1
        assert f"pid {p.pid}" in second.stderr and "Traceback" not in second.stderr
        assert p.poll() is None  # the first run goes on
    finally:
        p.kill()
        p.wait(30)


def test_killed_embed_leaves_no_process_quietly(lfw_out, tmp_path):
    store = tmp_path / "store"
    p, err = _start(["embed", lfw_out, "--out", store, "--workers", "2", "--runtime", "dlib"], tmp_path)
    kids = _wait_for_workers(p, 2)  # two forked workers
    os.kill(p.pid, signal.SIGKILL)
    p.wait(30)
    _assert_all_gone(kids)
    time.sleep(0.5)
    assert "Traceback" not in err.read_text(), err.read_text()


def test_second_embed_on_the_same_store_is_refused(lfw_out, tmp_path):
    store = tmp_path / "store"
    p, _ = _start(["embed", lfw_out, "--out", store, "--workers", "2", "--runtime", "dlib"], tmp_path)
    try:
        _wait_for_workers(p, 2)
        second = subprocess.run(_cli("embed", lfw_out, "--out", store, "--workers", "1", "--runtime", "dlib"),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 1 and f"pid {p.pid}" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
    finally:
        p.kill()
        p.wait(30)


@pytest.mark.parametrize("stage", ["align", "embed"])
def test_ctrl_c_same_message_and_status_in_every_stage(stage, lfw_raw, lfw_out, tmp_path):
    args = ["align", lfw_raw, tmp_path / "out", "--workers", "2"] if stage == "align" else \
        ["embed", lfw_out, "--out", tmp_path / "store", "--workers", "2", "--runtime", "dlib"]
    p, err = _start(args, tmp_path)
    kids = _wait_for_workers(p, 2)
    os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert p.wait(60) == 130
    text = err.read_text()
    assert "Error: interrupted" in text and "rerun the same command" in text, text
    assert "Traceback" not in text and "Aborted" not in text, text
    _assert_all_gone(kids)


def test_run_lock_is_per_part_and_released_by_the_kernel(tmp_path):
    from facecurate.common.procs import LockedError, lock_path, run_lock

    with run_lock(tmp_path, "align"):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            with run_lock(tmp_path, "align"):
                pass
        with run_lock(tmp_path, "align", part=(1, 4)), run_lock(tmp_path, "align", part=(2, 4)):
            pass  # disjoint parts of one run lock separately
    assert lock_path(tmp_path, "align", (1, 4)).name == "align.part-1-of-4.lock"
    # a lock file left by a killed holder does not block
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom facecurate.common.procs import run_lock\n"
                               f"with run_lock({str(tmp_path)!r}, 'embed'):\n    print('held', flush=True)\n"
                               "    time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LockedError, match=f"pid {holder.pid}"):
        with run_lock(tmp_path, "embed"):
            pass
    holder.kill()
    holder.wait()
    with run_lock(tmp_path, "embed"):
        pass


# ----------------------------------------------------------------------------- PSS
MB = 1 << 20
#: A python child that touches 200 MB (bytes multiplication writes every page), says
#: so, and holds it until its stdin closes.
HOLD_200MB = ("import sys\nbuf = b'\\x01' * (200 << 20)\nprint('ready', flush=True)\nsys.stdin.read()\n")
#: ... the same, then forks a child that only reads the 200 MB (sha256 over all of
#: it) and holds them too: the pages are shared copy-on-write, never copied.
FORK_READER = ("import hashlib, os, sys\nbuf = b'\\x01' * (200 << 20)\npid = os.fork()\n"
               "if pid == 0:\n    hashlib.sha256(buf).digest()\n    print('ready', flush=True)\n"
               "    sys.stdin.read()\n    os._exit(0)\nsys.stdin.read()\nos.waitpid(pid, 0)\n")


def _start_python(code: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def _stop(p: subprocess.Popen) -> None:
    p.stdin.close()
    assert p.wait(30) == 0


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_tree_pss_counts_a_child_that_allocates():
    from facecurate.common.procs import descendants, tree_pss

    base = tree_pss(os.getpid())
    child = _start_python(HOLD_200MB)
    try:
        assert child.pid in descendants(os.getpid())
        assert tree_pss(os.getpid()) - base >= 150 * MB
    finally:
        _stop(child)
    assert tree_pss(os.getpid()) - base < 100 * MB  # gone with the child
    assert tree_pss(child.pid) == 0  # a process that no longer exists: nothing, no error


def test_tree_pss_counts_pages_shared_by_a_fork_once():
    """A parent with 200 MB touched forks a child that reads all of it: RSS summed over
    the two counts the 200 MB twice, the tree's PSS once."""
    from facecurate.common.procs import descendants, tree_pss

    parent = _start_python(FORK_READER)
    try:
        kids = descendants(parent.pid)
        assert len(kids) == 1
        assert _rss(parent.pid) + _rss(kids[0]) > 380 * MB  # what summing RSS would report
        assert 190 * MB < tree_pss(parent.pid) < 300 * MB
    finally:
        _stop(parent)


def test_pss_sampler_keeps_the_peak_of_a_child_that_came_and_went():
    from facecurate.common.procs import PssSampler, tree_pss

    base = tree_pss(os.getpid())
    with PssSampler(interval=0.05) as s:
        subprocess.run([sys.executable, "-c", "import time\nbuf = b'\\x01' * (200 << 20)\ntime.sleep(1.0)\n"],
                       check=True)
    after = tree_pss(os.getpid())
    assert s.peak - base >= 150 * MB
    assert s.peak - after >= 150 * MB  # the peak is a sample taken while the child lived
    assert s.samples >= 10
