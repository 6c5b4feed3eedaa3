"""``facecurate unpack``: a .rec (either layout, vector labels included) back to
``DEST/<identity or label>/<key>.jpg``, streamed and resumable. Which records are
images is decided by :mod:`facecurate.common.recdata`.

DEST is claimed before anything is written: it must be empty (or new), or hold the
``unpack.json`` of an earlier unpack of the same .rec (a rerun continues it), so an
unpack never writes among other files (a RAW folder of photos, say)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from facecurate.common.constants import (
    LABELS_CSV,
    UNPACK_FINGERPRINT_BYTES,
    UNPACK_MAX_NAME_BYTES,
    UNPACK_META,
    UNPACK_SAME_NAME_SEP,
)
from facecurate.common.imageio import image_kind
from facecurate.common.recdata import (
    LABEL_RULE,
    RecLayout,
    image_label,
    label_ok,
    read_label_names,
    read_layout,
    read_property,
    rec_paths,
)
from facecurate.common.recordio import RecordIOError, iter_records, read_idx_arrays, unpack_record
from facecurate.common.files import progress, sha256_file, write_text_atomic


class UnpackError(ValueError):
    """A DEST unpack must not write into (one line for the user)."""


@dataclass
class UnpackResult:
    dest: Path
    written: int = 0
    existing: int = 0  # already there from an earlier run (resume)
    classes: int = 0
    names: str = "label"  # "labels.csv" when folders are identity names
    shared_names: int = 0  # labels whose labels.csv name another label has too: folder NAME__<label>
    shortened_names: int = 0  # names too long for a folder: cut, with a hash suffix
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"dest": str(self.dest), "written": self.written, "already_present": self.existing,
                "classes": self.classes, "folder_names": self.names, "shared_names": self.shared_names,
                "shortened_names": self.shortened_names, "notes": self.notes, "errors": len(self.errors),
                "error_messages": self.errors[:20]}


def _safe_name(name: str) -> bool:
    """A labels.csv identity usable as one folder name (no path tricks)."""
    return bool(name) and name not in (".", "..") and not name.startswith(".") and "/" not in name \
        and "\\" not in name and "\0" not in name


def folder_names(label_names: dict[int, str]) -> tuple[dict[int, str], int, int]:
    """(label -> folder, labels sharing a name, names shortened) for the usable names
    of a labels.csv. A name several labels share gets ``NAME__<label>`` for each of
    them (two classes never end in one folder); a name longer than
    ``UNPACK_MAX_NAME_BYTES`` bytes is cut at a character boundary and given
    ``__`` + 12 hex digits of its sha256. Both depend only on labels.csv."""
    usable = {lab: nm for lab, nm in label_names.items() if _safe_name(nm)}
    count: dict[str, int] = {}
    for nm in usable.values():
        count[nm] = count.get(nm, 0) + 1
    out, shared, shortened = {}, 0, 0
    for lab, nm in usable.items():
        if count[nm] > 1:
            nm = f"{nm}{UNPACK_SAME_NAME_SEP}{lab}"
            shared += 1
        raw = nm.encode("utf-8", "surrogateescape")
        if len(raw) > UNPACK_MAX_NAME_BYTES:
            tag = UNPACK_SAME_NAME_SEP + hashlib.sha256(raw).hexdigest()[:12]
            nm = raw[:UNPACK_MAX_NAME_BYTES - len(tag)].decode("utf-8", "ignore") + tag
            shortened += 1
        out[lab] = nm
    return out, shared, shortened


def rec_fingerprint(rec_path: Path, idx_path: Path) -> dict:
    """What identifies a .rec for unpack.json, cheaply for any size: its size, the
    sha256 of its .idx, and of its first and last ``UNPACK_FINGERPRINT_BYTES`` bytes."""
    size = rec_path.stat().st_size
    n = UNPACK_FINGERPRINT_BYTES
    with open(rec_path, "rb") as f:
        head = hashlib.sha256(f.read(n)).hexdigest()
        f.seek(max(size - n, 0))
        tail = hashlib.sha256(f.read(n)).hexdigest()
    return {"size": size, "idx_sha256": sha256_file(idx_path) if idx_path.is_file() else None,
            "head_sha256": head, "tail_sha256": tail}


def claim_dest(dest: Path, rec_path: Path, idx_path: Path) -> None:
    """Make sure unpack may write into ``dest`` (UnpackError otherwise) and record the
    .rec there: ``dest`` is new or empty, or holds the unpack.json of the same .rec."""
    fp = rec_fingerprint(rec_path, idx_path)
    meta = dest / UNPACK_META
    if dest.exists() and not dest.is_dir():
        raise UnpackError(f"DEST {dest} is not a folder")
    if dest.is_dir() and any(os.scandir(dest)):
        if not meta.is_file():
            raise UnpackError(f"DEST {dest} is not empty and holds no {UNPACK_META} of an earlier unpack: "
                              "unpack writes only into a new or empty folder (choose another DEST)")
        try:
            old = json.loads(meta.read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            old = None
        if old != fp:
            raise UnpackError(f"DEST {dest} holds the unpack of another .rec (its {UNPACK_META} differs from "
                              f"{rec_path}): choose another DEST")
        return
    dest.mkdir(parents=True, exist_ok=True)
    write_text_atomic(meta, json.dumps({"rec": str(rec_path), "fingerprint": fp}, indent=1, sort_keys=True) + "\n")


class _Keys:
    """The .idx read once: the key of each record start in file order (records not in
    the .idx are invisible to MXNet and skipped); without a .idx a record's key is its
    position. ``repeated``: keys the .idx lists more than once."""

    def __init__(self, idx_path: Path):
        import numpy as np

        self.offs = self.keys = None
        self.off0: Optional[int] = 0
        self.max_key = 0
        self.count: Optional[int] = None
        self.repeated: set = set()
        self._j = 0
        if idx_path.exists():
            keys, offs = read_idx_arrays(idx_path)
            srt = np.argsort(offs, kind="stable")
            self.offs, self.keys = offs[srt].tolist(), keys[srt].tolist()
            hit0 = np.flatnonzero(keys == 0)
            self.off0 = int(offs[hit0[0]]) if hit0.size else None
            self.max_key = int(keys.max()) if keys.size else 0
            self.count = int(keys.size)
            uk, n = np.unique(keys, return_counts=True)
            self.repeated = set(uk[n > 1].tolist())

    def key_of(self, n: int, offset: int) -> Optional[int]:
        """Key of the n-th record (at ``offset``; records come in file order)."""
        if self.offs is None:
            return n
        while self._j < len(self.offs) and self.offs[self._j] < offset:
            self._j += 1
        if self._j >= len(self.offs) or self.offs[self._j] != offset:
            return None
        return self.keys[self._j]


class _Writer:
    """Writes image files under DEST: one folder per label (identity name or the
    zero-padded label), files named by the zero-padded key; a file already there is
    kept (resume), a new one appears only when complete."""

    def __init__(self, dest: Path, res: UnpackResult, label_names: Optional[dict], key_width: int, label_width: int):
        self.dest, self.res = dest, res
        self.names, res.shared_names, res.shortened_names = folder_names(label_names or {})
        if res.shared_names:
            res.notes.append(f"{res.shared_names} labels share their name with another label in {LABELS_CSV}: "
                             f"their folders are NAME{UNPACK_SAME_NAME_SEP}<label>")
        if res.shortened_names:
            res.notes.append(f"{res.shortened_names} names are longer than {UNPACK_MAX_NAME_BYTES} bytes: their "
                             f"folders are cut and end in {UNPACK_SAME_NAME_SEP}<12 hex digits of the name's sha256>")
        self.key_width, self.label_width = key_width, label_width
        self.made: set = set()
        self.labels_seen: set = set()

    def folder(self, label: int) -> str:
        name = self.names.get(label)
        return name if name is not None else str(label).zfill(self.label_width)

    def write(self, key: int, label: int, kind: str, img: bytes) -> None:
        folder = self.folder(label)
        self.labels_seen.add(label)
        d = self.dest / folder
        if folder not in self.made:
            d.mkdir(parents=True, exist_ok=True)
            self.made.add(folder)
        target = d / f"{str(key).zfill(self.key_width)}.{kind}"
        if target.exists():
            self.res.existing += 1
            return
        tmp = d / f".{target.name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as g:
            g.write(img)
        os.replace(tmp, target)
        self.res.written += 1


def _label_width(rec_path: Path, layout: RecLayout) -> int:
    """Label folders are zero-padded so that name order is label order (re-pack gives
    the same labels); the width comes from the dataset, so it is the same in every run
    (resume)."""
    prop = read_property(rec_path)
    n_classes = prop[0] if prop and len(prop) == 3 else (layout.end - layout.first if layout.has_header else 0)
    return max(6, len(str(max(n_classes - 1, 0))))


def _image(payload: bytes, key: int, res: UnpackResult) -> Optional[tuple[int, str, bytes]]:
    """(label, kind, image bytes) of an image record, or None (reason in ``res``)."""
    try:
        h, img = unpack_record(payload)
    except RecordIOError as e:
        res.errors.append(f"key {key}: {e.message}")
        return None
    lab = image_label(h)
    if not img or not label_ok(lab):
        res.errors.append(f"key {key}: " + ("no image bytes" if not img else f"label {lab} is not {LABEL_RULE}"))
        return None
    kind = image_kind(img)
    if not kind:
        res.errors.append(f"key {key}: image bytes are neither JPEG nor PNG; not written")
        return None
    return int(lab), kind, img


def unpack(rec: os.PathLike | str, dest: os.PathLike | str, *, names: bool = True,
           show_progress: bool = False) -> UnpackResult:
    """Write every image of a .rec to ``dest/<identity or label>/<key>.jpg``.

    Folder names come from ``labels.csv`` beside the .rec when present (and
    ``names``), else the label zero-padded to a common width; file names are the key
    zero-padded to at least 8 digits, so name order is key order. Streams the .rec
    once; files are written under a temporary name and renamed, and files already
    present are kept, so an interrupted unpack continues where it stopped."""
    rec_path, idx_path = rec_paths(rec)
    dest = Path(dest)
    res = UnpackResult(dest=dest)
    if not rec_path.exists():
        raise FileNotFoundError(f"{rec_path} does not exist")
    index = _Keys(idx_path)
    label_names = read_label_names(rec_path) if names else None
    res.names = LABELS_CSV if label_names else "label"
    size = rec_path.stat().st_size
    with open(rec_path, "rb", buffering=1 << 20) as f:
        layout = read_layout(f, index.off0, index.count) if size else RecLayout()
        claim_dest(dest, rec_path, idx_path)
        out = _Writer(dest, res, label_names, max(8, len(str(index.max_key))), _label_width(rec_path, layout))
        bar = progress(total=size, desc="unpack", unit="B", disable=None if show_progress else True)
        last, seen = 0, set()
        for n, r in enumerate(iter_records(f, 0, size)):
            key = index.key_of(n, r.offset)
            if key is None or not layout.is_image(key):
                continue  # not indexed (invisible to MXNet too), or a header / identity record
            if key in index.repeated:
                if key in seen:
                    res.errors.append(f"key {key}: listed more than once in {idx_path.name}; the record at offset "
                                      f"{r.offset} is not written (the first record of this key is)")
                    continue
                seen.add(key)
            got = _image(r.payload, key, res)
            if got is not None:
                out.write(key, *got)
            if r.offset - last > (8 << 20):
                bar.update(r.offset - last)
                last = r.offset
        bar.close()
    res.classes = len(out.labels_seen)
    return res
