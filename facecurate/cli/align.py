"""``facecurate align RAW OUT``."""

from __future__ import annotations

import os

import click

from facecurate.cli.engine_options import engine_options
from facecurate.cli.input_options import input_options
from facecurate.common.files import emit_summary, say
from facecurate.common.constants import (ALIGN_FACES, ARCFACE_BASE_SIZE, CROP_FORMATS, DETECT_MAX_SIDE,
                                         FALLBACK_DETECTORS, JPEG_QUALITY, MAX_IMAGE_PIXELS)
from facecurate.models.zoo import DETECTORS, DEVICES
from facecurate.align.align import AlignConfig, AlignError, check_paths, run_align


def _crop_size(_ctx, _param, value: int) -> int:
    if value <= 0 or value % ARCFACE_BASE_SIZE:
        raise click.BadParameter(f"{value} is not a positive multiple of {ARCFACE_BASE_SIZE} "
                                 f"(e.g. 112, 224)")
    return value


@click.command("align")
@click.argument("raw", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--detector", type=click.Choice(DETECTORS), default="dlib", show_default=True,
              help="dlib: HOG (fast, offline, upsamples only when nothing is found); dlib-cnn: dlib's MMOD CNN "
                   "(more robust, slower on a CPU); scrfd: an insightface SCRFD ONNX model from --model-dir.")
@click.option("--model-dir", type=click.Path(exists=True),
              help="For --detector scrfd: an insightface model pack (e.g. ~/.insightface/models/buffalo_l) or an "
                   ".onnx file. The detector is found by inspecting the graphs.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="ONNX Runtime device for scrfd; auto uses CUDA only when a session really gets it.")
@click.option("--size", type=int, default=112, show_default=True, callback=_crop_size,
              help="Crop size in pixels; a positive multiple of 112 (the template is scaled).")
@click.option("--min-face", type=click.IntRange(min=0), default=40, show_default=True,
              help="Faces smaller than this (sqrt of box area, source pixels) are recorded as too_small, no crop.")
@click.option("--faces", type=click.Choice(ALIGN_FACES), default="all", show_default=True,
              help="Write a crop for every face, or only for the likely subject (the others are still recorded).")
@click.option("--format", "fmt", type=click.Choice(CROP_FORMATS), default="jpg", show_default=True,
              help="Crop file format: jpg (quality --quality; pack stores such crops byte-for-byte) or png "
                   "(lossless, larger; pack re-encodes it as JPEG).")
@click.option("--quality", type=click.IntRange(1, 100), default=JPEG_QUALITY, show_default=True, help="JPEG quality.")
@click.option("--fallback", type=click.Choice(FALLBACK_DETECTORS), default="dlib-cnn", show_default=True,
              help="Detector tried on images where the main one finds no face.")
@click.option("--max-upsample", type=click.IntRange(0, 3), default=1, show_default=True,
              help="dlib detectors: upsample up to this many times, only when nothing is found.")
@click.option("--detect-max-side", type=click.IntRange(min=1), default=DETECT_MAX_SIDE, show_default=True,
              help="Detect on a copy of large images whose longer side is this; crops are warped from full size.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=MAX_IMAGE_PIXELS, show_default=True,
              help="Refuse larger images (decompression-bomb guard) as too_large.")
@input_options("RAW")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Worker processes (default: all cores).")
@click.option("--shard-size", type=click.IntRange(min=1), default=None,
              help="Files per shard (default 64): the unit of work a worker takes and of resumption. "
                   "Recorded in OUT: reruns and parts without it keep the recorded value.")
@engine_options
@click.option("--overwrite", is_flag=True, help="Start again instead of resuming what OUT already holds.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def align(raw, out, detector, model_dir, device, size, min_face, faces, fmt, quality, fallback, max_upsample,
          detect_max_side, max_pixels, max_bytes, follow_external_links, workers, shard_size, engine, ray_address,
          part, overwrite, as_json):
    """Detect every face in RAW/<identity>/* and write aligned crops to OUT.

    Each face with its 5 landmarks is warped onto the ArcFace template (similarity
    transform) into OUT/<identity>/<name>_<face>.jpg. One face per photo is marked
    primary: the largest, weighted toward the image centre. OUT/align.csv records
    every input file: one row per face, and one row with a reason (no_face,
    decode_error, unsupported, too_large, unreadable, ...) for each file without a
    crop. Subfolders belong to their top-level identity; hidden files are ignored.
    Only regular files are read (a FIFO or device is recorded as unsupported), and
    symlinks only while they stay inside RAW (see --follow-external-links).

    An interrupted run continues where it stopped when rerun with the same flags.
    """
    try:
        check_paths(raw, out)
    except AlignError as e:
        raise click.UsageError(str(e)) from None

    cfg = AlignConfig(detector=detector, model_dir=os.path.abspath(model_dir) if model_dir else None, size=size,
                      min_face=min_face, faces=faces, fmt=fmt, quality=quality, fallback=fallback, max_upsample=max_upsample,
                      detect_max_side=detect_max_side, max_pixels=max_pixels, max_bytes=max_bytes,
                      follow_external_links=follow_external_links, device=device)
    try:
        summary = run_align(raw, out, cfg, workers=workers, shard_size=shard_size, overwrite=overwrite,
                            engine=engine, ray_address=ray_address, part=part)
    except AlignError as e:
        raise click.ClickException(str(e)) from None
    for w in summary["warnings"]:
        say(f"warning: {w}", err=True)
    emit_summary(f"align: {summary['files']} files, {summary['crops']} crops in {summary['out']}", summary, as_json)


COMMANDS = [align]
