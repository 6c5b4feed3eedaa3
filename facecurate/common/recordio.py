"""MXNet RecordIO (.rec / .idx) in pure Python, no MXNet import.

The framing follows dmlc-core's ``RecordIOWriter::WriteRecord`` /
``RecordIOReader::NextRecord`` (see docs/formats.md):

* a record is ``uint32 magic`` (0xced7230a, little-endian), ``uint32 lrec``
  (``cflag << 29 | length``), ``length`` payload bytes, then zero bytes up to the
  next 4-byte boundary;
* when the magic value occurs in the payload at a 4-byte-aligned offset the writer
  splits the record there into parts with cflag 1 (first), 2 (middle) and 3 (last);
  the four magic bytes at each split point are not stored and the reader puts them
  back;
* ``.idx`` is text, ``key<TAB>byte_offset`` per record (offset of its first magic).

An image record's payload is an ``IRHeader`` (``<IfQQ``: flag, label, id, id2) and
the encoded image. A vector label has ``flag`` = number of float32 values, header
label 0, and the floats between the header and the image bytes.
"""

from __future__ import annotations

import io
import numbers
import os
import struct
import warnings
from typing import BinaryIO, Iterator, NamedTuple, Optional, Sequence, Union

from facecurate.common.constants import (
    IRHEADER_FORMAT,
    IRHEADER_SIZE,
    RECORDIO_CHECKED_READ,
    RECORDIO_LEN_BITS,
    RECORDIO_MAGIC,
    RECORDIO_MAX_PART,
)

MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_HEAD = struct.Struct("<II")
_IRH = struct.Struct(IRHEADER_FORMAT)
# What precedes the image in an unsplit image record with a scalar label, packed at
# once: magic, lrec (IRHEADER_SIZE + image length; cflag 0), then the IRHeader (flag 0,
# label, id, id2). Only valid when no aligned magic is in the record (checked after).
_HEAD_IRH = struct.Struct("<II" + IRHEADER_FORMAT.lstrip("<"))
_ZEROS = (b"", b"\0", b"\0\0", b"\0\0\0")
#: MXNet refuses records of 2**29 bytes or more (``CHECK(size < (1 << 29U))``).
MAX_RECORD = RECORDIO_MAX_PART

Label = Union[float, Sequence[float]]


class RecordIOError(ValueError):
    """A framing or header problem. ``offset`` is the byte offset in the .rec of the
    record (its first magic) or of the bad bytes; ``record`` its position (0-based) in
    the file; ``key`` its .idx key when known."""

    def __init__(self, message: str, offset: Optional[int] = None, record: Optional[int] = None,
                 key: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.record = record
        self.key = key

    def __str__(self) -> str:
        where = []
        if self.key is not None:
            where.append(f"key {self.key}")
        if self.record is not None:
            where.append(f"record #{self.record}")
        if self.offset is not None:
            where.append(f"offset {self.offset}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


# ----------------------------------------------------------------------------- IRHeader
class IRHeader(NamedTuple):
    flag: int
    label: Union[float, tuple]
    id: int
    id2: int

    @property
    def scalar_label(self) -> float:
        """The label as one number: a vector label's first element (as arcface_torch's
        MXFaceDataset does)."""
        if isinstance(self.label, tuple):
            return self.label[0] if self.label else float("nan")
        return self.label


def pack_header(label: Label, id: int = 0, id2: int = 0) -> bytes:
    """IRHeader bytes for ``label`` (a number, or a sequence of floats = vector label
    stored after the header), like ``mx.recordio.pack`` without the image."""
    if type(label) is float or isinstance(label, numbers.Number):
        return _IRH.pack(0, float(label), id, id2)
    vals = [float(v) for v in label]
    return _IRH.pack(len(vals), 0.0, id, id2) + struct.pack(f"<{len(vals)}f", *vals)


def pack_record(label: Label, data: bytes, id: int = 0, id2: int = 0) -> bytes:
    """Payload of an image record: IRHeader (+ vector label) + encoded image bytes."""
    return pack_header(label, id, id2) + data


def unpack_record(payload: bytes) -> tuple[IRHeader, bytes]:
    """(IRHeader, image bytes) from a record payload, like ``mx.recordio.unpack``; a
    vector label comes back as a tuple of floats."""
    if len(payload) < IRHEADER_SIZE:
        raise RecordIOError(f"payload of {len(payload)} bytes is shorter than the {IRHEADER_SIZE}-byte IRHeader")
    flag, label, id_, id2 = _IRH.unpack_from(payload)
    if flag > 0:
        end = IRHEADER_SIZE + 4 * flag
        if end > len(payload):
            raise RecordIOError(f"IRHeader flag {flag} announces {flag} float labels but the payload has only "
                                f"{len(payload) - IRHEADER_SIZE} bytes after the header")
        label = struct.unpack_from(f"<{flag}f", payload, IRHEADER_SIZE)
        return IRHeader(flag, label, id_, id2), payload[end:]
    return IRHeader(flag, label, id_, id2), payload[IRHEADER_SIZE:]


# ----------------------------------------------------------------------------- framing
def _aligned_magic(buf: bytes, base: int = 0) -> list[int]:
    """Offsets i (relative to buf) of the magic at positions where ``base + i`` is a
    multiple of 4."""
    hits = []
    i = buf.find(MAGIC_BYTES)
    while i >= 0:
        if (base + i) & 3 == 0:
            hits.append(i)
            i = buf.find(MAGIC_BYTES, i + 4)
        else:
            i = buf.find(MAGIC_BYTES, i + 1)
    return hits


def frame(payload: bytes) -> bytes:
    """The bytes dmlc-core's writer puts on disk for one record (all parts + padding)."""
    n = len(payload)
    if n > MAX_RECORD:
        raise ValueError(f"a RecordIO record must be smaller than 2**{RECORDIO_LEN_BITS} bytes, got {n}")
    hits = _aligned_magic(payload)
    if not hits:
        return b"".join((_HEAD.pack(RECORDIO_MAGIC, n), payload, _ZEROS[-n & 3]))
    out, d = [], 0
    for i in hits:
        out.append(_HEAD.pack(RECORDIO_MAGIC, ((1 if d == 0 else 2) << RECORDIO_LEN_BITS) | (i - d)))
        out.append(payload[d:i])
        d = i + 4
    out.append(_HEAD.pack(RECORDIO_MAGIC, (3 << RECORDIO_LEN_BITS) | (n - d)))
    out.append(payload[d:])
    out.append(_ZEROS[-n & 3])
    return b"".join(out)


def frame_image(label: Label, data: bytes, id: int = 0, id2: int = 0) -> list[bytes]:
    """Framed image record as a list of byte strings to write in order. The common
    case (scalar label, no aligned magic in the image) costs no copy of the image."""
    header = pack_header(label, id, id2)
    n = len(header) + len(data)
    # len(header) is a multiple of 4, so an aligned magic lies wholly in one of the two.
    if n <= MAX_RECORD and MAGIC_BYTES not in header and not _aligned_magic(data):
        return [_HEAD.pack(RECORDIO_MAGIC, n), header, data, _ZEROS[-n & 3]]
    return [frame(header + data)]


class RecordWriter:
    """Append framed records to a binary file with large buffered writes; ``write``
    returns the record's offset (for the .idx)."""

    def __init__(self, f: BinaryIO, chunk_bytes: int = 8 << 20, offset: int = 0):
        self._f = f
        self._parts: list[bytes] = []
        self._pending = 0
        self._chunk = chunk_bytes
        self._scratch = bytearray()  # write_images' framing buffer, reused
        self.offset = offset
        self.records = 0

    def write_parts(self, parts: Sequence[bytes]) -> int:
        at = self.offset
        for p in parts:
            self._parts.append(p)
            self._pending += len(p)
        self.offset += sum(len(p) for p in parts) if len(parts) > 1 else len(parts[0])
        self.records += 1
        if self._pending >= self._chunk:
            self.flush()
        return at

    def write(self, payload: bytes) -> int:
        return self.write_parts([frame(payload)])

    def write_image(self, label: Label, data: bytes, id: int = 0, id2: int = 0) -> int:
        """Frame and buffer an image record; returns its offset."""
        if type(label) is float:  # the common case, inlined (pack's hot loop)
            header = _IRH.pack(0, label, id, id2)
            n = IRHEADER_SIZE + len(data)
            if n <= MAX_RECORD and MAGIC_BYTES not in data and MAGIC_BYTES not in header:
                at = self.offset
                pad = -n & 3
                self._parts += (_HEAD.pack(RECORDIO_MAGIC, n), header, data, _ZEROS[pad])
                self.offset = at + 8 + n + pad
                self._pending += n + 8
                self.records += 1
                if self._pending >= self._chunk:
                    self.flush()
                return at
        return self.write_parts(frame_image(label, data, id, id2))

    def write_images(self, items: Sequence[tuple[float, bytes, int]]) -> list[int]:
        """Frame many ``(label, image bytes, id)`` records (scalar labels) at once and
        return their offsets. The batch is framed in a scratch buffer the writer keeps
        (no fresh memory per batch) and written with one call. The escape check runs
        vectorised over the whole batch: every record starts at a 4-byte boundary, so
        an aligned magic inside a payload is an aligned magic of the buffer, and the
        only expected ones are the record headers. Records holding another one are
        framed the slow way."""
        import numpy as np

        total = 0
        for _, data, _ in items:
            total += 8 + IRHEADER_SIZE + len(data) + 3
        buf = self._scratch
        if len(buf) < total:
            buf = self._scratch = bytearray(max(total, len(buf) * 3 // 2))
        mv = memoryview(buf)
        starts: list[int] = []
        pos = 0
        hip_into = _HEAD_IRH.pack_into
        for label, data, id_ in items:
            n = IRHEADER_SIZE + len(data)
            if n > MAX_RECORD:
                raise ValueError(f"a RecordIO record must be smaller than 2**{RECORDIO_LEN_BITS} bytes, got {n}")
            hip_into(buf, pos, RECORDIO_MAGIC, n, 0, label, id_, 0)
            end = pos + 8 + n
            mv[pos + 8 + IRHEADER_SIZE:end] = data
            pad = -n & 3
            if pad:
                mv[end:end + pad] = _ZEROS[pad]
            starts.append(pos)
            pos = end + pad
        hits = np.flatnonzero(np.frombuffer(buf, "<u4", count=pos // 4) == RECORDIO_MAGIC)
        if len(hits) != len(starts):  # some payload holds the magic at an aligned offset
            heads = set(starts)
            st_arr = np.asarray(starts)
            bad = {int(np.searchsorted(st_arr, h * 4, side="right") - 1)
                   for h in hits.tolist() if h * 4 not in heads}
            pieces, starts, pos = [], [], 0
            hp, ip = _HEAD.pack, _IRH.pack
            for i, (label, data, id_) in enumerate(items):
                if i in bad:
                    b = frame(_IRH.pack(0, label, id_, 0) + data)
                else:
                    n = IRHEADER_SIZE + len(data)
                    b = b"".join((hp(RECORDIO_MAGIC, n), ip(0, label, id_, 0), data, _ZEROS[-n & 3]))
                pieces.append(b)
                starts.append(pos)
                pos += len(b)
            chunk = memoryview(b"".join(pieces))
        else:
            chunk = mv[:pos]
        base = self.offset
        self.flush()
        while chunk:  # a raw file may write less than asked
            chunk = chunk[self._f.write(chunk):]
        mv.release()
        self.offset = base + pos
        self.records += len(starts)
        return [base + st for st in starts]

    def flush(self) -> None:
        if self._parts:
            self._f.write(b"".join(self._parts))
            self._parts.clear()
            self._pending = 0


class IndexedRecordWriter:
    """A .rec and .idx pair: ``write(key, payload)``; closes both files on exit."""

    def __init__(self, rec_path: Union[str, os.PathLike], idx_path: Union[str, os.PathLike]):
        self._rec = open(rec_path, "wb")
        self._idx = open(idx_path, "w", encoding="ascii", newline="\n")
        self.writer = RecordWriter(self._rec)

    def write(self, key: int, payload: bytes) -> int:
        off = self.writer.write(payload)
        self._idx.write(f"{key}\t{off}\n")
        return off

    def close(self) -> None:
        self.writer.flush()
        self._rec.close()
        self._idx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- reading
class Record(NamedTuple):
    offset: int  # of the first magic
    payload: bytes
    parts: int  # 1 for an unsplit record
    bad_padding: bool  # a padding byte was not zero (MXNet writes zeros)


def file_size(f: BinaryIO) -> int:
    """The size of an open file (of a file object without a descriptor too)."""
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        at = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(at)
        return end


def read_record(f: BinaryIO, offset: int, record: Optional[int] = None, key: Optional[int] = None,
                size: Optional[int] = None) -> Record:
    """Read one record starting at ``offset`` (joining split parts); raises
    RecordIOError for a bad magic, a bad cflag sequence or a truncated record. The
    file position ends after the record's padding."""
    f.seek(offset)
    return _next(f, offset, record, key, size)


def _next(f: BinaryIO, offset: int, record: Optional[int], key: Optional[int],
          size: Optional[int]) -> Optional[Record]:
    chunks: list[bytes] = []
    pos = offset
    parts = 0
    bad_pad = False
    while True:
        head = f.read(8)
        if not head and parts == 0:
            return None
        if len(head) < 8:
            what = "inside a split record" if parts else "record header"
            raise RecordIOError(f"file ends after {len(head)} of the 8 bytes of a {what} (truncated .rec)",
                                pos, record, key)
        magic, lrec = _HEAD.unpack(head)
        if magic != RECORDIO_MAGIC:
            raise RecordIOError(f"bad magic 0x{magic:08x} (expected 0x{RECORDIO_MAGIC:08x})"
                                + (f" in part {parts + 1} of a split record" if parts else ""), pos, record, key)
        cflag = lrec >> RECORDIO_LEN_BITS
        length = lrec & RECORDIO_MAX_PART
        if parts == 0 and cflag not in (0, 1):
            raise RecordIOError(f"record starts with continuation flag {cflag} (expected 0 or 1)", pos, record, key)
        if parts > 0 and cflag not in (2, 3):
            raise RecordIOError(f"part {parts + 1} of a split record has flag {cflag} (expected 2 or 3)",
                                pos, record, key)
        padded = (length + 3) & ~3
        if padded > RECORDIO_CHECKED_READ:  # a crafted length must not allocate what the file lacks
            size = file_size(f) if size is None else size
            if pos + 8 + padded > size:
                raise RecordIOError(f"record announces {length} bytes but the file ends after "
                                    f"{max(size - pos - 8, 0)} of a {size}-byte file (truncated .rec or corrupt "
                                    "length)", pos, record, key)
        body = f.read(padded)
        if len(body) < padded:
            total = f" of a {size}-byte file" if size is not None else ""
            raise RecordIOError(f"record announces {length} bytes but the file ends after {len(body)}{total} "
                                "(truncated .rec or corrupt length)", pos, record, key)
        if padded != length:
            if body[length:].strip(b"\0"):
                bad_pad = True
            body = body[:length]
        chunks.append(body)
        parts += 1
        pos += 8 + padded
        if cflag in (0, 3):
            break
        chunks.append(MAGIC_BYTES)
    payload = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return Record(offset, payload, parts, bad_pad)


def iter_records(f: BinaryIO, start: int = 0, size: Optional[int] = None) -> Iterator[Record]:
    """Every record of a .rec in file order, validating the framing as it goes."""
    f.seek(start)
    pos = start
    n = 0
    while True:
        rec = _next(f, pos, n, None, size)
        if rec is None:
            return
        yield rec
        pos = f.tell()
        n += 1


def read_idx(path: Union[str, os.PathLike]) -> list[tuple[int, int]]:
    """(key, offset) pairs of a .idx in file order; RecordIOError names a bad line."""
    out = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            s = line.strip()
            if not s:
                continue
            fields = s.split(b"\t")
            if len(fields) != 2:
                fields = s.split()
            try:
                if len(fields) != 2:
                    raise ValueError
                out.append((int(fields[0]), int(fields[1])))
            except ValueError:
                raise RecordIOError(f".idx line {lineno} is not 'key<TAB>offset': {line[:80]!r}") from None
    return out


def read_idx_arrays(path: Union[str, os.PathLike]):
    """(keys, offsets) of a .idx as two int64 numpy arrays, in file order; fast and
    compact for millions of records. RecordIOError names a bad line."""
    import numpy as np

    with open(path, "rb") as f:
        data = f.read()
    lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0) - data.count(b"\n\n")
    if data.startswith(b"\n"):
        lines -= 1
    try:
        with warnings.catch_warnings():
            # numpy < 2.3 only warns (DeprecationWarning) where text stops parsing, and
            # returns what it read so far: an error here, as in newer numpy
            warnings.simplefilter("error", DeprecationWarning)
            vals = np.fromstring(data.decode("ascii"), dtype=np.int64, sep=" ") if data.strip() \
                else np.zeros(0, np.int64)
        ok = vals.size == 2 * lines
    except (ValueError, UnicodeDecodeError, DeprecationWarning):
        ok = False
    if not ok:  # the line-by-line parser says which line is wrong
        pairs = read_idx(path)
        vals = np.array(pairs, dtype=np.int64).reshape(-1, 2) if pairs else np.zeros((0, 2), np.int64)
        return vals[:, 0].copy(), vals[:, 1].copy()
    vals = vals.reshape(-1, 2)
    return vals[:, 0].copy(), vals[:, 1].copy()


def iter_idx(path: Union[str, os.PathLike], chunk: int = 1 << 22):
    """(keys, offsets) of a .idx, ``chunk`` bytes of it at a time, in file order: memory
    bounded by the chunk, whatever the size of the .idx. A chunk that does not parse
    goes through :func:`read_idx_arrays`'s checks (which name the bad line)."""
    import numpy as np

    rest = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            data = rest + block
            if block:
                cut = data.rfind(b"\n") + 1
                data, rest = data[:cut], data[cut:]
            if data.strip():
                try:
                    vals = np.array(data.split(), dtype=np.int64)
                except ValueError:
                    vals = None
                if vals is None or vals.size % 2:
                    read_idx_arrays(path)  # raises RecordIOError naming the line
                    raise RecordIOError(f"{path}: a line that is not 'key offset'")
                vals = vals.reshape(-1, 2)
                yield vals[:, 0].copy(), vals[:, 1].copy()
            if not block:
                break


def read_idx_keys(path: Union[str, os.PathLike], wanted, chunk: int = 1 << 22):
    """(keys, offsets) of the .idx lines whose key is in ``wanted`` (an int array),
    in file order, reading the file ``chunk`` bytes at a time (:func:`iter_idx`):
    memory bounded by the chunk and the answer, whatever the size of the .idx."""
    import numpy as np

    wanted = np.unique(np.asarray(wanted, np.int64))
    keys, offs = [], []
    for k, o in iter_idx(path, chunk):
        m = np.isin(k, wanted)
        keys.append(k[m])
        offs.append(o[m])
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(keys), np.concatenate(offs)


def idx_text(entries: Sequence[tuple[int, int]]) -> str:
    return "".join(f"{k}\t{o}\n" for k, o in entries)


class IndexedRecordReader:
    """Random access by key through the .idx, like ``mx.recordio.MXIndexedRecordIO``."""

    def __init__(self, rec_path: Union[str, os.PathLike], idx_path: Union[str, os.PathLike]):
        self.idx = dict(read_idx(idx_path))
        self.keys = list(self.idx)
        self._f = open(rec_path, "rb", buffering=io.DEFAULT_BUFFER_SIZE)

    def read_idx(self, key: int) -> bytes:
        return read_record(self._f, self.idx[key], key=key).payload

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
