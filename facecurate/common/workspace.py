"""OUT as one object: the only code that reads or writes the files the stages leave in
OUT (align.csv and align.json, the embedding store, clean.csv, identities.csv,
merges.csv, clean.json, review.csv). Rows come and go as the typed rows of
:mod:`facecurate.common.manifests`; every write is atomic (temporary name + rename).

One error style: a file a stage needs and OUT lacks is a :class:`MissingFile`
(a FileNotFoundError) naming the path and the command that makes it; a file that
exists but cannot be parsed is a :class:`ManifestError` (a ValueError) naming the
path, the line and the column."""

from __future__ import annotations

import contextlib
import csv
import gc
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from facecurate.common import constants as C
from facecurate.common.files import (atomic_write, csv_cell, remove_stale_temps, sheet_cell, temp_beside,
                                     unsheet_cell, write_bytes_atomic, write_text_atomic)
from facecurate.common.provenance import warn_if_other
from facecurate.common.manifests import (AlignRow, CleanRow, EmbeddingRow, IdentityRow, MergeRow, ReviewRow, Row,
                                         RowError, clean_columns)

#: the command that makes each file ({out}: the OUT folder), for "run ... first"
MAKERS = {
    C.ALIGN_MANIFEST: "facecurate align RAW {out}", C.ALIGN_META: "facecurate align RAW {out}",
    C.EMBEDDINGS_NPY: "facecurate embed {out}", C.EMBEDDINGS_CSV: "facecurate embed {out}",
    C.EMBEDDINGS_META: "facecurate embed {out}",
    C.CLEAN_CSV: "facecurate clean {out}", C.IDENTITIES_CSV: "facecurate clean {out}",
    C.MERGES_CSV: "facecurate clean {out}", C.CLEAN_META: "facecurate clean {out}",
    C.REVIEW_CSV: "facecurate review {out}",
}


#: the columns of clean.csv without which no stage can use it
CLEAN_NEED = ("aligned", "identity", "decision")


class MissingFile(FileNotFoundError):
    """A file of OUT that a stage needs is not there."""


class ManifestError(ValueError):
    """A file of OUT that cannot be read as what it should be."""


@dataclass(frozen=True)
class Store:
    """The embedding store: vectors (N, D), row i of ``rows`` naming vector i: float32,
    or as stored (float32 or float16) when memory-mapped (:meth:`Workspace.store_vectors`)."""

    vecs: Any
    rows: list[EmbeddingRow]
    meta: dict


class StoreWriter:
    """The pieces of a store being written (:meth:`Workspace.store_writer`): each
    :meth:`add` appends vectors and the rows naming them, stored as ``dtype`` (one of
    ``constants.STORE_DTYPES``; float32 vectors cast, so rounded, to float16)."""

    def __init__(self, f, npy: Path, rows: int, dim: int, dtype: str = C.STORE_DTYPES[0]):
        import numpy as np

        self.rows, self.dim, self.at = int(rows), int(dim), 0
        self._csv = csv.writer(f, lineterminator="\n")
        self._csv.writerow(C.EMBEDDINGS_COLUMNS)
        self._npy = npy
        if self.rows == 0:  # nothing to map: the empty array np.save writes
            np.save(npy, np.zeros((0, self.dim), dtype))
            self._arr = None
        else:
            self._arr = np.lib.format.open_memmap(npy, mode="w+", dtype=np.dtype(dtype), shape=(self.rows, self.dim))

    def add(self, vecs, rows: Sequence[EmbeddingRow | Sequence[str]]) -> None:
        """Vectors (len(rows), dim) and their rows (typed, or the four cells as text)."""
        import numpy as np

        n = len(rows)
        if self.at + n > self.rows:
            raise ValueError(f"store writer: {self.at + n} rows given for a store of {self.rows}")
        if n:
            self._arr[self.at:self.at + n] = np.asarray(vecs, np.float32).reshape(n, self.dim)
        self.at += n
        w = EmbeddingRow.writer()
        self._csv.writerows(w(r) if isinstance(r, EmbeddingRow) else r for r in rows)

    def close(self) -> None:
        """Flush the vectors to disk; ValueError when fewer rows came than announced."""
        if self.at != self.rows:
            raise ValueError(f"store writer: {self.at} rows given for a store of {self.rows}")
        if self._arr is not None:
            self._arr.flush()
            self._arr = None
        fd = os.open(self._npy, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Workspace:
    """The files of one OUT folder (or of a store folder, or of a packed dataset's
    folder: the same names)."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)

    def __repr__(self) -> str:
        return f"Workspace({str(self.out)!r})"

    # ------------------------------------------------------------------ generic
    def path(self, name: str) -> Path:
        return self.out / name

    def remove_stale_temps(self, names: Sequence[str]) -> int:
        """Remove what a killed earlier run left half-written of the files ``names``
        (under temporary names); call once before rewriting them."""
        wanted = set(names)
        return remove_stale_temps(self.out, lambda target: target in wanted)

    def has(self, name: str) -> bool:
        return (self.out / name).exists()

    def require(self, name: str, maker: Optional[str] = None) -> Path:
        """The path of ``name``, or MissingFile naming the command that makes it."""
        p = self.out / name
        if not p.exists():
            how = (maker or MAKERS.get(name, "")).format(out=self.out)
            raise MissingFile(f"{p} not found: run `{how}` first" if how else f"{p} not found")
        return p

    def read_table(self, name: str, row_type: type[Row], need: Sequence[str] = (),
                   sheet: Sequence[str] = ()) -> tuple[list[str], list]:
        """(header, typed rows) of CSV file ``name``; MissingFile when it is not there,
        ManifestError when it lacks a column of ``need`` or a cell cannot be parsed.
        The cells of columns ``sheet`` are read back as :meth:`write_table` took them
        (files.unsheet_cell)."""
        header, rows = self.stream_table(name, row_type, need, sheet)
        was = gc.isenabled()
        gc.disable()  # rows hold no cycles: a collection every 700 rows would only rescan them
        try:
            return header, list(rows())
        finally:
            if was:
                gc.enable()

    def stream_table(self, name: str, row_type: type[Row], need: Sequence[str] = (), sheet: Sequence[str] = ()
                     ) -> tuple[list[str], Callable[[], Iterator]]:
        """(header, a function that streams the typed rows of CSV file ``name``; each
        call reads the file again from the start): the errors of :meth:`read_table`,
        the header's at once, a cell's when its row is read. Rows are parsed by the
        row type's compiled reader (the same rows as ``from_csv`` on csv.DictReader's
        dicts, blank lines skipped as it does)."""
        p = self.require(name)
        header = self._header(p)
        lack = [c for c in need if c not in header]
        if lack:
            raise ManifestError(f"{p} lacks column(s) {', '.join(lack)}: not a facecurate {name}")
        parse = row_type.reader(header)
        width = len(header)
        unsheet = [i for i, c in enumerate(header) if c in sheet]

        def rows() -> Iterator:
            with self._csv(p) as reader:
                next(reader, None)
                for cells in reader:
                    if cells:
                        if len(cells) < width:  # every writer writes every cell: a cut-off file
                            raise ManifestError(f"{p} line {reader.line_num}: {len(cells)} cells, {width} columns "
                                                f"(truncated or corrupt file)")
                        for i in unsheet:
                            cells[i] = unsheet_cell(cells[i])
                        try:
                            yield parse(cells)
                        except RowError as e:
                            raise ManifestError(f"{p} line {reader.line_num}: {e}") from None
        return header, rows

    def columns(self, name: str, columns: Sequence[str], numbered: bool = False) -> Iterator[tuple]:
        """The text of ``columns`` of CSV file ``name``, row by row (no typed parsing:
        the fast path for files of millions of rows; blank lines skipped); with
        ``numbered``, (line number, cells). ManifestError when the file lacks one of
        the columns or a row is short."""
        p = self.require(name)
        with self._csv(p) as reader:
            header = next(reader, [])
            where = {c: i for i, c in enumerate(header)}
            lack = [c for c in columns if c not in where]
            if lack:
                raise ManifestError(f"{p} lacks column(s) {', '.join(lack)}: not a facecurate {name}")
            idx = [where[c] for c in columns]
            last = max(idx, default=-1)
            for cells in reader:
                if not cells:
                    continue
                if len(cells) <= last:
                    raise ManifestError(f"{p} line {reader.line_num}: {len(cells)} cells, {len(header)} columns")
                got = tuple(cells[i] for i in idx)
                yield (reader.line_num, got) if numbered else got

    def header(self, name: str) -> list[str]:
        """The columns of CSV file ``name`` (MissingFile when it is not there)."""
        return self._header(self.require(name))

    def _header(self, p: Path) -> list[str]:
        with self._csv(p) as reader:
            return list(next(reader, []))

    @contextlib.contextmanager
    def _csv(self, p: Path):
        """A csv.reader of ``p``; ManifestError when it is not a readable CSV file."""
        try:
            with open(p, newline="", encoding="utf-8") as f:
                yield csv.reader(f)
        except (UnicodeDecodeError, csv.Error) as e:
            raise ManifestError(f"{p}: not a readable CSV file ({e})") from None

    def write_table(self, name: str, columns: Sequence[str], rows: Iterable[Row | Sequence],
                    sheet: Sequence[str] = ()) -> Path:
        """Write CSV file ``name`` atomically, streaming: typed rows (in ``columns``) or
        rows of values in ``columns`` order (floats with four decimals, None empty).
        The cells of columns ``sheet`` are made safe for spreadsheets (files.sheet_cell)."""
        cols = tuple(columns)
        writers: dict = {}
        to_sheet = [i for i, c in enumerate(cols) if c in sheet]

        def cells(r):
            if isinstance(r, Row):
                w = writers.get(type(r))
                if w is None:
                    w = writers[type(r)] = type(r).writer(cols)
                out = w(r)
            else:
                out = [csv_cell(v) for v in r]
            if to_sheet:
                out = list(out)
                for i in to_sheet:
                    out[i] = sheet_cell(out[i])
            return out
        p = self.out / name
        with atomic_write(p, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(cols)
            w.writerows(map(cells, rows))
        return p

    def read_json(self, name: str, required: bool = False) -> dict:
        """A JSON object file of OUT; {} when it is missing (or unreadable, or not an
        object) unless ``required``, then MissingFile / ManifestError."""
        p = self.require(name) if required else self.out / name
        try:
            v = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            if required:
                raise ManifestError(f"{p}: not a readable JSON file ({e})") from None
            return {}
        if not isinstance(v, dict):
            if required:
                raise ManifestError(f"{p}: not a JSON object")
            return {}
        return v

    def write_json(self, name: str, obj: dict) -> Path:
        p = self.out / name
        write_text_atomic(p, json.dumps(obj, indent=2, sort_keys=True) + "\n")
        return p

    # ------------------------------------------------------------------ align
    def align_rows(self) -> list[AlignRow]:
        return self.read_table(C.ALIGN_MANIFEST, AlignRow, ("source", "identity", "face", "status", "aligned"))[1]

    def write_align(self, rows: Iterable[AlignRow], name: str = C.ALIGN_MANIFEST) -> Path:
        return self.write_table(name, C.ALIGN_COLUMNS, rows)

    def align_meta(self) -> dict:
        """align.json ({} when missing or unreadable): raw, settings, versions. A
        :class:`~facecurate.common.provenance.VersionsWarning` when other versions made it."""
        return self._made_by(C.ALIGN_META)

    def _made_by(self, name: str) -> dict:
        """A stage's JSON; warns once when it records other library versions than
        those installed now (a later stage reading an OUT made under them)."""
        meta = self.read_json(name)
        warn_if_other(self.out / name, meta)
        return meta

    def raw_dir(self) -> Optional[Path]:
        """RAW as align recorded it, when it is still there."""
        raw = self.align_meta().get("raw")
        if isinstance(raw, str) and os.path.isabs(raw) and os.path.isdir(raw):
            return Path(raw)
        return None

    def crop_size(self) -> Optional[int]:
        """The crop size align recorded (settings.size), None when unknown."""
        m = self.align_meta()
        s = (m.get("settings") or {}).get("size") if isinstance(m.get("settings"), dict) else None
        s = s or m.get("size")
        try:
            return int(s) if s else None
        except (TypeError, ValueError):
            return None

    # ------------------------------------------------------------------ embedding store
    def has_store(self) -> bool:
        return self.has(C.EMBEDDINGS_NPY) and self.has(C.EMBEDDINGS_CSV)

    def store_meta(self) -> dict:
        return self._made_by(C.EMBEDDINGS_META)

    def store(self, *, mmap: bool = False) -> Store:
        """The embedding store; MissingFile when there is none, ManifestError when its
        .csv and .npy disagree."""
        if not self.has_store():
            raise MissingFile(f"no embedding store in {self.out} (run: facecurate embed {self.out})")
        vecs = self.store_vectors(mmap=mmap)
        _, rows = self.read_table(C.EMBEDDINGS_CSV, EmbeddingRow, ("aligned",))
        self.check_store_rows(len(rows), len(vecs))
        return Store(vecs, rows, self.store_meta())

    def store_vectors(self, *, mmap: bool = False):
        """The store's vectors alone (N, D): read as float32 (a float16 store cast), or
        with ``mmap`` mapped read-only as stored, float32 or float16 (stores larger than
        memory: the caller casts the rows it reads, ``np.asarray(rows, np.float32)``).
        MissingFile when there is none, ManifestError when the .npy cannot be read or
        holds numbers of another type (``constants.STORE_DTYPES``)."""
        import numpy as np

        p = self.require(C.EMBEDDINGS_NPY)
        try:
            vecs = np.load(p, mmap_mode="r" if mmap else None)
        except ValueError as e:
            raise ManifestError(f"{p}: not a readable .npy file ({e})") from None
        if vecs.dtype.name not in C.STORE_DTYPES:
            raise ManifestError(f"{p}: holds {vecs.dtype.name} numbers, not one of {', '.join(C.STORE_DTYPES)} "
                                f"(rerun: facecurate embed {self.out} --overwrite)")
        return vecs if mmap else vecs.astype(np.float32, copy=False)

    def store_columns(self, *columns: str) -> Iterator[tuple[str, ...]]:
        """The text of ``columns`` of embeddings.csv, row by row (row i names vector i):
        the fast path for stores of millions of rows (see :meth:`columns`)."""
        return self.columns(C.EMBEDDINGS_CSV, columns)

    def check_store_rows(self, rows: int, vectors: int) -> None:
        """ManifestError when embeddings.csv's ``rows`` do not name the .npy's ``vectors``."""
        if rows != vectors:
            raise ManifestError(f"{self.out}: {C.EMBEDDINGS_CSV} has {rows} rows but {C.EMBEDDINGS_NPY} "
                                f"{vectors} vectors (rerun: facecurate embed {self.out})")

    def write_store(self, npy: bytes, rows: Iterable[EmbeddingRow]) -> None:
        """The store's vectors and rows (each atomic); the caller then writes the .json
        with :meth:`write_store_meta`, last, which marks the store whole."""
        write_bytes_atomic(self.out / C.EMBEDDINGS_NPY, npy)
        self.write_table(C.EMBEDDINGS_CSV, C.EMBEDDINGS_COLUMNS, rows)

    def write_store_meta(self, meta: dict) -> Path:
        return self.write_json(C.EMBEDDINGS_META, meta)

    @contextlib.contextmanager
    def store_writer(self, rows: int, dim: int, dtype: str = C.STORE_DTYPES[0]) -> Iterator["StoreWriter"]:
        """A store of ``rows`` vectors of ``dim`` (stored as ``dtype``) written piece by piece (memory bounded
        by a piece, not the store): the .npy through a memory map, embeddings.csv
        streamed, both under temporary names renamed at the end, only when every
        vector was given; the bytes equal :meth:`write_store`'s. The caller writes
        the meta after (:meth:`write_store_meta`)."""
        npy_tmp = None
        try:
            with atomic_write(self.out / C.EMBEDDINGS_CSV, "w", encoding="utf-8", newline="") as f:
                fd, tmp = temp_beside(self.out / C.EMBEDDINGS_NPY)
                os.close(fd)
                npy_tmp = Path(tmp)
                w = StoreWriter(f, npy_tmp, rows, dim, dtype)
                yield w
                w.close()
                os.replace(npy_tmp, self.out / C.EMBEDDINGS_NPY)
        finally:
            if npy_tmp is not None:
                npy_tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ clean
    def clean_table(self, need: Sequence[str] = CLEAN_NEED) -> tuple[tuple[str, ...], list[CleanRow]]:
        """(layout columns, rows) of clean.csv: CLEAN_COLUMNS, or REC_CLEAN_COLUMNS for
        a packed dataset's; ManifestError when it lacks a column of ``need``."""
        header, rows = self.read_table(C.CLEAN_CSV, CleanRow, need)
        return clean_columns(rows, header), rows

    def clean_rows(self, need: Sequence[str] = CLEAN_NEED) -> list[CleanRow]:
        return self.clean_table(need)[1]

    def stream_clean(self, need: Sequence[str] = CLEAN_NEED) -> Callable[[], Iterator[CleanRow]]:
        """A function that streams clean.csv's typed rows (each call reads the file
        again): for steps whose memory must not grow with the number of rows."""
        return self.stream_table(C.CLEAN_CSV, CleanRow, need)[1]

    def write_clean(self, rows: Iterable[CleanRow | Sequence], columns: Sequence[str] = C.CLEAN_COLUMNS) -> Path:
        return self.write_table(C.CLEAN_CSV, columns, rows)

    def identities(self) -> list[IdentityRow]:
        """identities.csv's rows, names exact (the file is written for spreadsheets)."""
        return self.read_table(C.IDENTITIES_CSV, IdentityRow, ("identity",), C.SHEET_COLUMNS)[1]

    def write_identities(self, rows: Iterable[IdentityRow]) -> Path:
        return self.write_table(C.IDENTITIES_CSV, C.IDENTITY_COLUMNS, rows, C.SHEET_COLUMNS)

    def write_merges(self, rows: Iterable[MergeRow]) -> Path:
        return self.write_table(C.MERGES_CSV, C.MERGE_COLUMNS, rows)

    def clean_meta(self) -> dict:
        """clean.json ({} when missing or unreadable): summary, params, versions."""
        return self._made_by(C.CLEAN_META)

    def write_clean_meta(self, obj: dict) -> Path:
        return self.write_json(C.CLEAN_META, obj)

    # ------------------------------------------------------------------ review
    def write_review_table(self, rows: Iterable[ReviewRow], name: str = C.REVIEW_CSV) -> Path:
        return self.write_table(name, C.REVIEW_COLUMNS, rows, C.SHEET_COLUMNS)


__all__ = ["Workspace", "Store", "StoreWriter", "MissingFile", "ManifestError", "MAKERS"]
