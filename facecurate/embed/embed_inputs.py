"""What the embed stage reads: the faces to embed (:class:`Item`: from align.csv, a
folder of crops, or a .rec through :mod:`facecurate.embed.embed_rec`), the
:class:`Loader` that reads their pixels, and where a shard's vectors go. Below both
:mod:`facecurate.embed.embed` and :mod:`facecurate.embed.embed_rec`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np

from facecurate.common.constants import MAX_INPUT_BYTES, SHARD_NPZ, WORK_DIR
from facecurate.common.filetree import walk_tree
from facecurate.common.imageio import ImageError, decode_image, is_image_name, read_bytes, read_image
from facecurate.common.manifests import fmt_int
from facecurate.common.recordio import read_record, unpack_record
from facecurate.common.workspace import Workspace


class EmbedError(RuntimeError):
    """A problem with the run as a whole (missing input, incompatible store)."""


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Item:
    """One face to embed. ``aligned`` is the store key."""

    aligned: str
    source: str
    identity: str
    face: str
    crop: str = ""  # absolute path of the crop image ("" for .rec records)
    raw: str = ""  # absolute path of the source photo ("" when unknown)
    pts5: Optional[tuple] = None  # 10 floats, the 5 points in source pixels
    box: Optional[tuple] = None  # x1, y1, x2, y2 in source pixels
    rec_offset: int = -1  # byte offset of the record in a .rec
    data: Optional[bytes] = None  # the record's image bytes (.rec input: read with its label)
    problem: str = ""  # why it is not read, found while listing a crop folder (a link leading out)


def items_from_align(out: Path, primary_only: bool = False) -> tuple[list[Item], dict]:
    """The ``ok`` rows of OUT/align.csv (``primary_only``: of the photos' subjects),
    in the manifest's order, and align.json."""
    ws = Workspace(out)
    rows = ws.align_rows()
    meta = ws.align_meta()
    raw = meta.get("raw") or ""
    items = []
    for r in rows:
        if not r.is_ok or not r.aligned or (primary_only and not r.primary):
            continue
        items.append(Item(
            aligned=r.aligned, source=r.source, identity=r.identity, face=fmt_int(r.face),
            crop=str(out / r.aligned),
            raw=str(Path(raw) / r.source) if raw else "",
            pts5=r.points, box=r.box,
        ))
    return items, meta


def items_from_folder(folder: Path, follow_external_links: bool = False) -> list[Item]:
    """Every image in a plain folder of crops ``<identity>/...``, sorted. Symlinks are
    followed while they stay inside ``folder`` (:func:`facecurate.common.filetree.walk_tree`);
    a link leading out (an image name, or a folder) is an item with its ``problem``,
    recorded as failed and never read, unless ``follow_external_links``."""
    entries, _warnings = walk_tree(folder, what="the crop folder", follow_external=follow_external_links,
                                   skip_dirs=(WORK_DIR,))
    items = []
    for e in entries:
        if not (e.folder or is_image_name(e.rel)):
            continue
        parts = PurePosixPath(e.rel).parts
        items.append(Item(aligned=e.rel, source=e.rel, identity=parts[0] if len(parts) > 1 or e.folder else "",
                          face="0", crop=os.path.join(folder, e.rel),
                          problem=f"{e.status}: {e.message}" if e.status else ""))
    return items


# ----------------------------------------------------------------------------- loading
class Loader:
    """Reads crops / sources / .rec records; keeps the last decoded source (rows of one
    photo are consecutive) so several faces of a photo decode it once."""

    def __init__(self, max_bytes: int = MAX_INPUT_BYTES):
        self._last: tuple[str, Optional[np.ndarray]] = ("", None)
        self._rec: dict[str, object] = {}
        self.max_bytes = max_bytes  # a larger crop or photo is not read (too_large)

    def source(self, path: str) -> Optional[np.ndarray]:
        if self._last[0] == path:
            return self._last[1]
        try:
            img = read_image(path, max_bytes=self.max_bytes)
        except (ImageError, OSError):
            img = None
        self._last = (path, img)
        return img

    def _bytes(self, item: Item) -> bytes:
        if item.data is not None:
            return item.data
        if item.rec_offset >= 0:
            f = self._rec.get(item.crop)
            if f is None:
                f = self._rec[item.crop] = open(item.crop, "rb")
            _hdr, data = unpack_record(read_record(f, item.rec_offset).payload)
            return data
        return read_bytes(item.crop, self.max_bytes)  # regular files only (ImageError: unsupported, too_large)

    def crop_rgb(self, item: Item) -> np.ndarray:
        return decode_image(self._bytes(item), item.crop)

    def crop_bgr(self, item: Item) -> np.ndarray:
        return np.ascontiguousarray(self.crop_rgb(item)[:, :, ::-1])


def shard_npz(work: Path, index: int) -> Path:
    return Path(work) / SHARD_NPZ.format(index=index)
