"""The distributor: shard order, shared arrays, workers that die with their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

from facecurate.engines.local import LocalPool, distribute


def _rowsum(t):
    handle, a, b = t
    return float(np.asarray(handle.get()[a:b]).sum()), os.getpid()


def _square(x):
    time.sleep(0.05 if x % 3 == 0 else 0)  # finish out of order
    return x * x


def test_results_come_in_shard_order():
    assert list(distribute(list(range(12)), _square, workers=2)) == [x * x for x in range(12)]
    assert list(distribute(list(range(5)), _square, workers=1)) == [x * x for x in range(5)]


def test_shared_array_reaches_the_workers_as_a_read_only_map():
    x = np.arange(100_000, dtype=np.float32).reshape(1000, 100)
    with LocalPool(2) as pool:
        h = pool.share(x)
        got = list(pool.map(_rowsum, [(h, a, a + 100) for a in range(0, 1000, 100)]))
    assert [s for s, _ in got] == [float(x[a:a + 100].sum()) for a in range(0, 1000, 100)]
    assert {pid for _, pid in got} - {os.getpid()}  # ran in workers


_KILLED_PARENT = """
import os, sys, time
from facecurate.engines.local import LocalPool
def f(_):
    return os.getpid()
if __name__ == "__main__":
    pool = LocalPool(2)
    print(" ".join(map(str, sorted(set(pool.map(f, list(range(8))))))), flush=True)
    time.sleep(60)
"""


def test_workers_die_with_a_killed_parent(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(_KILLED_PARENT)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in proc.stdout.readline().split()]
    assert pids and os.getpid() not in pids
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    alive = pids
    while alive and time.time() < deadline:
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and "Z" not in _state(p)]
        time.sleep(0.1)
    assert not alive


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_engine_ray_without_ray_is_one_line(photos_dir, tmp_path, monkeypatch):
    """--engine ray where Ray is not installed (sys.modules['ray'] = None makes
    the import fail as it does then): one line saying how to install it."""
    from click.testing import CliRunner

    from facecurate.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    raw = tmp_path / "raw" / "someone"
    raw.mkdir(parents=True)
    (raw / "a.jpg").write_bytes((photos_dir / "id00" / "img10.jpg").read_bytes())
    res = CliRunner().invoke(main, ["align", str(raw.parent), str(tmp_path / "out"), "--engine", "ray"])
    assert isinstance(res.exception, SystemExit) and res.exit_code == 1, res.output
    assert res.output.strip() == "Error: --engine ray needs Ray: pip install 'facecurate[ray]' (Python 3.10+)"


def test_ray_address_without_engine_ray_is_one_line(tmp_path):
    """--ray-address with the local engine would be silently ignored: it is refused."""
    from click.testing import CliRunner

    from facecurate.cli import main

    (tmp_path / "raw" / "someone").mkdir(parents=True)
    res = CliRunner().invoke(main, ["align", str(tmp_path / "raw"), str(tmp_path / "out"),
                                    "--ray-address", "127.0.0.1:6379"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip() == "Error: --ray-address is for --engine ray (this run's engine is local)"
