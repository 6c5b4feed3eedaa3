"""Benchmark: `facecurate align` against the blog recipe, in the same run.

The baseline is the naive single-process loop people copy from blog posts, over the
same dlib models: read a file, HOG-detect (upsample 1), 68 landmarks, similarity
warp to the ArcFace template, write the crop; one file after another.

    python benchmarks/align.py [--images 400] [--workers N] [--rounds 3]

Prints images/s of both, their ratio, and the share of facecurate's worker time spent
inside the detector and landmark model. Uses LFW *dev* identities only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FACECURATE_DATA", REPO.parent / "shared" / "data"))


def pick_raw(n_images: int, root: Path) -> Path:
    """A RAW folder of symlinks to the first LFW dev identities, about n_images photos."""
    ids = [s.strip() for s in (DATA / "splits" / "lfw-dev.txt").read_text().splitlines() if s.strip()]
    raw = root / "raw"
    raw.mkdir()
    total = 0
    for i in ids:
        files = sorted((DATA / "lfw" / i).glob("*.jpg"))
        (raw / i).symlink_to(DATA / "lfw" / i)
        total += len(files)
        if total >= n_images:
            break
    return raw


def naive_loop(raw: Path, out: Path) -> int:
    import dlib

    from facecurate.common.geometry import align_face
    from facecurate.models.dlib_models import SHAPE68, DlibLandmarks68, model_file

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(model_file(SHAPE68))
    n = 0
    for path in sorted(raw.glob("*/*.jpg")):  # identity symlinks: glob follows them
        img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        for k, rect in enumerate(detector(img, 1)):
            shape = predictor(img, rect)
            pts = DlibLandmarks68.five(np.array([[p.x, p.y] for p in shape.parts()], dtype=float))
            crop = align_face(img, pts, 112)
            dst = out / path.parent.name / f"{path.stem}_{k}.jpg"
            dst.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(dst), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--workers", type=int, default=None, help="facecurate workers (default: all cores)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not (DATA / "lfw").is_dir():
        sys.exit(f"LFW not found under {DATA} (set FACECURATE_DATA)")

    from facecurate.align.align import AlignConfig, run_align

    naive_times, fc_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = pick_raw(args.images, tmp)
        for r in range(args.rounds):  # interleaved, so both see the same machine load
            t0 = time.perf_counter()
            n_naive = naive_loop(raw, tmp / f"naive{r}")
            naive_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            summary = run_align(raw, tmp / f"fc{r}", AlignConfig(follow_external_links=True), workers=args.workers,
                                show_progress=False)  # RAW links to LFW, outside it
            fc_times.append(time.perf_counter() - t0)

    t_naive, t_fc = statistics.median(naive_times), statistics.median(fc_times)
    naive_ips, fc_ips = n_naive / t_naive, summary["files"] / t_fc
    print(f"images: {summary['files']} (LFW dev, {os.cpu_count()} cores), median of {args.rounds} interleaved rounds")
    print(f"naive loop (blog recipe, 1 process): {t_naive:7.2f} s  {naive_ips:7.1f} images/s"
          f"  (rounds: {', '.join(f'{t:.2f}' for t in naive_times)})")
    print(f"facecurate align ({summary['workers']} workers):  {t_fc:7.2f} s  {fc_ips:7.1f} images/s"
          f"  (rounds: {', '.join(f'{t:.2f}' for t in fc_times)}; crops {summary['crops']},"
          f" files with a crop {summary['files_with_crop']})")
    print(f"speed-up: {fc_ips / naive_ips:.2f}x")
    print(f"share of worker time in detector + landmarks: {summary['detector_share']:.0%}"
          f"  (timings s: {summary['timings']})")


if __name__ == "__main__":
    main()
