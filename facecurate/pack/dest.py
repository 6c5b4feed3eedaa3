"""Writing DEST, for a pack of crops (:mod:`facecurate.pack.packer`) and of a packed
dataset's kept records (:mod:`facecurate.pack.pack_rec`): the records and their
.idx/.lst/train.sums lines under temporary names (:class:`RecSink`), the small files
(:func:`dest_texts`), and the commit that renames everything into place only when all
of it is complete (:func:`commit_dest`; :func:`cleanup_dest` after a failure). The
result is a :class:`PackResult`."""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from facecurate.common.constants import (
    IDX_NAME,
    LABELS_CSV,
    LAYOUT_INSIGHTFACE,
    LST_NAME,
    MAX_FLOAT_KEY,
    PACK_ERROR_COLUMNS,
    PACK_ERRORS_CSV,
    PACK_FILES,
    PACK_META,
    PACK_NOT_KEPT,
    PACK_TMP_SUFFIX,
    PROPERTY_NAME,
    REC_NAME,
    SUMS_NAME,
    VERSIONS_KEY,
)
from facecurate.common.files import csv_text
from facecurate.common.provenance import library_versions
from facecurate.common.recordio import RecordWriter, frame, pack_header
from facecurate.pack.checksums import SumsWriter
from facecurate.pack.pack_inputs import Good, InputError, PackError


def temp_name(dest: Path, name: str) -> Path:
    return dest / f".{name}{PACK_TMP_SUFFIX}"


@dataclass
class PackResult:
    dest: Path
    source: str  # clean.csv | align.csv | folder
    layout: str
    size: int
    images: int
    classes: int
    stored_as_is: int  # JPEGs copied byte-for-byte
    reencoded: int  # encoded once (q95) because not a JPEG of the target size
    rec_bytes: int
    shuffle: bool
    seed: int
    min_images: int
    dropped_identities: int
    dropped_images: int
    errors: list[InputError] = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    @property
    def problems(self) -> list[InputError]:
        """The input problems: every row of pack_errors.csv but the records clean did
        not keep (``not_kept``, a pack of a .rec), which are a decision, not a problem."""
        return [e for e in self.errors if e.reason != PACK_NOT_KEPT]

    def error_counts(self) -> dict:
        out: dict = {}
        for e in self.problems:
            out[e.reason] = out.get(e.reason, 0) + 1
        return dict(sorted(out.items()))

    def config_snippet(self) -> str:
        return (f'config.rec = "{self.dest.resolve()}"\n'
                f"config.num_classes = {self.classes}\n"
                f"config.num_image = {self.images}")

    def summary(self) -> dict:
        return {
            "dest": str(self.dest), "source": self.source, "layout": self.layout,
            "images": self.images, "classes": self.classes, "size": f"{self.size}x{self.size}",
            "stored_as_is": self.stored_as_is, "reencoded": self.reencoded, "rec_bytes": self.rec_bytes,
            "shuffle": self.shuffle, "seed": self.seed, "min_images": self.min_images,
            "dropped_identities": self.dropped_identities, "dropped_images": self.dropped_images,
            "input_errors": len(self.problems), "input_errors_by_reason": self.error_counts(),
            "errors_file": str(self.dest / PACK_ERRORS_CSV), **self.notes,
            "arcface_torch": {"num_classes": self.classes, "num_image": self.images},
        }


#: While writing train.rec, ask the kernel to start writing it to disk every this many
#: bytes, so that the closing fsync finds (almost) nothing left to do.
WRITEBACK_STEP = 4 << 20


@functools.lru_cache(maxsize=None)
def _writeback_starter() -> Optional[Callable[[int, int, int], int]]:
    """``start(fd, offset, nbytes)``: begin writing a range of a file to disk without
    waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``); None elsewhere. It only
    moves work earlier: durability still comes from the fsync at the end."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return lambda fd, offset, nbytes: fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE


class RecSink:
    """Writes records in their final order into DEST's temporary train.rec, and the
    matching lines into the temporary train.idx and train.lst (nothing accumulates in
    memory). Images get keys first_key, first_key+1, ...; in the insightface layout
    key 0 is the header (its label is known only at the end, so a fixed-size
    placeholder is written first and overwritten in place) and the identity records
    follow the images."""

    def __init__(self, dest: Path, layout: str, on_record: Optional[Callable[[int], None]], bar) -> None:
        self.layout = layout
        self.f = open(temp_name(dest, REC_NAME), "wb", buffering=0)
        self.w = RecordWriter(self.f)
        self.idx = open(temp_name(dest, IDX_NAME), "w", encoding="utf-8", newline="\n", buffering=1 << 20)
        self.lst = open(temp_name(dest, LST_NAME), "w", encoding="utf-8", newline="\n", buffering=1 << 20)
        self.sums_f = open(temp_name(dest, SUMS_NAME), "w", encoding="ascii", newline="\n", buffering=1 << 20)
        self.sums = SumsWriter(self.sums_f, temp_name(dest, REC_NAME))
        self.classes: list[tuple[str, int]] = []  # (identity, images) in label order
        self.stored_as_is = 0
        self._lab_text: dict[float, str] = {}  # label -> its .lst text
        self._on_record, self._bar = on_record, bar
        self._start_writeback = _writeback_starter()
        self._started = 0  # bytes of the file already handed to the kernel's writeback
        self.first_key = self.key = 0
        if layout == LAYOUT_INSIGHTFACE:
            self._header_len = len(frame(pack_header([1.0, 1.0])))
            self.w.write(pack_header([1.0, 1.0]))  # placeholder, rewritten by finish()
            self.idx.write("0\t0\n")
            self.sums.placeholder(0, 0, len(pack_header([1.0, 1.0])))
            self.first_key = self.key = 1

    def images(self, items: Sequence[tuple[float, Good]]) -> None:
        """Write ``(label, crop)`` records with the next keys."""
        if not items:
            return
        if self.key + len(items) >= MAX_FLOAT_KEY and self.layout == LAYOUT_INSIGHTFACE:
            raise PackError("more than 2**24 records: the insightface layout stores keys as float32 labels, "
                            "exact only below 2**24; use --layout plain")
        k0 = self.key
        batch = []
        lines = []
        lab_text = self._lab_text
        for lab, g in items:
            batch.append((lab, g.data, self.key))
            t = lab_text.get(lab)
            if t is None:
                t = lab_text[lab] = f"{lab:f}"
            lines.append(f"{self.key}\t{t}\t{g.rel}\n")
            self.stored_as_is += g.as_is
            self.key += 1
        offs = self.w.write_images(batch)
        self.sums.images(k0, offs, [b[0] for b in batch], [b[1] for b in batch])
        self.lst.write("".join(lines))
        self.idx.write("".join([f"{k0 + i}\t{o}\n" for i, o in enumerate(offs)]))
        self._writeback()
        if self._on_record is not None:
            for k in range(k0, self.key):
                self._on_record(k + 1 - self.first_key)
        self._bar.update(len(items))

    def _writeback(self, last: bool = False) -> None:
        if self._start_writeback is not None and (last or self.w.offset - self._started >= WRITEBACK_STEP):
            self._start_writeback(self.f.fileno(), self._started, self.w.offset - self._started)
            self._started = self.w.offset

    def finish(self) -> int:
        """Identity records (insightface) and the real header; everything handed to
        the kernel (and its writeback started). Returns the file's size."""
        n_img = self.key - self.first_key
        if self.layout == LAYOUT_INSIGHTFACE:
            if self.key + len(self.classes) >= MAX_FLOAT_KEY:
                raise PackError(f"{n_img} images + {len(self.classes)} classes: the insightface layout stores "
                                "keys as float32 labels, exact only below 2**24; use --layout plain")
            start = 1
            for _, n in self.classes:
                payload = pack_header([float(start), float(start + n)], self.key, 0)
                off = self.w.write(payload)
                self.idx.write(f"{self.key}\t{off}\n")
                self.sums.record(self.key, off, payload)
                self.key += 1
                start += n
            self.w.flush()
            payload = pack_header([float(n_img + 1), float(self.key)])
            header = frame(payload)
            if len(header) != self._header_len:  # cannot happen for positive counts
                raise PackError("internal error: header record changed size")
            os.pwrite(self.f.fileno(), header, 0)
            self.sums.fill(0, 0, payload)
        self.sums.wait()
        self.w.flush()
        self._writeback(last=True)
        for f in (self.idx, self.lst, self.sums_f):
            f.flush()
            if self._start_writeback is not None:
                self._start_writeback(f.fileno(), 0, 0)  # 0 bytes: to the end of the file
        return self.w.offset

    def fsync(self) -> None:
        for f in (self.f, self.idx, self.lst, self.sums_f):
            os.fsync(f.fileno())

    def close(self) -> None:
        try:
            self.sums.close()
        finally:
            for f in (self.f, self.idx, self.lst, self.sums_f):
                f.close()


def cleanup_dest(dest: Path, sink, done: bool, created: bool) -> None:
    """After a pack, finished or not: close the writer, remove every temporary file, and
    remove a DEST that this failed run made, so that it leaves no empty folder behind."""
    if sink is not None:
        sink.close()
    for name in PACK_FILES:
        temp_name(dest, name).unlink(missing_ok=True)
    if not done and created:
        try:
            dest.rmdir()
        except OSError:
            pass


def dest_texts(result: PackResult, classes: int, labels_csv: str, lst_paths: str) -> dict[str, str]:
    """property, labels.csv (given), pack_errors.csv and pack.json of a finished pack;
    ``lst_paths`` says what the .lst's path column holds."""
    texts = {
        PROPERTY_NAME: f"{classes},{result.size},{result.size}\n",
        LABELS_CSV: labels_csv,
        PACK_ERRORS_CSV: csv_text(PACK_ERROR_COLUMNS,
                                  [(e.identity, e.path, e.reason, e.message) for e in result.errors]),
    }
    meta = {k: v for k, v in result.summary().items() if k not in ("dest", "errors_file")}
    meta["files"] = [REC_NAME, IDX_NAME, LST_NAME, SUMS_NAME, PROPERTY_NAME, LABELS_CSV, PACK_ERRORS_CSV]
    meta["lst_format"] = f"im2rec: index<TAB>label<TAB>path ({lst_paths})"
    meta[VERSIONS_KEY] = library_versions()
    texts[PACK_META] = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    return texts


def commit_dest(dest: Path, sink: RecSink, texts: dict[str, str], fsync: bool) -> None:
    """Write the small files under their temporary names, flush everything to disk
    (``fsync``), then rename every file into place (pack.json last)."""
    start_writeback = _writeback_starter() if fsync else None
    small = []
    try:
        for name, text in texts.items():
            f = open(temp_name(dest, name), "w", encoding="utf-8", newline="\n")
            small.append(f)
            f.write(text)
            f.flush()
            if start_writeback is not None:
                start_writeback(f.fileno(), 0, 0)  # 0 bytes: to the end of the file
        if fsync:  # after all writes, so that the disk works on them together
            sink.fsync()
            for f in small:
                os.fsync(f.fileno())
    finally:
        for f in small:
            f.close()
    for name in PACK_FILES:
        os.replace(temp_name(dest, name), dest / name)
    if fsync:
        _fsync_dir(dest)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
