"""CLI for the pack stage: ``pack``, ``inspect``, ``unpack``, ``pack-pairs`` (thin
wrappers over :mod:`facecurate.pack.packer`, :mod:`facecurate.pack.inspect_rec`,
:mod:`facecurate.pack.unpack` and :mod:`facecurate.pack.pairs`)."""

from __future__ import annotations

import click

from facecurate.cli.input_options import input_options
from facecurate.common.constants import PACK_ERRORS_CSV
from facecurate.common.files import emit_summary, say
from facecurate.common.recdata import not_a_rec, rec_paths
from facecurate.common.recordio import RecordIOError
from facecurate.pack.checksums import SumsError, write_sums
from facecurate.pack.inspect_rec import inspect as run_inspect
from facecurate.pack.pack_inputs import PackError
from facecurate.pack.packer import pack as run_pack
from facecurate.pack.pairs import PairsError
from facecurate.pack.pairs import pack_pairs as run_pack_pairs
from facecurate.pack.unpack import UnpackError
from facecurate.pack.unpack import unpack as run_unpack


def _fail(msg: str) -> None:
    raise click.ClickException(msg)


@click.command("pack")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--layout", type=click.Choice(["plain", "insightface"]), default="plain", show_default=True,
              help="plain: keys 0..N-1, every record an image with a scalar label (arcface_torch "
                   "MXFaceDataset and DALI). insightface: header record 0 + images grouped by class + one "
                   "identity record per class (MXFaceDataset and old insightface tools; NOT DALI).")
@click.option("--shuffle/--no-shuffle", default=None,
              help="Shuffle the image order (plain) or the order within each class (insightface) "
                   "[default: shuffle crops; keep the order of a .rec].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the shuffle.")
@click.option("--min-images", type=click.IntRange(min=1), default=1, show_default=True,
              help="Drop identities with fewer usable images (reported in pack_errors.csv).")
@click.option("--size", type=click.IntRange(min=1), default=None,
              help="Crop size in pixels [default: OUT/align.json's size, else 112].")
@click.option("--resize", is_flag=True, help="Resize crops of the wrong size instead of reporting them.")
@click.option("--strict", is_flag=True,
              help="Fail (and leave DEST untouched) on any input problem instead of skipping and reporting it "
                   "(identities below --min-images are still only reported).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Threads reading crops ahead (can help on slow or network storage; with the files "
                   "in the page cache one is fastest).")
@click.option("--fsync/--no-fsync", default=True, show_default=True,
              help="Flush the files to disk before renaming them into place (--no-fsync is faster; an "
                   "interrupted process still leaves DEST intact, only an OS crash could lose the new files).")
@click.option("--merge-identities", "merges", type=click.Path(exists=True, dir_okay=False), default=None,
              help="(OUT holding a .rec) a merges.csv of confirmed pairs (columns a, b; with a decision "
                   "or confirmed column, only rows saying merge/yes are used): each pair is packed as one identity.")
@input_options("OUT (a folder of crops)")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def pack(out, dest, layout, shuffle, seed, min_images, size, resize, strict, threads, fsync, merges, max_bytes,
         follow_external_links, as_json):
    """Pack the crops of OUT into DEST/train.rec, train.idx, train.lst and property
    for insightface arcface_torch, without MXNet.

    \b
    What is packed:
      OUT/clean.csv exists   rows with decision == keep
      else OUT/align.csv     rows with status ok and primary == 1
      else                   OUT/<identity>/* image files
      OUT/train.rec + .idx   (a packed dataset, no align.csv) the records its
                             clean.csv keeps, image bytes unchanged, labels
                             renumbered 0..C-1; labels.csv gives the old ones

    \b
    Writes into DEST:
      train.rec, train.idx   MXNet RecordIO + index (keys 0..N-1 in the plain layout)
      train.sums             key, offset, length, sha256 of every record's payload
                             (`facecurate inspect --verify` checks them)
      train.lst              MXNet im2rec order: index<TAB>label<TAB>path
                             (not insightface's old aligned<TAB>path<TAB>label order);
                             path relative to OUT
      property               num_classes,H,W
      labels.csv             identity,label,images (labels 0..C-1 in sorted identity order)
      pack_errors.csv        every crop or identity not packed, with the reason
      pack.json              what was packed, with which options

    Crops are streamed: each is read, checked and written in one pass (the shuffled
    order is drawn from the listing before reading), so memory stays small and the
    disk writes while pack reads. JPEG crops of the target size are stored
    byte-for-byte; other crops are encoded once as JPEG quality 95. Missing,
    unreadable, non-image and wrong-size crops and empty identities are skipped and
    reported (exit 0), or fail the run with --strict. All files are written under
    temporary names (DEST/.<name>.pack-tmp), flushed to disk and renamed into place
    at the end: an interrupted pack leaves DEST as it was. Same inputs, options and
    seed give byte-identical files.
    """
    try:
        res = run_pack(out, dest, layout=layout, shuffle=shuffle, seed=seed, min_images=min_images, size=size,
                  resize=resize, strict=strict, threads=threads, fsync=fsync, show_progress=True, merges=merges,
                  max_bytes=max_bytes, follow_external_links=follow_external_links)
    except PackError as e:
        _explain_failure(e, as_json)
        _fail(str(e))
    emit_summary("facecurate pack", res.summary(), as_json)
    if not as_json:
        click.echo("\narcface_torch config (configs/<yours>.py):")
        click.echo("  " + res.config_snippet().replace("\n", "\n  "))
        not_kept = res.notes.get("not_kept", 0)
        if not_kept:
            click.echo(f"\n{not_kept} record(s) clean did not keep were left out (not_kept: a decision, no "
                       f"problem): listed in {res.dest / PACK_ERRORS_CSV}", err=True)
        if res.problems:
            click.echo(f"\n{len(res.problems)} input problem(s) not packed: see {res.dest / PACK_ERRORS_CSV}",
                       err=True)


#: How many input problems a failed pack lists on stderr (all are in pack_errors.csv).
_SHOWN_ERRORS = 20


def _explain_failure(e, as_json: bool) -> None:
    """A failed pack still says why: the first problems per crop on stderr, and the
    summary on stdout under --json."""
    import json

    shown = sorted(e.errors, key=lambda x: x.path.endswith("/"))  # crops first, then identities (stable)
    for err in shown[:_SHOWN_ERRORS]:
        say(f"  {err.path}: {err.reason}: {err.message}", err=True)
    if len(e.errors) > _SHOWN_ERRORS:
        where = (e.summary or {}).get("errors_file") or "the list above"
        click.echo(f"  ... and {len(e.errors) - _SHOWN_ERRORS} more ({where})", err=True)
    if as_json and e.summary is not None:
        click.echo(json.dumps(dict(e.summary, error=str(e)), sort_keys=True, default=str))


@click.command("inspect")
@click.argument("rec", type=click.Path())
@click.option("--full", is_flag=True, help="Decode every image (default: a sample of --sample images).")
@click.option("--sample", type=click.IntRange(min=0), default=64, show_default=True,
              help="Number of images to decode without --full.")
@click.option("--verify", is_flag=True,
              help="Check every record's payload against the checksums beside the .rec (train.sums, written by "
                   "pack or `facecurate checksum`); the first bad key is named.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def inspect(rec, full, sample, verify, as_json):
    """Validate a RecordIO dataset and describe it.

    REC is DEST/train, DEST (a folder with train.rec), or a .rec path; the .idx
    beside it is used. Checks the framing of every record (magic, lengths, split
    records, padding), that every .idx offset is a record start, the layout
    (plain or insightface header, as arcface_torch decides it), labels (integers,
    0..C-1, contiguous; vector labels reduced to their first value), identity
    records, the property file, and decodes a sample of images (all with --full).
    With --verify, every record's payload is hashed and compared with train.sums;
    without a train.sums, a flipped bit inside an image cannot be detected (it says
    so: `facecurate checksum DEST` writes one).

    Exits 1 naming the offending record on any problem.
    """
    rec_file = rec_paths(rec)[0]
    if not_a_rec(rec):
        _fail(not_a_rec(rec))
    if not rec_file.is_file():  # an error, not a description: stderr only, stdout stays empty
        _fail(f"{rec_file} does not exist (REC is DEST/train, a folder holding train.rec, or a .rec path)"
              if not rec_file.exists() else f"{rec_file} is not a file")
    res = run_inspect(rec, full=full, sample=sample, verify=verify, show_progress=True)
    s = res.summary()
    if as_json:
        emit_summary("", s, True)
    else:
        msgs, warns = s.pop("error_messages"), s.pop("warnings")
        emit_summary("facecurate inspect", s, False)
        for w in warns:
            say(f"warning: {w}", err=True)
        for m in msgs:
            say(f"error: {m}", err=True)
    if not res.ok:
        raise SystemExit(1)


@click.command("unpack")
@click.argument("rec", type=click.Path())
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--no-names", is_flag=True, help="Name folders by label even when labels.csv is beside the .rec.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def unpack(rec, dest, no_names, as_json):
    """Unpack a RecordIO dataset into DEST/<identity or label>/<key>.jpg.

    REC is DEST/train, a folder with train.rec, or a .rec path (public insightface
    datasets in either layout work). Folder names come from labels.csv beside the
    .rec when present, else the zero-padded label; file names are the zero-padded
    key (.png for PNG records). The image bytes are written as stored (no
    re-encoding), so `facecurate pack --no-shuffle` of the result gives the same
    train.rec again. Streams the .rec once; rerunning continues an interrupted
    unpack (files already present are kept; each file appears only when complete).

    DEST must be new, empty, or hold an earlier unpack of the same .rec (DEST/unpack.json
    records which): unpack never writes among other files. Labels sharing a name in
    labels.csv get folders NAME__<label>; names over 200 bytes are cut and end in a hash.
    """
    if not_a_rec(rec):
        _fail(not_a_rec(rec))
    rec_file, idx_file = rec_paths(rec)
    for f in (rec_file, idx_file):
        if not f.is_file():
            _fail(f"{f} does not exist (REC is DEST/train, a folder holding train.rec, or a .rec path)")
    try:
        res = run_unpack(rec, dest, names=not no_names, show_progress=True)
    except UnpackError as e:
        _fail(str(e))
    except RecordIOError as e:
        _fail(f"corrupt .rec, stopped at {e} (files written so far are complete; run "
              "`facecurate inspect` for details)")
    s = res.summary()
    if not as_json:
        s.pop("error_messages")
        s.pop("notes")
    emit_summary("facecurate unpack", s, as_json)
    if not as_json:
        for m in res.notes:
            click.echo(f"note: {m}", err=True)
        for m in res.errors[:20]:
            say(f"error: {m}", err=True)
    if res.errors:
        raise SystemExit(1)


@click.command("pack-pairs")
@click.argument("pairs", type=click.Path(exists=True, dir_okay=False))
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.argument("dest", type=click.Path(dir_okay=False))
@click.option("--strict", is_flag=True, help="Fail when any pair cannot be resolved.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def pack_pairs(pairs, root, dest, strict, as_json):
    """Write a verification set DEST (e.g. my_pairs.bin) like insightface's lfw.bin: a pickle of
    (bins, issame_list), bins = 2*P encoded images (pair members alternate).

    \b
    PAIRS  LFW-style pairs file: optional first line "10 300", then
           "name i j" (same person) or "name1 i name2 j" (different),
           tab- or space-separated; image i of name = <name>/<name>_%04d.jpg
    ROOT   a folder of <name>/<name>_NNNN.<ext> crops, or an align OUT folder
           (align.csv maps each photo to its primary crop)

    Pairs whose images cannot be found or decoded are left out and listed (all of
    them in DEST.unresolved.txt).
    """
    try:
        res = run_pack_pairs(pairs, root, dest, strict=strict)
    except (PackError, PairsError) as e:
        _fail(str(e))
    s = res.summary()
    if not as_json:
        s.pop("unresolved")
    emit_summary("facecurate pack-pairs", s, as_json)
    if not as_json:
        for u in res.unresolved[:10]:
            say(f"unresolved: {u}", err=True)
        if len(res.unresolved) > 10:
            click.echo(f"... {len(res.unresolved) - 10} more in {s['unresolved_file']}", err=True)


@click.command("checksum")
@click.argument("rec", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def checksum(rec, as_json):
    """Write per-record checksums for an existing RecordIO dataset (e.g. a public
    set you downloaded), so that `facecurate inspect --verify` can detect any later
    corruption inside a record.

    REC is DEST/train, DEST (a folder holding train.rec), or a .rec path; the .idx
    beside it names the keys. Writes train.sums beside the .rec (one line per record:
    key, offset, payload length, sha256 of the payload) in one pass, atomically.
    """
    try:
        res = write_sums(rec, show_progress=True)
    except SumsError as e:
        _fail(str(e))
    emit_summary("facecurate checksum", res, as_json)


COMMANDS = [pack, inspect, unpack, pack_pairs, checksum]
