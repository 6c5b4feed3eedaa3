"""Stage 1: detect every face and its 5 landmarks in ``RAW/<identity>/...``, warp each
to an ArcFace crop in ``OUT/<identity>/``, mark the likely subject, and record every
input file's fate in ``OUT/align.csv``.

Structure (after img2dataset): a *reader* lists the inputs, the run machinery
(:mod:`facecurate.engines.runner`) cuts the sorted list into fixed shards and hands them to
an engine (:mod:`facecurate.engines`: local processes or Ray actors), each *worker*
(:class:`AlignWorker`) loads its models once and turns a shard into its manifest and
crop files, and the *writer* merges the per-shard manifests into ``align.csv``. A
shard's record is written after its data, so a killed run is resumed by redoing
only the shards without one.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Callable, Optional, Sequence

import cv2
import numpy as np

from facecurate import __version__
from facecurate.common.constants import (
    ALIGN_FACES,
    ALIGN_SHARD_SIZE,
    ALIGN_MANIFEST,
    ALIGN_META,
    CROP_FORMATS,
    DETECT_MAX_SIDE,
    DETECT_MIN_SIDE,
    FALLBACK_DETECTORS,
    JPEG_QUALITY,
    LANDMARK_COLUMNS,
    MAX_IMAGE_PIXELS,
    MAX_INPUT_BYTES,
    RAW_LAYOUT,
    SHARD_CSV,
    STATUS_ERROR,
    STATUS_NO_FACE,
    STATUS_NOT_PRIMARY,
    STATUS_OK,
    STATUS_TOO_SMALL,
    STATUS_UNSUPPORTED,
    VERSIONS_KEY,
    WORK_DIR,
)
from facecurate.common.files import remove_stale_temps, write_bytes_atomic
from facecurate.common.filetree import inside, walk_tree
from facecurate.common.geometry import align_face, template
from facecurate.common.imageio import ImageError, is_image_name, read_image
from facecurate.engines import get_engine
from facecurate.models.zoo import DETECTORS, make_detector, make_landmarker, resolve_detector
from facecurate.common.procs import run_lock
from facecurate.common.quality import blockiness, flat_share, sharpness
from facecurate.common.provenance import library_versions
from facecurate.engines.runner import (RunError, WorkerSpec, check_meta, check_plan, check_versions, clear, fail_message,
                                       finished, in_part, merge_if_due, parse_part, plan_shards, recorded_size,
                                       run_shards)
from facecurate.common.manifests import AlignRow
from facecurate.common.records import Detection, nearest_to_centre
from facecurate.common.workspace import Workspace

#: The fallback detector sees a copy whose longer side is at most this many pixels.
FALLBACK_SIDE = 512
SHARD_DIR = "align"


class AlignError(RuntimeError):
    """A problem with the run as a whole (bad arguments, incompatible OUT)."""


@dataclass(frozen=True)
class AlignConfig:
    detector: str = "dlib"
    model_dir: Optional[str] = None  # SCRFD: a model pack directory or an .onnx file
    size: int = 112
    min_face: int = 40  # pixels, sqrt(box area) in the source image
    faces: str = "all"  # all | primary
    fmt: str = "jpg"  # jpg | png
    quality: int = JPEG_QUALITY
    max_upsample: int = 1
    fallback: str = "dlib-cnn"  # detector tried when the main one finds nothing; "none" to skip
    detect_max_side: int = DETECT_MAX_SIDE
    detect_min_side: int = DETECT_MIN_SIDE
    max_pixels: int = MAX_IMAGE_PIXELS
    max_bytes: int = MAX_INPUT_BYTES  # a larger file is recorded too_large, unread
    follow_external_links: bool = False  # follow symlinks whose real path leaves RAW
    device: str = "auto"

    def validate(self) -> None:
        if self.detector not in DETECTORS:
            raise AlignError(f"unknown detector {self.detector!r}; choose one of {', '.join(DETECTORS)}")
        if self.fallback not in FALLBACK_DETECTORS:
            raise AlignError(f"unknown fallback detector {self.fallback!r}; "
                             f"choose one of {', '.join(FALLBACK_DETECTORS)}")
        if self.detector == "scrfd" and not self.model_dir:
            raise AlignError("--detector scrfd needs --model-dir (a model pack directory or an .onnx file)")
        template(self.size)  # raises on a bad size
        if self.faces not in ALIGN_FACES:
            raise AlignError(f"--faces is one of {', '.join(ALIGN_FACES)}")
        if self.fmt not in CROP_FORMATS:
            raise AlignError(f"--format is one of {', '.join(CROP_FORMATS)}")
        for name, value, low in (("--min-face", self.min_face, 0), ("--detect-max-side", self.detect_max_side, 1),
                                 ("--max-pixels", self.max_pixels, 1), ("--max-bytes", self.max_bytes, 1)):
            if value < low:
                raise AlignError(f"{name} must be at least {low} (got {value})")

    def settings(self) -> dict:
        """What must not change between a run and its resumption."""
        d = asdict(self)
        d.pop("device")
        return d


@dataclass(frozen=True)
class InputFile:
    source: str  # POSIX path relative to RAW
    identity: str  # top-level folder, "" for files directly in RAW
    crop_stem: str  # crop path relative to OUT without "_<face>.<ext>"
    status: str = ""  # found unusable while listing (a link leading out of RAW): its row's status
    message: str = ""


# --------------------------------------------------------------------------- reader
def list_inputs(raw: str | os.PathLike, exclude: Optional[str | os.PathLike] = None,
                follow_external_links: bool = False) -> tuple[list[InputFile], list[str]]:
    """Every non-hidden file under RAW, sorted, with its identity (top-level folder).
    Follows symlinks while they stay inside RAW (``follow_external_links``: wherever
    they lead), never twice into the same real directory (loops); a link leading out
    is listed with status ``unsupported`` (:func:`facecurate.common.filetree.walk_tree`).
    Returns the files and a list of warnings (loops, unreadable directories)."""
    entries, warnings = walk_tree(raw, what="RAW", follow_external=follow_external_links, exclude=exclude)
    refused = sum(1 for e in entries if e.status)
    if refused:
        warnings.append(f"{refused} link(s) lead out of RAW and were not followed (recorded as unsupported; "
                        "--follow-external-links follows them)")
    rels = [e.rel for e in entries]

    # Crop names: <identity>/<sub/dirs>/<stem>_<face>.<ext>; keep the source extension
    # in the name only where two sources in one folder share a stem.
    stems: dict[str, int] = {}
    for r in rels:
        p = PurePosixPath(r)
        key = str(p.parent / p.stem)
        stems[key] = stems.get(key, 0) + 1
    out = []
    for e in entries:
        p = PurePosixPath(e.rel)
        identity = p.parts[0] if len(p.parts) > 1 or e.folder else ""
        key = str(p.parent / p.stem)
        stem = key if stems[key] == 1 else str(p.parent / p.name.replace(".", "_"))
        out.append(InputFile(e.rel, identity, stem, e.status, e.message))
    return out, warnings


# --------------------------------------------------------------------------- models
def _detector(cfg: AlignConfig, name: Optional[str] = None):
    """Detector ``name`` (default: ``cfg.detector``) from the model zoo, set up by ``cfg``."""
    return make_detector(name or cfg.detector, model_dir=cfg.model_dir, device=cfg.device,
                         max_upsample=cfg.max_upsample, min_side=cfg.detect_min_side)


def primary_score(det: Detection, w: int, h: int) -> float:
    """Face size weighted toward the image centre: a face at the centre counts fully,
    one in a corner about half."""
    cx = (det.box[0] + det.box[2]) / 2.0
    cy = (det.box[1] + det.box[3]) / 2.0
    d = math.hypot((cx - w / 2.0) / (w / 2.0), (cy - h / 2.0) / (h / 2.0)) / math.sqrt(2.0)
    return det.size * (1.0 - 0.5 * min(d, 1.0))


@dataclass
class FaceResult:
    det: Detection  # box and 5 landmarks in source pixels
    primary: bool
    status: str
    crop: Optional[np.ndarray] = None  # RGB crop when status is ok


@dataclass
class Timings:
    read: float = 0.0
    detect: float = 0.0
    landmarks: float = 0.0
    warp: float = 0.0
    write: float = 0.0

    def add(self, other: "Timings") -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))


def _label(name: str, detector) -> str:
    prov = detector.provider
    return name + (f"/{prov}" if prov else "")


class Aligner:
    """Detect, locate landmarks, pick the subject and warp, for one image at a time.
    Holds the models; build one per process."""

    def __init__(self, cfg: AlignConfig):
        cfg.validate()
        self.cfg = cfg
        self.detector = _detector(cfg)
        self._fallback = None  # built on first use
        self._landmarks = None
        if not self.detector.has_landmarks:  # dlib's detectors: the 68-point model fills them in
            self._landmarks = make_landmarker()
        self.timings = Timings()
        self.last_detector = cfg.detector

    @property
    def fallback(self):
        """The detector for images where the main one finds nothing: one pass at a
        fixed working size, no upsampling retries (MMOD costs seconds on big images)."""
        if self._fallback is None and self.cfg.fallback not in ("none", self.cfg.detector):
            self._fallback = _detector(replace(self.cfg, max_upsample=0, detect_min_side=0), self.cfg.fallback)
            if self._landmarks is None:
                self._landmarks = make_landmarker()
        return self._fallback

    @property
    def detector_label(self) -> str:
        """The detector that found the faces of the last image (and its ONNX provider)."""
        if self.last_detector != self.cfg.detector:
            return _label(self.last_detector, self._fallback)
        return self.main_label

    @property
    def main_label(self) -> str:
        return _label(self.cfg.detector, self.detector)

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces with 5 landmarks, in source pixels; detection runs on a copy whose
        longer side is at most ``detect_max_side``, landmarks on the full image."""
        h, w = rgb.shape[:2]
        t0 = time.perf_counter()
        scale = min(1.0, self.cfg.detect_max_side / max(h, w))
        small = rgb if scale == 1.0 else cv2.resize(rgb, (round(w * scale), round(h * scale)),
                                                    interpolation=cv2.INTER_AREA)
        dets = [d.scaled(1.0 / scale) for d in self.detector.detect(small)]
        self.last_detector = self.cfg.detector
        if not dets and self.fallback is not None:
            f = min(1.0, FALLBACK_SIDE / max(h, w))
            work = rgb if f == 1.0 else cv2.resize(rgb, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
            dets = [d.scaled(1.0 / f) for d in self.fallback.detect(work)]
            self.last_detector = self.cfg.fallback
        t1 = time.perf_counter()
        for d in dets:
            if d.landmarks is None:
                d.landmarks = self._landmarks.five(self._landmarks.predict(rgb, d.box))
        self.timings.detect += t1 - t0
        self.timings.landmarks += time.perf_counter() - t1
        return dets

    def process(self, rgb: np.ndarray) -> list[FaceResult]:
        """All faces of one image, the likely subject first."""
        h, w = rgb.shape[:2]
        dets = self.detect(rgb)
        # Usable faces by subject likelihood, then the too-small ones: face 0 is the primary.
        dets.sort(key=lambda d: (d.size < self.cfg.min_face, -primary_score(d, w, h),
                                 float(d.box[0]), float(d.box[1])))
        results: list[FaceResult] = []
        primary_taken = False
        t0 = time.perf_counter()
        for d in dets:
            if d.size < self.cfg.min_face:
                results.append(FaceResult(d, False, STATUS_TOO_SMALL))
                continue
            is_primary = not primary_taken
            primary_taken = True
            if self.cfg.faces == "primary" and not is_primary:
                results.append(FaceResult(d, False, STATUS_NOT_PRIMARY))
                continue
            results.append(FaceResult(d, is_primary, STATUS_OK, align_face(rgb, d.landmarks, self.cfg.size)))
        self.timings.warp += time.perf_counter() - t0
        return results


def centre_face_jpeg(rgb: np.ndarray, detector, landmarks, size: int = 112,
                     quality: int = JPEG_QUALITY) -> Optional[bytes]:
    """The face nearest the image centre (the subject of a centred photo, as in LFW),
    warped to a ``size`` ArcFace crop and encoded as JPEG; None when no face is found.
    ``detector``/``landmarks``: e.g. DlibHOGDetector and DlibLandmarks68. For building
    evaluation and benchmark sets of one crop per photo, outside the align pipeline."""
    d = nearest_to_centre(detector.detect(rgb), rgb.shape[1], rgb.shape[0])
    if d is None:
        return None
    crop = align_face(rgb, landmarks.five(landmarks.predict(rgb, d.box)), size)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("could not encode crop")
    return buf.tobytes()


# --------------------------------------------------------------------------- worker
def _row(inp: InputFile, face: int, status: str, *, primary: bool = False, aligned: str = "",
         det: Optional[Detection] = None, quality=(float("nan"),) * 3,
         img_wh=(0, 0), detector: str = "", message: str = "") -> AlignRow:
    """``quality``: (sharpness, blockiness, flat_share), see :mod:`facecurate.common.quality`."""
    row = dict(source=inp.source, identity=inp.identity, face=face, status=status, primary=bool(primary),
               aligned=aligned, sharpness=quality[0], blockiness=quality[1], flat_share=quality[2],
               img_w=img_wh[0] or None, img_h=img_wh[1] or None, detector=detector, message=message)
    if det is not None:
        row.update(zip(("x1", "y1", "x2", "y2"), (float(v) for v in det.box)))
        row["det_score"] = float(det.score)
        row["face_size"] = det.size
        if det.landmarks is not None:
            row.update(zip(LANDMARK_COLUMNS, (float(v) for v in det.landmarks.reshape(-1))))
    return AlignRow(**row)


def _encode(crop_rgb: np.ndarray, cfg: AlignConfig) -> bytes:
    bgr = cv2.cvtColor(crop_rgb, cv2.COLOR_RGB2BGR)
    if cfg.fmt == "png":
        ok, enc = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        ok, enc = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, cfg.quality])
    if not ok:
        raise RuntimeError("could not encode crop")
    return enc.tobytes()


def align_file(aligner: Aligner, raw: Path, out: Path, inp: InputFile) -> list[AlignRow]:
    """All manifest rows for one input file; writes its crops (atomically)."""
    cfg = aligner.cfg
    if inp.status:
        return [_row(inp, -1, inp.status, message=inp.message)]
    if not inp.identity:
        return [_row(inp, -1, STATUS_UNSUPPORTED, message="file directly under RAW: put it in an identity folder")]
    if not is_image_name(inp.source):
        return [_row(inp, -1, STATUS_UNSUPPORTED,
                     message=f"not an image file type ({PurePosixPath(inp.source).suffix or 'no extension'})")]
    t0 = time.perf_counter()
    try:
        rgb = read_image(raw / inp.source, max_pixels=cfg.max_pixels, max_bytes=cfg.max_bytes)
    except ImageError as e:
        return [_row(inp, -1, e.status, message=e.message)]
    aligner.timings.read += time.perf_counter() - t0
    wh = (rgb.shape[1], rgb.shape[0])
    results = aligner.process(rgb)
    label = aligner.detector_label  # after process(): the detector that found this image's faces
    if not results:
        return [_row(inp, -1, STATUS_NO_FACE, img_wh=wh, detector=label, message="no face detected")]
    rows = []
    t0 = time.perf_counter()
    for i, r in enumerate(results):
        aligned, quality, msg = "", (float("nan"),) * 3, ""
        if r.status == STATUS_OK:
            aligned = f"{inp.crop_stem}_{i}.{cfg.fmt}"
            # No fsync per crop (6 ms each): the rename keeps it whole if killed,
            # and the shard's manifest, written after its crops, is fsynced.
            data = _encode(r.crop, cfg)
            write_bytes_atomic(out / aligned, data, fsync=False)
            # flat_share of the crop as written, as clean reads it back
            written = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
            quality = (sharpness(r.crop), blockiness(rgb, r.det.box), flat_share(written))
        elif r.status == STATUS_TOO_SMALL:
            msg = f"face of {r.det.size:.0f} px is below --min-face {cfg.min_face}"
        elif r.status == STATUS_NOT_PRIMARY:
            msg = "not the primary face and --faces primary"
        rows.append(_row(inp, i, r.status, primary=r.primary, aligned=aligned, det=r.det, quality=quality,
                         img_wh=wh, detector=label, message=msg))
    aligner.timings.write += time.perf_counter() - t0
    return rows


def _safe_align_file(aligner: Aligner, raw: Path, out: Path, inp: InputFile) -> list[AlignRow]:
    try:
        return align_file(aligner, raw, out, inp)
    except Exception as e:  # one bad file must not end the run
        return [_row(inp, -1, STATUS_ERROR, message=f"{type(e).__name__}: {e}")]


def shard_csv(index: int) -> str:
    """A shard's manifest, relative to OUT."""
    return f"{WORK_DIR}/{SHARD_DIR}/{SHARD_CSV.format(index=index)}"


class AlignWorker:
    """One per worker process (models loaded once): turns a shard of input files into
    its manifest ``shard_NNNNNN.csv`` and crop files. Its record is written by the
    run machinery (:mod:`facecurate.engines.runner`) after it returns."""

    def __init__(self, cfg: AlignConfig, raw: str, out: str):
        self.aligner = Aligner(cfg)
        self.raw, self.out = Path(raw), Path(out)

    def run(self, shard) -> dict:
        before = Timings(**vars(self.aligner.timings))
        _remove_crop_temps(self.out, shard.items)
        rows: list[AlignRow] = []
        for inp in shard.items:
            rows.extend(_safe_align_file(self.aligner, self.raw, self.out, inp))
        Workspace(self.out).write_align(rows, shard_csv(shard.index))
        spent = {k: getattr(self.aligner.timings, k) - getattr(before, k) for k in vars(before)}
        return {"rows": len(rows), "status": _count_status(rows), "timings": spent,
                "detector": self.aligner.main_label}


def _remove_crop_temps(out: Path, items: Sequence[InputFile]) -> None:
    """Crops that a killed try of this shard left under temporary names (one look at
    each folder the shard writes to that exists already; never another shard's)."""
    stems: dict[Path, set] = {}
    for inp in items:
        if inp.identity:
            p = out / inp.crop_stem
            stems.setdefault(p.parent, set()).add(p.name)
    for folder, names in stems.items():
        remove_stale_temps(folder, lambda target: target.rpartition("_")[0] in names)


def _count(values) -> dict:
    counts: dict = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return dict(sorted(counts.items()))


def _count_status(rows: Sequence[AlignRow]) -> dict:
    return _count(r.status for r in rows)


def check_paths(raw: str | os.PathLike, out: str | os.PathLike) -> None:
    """Refuse an OUT that is RAW or lies inside it (its crops would become inputs,
    and align.csv would land among the photos)."""
    raw_r, out_r = os.path.realpath(raw), os.path.realpath(out)
    if out_r == raw_r:
        raise AlignError(f"OUT is RAW itself ({out}): choose an OUT folder outside RAW")
    if inside(out_r, raw_r):
        raise AlignError(f"OUT ({out}) is inside RAW ({raw}): choose an OUT folder outside RAW")


def _layout_warnings(raw: Path, inputs: Sequence[InputFile]) -> list[str]:
    """What is wrong with RAW's layout: no identity folders at all is an error, files
    directly under RAW a warning (they are recorded as unsupported)."""
    loose = sum(1 for f in inputs if not f.identity)
    if loose == len(inputs):
        found = f"{loose} file(s) directly under it and no identity folders" if loose else "no files at all"
        raise AlignError(f"nothing to align in {raw}: found {found}; expected {RAW_LAYOUT} "
                         "(one folder of photos per identity)")
    if loose:
        return [f"{loose} file(s) directly under {raw} belong to no identity (recorded as unsupported); "
                f"expected {RAW_LAYOUT}"]
    return []


def run_align(raw: str | os.PathLike, out: str | os.PathLike, cfg: AlignConfig = AlignConfig(), *,
              workers: Optional[int] = None, shard_size: Optional[int] = None, overwrite: bool = False,
              show_progress: bool = True, on_shard: Optional[Callable[[dict], None]] = None,
              engine="local", ray_address: Optional[str] = None, part=None) -> dict:
    """Align every file under RAW into OUT. Resumes an interrupted run with the same
    settings; ``overwrite`` starts again. ``engine``: "local", "ray" or an engine
    object (:mod:`facecurate.engines`); ``part`` "K/N" or (K, N): only shards whose
    index is K-1 modulo N. A second run on the same OUT (and part) at the same time
    is refused (:class:`facecurate.common.procs.LockedError`). Returns a summary dict."""
    cfg.validate()
    if cfg.detector == "scrfd":  # a wrong --model-dir fails before OUT records the run's settings

        resolve_detector(cfg.model_dir)
    raw, out = Path(raw), Path(out)
    if not raw.is_dir():
        raise AlignError(f"RAW folder not found: {raw}")
    check_paths(raw, out)
    try:
        part = parse_part(part) if isinstance(part, str) else part
        if part is not None and overwrite:
            raise RunError("--overwrite cannot be combined with --part: clear OUT with one run first")
        if isinstance(engine, str):
            engine = get_engine(engine, workers=workers, address=ray_address)
    except RunError as e:
        raise AlignError(str(e)) from None
    t_start = time.perf_counter()
    inputs, warnings = list_inputs(raw, exclude=out, follow_external_links=cfg.follow_external_links)
    warnings += _layout_warnings(raw, inputs)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out, SHARD_DIR, part):
        try:
            summary = _run_locked(raw, out, cfg, inputs, engine, shard_size, overwrite, part,
                                  show_progress, on_shard)
        except RunError as e:
            raise AlignError(str(e)) from None
    summary["seconds"] = round(time.perf_counter() - t_start, 2)
    todo = summary["processed_now"]
    summary["images_per_second"] = round(todo / summary["seconds"], 2) if todo and summary["seconds"] > 0 else None
    summary["warnings"] = warnings
    return summary


def _same_settings(out: Path):
    def same(old: dict, new: dict) -> Optional[str]:
        if old.get("settings") != new["settings"] or old.get("raw") != new["raw"]:
            return (f"{out} holds a run with other settings or another RAW ({old.get('raw')}); "
                    "rerun with the same flags to resume, use --overwrite to start again, or pick another OUT")
        return None
    return same


def _run_locked(raw: Path, out: Path, cfg: AlignConfig, inputs: list[InputFile], engine, shard_size: Optional[int],
                overwrite: bool, part, show_progress: bool, on_shard: Optional[Callable[[dict], None]]) -> dict:
    work = out / WORK_DIR / SHARD_DIR
    versions = library_versions(["onnxruntime"] if cfg.detector == "scrfd" else [])
    meta = {"raw": str(raw.resolve()), "settings": cfg.settings(), "version": __version__, VERSIONS_KEY: versions}
    if overwrite:
        clear(work, [out / ALIGN_MANIFEST, out / ALIGN_META])
    check_versions(work, versions, part)  # first: the settings check rewrites align.json
    check_meta(out / ALIGN_META, meta, _same_settings(out), part=part)
    shard_size = int(shard_size or recorded_size(work, ALIGN_SHARD_SIZE))
    shards = plan_shards(inputs, lambda f: f.source, shard_size)
    plan = check_plan(work, shards, shard_size, part)
    spec = WorkerSpec(AlignWorker, (cfg, str(raw), str(out)), str(work), must_see=(str(raw), str(out)),
                      gpu=cfg.detector == "scrfd" and cfg.device != "cpu")
    stats, complete = run_shards(engine, spec, shards, part=part, desc="align", unit="img",
                                 show_progress=show_progress, on_shard=on_shard)
    if stats.failed:
        raise RunError(fail_message("align", stats))
    rows = merge_if_due(out, SHARD_DIR, work, plan, part, lambda: merge_manifest(out, shards),
                        outputs=(ALIGN_MANIFEST, ALIGN_META)) if complete else None
    if rows is None:  # a part whose siblings are still running: count its own shards
        rows = _read_shards(out, [s for s in shards if in_part(s.index, part)])
    totals = Timings()
    for rec in stats.records:
        totals.add(Timings(**rec["stats"]["timings"]))
    now = sum(rec["units"] for rec in stats.records)
    label = stats.records[0]["stats"]["detector"] if stats.records else cfg.detector
    status = _count_status(rows)
    busy = sum(vars(totals).values())
    return {
        "raw": str(raw), "out": str(out), "files": len({r.source for r in rows}),
        "identities": len({r.identity for r in rows if r.identity}),
        "processed_now": now, "resumed": sum(len(s.items) for s in shards if in_part(s.index, part)) - now,
        "faces": sum(1 for r in rows if r.has_face),
        "crops": status.get(STATUS_OK, 0),
        "files_with_crop": len({r.source for r in rows if r.is_ok}),
        "status": status, "detector": label, "workers": stats.workers if now else 0,
        "found_by": _count(r.detector for r in rows if r.has_face),
        "seconds": None, "images_per_second": None,
        "detector_share": round((totals.detect + totals.landmarks) / busy, 3) if busy > 0 else None,
        "timings": {k: round(v, 2) for k, v in vars(totals).items()},
        "part": f"{part[0]}/{part[1]}" if part else None, "merged": complete,
        "engine": stats.summary(), "warnings": [],
    }


def _read_shards(out: Path, shards) -> list[AlignRow]:
    done = finished(out / WORK_DIR / SHARD_DIR, shards)
    ws = Workspace(out)
    return [r for s in shards if s.index in done for r in ws.read_table(shard_csv(s.index), AlignRow)[1]]


def merge_manifest(out: Path, shards) -> list[AlignRow]:
    """Writer: merge the finished shards' manifests into OUT/align.csv, sorted by
    source and face (independent of sharding, engine and worker count)."""
    rows = _read_shards(out, shards)
    rows.sort(key=AlignRow.sort_key)
    Workspace(out).write_align(rows)
    return rows


def read_manifest(out: str | os.PathLike) -> list[AlignRow]:
    return Workspace(out).align_rows()


__all__ = ["AlignConfig", "AlignError", "check_paths", "Aligner", "InputFile", "list_inputs", "run_align", "read_manifest",
           "primary_score"]
