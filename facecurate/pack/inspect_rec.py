"""``facecurate inspect``: validate a RecordIO dataset (ours or a public one) record by
record and describe it.

The checks run as named steps over one pass of the file: the framing of every record
(:func:`_scan`), the .idx against the record starts (:func:`_match_index`), the layout
and which records are images (:func:`_image_records`, the rule of
:mod:`facecurate.common.recdata`), the labels (:func:`_check_labels`), the identity records of
the insightface layout (:func:`_check_identity_records`), a decoded sample
(:func:`_decode_sample`) and the ``property`` file (:func:`_check_property`). Memory
stays a few dozen bytes per record (numpy arrays), so public datasets of millions of
images can be inspected.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np

from facecurate.common.constants import LABEL_LIMIT, LAYOUT_HEADER, LAYOUT_PLAIN
from facecurate.common.imageio import image_kind, jpeg_complete
from facecurate.common.recdata import LABEL_RULE, is_header_record, layout_of, read_property, rec_paths
from facecurate.common.recordio import RecordIOError, iter_records, read_idx_arrays, read_record, unpack_record
from facecurate.common.files import progress
from facecurate.pack.checksums import SumsCursor, SumsError, sums_path


@dataclass
class InspectResult:
    path: Path  # the .rec
    records: int = 0
    layout: str = ""
    images: int = 0
    classes: int = 0
    label_min: Optional[int] = None
    label_max: Optional[int] = None
    vector_labels: int = 0  # image records whose label is a vector
    identity_records: int = 0
    grouped_by_class: bool = False
    dali_compatible: bool = False
    decoded: int = 0
    shapes: list = field(default_factory=list)
    property_line: Optional[str] = None
    checksums: str = ""  # what was done about payload checksums (train.sums)
    verified: int = 0  # records whose payload matched train.sums (--verify)
    checksum_errors: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self, max_messages: int = 20) -> dict:
        return {
            "rec": str(self.path), "ok": self.ok, "records": self.records, "layout": self.layout,
            "images": self.images, "classes": self.classes, "label_min": self.label_min,
            "label_max": self.label_max, "vector_labels": self.vector_labels,
            "identity_records": self.identity_records, "grouped_by_class": self.grouped_by_class,
            "dali_compatible": self.dali_compatible, "decoded": self.decoded,
            "shapes": ", ".join("x".join(map(str, s)) for s in self.shapes), "property": self.property_line,
            "checksums": self.checksums, "verified": self.verified, "checksum_errors": self.checksum_errors,
            "errors": len(self.errors), "error_messages": self.errors[:max_messages],
            "warnings": self.warnings[:max_messages],
        }


class _Scan(NamedTuple):
    """Per record in file order: offset, IRHeader flag (-1: unreadable header), first
    and second label value, image length; plus the decoded shapes (--full)."""
    offs: np.ndarray
    flags: np.ndarray
    lab0: np.ndarray
    lab1: np.ndarray
    imglen: np.ndarray
    shapes: set
    framing_error_at: Optional[int]  # offset where the framing broke, None when intact


class _Images(NamedTuple):
    """The image records in key order (keys and record positions) and, in the header
    layout, the identity records."""
    keys: np.ndarray
    pos: np.ndarray
    id_keys: np.ndarray
    id_pos: np.ndarray
    first: int  # header layout: the first identity key
    all_pos: np.ndarray  # every indexed record's position, in key order


def inspect(path: os.PathLike | str, *, full: bool = False, sample: int = 64, verify: bool = False,
            show_progress: bool = False) -> InspectResult:
    """Validate a .rec/.idx record by record and describe it (see :class:`InspectResult`).
    ``verify``: check every record's payload against ``train.sums`` (same pass).
    Never raises for a corrupt file: problems are in ``result.errors``."""
    rec_path, idx_path = rec_paths(path)
    res = InspectResult(path=rec_path)
    if not rec_path.exists():
        res.errors.append(f"{rec_path} does not exist")
        return res
    size = rec_path.stat().st_size
    idx_keys, idx_offs = _read_index(idx_path, res)
    cursor = _sums_cursor(rec_path, verify, res)
    scan = _scan(rec_path, size, _key_finder(idx_keys, idx_offs), res, full, show_progress, cursor)
    if cursor is not None:
        _finish_verify(cursor, res, scan.framing_error_at is None)
    keys, pos = _match_index(scan, idx_keys, idx_offs, idx_path, size, res)
    if scan.framing_error_at is not None:
        # Counts, labels and layout of a file that cannot be read to its end would mislead.
        res.warnings.append(f"framing broken at offset {scan.framing_error_at}: layout, labels and counts not "
                            f"checked ({scan.offs.size} records read before it)")
        return res
    if not scan.offs.size:
        res.errors.append("no records" if not res.errors else "no readable records")
        return res
    imgs = _image_records(scan, keys, pos, res)
    if imgs is None:
        return res
    labs = _check_labels(scan, imgs, res)
    if res.layout == LAYOUT_HEADER:
        _check_identity_records(scan, imgs, labs, res)
    res.dali_compatible = bool(res.layout == LAYOUT_PLAIN and not np.any(scan.flags[imgs.all_pos] != 0))
    shapes = set(scan.shapes)
    if not full and imgs.keys.size and sample > 0:  # with --full everything was decoded already
        _decode_sample(rec_path, scan, imgs, sample, shapes, res)
    res.shapes = sorted(shapes)
    _check_property(rec_path, res)
    return res


# ----------------------------------------------------------------------------- steps
def _sums_cursor(rec_path: Path, verify: bool, res: InspectResult):
    """The checksum file to verify against (``verify``), or None; ``res.checksums``
    says what is possible."""
    sp = sums_path(rec_path)
    if not sp.exists():
        res.checksums = "none"
        msg = (f"no checksums ({sp.name}): corruption inside a record's payload (a flipped bit in an image) "
               f"cannot be detected; `facecurate checksum {rec_path.parent}` writes them")
        (res.errors if verify else res.warnings).append(msg)
        return None
    if not verify:
        res.checksums = f"{sp.name} present, not verified (--verify)"
        return None
    try:
        cursor = SumsCursor(sp)
    except SumsError as e:
        res.checksums = "unreadable"
        res.errors.append(str(e))
        return None
    res.checksums = f"verified against {sp.name}"
    return cursor


def _finish_verify(cursor, res: InspectResult, complete: bool) -> None:
    """Lines of the checksum file that name no record (only meaningful when the whole
    file was read)."""
    try:
        cursor.finish()
    except SumsError as e:
        res.errors.append(str(e))
    res.verified = cursor.checked - res.checksum_errors
    if complete and cursor.unmatched_count:
        s = cursor.unmatched[0]
        res.errors.append(f"{cursor.path.name}: {cursor.unmatched_count} line(s) name no record start "
                          f"(first: key {s.key}, offset {s.offset})")


def _read_index(idx_path: Path, res: InspectResult) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(keys, offsets) of the .idx, or (None, None) when it is missing or unreadable."""
    if not idx_path.exists():
        res.warnings.append(f"no {idx_path.name}: keys taken as record positions (MXNet's indexed reader needs it)")
        return None, None
    try:
        return read_idx_arrays(idx_path)
    except RecordIOError as e:
        res.errors.append(f"{idx_path.name}: {e}")
        return None, None


def _key_finder(idx_keys: Optional[np.ndarray], idx_offs: Optional[np.ndarray]) -> Callable:
    """``key_at(offset)``: the .idx key of the record at ``offset``, for messages."""
    if idx_offs is None:
        return lambda offset: None
    by_off = np.argsort(idx_offs, kind="stable")
    sorted_offs = idx_offs[by_off]

    def key_at(offset: Optional[int]) -> Optional[int]:
        if offset is None:
            return None
        i = int(np.searchsorted(sorted_offs, offset))
        return int(idx_keys[by_off[i]]) if i < sorted_offs.size and sorted_offs[i] == offset else None
    return key_at


def _check_image_bytes(img: bytes, where: Callable[[str], str], res: InspectResult, full: bool,
                       shapes: set) -> None:
    """One record's image bytes: a JPEG must be complete, anything else should be a PNG;
    with ``full`` it must decode."""
    kind = image_kind(img)
    if kind == "jpg" and not jpeg_complete(img):
        res.errors.append(where("JPEG has no end-of-image marker (truncated or corrupt image bytes)"))
    elif not kind and len(res.warnings) < 50:
        res.warnings.append(where("image bytes are neither JPEG nor PNG"))
    if full:
        import cv2

        a = cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_COLOR)
        if a is None:
            res.errors.append(where("image does not decode"))
        else:
            shapes.add(tuple(a.shape))
            res.decoded += 1


def _scan(rec_path: Path, size: int, key_at: Callable, res: InspectResult, full: bool,
          show_progress: bool, cursor=None) -> _Scan:
    """One pass over the file: framing, IRHeaders, JPEG completeness (and decoding with
    ``full``), payload checksums (``cursor``)."""
    offsets, flags = array("q"), array("q")
    lab0, lab1, imglen = array("d"), array("d"), array("q")
    nan = float("nan")
    shapes: set = set()
    bad_pad = 0
    framing_error_at: Optional[int] = None
    bar = progress(total=size, desc="inspect", unit="B", disable=None if show_progress else True)
    last = 0
    with open(rec_path, "rb", buffering=1 << 20) as f:
        try:
            for r in iter_records(f, 0, size):
                n = len(offsets)
                offsets.append(r.offset)
                bad_pad += r.bad_padding

                def where(msg: str, r=r, n=n) -> str:
                    return str(RecordIOError(msg, r.offset, n, key_at(r.offset)))
                if cursor is not None:
                    try:
                        bad = cursor.check(r.offset, r.payload)
                    except SumsError as e:
                        res.errors.append(str(e))
                        cursor = None
                        bad = None
                    if bad is not None:
                        res.checksum_errors += 1
                        if res.checksum_errors <= 20:
                            res.errors.append(where(bad))
                try:
                    h, img = unpack_record(r.payload)
                except RecordIOError as e:
                    res.errors.append(where(e.message))
                    flags.append(-1), lab0.append(nan), lab1.append(nan), imglen.append(0)
                    continue
                flags.append(h.flag)
                lab0.append(h.label[0] if h.flag > 0 else h.label)
                lab1.append(h.label[1] if h.flag > 1 else nan)
                imglen.append(len(img))
                if img:
                    _check_image_bytes(img, where, res, full, shapes)
                if r.offset - last > (8 << 20):
                    bar.update(r.offset - last)
                    last = r.offset
        except RecordIOError as e:
            e.key = key_at(e.offset)
            res.errors.append(str(e))
            framing_error_at = e.offset if e.offset is not None else 0
    bar.close()
    res.records = len(offsets)
    if res.checksum_errors > 20:
        res.errors.append(f"{res.checksum_errors} record(s) in total fail their checksum")
    if bad_pad:
        res.errors.append(f"{bad_pad} record(s) with non-zero padding bytes (corrupt length or data)")

    def arr(a: array, dtype) -> np.ndarray:
        return np.frombuffer(a, dtype=dtype) if a else np.zeros(0, dtype)
    return _Scan(arr(offsets, np.int64), arr(flags, np.int64), arr(lab0, np.float64), arr(lab1, np.float64),
                 arr(imglen, np.int64), shapes, framing_error_at)


def _match_index(scan: _Scan, idx_keys: Optional[np.ndarray], idx_offs: Optional[np.ndarray], idx_path: Path,
                 size: int, res: InspectResult) -> tuple[np.ndarray, np.ndarray]:
    """The .idx must point at record starts: (keys, record positions) of the keys that
    do; without a .idx the keys are the record positions."""
    offs = scan.offs
    if idx_keys is None:
        keys = np.arange(offs.size, dtype=np.int64)
        return keys, keys.copy()
    uk, first_seen = np.unique(idx_keys, return_index=True)
    if uk.size != idx_keys.size:
        dup = np.setdiff1d(np.arange(idx_keys.size), first_seen)
        res.errors.append(f"{idx_path.name}: {dup.size} duplicate key(s) (first: key {int(idx_keys[dup[0]])})")
    p = np.searchsorted(offs, idx_offs)
    hit = (p < offs.size) & (offs[np.minimum(p, max(offs.size - 1, 0))] == idx_offs) if offs.size else \
        np.zeros(idx_offs.size, bool)
    miss = np.flatnonzero(~hit)
    if scan.framing_error_at is not None:
        miss = miss[idx_offs[miss] < scan.framing_error_at]  # beyond the corrupt point: already reported
    for i in miss[:10]:
        o = int(idx_offs[i])
        res.errors.append(f"{idx_path.name}: key {int(idx_keys[i])} offset {o} is not the start of a record"
                          + (" (past the end of the .rec)" if o >= size else ""))
    if miss.size > 10:
        res.errors.append(f"{idx_path.name}: {miss.size} keys in total point at no record start")
    keys, pos = idx_keys[hit], p[hit]
    if scan.framing_error_at is None:
        unindexed = offs.size - np.unique(pos).size
        if unindexed > 0:
            res.warnings.append(f"{unindexed} record(s) are not in the .idx (invisible to MXNet's indexed reader)")
    return keys, pos


def _image_records(scan: _Scan, keys: np.ndarray, pos: np.ndarray, res: InspectResult) -> Optional[_Images]:
    """The layout (key 0 decides it, :mod:`facecurate.common.recdata`) and which keys are
    image and identity records; None when that cannot be told (error recorded)."""
    order = np.argsort(keys, kind="stable")
    skeys, spos = keys[order], pos[order]

    def positions(want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """record positions of keys ``want`` and the mask of those present."""
        i = np.searchsorted(skeys, want)
        ok = (i < skeys.size) & (skeys[np.minimum(i, skeys.size - 1)] == want)
        return spos[np.minimum(i, skeys.size - 1)], ok

    p0, ok0 = positions(np.array([0]))
    if not ok0[0]:
        res.errors.append("key 0 is missing (arcface_torch's MXFaceDataset reads key 0 and raises KeyError)")
        return None
    p0 = int(p0[0])
    flag0, len0 = int(scan.flags[p0]), int(scan.imglen[p0])
    res.layout = LAYOUT_HEADER if is_header_record(flag0, len0) else LAYOUT_PLAIN
    try:
        layout = layout_of(flag0, scan.lab0[p0], scan.lab1[p0], len0, int(scan.offs.size))
    except RecordIOError as e:
        res.errors.append(str(e))
        return None
    none = np.zeros(0, np.int64)
    if not layout.has_header:
        res.images = int(skeys.size)
        return _Images(skeys, spos, none, none, 0, spos)
    first, end = layout.first, layout.end
    img_pos, ok = positions(np.arange(1, first, dtype=np.int64))
    id_keys = np.arange(first, end, dtype=np.int64)
    id_pos, ok_id = positions(id_keys)
    res.identity_records = int(id_keys.size)
    missing = int((~ok).sum() + (~ok_id).sum())
    if missing:
        res.errors.append(f"{missing} key(s) named by the header are missing from the .idx")
    image_keys = np.arange(1, first, dtype=np.int64)[ok]
    res.images = int(image_keys.size)
    return _Images(image_keys, img_pos[ok], id_keys[ok_id], id_pos[ok_id], first, spos)


def _check_labels(scan: _Scan, imgs: _Images, res: InspectResult) -> np.ndarray:
    """Image labels (a vector's first value): integral, >= 0, 0..C-1 with every class
    present; images with bytes. Returns the labels in key order."""
    labs = scan.lab0[imgs.pos]
    res.vector_labels = int((scan.flags[imgs.pos] > 0).sum())
    empty = np.flatnonzero(scan.imglen[imgs.pos] == 0)
    if empty.size:
        res.errors.append(f"{empty.size} image record(s) have no image bytes (first: key {int(imgs.keys[empty[0]])})")
    if not labs.size:
        return labs
    with np.errstate(invalid="ignore"):
        good = np.isfinite(labs) & (labs == np.round(labs)) & (labs >= 0) & (labs < LABEL_LIMIT)
    bad = np.flatnonzero(~good)
    if bad.size:
        res.errors.append(f"{bad.size} image label(s) are not {LABEL_RULE} (first: key "
                          f"{int(imgs.keys[bad[0]])}, label {labs[bad[0]]})")
    il = labs[good].astype(np.int64)
    res.classes = int(np.unique(il).size)
    if il.size:
        res.label_min, res.label_max = int(il.min()), int(il.max())
        if res.label_min != 0 or res.label_max != res.classes - 1:
            res.errors.append(f"labels are not contiguous 0..C-1: {res.classes} classes span {res.label_min}.."
                              f"{res.label_max} (partial-FC silently ignores out-of-range labels)")
        runs = int(np.count_nonzero(il[1:] != il[:-1])) + 1
        res.grouped_by_class = runs == res.classes
    return labs


def _check_identity_records(scan: _Scan, imgs: _Images, labs: np.ndarray, res: InspectResult) -> None:
    """insightface layout: classes contiguous in key order, and identity records that
    tile the image keys 1..first-1 one class each."""
    if not res.grouped_by_class:
        res.errors.append("insightface layout but the images of a class are not contiguous in key order")
    first = imgs.first
    a, b = scan.lab0[imgs.id_pos], scan.lab1[imgs.id_pos]
    ends_ok = scan.flags[imgs.id_pos] >= 2
    expect = np.concatenate([[1.0], b[:-1]]) if b.size else b
    bad = np.flatnonzero(~ends_ok | (a != expect) | ~(b > a) | (b > first))
    if bad.size:
        i = int(bad[0])
        res.errors.append(f"key {int(imgs.id_keys[i])}: identity record range [{a[i]}, {b[i]}) does not continue "
                          f"at {expect[i]} (classes must be contiguous)")
    elif b.size and b[-1] != first:
        res.errors.append(f"identity records cover keys 1..{int(b[-1]) - 1}, images are 1..{first - 1}")
    elif labs.size and res.grouped_by_class:
        # every identity record's range holds exactly one label
        starts = (a - 1).astype(np.int64)
        if np.any(labs[starts] != labs[(b - 2).astype(np.int64)]):
            res.errors.append("an identity record's range holds several labels")


def _decode_sample(rec_path: Path, scan: _Scan, imgs: _Images, sample: int, shapes: set,
                   res: InspectResult) -> None:
    """Decode ``sample`` images spread evenly over the key order."""
    import cv2

    n = min(sample, int(imgs.keys.size))
    pick = sorted({int(i * imgs.keys.size // n) for i in range(n)})
    with open(rec_path, "rb") as f:
        for i in pick:
            k = int(imgs.keys[i])
            try:
                _, img = unpack_record(read_record(f, int(scan.offs[imgs.pos[i]]), key=k).payload)
            except RecordIOError as e:
                res.errors.append(str(e))
                continue
            a = cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_COLOR) if img else None
            if a is None:
                res.errors.append(f"key {k}: image does not decode")
            else:
                shapes.add(tuple(a.shape))
                res.decoded += 1


def _check_property(rec_path: Path, res: InspectResult) -> None:
    """``property`` beside a train.rec: ``num_classes,H,W`` matching the records."""
    prop = read_property(rec_path)
    if prop is None:
        return
    res.property_line = ",".join(map(str, prop))
    if len(prop) != 3:
        res.errors.append(f"property file must be one line 'num_classes,H,W', got {res.property_line!r}")
        return
    if prop[0] != res.classes:
        res.errors.append(f"property says {prop[0]} classes, the .rec has {res.classes}")
    hw = {s[:2] for s in res.shapes}
    if hw and hw != {(prop[1], prop[2])}:
        res.errors.append(f"property says {prop[1]}x{prop[2]}, decoded images are "
                          + ", ".join(f"{h}x{w}" for h, w in sorted(hw)))
