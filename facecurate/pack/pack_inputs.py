"""pack's input side: what to read (clean.csv, align.csv or a folder of crops), and
reading and checking each crop (exists, readable, a regular file of at most
``--max-bytes``, an image, the target size). A complete JPEG of the target size is
taken as it is, byte for byte; anything else is decoded and encoded once. In a folder
of crops, FIFOs, sockets and devices are never opened, and symlinks are followed only
while they stay inside the folder (:mod:`facecurate.common.filetree`'s rules; ``ReadRule``).
Problems become :class:`InputError` rows of pack_errors.csv, never exceptions;
:mod:`facecurate.pack.packer` writes what passes."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence

from facecurate.common.constants import (
    ALIGN_MANIFEST,
    ARCFACE_BASE_SIZE,
    CLEAN_CSV,
    DECISION_KEEP,
    IMAGE_EXTENSIONS,
    MAX_INPUT_BYTES,
    NOT_REGULAR,
    PACK_BAD_ROW,
    PACK_BELOW_MIN,
    PACK_DUPLICATE,
    PACK_EMPTY_IDENTITY,
    PACK_MISSING,
    PACK_NOT_IMAGE,
    PACK_TOO_LARGE,
    PACK_UNREADABLE,
    PACK_UNSUPPORTED,
    PACK_WRONG_SIZE,
    STATUS_TOO_LARGE,
)
from facecurate.common.filetree import OPEN_FLAGS, FileProblem, inside, link_problem, read_regular, special_kind
from facecurate.common.manifests import AlignRow, CleanRow
from facecurate.common.workspace import Workspace
from facecurate.common.imageio import JPEG_EOI, JPEG_SOI, jpeg_complete, jpeg_sof, jpeg_size

class PackError(Exception):
    """pack could not produce DEST (nothing usable, --strict with input errors, ...);
    DEST is left as it was, except that a pack with no usable crop writes
    DEST/pack_errors.csv to say why. ``errors``: the input problems found;
    ``summary``: what the CLI prints under --json."""

    def __init__(self, message: str, errors: Sequence["InputError"] = (), summary: Optional[dict] = None):
        super().__init__(message)
        self.errors = list(errors)
        self.summary = summary


@dataclass(frozen=True)
class InputError:
    identity: str
    path: str
    reason: str
    message: str


def strict_problems(errors: list[InputError]) -> list[InputError]:
    """What ``--strict`` fails on: every input problem, not the identities that
    ``--min-images`` leaves out on purpose (they are still listed in pack_errors.csv)."""
    return [e for e in errors if e.reason != PACK_BELOW_MIN]


class SizeCheck:
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


class ReadRule(NamedTuple):
    """What pack reads: files of at most ``max_bytes``; in a crop folder, symlinks whose
    real path stays under ``boundary`` (the folder's real path), or any with
    ``follow_external`` (``--follow-external-links``)."""
    max_bytes: int = MAX_INPUT_BYTES
    follow_external: bool = False
    boundary: str = ""

    def link_problem(self, path: str) -> Optional[str]:
        return None if self.follow_external else link_problem(path, self.boundary, "the crop folder")


class Cand(NamedTuple):
    identity: str
    rel: str  # as written to the .lst (relative to OUT, POSIX)
    path: str
    name: str  # what to open: relative to the identity folder's descriptor when there is one, else = path


class Good(NamedTuple):
    identity: str
    rel: str
    data: bytes
    as_is: bool


def _load(identity: str, rel: str, path: str, size: int, resize: bool,
          quality: int, max_bytes: int = MAX_INPUT_BYTES) -> tuple[Optional[bytes], bool, Optional[InputError]]:
    """Read one crop and return (bytes to store, stored-as-is?, error)."""
    def err(reason, msg):
        return None, False, InputError(identity, rel, reason, msg)

    try:
        data = read_regular(path, max_bytes)
    except FileProblem as e:
        return err(PACK_TOO_LARGE if e.status == STATUS_TOO_LARGE else PACK_UNSUPPORTED, e.message)
    except FileNotFoundError:
        return err(PACK_MISSING, "file does not exist")
    except IsADirectoryError:
        return err(PACK_UNREADABLE, "is a directory, not an image file")
    except OSError as e:
        return err(PACK_UNREADABLE, f"cannot read: {e.strerror or e}")
    if not data:
        return err(PACK_NOT_IMAGE, "empty file (0 bytes)")
    # Fast path: a complete JPEG of the target size is stored as it is, undecoded.
    if jpeg_complete(data):
        if jpeg_size(data) == (size, size):
            return data, True, None
    import cv2
    import numpy as np

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        if data[:2] == JPEG_SOI:
            return err(PACK_NOT_IMAGE, "corrupt or truncated JPEG (cannot decode)")
        return err(PACK_NOT_IMAGE, "not an image this tool can decode")
    if data[:2] == JPEG_SOI and not jpeg_complete(data):
        return err(PACK_NOT_IMAGE, "truncated JPEG (no end-of-image marker)")
    h, w = img.shape[:2]
    if (w, h) != (size, size):
        if not resize:
            return err(PACK_WRONG_SIZE, f"{w}x{h}, expected {size}x{size} (use --resize to resize such crops)")
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if w > size else cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        return err(PACK_NOT_IMAGE, "could not encode as JPEG")
    return buf.tobytes(), False, None


# ----------------------------------------------------------------------------- inputs
def target_size(out: Path, size: Optional[int]) -> int:
    if size:
        return int(size)
    return Workspace(out).crop_size() or ARCFACE_BASE_SIZE


def _bad_name(s: str) -> bool:
    return "\t" in s or "\n" in s or "\r" in s


def check_dest(out: Path, dest: Path) -> None:
    """Refuse a DEST pack would write over its inputs with (PackError): OUT itself,
    a folder inside one of OUT's identity folders (or an identity folder itself),
    RAW (as align.json records it) or a folder inside it, or a folder holding RAW."""
    out_r, dest_r = os.path.realpath(out), os.path.realpath(dest)
    if dest_r == out_r:
        raise PackError(f"DEST is OUT itself ({dest}): choose a DEST folder outside OUT's identity folders")
    if inside(dest_r, out_r):
        rel = os.path.relpath(dest_r, out_r).split(os.sep)
        holds_crops = os.path.isdir(dest_r) and any(
            e.name.lower().endswith(IMAGE_EXTENSIONS) for e in os.scandir(dest_r))
        if len(rel) > 1 or holds_crops:
            raise PackError(f"DEST ({dest}) is {'inside ' if len(rel) > 1 else ''}OUT's identity folder {rel[0]!r}: "
                            "choose a DEST folder outside OUT's identity folders")
    raw = Workspace(out).align_meta().get("raw")
    if isinstance(raw, str) and os.path.isabs(raw):
        raw_r = os.path.realpath(raw)
        if dest_r == raw_r:
            raise PackError(f"DEST is RAW itself ({dest}, align's input): choose a DEST folder outside RAW")
        if inside(dest_r, raw_r):
            raise PackError(f"DEST ({dest}) is inside RAW ({raw}, align's input): choose a DEST folder outside RAW")
        if inside(raw_r, dest_r):
            raise PackError(f"DEST ({dest}) holds RAW ({raw}, align's input): choose a DEST folder outside RAW")


def collect_units(out: Path, dest: Path, rule: ReadRule = ReadRule()) -> tuple[str, list, list[InputError], dict]:
    """What to read: (source, work units, problems found while listing, notes). A unit
    is a list of Cand (manifest sources) or a tuple of identity folder names (folder
    source, listed by the worker that reads them)."""
    errors: list[InputError] = []
    notes: dict = {}
    ws = Workspace(out)
    if ws.has(CLEAN_CSV):
        source, rows = CLEAN_CSV, _kept_rows(ws, notes)
    elif ws.has(ALIGN_MANIFEST):
        source = ALIGN_MANIFEST
        rows = [r for r in ws.align_rows() if r.is_primary_ok]
    else:
        return "folder", _folder_units(out, dest, errors, notes, rule), errors, notes
    return source, _manifest_units(out, source, rows, errors), errors, notes


def _kept_rows(ws: Workspace, notes: dict) -> list[CleanRow]:
    """The ``keep`` rows of clean.csv; the decisions counted in ``notes``."""
    rows = ws.clean_rows()
    decisions: dict = {}
    for r in rows:
        decisions[r.decision] = decisions.get(r.decision, 0) + 1
    notes["clean_decisions"] = dict(sorted(decisions.items()))
    all_ids = {r.identity for r in rows}
    rows = [r for r in rows if r.decision == DECISION_KEEP]
    notes["identities_with_nothing_kept"] = len(all_ids - {r.identity for r in rows})
    return rows


def _folder_units(out: Path, dest: Path, errors: list, notes: dict, rule: ReadRule) -> list[tuple]:
    """OUT/<identity>/ folders, a few per unit (fewer, larger work items); DEST itself
    is skipped when it lies in OUT, and a folder linked from outside OUT is a problem
    (unless ``rule.follow_external``)."""
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
        why = rule.link_problem(e.path) if e.is_symlink() else None
        if why:
            errors.append(InputError(e.name, e.name + "/", PACK_UNSUPPORTED, why))
        elif not e.is_dir():
            ignored += 1
        elif e.name == skip:
            notes["skipped_dest_folder"] = e.name
        elif _bad_name(e.name):
            errors.append(InputError(e.name, e.name + "/", PACK_BAD_ROW, "tab or newline in the name (breaks the .lst)"))
        else:
            units.append(e.name)
    notes["top_level_files_ignored"] = ignored
    return [tuple(units[i:i + 16]) for i in range(0, len(units), 16)]


def _manifest_units(out: Path, source: str, rows: Sequence[AlignRow | CleanRow], errors: list) -> list[list[Cand]]:
    """The crops a manifest lists, in one order whatever the rows' order (identity,
    then path), duplicates once; 256 per unit."""
    cands: list[Cand] = []
    base = str(out)
    for r in rows:
        ident, rel = r.identity, r.aligned.strip()
        if not ident or not rel:
            errors.append(InputError(ident, rel, PACK_BAD_ROW,
                                     f"{source} row without {'identity' if not ident else 'aligned path'}"
                                     f" (source {r.source!r})"))
        elif _bad_name(ident) or _bad_name(rel):
            errors.append(InputError(ident, rel, PACK_BAD_ROW, "tab or newline in the name (breaks the .lst)"))
        else:
            path = os.path.join(base, rel)
            cands.append(Cand(ident, rel, path, path))
    cands.sort(key=lambda c: (c.identity, c.rel))
    seen: set = set()
    uniq = []
    for c in cands:
        if c.rel in seen:
            errors.append(InputError(c.identity, c.rel, PACK_DUPLICATE, "listed more than once; packed once"))
            continue
        seen.add(c.rel)
        uniq.append(c)
    return [uniq[i:i + 256] for i in range(0, len(uniq), 256)]


#: Open crops relative to their identity folder's descriptor (a shorter path walk).
_DIR_FD = os.open in os.supports_dir_fd and os.listdir in os.supports_fd and hasattr(os, "O_DIRECTORY")


def _unusable(path: str, entry: os.DirEntry, rule: ReadRule) -> Optional[tuple[str, str]]:
    """(reason, message) for a link leading out of the folder or a FIFO, socket or
    device, found from the listing (no extra system call for a plain file); None
    when the entry may be read."""
    if entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False):
        return None
    if entry.is_symlink():
        why = rule.link_problem(path)
        if why:
            return PACK_UNSUPPORTED, why
    try:
        kind = special_kind(os.stat(path).st_mode)
    except OSError:
        return None  # a broken link: reading it says why
    return (PACK_UNSUPPORTED, f"{NOT_REGULAR} ({kind})") if kind else None


def list_identity(out: str, ident: str, dfd: Optional[int],
                   rule: ReadRule = ReadRule()) -> tuple[list[Cand], list[InputError]]:
    """The image files of OUT/<ident> (``dfd``: that folder's descriptor, or None)."""
    cands, errors = [], []
    d = out + os.sep + ident  # os.path.join's checks cost more than the listing here
    try:
        with os.scandir(d if dfd is None else dfd) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        return [], [InputError(ident, ident + "/", PACK_UNREADABLE, f"cannot list: {e.strerror or e}")]
    prefix = d + os.sep
    for entry in entries:
        name = entry.name
        if name[0] == ".":
            continue
        rel = f"{ident}/{name}"
        bad = _unusable(prefix + name, entry, rule)
        if bad:
            errors.append(InputError(ident, rel, *bad))
        elif not name.lower().endswith(IMAGE_EXTENSIONS):
            if os.path.isdir(prefix + name):
                errors.append(InputError(ident, rel, PACK_UNREADABLE, "sub-folder inside an identity folder"))
            else:
                errors.append(InputError(ident, rel, PACK_NOT_IMAGE,
                                         f"not an image file type ({os.path.splitext(name)[1] or 'no extension'})"))
        elif _bad_name(name):
            errors.append(InputError(ident, rel, PACK_BAD_ROW, "tab or newline in the name (breaks the .lst)"))
        else:  # a folder named *.jpg fails when read
            cands.append(Cand(ident, rel, prefix + name, prefix + name if dfd is None else name))
    if not cands:
        errors.append(InputError(ident, ident + "/", PACK_EMPTY_IDENTITY, "identity folder has no image files"))
    return cands, errors


def _read_checked(cands: Sequence[Cand], dfd: Optional[int], good: list, errors: list, size: int,
                  resize: bool, quality: int, check: SizeCheck, max_bytes: int = MAX_INPUT_BYTES) -> None:
    """Read every candidate: a complete JPEG of the target size goes to ``good`` as it
    is (the fast path, inlined); anything else is classified by ``_load``."""
    for c in cands:
        try:
            fd = os.open(c.name, OPEN_FLAGS, dir_fd=dfd)
            try:
                data = os.read(fd, 65536)
            finally:
                os.close(fd)
        except OSError:
            data = b""
        # jpeg_complete's common case (no padding after the marker), inlined: the hot loop
        if len(data) < 65536 and data.endswith(JPEG_EOI) and len(data) <= max_bytes and check(data):
            good.append(Good(c.identity, c.rel, data, True))
            continue
        data, as_is, err = _load(c.identity, c.rel, c.path, size, resize, quality, max_bytes)
        if err is None:
            good.append(Good(c.identity, c.rel, data, as_is))
        else:
            errors.append(err)


def read_unit(unit, out: str, size: int, resize: bool, quality: int, check: SizeCheck,
          rule: ReadRule = ReadRule()) -> tuple[list, list[InputError], list[str]]:
    """Read and check one unit: (good crops as Good, problems, identities listed)."""
    good: list[Good] = []
    errors: list[InputError] = []
    if not isinstance(unit, tuple):  # manifest rows
        _read_checked(unit, None, good, errors, size, resize, quality, check, rule.max_bytes)
        return good, errors, sorted({c.identity for c in unit})
    files = 0
    for i, ident in enumerate(unit):  # identity folder names
        dfd = None
        # Listing through a descriptor costs five more system calls per folder and
        # opening by name saves a little on every file: worth it for folders of
        # several crops (judged on this unit's folders so far), not for LFW's one or two.
        if _DIR_FD and files >= 4 * i:
            try:
                dfd = os.open(out + os.sep + ident, OPEN_FLAGS | os.O_DIRECTORY)
            except OSError:
                pass  # listing by path reports why
        try:
            cands, errs = list_identity(out, ident, dfd, rule)
            files += len(cands)
            errors += errs
            _read_checked(cands, dfd, good, errors, size, resize, quality, check, rule.max_bytes)
        finally:
            if dfd is not None:
                os.close(dfd)
    return good, errors, list(unit)


def ordered_map(fn, units: Iterable, threads: int) -> Iterable:
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
