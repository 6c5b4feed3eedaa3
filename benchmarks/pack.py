"""Benchmark for `facecurate pack` (issue 5, part 6).

Stages:

  crops   a few thousand real 112x112 ArcFace crops of LFW *dev* photos (dlib HOG +
          68 landmarks -> 5 points -> geometry.align_face, JPEG q95), cached under
          /tmp/fc/cache/crops_lfw_dev_<N>/<identity>/<Name>_NNNN.jpg (made once).
  time    in the same run, on the same bytes, best of --repeat:
            facecurate pack (the API, plain layout, no shuffle)
            MXNet's own writer (mx.recordio.MXIndexedRecordIO + mx.recordio.pack,
              run in the MXNet oracle's venv, timed inside that process)
            a plain copy of the same bytes into one file (the I/O limit)
          and print images/s, MB/s and the two ratios.

Usage: python benchmarks/pack.py [--n 3000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FACECURATE_DATA", REPO.parent / "shared" / "data")).resolve()
CACHE = Path("/tmp/fc/cache")
ORACLE_PY = Path(os.environ.get("FACECURATE_ORACLE_VENV", Path.home() / ".cache" / "facecurate-oracle")) / "bin" / "python"


def dev_ids() -> list[str]:
    return [s.strip() for s in (DATA / "splits" / "lfw-dev.txt").read_text().splitlines() if s.strip()]


# ----------------------------------------------------------------------------- crops
def make_crops(n: int, per_identity: int = 30) -> Path:
    """Real crops of LFW dev photos, exactly as `facecurate align` makes them."""
    out = CACHE / f"crops_lfw_dev_{n}"
    if (out / "DONE").exists():
        return out
    import cv2
    import numpy as np

    from facecurate.geometry import align_face
    from facecurate.models.dlib_models import DlibHOGDetector, DlibLandmarks68

    det, lm = DlibHOGDetector(max_upsample=1), DlibLandmarks68()
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=CACHE))
    made, t0 = 0, time.time()
    for ident in dev_ids():
        files = sorted(os.listdir(DATA / "lfw" / ident))[:per_identity]
        for f in files:
            bgr = cv2.imread(str(DATA / "lfw" / ident / f))
            if bgr is None:
                continue
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            dets = det.detect(rgb)
            if not dets:
                continue
            c = np.array(rgb.shape[1::-1]) / 2.0  # face nearest the centre is LFW's subject
            d = min(dets, key=lambda d: float(np.sum(((d.box[:2] + d.box[2:]) / 2 - c) ** 2)))
            crop = align_face(rgb, lm.five(lm.predict(rgb, d.box)), 112)
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
            (tmp / ident).mkdir(exist_ok=True)
            (tmp / ident / f).write_bytes(buf.tobytes())
            made += 1
            if made % 200 == 0:
                print(f"  crops: {made}/{n} ({time.time() - t0:.0f} s)", file=sys.stderr)
            if made >= n:
                break
        if made >= n:
            break
    (tmp / "DONE").write_text(f"{made}\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------- time
MX_WRITER = r"""
import sys, time, json
import mxnet as mx
lst, prefix, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3])
items = [l.rstrip("\n").split("\t") for l in open(lst)]
best = None
for _ in range(repeat):
    t0 = time.perf_counter()
    rec = mx.recordio.MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "w")
    for i, (label, path) in enumerate(items):
        with open(path, "rb") as f:
            data = f.read()
        rec.write_idx(i, mx.recordio.pack(mx.recordio.IRHeader(0, float(label), i, 0), data))
    rec.close()
    dt = time.perf_counter() - t0
    best = dt if best is None else min(best, dt)
print(json.dumps({"seconds": best}))
"""


def plain_copy(paths: list[Path], dst: Path) -> None:
    """The limit: the same bytes, read file by file, appended to one file."""
    with open(dst, "wb", buffering=8 << 20) as out:
        for p in paths:
            with open(p, "rb") as f:
                out.write(f.read())
        out.flush()
        os.fsync(out.fileno())


def best_of(repeat: int, fn) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_time(crops: Path, repeat: int, threads: int) -> dict:
    from facecurate.pack import pack

    idents = sorted(d.name for d in crops.iterdir() if d.is_dir())
    items = [(lab, crops / i / f) for lab, i in enumerate(idents) for f in sorted(os.listdir(crops / i))]
    paths = [p for _, p in items]
    n = len(items)
    mb = sum(p.stat().st_size for p in paths) / 1e6
    work = Path(tempfile.mkdtemp(prefix="fc_pack_bench_"))
    try:
        plain_copy(paths, work / "warm.bin")  # page cache warm for everybody
        t_copy = best_of(repeat, lambda: plain_copy(paths, work / "copy.bin"))
        t_pack = best_of(repeat, lambda: pack(crops, work / "fc", shuffle=False, threads=threads))
        lst = work / "mx.lst"
        lst.write_text("".join(f"{lab}\t{p}\n" for lab, p in items))
        if not ORACLE_PY.exists():
            subprocess.run([str(REPO.parent / "shared" / "tools" / "mxnet-oracle"), "/nonexistent"],
                           capture_output=True)  # builds the venv
        r = subprocess.run([str(ORACLE_PY), "-c", MX_WRITER, str(lst), str(work / "mx"), str(repeat)],
                           capture_output=True, text=True, check=True)
        t_mx = json.loads(r.stdout.strip().splitlines()[-1])["seconds"]
        same = (work / "mx.rec").read_bytes() == (work / "fc" / "train.rec").read_bytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = {"facecurate pack": t_pack, "MXNet writer (mx.recordio)": t_mx, "plain copy into one file": t_copy}
    print(f"{n} crops, {mb:.1f} MB, best of {repeat}; pack threads={threads}")
    print(f"{'':30s} {'seconds':>8s} {'images/s':>10s} {'MB/s':>8s}")
    for name, t in rows.items():
        print(f"{name:30s} {t:8.3f} {n / t:10.0f} {mb / t:8.1f}")
    out = {"images": n, "mb": mb, "pack_s": t_pack, "mxnet_s": t_mx, "copy_s": t_copy,
           "speedup_vs_mxnet": t_mx / t_pack, "fraction_of_copy": t_copy / t_pack,
           "rec_identical_to_mxnet": same}
    print(f"pack vs MXNet writer: {out['speedup_vs_mxnet']:.2f}x (target >= 1.5x)")
    print(f"pack vs plain copy:   {100 * out['fraction_of_copy']:.0f}% of copy throughput (target >= 50%)")
    print(f"train.rec byte-identical to MXNet's (same order, labels, ids): {same}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", nargs="?", default="all", choices=["crops", "time", "all"])
    ap.add_argument("--n", type=int, default=3000, help="number of crops")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    crops = make_crops(a.n)
    if a.stage == "crops":
        print(crops)
        return
    res = run_time(crops, a.repeat, a.threads)
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
