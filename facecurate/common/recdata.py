"""A RecordIO *dataset* as facecurate reads it, above the framing of
:mod:`facecurate.common.recordio`: where its files are, its ``property`` and ``labels.csv``,
and the one rule for which records are images, shared by ``embed`` (a .rec as
input), ``inspect`` and ``unpack``.

The rule (docs/formats.md, "Which records are images"):

* **Key 0 decides the layout.** When the record at key 0 carries a vector label of at
  least two values (IRHeader ``flag`` >= 2) and no image bytes, it is an insightface
  header ``[first, end)``: keys 1..first-1 are the image records, keys first..end-1
  the identity records (one per class), key 0 itself neither. A header whose two
  values are not integers with ``1 <= first <= end`` is an error.
* **Otherwise the layout is plain:** key 0 is an image (or there is no key 0) and
  every record is an image record.
* **The label of an image record** is its scalar label, or the first value of a
  vector label (what arcface_torch's ``MXFaceDataset`` uses). A vector label never
  makes an image record a header or an identity record.
* An image record without image bytes, or whose label is not an integer in
  [0, 2^31), is a *bad image record*: inspect and unpack report it, embed records it
  as failed; it is never silently taken for another kind of record.
* **Counts are checked before anything is allocated.** A header range must fit in the
  file: keys 0..end-1 are all records, so ``end`` may not exceed the number of records
  (the .idx entries when known, else the file's size / 32 bytes, the smallest record
  with an IRHeader). A crafted header claiming 3e9 identities is an error naming key 0,
  not a 22 GiB ``arange``.

``MXFaceDataset`` calls key 0 a header as soon as its ``flag`` is > 0; requiring two
values and no image is the same decision for every file it can read, and keeps a
plain file whose first image has a one-value vector label a plain file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import BinaryIO, NamedTuple, Optional

from facecurate.common.constants import (
    ALIGN_MANIFEST,
    IDX_NAME,
    LABELS_CSV,
    LABEL_LIMIT,
    LAYOUT_HEADER,
    LAYOUT_PLAIN,
    MIN_IMAGE_RECORD,
    PROPERTY_NAME,
    REC_KEY_PREFIX,
    REC_NAME,
)
from facecurate.common.recordio import (MAGIC_BYTES, IRHeader, RecordIOError, file_size, read_idx_arrays,
                                        read_idx_keys, read_record, unpack_record)
from facecurate.common.files import read_csv


class RecLayout(NamedTuple):
    """Which keys of a .rec are image records (see the module's rule)."""

    kind: str = LAYOUT_PLAIN  # LAYOUT_PLAIN | LAYOUT_HEADER
    first: int = 0  # header layout: the first identity key; images are keys 1..first-1
    end: int = 0  # header layout: identity records are keys first..end-1

    @property
    def has_header(self) -> bool:
        return self.kind == LAYOUT_HEADER

    def is_image(self, key: int) -> bool:
        return not self.has_header or 1 <= key < self.first


PLAIN = RecLayout()


def is_header_record(flag: int, image_bytes: int) -> bool:
    """Is a record at key 0 with this IRHeader flag and image length a header?"""
    return flag >= 2 and image_bytes == 0


def layout_of(flag: int, label0: float, label1: float, image_bytes: int, records: int) -> RecLayout:
    """The layout from key 0's IRHeader ``flag``, the first two label values and the
    length of its image bytes; ``records``: how many records the file holds (or at most
    can hold). Raises RecordIOError (key 0) for a header whose range is not valid or
    claims more records than there are."""
    if not is_header_record(flag, image_bytes):
        return PLAIN
    first, end = label0, label1
    if not (label_ok(first) and label_ok(end)) or not 1 <= first <= end:
        raise RecordIOError(f"header label [{first}, {end}] is not a valid [first_identity_key, end]", key=0)
    if end > records:
        raise RecordIOError(f"header label [{first:.0f}, {end:.0f}] claims {end - first:.0f} identities after "
                            f"{first - 1:.0f} images, but the file holds {records} records at most "
                            "(crafted or corrupt header)", key=0)
    return RecLayout(LAYOUT_HEADER, int(first), int(end))


def layout_from_record(header: IRHeader, image: bytes, records: int) -> RecLayout:
    """:func:`layout_of` for key 0's unpacked record."""
    values = header.label if isinstance(header.label, tuple) else (header.label,)
    nan = float("nan")
    return layout_of(header.flag, values[0] if values else nan, values[1] if len(values) > 1 else nan, len(image),
                     records)


def max_records(size: int) -> int:
    """How many image, header or identity records a file of ``size`` bytes can hold."""
    return size // MIN_IMAGE_RECORD


def read_layout(f: BinaryIO, offset0: Optional[int], records: Optional[int] = None) -> RecLayout:
    """The layout of an open .rec whose key 0 starts at ``offset0`` (None: there is no
    key 0, so the layout is plain). ``records``: the number of records (the .idx's
    entries); by default the most the file's size allows."""
    if offset0 is None:
        return PLAIN
    header, image = unpack_record(read_record(f, offset0, key=0).payload)
    bound = max_records(file_size(f))
    return layout_from_record(header, image, bound if records is None else min(records, bound))


def image_label(header: IRHeader) -> float:
    """The class label of an image record: the scalar label, or a vector's first value."""
    return header.scalar_label


def label_ok(label: float) -> bool:
    """An image record's label must be an integer in [0, 2^31) (int32, as insightface
    reads it)."""
    return math.isfinite(label) and 0 <= label < LABEL_LIMIT and label == int(label)


def int_label(value) -> int:
    """A label (a number, or its text in a CSV) as an int; -1 when it is not an integer
    in [0, 2^31) (NaN, inf, negative, fractional, too large, not a number)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return -1
    return int(v) if label_ok(v) else -1


LABEL_RULE = "an integer in [0, 2^31)"


def not_a_rec(path: os.PathLike | str) -> Optional[str]:
    """Why a file given as REC is not a RecordIO file (its first four bytes are not the
    RecordIO magic), or None when it is one, is a folder, or does not exist (the
    callers say that themselves)."""
    p = Path(path)
    if p.suffix in (".rec", ".idx") or not p.is_file():
        return None
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"{p}: cannot read: {e.strerror or e}"
    if head == MAGIC_BYTES:
        return f"{p} is a RecordIO file but not named .rec: rename it NAME.rec, with its NAME.idx beside it"
    return f"{p} is not a RecordIO file (it does not start with the RecordIO magic 0xced7230a)"


# ----------------------------------------------------------------------------- files
def rec_paths(path: os.PathLike | str) -> tuple[Path, Path]:
    """(.rec, .idx) for ``DEST/train``, ``DEST`` (a folder holding train.rec), a .rec
    or a .idx path."""
    p = Path(path)
    if p.is_dir():
        p = p / REC_NAME
    if p.suffix in (".rec", ".idx"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".rec"), p.with_name(p.name + ".idx")


def read_property(rec_path: Path) -> Optional[tuple[int, ...]]:
    """The numbers of the ``property`` file beside a ``train.rec`` (``()`` when it is
    not numbers); None when there is none (or the .rec has another name)."""
    if rec_path.name != REC_NAME:
        return None
    p = rec_path.parent / PROPERTY_NAME
    if not p.exists():
        return None
    try:
        return tuple(int(x) for x in p.read_text().strip().split(","))
    except ValueError:
        return ()


def read_label_names(rec_path: Path) -> Optional[dict[int, str]]:
    """label -> identity from the ``labels.csv`` beside a .rec; None when absent or
    not readable as such."""
    p = rec_path.parent / LABELS_CSV
    if not p.exists():
        return None
    names = {}
    for r in read_csv(p):
        try:
            names[int(r["label"])] = r["identity"]
        except (KeyError, ValueError):
            return None
    return names


# ----------------------------------------------------------------------------- records by key
class KeyedRecords:
    """Random access to the records of a .rec by key, through its .idx held as two
    numpy arrays (16 bytes per record, so millions of records are cheap). Used where a
    few records are needed (review and report thumbnails, clean's pixel check); the
    stages that need every record stream the file instead."""

    def __init__(self, rec: os.PathLike | str, keys=None):
        """``keys``: only these records will be asked for (the .idx is then streamed
        and only their offsets kept: memory bounded by them, not by the rec)."""
        import numpy as np

        self.rec_path, self.idx_path = rec_paths(rec)
        keys, offs = read_idx_arrays(self.idx_path) if keys is None else read_idx_keys(self.idx_path, keys)
        order = np.argsort(keys, kind="stable")
        self.keys, self.offsets = keys[order], offs[order]
        self._f: Optional[BinaryIO] = None

    def offset(self, key: int) -> Optional[int]:
        import numpy as np

        i = int(np.searchsorted(self.keys, key))
        return int(self.offsets[i]) if i < self.keys.size and self.keys[i] == key else None

    def payload(self, key: int) -> Optional[bytes]:
        """The payload of record ``key`` (None when the .idx has no such key);
        RecordIOError for a corrupt record."""
        off = self.offset(key)
        if off is None:
            return None
        if self._f is None:
            self._f = open(self.rec_path, "rb")
        return read_record(self._f, off, key=key).payload

    def image(self, key: int) -> Optional[bytes]:
        """The image bytes of record ``key``; None when absent, corrupt or empty."""
        try:
            p = self.payload(key)
            return unpack_record(p)[1] or None if p is not None else None
        except RecordIOError:
            return None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def rec_key(aligned: str) -> Optional[int]:
    """The record key of a store / clean.csv key ``rec:<key>``; None for other keys."""
    if aligned.startswith(REC_KEY_PREFIX):
        try:
            return int(aligned[len(REC_KEY_PREFIX):])
        except ValueError:
            return None
    return None


def is_rec_dataset(folder: os.PathLike | str) -> bool:
    """A folder holding ``train.rec`` + ``train.idx`` and no align.csv: the
    ``clean``/``review``/``report``/``pack`` stages read it as a packed dataset."""
    d = Path(folder)
    return d.is_dir() and (d / REC_NAME).is_file() and (d / IDX_NAME).is_file() and not (d / ALIGN_MANIFEST).exists()
