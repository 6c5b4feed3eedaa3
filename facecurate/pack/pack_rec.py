"""``facecurate pack DEST NEWDEST`` where DEST holds a packed dataset (``train.rec`` +
``.idx``) and the ``clean.csv`` that ``facecurate clean DEST`` wrote: the kept image
records are copied into NEWDEST with their image bytes unchanged (no decoding, no
re-encoding), in either layout, with labels renumbered 0..C-1 over the identities
that remain (in the order of their old labels). ``labels.csv`` maps each new label to
its old label(s) and name(s); ``pack_errors.csv`` lists every image record left out
and why; ``--merge-identities merges.csv`` packs each confirmed pair as one identity.

The source is read in one streaming pass in file order (plain layout without
``--shuffle``, or an insightface source whose classes are already contiguous);
grouping a shuffled source by class, or shuffling, reads records by offset in the
order they are written. Memory: a few numpy arrays of the record count (keys,
labels, offsets), never the records.
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from facecurate.common.constants import (
    CLEAN_CSV,
    DECISION_KEEP,
    LABEL_LIMIT,
    LAYOUT_PLAIN,
    PACK_BAD_RECORD,
    PACK_BELOW_MIN,
    PACK_FILES,
    PACK_MISSING,
    PACK_NOT_CLEANED,
    PACK_NOT_KEPT,
    REC_KEY_PREFIX,
    REC_LABELS_COLUMNS,
)
from facecurate.common.files import csv_text, progress
from facecurate.pack.pack_inputs import InputError, PackError, Good, strict_problems
from facecurate.common.recdata import LABEL_RULE, image_label, read_layout, read_property, rec_paths
from facecurate.common.recordio import RecordIOError, read_idx_arrays, read_record, unpack_record
from facecurate.common.workspace import Workspace
from facecurate.pack.dest import PackResult, RecSink, cleanup_dest, commit_dest, dest_texts, temp_name

#: records written per batch (and per progress update)
_BATCH = 512


class RecTable:
    """clean.csv of a packed dataset, as arrays in key order: ``keys``, ``labels``,
    ``keep`` (bool); ``names[label]``; ``why[i]`` = (decision, reason) code into
    ``whys`` for rows not kept."""

    def __init__(self, path: Path):
        keys, labels, keep, why = [], [], [], []
        self.names: dict[int, str] = {}
        self.whys: list[tuple[str, str]] = []
        codes: dict[tuple[str, str], int] = {}
        ws, cols = Workspace(path.parent), ("key", "label", "identity", "decision", "reason")
        if not set(cols) <= set(ws.header(path.name)):
            raise PackError(f"{path} is not the clean.csv of a packed dataset (needs the columns key, label, "
                            f"identity, decision, reason; run `facecurate clean {path.parent}`)")
        for n, (key, label, ident, d, reason) in ws.columns(path.name, cols, numbered=True):
            try:
                k, lab = int(key), int(label)
            except ValueError:
                raise PackError(f"{path} line {n}: key and label must be integers") from None
            if not -1 <= lab < LABEL_LIMIT:  # -1: a record without a usable label
                raise PackError(f"{path} line {n}: label {lab} is not {LABEL_RULE} (nor -1)")
            keys.append(k)
            labels.append(lab)
            if lab >= 0:
                self.names.setdefault(lab, ident)
            keep.append(d == DECISION_KEEP)
            why.append(codes.setdefault((d, reason), len(codes)))
        self.whys = list(codes)
        order = np.argsort(np.asarray(keys, np.int64), kind="stable")
        self.keys = np.asarray(keys, np.int64)[order]
        self.labels = np.asarray(labels, np.int64)[order]
        self.keep = np.asarray(keep, bool)[order]
        self.why = np.asarray(why, np.int32)[order]
        if self.keys.size > 1 and np.any(self.keys[1:] == self.keys[:-1]):
            raise PackError(f"{path}: a key is listed twice")


def read_merges(path: Path, table: RecTable) -> list[tuple[int, int]]:
    """Label pairs to pack as one identity, from a merges.csv (columns ``a``, ``b``:
    identity names or labels). A column ``decision`` or ``confirmed``, when present,
    selects the rows whose value is merge / yes / y / true / 1."""
    by_name = {nm: lab for lab, nm in table.names.items()}
    pairs = []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for n, r in enumerate(rows, 2):
        flag = r.get("decision", r.get("confirmed"))
        if flag is not None and flag.strip().lower() not in ("merge", "yes", "y", "true", "1"):
            continue
        labs = []
        for col in ("a", "b"):
            v = (r.get(col) or "").strip()
            lab = by_name.get(v)
            if lab is None and v.lstrip("-").isdigit() and int(v) in table.names:
                lab = int(v)
            if lab is None:
                raise PackError(f"{path} line {n}: {col} = {v!r} is no identity of the clean.csv")
            labs.append(lab)
        pairs.append((labs[0], labs[1]))
    return pairs


def _roots(labels: list[int], pairs: list[tuple[int, int]]) -> dict[int, int]:
    """label -> the smallest label of its merged group."""
    parent = {lab: lab for lab in labels}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {lab: find(lab) for lab in labels}


class _Plan:
    """Which kept records go where: ``keys``/``offs`` in write order, ``new`` labels."""

    def __init__(self, keys: np.ndarray, offs: np.ndarray, new: np.ndarray, classes: list[int],
                 members: dict[int, list[int]]):
        self.keys, self.offs, self.new = keys, offs, new
        self.classes = classes  # root label per new label
        self.members = members  # root -> old labels merged into it
        self.dropped_images = 0  # kept records of identities below --min-images


def _plan(table: RecTable, idx_keys: np.ndarray, idx_offs: np.ndarray, roots: dict[int, int], exclude: set,
          layout: str, shuffle: bool, seed: int, min_images: int, errors: list) -> _Plan:
    """The records to write, their order and new labels; identities below
    ``min_images`` (after merging) become errors."""
    pos = np.searchsorted(idx_keys, table.keys)
    have = (pos < idx_keys.size) & (idx_keys[np.minimum(pos, max(idx_keys.size - 1, 0))] == table.keys) \
        if idx_keys.size else np.zeros(table.keys.size, bool)
    for i in np.flatnonzero(table.keep & ~have)[:1000]:
        k = int(table.keys[i])
        errors.append(InputError(table.names.get(int(table.labels[i]), ""), f"{REC_KEY_PREFIX}{k}", PACK_MISSING,
                                 "kept in clean.csv but not in the .idx"))
    use = table.keep & have & (table.labels >= 0)
    if exclude:
        use &= ~np.isin(table.keys, np.fromiter(exclude, np.int64))
    sel = np.flatnonzero(use)
    # label -> root by a search in the sorted labels: memory by the number of labels,
    # never by their size (a dense table of a label 2e9 would take 16 GB)
    labs = np.fromiter(roots, np.int64, len(roots))
    root = np.fromiter(roots.values(), np.int64, len(roots))[np.searchsorted(labs, table.labels[sel])] \
        if sel.size else np.zeros(0, np.int64)
    uroot, counts = np.unique(root, return_counts=True)
    members: dict[int, list[int]] = {}
    for lab, r in sorted(roots.items()):
        members.setdefault(r, []).append(lab)
    classes, dropped = [], 0
    for r, n in zip(uroot.tolist(), counts.tolist()):
        if n < min_images:
            dropped += n
            nm = table.names[r]
            errors.append(InputError(nm, nm + "/", PACK_BELOW_MIN,
                                     f"{n} kept record(s) < --min-images {min_images}; identity not packed"))
        else:
            classes.append(r)
    cls = np.asarray(classes, np.int64)  # sorted, as uroot
    new = np.minimum(np.searchsorted(cls, root), max(cls.size - 1, 0))
    ok = cls[new] == root if cls.size else np.zeros(root.size, bool)
    sel, new = sel[ok], new[ok]
    keys = table.keys[sel]
    offs = idx_offs[pos[sel]]
    rng = random.Random(seed)
    if layout == LAYOUT_PLAIN:
        order = np.argsort(offs, kind="stable")
        if shuffle:
            perm = list(range(order.size))
            rng.shuffle(perm)
            order = order[np.asarray(perm, np.int64)] if perm else order
    else:
        order = np.lexsort((offs, new))
        if shuffle:  # within each class
            order = order.copy()
            bounds = np.flatnonzero(np.diff(new[order])) + 1
            for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, order.size]):
                block = order[lo:hi].tolist()
                rng.shuffle(block)
                order[lo:hi] = block
    plan = _Plan(keys[order], offs[order], new[order], classes, members)
    plan.dropped_images = dropped
    return plan


def _write(plan: _Plan, rec_path: Path, table: RecTable, sink, bar) -> tuple[list[InputError], set]:
    """Copy the planned records into ``sink`` (image bytes unchanged). Returns the
    records that could not be copied (errors, and their keys)."""
    errors, bad = [], set()
    # In file order a large buffer streams the file; in another order (grouping a
    # shuffled source by class, or --shuffle) each record is a random read, and a small
    # buffer keeps it from reading far more than the record.
    in_order = plan.offs.size < 2 or bool(np.all(plan.offs[1:] > plan.offs[:-1]))
    with open(rec_path, "rb", buffering=(1 << 20) if in_order else (16 << 10)) as f:
        for lo in range(0, plan.keys.size, _BATCH):
            items = []
            keys = plan.keys[lo:lo + _BATCH]
            olds = table.labels[np.searchsorted(table.keys, keys)].tolist()
            for k, off, lab, old in zip(keys.tolist(), plan.offs[lo:lo + _BATCH].tolist(),
                                        plan.new[lo:lo + _BATCH].tolist(), olds):
                name = table.names[old]
                rel = f"{REC_KEY_PREFIX}{k}"
                try:
                    hdr, img = unpack_record(read_record(f, off, key=k).payload)
                except RecordIOError as e:
                    errors.append(InputError(name, rel, PACK_BAD_RECORD, f"corrupt record: {e}"))
                    bad.add(k)
                    continue
                if not img or image_label(hdr) != old:
                    why = "no image bytes" if not img else \
                        f"label {image_label(hdr):g} in the .rec, {old} in clean.csv (the .rec changed since clean)"
                    errors.append(InputError(name, rel, PACK_BAD_RECORD, why))
                    bad.add(k)
                    continue
                items.append((float(lab), Good(name, rel, img, True)))
            sink.images(items)
    return errors, bad


def _left_out(table: RecTable, idx_keys: np.ndarray, image_key: Callable[[int], bool]) -> list[InputError]:
    """Image records clean did not keep, and image records clean.csv does not list."""
    errors = []
    for i in np.flatnonzero(~table.keep):
        d, r = table.whys[int(table.why[i])]
        errors.append(InputError(table.names.get(int(table.labels[i]), ""), f"{REC_KEY_PREFIX}{int(table.keys[i])}",
                                 PACK_NOT_KEPT, f"clean: {d} ({r})"))
    listed = np.isin(idx_keys, table.keys)
    for k in idx_keys[~listed].tolist():
        if image_key(k):
            errors.append(InputError("", f"{REC_KEY_PREFIX}{k}", PACK_NOT_CLEANED,
                                     "image record not in clean.csv (rerun clean); not packed"))
    return errors


def _image_size(rec_path: Path, plan: _Plan) -> int:
    """H (= W) of the crops: the source's ``property``, else the first kept image."""
    prop = read_property(rec_path)
    if prop and len(prop) == 3 and prop[1] == prop[2]:
        return int(prop[1])
    import cv2

    with open(rec_path, "rb") as f:
        for off in plan.offs[:16].tolist():
            try:
                img = unpack_record(read_record(f, off).payload)[1]
            except RecordIOError:
                continue
            a = cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_COLOR) if img else None
            if a is not None:
                return int(a.shape[0])
    return 112


def pack_rec(src: os.PathLike | str, dest: os.PathLike | str, *, layout: str = LAYOUT_PLAIN,
             shuffle: bool = False, seed: int = 0, min_images: int = 1, strict: bool = False,
             merges: Optional[os.PathLike | str] = None, fsync: bool = True, show_progress: bool = False,
             on_record: Optional[Callable[[int], None]] = None):
    """Pack the records ``src/clean.csv`` keeps from ``src/train.rec`` into ``dest``
    (same files as :func:`facecurate.pack.packer.pack`, plus old labels in labels.csv).
    ``shuffle``: a new order (plain) or a new order within each class (insightface);
    without it the records keep the source's order (grouped by class for insightface)."""
    src, dest = Path(src), Path(dest)
    rec_path, idx_path = rec_paths(src)
    if not (src / CLEAN_CSV).exists():
        raise PackError(f"{src} holds a .rec but no {CLEAN_CSV}: run `facecurate embed {rec_path}` and "
                        f"`facecurate clean {src}` first")
    if dest.resolve() == src.resolve():
        raise PackError("NEWDEST must be another folder than DEST (the source .rec is read while packing)")
    table = RecTable(src / CLEAN_CSV)
    pairs = read_merges(Path(merges), table) if merges else []
    roots = _roots(sorted(table.names), pairs)
    try:
        idx_keys, idx_offs = read_idx_arrays(idx_path)
        with open(rec_path, "rb") as f:
            k0 = np.flatnonzero(idx_keys == 0)
            src_layout = read_layout(f, int(idx_offs[k0[0]]) if k0.size else None, int(idx_keys.size))
    except RecordIOError as e:
        raise PackError(f"{rec_path}: corrupt .rec or .idx: {e} (run `facecurate inspect`)") from None
    order = np.argsort(idx_keys, kind="stable")
    idx_keys, idx_offs = idx_keys[order], idx_offs[order]
    left_out = _left_out(table, idx_keys, src_layout.is_image)
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    done, sink, exclude, bad_records = False, None, set(), []
    bar = progress(total=None, desc="pack", unit="img", disable=None if show_progress else True)
    try:
        for _attempt in range(2):  # a second time without records found bad, when there are any
            plan_errors: list[InputError] = []
            plan = _plan(table, idx_keys, idx_offs, roots, exclude, layout, shuffle, seed, min_images, plan_errors)
            for name in PACK_FILES:
                temp_name(dest, name).unlink(missing_ok=True)
            bar.reset(total=int(plan.keys.size))
            sink = RecSink(dest, layout, on_record, bar)
            write_errors, bad = _write(plan, rec_path, table, sink, bar)
            bad_records += write_errors
            if not bad:
                break
            sink.close()  # again without them: they may change which identities remain
            exclude |= bad
        errors = sorted(left_out + plan_errors + bad_records, key=lambda e: (e.identity, e.path, e.reason))
        problems = [e for e in strict_problems(errors) if e.reason != PACK_NOT_KEPT]
        if strict and problems:
            raise PackError(f"{len(problems)} input problem(s) and --strict: nothing written (first: "
                            f"{problems[0].path}: {problems[0].reason}: {problems[0].message})", problems)
        if not plan.classes:
            raise PackError(f"nothing to pack: {CLEAN_CSV} keeps no usable record of {rec_path}", errors)
        per_class = np.bincount(plan.new, minlength=len(plan.classes))
        sink.classes.extend((table.names[r], int(n)) for r, n in zip(plan.classes, per_class.tolist()))
        size = _image_size(rec_path, plan)
        n_img = int(plan.keys.size)
        rec_bytes = sink.finish()
        result = PackResult(dest=dest, source=f"{CLEAN_CSV} of {rec_path}", layout=layout, size=size,
                            images=n_img, classes=len(plan.classes), stored_as_is=n_img, reencoded=0,
                            rec_bytes=rec_bytes, shuffle=shuffle, seed=seed, min_images=min_images,
                            dropped_identities=sum(e.reason == PACK_BELOW_MIN for e in errors),
                            dropped_images=plan.dropped_images, errors=errors,
                            notes={"from_rec": str(rec_path), "source_layout": src_layout.kind,
                                   "not_kept": sum(e.reason == PACK_NOT_KEPT for e in errors),
                                   "merged_pairs": len(pairs)})
        commit_dest(dest, sink, _texts(result, plan, table, sink), fsync)
        done = True
    finally:
        bar.close()
        cleanup_dest(dest, sink, done, created)
    return result


def _texts(result, plan: _Plan, table: RecTable, sink) -> dict[str, str]:
    """property, labels.csv (new label -> old labels and names), pack_errors.csv, pack.json."""
    rows = []
    for new, (r, (name, n)) in enumerate(zip(plan.classes, sink.classes)):
        olds = plan.members.get(r, [r])
        rows.append((name, new, n, ";".join(map(str, olds)), ";".join(table.names[o] for o in olds)))
    return dest_texts(result, len(plan.classes), csv_text(REC_LABELS_COLUMNS, rows),
                      "path: rec:<key> of the source .rec")
