"""Per-record checksums of a RecordIO dataset (``train.sums``, docs/formats.md,
"Checksums"): one line ``key<TAB>offset<TAB>length<TAB>sha256`` per record, the
SHA-256 of the record's payload (IRHeader, vector label and image bytes, with the
magic of a split record put back, i.e. what a reader gets). The framing checks of
``inspect`` catch broken lengths and magics; only a checksum catches a flipped bit
inside an image.

* ``pack`` writes the file in the same pass as the records (:class:`SumsWriter`:
  a child process hashes each batch as soon as it is written, off pack's thread).
* ``facecurate checksum DEST`` writes it for an existing .rec (:func:`write_sums`).
* ``inspect --verify`` checks every record against it (:class:`SumsCursor`, fed in
  file order by inspect's single pass).
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, TextIO

from facecurate.common.constants import IRHEADER_FORMAT, IRHEADER_SIZE, SUMS_COLUMNS, SUMS_SUFFIX
from facecurate.common.files import progress
from facecurate.common.procs import die_with_parent, stop_processes
from facecurate.common.recdata import rec_paths
from facecurate.common.recordio import RecordIOError, iter_records, read_idx_arrays, read_record

_IRH = struct.Struct(IRHEADER_FORMAT)
HEADER_LINE = "\t".join(SUMS_COLUMNS) + "\n"
#: hex digits of a SHA-256 digest
DIGEST_HEX = 64


class SumsError(ValueError):
    """A checksum file that cannot be read, or a .rec that cannot be summed."""


def sums_path(rec_path: os.PathLike | str) -> Path:
    """``train.sums`` beside ``train.rec`` (same stem)."""
    p = Path(rec_path)
    return p.with_name(p.stem + SUMS_SUFFIX)


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def line(key: int, offset: int, length: int, hexdigest: str) -> str:
    return f"{key}\t{offset}\t{length}\t{hexdigest}\n"


def _image_lines(keys: range, offsets: Sequence[int], labels: Sequence[float], datas: Sequence[bytes]) -> str:
    """Lines of image records with scalar labels, IRHeader ``(0, label, key, 0)`` (what
    :meth:`RecordWriter.write_images` writes)."""
    out = []
    pack, sha = _IRH.pack, hashlib.sha256
    for key, off, lab, data in zip(keys, offsets, labels, datas):
        h = sha(pack(0, lab, key, 0))
        h.update(data)
        out.append(f"{key}\t{off}\t{IRHEADER_SIZE + len(data)}\t{h.hexdigest()}\n")
    return "".join(out)


#: Image bytes pack hashes in its own thread before handing the rest to a child
#: process (a spawned child takes about 0.1 s to start: more than hashing 64 MB).
INLINE_BYTES = 64 * 1024 * 1024


class SumsWriter:
    """Writes ``train.sums`` while pack writes the records, batch by batch, in the same
    pass. With ``rec`` (the .rec being written), the image records are hashed off
    pack's thread, by a child process (:class:`_Hasher`) that reads each batch back
    from the .rec just written (the page cache) and appends its lines: a thread
    would not do (every hashlib call hands the GIL back and forth with pack's loop,
    measured slower than hashing in line). Without ``rec`` they are hashed here."""

    def __init__(self, f: TextIO, rec: Optional[os.PathLike | str] = None):
        self.f = f
        self.f.write(HEADER_LINE)
        self._placeholder_at: Optional[int] = None
        self._rec = rec
        self._hasher: Optional[_Hasher] = None
        self._inline = 0  # image bytes hashed in pack's thread so far

    def placeholder(self, key: int, offset: int, length: int) -> None:
        """A fixed-width line for a record written later in place (the insightface
        header), filled in by :meth:`fill`."""
        self.f.flush()
        self._placeholder_at = self.f.tell()
        self.f.write(line(key, offset, length, "0" * DIGEST_HEX))

    def fill(self, key: int, offset: int, payload: bytes) -> None:
        self.wait()
        self.f.flush()
        os.pwrite(self.f.fileno(), line(key, offset, len(payload), digest(payload)).encode("ascii"),
                  self._placeholder_at)

    def images(self, k0: int, offsets: Sequence[int], labels: Sequence[float], datas: Sequence[bytes]) -> None:
        """Lines of image records already written (and flushed) to the .rec. The first
        :data:`INLINE_BYTES` are hashed here (starting the child costs more than
        hashing a small pack), the rest by the child."""
        if self._rec is None or (self._hasher is None and self._inline < INLINE_BYTES):
            self._inline += sum(len(d) for d in datas)
            self.f.write(_image_lines(range(k0, k0 + len(offsets)), offsets, labels, datas))
            return
        if self._hasher is None:
            self.f.flush()  # the child appends after what is written so far
            self._hasher = _Hasher(self._rec, self.f.name)
        self._hasher.send(k0, [int(o) for o in offsets])

    def record(self, key: int, offset: int, payload: bytes) -> None:
        """One record that is not a scalar-label image (identity records)."""
        self.wait()
        self.f.write(line(key, offset, len(payload), digest(payload)))

    def wait(self) -> None:
        """Every image line written (the child done); the file's position at its end."""
        if self._hasher is not None:
            self._hasher.finish()
            self._hasher = None
            self.f.seek(0, os.SEEK_END)

    def close(self) -> None:
        """Stop a child still running (a failed pack)."""
        if self._hasher is not None:
            self._hasher.stop()
            self._hasher = None


class _Hasher:
    """The child process of :class:`SumsWriter`: receives ``(first key, offsets)`` per
    batch, reads those records from the .rec and appends their lines to the sums
    file, in order. It dies with its parent (:func:`facecurate.common.procs.die_with_parent`)."""

    def __init__(self, rec: os.PathLike | str, sums: str):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # as every worker: never fork a process that may run threads
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_hash_records, args=(child, str(rec), sums, os.getpid()), daemon=True,
                                name="facecurate-sums")
        self.proc.start()
        child.close()

    def send(self, k0: int, offsets: list[int]) -> None:
        self._conn.send((k0, offsets))

    def finish(self) -> None:
        try:
            self._conn.send(None)
            err = self._conn.recv()
        except (EOFError, OSError):
            err = f"the checksum process ended with status {self.proc.exitcode}"
        self.proc.join()
        self._conn.close()
        if err:
            raise SumsError(f"checksums not written: {err}")

    def stop(self) -> None:
        self._conn.close()
        stop_processes([self.proc])


def _hash_records(conn, rec: str, sums: str, parent: int) -> None:
    die_with_parent(parent)
    err, msg = "", ()
    try:
        with open(rec, "rb", buffering=1 << 20) as f, \
                open(sums, "a", encoding="ascii", newline="\n", buffering=1 << 20) as w:
            while (msg := conn.recv()) is not None:
                k0, offsets = msg
                out = []
                for i, off in enumerate(offsets):
                    p = read_record(f, off, key=k0 + i).payload
                    out.append(line(k0 + i, off, len(p), digest(p)))
                w.write("".join(out))
    except Exception as e:  # noqa: BLE001 - the parent reports it
        err = f"{type(e).__name__}: {e}"
        while msg is not None:  # drain until the parent asks for the result
            msg = conn.recv()
    conn.send(err)
    conn.close()


# ----------------------------------------------------------------------------- reading
class SumsLine(NamedTuple):
    key: int
    offset: int
    length: int
    digest: str


def _parse(raw: str, lineno: int, path: Path) -> SumsLine:
    f = raw.rstrip("\n").split("\t")
    try:
        if len(f) != 4 or len(f[3]) != DIGEST_HEX:
            raise ValueError
        int(f[3], 16)
        return SumsLine(int(f[0]), int(f[1]), int(f[2]), f[3].lower())
    except ValueError:
        raise SumsError(f"{path.name} line {lineno} is not 'key<TAB>offset<TAB>length<TAB>sha256': "
                        f"{raw[:100]!r}") from None


def read_sums(path: Path):
    """Lines of a sums file in order; SumsError for a bad header or line."""
    with open(path, encoding="ascii", errors="replace") as f:
        head = f.readline()
        if head != HEADER_LINE:
            raise SumsError(f"{path.name}: first line must be {HEADER_LINE.strip()!r} (tab-separated), "
                            f"got {head[:80]!r}")
        for n, raw in enumerate(f, 2):
            if raw.strip():
                yield _parse(raw, n, path)


class SumsCursor:
    """Expected checksums for records met in increasing file offset. Streams the file
    when its lines are in offset order (as facecurate writes them); otherwise the rest
    is loaded into a dict. ``check(offset, payload)`` returns an error message or None."""

    def __init__(self, path: Path):
        self.path = path
        self._it = read_sums(path)
        self._next: Optional[SumsLine] = None
        self._by_off: Optional[dict] = None
        self._last = -1
        self.checked = 0
        self.unmatched: list[SumsLine] = []  # lines naming no record start (first few)
        self.unmatched_count = 0
        self._advance()

    def _advance(self) -> None:
        self._next = next(self._it, None)
        if self._next is not None and self._next.offset <= self._last and self._by_off is None:
            self._by_off = {self._next.offset: self._next}
            for s in self._it:
                self._by_off[s.offset] = s
            self._next = None
        if self._next is not None:
            self._last = self._next.offset

    def _miss(self, s: SumsLine) -> None:
        self.unmatched_count += 1
        if len(self.unmatched) < 10:
            self.unmatched.append(s)

    def expected(self, offset: int) -> Optional[SumsLine]:
        while self._next is not None and self._next.offset < offset:
            self._miss(self._next)
            self._advance()
        if self._next is not None and self._next.offset == offset:
            s = self._next
            self._advance()
            return s
        if self._by_off is not None:
            return self._by_off.pop(offset, None)
        return None

    def check(self, offset: int, payload: bytes) -> Optional[str]:
        s = self.expected(offset)
        if s is None:
            return f"no line in {self.path.name}"
        self.checked += 1
        if s.length != len(payload):
            return f"payload is {len(payload)} bytes, {self.path.name} says {s.length} (key {s.key} there)"
        if digest(payload) != s.digest:
            return f"payload sha256 differs from {self.path.name} (corrupt record bytes)"
        return None

    def finish(self) -> None:
        """Lines past the last record, and those never matched (dict mode)."""
        while self._next is not None:
            self._miss(self._next)
            self._advance()
        if self._by_off:
            for s in sorted(self._by_off.values(), key=lambda s: s.offset):
                self._miss(s)
            self._by_off.clear()


# ----------------------------------------------------------------------------- writing
def write_sums(rec: os.PathLike | str, *, show_progress: bool = False) -> dict:
    """``facecurate checksum``: write ``train.sums`` for an existing .rec in one pass
    (records in file order; the keys come from the .idx, records it does not name are
    left out and counted). Atomic (temporary name, then rename). Returns a summary."""
    import numpy as np

    rec_path, idx_path = rec_paths(rec)
    if not rec_path.is_file():
        raise SumsError(f"{rec_path} does not exist")
    if not idx_path.is_file():
        raise SumsError(f"{idx_path} does not exist (the keys come from the .idx)")
    try:
        keys, offs = read_idx_arrays(idx_path)
    except RecordIOError as e:
        raise SumsError(f"{idx_path.name}: {e}") from None
    order = np.argsort(offs, kind="stable")
    skeys, soffs = keys[order], offs[order]
    out = sums_path(rec_path)
    tmp = out.with_name(f".{out.name}.tmp")
    size = rec_path.stat().st_size
    n = unindexed = 0
    bar = progress(total=size, desc="checksum", unit="B", disable=None if show_progress else True)
    try:
        with open(rec_path, "rb", buffering=1 << 20) as f, \
                open(tmp, "w", encoding="ascii", newline="\n", buffering=1 << 20) as w:
            w.write(HEADER_LINE)
            j, last = 0, 0
            for r in iter_records(f, 0, size):
                while j < soffs.size and soffs[j] < r.offset:
                    j += 1
                if j < soffs.size and soffs[j] == r.offset:
                    while j < soffs.size and soffs[j] == r.offset:  # every key naming this record
                        w.write(line(int(skeys[j]), r.offset, len(r.payload), digest(r.payload)))
                        j += 1
                    n += 1
                else:
                    unindexed += 1
                if r.offset - last > (8 << 20):
                    bar.update(r.offset - last)
                    last = r.offset
            w.flush()
            os.fsync(w.fileno())
        os.replace(tmp, out)
    except RecordIOError as e:
        raise SumsError(f"corrupt .rec, no checksums written: {e} (run `facecurate inspect`)") from None
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    return {"rec": str(rec_path), "sums": str(out), "records": n, "unindexed_records": unindexed,
            "algorithm": "sha256"}
