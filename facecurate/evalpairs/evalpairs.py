"""``facecurate eval-pairs PAIRS ROOT``: verification accuracy of the configured chain
(detector + alignment + model) on an LFW-style pairs file.

The images the pairs name are linked (symlinks) into ``WORK/raw/<name>/`` and run
through the real stages: :func:`facecurate.align.align.run_align` into ``WORK/out`` and
:func:`facecurate.embed.embed.run_embed` on it. Both resume, so a rerun with the same work
folder costs only the evaluation. Each image is represented by the face nearest its
centre (pairs images such as LFW's are centred on their subject; ``pick="primary"``
takes align's guess instead). When no face lies near the centre, the image is
searched again with a second detector (dlib's CNN by default) in ``WORK/retry-*``.
An image without any face (no face, unreadable, missing) is a failure: it is listed,
and every pair it belongs to counts as an error at any threshold.

Protocol (LFW "unrestricted, labeled outside data" / insightface ``verification.py``):
10 folds; for each fold the cosine-similarity threshold is the one with the best
accuracy on the other 9 folds, and the accuracy is measured on the held-out fold;
mean and standard deviation over the folds. Also: the best threshold on all pairs,
and the true accept rate at a false accept rate of 1e-3 (over all pairs).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from facecurate.common.constants import EVAL_PICKS
from facecurate.common.manifests import AlignRow
from facecurate.common.provenance import library_versions
from facecurate.models.zoo import resolve_runtime
from facecurate.pack.pairs import PairsError, image_stem, parse_pairs
from facecurate.align.align import AlignConfig, read_manifest, run_align
from facecurate.common.files import write_bytes_atomic
from facecurate.embed.embed import load_store, run_embed
from facecurate.engines.ray_engine import connect


@dataclass(frozen=True)
class Pair:
    fold: int
    a: str  # image path relative to ROOT (POSIX)
    b: str
    same: bool


def read_pairs(path) -> list[Pair]:
    """The pairs of an LFW-style pairs file (:func:`facecurate.pack.pairs.parse_pairs`), with
    their folds: a header ``folds n`` (or just ``n``: one fold) means ``folds`` blocks
    of ``n`` same-person then ``n`` different-person lines; without a header the pairs
    are split into 10 equal folds (one when there are fewer than 20). Any malformed
    line, or a count that does not match the header, is a PairsError."""
    parsed = parse_pairs(path)
    if parsed.header is None and not parsed.lines:
        raise PairsError(f"{path}: empty pairs file")
    bad = next((p for p in parsed.lines if p.problem), None)
    if bad is not None:
        raise PairsError(f"{path}: line {bad.line}: {bad.problem}")
    folds, n = parsed.header or (0, 0)
    if folds and len(parsed.lines) != folds * 2 * n:
        raise PairsError(f"{path}: header says {folds} folds of {n}+{n} pairs = {folds * 2 * n}, "
                         f"found {len(parsed.lines)}")
    pairs = [Pair(0, image_stem(*p.a) + ".jpg", image_stem(*p.b) + ".jpg", p.same) for p in parsed.lines]
    if folds:
        return [Pair(i // (2 * n), p.a, p.b, p.same) for i, p in enumerate(pairs)]
    k = 10 if len(pairs) >= 20 else 1
    return [Pair(min(k - 1, i * k // len(pairs)), p.a, p.b, p.same) for i, p in enumerate(pairs)]


# ----------------------------------------------------------------------------- metrics
def _accuracy(scores: np.ndarray, same: np.ndarray, thr: float) -> float:
    return float(np.mean((scores > thr) == same)) if len(scores) else 0.0


def _best_threshold(scores: np.ndarray, same: np.ndarray, valid: np.ndarray) -> float:
    """Threshold with the most correct decisions over the valid pairs (invalid pairs
    are wrong at any threshold, so they do not move it). Midpoints between sorted
    scores; ties broken by the smallest threshold."""
    s, y = scores[valid], same[valid]
    if not len(s):
        return 0.0
    order = np.argsort(s, kind="mergesort")
    s, y = s[order], y[order]
    # threshold below element k (accept s[k:]): correct = negatives below + positives at/above
    neg_below = np.concatenate([[0], np.cumsum(~y)])
    pos_above = np.concatenate([np.cumsum(y[::-1])[::-1], [0]])
    correct = neg_below + pos_above
    k = int(np.argmax(correct))
    if k == 0:
        return float(s[0] - 1e-6)
    if k == len(s):
        return float(s[-1] + 1e-6)
    return float((s[k - 1] + s[k]) / 2)


def tar_at_far(scores: np.ndarray, same: np.ndarray, valid: np.ndarray, far: float = 1e-3) -> tuple[float, float]:
    """(TAR, threshold) at the given FAR; a failed pair is never accepted."""
    neg = np.sort(scores[valid & ~same])[::-1]
    n_neg = int(np.sum(~same))
    allowed = int(np.floor(far * n_neg))
    if not len(neg):
        thr = -1.0
    elif allowed >= len(neg):
        thr = float(neg[-1]) - 1e-6
    else:
        thr = float(neg[allowed])  # accept strictly above: at most `allowed` negatives
    n_pos = int(np.sum(same))
    tar = float(np.sum(valid & same & (scores > thr)) / n_pos) if n_pos else 0.0
    return tar, thr


def ten_fold(scores: np.ndarray, same: np.ndarray, folds: np.ndarray, valid: np.ndarray) -> dict:
    """The 10-fold protocol; ``valid`` False marks pairs with a failed image (errors)."""
    scores = np.where(valid, scores, 0.0)
    fold_ids = sorted(set(folds.tolist()))
    accs, thrs = [], []
    for f in fold_ids:
        test = folds == f
        train = ~test if len(fold_ids) > 1 else test
        thr = _best_threshold(scores[train], same[train], valid[train])
        correct = ((scores[test] > thr) == same[test]) & valid[test]
        accs.append(float(np.mean(correct)))
        thrs.append(thr)
    best = _best_threshold(scores, same, valid)
    tar, far_thr = tar_at_far(scores, same, valid, 1e-3)
    return {
        "accuracy": float(np.mean(accs)), "std": float(np.std(accs)), "fold_accuracy": accs,
        "fold_thresholds": thrs, "best_threshold": best,
        "accuracy_at_best_threshold": float(np.mean(((scores > best) == same) & valid)),
        "tar_at_far_1e-3": tar, "threshold_at_far_1e-3": far_thr,
        "accuracy_valid_pairs_only": _valid_only(scores, same, folds, valid),
    }


def _valid_only(scores, same, folds, valid) -> Optional[float]:
    if valid.all():
        return None
    accs = []
    for f in sorted(set(folds.tolist())):
        test = (folds == f) & valid
        train = (folds != f) & valid if len(set(folds.tolist())) > 1 else test
        thr = _best_threshold(scores[train], same[train], np.ones(int(train.sum()), bool))
        if test.any():
            accs.append(_accuracy(scores[test], same[test], thr))
    return float(np.mean(accs)) if accs else None


def roc_png(path, scores, same, valid, title: str = "") -> None:
    """ROC curve (TAR against FAR, log FAR axis) drawn with OpenCV."""
    import cv2

    W, H, m = 640, 480, 60
    img = np.full((H, W, 3), 255, np.uint8)
    x0, y0, x1, y1 = m, H - m, W - 20, 30
    lo = -4.0
    cv2.rectangle(img, (x0, y1), (x1, y0), (0, 0, 0), 1)
    for e in range(int(lo), 1):
        x = int(x0 + (e - lo) / -lo * (x1 - x0))
        cv2.line(img, (x, y0), (x, y1), (220, 220, 220), 1)
        cv2.putText(img, f"1e{e}", (x - 15, y0 + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    for t in np.linspace(0, 1, 6):
        y = int(y0 - t * (y0 - y1))
        cv2.line(img, (x0, y), (x1, y), (220, 220, 220), 1)
        cv2.putText(img, f"{t:.1f}", (x0 - 35, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    s = np.where(valid, scores, -np.inf)
    pos, neg = max(1, int(same.sum())), max(1, int((~same).sum()))
    pts = []
    for thr in np.unique(s[np.isfinite(s)])[::-1]:
        acc = s >= thr
        far = np.sum(acc & ~same) / neg
        tar = np.sum(acc & same) / pos
        lf = max(lo, np.log10(far)) if far > 0 else lo
        pts.append((int(x0 + (lf - lo) / -lo * (x1 - x0)), int(y0 - tar * (y0 - y1))))
    if len(pts) > 1:
        cv2.polylines(img, [np.array(pts, np.int32)], False, (200, 60, 0), 2, cv2.LINE_AA)
    cv2.putText(img, "false accept rate", (W // 2 - 60, H - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    cv2.putText(img, "TAR", (10, H // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    if title:
        cv2.putText(img, title[:80], (x0, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    ok, buf = cv2.imencode(".png", img)
    write_bytes_atomic(path, buf.tobytes())


# ----------------------------------------------------------------------------- run
#: A face whose box centre lies farther than this (fraction of the image's longer
#: side) from the image centre is not taken for a pairs image's subject when
#: ``pick="centre"``: the image is searched again with the retry detector.
CENTRE_TOLERANCE = 0.15


def _align_cfg(detector: str, model_dir, device: str, **kw):
    """align's settings for eval-pairs: the model folder only for the detector that reads one
    (align records its settings, so the same run keeps the same align.json). WORK/raw holds
    links to the images under ROOT, which the user named: they are followed."""
    return AlignConfig(detector=detector, model_dir=model_dir if detector == "scrfd" else None, device=device,
                       follow_external_links=True, **kw)


def _by_source(manifest: Sequence[AlignRow]) -> dict[str, list[AlignRow]]:
    out: dict[str, list[AlignRow]] = {}
    for r in manifest:
        out.setdefault(r.source, []).append(r)
    return out


def _centre_distance(r: AlignRow) -> float:
    """Distance of the face's box centre from the image centre, in image sizes (inf
    when the row lacks the box or the image size)."""
    box = r.box
    if box is None or not r.img_w or not r.img_h:
        return float("inf")
    w, h = float(r.img_w), float(r.img_h)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return float(np.hypot(cx - w / 2, cy - h / 2) / max(w, h))


def _choose(rows: Sequence[AlignRow], index: dict, pick: str) -> Optional[tuple[float, int]]:
    """(centre distance, store row) of the face that stands for a pairs image: the
    embedded face nearest the image centre (``centre``; pairs images such as LFW's
    are centred on their subject) or align's primary face (``primary``)."""
    cands = [r for r in rows if r.is_ok and r.aligned in index]
    if pick == "primary":
        cands = [r for r in cands if r.is_primary_ok]
    if not cands:
        return None
    r = min(cands, key=lambda r: (_centre_distance(r), r.aligned))
    return _centre_distance(r), index[r.aligned]


def _reason(rows: Sequence[AlignRow]) -> str:
    if not rows:
        return "not processed by align"
    st = sorted({r.status for r in rows})
    msg = "; ".join(sorted({r.message for r in rows if r.message}))
    return "/".join(st) + (f": {msg}" if msg else "")


def default_work_dir(pairs_path, root, detector: str) -> Path:
    """The cache of a pairs file, ROOT and detector under the installed library versions
    (another OpenCV or dlib gets a new cache instead of a refused resume)."""
    versions = "\0".join(f"{k}={v}" for k, v in sorted(library_versions(["onnxruntime"]).items()))
    key = f"{Path(pairs_path).resolve()}\0{Path(root).resolve()}\0{detector}\0{versions}"
    h = hashlib.sha1(key.encode()).hexdigest()[:12]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    try:
        Path(base).mkdir(parents=True, exist_ok=True)
        return Path(base) / "facecurate" / f"eval-pairs-{h}"
    except OSError:
        return Path(tempfile.gettempdir()) / f"facecurate-eval-pairs-{h}"


def link_images(root: Path, images: Sequence[str], raw: Path) -> dict[str, str]:
    """Symlink each named image into WORK/raw; returns {image: reason} for images that
    do not exist under ROOT (they are failures, not silently dropped)."""
    missing = {}
    for rel in images:
        src = root / rel
        dst = raw / rel
        if not src.is_file():
            missing[rel] = f"missing: {src} not found"
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        target = str(src.resolve())
        if os.path.islink(dst):
            if os.readlink(dst) == target:
                continue
            dst.unlink()
        os.symlink(target, dst)
    return missing


def _pair_scores(pairs: Sequence[Pair], chosen: dict, failures: dict, stores: dict) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity of each pair's chosen faces, and whether the pair has both
    (a pair with a failed image is not valid: it counts as an error)."""
    scores = np.zeros(len(pairs))
    valid = np.zeros(len(pairs), bool)
    for k, p in enumerate(pairs):
        ca, cb = chosen.get(p.a), chosen.get(p.b)
        if ca is not None and cb is not None and p.a not in failures and p.b not in failures:
            va = stores[ca[0]][0][ca[1]].astype(np.float64)
            vb = stores[cb[0]][0][cb[1]].astype(np.float64)
            scores[k] = float(np.dot(va, vb))
            valid[k] = True
    return scores, valid


def run_eval_pairs(pairs_path, root, *, work=None, detector: str = "dlib", model: str = "dlib",
                   model_dir: Optional[str] = None, flip: bool = True, device: str = "auto",
                   batch_size: Optional[int] = None, workers: Optional[int] = None,
                   dlib_feed: str = "five", roc: Optional[str] = None, show_progress: bool = True,
                   pick: str = "centre", retry_detector: str = "dlib-cnn", runtime: str = "auto",
                   fp16: bool = False, engine: str = "local", ray_address: Optional[str] = None) -> dict:
    """Align and embed every image of the pairs file (on ``engine``), then score."""
    kw = dict(work=work, detector=detector, model=model, model_dir=model_dir, flip=flip, device=device,
              batch_size=batch_size, workers=workers, dlib_feed=dlib_feed, roc=roc, show_progress=show_progress,
              pick=pick, retry_detector=retry_detector, runtime=runtime, fp16=fp16, engine=engine,
              ray_address=ray_address)
    if engine != "ray":
        return _eval_pairs(pairs_path, root, **kw)
    import ray

    owns = connect(ray_address)  # one Ray connection for all four runs
    try:
        return _eval_pairs(pairs_path, root, **kw)
    finally:
        if owns:
            ray.shutdown()


def _eval_pairs(pairs_path, root, *, work, detector, model, model_dir, flip, device, batch_size, workers, dlib_feed,
                roc, show_progress, pick, retry_detector, runtime, fp16, engine, ray_address) -> dict:
    def store_of(align_out: Path) -> Path:
        # dlib's model on ONNX Runtime keeps its own store beside align's (never mixed)
        return align_out.parent / f"{align_out.name}-onnx" if on_onnx else align_out

    run_kw = dict(workers=workers, show_progress=show_progress, engine=engine, ray_address=ray_address)
    embed_kw = dict(model=model, model_dir=model_dir, batch_size=batch_size, flip=flip, device=device,
                    dlib_feed=dlib_feed, runtime=runtime, fp16=fp16, **run_kw)

    if pick not in EVAL_PICKS:
        raise PairsError(f"pick must be one of {', '.join(EVAL_PICKS)}")
    on_onnx = model == "dlib" and resolve_runtime(runtime) == "onnx"
    pairs = read_pairs(pairs_path)
    root = Path(root)
    if not root.is_dir():
        raise PairsError(f"ROOT folder not found: {root}")
    work = Path(work) if work else default_work_dir(pairs_path, root, detector)
    raw, out = work / "raw", work / "out"
    raw.mkdir(parents=True, exist_ok=True)
    images = sorted({p.a for p in pairs} | {p.b for p in pairs})
    failures: dict[str, str] = link_images(root, images, raw)

    align_summary = run_align(raw, out, _align_cfg(detector, model_dir, device), **run_kw)
    embed_summary = run_embed(out, store_dir=store_of(out), **embed_kw)
    vecs, rows, meta = load_store(store_of(out))
    stores = {"": (vecs, {r.aligned: i for i, r in enumerate(rows)})}
    by_source = _by_source(read_manifest(out))
    chosen: dict[str, tuple[str, int]] = {}  # image -> (store, row)
    retry: list[str] = []
    for img in images:
        if img in failures:
            continue
        best = _choose(by_source.get(img, []), stores[""][1], pick)
        if best is not None:
            chosen[img] = ("", best[1])
        if pick == "centre" and (best is None or best[0] > CENTRE_TOLERANCE) and retry_detector != "none":
            retry.append(img)
        elif best is None:
            failures[img] = _reason(by_source.get(img, []))

    recovered = 0
    retry_summary = None
    if retry:
        recovered, retry_summary = _retry(work, root, retry, by_source, stores, chosen, failures, pick=pick,
                                          retry_detector=retry_detector, store_of=store_of, run_kw=run_kw,
                                          embed_kw=embed_kw)

    scores, valid = _pair_scores(pairs, chosen, failures, stores)
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    res = ten_fold(scores, same, folds, valid)
    if roc:
        roc_png(roc, scores, same, valid, title=f"{meta.get('model', model)} flip={flip} "
                f"acc={res['accuracy'] * 100:.2f}%")
    return {
        "pairs": len(pairs), "folds": len(set(folds.tolist())), "images": len(images),
        "failed_images": len(failures),
        "failures": [{"image": k, "reason": v} for k, v in sorted(failures.items())],
        "failed_pairs": int((~valid).sum()),
        **_metrics(res),
        "model": meta.get("model"), "feed": meta.get("feed"), "flip": bool(meta.get("flip")),
        "runtime": embed_summary.get("runtime"), "provider": embed_summary.get("provider"),
        "detector": detector, "pick": pick, "retried": len(retry), "recovered": recovered,
        "retry": retry_summary, "work": str(work), "roc": str(roc) if roc else None,
        "align": {k: align_summary.get(k) for k in ("files", "crops", "status", "processed_now", "seconds")},
        "embed": {k: embed_summary.get(k) for k in ("embedded", "embedded_now", "failed", "seconds",
                                                    "faces_per_second", "feeds", "runtime", "provider")},
    }


def _retry(work: Path, root: Path, retry: list, by_source: dict, stores: dict, chosen: dict, failures: dict, *,
           pick: str, retry_detector: str, store_of, run_kw: dict, embed_kw: dict) -> tuple[int, dict]:
    """Recover what the detector missed near the centre with a second detector
    (dlib's CNN by default) on just those images. Updates ``stores``, ``chosen`` and
    ``failures``; returns (images recovered near the centre, the retry's summary)."""
    model_dir, device = embed_kw["model_dir"], embed_kw["device"]
    rraw, rout = work / f"retry-{retry_detector}" / "raw", work / f"retry-{retry_detector}" / "out"
    link_images(root, retry, rraw)
    a2 = run_align(rraw, rout, _align_cfg(retry_detector, model_dir, device, fallback="none"), **run_kw)
    e2 = run_embed(rout, store_dir=store_of(rout), **embed_kw)
    v2, rows2, _ = load_store(store_of(rout))
    stores["retry"] = (v2, {r.aligned: i for i, r in enumerate(rows2)})
    by2 = _by_source(read_manifest(rout))
    retry_summary = {"detector": retry_detector, "images": len(retry),
                     "crops": a2.get("crops"), "embedded_now": e2.get("embedded_now")}
    recovered = 0
    for img in retry:
        b2 = _choose(by2.get(img, []), stores["retry"][1], pick)
        b1 = _choose(by_source.get(img, []), stores[""][1], pick)
        if b2 is not None and b2[0] <= CENTRE_TOLERANCE:
            chosen[img] = ("retry", b2[1])
            recovered += 1
        elif b1 is not None or b2 is not None:  # nothing central: the most central face found
            use = min((b for b in ((b1, ""), (b2, "retry")) if b[0] is not None), key=lambda b: b[0][0])
            chosen[img] = (use[1], use[0][1])
        else:
            failures[img] = _reason(by_source.get(img, []) + by2.get(img, []))
    return recovered, retry_summary


def _metrics(res: dict) -> dict:
    """The summary's rounded figures of :func:`ten_fold`'s result."""
    return {
        "accuracy": round(res["accuracy"], 5), "std": round(res["std"], 5),
        "best_threshold": round(res["best_threshold"], 4),
        "fold_thresholds": [round(t, 4) for t in res["fold_thresholds"]],
        "fold_accuracy": [round(a, 4) for a in res["fold_accuracy"]],
        "tar_at_far_1e-3": round(res["tar_at_far_1e-3"], 5),
        "threshold_at_far_1e-3": round(res["threshold_at_far_1e-3"], 4),
        "accuracy_valid_pairs_only": (round(res["accuracy_valid_pairs_only"], 5)
                                      if res["accuracy_valid_pairs_only"] is not None else None),
    }


__all__ = ["read_pairs", "run_eval_pairs", "ten_fold", "tar_at_far", "Pair", "PairsError", "roc_png"]
