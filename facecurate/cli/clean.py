"""``facecurate clean OUT`` (review commands are appended to COMMANDS below)."""

from __future__ import annotations

import click

from facecurate.cli.engine_options import engine_options
from facecurate.models.zoo import RUNTIMES
from facecurate.clean.clean import default_params, run_clean
from facecurate.common.files import emit_summary
from facecurate.common.procs import run_lock


def _show_defaults(ctx: click.Context, _param, value: bool) -> None:
    """Eager: print every model family's default thresholds (and the shared settings)
    before OUT is checked, then exit."""
    if not value or ctx.resilient_parsing:
        return
    import json

    out = {}
    for family, example in (("dlib", "dlib_face_recognition_resnet_model_v1"), ("arcface", "w600k_r50")):
        d = default_params(example).as_dict()
        d.pop("model", None)
        d.pop("calibrated", None)
        out[family] = d
    click.echo(json.dumps(out, indent=2, sort_keys=True))
    ctx.exit()


@click.command("clean")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--keep", type=float, help="Keep subject faces whose cosine to the identity centre is at least this "
                                         "(default: per model, see --show-defaults).")
@click.option("--drop", type=float, help="Drop subject faces below this; between --drop and --keep: review.")
@click.option("--cw", "cw", type=float, help="Chinese-whispers edge threshold (cosine).")
@click.option("--dup", type=float, help="Faces of one identity at least this similar are duplicates.")
@click.option("--merge", type=float, help="Identity centres at least this similar go to merges.csv.")
@click.option("--calibrate", "far", type=float, default=None, metavar="FAR",
              help="Estimate the thresholds from this dataset for a false-accept rate FAR (e.g. 1e-3): "
                   "drop = impostor similarity at FAR, keep = at FAR/10.")
@click.option("--exclude", multiple=True, type=click.Path(exists=True),
              help="Drop identities overlapping an evaluation set: a folder of identity folders (names), a text "
                   "file of names, or an insightface verification .bin (its faces are embedded and identities "
                   "whose centre matches one are dropped). Repeatable.")
@click.option("--max-review", type=click.FloatRange(0, 1), default=0.03, show_default=True,
              help="At most this share of all faces goes to review: the band keeps the faces just "
                   "short of --keep and drops the rest (what is kept never depends on it).")
@click.option("--min-images", type=int, default=2, show_default=True,
              help="Identities with fewer kept photos are dropped (too_few_images).")
@click.option("--min-face", type=float, default=0.0, show_default=True,
              help="Subject faces smaller than this (px, sqrt of box area) are dropped as low_quality.")
@click.option("--ambiguous", type=click.Choice(["review", "drop"]), default="review", show_default=True,
              help="What happens to the faces of a folder with no clearly dominant person.")
@click.option("--show-defaults", is_flag=True, is_eager=True, expose_value=False, callback=_show_defaults,
              help="Print the model-aware default thresholds and exit (no OUT needed).")
@click.option("--discard-manual", is_flag=True,
              help="Recompute every decision. By default a face decided in a review (`review apply`, "
                   "reason manual) keeps that decision; what clean decides now goes to previous_decision.")
@click.option("--runtime", type=click.Choice(RUNTIMES), default="auto", show_default=True,
              help="What runs dlib's model when clean embeds (OUT without a store, or a .bin given to "
                   "--exclude): onnx (ONNX Runtime), dlib, or auto (onnx when installed). An existing "
                   "store is continued on its own runtime.")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Processes for the per-identity work (default: all cores); the outputs do not depend on it.")
@click.option("--shard-faces", type=click.IntRange(1000), default=None, metavar="N",
              help="A packed dataset's sharded clean: faces per shard of whole identities (default "
                   "200000); the outputs do not depend on it.")
@engine_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def clean(out, keep, drop, cw, dup, merge, far, exclude, max_review, min_images, min_face, ambiguous,
          discard_manual, runtime, workers, shard_faces, engine, ray_address, part, as_json):
    """Decide keep / drop / review for every face in OUT/align.csv, or for every
    image record when OUT holds a packed dataset (train.rec + .idx, no align.csv;
    identities = labels, named from labels.csv beside it; one face per record).

    Per identity: dlib Chinese-whispers clusters find the dominant person, a robust
    (trimmed, iterated) centre scores every face, at most one face per photo is the
    subject (others: not_subject), near-duplicates are kept once (largest, sharpest
    copy), and a folder without a clearly dominant person is flagged ambiguous.
    Thresholds default per embedding model (dlib 128-D, ArcFace 512-D) or come from
    --calibrate. Embeddings are computed with the default model when missing.

    Scores are corrected on the dataset itself, nothing trained: generic faces,
    crowded identities and tight folders need more evidence; blurred, heavily
    compressed (JPEG-blocky) and occluded crops, as align.csv records them, are lifted
    by the gap measured between good and poor inliers. Within the --max-review budget,
    review takes first the best faces of identities that would keep nothing (flagged
    lost) or too few (weak_majority), then occluded faces, then the band.

    A packed dataset is cleaned in shards of whole identities, in bounded memory (a
    WebFace42M-sized store on one machine), on local processes or a Ray cluster
    (--engine ray), or as a job array (--part K/N: each part runs its shards of every
    step it can; a run without --part finishes and writes the outputs). Interrupted
    runs continue; the outputs are the same for any engine, workers, shard size or parts.

    \b
    Writes OUT/clean.csv      one row per crop: decision, reason, score, cluster
           OUT/identities.csv per identity: counts, estimated noise, flags
           OUT/merges.csv     identity pairs that look like one person
           OUT/clean.json     the thresholds used and the summary
    """
    if far is not None and not 0 < far < 1:
        raise click.BadParameter("FAR must be between 0 and 1", param_hint="--calibrate")

    try:
        with run_lock(out, "clean", part):
            summary = run_clean(out, model_overrides=dict(keep=keep, drop=drop, cw=cw, dup=dup, merge=merge),
                                calibrate_far=far, exclude=exclude, max_review=max_review,
                                min_images=min_images, min_face=min_face, ambiguous=ambiguous,
                                keep_manual=not discard_manual, runtime=runtime, workers=workers,
                                shard_faces=shard_faces, engine=engine, ray_address=ray_address, part=part)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    if summary.get("complete") is False:
        head = f"clean part {part[0]}/{part[1]}: {summary['note']}" if part else f"clean: {summary['note']}"
    else:
        head = f"clean: {summary['faces']} faces in {summary['identities']} identities"
    emit_summary(head, summary, as_json)


COMMANDS = [clean]
