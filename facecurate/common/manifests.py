"""Typed rows of every CSV file a stage writes into OUT: align.csv, embeddings.csv,
clean.csv (both layouts), identities.csv, merges.csv and review.csv.

Each row is a frozen dataclass whose fields are the file's columns, in the file's
order. ``Row.from_csv(mapping)`` parses one ``csv.DictReader`` row (a missing
column reads as empty); ``row.to_csv()`` gives the cells as text in column order,
formatted exactly as the stages have always written them: floats with four decimals
(:func:`facecurate.common.files.format_float`), NaN and None as an empty cell, flags as
``0``/``1``. A cell that cannot be parsed raises :class:`RowError` naming the column
and the text. :mod:`facecurate.common.workspace` reads and writes the files themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Callable, ClassVar, Mapping, Optional, Sequence

from facecurate.common import constants as C
from facecurate.common.files import format_float

NAN = float("nan")


class RowError(ValueError):
    """A manifest cell that cannot be parsed as its column's type."""


# ----------------------------------------------------------------------------- cells
def parse_float(text, column: str = "value") -> float:
    """The one float parser of manifest cells: empty (or None) is NaN; anything
    else must be a number (RowError otherwise)."""
    if not text:
        return NAN
    try:
        return float(text)
    except (TypeError, ValueError):
        if isinstance(text, str) and not text.strip():
            return NAN
        raise RowError(f"column {column!r}: {text!r} is not a number") from None


def parse_int(text, column: str = "value") -> Optional[int]:
    """An integer cell; empty is None. ``3.0`` is accepted (some tools write it)."""
    if not text:
        return None
    try:
        return int(text)
    except (TypeError, ValueError):
        pass
    s = str(text).strip()
    if not s:
        return None
    try:
        v = float(s)
    except ValueError:
        v = NAN
    if not math.isfinite(v) or v != int(v):
        raise RowError(f"column {column!r}: {text!r} is not an integer")
    return int(v)


def parse_flag(text, column: str = "value") -> Optional[bool]:
    """A 0/1 cell; empty is None."""
    s = "" if text is None else str(text).strip()
    if not s:
        return None
    if s in ("0", "1"):
        return s == "1"
    raise RowError(f"column {column!r}: {text!r} is not 0 or 1")


def finite_or(v: float, default: float) -> float:
    """``v``, or ``default`` when it is NaN or infinite (a missing cell)."""
    return v if math.isfinite(v) else default


def _fmt_float(v: float) -> str:
    return format_float(v)


def fmt_int(v: Optional[int]) -> str:
    return "" if v is None else str(int(v))


def _fmt_flag(v: Optional[bool]) -> str:
    return "" if v is None else ("1" if v else "0")


#: column kind -> (parser, formatter): the reference the compiled converters equal
_CODECS = {
    "str": (lambda t, c: "" if t is None else str(t), lambda v: v),
    "float": (parse_float, _fmt_float),
    "int": (parse_int, fmt_int),
    "flag": (parse_flag, _fmt_flag),
}
_KINDS = {"str": "str", "float": "float", "Optional[int]": "int", "int": "int", "Optional[bool]": "flag"}


class Row:
    """Base of the typed rows: ``COLUMNS`` are the file's columns (the dataclass's
    fields, or a selection of them for a file with several layouts).

    Reading and writing many rows goes through converters compiled once per class
    and layout (:meth:`reader`, :meth:`to_csv`): one expression per row, the common
    cells parsed inline; a row the fast path cannot take (a bad cell, a short row,
    ``3.0`` in an integer column) is parsed again by :meth:`from_csv`, whose result
    or RowError is the answer. Both paths give the same rows."""

    __slots__ = ()
    COLUMNS: ClassVar[tuple[str, ...]] = ()
    _codec: ClassVar[dict]
    _readers: ClassVar[dict]
    _writers: ClassVar[dict]

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls._codec, cls._readers, cls._writers = {}, {}, {}

    @classmethod
    def _codecs(cls) -> dict:
        if not cls._codec:
            for f in fields(cls):
                cls._codec[f.name] = _KINDS[f.type if isinstance(f.type, str) else f.type.__name__]
        return cls._codec

    @classmethod
    def from_csv(cls, row: Mapping[str, str]):
        """The typed row of one CSV row (a dict of column -> text)."""
        get = row.get
        return cls(**{name: _CODECS[kind][0](get(name), name) for name, kind in cls._codecs().items()})

    @classmethod
    def reader(cls, header: Sequence[str]) -> Callable[[Sequence[str]], "Row"]:
        """A function from one ``csv.reader`` row (cells in ``header`` order) to a typed
        row: what :meth:`from_csv` gives for the same row as a dict."""
        key = tuple(header)
        fn = cls._readers.get(key)
        if fn is None:
            fn = cls._readers[key] = _compile_reader(cls, key)
        return fn

    def to_csv(self, columns: Optional[Sequence[str]] = None) -> list[str]:
        """The row's cells as text, in ``columns`` order (default ``COLUMNS``)."""
        return self.writer(columns)(self)

    @classmethod
    def writer(cls, columns: Optional[Sequence[str]] = None) -> Callable[["Row"], list[str]]:
        """A function from a typed row to its cells as text in ``columns`` order."""
        key = tuple(columns or cls.COLUMNS)
        fn = cls._writers.get(key)
        if fn is None:
            fn = cls._writers[key] = _compile_writer(cls, key)
        return fn

    def to_dict(self, columns: Optional[Sequence[str]] = None) -> dict[str, str]:
        cols = columns or self.COLUMNS
        return dict(zip(cols, self.to_csv(cols)))

    def replace(self, **changes):
        return replace(self, **changes)


# ----------------------------------------------------------------------------- compiled converters
#: kind -> inline expression parsing the text ``x`` (a ValueError/KeyError falls back to from_csv)
_PARSE_EXPR = {"str": "{cell}", "float": "(float(x) if (x := {cell}) else NAN)",
               "int": "(int(x) if (x := {cell}) else None)", "flag": "_FLAG[{cell}]"}
#: kind -> the value of a column the file does not have (what the parser makes of None)
_MISSING = {"str": "", "float": NAN, "int": None, "flag": None}
_FLAG = {"": None, "0": False, "1": True}
#: kind -> inline expression formatting the value ``v`` as the cell text (floats: _compile_writer)
_FORMAT_EXPR = {
    "str": "v",
    "int": '("" if v is None else str(int(v)))',
    "flag": '("" if v is None else ("1" if v else "0"))',
}


def _compile_reader(cls, header: tuple[str, ...]) -> Callable:
    where = {name: i for i, name in enumerate(header)}  # the last of a repeated column, as DictReader
    args, env = [], {"NAN": NAN, "_FLAG": _FLAG, "_cls": cls, "_slow": _slow_reader(cls, header)}
    for name, kind in cls._codecs().items():
        if name in where:
            args.append(f"{name}=" + _PARSE_EXPR[kind].format(cell=f"c[{where[name]}]"))
        else:
            env[f"_m_{name}"] = _MISSING[kind]
            args.append(f"{name}=_m_{name}")
    src = ("def read(c):\n    try:\n        return _cls(" + ", ".join(args) + ")\n"
           "    except (ValueError, KeyError, IndexError, TypeError):\n        pass\n    return _slow(c)\n")
    exec(compile(src, f"<{cls.__name__} reader>", "exec"), env)
    return env["read"]


def _slow_reader(cls, header: tuple[str, ...]) -> Callable:
    def slow(cells):
        return cls.from_csv(dict(zip(header, cells)))  # a short row: the missing cells read as None
    return slow


def _compile_writer(cls, columns: tuple[str, ...]) -> Callable:
    """The row's float cells are formatted in one ``%`` operation (NaN -> empty,
    ``-0.0000`` -> ``0.0000``: :func:`facecurate.common.files.format_float` on each)."""
    codecs = cls._codecs()
    floats = [name for name in columns if codecs[name] == "float"]
    cells, pre = [], ""
    for name in columns:
        kind = codecs[name]
        if kind == "float":
            cells.append(f"f[{floats.index(name)}]")
        elif kind == "str":
            cells.append(f"r.{name}")
        else:
            cells.append(_FORMAT_EXPR[kind].replace("v", f"(v := r.{name})", 1))
    if floats:
        fmt = "\\x00".join(["%.4f"] * len(floats))
        pre = (f'    f = ("{fmt}" % (' + "".join(f"r.{n}, " for n in floats) + '))'
               '.replace("nan", "").replace("-0.0000", "0.0000").split("\\x00")\n')
    src = "def write(r):\n" + pre + "    return [" + ", ".join(cells) + "]\n"
    env: dict = {}
    exec(compile(src, f"<{cls.__name__} writer>", "exec"), env)
    return env["write"]


# ----------------------------------------------------------------------------- align.csv
@dataclass(frozen=True, slots=True)
class AlignRow(Row):
    """One row of align.csv: a face of a source photo, or the reason it has none."""

    COLUMNS: ClassVar[tuple[str, ...]] = C.ALIGN_COLUMNS

    source: str  # path relative to RAW (POSIX)
    identity: str  # top-level folder under RAW, "" for a file directly in RAW
    face: Optional[int]  # index of the face within the source, -1 when none
    status: str  # ok, or the reason there is no crop
    primary: Optional[bool]  # align's guess of the photo's subject
    aligned: str = ""  # crop path relative to OUT, empty unless ok
    x1: float = NAN
    y1: float = NAN
    x2: float = NAN
    y2: float = NAN
    det_score: float = NAN
    le_x: float = NAN
    le_y: float = NAN
    re_x: float = NAN
    re_y: float = NAN
    nose_x: float = NAN
    nose_y: float = NAN
    ml_x: float = NAN
    ml_y: float = NAN
    mr_x: float = NAN
    mr_y: float = NAN
    sharpness: float = NAN  # variance of the Laplacian of the grey crop
    blockiness: float = NAN  # JPEG 8x8 grid strength over the face box in the source (about 1: none)
    flat_share: float = NAN  # share of the crop's face cells that are flat (a covered part of the face)
    face_size: float = NAN  # sqrt(box area) in source pixels
    img_w: Optional[int] = None  # source size after EXIF orientation
    img_h: Optional[int] = None
    detector: str = ""
    message: str = ""  # human-readable detail for non-ok rows

    @property
    def is_ok(self) -> bool:
        return self.status == C.STATUS_OK

    @property
    def is_primary_ok(self) -> bool:
        """A crop of the photo's subject: what pack and pair evaluation take."""
        return self.status == C.STATUS_OK and bool(self.primary)

    @property
    def has_face(self) -> bool:
        return self.face is not None and self.face >= 0

    @property
    def box(self) -> Optional[tuple[float, float, float, float]]:
        b = (self.x1, self.y1, self.x2, self.y2)
        return b if all(math.isfinite(v) for v in b) else None

    @property
    def points(self) -> Optional[tuple[float, ...]]:
        """The 5 ArcFace points in source pixels (10 floats), None when not recorded."""
        p = tuple(getattr(self, c) for c in C.LANDMARK_COLUMNS)
        return p if all(math.isfinite(v) for v in p) else None

    def sort_key(self) -> tuple:
        return (self.source, -1 if self.face is None else self.face)


# ----------------------------------------------------------------------------- embeddings.csv
@dataclass(frozen=True, slots=True)
class EmbeddingRow(Row):
    """One row of the embedding store's embeddings.csv (row i names vector i)."""

    COLUMNS: ClassVar[tuple[str, ...]] = C.EMBEDDINGS_COLUMNS

    aligned: str  # the store key: crop path relative to OUT, or rec:<key>
    source: str
    identity: str
    face: str  # as the input gave it ("" for a folder of crops)


# ----------------------------------------------------------------------------- clean.csv
@dataclass(frozen=True, slots=True)
class CleanRow(Row):
    """One row of clean.csv. An align run's clean.csv has ``CLEAN_COLUMNS`` (``key``
    and ``label`` are None); a packed dataset's has ``REC_CLEAN_COLUMNS`` (no
    source, face, box or detector columns)."""

    COLUMNS: ClassVar[tuple[str, ...]] = C.CLEAN_COLUMNS
    REC_COLUMNS: ClassVar[tuple[str, ...]] = C.REC_CLEAN_COLUMNS

    identity: str
    aligned: str
    decision: str  # keep | drop | review
    reason: str
    score: float = NAN  # cosine similarity to the robust identity centre
    cluster: Optional[int] = None  # 0 = dominant, -1 none
    duplicate_of: str = ""
    previous_decision: str = ""  # audit: decision before a manual review was applied
    previous_reason: str = ""
    source: str = ""
    face: Optional[int] = None
    x1: float = NAN
    y1: float = NAN
    x2: float = NAN
    y2: float = NAN
    primary: Optional[bool] = None
    det_score: float = NAN
    sharpness: float = NAN
    key: Optional[int] = None  # packed dataset: the record's key
    label: Optional[int] = None  # packed dataset: the record's label

    @property
    def is_rec(self) -> bool:
        return self.key is not None

    def columns(self) -> tuple[str, ...]:
        return self.REC_COLUMNS if self.is_rec else self.COLUMNS

    def manual(self, decision: str) -> "CleanRow":
        """This row decided by a person: ``decision`` with reason ``manual``; clean's
        own decision and reason kept in previous_* (only the first time)."""
        if self.reason == C.REASON_MANUAL:
            return replace(self, decision=decision)
        return replace(self, decision=decision, reason=C.REASON_MANUAL, previous_decision=self.decision,
                       previous_reason=self.reason)


def clean_columns(rows: Sequence[CleanRow], header: Optional[Sequence[str]] = None) -> tuple[str, ...]:
    """The layout of a clean.csv: REC_CLEAN_COLUMNS for a packed dataset's (its header,
    or its first row, has ``key``), else CLEAN_COLUMNS."""
    if header is not None:
        return C.REC_CLEAN_COLUMNS if "key" in header else C.CLEAN_COLUMNS
    return C.REC_CLEAN_COLUMNS if rows and rows[0].is_rec else C.CLEAN_COLUMNS


# ----------------------------------------------------------------------------- identities.csv, merges.csv
@dataclass(frozen=True, slots=True)
class IdentityRow(Row):
    """One identity of identities.csv (clean's per-folder summary)."""

    COLUMNS: ClassVar[tuple[str, ...]] = C.IDENTITY_COLUMNS

    identity: str
    images: Optional[int] = None
    faces: Optional[int] = None
    kept: Optional[int] = None
    dropped: Optional[int] = None
    review: Optional[int] = None
    duplicates: Optional[int] = None
    not_subject: Optional[int] = None
    clusters: Optional[int] = None
    dominant_share: float = NAN
    noise: float = NAN
    median_score: float = NAN  # of the kept faces; empty when none is kept
    flags: str = ""  # ";"-separated: ambiguous, excluded, no_faces, ...

    @property
    def flag_list(self) -> list[str]:
        return [f for f in self.flags.split(";") if f]


@dataclass(frozen=True, slots=True)
class MergeRow(Row):
    """Two identities clean suspects are one person (merges.csv)."""

    COLUMNS: ClassVar[tuple[str, ...]] = C.MERGE_COLUMNS

    a: str
    b: str
    similarity: float = NAN


# ----------------------------------------------------------------------------- review.csv
@dataclass(frozen=True, slots=True)
class ReviewRow(Row):
    """One face of review.csv; a person fills in ``decision`` (keep/drop)."""

    COLUMNS: ClassVar[tuple[str, ...]] = C.REVIEW_COLUMNS

    aligned: str
    identity: str = ""
    source: str = ""
    face: Optional[int] = None
    score: float = NAN
    reason: str = ""
    decision: str = ""

    @classmethod
    def of(cls, r: CleanRow) -> "ReviewRow":
        return cls(aligned=r.aligned, identity=r.identity, source=r.source, face=r.face, score=r.score,
                   reason=r.reason, decision="")


__all__ = ["RowError", "Row", "AlignRow", "EmbeddingRow", "CleanRow", "IdentityRow", "MergeRow", "ReviewRow",
           "parse_float", "parse_int", "parse_flag", "finite_or", "clean_columns"]
