"""Scale benchmark of cleaning a packed dataset: clean and pack on a synthetic .rec of
1M records in 100k identities (issue 14, part 5).

    python benchmarks/clean_rec_scale.py [--records 1000000] [--identities 100000] [--dir /tmp/fc/rec_scale]

Build (untimed): a plain-layout train.rec (+ .idx, property, labels.csv) whose image
records are real 112x112 JPEG crops of LFW *dev* photos (the centre 112x112 of each
250x250 photo, q95, ~5 KB; a pool of --pool crops repeated), labelled like the
synthetic faces of benchmarks/clean.py (long-tailed identities, 10 % other people, 2 %
near-duplicates, planted same-person pairs), records in shuffled order; and the
embedding store `facecurate embed DEST/train.rec` would write, with those synthetic
vectors (no model runs: embedding is not what is measured here).

Timed, each in its own process (wall time, CPU time and peak resident memory of that
process; CPU time includes the imports, and worker processes are not counted):
  read     one streaming pass over the .rec (recordio.iter_records), the I/O baseline
  clean    facecurate clean DEST (run_clean: store memory-mapped, identities = labels)
  pack     facecurate pack DEST NEWDEST (the kept records, byte for byte, + train.sums)
  verify   facecurate inspect NEWDEST --verify (every payload against train.sums)
Prints records/s and peak MB per step, and the extrapolation to MS1M's 5.8M records.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FACECURATE_DATA", REPO.parent / "shared" / "data")).resolve()
MS1M = 5_822_653  # records of insightface's MS1M-ArcFace (faces_emore)


def crop_pool(n: int) -> list[bytes]:
    import cv2

    ids = [s.strip() for s in (DATA / "splits" / "lfw-dev.txt").read_text().splitlines() if s.strip()]
    out = []
    for ident in ids:
        for f in sorted(os.listdir(DATA / "lfw" / ident)):
            img = cv2.imread(str(DATA / "lfw" / ident / f))
            if img is None:
                continue
            h, w = img.shape[:2]
            c = img[(h - 112) // 2:(h - 112) // 2 + 112, (w - 112) // 2:(w - 112) // 2 + 112]
            out.append(cv2.imencode(".jpg", c, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
            if len(out) == n:
                return out
    return out


def build(dest: Path, records: int, identities: int, pool: int) -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from clean import synth

    from facecurate import __version__
    from facecurate.common.constants import IDX_NAME, REC_NAME
    from facecurate.common.files import csv_text
    from facecurate.common.recordio import RecordWriter

    if (dest / "built.json").exists():
        return json.loads((dest / "built.json").read_text())
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    t0 = time.perf_counter()
    x, ident, _photo, _q, _planted = synth(records, identities, 128)
    n = len(ident)
    perm = np.random.default_rng(1).permutation(n)
    crops = crop_pool(pool)
    with open(dest / REC_NAME, "wb") as f, open(dest / IDX_NAME, "w") as idx:
        w = RecordWriter(f)
        for lo in range(0, n, 4096):
            items = [(float(ident[perm[k]]), crops[k % len(crops)], k) for k in range(lo, min(n, lo + 4096))]
            offs = w.write_images(items)
            idx.write("".join(f"{lo + i}\t{o}\n" for i, o in enumerate(offs)))
        w.flush()
    n_ids = int(ident.max()) + 1
    (dest / "property").write_text(f"{n_ids},112,112\n")
    (dest / "labels.csv").write_text(csv_text(("identity", "label", "images"),
                                              [(f"id{i:06d}", i, int(c)) for i, c in
                                               enumerate(np.bincount(ident, minlength=n_ids))]))
    np.save(dest / "embeddings.npy", np.ascontiguousarray(x[perm]))
    lab = ident[perm]
    (dest / "embeddings.csv").write_text("aligned,source,identity,face\n" + "".join(
        f"rec:{k},train.rec:{k},{lab[k]},0\n" for k in range(n)))
    meta = {"model": "dlib_face_recognition_resnet_model_v1", "dim": 128, "flip": True, "feed": "crop",
            "input": "rec", "count": n, "failed": [], "normalisation": "l2", "version": __version__,
            "note": "synthetic vectors (benchmarks/clean_rec_scale.py)"}
    (dest / "embeddings.json").write_text(json.dumps(meta))
    info = {"records": n, "identities": n_ids, "rec_bytes": (dest / REC_NAME).stat().st_size,
            "crop_pool": len(crops), "build_seconds": round(time.perf_counter() - t0, 1)}
    (dest / "built.json").write_text(json.dumps(info))
    return info


def _peak_mb() -> float:
    """Peak resident memory of this process (VmHWM: unlike getrusage's ru_maxrss it is
    not inherited from the parent across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _child(step: str, dest: Path, new: Path) -> dict:
    t0 = time.perf_counter()
    if step == "read":
        from facecurate.common.recordio import iter_records

        n = 0
        with open(dest / "train.rec", "rb", buffering=1 << 20) as f:
            for _ in iter_records(f):
                n += 1
        out = {"records": n}
    elif step == "clean":
        from facecurate.clean.clean import run_clean

        s = run_clean(dest, show_progress=False)
        out = {"records": s["faces"], "keep": s["keep"], "review": s["review"], "drop": s["drop"],
               "merge_candidates": s["merge_candidates"]}
    elif step == "pack":
        from facecurate.pack.packer import pack

        shutil.rmtree(new, ignore_errors=True)
        r = pack(dest, new)
        out = {"records": r.images, "classes": r.classes, "rec_bytes": r.rec_bytes}
    else:
        from facecurate.pack.inspect_rec import inspect

        r = inspect(new, verify=True)
        out = {"records": r.records, "ok": r.ok, "verified": r.verified, "errors": r.errors[:3]}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    ru = resource.getrusage(resource.RUSAGE_SELF)  # CPU time: less sensitive to a loaded machine
    out["cpu_seconds"] = round(ru.ru_utime + ru.ru_stime, 2)
    out["peak_mb"] = _peak_mb()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--identities", type=int, default=100_000)
    ap.add_argument("--pool", type=int, default=2000, help="distinct LFW-dev crops repeated")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fc/rec_scale"))
    ap.add_argument("--steps", default="read,clean,pack,verify")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child[0], Path(a.child[1]), Path(a.child[2]))))
        return
    dest = a.dir / f"DEST_{a.records}_{a.identities}"
    new = a.dir / f"NEW_{a.records}_{a.identities}"
    info = build(dest, a.records, a.identities, a.pool)
    print(json.dumps({"built": info}), flush=True)
    res = {"built": info}
    for step in a.steps.split(","):
        r = subprocess.run([sys.executable, __file__, "--child", step, str(dest), str(new)],
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{step} failed:\n{r.stderr[-3000:]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
        out["records_per_s"] = round(out["records"] / out["seconds"], 1)
        if out.get("cpu_seconds"):
            out["records_per_cpu_s"] = round(out["records"] / out["cpu_seconds"], 1)
        out["ms1m_minutes_extrapolated"] = round(MS1M / out["records_per_s"] / 60, 1)
        res[step] = out
        print(json.dumps({step: out}), flush=True)
    (a.dir / f"result_{a.records}.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
