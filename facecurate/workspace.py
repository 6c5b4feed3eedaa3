"""OUT as one object: the only code that reads or writes the files the stages leave in
OUT (align.csv and align.json, the embedding store, clean.csv, identities.csv,
merges.csv, clean.json, review.csv). Rows come and go as the typed rows of
:mod:`facecurate.manifests`; every write is atomic (temporary name + rename).

One error style: a file a stage needs and OUT lacks is a :class:`MissingFile`
(a FileNotFoundError) naming the path and the command that makes it; a file that
exists but cannot be parsed is a :class:`ManifestError` (a ValueError) naming the
path, the line and the column."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from facecurate import constants as C
from facecurate.files import csv_text, write_bytes_atomic, write_text_atomic
from facecurate.manifests import (AlignRow, CleanRow, EmbeddingRow, IdentityRow, MergeRow, ReviewRow, Row,
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
    """The embedding store: vectors (N, D) float32, row i of ``rows`` naming vector i."""

    vecs: Any
    rows: list[EmbeddingRow]
    meta: dict


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

    def has(self, name: str) -> bool:
        return (self.out / name).exists()

    def require(self, name: str, maker: Optional[str] = None) -> Path:
        """The path of ``name``, or MissingFile naming the command that makes it."""
        p = self.out / name
        if not p.exists():
            how = (maker or MAKERS.get(name, "")).format(out=self.out)
            raise MissingFile(f"{p} not found: run `{how}` first" if how else f"{p} not found")
        return p

    def read_table(self, name: str, row_type: type[Row], need: Sequence[str] = ()) -> tuple[list[str], list]:
        """(header, typed rows) of CSV file ``name``; MissingFile when it is not there,
        ManifestError when it lacks a column of ``need`` or a cell cannot be parsed."""
        header, rows = self.stream_table(name, row_type, need)
        return header, list(rows())

    def stream_table(self, name: str, row_type: type[Row], need: Sequence[str] = ()
                     ) -> tuple[list[str], Callable[[], Iterator]]:
        """(header, a function that streams the typed rows of CSV file ``name``; each
        call reads the file again from the start): the errors of :meth:`read_table`,
        the header's at once, a cell's when its row is read."""
        p = self.require(name)
        try:
            with open(p, newline="", encoding="utf-8") as f:
                header = list(csv.DictReader(f).fieldnames or [])
        except (UnicodeDecodeError, csv.Error) as e:
            raise ManifestError(f"{p}: not a readable CSV file ({e})") from None
        lack = [c for c in need if c not in header]
        if lack:
            raise ManifestError(f"{p} lacks column(s) {', '.join(lack)}: not a facecurate {name}")
        parse = row_type.from_csv

        def rows() -> Iterator:
            try:
                with open(p, newline="", encoding="utf-8") as f:
                    reader = csv.DictReader(f)
                    for r in reader:
                        try:
                            yield parse(r)
                        except RowError as e:
                            raise ManifestError(f"{p} line {reader.line_num}: {e}") from None
            except (UnicodeDecodeError, csv.Error) as e:
                raise ManifestError(f"{p}: not a readable CSV file ({e})") from None
        return header, rows

    def write_table(self, name: str, columns: Sequence[str], rows: Iterable[Row | Sequence]) -> Path:
        """Write CSV file ``name`` atomically: typed rows (in ``columns``) or rows of
        cells already in ``columns`` order."""
        cols = tuple(columns)
        cells = (r.to_csv(cols) if isinstance(r, Row) else r for r in rows)
        p = self.out / name
        write_text_atomic(p, csv_text(cols, cells))
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
        """align.json ({} when missing or unreadable): raw, settings, version."""
        return self.read_json(C.ALIGN_META)

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
        return self.read_json(C.EMBEDDINGS_META)

    def store(self, *, mmap: bool = False) -> Store:
        """The embedding store; MissingFile when there is none, ManifestError when its
        .csv and .npy disagree."""
        import numpy as np

        if not self.has_store():
            raise MissingFile(f"no embedding store in {self.out} (run: facecurate embed {self.out})")
        vecs = np.load(self.out / C.EMBEDDINGS_NPY, mmap_mode="r" if mmap else None)
        _, rows = self.read_table(C.EMBEDDINGS_CSV, EmbeddingRow, ("aligned",))
        if len(rows) != len(vecs):
            raise ManifestError(f"{self.out}: {C.EMBEDDINGS_CSV} has {len(rows)} rows but {C.EMBEDDINGS_NPY} "
                                f"{len(vecs)} vectors (rerun: facecurate embed {self.out})")
        return Store(vecs, rows, self.store_meta())

    def write_store(self, npy: bytes, rows: Iterable[EmbeddingRow], meta: dict) -> None:
        """The store's three files (each atomic; the .json, written last, marks it whole)."""
        write_bytes_atomic(self.out / C.EMBEDDINGS_NPY, npy)
        self.write_table(C.EMBEDDINGS_CSV, C.EMBEDDINGS_COLUMNS, rows)
        self.write_json(C.EMBEDDINGS_META, meta)

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
        return self.read_table(C.IDENTITIES_CSV, IdentityRow, ("identity",))[1]

    def write_identities(self, rows: Iterable[IdentityRow]) -> Path:
        return self.write_table(C.IDENTITIES_CSV, C.IDENTITY_COLUMNS, rows)

    def merges(self) -> list[MergeRow]:
        return self.read_table(C.MERGES_CSV, MergeRow, ("a", "b"))[1]

    def write_merges(self, rows: Iterable[MergeRow]) -> Path:
        return self.write_table(C.MERGES_CSV, C.MERGE_COLUMNS, rows)

    def clean_meta(self) -> dict:
        """clean.json ({} when missing or unreadable): summary and params."""
        return self.read_json(C.CLEAN_META)

    def write_clean_meta(self, obj: dict) -> Path:
        return self.write_json(C.CLEAN_META, obj)

    # ------------------------------------------------------------------ review
    def write_review_table(self, rows: Iterable[ReviewRow], name: str = C.REVIEW_CSV) -> Path:
        return self.write_table(name, C.REVIEW_COLUMNS, rows)


__all__ = ["Workspace", "Store", "MissingFile", "ManifestError", "MAKERS"]
