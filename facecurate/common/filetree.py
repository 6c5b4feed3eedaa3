"""Untrusted folders: listing them and reading one file of them.

A crawled RAW, or a crop folder from elsewhere, may hold anything a file system can:
FIFOs (``open`` blocks forever), devices (``/dev/zero`` never ends), symlinks that
lead out of the folder (to ``/etc``, to ``/``). Two rules, used by align (RAW), embed
(a crop folder) and pack (a crop folder):

- :func:`read_regular` reads only a regular file, at most ``max_bytes`` of it: the
  type and size come from ``stat`` before anything is opened, the open cannot block
  (``O_NONBLOCK``) and ``fstat`` checks the opened file again (it may have been
  swapped in between). A special file raises :class:`FileProblem` ``unsupported``
  ("not a regular file (FIFO)"), a large one ``too_large`` with both sizes.
- :func:`walk_tree` follows a symlink only while its real path stays inside the
  folder given (the boundary: that folder's real path); a link leading out is listed
  with its problem and target, never entered or read, unless ``follow_external``
  (``--follow-external-links``). A directory reached twice (a loop) is skipped with a
  warning either way.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Optional

from facecurate.common.constants import NOT_REGULAR, STATUS_TOO_LARGE, STATUS_UNSUPPORTED

__all__ = ["OPEN_FLAGS", "FileProblem", "TreeEntry", "special_kind", "read_regular", "inside", "link_problem", "walk_tree",
           "too_large"]

#: How an untrusted file is opened: never blocking on a FIFO, never becoming the terminal.
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"))


class FileProblem(Exception):
    """An input that is not read: ``status`` is an align.csv status (``unsupported``,
    ``too_large``), ``message`` says why in one line."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def special_kind(mode: int) -> Optional[str]:
    """"FIFO", "socket", "character device", "block device", "special file", or None
    for a regular file or a directory (a directory fails to read on its own)."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "special file")


def too_large(size: int, max_bytes: int) -> FileProblem:
    return FileProblem(STATUS_TOO_LARGE, f"file is {size} bytes, more than --max-bytes {max_bytes}")


def _check(st: os.stat_result, max_bytes: int) -> None:
    kind = special_kind(st.st_mode)
    if kind:
        raise FileProblem(STATUS_UNSUPPORTED, f"{NOT_REGULAR} ({kind})")
    if st.st_size > max_bytes:
        raise too_large(st.st_size, max_bytes)


def read_regular(path: str | os.PathLike, max_bytes: int, dir_fd: Optional[int] = None) -> bytes:
    """The whole of a regular file of at most ``max_bytes`` bytes (``path`` relative
    to ``dir_fd`` when given). Raises :class:`FileProblem` for a special file or a
    larger one, OSError when it cannot be read (missing, permissions, a directory)."""
    _check(os.stat(path, dir_fd=dir_fd), max_bytes)  # a FIFO or device is never opened
    fd = os.open(path, OPEN_FLAGS, dir_fd=dir_fd)  # O_NONBLOCK: a FIFO swapped in now cannot block
    try:
        st = os.fstat(fd)
        _check(st, max_bytes)
        parts, total, n = [], 0, min(st.st_size, max_bytes) + 1
        while total <= max_bytes:  # the file may grow while it is read
            chunk = os.read(fd, n)
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
            n = 1 << 20
        if total > max_bytes:
            raise too_large(total, max_bytes)
        return parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        os.close(fd)


def inside(real: str, boundary: str) -> bool:
    """Is the real path ``real`` the real path ``boundary`` or under it?"""
    return real == boundary or real.startswith(boundary.rstrip(os.sep) + os.sep)


def link_problem(path: str, boundary: str, what: str) -> Optional[str]:
    """Why the symlink ``path`` is not followed: its real path leaves ``boundary``
    (the real path of the folder ``what``, e.g. "RAW"); None when it stays inside."""
    target = os.path.realpath(path)
    if inside(target, boundary):
        return None
    return f"a link leading out of {what}, to {target}: not followed (--follow-external-links follows it)"


@dataclass(frozen=True)
class TreeEntry:
    rel: str  # POSIX path relative to the root
    folder: bool = False  # a link to a folder that was not entered
    status: str = ""  # why it is not read ("" = read it)
    message: str = ""


def walk_tree(root: str | os.PathLike, *, what: str = "the folder", follow_external: bool = False,
              exclude: Optional[str | os.PathLike] = None,
              skip_dirs: tuple = ()) -> tuple[list[TreeEntry], list[str]]:
    """Every non-hidden file under ``root``, sorted by relative path, and warnings
    (loops, folders that cannot be listed). Symlinks are followed while their real
    path stays under ``root``'s (``follow_external``: wherever they lead); a link
    leading out is an entry with status ``unsupported`` and its target. Folders whose
    real path is ``exclude`` or under it, or named in ``skip_dirs``, are skipped."""
    root = os.fspath(root)
    boundary = os.path.realpath(root)
    excl = os.path.realpath(exclude) if exclude else None
    entries: list[TreeEntry] = []
    warnings: list[str] = []
    seen: set[str] = set()
    stack = [("", root)]
    while stack:  # depth first in name order, as os.walk: the first path to a folder lists it
        rel_dir, path = stack.pop()
        real = os.path.realpath(path)
        if real in seen:
            warnings.append(f"skipped a symlink loop or repeated directory at {path}")
            continue
        if excl and inside(real, excl):
            continue
        seen.add(real)
        try:
            with os.scandir(path) as it:
                found = sorted(it, key=lambda e: e.name)
        except OSError as e:
            warnings.append(f"cannot list {path}: {e.strerror or e}")
            continue
        subdirs = []
        for e in found:
            if e.name.startswith("."):
                continue
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            link = e.is_symlink()
            why = link_problem(e.path, boundary, what) if link and not follow_external else None
            try:
                is_dir = e.is_dir()  # through the link
            except OSError:
                is_dir = False
            if why:
                entries.append(TreeEntry(rel, is_dir, STATUS_UNSUPPORTED, why))
            elif is_dir:
                if e.name not in skip_dirs:
                    subdirs.append((rel, e.path))
            else:
                entries.append(TreeEntry(rel))  # a file, a special file or a broken link: the reader tells
        stack += reversed(subdirs)
    entries.sort(key=lambda t: t.rel)
    return entries, warnings
