"""The pack stage: crops -> train.rec/.idx/.lst + property for insightface arcface_torch,
written without MXNet; plus ``inspect`` (validate a .rec), ``unpack`` (.rec -> folders)
and ``pack_pairs`` (an LFW-style pairs file -> a ``(bins, issame_list)`` .bin).

Layouts written by :func:`pack`:

* ``plain`` (default): keys 0..N-1, every record an image with a scalar label (flag 0).
  Read by arcface_torch's MXFaceDataset *and* NVIDIA DALI's mxnet reader.
* ``insightface``: key 0 is a header whose label is ``[N+1, N+1+C]``, images at keys
  1..N grouped by class, then one identity record per class (label ``[start, end)``,
  empty image). Read by MXFaceDataset and insightface's older tools, not by DALI.
"""

from __future__ import annotations

import functools
import json
import os
import random
import sys
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

from facecurate.constants import (
    ALIGN_MANIFEST,
    ALIGN_META,
    ARCFACE_BASE_SIZE,
    CLEAN_CSV,
    DECISION_KEEP,
    IMAGE_EXTENSIONS,
    JPEG_QUALITY,
    STATUS_OK,
)
from facecurate.files import csv_text, read_csv, write_bytes_atomic, write_text_atomic
from facecurate.imageio import jpeg_sof
from facecurate.recordio import (
    RecordIOError,
    RecordWriter,
    frame,
    iter_records,
    pack_header,
    read_idx_arrays,
    read_record,
    unpack_record,
)

# --- file names inside DEST -------------------------------------------------------------
REC_NAME = "train.rec"
IDX_NAME = "train.idx"
LST_NAME = "train.lst"
PROPERTY_NAME = "property"
LABELS_CSV = "labels.csv"
PACK_ERRORS_CSV = "pack_errors.csv"
PACK_META = "pack.json"
#: Files are written as DEST/.<name>.pack-tmp and renamed into place at the end.
TMP_SUFFIX = ".pack-tmp"
ALL_FILES = (REC_NAME, IDX_NAME, LST_NAME, PROPERTY_NAME, LABELS_CSV, PACK_ERRORS_CSV, PACK_META)


def _tmp(dest: Path, name: str) -> Path:
    return dest / f".{name}{TMP_SUFFIX}"
LABELS_COLUMNS = ("identity", "label", "images")
PACK_ERROR_COLUMNS = ("identity", "path", "reason", "message")

LAYOUT_PLAIN = "plain"
LAYOUT_INSIGHTFACE = "insightface"
LAYOUT_HEADER = "insightface-header"  # what inspect calls a .rec with a header record

# --- reasons in pack_errors.csv -----------------------------------------------------------
ERR_MISSING = "missing"  # listed crop does not exist
ERR_UNREADABLE = "unreadable"  # exists but cannot be read (permissions, I/O error, directory)
ERR_NOT_IMAGE = "not_image"  # not a decodable image (or not an image file type)
ERR_WRONG_SIZE = "wrong_size"  # decodes, but not the target size
ERR_EMPTY_IDENTITY = "empty_identity"  # identity with no usable crop
ERR_BELOW_MIN = "below_min_images"  # identity dropped by --min-images
ERR_DUPLICATE = "duplicate"  # same crop listed twice
ERR_BAD_ROW = "bad_row"  # manifest row that cannot be used (no path, tab in name, ...)

#: float32 holds integers exactly only up to 2**24 (insightface layout stores keys as labels).
MAX_FLOAT_KEY = 1 << 24


class PackError(Exception):
    """pack could not produce DEST (nothing usable, --strict with input errors, ...);
    DEST is left as it was, except that a pack with no usable crop writes
    DEST/pack_errors.csv to say why. ``errors``: the input problems found;
    ``summary``: what the CLI prints under --json."""

    def __init__(self, message: str, errors: Sequence["InputError"] = (), summary: Optional[dict] = None):
        super().__init__(message)
        self.errors = list(errors)
        self.summary = summary


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class InputError:
    identity: str
    path: str
    reason: str
    message: str


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

    def error_counts(self) -> dict:
        out: dict = {}
        for e in self.errors:
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
            "input_errors": len(self.errors), "input_errors_by_reason": self.error_counts(),
            "errors_file": str(self.dest / PACK_ERRORS_CSV), **self.notes,
            "arcface_torch": {"num_classes": self.classes, "num_image": self.images},
        }


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
            "errors": len(self.errors), "error_messages": self.errors[:max_messages],
            "warnings": self.warnings[:max_messages],
        }


@dataclass
class UnpackResult:
    dest: Path
    written: int = 0
    existing: int = 0  # already there from an earlier run (resume)
    classes: int = 0
    names: str = "label"  # "labels.csv" when folders are identity names
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"dest": str(self.dest), "written": self.written, "already_present": self.existing,
                "classes": self.classes, "folder_names": self.names, "errors": len(self.errors),
                "error_messages": self.errors[:20]}


@dataclass
class PairsResult:
    dest: Path
    pairs: int = 0
    same: int = 0
    different: int = 0
    shapes: list = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)  # "line N: reason"

    def summary(self) -> dict:
        return {"dest": str(self.dest), "pairs": self.pairs, "same": self.same, "different": self.different,
                "images": 2 * self.pairs, "shapes": ", ".join("x".join(map(str, s)) for s in self.shapes),
                "unresolved_pairs": len(self.unresolved),
                "unresolved_file": str(self.dest.with_name(self.dest.name + ".unresolved.txt")) if self.unresolved else "",
                "unresolved": self.unresolved}


# ----------------------------------------------------------------------------- image bytes
def jpeg_size(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) from a JPEG's SOF segment without decoding; None if not a JPEG
    or the header is not understood."""
    s = jpeg_sof(data)
    return None if s is None else (s[0], s[1])


class _SizeCheck:
    """Is this a JPEG of the target size? Crops from one encoder share their header
    bytes up to the SOF segment, and the parse depends only on those bytes: once a
    header prefix has given the target size, a crop that starts with the same bytes
    has it too (one ``startswith`` instead of a parse)."""

    def __init__(self, size: int) -> None:
        self.want = (size, size)
        self.prefix: Optional[bytes] = None

    def __call__(self, data: bytes) -> bool:
        p = self.prefix
        if p is not None and data.startswith(p):
            return True
        s = jpeg_sof(data)
        if s is None or (s[0], s[1]) != self.want:
            return False
        self.prefix = data[:s[2]]
        return True


def jpeg_complete(data: bytes) -> bool:
    """True when the JPEG ends with the end-of-image marker (zero padding allowed)."""
    return data[-64:].rstrip(b"\0").endswith(b"\xff\xd9")


def image_kind(data: bytes) -> str:
    if data[:2] == b"\xff\xd8":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return ""


class _Cand(NamedTuple):
    identity: str
    rel: str  # as written to the .lst (relative to OUT, POSIX)
    path: str
    name: str  # what to open: relative to the identity folder's descriptor when there is one, else = path


class _Good(NamedTuple):
    identity: str
    rel: str
    data: bytes
    as_is: bool


#: Crops larger than this are refused (a 112x112 JPEG is ~5 KB).
MAX_CROP_BYTES = 64 << 20
_O_RDONLY = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)


def _read_file(path: str) -> bytes:
    """The whole file, with as few system calls as possible (no fstat, one read for a
    file under 64 KiB)."""
    fd = os.open(path, _O_RDONLY)
    try:
        data = os.read(fd, 65536)
        if len(data) == 65536:
            parts = [data]
            total = len(data)
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                parts.append(chunk)
                total += len(chunk)
                if total > MAX_CROP_BYTES:
                    raise OSError(f"larger than {MAX_CROP_BYTES} bytes, not a face crop")
            data = b"".join(parts)
        return data
    finally:
        os.close(fd)


def _load(identity: str, rel: str, path: str, size: int, resize: bool,
          quality: int) -> tuple[Optional[bytes], bool, Optional[InputError]]:
    """Read one crop and return (bytes to store, stored-as-is?, error)."""
    def err(reason, msg):
        return None, False, InputError(identity, rel, reason, msg)

    try:
        data = _read_file(path)
    except FileNotFoundError:
        return err(ERR_MISSING, "file does not exist")
    except IsADirectoryError:
        return err(ERR_UNREADABLE, "is a directory, not an image file")
    except OSError as e:
        return err(ERR_UNREADABLE, f"cannot read: {e.strerror or e}")
    if not data:
        return err(ERR_NOT_IMAGE, "empty file (0 bytes)")
    # Fast path: a complete JPEG of the target size is stored as it is, undecoded.
    if data.endswith(b"\xff\xd9") or jpeg_complete(data):
        if jpeg_size(data) == (size, size):
            return data, True, None
    import cv2
    import numpy as np

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        if data[:2] == b"\xff\xd8":
            return err(ERR_NOT_IMAGE, "corrupt or truncated JPEG (cannot decode)")
        return err(ERR_NOT_IMAGE, "not an image this tool can decode")
    if data[:2] == b"\xff\xd8" and not jpeg_complete(data):
        return err(ERR_NOT_IMAGE, "truncated JPEG (no end-of-image marker)")
    h, w = img.shape[:2]
    if (w, h) != (size, size):
        if not resize:
            return err(ERR_WRONG_SIZE, f"{w}x{h}, expected {size}x{size} (use --resize to resize such crops)")
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if w > size else cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        return err(ERR_NOT_IMAGE, "could not encode as JPEG")
    return buf.tobytes(), False, None


# ----------------------------------------------------------------------------- inputs
def _target_size(out: Path, size: Optional[int]) -> int:
    if size:
        return int(size)
    meta = out / ALIGN_META
    if meta.exists():
        try:
            m = json.loads(meta.read_text())
            s = (m.get("settings") or {}).get("size") or m.get("size")  # align.json keeps it in settings
            if s:
                return int(s)
        except (ValueError, OSError, AttributeError):
            pass
    return ARCFACE_BASE_SIZE


def _bad_name(s: str) -> bool:
    return "\t" in s or "\n" in s or "\r" in s


def _collect(out: Path, dest: Path) -> tuple[str, list, list[InputError], dict]:
    """What to read: (source, work units, problems found while listing, notes). A unit
    is a list of _Cand (manifest sources) or a tuple of identity folder names (folder
    source, listed by the worker that reads them)."""
    errors: list[InputError] = []
    notes: dict = {}
    if (out / CLEAN_CSV).exists():
        source, rows = CLEAN_CSV, read_csv(out / CLEAN_CSV)
        decisions: dict = {}
        for r in rows:
            decisions[r.get("decision", "")] = decisions.get(r.get("decision", ""), 0) + 1
        notes["clean_decisions"] = dict(sorted(decisions.items()))
        all_ids = {r.get("identity", "") for r in rows}
        rows = [r for r in rows if r.get("decision") == DECISION_KEEP]
        notes["identities_with_nothing_kept"] = len(all_ids - {r.get("identity", "") for r in rows})
    elif (out / ALIGN_MANIFEST).exists():
        source = ALIGN_MANIFEST
        rows = [r for r in read_csv(out / ALIGN_MANIFEST)
                if r.get("status") == STATUS_OK and str(r.get("primary", "")).strip() == "1"]
    else:
        if not out.is_dir():
            raise PackError(f"{out} is not a directory")
        ignored, units = 0, []
        dest_r = dest.resolve()
        skip = dest_r.name if dest_r.parent == out.resolve() else None
        with os.scandir(out) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if e.name.startswith("."):
                continue
            if not e.is_dir():
                ignored += 1
            elif e.name == skip:
                notes["skipped_dest_folder"] = e.name
            elif _bad_name(e.name):
                errors.append(InputError(e.name, e.name + "/", ERR_BAD_ROW, "tab or newline in the name (breaks the .lst)"))
            else:
                units.append(e.name)
        notes["top_level_files_ignored"] = ignored
        # A unit is a few identity folders (fewer, larger work items).
        return "folder", [tuple(units[i:i + 16]) for i in range(0, len(units), 16)], errors, notes
    cands: list[_Cand] = []
    base = str(out)
    for r in rows:
        ident, rel = r.get("identity", ""), (r.get("aligned") or "").strip()
        if not ident or not rel:
            errors.append(InputError(ident, rel, ERR_BAD_ROW,
                                     f"{source} row without {'identity' if not ident else 'aligned path'}"
                                     f" (source {r.get('source', '')!r})"))
        elif _bad_name(ident) or _bad_name(rel):
            errors.append(InputError(ident, rel, ERR_BAD_ROW, "tab or newline in the name (breaks the .lst)"))
        else:
            path = os.path.join(base, rel)
            cands.append(_Cand(ident, rel, path, path))
    # One order, whatever the manifest's row order; duplicates packed once.
    cands.sort(key=lambda c: (c.identity, c.rel))
    seen: set = set()
    uniq = []
    for c in cands:
        if c.rel in seen:
            errors.append(InputError(c.identity, c.rel, ERR_DUPLICATE, "listed more than once; packed once"))
            continue
        seen.add(c.rel)
        uniq.append(c)
    return source, [uniq[i:i + 256] for i in range(0, len(uniq), 256)], errors, notes


#: Open crops relative to their identity folder's descriptor (a shorter path walk).
_DIR_FD = os.open in os.supports_dir_fd and os.listdir in os.supports_fd and hasattr(os, "O_DIRECTORY")


def _list_identity(out: str, ident: str, dfd: Optional[int]) -> tuple[list[_Cand], list[InputError]]:
    """The image files of OUT/<ident> (``dfd``: that folder's descriptor, or None)."""
    cands, errors = [], []
    d = out + os.sep + ident  # os.path.join's checks cost more than the listing here
    try:
        names = sorted(os.listdir(d if dfd is None else dfd))
    except OSError as e:
        return [], [InputError(ident, ident + "/", ERR_UNREADABLE, f"cannot list: {e.strerror or e}")]
    prefix = d + os.sep
    for name in names:
        if name[0] == ".":
            continue
        rel = f"{ident}/{name}"
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            if os.path.isdir(prefix + name):
                errors.append(InputError(ident, rel, ERR_UNREADABLE, "sub-folder inside an identity folder"))
            else:
                errors.append(InputError(ident, rel, ERR_NOT_IMAGE,
                                         f"not an image file type ({os.path.splitext(name)[1] or 'no extension'})"))
        elif _bad_name(name):
            errors.append(InputError(ident, rel, ERR_BAD_ROW, "tab or newline in the name (breaks the .lst)"))
        else:  # a folder named *.jpg fails when read
            cands.append(_Cand(ident, rel, prefix + name, prefix + name if dfd is None else name))
    if not cands:
        errors.append(InputError(ident, ident + "/", ERR_EMPTY_IDENTITY, "identity folder has no image files"))
    return cands, errors


def _read_checked(cands: Sequence[_Cand], dfd: Optional[int], good: list, errors: list, size: int,
                  resize: bool, quality: int, check: _SizeCheck) -> None:
    """Read every candidate: a complete JPEG of the target size goes to ``good`` as it
    is (the fast path, inlined); anything else is classified by ``_load``."""
    for c in cands:
        try:
            fd = os.open(c.name, _O_RDONLY, dir_fd=dfd)
            try:
                data = os.read(fd, 65536)
            finally:
                os.close(fd)
        except OSError:
            data = b""
        if len(data) < 65536 and data.endswith(b"\xff\xd9") and check(data):
            good.append(_Good(c.identity, c.rel, data, True))
            continue
        data, as_is, err = _load(c.identity, c.rel, c.path, size, resize, quality)
        if err is None:
            good.append(_Good(c.identity, c.rel, data, as_is))
        else:
            errors.append(err)


def _work(unit, out: str, size: int, resize: bool, quality: int,
          check: _SizeCheck) -> tuple[list, list[InputError], list[str]]:
    """Read and check one unit: (good crops as _Good, problems, identities listed)."""
    good: list[_Good] = []
    errors: list[InputError] = []
    if not isinstance(unit, tuple):  # manifest rows
        _read_checked(unit, None, good, errors, size, resize, quality, check)
        return good, errors, sorted({c.identity for c in unit})
    files = 0
    for i, ident in enumerate(unit):  # identity folder names
        dfd = None
        # Listing through a descriptor costs five more system calls per folder and
        # opening by name saves a little on every file: worth it for folders of
        # several crops (judged on this unit's folders so far), not for LFW's one or two.
        if _DIR_FD and files >= 4 * i:
            try:
                dfd = os.open(out + os.sep + ident, _O_RDONLY | os.O_DIRECTORY)
            except OSError:
                pass  # listing by path reports why
        try:
            cands, errs = _list_identity(out, ident, dfd)
            files += len(cands)
            errors += errs
            _read_checked(cands, dfd, good, errors, size, resize, quality, check)
        finally:
            if dfd is not None:
                os.close(dfd)
    return good, errors, list(unit)


def _ordered_map(fn, units: Iterable, threads: int) -> Iterable:
    """fn over units in order; with threads > 1 a bounded window of units is read
    ahead in worker threads (file reads release the GIL)."""
    if threads <= 1:
        yield from map(fn, units)
        return
    from collections import deque

    with ThreadPoolExecutor(max_workers=threads) as ex:
        window: deque = deque()
        it = iter(units)
        for u in it:
            window.append(ex.submit(fn, u))
            if len(window) >= 4 * threads:
                break
        for u in it:
            yield window.popleft().result()
            window.append(ex.submit(fn, u))
        while window:
            yield window.popleft().result()


# ----------------------------------------------------------------------------- pack
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


class _RecSink:
    """Writes records in their final order into DEST's temporary train.rec, and the
    matching lines into the temporary train.idx and train.lst (nothing accumulates in
    memory). Images get keys first_key, first_key+1, ...; in the insightface layout
    key 0 is the header (its label is known only at the end, so a fixed-size
    placeholder is written first and overwritten in place) and the identity records
    follow the images."""

    def __init__(self, dest: Path, layout: str, on_record: Optional[Callable[[int], None]], bar) -> None:
        self.layout = layout
        self.f = open(_tmp(dest, REC_NAME), "wb", buffering=0)
        self.w = RecordWriter(self.f)
        self.idx = open(_tmp(dest, IDX_NAME), "w", encoding="utf-8", newline="\n", buffering=1 << 20)
        self.lst = open(_tmp(dest, LST_NAME), "w", encoding="utf-8", newline="\n", buffering=1 << 20)
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
            self.first_key = self.key = 1

    def images(self, items: Sequence[tuple[float, _Good]]) -> None:
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
                off = self.w.write(pack_header([float(start), float(start + n)], self.key, 0))
                self.idx.write(f"{self.key}\t{off}\n")
                self.key += 1
                start += n
            self.w.flush()
            header = frame(pack_header([float(n_img + 1), float(self.key)]))
            if len(header) != self._header_len:  # cannot happen for positive counts
                raise PackError("internal error: header record changed size")
            os.pwrite(self.f.fileno(), header, 0)
        self.w.flush()
        self._writeback(last=True)
        for f in (self.idx, self.lst):
            f.flush()
            if self._start_writeback is not None:
                self._start_writeback(f.fileno(), 0, 0)  # 0 bytes: to the end of the file
        return self.w.offset

    def fsync(self) -> None:
        for f in (self.f, self.idx, self.lst):
            os.fsync(f.fileno())

    def close(self) -> None:
        for f in (self.f, self.idx, self.lst):
            f.close()


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
        self.errors.append(InputError(ident, ident + "/", ERR_BELOW_MIN,
                                      f"{n} image(s) < --min-images {min_images}; identity not packed"))
        self.dropped_ids += 1
        self.dropped_imgs += n


def _pack_in_order(units: list, work: Callable, sink: _RecSink, min_images: int, threads: int) -> _Tally:
    """Records in reading order (identities sorted, then files): each identity is
    written as soon as all of it has been read and checked."""
    t = _Tally()
    by_id: dict[str, list[_Good]] = {}  # checked crops of identities still open
    pending: list[tuple[float, _Good]] = []

    def close_identity(ident: str) -> None:
        goods = by_id.pop(ident)
        if len(goods) < min_images:
            t.below_min(ident, len(goods), min_images)
            return
        lab = float(len(t.counts))
        t.counts[ident] = len(goods)
        sink.classes.append((ident, len(goods)))
        pending.extend([(lab, g) for g in goods])

    for unit, (good, errs, ids) in zip(units, _ordered_map(work, units, threads)):
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


def _pack_shuffled(units: list, work: Callable, new_sink: Callable[[int], _RecSink], out: str, layout: str,
                   seed: int, min_images: int, threads: int) -> tuple[_Tally, _RecSink]:
    """Records in shuffled order, written as they are read. Every crop is listed
    first; the packed identities (hence the labels) are predicted from the listing,
    the listed crops of those identities are shuffled, then read, checked and written
    in that order (the crops of identities that are not packed are read and checked
    too, for their problems). When a failed crop changes which identities are packed,
    the prediction is made again from what was read and the file rewritten (at most
    twice more; only unreadable inputs cost this).

    The listing is held compactly (each crop's relative path, and 4 + 8 bytes of
    indices): about 0.1 KB per crop."""
    rels: list[str] = []  # every listed crop, identity-major, sorted
    owner = array("i")  # rels[k] belongs to idents[owner[k]]
    idents: list[str] = []  # identities with at least one listed crop
    first: list[int] = []  # idents[i]'s crops are rels[first[i]:first[i + 1]]
    list_errors: list[InputError] = []
    listed: set = set()

    def add(ident: str, cands: Sequence[_Cand]) -> None:
        if not idents or idents[-1] != ident:
            idents.append(ident)
            first.append(len(rels))
        rels.extend(c.rel for c in cands)
        owner.extend([len(idents) - 1] * len(cands))

    for unit in units:
        if isinstance(unit, tuple):  # identity folder names
            for ident in unit:
                c, e = _list_identity(out, ident, None)
                list_errors += e
                listed.add(ident)
                if c:
                    add(ident, c)
        else:
            for c in unit:
                add(c.identity, [c])
                listed.add(c.identity)
    first.append(len(rels))
    count = [first[i + 1] - first[i] for i in range(len(idents))]

    # Folder crops and align's manifest rows are relative to OUT; a hand-written
    # manifest may hold absolute paths, which os.path.join keeps as they are.
    prefix = os.path.join(out, "")
    plain_join = all(not os.path.isabs(r) for r in rels) if units and not isinstance(units[0], tuple) else True

    def read(indices: Sequence[int]) -> Iterable:
        """(good, errors) per chunk of 256 crops, in the order given."""
        def cands(lo: int) -> list[_Cand]:
            out_ = []
            for k in indices[lo:lo + 256]:
                rel = rels[k]
                path = prefix + rel if plain_join else os.path.join(out, rel)
                out_.append(_Cand(idents[owner[k]], rel, path, path))
            return out_
        chunks = (cands(lo) for lo in range(0, len(indices), 256))  # made as they are read
        for good, errs, _ in _ordered_map(work, chunks, threads):
            yield good, errs

    predicted = [i for i in range(len(idents)) if count[i] >= min_images]
    for _attempt in range(3):
        t = _Tally(errors=list(list_errors), listed=set(listed))
        labels = {idents[i]: float(k) for k, i in enumerate(predicted)}
        rng = random.Random(seed)
        if layout == LAYOUT_PLAIN:
            order = array("q")
            for i in predicted:
                order.extend(range(first[i], first[i + 1]))
            rng.shuffle(order)
        else:  # grouped by class: shuffled within each class
            order = array("q")
            for i in predicted:
                block = array("q", range(first[i], first[i + 1]))
                rng.shuffle(block)
                order.extend(block)
        chosen = set(predicted)
        others = array("q")
        for i in range(len(idents)):
            if i not in chosen:
                others.extend(range(first[i], first[i + 1]))
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


def pack(out: os.PathLike | str, dest: os.PathLike | str, *, layout: str = LAYOUT_PLAIN, shuffle: bool = True,
         seed: int = 0, min_images: int = 1, size: Optional[int] = None, resize: bool = False,
         strict: bool = False, quality: int = JPEG_QUALITY, threads: int = 1, fsync: bool = True,
         show_progress: bool = False, on_record: Optional[Callable[[int], None]] = None) -> PackResult:
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
    reading, writing and the final fsync overlap."""
    from functools import partial

    from facecurate.files import progress

    if layout not in (LAYOUT_PLAIN, LAYOUT_INSIGHTFACE):
        raise ValueError(f"layout must be {LAYOUT_PLAIN!r} or {LAYOUT_INSIGHTFACE!r}")
    out, dest = Path(out), Path(dest)
    size = _target_size(out, size)
    source, units, errors, notes = _collect(out, dest)
    work = partial(_work, out=str(out), size=size, resize=resize, quality=quality, check=_SizeCheck(size))

    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    for name in ALL_FILES:  # left by a killed run
        _tmp(dest, name).unlink(missing_ok=True)
    sink: Optional[_RecSink] = None
    done = False
    bar = progress(total=None, desc="pack", unit="img", disable=None if show_progress else True)
    try:
        def new_sink(total: Optional[int] = None) -> _RecSink:
            nonlocal sink
            if total is not None:
                bar.reset(total=total)
            sink = _RecSink(dest, layout, on_record, bar)
            return sink

        if shuffle:
            tally, sink = _pack_shuffled(units, work, new_sink, str(out), layout, seed, min_images, threads)
        else:
            tally = _pack_in_order(units, work, new_sink(), min_images, threads)
        bar.close()
        errors += tally.errors
        counts = tally.counts
        had_no_files = {e.identity for e in errors if e.reason == ERR_EMPTY_IDENTITY}
        for ident in sorted(tally.listed - tally.with_crops - had_no_files):
            errors.append(InputError(ident, ident + "/", ERR_EMPTY_IDENTITY,
                                     "no usable crop: every crop listed for it failed (see its rows)"))
        errors.sort(key=lambda e: (e.identity, e.path, e.reason))
        if strict and errors:
            raise PackError(f"{len(errors)} input problem(s) and --strict: nothing written "
                            f"(first: {errors[0].path}: {errors[0].reason}: {errors[0].message})",
                            errors, _failure_summary(dest, source, size, errors, None))
        if not counts:
            errors_file = _write_errors(dest, errors) if errors else None
            first = next((e for e in errors if not e.path.endswith("/")), errors[0]) if errors else None
            raise PackError(f"nothing to pack in {out} ({source}): no usable crops"
                            + (f"; {len(errors)} input problem(s), e.g. {first.path}: {first.reason}: "
                               f"{first.message} (all in {errors_file})" if first else ""),
                            errors, _failure_summary(dest, source, size, errors, errors_file))
        identities = list(counts)
        labels = {ident: i for i, ident in enumerate(identities)}
        n_img = sum(counts.values())
        rec_bytes = sink.finish()
        texts = {
            PROPERTY_NAME: f"{len(identities)},{size},{size}\n",
            LABELS_CSV: csv_text(LABELS_COLUMNS, [(i, labels[i], counts[i]) for i in identities]),
            PACK_ERRORS_CSV: csv_text(PACK_ERROR_COLUMNS, [(e.identity, e.path, e.reason, e.message) for e in errors]),
        }
        result = PackResult(dest=dest, source=source, layout=layout, size=size, images=n_img,
                            classes=len(identities), stored_as_is=sink.stored_as_is,
                            reencoded=n_img - sink.stored_as_is, rec_bytes=rec_bytes, shuffle=shuffle, seed=seed,
                            min_images=min_images, dropped_identities=tally.dropped_ids,
                            dropped_images=tally.dropped_imgs,
                            errors=errors, notes=notes)
        meta = {k: v for k, v in result.summary().items() if k not in ("dest", "errors_file")}
        meta["files"] = [REC_NAME, IDX_NAME, LST_NAME, PROPERTY_NAME, LABELS_CSV, PACK_ERRORS_CSV]
        meta["lst_format"] = "im2rec: index<TAB>label<TAB>path (path relative to OUT)"
        texts[PACK_META] = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        start_writeback = _writeback_starter() if fsync else None
        small = []
        try:
            for name, text in texts.items():
                f = open(_tmp(dest, name), "w", encoding="utf-8", newline="\n")
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
        # Everything is complete on disk: move it into place (pack.json last).
        for name in ALL_FILES:
            os.replace(_tmp(dest, name), dest / name)
        if fsync:
            _fsync_dir(dest)
        done = True
    finally:
        bar.close()
        if sink is not None:
            sink.close()
        for name in ALL_FILES:
            _tmp(dest, name).unlink(missing_ok=True)
        if not done and created:  # a DEST this failed run made: leave no empty folder behind
            try:
                dest.rmdir()
            except OSError:
                pass
    return result


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


# ----------------------------------------------------------------------------- inspect
def rec_paths(path: os.PathLike | str) -> tuple[Path, Path]:
    """(.rec, .idx) for ``DEST/train``, ``DEST`` (a folder holding train.rec), a .rec
    or a .idx path."""
    p = Path(path)
    if p.is_dir():
        p = p / REC_NAME
    if p.suffix in (".rec", ".idx"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".rec"), p.with_name(p.name + ".idx")


def _read_property(folder: Path) -> Optional[tuple[int, ...]]:
    p = folder / PROPERTY_NAME
    if not p.exists():
        return None
    try:
        return tuple(int(x) for x in p.read_text().strip().split(","))
    except ValueError:
        return ()


def inspect(path: os.PathLike | str, *, full: bool = False, sample: int = 64,
            show_progress: bool = False) -> InspectResult:
    """Validate a .rec/.idx record by record and describe it (see :class:`InspectResult`).
    Never raises for a corrupt file: problems are in ``result.errors``. Memory stays
    a few dozen bytes per record (numpy arrays), so public datasets of millions of
    images can be inspected."""
    import cv2
    import numpy as np
    from array import array

    from facecurate.files import progress

    rec_path, idx_path = rec_paths(path)
    res = InspectResult(path=rec_path)
    if not rec_path.exists():
        res.errors.append(f"{rec_path} does not exist")
        return res
    size = rec_path.stat().st_size
    idx_keys = idx_offs = None
    if idx_path.exists():
        try:
            idx_keys, idx_offs = read_idx_arrays(idx_path)
        except RecordIOError as e:
            res.errors.append(f"{idx_path.name}: {e}")
    else:
        res.warnings.append(f"no {idx_path.name}: keys taken as record positions (MXNet's indexed reader needs it)")
    # offset -> key, for naming records in messages
    if idx_offs is not None:
        by_off = np.argsort(idx_offs, kind="stable")
        sorted_offs = idx_offs[by_off]

    def key_at(offset: Optional[int]) -> Optional[int]:
        if idx_offs is None or offset is None:
            return None
        i = int(np.searchsorted(sorted_offs, offset))
        return int(idx_keys[by_off[i]]) if i < sorted_offs.size and sorted_offs[i] == offset else None

    # Pass over the file: framing, IRHeaders, JPEG completeness (and decoding with --full).
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
                try:
                    h, img = unpack_record(r.payload)
                except RecordIOError as e:
                    res.errors.append(str(RecordIOError(e.message, r.offset, n, key_at(r.offset))))
                    flags.append(-1), lab0.append(nan), lab1.append(nan), imglen.append(0)
                    continue
                flags.append(h.flag)
                if h.flag > 0:
                    lab0.append(h.label[0])
                    lab1.append(h.label[1] if h.flag > 1 else nan)
                else:
                    lab0.append(h.label)
                    lab1.append(nan)
                imglen.append(len(img))
                if img:
                    kind = image_kind(img)
                    if kind == "jpg" and not jpeg_complete(img):
                        res.errors.append(str(RecordIOError("JPEG has no end-of-image marker (truncated or corrupt "
                                                            "image bytes)", r.offset, n, key_at(r.offset))))
                    elif not kind and len(res.warnings) < 50:
                        res.warnings.append(str(RecordIOError("image bytes are neither JPEG nor PNG", r.offset, n,
                                                              key_at(r.offset))))
                    if full:
                        a = cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_COLOR)
                        if a is None:
                            res.errors.append(str(RecordIOError("image does not decode", r.offset, n,
                                                                key_at(r.offset))))
                        else:
                            shapes.add(tuple(a.shape))
                            res.decoded += 1
                if r.offset - last > (8 << 20):
                    bar.update(r.offset - last)
                    last = r.offset
        except RecordIOError as e:
            e.key = key_at(e.offset)
            res.errors.append(str(e))
            framing_error_at = e.offset if e.offset is not None else 0
    bar.close()
    res.records = len(offsets)
    if bad_pad:
        res.errors.append(f"{bad_pad} record(s) with non-zero padding bytes (corrupt length or data)")
    offs = np.frombuffer(offsets, dtype=np.int64) if offsets else np.zeros(0, np.int64)
    flags_a = np.frombuffer(flags, dtype=np.int64) if flags else np.zeros(0, np.int64)
    lab0_a = np.frombuffer(lab0, dtype=np.float64) if lab0 else np.zeros(0)
    lab1_a = np.frombuffer(lab1, dtype=np.float64) if lab1 else np.zeros(0)
    imglen_a = np.frombuffer(imglen, dtype=np.int64) if imglen else np.zeros(0, np.int64)

    # The .idx must point at record starts; keys -> record positions.
    if idx_keys is None:
        keys = np.arange(offs.size, dtype=np.int64)
        pos = keys.copy()
    else:
        uk, first_seen = np.unique(idx_keys, return_index=True)
        if uk.size != idx_keys.size:
            dup = np.setdiff1d(np.arange(idx_keys.size), first_seen)
            res.errors.append(f"{idx_path.name}: {dup.size} duplicate key(s) (first: key {int(idx_keys[dup[0]])})")
        p = np.searchsorted(offs, idx_offs)
        hit = (p < offs.size) & (offs[np.minimum(p, max(offs.size - 1, 0))] == idx_offs) if offs.size else \
            np.zeros(idx_offs.size, bool)
        miss = np.flatnonzero(~hit)
        if framing_error_at is not None:
            miss = miss[idx_offs[miss] < framing_error_at]  # beyond the corrupt point: already reported
        for i in miss[:10]:
            o = int(idx_offs[i])
            res.errors.append(f"{idx_path.name}: key {int(idx_keys[i])} offset {o} is not the start of a record"
                              + (" (past the end of the .rec)" if o >= size else ""))
        if miss.size > 10:
            res.errors.append(f"{idx_path.name}: {miss.size} keys in total point at no record start")
        keys, pos = idx_keys[hit], p[hit]
        if framing_error_at is None:
            unindexed = offs.size - np.unique(pos).size
            if unindexed > 0:
                res.warnings.append(f"{unindexed} record(s) are not in the .idx (invisible to MXNet's indexed reader)")
    if framing_error_at is not None:
        # Counts, labels and layout of a file that cannot be read to its end would mislead.
        res.warnings.append(f"framing broken at offset {framing_error_at}: layout, labels and counts not checked "
                            f"({offs.size} records read before it)")
        return res
    if not offs.size:
        res.errors.append("no records" if not res.errors else "no readable records")
        return res
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
        return res
    p0 = int(p0[0])

    # Layout, as MXFaceDataset decides it.
    if flags_a[p0] >= 2 and imglen_a[p0] == 0:
        res.layout = LAYOUT_HEADER
        first, end = lab0_a[p0], lab1_a[p0]
        if not (np.isfinite(first) and np.isfinite(end)) or first != int(first) or end != int(end) \
                or not 1 <= first <= end:
            res.errors.append(f"key 0: header label [{first}, {end}] is not a valid [first_identity_key, end]")
            return res
        first, end = int(first), int(end)
        img_pos, ok = positions(np.arange(1, first, dtype=np.int64))
        id_keys = np.arange(first, end, dtype=np.int64)
        id_pos, ok_id = positions(id_keys)
        res.identity_records = int(id_keys.size)
        missing = int((~ok).sum() + (~ok_id).sum())
        if missing:
            res.errors.append(f"{missing} key(s) named by the header are missing from the .idx")
        image_keys = np.arange(1, first, dtype=np.int64)[ok]
        img_pos, id_pos, id_keys = img_pos[ok], id_pos[ok_id], id_keys[ok_id]
    else:
        res.layout = LAYOUT_PLAIN
        image_keys, img_pos = skeys, spos
        id_pos = id_keys = np.zeros(0, np.int64)
    res.images = int(image_keys.size)

    # Labels: integral, >= 0, 0..C-1 with every class present.
    labs = lab0_a[img_pos]
    res.vector_labels = int((flags_a[img_pos] > 0).sum())
    empty = np.flatnonzero(imglen_a[img_pos] == 0)
    if empty.size:
        res.errors.append(f"{empty.size} image record(s) have no image bytes (first: key {int(image_keys[empty[0]])})")
    if labs.size:
        bad = np.flatnonzero(~np.isfinite(labs) | (labs != np.round(labs)) | (labs < 0))
        if bad.size:
            res.errors.append(f"{bad.size} image label(s) are not integers >= 0 (first: key "
                              f"{int(image_keys[bad[0]])}, label {labs[bad[0]]})")
        il = labs[np.isfinite(labs)].astype(np.int64)
        uniq = np.unique(il)
        res.classes = int(uniq.size)
        if il.size:
            res.label_min, res.label_max = int(il.min()), int(il.max())
            if res.label_min != 0 or res.label_max != res.classes - 1:
                res.errors.append(f"labels are not contiguous 0..C-1: {res.classes} classes span {res.label_min}.."
                                  f"{res.label_max} (partial-FC silently ignores out-of-range labels)")
            runs = int(np.count_nonzero(il[1:] != il[:-1])) + 1
            res.grouped_by_class = runs == res.classes
    if res.layout == LAYOUT_HEADER:
        if not res.grouped_by_class:
            res.errors.append("insightface layout but the images of a class are not contiguous in key order")
        a, b = lab0_a[id_pos], lab1_a[id_pos]
        ends_ok = flags_a[id_pos] >= 2
        expect = np.concatenate([[1.0], b[:-1]]) if b.size else b
        bad = np.flatnonzero(~ends_ok | (a != expect) | ~(b > a) | (b > first))
        if bad.size:
            i = int(bad[0])
            res.errors.append(f"key {int(id_keys[i])}: identity record range [{a[i]}, {b[i]}) does not continue at "
                              f"{expect[i]} (classes must be contiguous)")
        elif b.size and b[-1] != first:
            res.errors.append(f"identity records cover keys 1..{int(b[-1]) - 1}, images are 1..{first - 1}")
        elif labs.size and res.grouped_by_class:
            # every identity record's range holds exactly one label
            starts = (a - 1).astype(np.int64)
            if np.any(labs[starts] != labs[(b - 2).astype(np.int64)]):
                res.errors.append("an identity record's range holds several labels")
    res.dali_compatible = bool(res.layout == LAYOUT_PLAIN and not np.any(flags_a[spos] != 0))

    # Decode a sample (everything was decoded already with --full).
    if not full and image_keys.size and sample > 0:
        n = min(sample, int(image_keys.size))
        pick = sorted({int(i * image_keys.size // n) for i in range(n)})
        with open(rec_path, "rb") as f:
            for i in pick:
                k = int(image_keys[i])
                try:
                    _, img = unpack_record(read_record(f, int(offs[img_pos[i]]), key=k).payload)
                except RecordIOError as e:
                    res.errors.append(str(e))
                    continue
                a = cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_COLOR) if img else None
                if a is None:
                    res.errors.append(f"key {k}: image does not decode")
                else:
                    shapes.add(tuple(a.shape))
                    res.decoded += 1
    res.shapes = sorted(shapes)

    prop = _read_property(rec_path.parent) if rec_path.name == REC_NAME else None
    if prop is not None:
        res.property_line = ",".join(map(str, prop))
        if len(prop) != 3:
            res.errors.append(f"property file must be one line 'num_classes,H,W', got {res.property_line!r}")
        else:
            if prop[0] != res.classes:
                res.errors.append(f"property says {prop[0]} classes, the .rec has {res.classes}")
            hw = {s[:2] for s in res.shapes}
            if hw and hw != {(prop[1], prop[2])}:
                res.errors.append(f"property says {prop[1]}x{prop[2]}, decoded images are "
                                  + ", ".join(f"{h}x{w}" for h, w in sorted(hw)))
    return res


# ----------------------------------------------------------------------------- unpack
def _label_names(rec_path: Path) -> Optional[dict[int, str]]:
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


def _safe_name(name: str) -> bool:
    """A labels.csv identity usable as one folder name (no path tricks)."""
    return bool(name) and name not in (".", "..") and not name.startswith(".") and "/" not in name \
        and "\\" not in name and "\0" not in name


def unpack(rec: os.PathLike | str, dest: os.PathLike | str, *, names: bool = True,
           show_progress: bool = False) -> UnpackResult:
    """Write every image of a .rec to ``dest/<identity or label>/<key>.jpg``.

    Folder names come from ``labels.csv`` beside the .rec when present (and
    ``names``), else the label zero-padded to a common width; file names are the key
    zero-padded to at least 8 digits, so name order is key order. Streams the .rec
    once; files are written under a temporary name and renamed, and files already
    present are kept, so an interrupted unpack continues where it stopped."""
    from facecurate.files import progress

    rec_path, idx_path = rec_paths(rec)
    dest = Path(dest)
    res = UnpackResult(dest=dest)
    if not rec_path.exists():
        raise FileNotFoundError(f"{rec_path} does not exist")
    import numpy as np

    if idx_path.exists():
        keys, offs = read_idx_arrays(idx_path)
        srt = np.argsort(offs, kind="stable")
        s_offs, s_keys = offs[srt].tolist(), keys[srt].tolist()
        hit0 = np.flatnonzero(keys == 0)
        off0 = int(offs[hit0[0]]) if hit0.size else None
        max_key = int(keys.max()) if keys.size else 0
    else:
        s_offs = s_keys = None
        off0, max_key = 0, 0
    label_names = _label_names(rec_path) if names else None
    res.names = LABELS_CSV if label_names else "label"
    size = rec_path.stat().st_size

    with open(rec_path, "rb", buffering=1 << 20) as f:
        # Which keys are images (MXFaceDataset's rule)?
        first = first_end = None
        if off0 is not None and size:
            h0, img0 = unpack_record(read_record(f, off0, key=0).payload)
            if h0.flag >= 2 and not img0:
                first = int(h0.label[0])
                first_end = (h0.label[0], h0.label[1])
        width = max(8, len(str(max_key)))
        made: set = set()
        labels_seen: set = set()
        # Label folders are zero-padded so that name order is label order (re-pack
        # gives the same labels); the width must not change between runs (resume).
        prop = _read_property(rec_path.parent) if rec_path.name == REC_NAME else None
        n_classes = prop[0] if prop and len(prop) == 3 else (
            int(first_end[1] - first_end[0]) if first_end else 0)
        pad = max(6, len(str(max(n_classes - 1, 0))))
        bar = progress(total=size, desc="unpack", unit="B", disable=None if show_progress else True)
        j = 0
        last = 0
        for n, r in enumerate(iter_records(f, 0, size)):
            if s_offs is not None:
                while j < len(s_offs) and s_offs[j] < r.offset:
                    j += 1
                if j >= len(s_offs) or s_offs[j] != r.offset:
                    continue  # not indexed: invisible to MXNet too
                key = s_keys[j]
            else:
                key = n
            if first is not None and not (1 <= key < first):
                continue  # header or identity record
            try:
                h, img = unpack_record(r.payload)
            except RecordIOError as e:
                res.errors.append(f"key {key}: {e.message}")
                continue
            lab = h.scalar_label
            if not img or lab != lab or lab < 0 or lab != int(lab):
                res.errors.append(f"key {key}: " + ("no image bytes" if not img else f"label {lab} is not an integer >= 0"))
                continue
            lab = int(lab)
            kind = image_kind(img)
            if not kind:
                res.errors.append(f"key {key}: image bytes are neither JPEG nor PNG; not written")
                continue
            if label_names is not None and lab in label_names and _safe_name(label_names[lab]):
                folder = label_names[lab]
            else:
                folder = str(lab).zfill(pad)
            labels_seen.add(lab)
            d = dest / folder
            if folder not in made:
                d.mkdir(parents=True, exist_ok=True)
                made.add(folder)
            target = d / f"{str(key).zfill(width)}.{kind}"
            if target.exists():
                res.existing += 1
            else:
                tmp = d / f".{target.name}.{os.getpid()}.tmp"
                with open(tmp, "wb") as g:
                    g.write(img)
                os.replace(tmp, target)
                res.written += 1
            if r.offset - last > (8 << 20):
                bar.update(r.offset - last)
                last = r.offset
        bar.close()
    res.classes = len(labels_seen)
    return res


# ----------------------------------------------------------------------------- pack-pairs
def _read_pairs(path: Path) -> list[tuple[int, str, Optional[tuple]]]:
    """(line number, text, parsed) for every pair line; parsed is
    ((name1, i1), (name2, i2), same) or None when the line is malformed."""
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        t = line.split()
        if not t:
            continue
        if n == 1 and len(t) <= 2 and all(x.isdigit() for x in t):
            continue  # "10 300" header
        try:
            if len(t) == 3:
                out.append((n, line, ((t[0], int(t[1])), (t[0], int(t[2])), True)))
            elif len(t) == 4:
                out.append((n, line, ((t[0], int(t[1])), (t[2], int(t[3])), False)))
            else:
                raise ValueError
        except ValueError:
            out.append((n, line, None))
    return out


def pack_pairs(pairs: os.PathLike | str, root: os.PathLike | str, dest: os.PathLike | str, *,
               strict: bool = False) -> PairsResult:
    """Write ``dest`` = pickle of ``(bins, issame_list)`` like insightface's lfw.bin.

    ``pairs``: LFW-style file (optional ``10 300`` first line; ``name i j`` for the
    same person, ``name1 i name2 j`` for different people). ``root``: a folder of
    ``<Name>/<Name>_NNNN.<ext>`` crops, or an align OUT folder (with align.csv), where
    photo ``<Name>/<Name>_NNNN.jpg`` maps to its primary crop. Pairs that cannot be
    resolved are left out and reported (``strict``: raise instead)."""
    import pickle

    import cv2
    import numpy as np

    pairs, root, dest = Path(pairs), Path(root), Path(dest)
    res = PairsResult(dest=dest)
    crop_of: Optional[dict[str, str]] = None
    if (root / ALIGN_MANIFEST).exists():
        crop_of = {}
        for r in read_csv(root / ALIGN_MANIFEST):
            if r.get("status") == STATUS_OK and str(r.get("primary", "")).strip() == "1" and r.get("aligned"):
                crop_of[r["source"]] = r["aligned"]
    cache: dict[tuple, tuple[Optional[bytes], str]] = {}

    def resolve(name: str, i: int) -> tuple[Optional[bytes], str]:
        if (name, i) in cache:
            return cache[(name, i)]
        stem = f"{name}/{name}_{i:04d}"
        path = None
        if crop_of is not None:
            rel = crop_of.get(stem + ".jpg")
            if rel is None:
                rel = next((crop_of[stem + e] for e in IMAGE_EXTENSIONS if stem + e in crop_of), None)
            if rel is None:
                out = (None, f"{stem}.jpg: no primary crop in {ALIGN_MANIFEST}")
            else:
                path = root / rel
        else:
            path = next((root / (stem + e) for e in IMAGE_EXTENSIONS if (root / (stem + e)).exists()), None)
            if path is None:
                out = (None, f"{stem}.jpg: not found (nor another image extension)")
        if path is not None:
            try:
                data = path.read_bytes()
            except OSError as e:
                data, out = None, (None, f"{stem}: cannot read {path.name}: {e.strerror or e}")
            if data is not None:
                a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
                out = (data, tuple(a.shape)) if a is not None else (None, f"{stem}: {path.name} is not a decodable image")
        cache[(name, i)] = out
        return out

    bins: list[bytes] = []
    issame: list[bool] = []
    shapes: set = set()
    for n, line, parsed in _read_pairs(pairs):
        if parsed is None:
            res.unresolved.append(f"line {n}: not 'name i j' or 'name1 i name2 j': {line.strip()!r}")
            continue
        (a, ia), (b, ib), same = parsed
        ra, rb = resolve(a, ia), resolve(b, ib)
        if ra[0] is None or rb[0] is None:
            res.unresolved.append(f"line {n}: " + "; ".join(r[1] for r in (ra, rb) if r[0] is None))
            continue
        bins += [ra[0], rb[0]]
        issame.append(same)
        shapes.update((ra[1], rb[1]))
    if strict and res.unresolved:
        raise PackError(f"{len(res.unresolved)} pair(s) cannot be resolved and --strict (first: {res.unresolved[0]})")
    if not issame:
        raise PackError(f"no pair of {pairs} could be resolved under {root}"
                        + (f" (first problem: {res.unresolved[0]})" if res.unresolved else ""))
    write_bytes_atomic(dest, pickle.dumps((bins, issame), protocol=4))
    report = dest.with_name(dest.name + ".unresolved.txt")
    if res.unresolved:
        write_bytes_atomic(report, ("\n".join(res.unresolved) + "\n").encode("utf-8"))
    elif report.exists():
        report.unlink()
    res.pairs = len(issame)
    res.same = sum(issame)
    res.different = res.pairs - res.same
    res.shapes = sorted(shapes)
    return res
