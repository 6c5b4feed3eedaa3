"""Benchmark: faces/s of ``facecurate embed`` against a naive loop, in one run.

The naive loop is what the blog recipes do: for each face, one after another, read
the photo, cut dlib's chip, call ``compute_face_descriptor`` on that one chip,
normalise. ``facecurate embed`` feeds the same model the same chips in batches,
with ``--workers`` processes (default: all cores). Both run on the same few hundred
LFW *dev* photos, aligned first with ``facecurate align`` (not timed).

    python benchmarks/embed.py [--n 300] [--data ../shared/data] [--flip]
    python benchmarks/embed.py --runtimes --flip [--n 300]

Prints faces/s of: the naive loop, embed with 1 worker (batching alone) and embed
with all workers (all with ``--runtime dlib``), and the ratios against the naive loop.

``--runtimes`` instead times ``facecurate embed`` (the CLI, each run in a fresh
process) with ``--runtime dlib`` (dlib, one process per core) against ``--runtime
onnx`` (dlib's network converted to ONNX, one ONNX Runtime session, batched, on the
CPU here), interleaved rounds, and reports faces/s, the ratio, and the peak memory
of each run: the largest sum over the process tree of PSS (shared pages split
between the processes sharing them), sampled every 20 ms. The conversion runs once
before the rounds (its time is printed separately); the two stores are checked to
agree (cosine >= 0.99999 per face).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="number of LFW dev photos")
    ap.add_argument("--data", default=os.environ.get("FACECURATE_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--workers", type=int, default=None, help="embed workers (default: all cores)")
    ap.add_argument("--flip", action="store_true")
    ap.add_argument("--work", default=None, help="keep the aligned photos here (default: a temp folder)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--runtimes", action="store_true", help="dlib runtime vs ONNX runtime (see above)")
    args = ap.parse_args()

    from facecurate.align.align import AlignConfig, run_align
    from facecurate.embed.embed import Loader, items_from_align, load_store, run_embed
    from facecurate.models.dlib_resnet import DlibEmbedder

    data = Path(args.data)
    lfw, ids = data / "lfw", (data / "splits" / "lfw-dev.txt").read_text().split()
    tmp = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fc-bench-embed-"))
    raw, out = tmp / "raw", tmp / "out"
    n = 0
    for ident in sorted(ids):
        for f in sorted((lfw / ident).glob("*.jpg")):
            if n >= args.n:
                break
            dst = raw / ident / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                dst.symlink_to(f)
            n += 1
    print(f"aligning {n} LFW dev photos into {out} (not timed) ...", file=sys.stderr)
    run_align(raw, out, AlignConfig(follow_external_links=True), show_progress=False)  # RAW links to LFW
    items, _ = items_from_align(out)
    faces = len(items)
    if args.runtimes:
        return compare_runtimes(args, out, tmp, faces)

    def cpu() -> float:
        import resource

        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    def naive_loop():
        # one face at a time, same model, same chips: read the photo, cut the chip, describe
        emb = DlibEmbedder("five")
        loader = Loader()
        return np.array([emb.run([emb.chip(it, loader)[0]], args.flip)[0] for it in items])

    def embed(workers, label):
        store = tmp / f"store-{label}"
        run_embed(out, workers=workers, flip=args.flip, show_progress=False, store_dir=store, overwrite=True,
                  runtime="dlib")
        return load_store(store)[0]

    runs = {"naive": lambda: naive_loop(), "embed_1_worker": lambda: embed(1, "w1"),
            "embed": lambda: embed(args.workers, "wn")}
    times: dict[str, list] = {k: [] for k in runs}
    cpus: dict[str, list] = {k: [] for k in runs}
    ref = None
    for _ in range(args.repeat):  # interleaved, so load from other processes hits all alike
        for k, fn in runs.items():
            t0, c0 = time.perf_counter(), cpu()
            v = fn()
            times[k].append(time.perf_counter() - t0)
            cpus[k].append(cpu() - c0)
            if ref is None:
                ref = v
            assert np.allclose(v, ref, atol=1e-6), f"{k} and the naive loop disagree"
    med = {k: float(np.median(v)) for k, v in times.items()}
    res = {"faces": faces, "cores": os.cpu_count(), "flip": args.flip, "repeat": args.repeat,
           "load_average_1min": round(os.getloadavg()[0], 2)}
    for k in runs:
        res[f"{k}_faces_per_s"] = round(faces / med[k], 2)
        res[f"{k}_ratio"] = round(med["naive"] / med[k], 2)
        res[f"{k}_cores_used"] = round(float(np.median(cpus[k])) / med[k], 2)
    res["embed_workers"] = args.workers or os.cpu_count()
    if args.json:
        print(json.dumps(res, sort_keys=True))
    else:
        print(f"faces: {faces} on {res['cores']} cores (flip={args.flip}), median of {args.repeat} "
              f"interleaved rounds; 1-min load average at the end {res['load_average_1min']}")
        print(f"  naive loop (one face at a time): {res['naive_faces_per_s']:.2f} faces/s "
              f"(using {res['naive_cores_used']:.2f} cores)")
        print(f"  embed, 1 worker (batches):       {res['embed_1_worker_faces_per_s']:.2f} faces/s "
              f"= {res['embed_1_worker_ratio']:.2f}x (using {res['embed_1_worker_cores_used']:.2f} cores)")
        print(f"  embed, {res['embed_workers']} workers:                {res['embed_faces_per_s']:.2f} faces/s "
              f"= {res['embed_ratio']:.2f}x the naive loop (using {res['embed_cores_used']:.2f} cores)")
    return 0


# ----------------------------------------------------------------------------- runtimes
def _tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed_cli(cmd: list[str]) -> tuple[float, float, dict]:
    """(seconds, peak PSS of the process tree in MB, JSON summary) of one CLI run."""
    import subprocess
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], sum(_pss_kb(p) for p in _tree(proc.pid)))
            done.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    elapsed = time.perf_counter() - t0
    done.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")
    return elapsed, peak[0] / 1024.0, json.loads(stdout)


def compare_runtimes(args, out: Path, tmp: Path, faces: int) -> int:
    from facecurate.embed.embed import load_store
    from facecurate.models.dlib_onnx import dlib_resnet_onnx

    t0 = time.perf_counter()
    dlib_resnet_onnx()  # convert once (cached), outside the rounds
    t_convert = time.perf_counter() - t0
    workers = args.workers or os.cpu_count()
    flip = ["--flip" if args.flip else "--no-flip"]
    cmds = {
        "dlib": ["--runtime", "dlib", "--workers", str(workers)],
        "onnx": ["--runtime", "onnx", "--device", "cpu"],
    }
    times: dict[str, list] = {k: [] for k in cmds}
    mem: dict[str, list] = {k: [] for k in cmds}
    summaries: dict = {}
    for _ in range(args.repeat):  # interleaved
        for k, extra in cmds.items():
            cmd = [sys.executable, "-m", "facecurate", "embed", str(out), "--out", str(tmp / f"rt-{k}"),
                   "--overwrite", "--json"] + flip + extra
            sec, peak, summaries[k] = timed_cli(cmd)
            times[k].append(sec)
            mem[k].append(peak)
    vd, vo = load_store(tmp / "rt-dlib")[0], load_store(tmp / "rt-onnx")[0]
    cos = float(np.sum(vd * vo, axis=1).min())
    assert cos >= 0.99999, f"the runtimes disagree: min cosine {cos}"
    med = {k: float(np.median(v)) for k, v in times.items()}
    res = {"faces": faces, "cores": os.cpu_count(), "flip": args.flip, "repeat": args.repeat,
           "convert_seconds": round(t_convert, 2), "min_cosine": cos,
           "load_average_1min": round(os.getloadavg()[0], 2)}
    for k in cmds:
        res[f"{k}_faces_per_s"] = round(faces / med[k], 2)
        res[f"{k}_seconds_all_rounds"] = [round(t, 2) for t in times[k]]
        res[f"{k}_peak_pss_mb"] = round(float(np.median(mem[k])), 1)
        res[f"{k}_provider"] = summaries[k].get("provider")
    res["onnx_vs_dlib"] = round(med["dlib"] / med["onnx"], 2)
    if args.json:
        print(json.dumps(res, sort_keys=True))
        return 0
    print(f"faces: {faces} on {res['cores']} cores (flip={args.flip}), `facecurate embed` per run (process "
          f"start, model load, chips, store), median of {args.repeat} interleaved rounds; 1-min load "
          f"average at the end {res['load_average_1min']}")
    print(f"  --runtime dlib ({workers} processes): {res['dlib_faces_per_s']:.2f} faces/s, peak PSS "
          f"{res['dlib_peak_pss_mb']:.0f} MB")
    print(f"  --runtime onnx ({res['onnx_provider']}, batched): {res['onnx_faces_per_s']:.2f} faces/s, peak PSS "
          f"{res['onnx_peak_pss_mb']:.0f} MB  = {res['onnx_vs_dlib']:.2f}x dlib")
    print(f"  conversion (once, cached): {t_convert:.2f} s; min cosine between the stores {cos:.7f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
