"""The pack stage: crops -> DEST/train.rec/.idx/.lst, property, labels.csv,
pack_errors.csv and pack.json for insightface arcface_torch, written without MXNet.
What is read and how each crop is checked lives in :mod:`facecurate.pack.pack_inputs`;
this module orders the crops and writes them through :mod:`facecurate.pack.dest`
(the records, the small files, the commit of DEST).

Layouts (docs/formats.md):

* ``plain`` (default): keys 0..N-1, every record an image with a scalar label (flag 0).
  Read by arcface_torch's MXFaceDataset *and* NVIDIA DALI's mxnet reader.
* ``insightface``: key 0 is a header whose label is ``[N+1, N+1+C]``, images at keys
  1..N grouped by class, then one identity record per class (label ``[start, end)``,
  empty image). Read by MXFaceDataset and insightface's older tools, not by DALI.
"""

from __future__ import annotations

import os
import random
from array import array
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from facecurate.common.constants import (
    JPEG_QUALITY,
    LABELS_COLUMNS,
    LAYOUT_INSIGHTFACE,
    LAYOUT_PLAIN,
    MAX_INPUT_BYTES,
    PACK_BELOW_MIN,
    PACK_EMPTY_IDENTITY,
    PACK_ERROR_COLUMNS,
    PACK_ERRORS_CSV,
    PACK_FILES,
)
from facecurate.common.files import csv_text, progress, write_text_atomic
from facecurate.common.recdata import is_rec_dataset
from facecurate.pack.dest import PackResult, RecSink, cleanup_dest, commit_dest, dest_texts, temp_name
from facecurate.pack.pack_inputs import (
    Cand,
    Good,
    InputError,
    PackError,
    ReadRule,
    SizeCheck,
    check_dest,
    collect_units,
    list_identity,
    ordered_map,
    read_unit,
    strict_problems,
    target_size,
)
from facecurate.pack.pack_rec import pack_rec


# ----------------------------------------------------------------------------- pack
@dataclass
class _Tally:
    """What pass 1 found: packed identities (label order) -> images, and the rest."""
    counts: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    listed: set = field(default_factory=set)  # identities seen in the source
    with_crops: set = field(default_factory=set)  # identities with at least one usable crop
    dropped_ids: int = 0
    dropped_imgs: int = 0

    def below_min(self, ident: str, n: int, min_images: int) -> None:
        self.errors.append(InputError(ident, ident + "/", PACK_BELOW_MIN,
                                      f"{n} image(s) < --min-images {min_images}; identity not packed"))
        self.dropped_ids += 1
        self.dropped_imgs += n


def _pack_in_order(units: list, work: Callable, sink: RecSink, min_images: int, threads: int) -> _Tally:
    """Records in reading order (identities sorted, then files): each identity is
    written as soon as all of it has been read and checked."""
    t = _Tally()
    by_id: dict[str, list[Good]] = {}  # checked crops of identities still open
    pending: list[tuple[float, Good]] = []

    def close_identity(ident: str) -> None:
        goods = by_id.pop(ident)
        if len(goods) < min_images:
            t.below_min(ident, len(goods), min_images)
            return
        lab = float(len(t.counts))
        t.counts[ident] = len(goods)
        sink.classes.append((ident, len(goods)))
        pending.extend([(lab, g) for g in goods])

    for unit, (good, errs, ids) in zip(units, ordered_map(work, units, threads)):
        t.errors.extend(errs)
        t.listed.update(ids)
        for g in good:
            lst = by_id.get(g.identity)
            if lst is None:
                by_id[g.identity] = [g]
                t.with_crops.add(g.identity)
            else:
                lst.append(g)
        # Units follow the sorted identity order; only a manifest unit's last identity
        # can continue in the next unit.
        open_ident = unit[-1].identity if isinstance(unit, list) and unit else None
        for ident in sorted(by_id):
            if ident != open_ident:
                close_identity(ident)
        if len(pending) >= 512:
            sink.images(pending)
            pending.clear()
    for ident in sorted(by_id):
        close_identity(ident)
    sink.images(pending)
    return t


class _Listing:
    """Every listed crop of the shuffled pack, held compactly (each crop's relative
    path, and 4 + 8 bytes of indices): about 0.1 KB per crop. ``idents[i]``'s crops
    are ``rels[first[i]:first[i + 1]]``, identity-major and sorted."""

    def __init__(self, units: list, out: str, rule: ReadRule):
        self.rels: list[str] = []  # every listed crop
        self.owner = array("i")  # rels[k] belongs to idents[owner[k]]
        self.idents: list[str] = []  # identities with at least one listed crop
        self.first: list[int] = []
        self.errors: list[InputError] = []  # problems found while listing
        self.listed: set = set()  # identities seen in the source
        self.out = out
        for unit in units:
            if isinstance(unit, tuple):  # identity folder names
                for ident in unit:
                    c, e = list_identity(out, ident, None, rule)
                    self.errors += e
                    self.listed.add(ident)
                    if c:
                        self._add(ident, c)
            else:
                for c in unit:
                    self._add(c.identity, [c])
                    self.listed.add(c.identity)
        self.first.append(len(self.rels))
        # Folder crops and align's manifest rows are relative to OUT; a hand-written
        # manifest may hold absolute paths, which os.path.join keeps as they are.
        self.prefix = os.path.join(out, "")
        self.plain_join = all(not os.path.isabs(r) for r in self.rels) \
            if units and not isinstance(units[0], tuple) else True

    def _add(self, ident: str, cands: Sequence[Cand]) -> None:
        if not self.idents or self.idents[-1] != ident:
            self.idents.append(ident)
            self.first.append(len(self.rels))
        self.rels.extend(c.rel for c in cands)
        self.owner.extend([len(self.idents) - 1] * len(cands))

    def crops(self, i: int) -> range:
        """Indices (into ``rels``) of identity ``i``'s crops."""
        return range(self.first[i], self.first[i + 1])

    def cands(self, indices: Sequence[int]) -> list[Cand]:
        out = []
        for k in indices:
            rel = self.rels[k]
            path = self.prefix + rel if self.plain_join else os.path.join(self.out, rel)
            out.append(Cand(self.idents[self.owner[k]], rel, path, path))
        return out


def _shuffled_order(ls: _Listing, predicted: list[int], layout: str, seed: int) -> tuple[array, array]:
    """(crops to write in their order, crops of the other identities to check only).
    plain: one shuffle of all crops; insightface: grouped by class, shuffled within."""
    rng = random.Random(seed)
    order = array("q")
    if layout == LAYOUT_PLAIN:
        for i in predicted:
            order.extend(ls.crops(i))
        rng.shuffle(order)
    else:
        for i in predicted:
            block = array("q", ls.crops(i))
            rng.shuffle(block)
            order.extend(block)
    chosen = set(predicted)
    others = array("q")
    for i in range(len(ls.idents)):
        if i not in chosen:
            others.extend(ls.crops(i))
    return order, others


def _pack_shuffled(units: list, work: Callable, new_sink: Callable[[int], RecSink], out: str, layout: str,
                   seed: int, min_images: int, threads: int, rule: ReadRule) -> tuple[_Tally, RecSink]:
    """Records in shuffled order, written as they are read. Every crop is listed
    first; the packed identities (hence the labels) are predicted from the listing,
    the listed crops of those identities are shuffled, then read, checked and written
    in that order (the crops of identities that are not packed are read and checked
    too, for their problems). When a failed crop changes which identities are packed,
    the prediction is made again from what was read and the file rewritten (at most
    twice more; only unreadable inputs cost this)."""
    ls = _Listing(units, out, rule)
    idents = ls.idents

    def read(indices: Sequence[int]) -> Iterable:
        """(good, errors) per chunk of 256 crops, in the order given."""
        chunks = (ls.cands(indices[lo:lo + 256]) for lo in range(0, len(indices), 256))  # made as they are read
        for good, errs, _ in ordered_map(work, chunks, threads):
            yield good, errs

    predicted = [i for i in range(len(idents)) if len(ls.crops(i)) >= min_images]
    for _attempt in range(3):
        t = _Tally(errors=list(ls.errors), listed=set(ls.listed))
        labels = {idents[i]: float(k) for k, i in enumerate(predicted)}
        order, others = _shuffled_order(ls, predicted, layout, seed)
        sink = new_sink(len(order))
        good_n: dict[str, int] = {}
        for indices, packing in ((others, False), (order, True)):  # others: checked, not written
            for good, errs in read(indices):
                t.errors.extend(errs)
                for g in good:
                    good_n[g.identity] = good_n.get(g.identity, 0) + 1
                if packing:
                    sink.images([(labels[g.identity], g) for g in good])
        packed = [i for i in range(len(idents)) if good_n.get(idents[i], 0) >= max(1, min_images)]
        if packed == predicted:
            break
        sink.close()
        predicted = packed
    else:
        raise PackError(f"the crops in {out} changed while packing (three attempts); nothing written")
    for ident in idents:
        n = good_n.get(ident, 0)
        if n:
            t.with_crops.add(ident)
            if ident in labels:
                t.counts[ident] = n
                sink.classes.append((ident, n))
            else:
                t.below_min(ident, n, min_images)
    return t, sink


def pack(out: os.PathLike | str, dest: os.PathLike | str, *, layout: str = LAYOUT_PLAIN,
         shuffle: Optional[bool] = None, seed: int = 0, min_images: int = 1, size: Optional[int] = None,
         resize: bool = False, strict: bool = False, quality: int = JPEG_QUALITY, threads: int = 1,
         fsync: bool = True, show_progress: bool = False, on_record: Optional[Callable[[int], None]] = None,
         merges: Optional[os.PathLike | str] = None, max_bytes: int = MAX_INPUT_BYTES,
         follow_external_links: bool = False) -> PackResult:
    """Pack the crops of ``out`` into ``dest`` (train.rec, train.idx, train.lst,
    property, labels.csv, pack_errors.csv, pack.json).

    Every file is first written under a temporary name (``dest/.<name>.pack-tmp``) and
    renamed into place only when all of them are complete, so an interrupted or failed pack leaves the
    previous contents of ``dest`` as they were. ``on_record(n)`` is called after the
    n-th record is written (progress hook). ``fsync``: flush every file to disk before
    the renames (without it an interrupted *process* still leaves DEST intact; only an
    OS crash or power loss right after the run could lose the new files).

    Crops are written as they are read, never all held in memory: without ``shuffle``
    in reading order (identities sorted, then files), each identity as soon as it is
    complete; with ``shuffle`` in an order drawn from the listing (see
    ``_pack_shuffled``). While train.rec grows the disk's writeback is started, so
    reading, writing and the final fsync overlap.

    A crop larger than ``max_bytes`` is not read (``too_large``); in a folder of crops,
    FIFOs, sockets and devices are never opened and symlinks are followed only while
    they stay inside ``out`` (``follow_external_links``: wherever they lead); each is
    reported (``unsupported``).

    When ``out`` is a packed dataset (train.rec + .idx, no align.csv), the records its
    clean.csv keeps are packed by :func:`facecurate.pack.pack_rec.pack_rec` (``shuffle``
    None, the default, means: shuffle crops, keep the order of a .rec; ``merges``: a
    merges.csv of confirmed pairs)."""
    if layout not in (LAYOUT_PLAIN, LAYOUT_INSIGHTFACE):
        raise ValueError(f"layout must be {LAYOUT_PLAIN!r} or {LAYOUT_INSIGHTFACE!r}")
    out, dest = Path(out), Path(dest)
    check_dest(out, dest)
    if is_rec_dataset(out):
        return pack_rec(out, dest, layout=layout, shuffle=bool(shuffle), seed=seed, min_images=min_images,
                        strict=strict, merges=merges, fsync=fsync, show_progress=show_progress,
                        on_record=on_record)
    if merges:
        raise PackError("--merge-identities applies to a packed dataset (DEST holding train.rec and clean.csv)")
    shuffle = True if shuffle is None else shuffle
    size = target_size(out, size)
    rule = ReadRule(max_bytes, follow_external_links, os.path.realpath(out))
    source, units, errors, notes = collect_units(out, dest, rule)
    work = partial(read_unit, out=str(out), size=size, resize=resize, quality=quality, check=SizeCheck(size), rule=rule)

    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    for name in PACK_FILES:  # left by a killed run
        temp_name(dest, name).unlink(missing_ok=True)
    sink: Optional[RecSink] = None
    done = False
    bar = progress(total=None, desc="pack", unit="img", disable=None if show_progress else True)
    try:
        def new_sink(total: Optional[int] = None) -> RecSink:
            nonlocal sink
            if total is not None:
                bar.reset(total=total)
            sink = RecSink(dest, layout, on_record, bar)
            return sink

        if shuffle:
            tally, sink = _pack_shuffled(units, work, new_sink, str(out), layout, seed, min_images, threads, rule)
        else:
            tally = _pack_in_order(units, work, new_sink(), min_images, threads)
        bar.close()
        errors = _final_errors(out, dest, source, size, errors + tally.errors, tally, strict)
        n_img = sum(tally.counts.values())
        rec_bytes = sink.finish()
        result = PackResult(dest=dest, source=source, layout=layout, size=size, images=n_img,
                            classes=len(tally.counts), stored_as_is=sink.stored_as_is,
                            reencoded=n_img - sink.stored_as_is, rec_bytes=rec_bytes, shuffle=shuffle, seed=seed,
                            min_images=min_images, dropped_identities=tally.dropped_ids,
                            dropped_images=tally.dropped_imgs,
                            errors=errors, notes=notes)
        commit_dest(dest, sink, _small_files(result, tally.counts), fsync)
        done = True
    finally:
        bar.close()
        cleanup_dest(dest, sink, done, created)
    return result


def _final_errors(out: Path, dest: Path, source: str, size: int, errors: list[InputError], tally: _Tally,
                  strict: bool) -> list[InputError]:
    """Every input problem, sorted, with the identities left without a usable crop;
    PackError when that means nothing is written (``strict`` with a problem, or nothing usable)."""
    had_no_files = {e.identity for e in errors if e.reason == PACK_EMPTY_IDENTITY}
    for ident in sorted(tally.listed - tally.with_crops - had_no_files):
        errors.append(InputError(ident, ident + "/", PACK_EMPTY_IDENTITY,
                                 "no usable crop: every crop listed for it failed (see its rows)"))
    errors.sort(key=lambda e: (e.identity, e.path, e.reason))
    problems = strict_problems(errors)
    if strict and problems:
        raise PackError(f"{len(problems)} input problem(s) and --strict: nothing written "
                        f"(first: {problems[0].path}: {problems[0].reason}: {problems[0].message})",
                        errors, _failure_summary(dest, source, size, errors, None))
    if not tally.counts:
        errors_file = _write_errors(dest, errors) if errors else None
        first = next((e for e in errors if not e.path.endswith("/")), errors[0]) if errors else None
        raise PackError(f"nothing to pack in {out} ({source}): no usable crops"
                        + (f"; {len(errors)} input problem(s), e.g. {first.path}: {first.reason}: "
                           f"{first.message} (all in {errors_file})" if first else ""),
                        errors, _failure_summary(dest, source, size, errors, errors_file))
    return errors


def _write_errors(dest: Path, errors: Sequence[InputError]) -> Path:
    """DEST/pack_errors.csv of a pack that failed (the other files are left as they were)."""
    path = dest / PACK_ERRORS_CSV
    write_text_atomic(path, csv_text(PACK_ERROR_COLUMNS, [(e.identity, e.path, e.reason, e.message) for e in errors]))
    return path


def _failure_summary(dest: Path, source: str, size: int, errors: Sequence[InputError],
                     errors_file: Optional[Path]) -> dict:
    by_reason: dict = {}
    for e in errors:
        by_reason[e.reason] = by_reason.get(e.reason, 0) + 1
    return {"dest": str(dest), "packed": False, "source": source, "size": f"{size}x{size}", "images": 0,
            "input_errors": len(errors), "input_errors_by_reason": dict(sorted(by_reason.items())),
            "errors_file": str(errors_file) if errors_file else None}


def _small_files(result: PackResult, counts: dict) -> dict[str, str]:
    """The text files beside the records of a pack of crops."""
    identities = list(counts)
    labels = csv_text(LABELS_COLUMNS, [(ident, i, counts[ident]) for i, ident in enumerate(identities)])
    return dest_texts(result, len(identities), labels, "path relative to OUT")
