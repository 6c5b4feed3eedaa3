"""Small file helpers every stage shares: atomic writes, CSV in and out, hashing,
progress bars and run summaries, and names made safe to show (a terminal, an HTML
page, a spreadsheet)."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import html
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator, Mapping, Sequence

import click


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


#: The end of every temporary name :func:`atomic_write` makes (``.NAME.XXXXXXXX.tmp``).
TMP_SUFFIX = ".tmp"


def temp_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temporary file beside ``path`` (``.NAME.XXXXXXXX.tmp``),
    with the usual permissions; an OSError names ``path``, not the temporary name."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, f"cannot write: {e.strerror}", str(path)) from None
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", fsync: bool = True, **kw) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success (fsync and) rename it over
    ``path``. On any exception the temporary file is removed and ``path`` is left
    untouched, so a reader never sees a half-written file. The rename alone makes
    this safe against a killed process; ``fsync`` adds safety against power loss."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    try:
        try:
            with os.fdopen(fd, mode, **kw) as f:
                yield f
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
        except OSError as e:  # a full disk, a quota, a file size limit: name the file meant
            if e.filename is not None or e.errno is None:
                raise
            raise OSError(e.errno, f"cannot write: {e.strerror}", str(path)) from None
        try:
            os.replace(tmp, path)
        except OSError as e:  # again the file meant, not the temporary name
            raise OSError(e.errno, f"cannot write: {e.strerror}", str(path)) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


#: Characters a name may hold that a terminal or a page must not act on: C0 and C1
#: controls (escape sequences, carriage return, newline, tab), the line and paragraph
#: separators, and the bidirectional controls (U+202A-U+202E, U+2066-U+2069,
#: U+200E/U+200F) that make a name display reversed.
UNSAFE_CHARS = frozenset([*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F),
                          *range(0x2066, 0x206A), 0x200E, 0x200F])
_SHOWN = {c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in UNSAFE_CHARS}
_SHOWN_LINES = {c: v for c, v in _SHOWN.items() if c != 0x0A}


def shown(name, keep_newlines: bool = False) -> str:
    """``name`` as text safe to print on a terminal or show on a page: every
    character of :data:`UNSAFE_CHARS` written as a visible escape (``\\x1b``,
    ``\\x0a`` for a newline, ``\\u202e``); a backslash stays as it is. With
    ``keep_newlines``, newlines are kept (for a message of several lines)."""
    return str(name).translate(_SHOWN_LINES if keep_newlines else _SHOWN)


def shown_html(name) -> str:
    """``name`` as text of an HTML page: :func:`shown`, then HTML-escaped (quotes
    too, so it also fits an attribute a person reads, such as ``title``)."""
    return html.escape(shown(name), quote=True)


#: The first characters that make a spreadsheet read a cell as a formula (OWASP's
#: CSV injection list).
SHEET_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
_QUOTED = (*SHEET_TRIGGERS, "'")


def sheet_cell(text: str) -> str:
    """A text cell of a CSV meant for spreadsheets: prefixed with a single quote
    when it begins with one of :data:`SHEET_TRIGGERS` (``=SUM(A1)`` becomes
    ``'=SUM(A1)``), so that no spreadsheet runs it. A text that already begins with
    a quote followed by one of them (or by another quote) gets one more quote, so
    that :func:`unsheet_cell` gives back every text exactly; ``'t Hooft`` stays."""
    if text.startswith(SHEET_TRIGGERS) or (text.startswith("'") and text[1:].startswith(_QUOTED)):
        return "'" + text
    return text


def unsheet_cell(text: str) -> str:
    """The exact text of a cell written by :func:`sheet_cell` (the one quote it
    added removed); a text it leaves as it is comes back as it is."""
    return text[1:] if text.startswith("'") and text[1:].startswith(_QUOTED) else text


def temp_target(name: str) -> str | None:
    """The file that a temporary named ``name`` (``.NAME.XXXXXXXX.tmp``, as
    :func:`atomic_write` makes them) was to become; None for any other name."""
    if not (name.startswith(".") and name.endswith(TMP_SUFFIX)):
        return None
    return name[1:-len(TMP_SUFFIX)].rpartition(".")[0] or None


def remove_stale_temps(directory: str | os.PathLike, wanted) -> int:
    """Remove from ``directory`` the temporaries that a killed writer left for the
    files about to be written again (``wanted(target_name)`` is true). Only those:
    other writers may be busy in the same folder. Returns how many were removed."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for e in entries:
        target = temp_target(e.name)
        if target and wanted(target):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.path)
                removed += 1
    return removed


def write_bytes_atomic(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    with atomic_write(path, "wb", fsync=fsync) as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def csv_text(columns: Sequence[str], rows: Iterable[Mapping | Sequence]) -> str:
    """Render rows (dicts or sequences) as CSV text with a header, '\\n' line ends."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        if isinstance(r, Mapping):
            w.writerow([csv_cell(r.get(c, "")) for c in columns])
        else:
            w.writerow([csv_cell(v) for v in r])
    return buf.getvalue()


def csv_cell(v) -> str:
    """A value as the text of a CSV cell: None is empty, floats have four decimals."""
    if v is None:
        return ""
    if isinstance(v, float):
        return format_float(v)
    return str(v)


def format_float(v: float, digits: int = 4) -> str:
    """Fixed, platform-independent float text (deterministic CSVs)."""
    if v != v:  # NaN
        return ""
    s = f"{v:.{digits}f}"
    if s.startswith("-") and float(s) == 0.0:
        s = s[1:]
    return s


def write_csv_atomic(path: str | os.PathLike, columns: Sequence[str], rows: Iterable) -> None:
    write_text_atomic(path, csv_text(columns, rows))


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", disable=None, **kw):
    """A tqdm bar on stderr, silent when stderr is not a terminal."""
    from tqdm import tqdm

    if disable is None:
        disable = not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable,
                file=sys.stderr, dynamic_ncols=True, leave=False, **kw)


def say(line: str, err: bool = False) -> None:
    """Print one line that may hold names taken from the input (folder and file
    names, identities): its control and bidirectional characters are shown escaped
    (:func:`shown`), so a name cannot move the cursor, recolour the terminal or
    split the line."""
    click.echo(shown(line), err=err)


def emit_summary(title: str, summary: Mapping, as_json: bool) -> None:
    """Print a run summary: one JSON object on stdout with ``--json`` (JSON escapes
    control characters itself), else a short human table on stdout, each line
    through :func:`say`."""
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True, default=str))
        return
    say(title)
    _echo_mapping(summary, indent=2)


def _echo_mapping(m: Mapping, indent: int) -> None:
    pad = " " * indent
    for k, v in m.items():
        if isinstance(v, Mapping):
            say(f"{pad}{k}:")
            _echo_mapping(v, indent + 2)
        else:
            say(f"{pad}{k}: {v}")
