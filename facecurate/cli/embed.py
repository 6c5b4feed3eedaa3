"""CLI for the embed stage: ``facecurate embed`` and ``facecurate eval-pairs``."""

from __future__ import annotations

import sys

import click

from facecurate.cli.engine_options import engine_options
from facecurate.cli.input_options import input_options
from facecurate.common.constants import DLIB_FEEDS, EVAL_PICKS, FALLBACK_DETECTORS, STORE_DTYPES
from facecurate.engines import ENGINES
from facecurate.models.zoo import DETECTORS, DEVICES, RUNTIMES
from facecurate.common.files import emit_summary, say
from facecurate.align.align import AlignError
from facecurate.embed.embed import EmbedError, run_embed
from facecurate.evalpairs.evalpairs import PairsError, run_eval_pairs

_MODEL_HELP = ("dlib (default, offline: dlib's 128-D ResNet descriptor), arcface (an insightface "
               "recogniser found in --model-dir), or a path to an ArcFace-style .onnx.")
_FEED_HELP = ("How dlib's model is fed. five: dlib's 150x150 chip geometry warped from the source "
              "photo with align's 5 points (default, most accurate); 68: dlib's 68 landmarks re-run "
              "on the box, then dlib.get_face_chip; crop: the chip warped from the 112 crop (less "
              "field of view). Without a source photo, crop is used.")

_RUNTIME_HELP = ("What runs dlib's model. onnx: the network converted from dlib's own weights (at first "
                 "use, cached) on ONNX Runtime, batched, on CUDA when a session really gets it; dlib: "
                 "dlib itself (CPU, one process per core); auto: onnx when ONNX Runtime is installed, "
                 "else dlib. A store is never mixed: its signature records the runtime.")


def _common(f):
    # applied bottom-up: the first option listed here is applied last, so it shows first
    f = click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")(f)
    f = click.option("--dlib-feed", type=click.Choice(DLIB_FEEDS), default="five",
                     show_default=True, help=_FEED_HELP)(f)
    f = click.option("--runtime", type=click.Choice(RUNTIMES), default="auto", show_default=True,
                     help=_RUNTIME_HELP)(f)
    f = click.option("--fp16", is_flag=True, help="ONNX on CUDA: run the model in float16.")(f)
    f = click.option("--workers", type=click.IntRange(1), default=None,
                     help="dlib: processes (default: all cores); ONNX: threads decoding and "
                          "preprocessing ahead of the model.")(f)
    f = click.option("--batch-size", type=click.IntRange(1), default=None,
                     help="Faces per model call (default: 32 for dlib, by device for ONNX).")(f)
    f = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                     help="ONNX Runtime device; auto uses CUDA only when a session really gets it, "
                          "else the CPU (and says so).")(f)
    f = click.option("--model-dir", type=click.Path(exists=True), default=None,
                     help="For --model arcface: an insightface model pack directory (e.g. "
                          "~/.insightface/models/buffalo_l) or an .onnx file; the recogniser is "
                          "found by inspecting the graphs.")(f)
    f = click.option("--model", default="dlib", show_default=True, metavar="dlib|arcface|FILE.onnx",
                     help=_MODEL_HELP)(f)
    return f


@click.command("embed")
@click.argument("out", type=click.Path(exists=True))
@_common
@click.option("--flip/--no-flip", default=True, show_default=True,
              help="Add the embedding of the mirrored crop, then renormalise (as insightface's "
                   "evaluation does). Costs twice the model time; on the noisy LFW-dev benchmark "
                   "it lifts clean's retention by about 1 point at the same purity.")
@click.option("--out", "store", type=click.Path(file_okay=False), default=None,
              help="Write the store here instead of into OUT (needed for a read-only folder of "
                   "crops; default for a .rec: its folder).")
@click.option("--shard-size", type=click.IntRange(min=1), default=None,
              help="Faces per shard (default: 64 with --runtime dlib, 256 on ONNX Runtime): the unit of work and of "
                   "resumption. Recorded: reruns and parts without it keep the recorded value.")
@click.option("--dtype", type=click.Choice(STORE_DTYPES), default=STORE_DTYPES[0], show_default=True,
              help="Type of embeddings.npy's numbers. float16 halves the store on disk and in the page "
                   "cache (512-D stores of millions of faces); clean, eval-pairs and report read either "
                   "and compute in float32. Part of the store's settings: a rerun with the other type is "
                   "refused (--overwrite).")
@input_options("the crop folder")
@engine_options
@click.option("--overwrite", is_flag=True, help="Discard an existing store and start again.")
def embed(out, model, model_dir, device, batch_size, workers, fp16, runtime, dlib_feed, as_json, flip, store,
          shard_size, dtype, max_bytes, follow_external_links, engine, ray_address, part, overwrite):
    """L2-normalised embeddings of every face crop in OUT.

    OUT is a folder made by `facecurate align` (every ok crop of OUT/align.csv,
    in its order), a plain folder of crops (<identity>/<image>), or a .rec
    (with its .idx) made by `facecurate pack`.

    \b
    Writes the store:
      embeddings.npy   float32 (or --dtype float16) N x D, each row of unit length
      embeddings.csv   row i names vector i: aligned, source, identity, face
      embeddings.json  model name, file hash, dimension, input size, flip, ...

    A rerun embeds only the crops not embedded yet (an interrupted run loses at
    most the chunks in flight). A store made with another model or other
    settings is refused (use --overwrite or --out). In a folder of crops only
    regular files are read, and symlinks only while they stay inside it
    (--follow-external-links); the others are recorded as failed, with the reason.
    """
    try:
        summary = run_embed(out, model=model, model_dir=model_dir, batch_size=batch_size, workers=workers,
                            flip=flip, device=device, fp16=fp16, dlib_feed=dlib_feed, store_dir=store,
                            overwrite=overwrite, runtime=runtime, chunk_size=shard_size, engine=engine,
                            ray_address=ray_address, part=part, max_bytes=max_bytes,
                            follow_external_links=follow_external_links, dtype=dtype)
    except EmbedError as e:
        raise click.ClickException(str(e)) from None
    if summary.get("provider") and "CUDA" not in str(summary["provider"]) and model != "dlib" and device != "cpu":
        click.echo(f"embed: running on {summary['provider']} (no usable CUDA)", err=True)
    emit_summary("embed", summary, as_json)


@click.command("eval-pairs")
@click.argument("pairs", type=click.Path(exists=True, dir_okay=False))
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@_common
@click.option("--detector", type=click.Choice(DETECTORS), default="dlib", show_default=True,
              help="align's detector (scrfd takes its model from --model-dir).")
@click.option("--flip/--no-flip", default=True, show_default=True,
              help="Add the mirrored crop's embedding (insightface's evaluation does).")
@click.option("--work", type=click.Path(file_okay=False), default=None,
              help="Working folder (links to the images, crops, embeddings); reused, so a rerun "
                   "only evaluates. Default: a folder under ~/.cache/facecurate keyed by PAIRS, "
                   "ROOT and the detector.")
@click.option("--pick", type=click.Choice(EVAL_PICKS), default="centre", show_default=True,
              help="Which face stands for an image: the one nearest the image centre (pairs images "
                   "are centred on their subject) or align's primary guess.")
@click.option("--retry-detector", type=click.Choice(FALLBACK_DETECTORS), default="dlib-cnn",
              show_default=True,
              help="With --pick centre: images with no face near the centre are searched again "
                   "with this detector.")
@click.option("--roc", type=click.Path(dir_okay=False), default=None, help="Write a ROC curve (PNG) here.")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="Engine of the align and embed runs (see `facecurate align --help`).")
@click.option("--ray-address", default=None, metavar="HOST:PORT",
              help="--engine ray: the cluster (default: RAY_ADDRESS, else a local Ray instance).")
def eval_pairs(pairs, root, model, model_dir, device, batch_size, workers, fp16, runtime, dlib_feed, as_json,
               detector, flip, work, pick, retry_detector, roc, engine, ray_address):
    """Verification accuracy of the detector + alignment + model on an
    LFW-style pairs file.

    PAIRS is in lfw_pairs.txt's format (header `folds n`, then per fold n
    same-person lines `name i j` and n different-person lines `name1 i name2
    j`); images are ROOT/<name>/<name>_<i:04d>.jpg. Every image goes through
    `facecurate align` and `facecurate embed` (the face nearest its centre;
    images with none near it are searched again with dlib's CNN); the 10-fold
    protocol picks the cosine threshold on 9 folds and measures accuracy on
    the 10th. Prints mean and std accuracy, the best threshold, TAR at FAR
    1e-3, and every image that failed to align: each pair holding one counts
    as an error.
    """
    try:
        s = run_eval_pairs(pairs, root, work=work, detector=detector, model=model, model_dir=model_dir,
                           flip=flip, device=device, batch_size=batch_size, workers=workers,
                           dlib_feed=dlib_feed, roc=roc, show_progress=True, pick=pick,
                           retry_detector=retry_detector, runtime=runtime, fp16=fp16, engine=engine,
                           ray_address=ray_address)
    except (AlignError, EmbedError, PairsError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        emit_summary("eval-pairs", s, True)
        return
    click.echo(f"eval-pairs: {s['pairs']} pairs in {s['folds']} folds, {s['images']} images "
               f"({s['model']}, runtime={s['runtime']}, feed={s['feed']}, flip={s['flip']}, "
               f"detector={s['detector']})")
    click.echo(f"  accuracy      {s['accuracy'] * 100:.2f}% +- {s['std'] * 100:.2f}%  (failed images count as errors)")
    if s["accuracy_valid_pairs_only"] is not None:
        click.echo(f"  without failed pairs  {s['accuracy_valid_pairs_only'] * 100:.2f}%")
    click.echo(f"  best threshold  {s['best_threshold']:.4f} (cosine)")
    click.echo(f"  TAR@FAR=1e-3  {s['tar_at_far_1e-3'] * 100:.2f}% (threshold {s['threshold_at_far_1e-3']:.4f})")
    click.echo(f"  folds         {' '.join(f'{a * 100:.2f}' for a in s['fold_accuracy'])}")
    if s["retried"]:
        click.echo(f"  re-searched   {s['retried']} images with no face near the centre "
                   f"({s['retry']['detector']}): {s['recovered']} recovered")
    click.echo(f"  failed images {s['failed_images']} ({s['failed_pairs']} pairs counted as errors)")
    for f in s["failures"]:
        say(f"    {f['image']}: {f['reason']}")
    click.echo(f"  work folder   {s['work']}")
    if s["roc"]:
        click.echo(f"  ROC           {s['roc']}")
    sys.stdout.flush()


COMMANDS = [embed, eval_pairs]
