"""dlib's face ResNet (converted to ONNX by facecurate) on a CUDA GPU: fp32 against
fp16, faces/s per batch size, and how close fp16 stays to fp32 (cosine per face).

Run it on a machine with an NVIDIA GPU and ``pip install -e '.[gpu]'`` (onnxruntime-gpu,
onnx, onnxconverter-common; never together with the CPU package onnxruntime):

    python benchmarks/gpu_embed.py                       # synthetic chips
    python benchmarks/gpu_embed.py --photos ../shared/data/lfw --n 512
    python benchmarks/gpu_embed.py --batch-sizes 64 256 1024 --seconds 5 --json

``--photos DIR`` cuts dlib's own 150x150 chips (HOG detector, 68 landmarks,
``get_face_chip``) from the first ``--n`` images under DIR, so the fp16 cosine is
measured on real faces; without it, deterministic synthetic chips are used. Timing
covers the model call of a preprocessed batch through I/O binding (input copied in,
output copied back), after a warm-up; the CPU's figure with the same code is
printed beside it (``--no-cpu`` skips it).

Exits with status 0 and a message when this ONNX Runtime has no usable CUDA (the
facecurate CPU path is what runs there; this script has nothing to measure).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def chips_from_photos(folder: Path, n: int) -> list:
    import dlib

    from facecurate.common.imageio import read_image
    from facecurate.models.dlib_models import SHAPE68, model_file

    det, sp = dlib.get_frontal_face_detector(), dlib.shape_predictor(model_file(SHAPE68))
    out = []
    for f in sorted(folder.rglob("*.jpg")):
        img = read_image(str(f))
        for r in det(img, 0)[:1]:
            out.append(dlib.get_face_chip(img, sp(img, r), 150, 0.25))
        if len(out) >= n:
            break
    return out


def synthetic(n: int) -> list:
    from facecurate.models.dlib_onnx import synthetic_chip

    return [synthetic_chip(variant=i) for i in range(n)]


def throughput(model, blob: np.ndarray, seconds: float) -> float:
    model.forward(blob)  # warm-up (CUDA kernels, cuDNN algorithm choice)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.forward(blob)
        n += len(blob)
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=Path, default=None, help="folder of photos (real faces for the cosine)")
    ap.add_argument("--n", type=int, default=256, help="number of chips")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per configuration")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU figure")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    try:
        import onnxruntime as ort
    except ImportError:
        print("gpu_embed: ONNX Runtime is not installed (pip install -e '.[gpu]'); nothing to measure")
        return 0
    from facecurate.models.dlib_onnx import dlib_resnet_onnx
    from facecurate.models.onnx_models import CUDA_PROVIDER, OnnxModelError, load_model

    if CUDA_PROVIDER not in ort.get_available_providers():
        print(f"gpu_embed: this ONNX Runtime ({ort.__version__}) has no CUDA provider "
              f"({', '.join(ort.get_available_providers())}); install onnxruntime-gpu on a CUDA machine")
        return 0
    path = dlib_resnet_onnx()
    try:
        fp32 = load_model(path, kind="recognizer", device="cuda", batch_size=max(args.batch_sizes))
    except OnnxModelError as e:
        print(f"gpu_embed: CUDA is listed but unusable here: {e}")
        return 0
    try:
        fp16 = load_model(path, kind="recognizer", device="cuda", fp16=True, batch_size=max(args.batch_sizes))
    except OnnxModelError as e:
        fp16 = None
        print(f"gpu_embed: fp16 unavailable ({e})", file=sys.stderr)

    chips = chips_from_photos(args.photos, args.n) if args.photos else synthetic(args.n)
    bgr = [c[:, :, ::-1] for c in chips]
    v32 = fp32.embed(bgr)
    res = {"chips": len(chips), "source": str(args.photos) if args.photos else "synthetic",
           "onnxruntime": ort.__version__, "provider": fp32.provider, "io_binding": fp32.use_io_binding}
    if fp16 is not None:
        v16 = fp16.embed(bgr)
        cos = np.sum(v32 * v16, axis=1) / (np.linalg.norm(v32, axis=1) * np.linalg.norm(v16, axis=1))
        res.update(fp16_min_cosine=float(cos.min()), fp16_mean_cosine=float(cos.mean()),
                   fp16_max_abs_diff=float(np.abs(v32 - v16).max()))
    cpu = None if args.no_cpu else load_model(path, kind="recognizer", device="cpu")
    for bs in args.batch_sizes:
        reps = -(-bs // len(bgr))
        batch = (bgr * reps)[:bs]
        res[f"cuda_fp32_bs{bs}_faces_per_s"] = round(throughput(fp32, fp32.preprocess(batch), args.seconds), 1)
        if fp16 is not None:
            res[f"cuda_fp16_bs{bs}_faces_per_s"] = round(throughput(fp16, fp16.preprocess(batch), args.seconds), 1)
    if cpu is not None:
        bs = min(32, len(bgr))
        res[f"cpu_fp32_bs{bs}_faces_per_s"] = round(throughput(cpu, cpu.preprocess(bgr[:bs]), args.seconds), 1)
    if args.json:
        print(json.dumps(res, sort_keys=True))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
