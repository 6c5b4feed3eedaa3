"""Benchmark for `facecurate pack` (issue 5, part 6).

Stages:

  crops   a few thousand real 112x112 ArcFace crops of LFW *dev* photos
          (align.centre_face_jpeg: dlib HOG + 68 landmarks -> 5 points -> align_face,
          JPEG q95), cached under /tmp/fc/cache/crops_lfw_dev_<N>/<identity>/<Name>_NNNN.jpg
          (made once).
  time    in the same run, on the same files, best (and median) of --repeat interleaved rounds
          (before each contender, untimed: every previous output removed, so each writes
          into an empty destination; sync + 0.3 s for the kernel's background work):
            facecurate pack (the API: lists OUT/<identity>/*, checks every crop,
              plain layout, --no-shuffle like MXNet's list order, writes
              .rec/.idx/.lst/property/... + fsync; also without fsync, and the
              shuffled default)
            MXNet's own writer (mx.recordio.MXIndexedRecordIO + mx.recordio.pack on
              the bytes as read = im2rec --pass-through / face2rec2 for aligned crops;
              given the file list, run in the MXNet oracle's venv, timed inside it)
            a plain copy of the same bytes into one file (+ fsync; the I/O limit)
            facecurate pack --no-shuffle (fsync) with train.sums not computed (what the
              per-record checksums cost)
          and, for reference, im2rec's default path (cv2.imread + pack_img q95).
          Prints images/s, MB/s and the ratios.

Usage: python benchmarks/pack.py                     # 3500 crops of 291 identities (>= 5 photos)
       python benchmarks/pack.py --n 3000 --min-photos 1 --per-identity 30
                                                     # LFW's shape: ~2 crops per identity
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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
def make_crops(n: int, per_identity: int = 30, min_photos: int = 1) -> Path:
    """Real crops of LFW dev photos, exactly as `facecurate align` makes them: the
    first ``per_identity`` photos of every dev identity with at least ``min_photos``
    photos, until ``n`` crops."""
    out = CACHE / (f"crops_lfw_dev_{n}" if min_photos <= 1 else f"crops_lfw_dev_min{min_photos}_{n}")
    if (out / "DONE").exists():
        return out
    others = [d for d in CACHE.glob("crops_lfw_dev_*") if (d / "DONE").exists()]
    import cv2

    from facecurate.align.align import centre_face_jpeg
    from facecurate.models.dlib_models import DlibHOGDetector, DlibLandmarks68

    det, lm = DlibHOGDetector(max_upsample=1), DlibLandmarks68()
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=CACHE))
    made, t0 = 0, time.time()
    for ident in dev_ids():
        files = sorted(os.listdir(DATA / "lfw" / ident))
        if len(files) < min_photos:
            continue
        for f in files[:per_identity]:
            same = next((d / ident / f for d in others if (d / ident / f).exists()), None)
            if same is not None:  # the same photo's crop, already made for another set
                (tmp / ident).mkdir(exist_ok=True)
                shutil.copyfile(same, tmp / ident / f)
                made += 1
                if made >= n:
                    break
                continue
            bgr = cv2.imread(str(DATA / "lfw" / ident / f))
            if bgr is None:
                continue
            jpg = centre_face_jpeg(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), det, lm, 112, 95)  # LFW's subject
            if jpg is None:
                continue
            (tmp / ident).mkdir(exist_ok=True)
            (tmp / ident / f).write_bytes(jpg)
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
import os, sys, time, json
import cv2
import mxnet as mx
lst, prefix, mode, sync = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "fsync"
items = [l.rstrip("\n").split("\t") for l in open(lst)]
t0 = time.perf_counter()
rec = mx.recordio.MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "w")
for i, (label, path) in enumerate(items):
    header = mx.recordio.IRHeader(0, float(label), i, 0)
    if mode == "pass-through":  # im2rec --pass-through / insightface face2rec2 for aligned crops
        with open(path, "rb") as f:
            s = mx.recordio.pack(header, f.read())
    else:  # im2rec's default: cv2.imread + pack_img (JPEG quality 95)
        s = mx.recordio.pack_img(header, cv2.imread(path, 1), quality=95, img_fmt=".jpg")
    rec.write_idx(i, s)
rec.close()
if sync:  # fsync works on the inode: flushes what MXNet wrote
    for p in (prefix + ".rec", prefix + ".idx"):
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def plain_copy(paths: list[Path], dst: Path, sync: bool = True) -> None:
    """The limit: the same bytes, read file by file, appended to one file."""
    with open(dst, "wb", buffering=8 << 20) as out:
        for p in paths:
            with open(p, "rb") as f:
                out.write(f.read())
        out.flush()
        if sync:
            os.fsync(out.fileno())


def run_time(crops: Path, repeat: int, threads: int) -> dict:
    """Best (and median) of ``repeat`` rounds; each round runs every contender once,
    interleaved, so that load from other processes on the machine hits them alike."""
    from facecurate.pack.packer import pack

    idents = sorted(d.name for d in crops.iterdir() if d.is_dir())
    items = [(lab, crops / i / f) for lab, i in enumerate(idents) for f in sorted(os.listdir(crops / i))]
    paths = [p for _, p in items]
    n = len(items)
    mb = sum(p.stat().st_size for p in paths) / 1e6
    work = Path(tempfile.mkdtemp(prefix="fc_pack_bench_"))
    if not ORACLE_PY.exists():
        subprocess.run([str(REPO.parent / "shared" / "tools" / "mxnet-oracle"), "/nonexistent"],
                       capture_output=True)  # builds the venv
    lst = work / "mx.lst"
    lst.write_text("".join(f"{lab}\t{p}\n" for lab, p in items))

    def mx(mode: str, sync: bool) -> float:
        r = subprocess.run([str(ORACLE_PY), "-c", MX_WRITER, str(lst), str(work / "mx"), mode,
                            "fsync" if sync else "none"], capture_output=True, text=True, check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])["seconds"]

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


    outputs = [work / "fc", work / "fc_shuffled", work / "mx.rec", work / "mx.idx", work / "copy.bin"]

    def settle() -> None:
        """Before each contender (untimed): remove every contender's previous output, so
        that each one writes into an empty destination (as a first pack does) and
        nobody's clock pays for freeing the last round's 18 MB; flush what is dirty and
        let the kernel's background work (writeback, discards, an exited MXNet process)
        finish, so that it does not land on the next one's clock."""
        for p in outputs:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        os.sync()
        time.sleep(0.3)

    def fc(**kw) -> None:
        pack(crops, work / "fc", shuffle=False, threads=threads, **kw)

    def without_sums(fn) -> None:
        import facecurate.pack.dest as fp  # RecSink hashes through dest.SumsWriter

        real = fp.SumsWriter

        class NoSums(real):  # header line only; no hashing
            def images(self, *a) -> None:
                pass

            def record(self, *a) -> None:
                pass

            def fill(self, *a) -> None:
                pass
        fp.SumsWriter = NoSums
        try:
            fn()
        finally:
            fp.SumsWriter = real

    contenders = {
        "facecurate pack --no-shuffle (fsync)": lambda: timed(fc),
        "MXNet pass-through writer + fsync": lambda: mx("pass-through", True),
        "plain copy into one file + fsync": lambda: timed(lambda: plain_copy(paths, work / "copy.bin")),
        "facecurate pack --no-shuffle --no-fsync": lambda: timed(lambda: fc(fsync=False)),
        "MXNet pass-through writer": lambda: mx("pass-through", False),
        "plain copy into one file": lambda: timed(lambda: plain_copy(paths, work / "copy.bin", False)),
        "facecurate pack (shuffled, fsync: defaults)":
            lambda: timed(lambda: pack(crops, work / "fc_shuffled", threads=threads)),
        # the same as the first, with the per-record checksums (train.sums) not computed:
        # what hashing in pack's pass costs
        "facecurate pack --no-shuffle (fsync), no sums": lambda: timed(lambda: without_sums(fc)),
    }
    times: dict = {name: [] for name in contenders}
    try:
        plain_copy(paths, work / "warm.bin")  # page cache warm for everybody
        for _ in range(repeat):
            for name, fn in contenders.items():
                settle()
                times[name].append(fn())
        fc(), mx("pass-through", False)  # the outputs compared (untimed)
        same = (work / "mx.rec").read_bytes() == (work / "fc" / "train.rec").read_bytes()
        times["MXNet im2rec default (decode + re-encode)"] = [mx("im2rec-default", False)
                                                             for _ in range(max(1, repeat // 3))]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {name: min(t) for name, t in times.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{n} crops (112x112 JPEG q95) of {len(idents)} identities, {mb:.1f} MB, page cache warm; "
          f"best and median of {repeat} interleaved rounds; pack threads={threads}")
    print(f"{'':44s} {'seconds':>8s} {'images/s':>10s} {'MB/s':>8s} {'median s':>9s}")
    for name, t in best.items():
        print(f"{name:44s} {t:8.3f} {n / t:10.0f} {mb / t:8.1f} {median[name]:9.3f}")
    names = list(best)
    out = {"images": n, "identities": len(idents), "mb": mb, "seconds": best, "median_seconds": median,
           "rec_identical_to_mxnet": same}
    for label, (p, m, c) in (("with fsync", names[0:3]), ("without fsync", names[3:6])):
        out[f"speedup_vs_mxnet {label}"] = best[m] / best[p]
        out[f"fraction_of_copy {label}"] = best[c] / best[p]
        out[f"median speedup_vs_mxnet {label}"] = median[m] / median[p]
        out[f"median fraction_of_copy {label}"] = median[c] / median[p]
        print(f"{label:14s} pack vs MXNet pass-through writer: {best[m] / best[p]:.2f}x (target >= 1.5x); "
              f"pack vs plain copy: {100 * best[c] / best[p]:.0f}% (target >= 50%)  "
              f"[medians: {median[m] / median[p]:.2f}x, {100 * median[c] / median[p]:.0f}%]")
    shuf, mxf = names[6], names[1]
    out["speedup_vs_mxnet shuffled default"] = best[mxf] / best[shuf]
    out["median speedup_vs_mxnet shuffled default"] = median[mxf] / median[shuf]
    print(f"shuffled (the default, fsync) vs MXNet pass-through writer + fsync: {best[mxf] / best[shuf]:.2f}x "
          f"[median {median[mxf] / median[shuf]:.2f}x] (MXNet writes the list's order; its cost does not "
          "depend on it)")
    ns = "facecurate pack --no-shuffle (fsync), no sums"
    out["checksum_cost"] = best[names[0]] / best[ns] - 1
    out["median checksum_cost"] = median[names[0]] / median[ns] - 1
    print(f"train.sums (hashing every record in pack's pass) costs {100 * out['checksum_cost']:+.1f}% "
          f"[median {100 * out['median checksum_cost']:+.1f}%] against the same pack without it")
    out["speedup_vs_im2rec_default"] = best[names[-1]] / best[names[0]]
    print(f"pack (fsync) vs MXNet im2rec default: {out['speedup_vs_im2rec_default']:.1f}x")
    print(f"train.rec byte-identical to MXNet's pass-through output: {same}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", nargs="?", default="all", choices=["crops", "time", "all"])
    ap.add_argument("--n", type=int, default=3500, help="number of crops")
    ap.add_argument("--min-photos", type=int, default=5,
                    help="only identities with at least this many photos (5: ~12 crops per identity, "
                         "closer to a training set than LFW's many one-photo people)")
    ap.add_argument("--per-identity", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    crops = make_crops(a.n, a.per_identity, a.min_photos)
    if a.stage == "crops":
        print(crops)
        return
    res = run_time(crops, a.repeat, a.threads)
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
