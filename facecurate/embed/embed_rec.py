"""``facecurate embed DEST/train.rec``: a .rec as embed's input, in one streaming pass
with memory bounded independently of the number of records.

* **Plan** (the run's own process): the .idx is streamed once and cut into shards of
  ``size`` consecutive image records (:mod:`facecurate.common.recdata`'s rule says which
  records are images). A shard is a :class:`RecRange`: the byte range of its lines in
  the .idx and how many image records they name; the process never holds a record,
  a label or an item per record. A shard's digest is the runner's digest of its keys
  ``rec:<key>`` (the same shards, and digests, as a plan made from a list of items).
* **Shards** (worker processes): a worker reads its shard's lines from the .idx and
  each of its records once, in .idx order (records written in order are a sequential
  read of the .rec), getting the label and the image bytes from the same read. A
  record that cannot be read, or whose label is not an integer in [0, 2^31), is
  recorded as failed with the reason. The shard's file
  carries each embedded record's identity (its label).
* **Store**: written shard after shard in plan order through
  :meth:`facecurate.common.workspace.Workspace.store_writer` (``embeddings.npy`` through a
  memory map, ``embeddings.csv`` streamed, both under temporary names renamed at the
  end); the bytes equal those of the in-memory writer.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from facecurate.common.constants import REC_KEY_PREFIX, STORE_DTYPES
from facecurate.embed.embed_inputs import EmbedError, Item, shard_npz
from facecurate.common.recdata import LABEL_RULE, PLAIN, RecLayout, image_label, label_ok, read_layout
from facecurate.common.recordio import RecordIOError, read_record, unpack_record
from facecurate.engines.runner import Shard
from facecurate.common.workspace import Workspace


@dataclass(frozen=True)
class RecRange:
    """The image records of one shard of a .rec: the .idx lines in bytes
    ``[idx_start, idx_end)`` of the .idx, naming ``count`` image records. Small and
    picklable: this is all a worker is sent."""

    rec: str
    idx: str
    idx_start: int
    idx_end: int
    count: int
    layout: RecLayout = PLAIN

    def __len__(self) -> int:
        return self.count

    def entries(self) -> list[tuple[int, int]]:
        """(key, offset) of the range's image records, in .idx order."""
        with open(self.idx, "rb") as f:
            f.seek(self.idx_start)
            data = f.read(self.idx_end - self.idx_start)
        pairs = (_parse(line, self.idx, None) for line in data.splitlines())
        return [p for p in pairs if p is not None and self.layout.is_image(p[0])]

    def load(self) -> tuple[list[Item], list[tuple[str, str]]]:
        """(items with their image bytes and identity, failures) of the range: each
        record read once. A record that cannot be read is a failure, with the reason."""
        items, failed = [], []
        name = Path(self.rec).name
        with open(self.rec, "rb", buffering=1 << 20) as f:
            for key, off in self.entries():
                aligned = f"{REC_KEY_PREFIX}{key}"
                try:
                    header, data = unpack_record(read_record(f, off, key=key).payload)
                except RecordIOError as e:
                    failed.append((aligned, f"corrupt record: {e}"))
                    continue
                label = image_label(header)
                if not label_ok(label):  # never an identity: clean and pack would take it for one
                    failed.append((aligned, f"bad image record: label {label!r} is not {LABEL_RULE}"))
                    continue
                items.append(Item(aligned=aligned, source=f"{name}:{key}", identity=str(int(label)),
                                  face="0", crop=self.rec, rec_offset=off, data=data))
        return items, failed


def _parse(line: bytes, idx: str, lineno: Optional[int]) -> Optional[tuple[int, int]]:
    """(key, offset) of a .idx line; None for a blank line; EmbedError names a bad one."""
    fields = line.split()
    if not fields:
        return None
    try:
        if len(fields) != 2:
            raise ValueError
        return int(fields[0]), int(fields[1])
    except ValueError:
        where = f"line {lineno}" if lineno else "a line"
        raise EmbedError(f"{idx}: {where} is not 'key<TAB>offset': {line[:80]!r}") from None


def check_rec(rec: Path) -> Path:
    """``rec``, once its .idx is known to exist and its layout is valid (EmbedError
    otherwise: a crafted header is refused before any model is loaded)."""
    _layout(rec, _idx_of(rec))
    return rec


def _idx_of(rec: Path) -> Path:
    idx = rec.with_suffix(".idx")
    if not idx.exists():
        raise EmbedError(f"{rec}: no {idx.name} beside it (needed to read a .rec)")
    return idx


def _layout(rec: Path, idx: Path) -> RecLayout:
    """The layout, from key 0's record (found by streaming the .idx up to it)."""
    off0 = None
    with open(idx, "rb") as f:
        for lineno, line in enumerate(f, 1):
            p = _parse(line, str(idx), lineno)
            if p is not None and p[0] == 0:
                off0 = p[1]
                break
    try:
        with open(rec, "rb") as f:
            return read_layout(f, off0)
    except RecordIOError as e:
        raise EmbedError(f"{rec}: corrupt .rec at {e} (run `facecurate inspect` for details)") from None


def plan_rec_shards(rec: os.PathLike | str, size: int) -> list[Shard]:
    """Shards of ``size`` consecutive image records of ``rec`` (in .idx order), each a
    :class:`RecRange`, by one streaming pass over the .idx. The digests equal
    :func:`facecurate.engines.runner.plan_shards`' on the keys ``rec:<key>``."""
    rec = Path(rec)
    idx = _idx_of(rec)
    layout = _layout(rec, idx)
    size = max(1, int(size))
    shards: list[Shard] = []
    h, n, start, pos, entries = hashlib.sha256(), 0, 0, 0, 0
    prefix = REC_KEY_PREFIX.encode()
    with open(idx, "rb") as f:
        for lineno, line in enumerate(f, 1):
            pos += len(line)
            p = _parse(line, str(idx), lineno)
            entries += p is not None
            if p is not None and layout.is_image(p[0]):
                h.update(b"%s%s%d" % (b"\n" if n else b"", prefix, p[0]))
                n += 1
            if n == size:
                shards.append(Shard(len(shards), RecRange(str(rec), str(idx), start, pos, n, layout),
                                    h.hexdigest()[:32]))
                h, n, start = hashlib.sha256(), 0, pos
    if n:
        shards.append(Shard(len(shards), RecRange(str(rec), str(idx), start, pos, n, layout), h.hexdigest()[:32]))
    if layout.end > entries:
        raise EmbedError(f"{rec}: corrupt .rec at key 0: header label [{layout.first}, {layout.end}] names more "
                         f"records than the {entries} of {idx.name} (run `facecurate inspect` for details)")
    return shards


def items_from_rec(rec: os.PathLike | str) -> list[Item]:
    """Every image record of a .rec as an :class:`~facecurate.embed.embed.Item` (with its
    bytes), in .idx order: a list of the whole file, for tests and small files (embed
    itself reads shard by shard). A record that cannot be read is an EmbedError."""
    items: list[Item] = []
    for s in plan_rec_shards(rec, 1 << 16):
        got, failed = s.items.load()
        if failed:
            raise EmbedError(f"{rec}: {failed[0][0]}: {failed[0][1]} (run `facecurate inspect` for details)")
        items += got
    return items


# ----------------------------------------------------------------------------- the store
def _shard_rows(work: Path, shards) -> Iterator[tuple[np.ndarray, list, list, list]]:
    """(vectors, keys, identities, failures) of each shard in plan order (one shard
    in memory at a time)."""
    for s in shards:
        with np.load(shard_npz(work, s.index)) as z:
            keys = z["keys"].tolist()
            if "identities" in z.files:
                idents = z["identities"].tolist()
            else:  # a shard an older version wrote: read its labels again
                labels = {it.aligned: it.identity for it in s.items.load()[0]}
                idents = [labels[k] for k in keys]
            yield (z["vectors"], keys, idents,
                   list(zip(z["failed_keys"].tolist(), z["failed_reasons"].tolist())))


def write_rec_store(store: Path, rec: Path, work: Path, shards, dim: int, dtype: str = STORE_DTYPES[0],
                    ) -> tuple[int, list[dict]]:
    """Write ``embeddings.npy`` (of ``dtype``) and ``embeddings.csv`` of a .rec's store
    from the finished shards, in plan order, through :meth:`Workspace.store_writer`
    (one shard in memory at a time). Returns (rows, failures)."""
    total = 0
    for s in shards:
        with np.load(shard_npz(work, s.index)) as z:
            total += int(z["keys"].shape[0])
    fails: list[dict] = []
    with Workspace(store).store_writer(total, dim, dtype) as w:
        for vecs, keys, idents, failed in _shard_rows(work, shards):
            w.add(vecs, [(k, f"{rec.name}:{k[len(REC_KEY_PREFIX):]}", ident, "0") for k, ident in zip(keys, idents)])
            fails += [{"aligned": k, "reason": r} for k, r in failed]
    return total, fails
