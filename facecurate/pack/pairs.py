"""LFW-style pairs files: the one parser (used by ``eval-pairs`` and ``pack-pairs``),
and ``pack-pairs``, which writes a ``(bins, issame_list)`` verification set like
insightface's ``lfw.bin``.

A pairs file (docs/formats.md, "Verification sets and pairs files"): an optional header on the first
non-blank line, ``folds n`` or just ``n`` (one fold); then one pair per line,
``name i j`` (two images of one person) or ``name1 i name2 j`` (two people), fields
separated by tabs or spaces. Image ``i`` of ``name`` is ``<name>/<name>_<i:04d>.jpg``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

from facecurate.common.constants import ALIGN_MANIFEST, IMAGE_EXTENSIONS, UNRESOLVED_SUFFIX
from facecurate.common.files import write_bytes_atomic
from facecurate.common.workspace import Workspace
from facecurate.pack.pack_inputs import PackError


class PairsError(ValueError):
    """A pairs file that cannot be used as a whole."""


class PairLine(NamedTuple):
    """One pair line of a pairs file: ``a`` and ``b`` are (name, image number), or
    None with ``problem`` saying why the line is not a pair."""
    line: int  # 1-based line number in the file
    text: str
    a: Optional[tuple[str, int]]
    b: Optional[tuple[str, int]]
    same: bool
    problem: str = ""


class PairsFile(NamedTuple):
    header: Optional[tuple[int, int]]  # (folds, pairs of each kind per fold); "n" alone = (1, n)
    lines: list[PairLine]  # every non-blank line after the header, in file order


def image_stem(name: str, number: int) -> str:
    """``<name>/<name>_NNNN`` (LFW's naming, without the extension)."""
    return f"{name}/{name}_{number:04d}"


def _parse_line(n: int, text: str, t: list[str]) -> PairLine:
    if len(t) not in (3, 4):
        return PairLine(n, text, None, None, False,
                        f"expected 3 or 4 fields ('name i j' or 'name1 i name2 j'), got {len(t)}")
    nums = (t[1], t[2]) if len(t) == 3 else (t[1], t[3])
    try:
        i, j = int(nums[0]), int(nums[1])
    except ValueError:
        bad = next(x for x in nums if not _is_int(x))
        return PairLine(n, text, None, None, False, f"image number {bad!r} is not an integer")
    if len(t) == 3:
        return PairLine(n, text, (t[0], i), (t[0], j), True)
    return PairLine(n, text, (t[0], i), (t[2], j), False)


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def parse_pairs(path: os.PathLike | str) -> PairsFile:
    """Every line of a pairs file, parsed; malformed lines are kept with their problem
    (the caller decides whether that is fatal)."""
    header: Optional[tuple[int, int]] = None
    lines: list[PairLine] = []
    seen_first = False
    try:
        content = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PairsError(f"{path}: not a pairs file (not UTF-8 text: {e.reason} at byte {e.start})") from None
    for n, text in enumerate(content.splitlines(), 1):
        t = text.split()
        if not t:
            continue
        if not seen_first:
            seen_first = True
            if len(t) <= 2 and all(x.isdigit() for x in t):
                header = (int(t[0]), int(t[1])) if len(t) == 2 else (1, int(t[0]))
                continue
        lines.append(_parse_line(n, text, t))
    return PairsFile(header, lines)


# ----------------------------------------------------------------------------- pack-pairs
@dataclass
class PairsResult:
    dest: Path
    pairs: int = 0
    same: int = 0
    different: int = 0
    shapes: list = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)  # "line N: reason"

    def summary(self) -> dict:
        return {"dest": str(self.dest), "pairs": self.pairs, "same": self.same, "different": self.different,
                "images": 2 * self.pairs, "shapes": ", ".join("x".join(map(str, s)) for s in self.shapes),
                "unresolved_pairs": len(self.unresolved),
                "unresolved_file": str(_unresolved_path(self.dest)) if self.unresolved else "",
                "unresolved": self.unresolved}


def _unresolved_path(dest: Path) -> Path:
    return dest.with_name(dest.name + UNRESOLVED_SUFFIX)


class _Resolver:
    """(encoded image, shape) of image ``i`` of ``name`` under ROOT, or (None, why).
    ROOT is a folder of ``<name>/<name>_NNNN.<ext>`` crops, or an align OUT whose
    align.csv maps each photo to its primary crop. Results are cached."""

    def __init__(self, root: Path):
        self.root = root
        self.crop_of: Optional[dict[str, str]] = None
        ws = Workspace(root)
        if ws.has(ALIGN_MANIFEST):
            self.crop_of = {r.source: r.aligned for r in ws.align_rows() if r.is_primary_ok and r.aligned}
        self.cache: dict[tuple, tuple] = {}

    def __call__(self, name: str, i: int) -> tuple:
        if (name, i) not in self.cache:
            self.cache[(name, i)] = self._resolve(image_stem(name, i))
        return self.cache[(name, i)]

    def _find(self, stem: str) -> tuple[Optional[Path], str]:
        crop_of, root = self.crop_of, self.root
        if crop_of is not None:
            rel = crop_of.get(stem + ".jpg")
            if rel is None:
                rel = next((crop_of[stem + e] for e in IMAGE_EXTENSIONS if stem + e in crop_of), None)
            return (None, f"{stem}.jpg: no primary crop in {ALIGN_MANIFEST}") if rel is None else (root / rel, "")
        path = next((root / (stem + e) for e in IMAGE_EXTENSIONS if (root / (stem + e)).exists()), None)
        return (None, f"{stem}.jpg: not found (nor another image extension)") if path is None else (path, "")

    def _resolve(self, stem: str) -> tuple:
        import cv2
        import numpy as np

        path, why = self._find(stem)
        if path is None:
            return None, why
        try:
            data = path.read_bytes()
        except OSError as e:
            return None, f"{stem}: cannot read {path.name}: {e.strerror or e}"
        a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        return (data, tuple(a.shape)) if a is not None else (None, f"{stem}: {path.name} is not a decodable image")


def pack_pairs(pairs: os.PathLike | str, root: os.PathLike | str, dest: os.PathLike | str, *,
               strict: bool = False) -> PairsResult:
    """Write ``dest`` = pickle of ``(bins, issame_list)`` like insightface's lfw.bin.

    ``pairs``: a pairs file (see the module). ``root``: a folder of
    ``<Name>/<Name>_NNNN.<ext>`` crops, or an align OUT folder (with align.csv), where
    photo ``<Name>/<Name>_NNNN.jpg`` maps to its primary crop. Pairs that cannot be
    resolved are left out and reported (``strict``: raise instead)."""
    import pickle

    pairs, root, dest = Path(pairs), Path(root), Path(dest)
    res = PairsResult(dest=dest)
    resolve = _Resolver(root)
    bins: list[bytes] = []
    issame: list[bool] = []
    shapes: set = set()
    for p in parse_pairs(pairs).lines:
        if p.problem:
            res.unresolved.append(f"line {p.line}: {p.problem}: {p.text.strip()!r}")
            continue
        ra, rb = resolve(*p.a), resolve(*p.b)
        if ra[0] is None or rb[0] is None:
            res.unresolved.append(f"line {p.line}: " + "; ".join(r[1] for r in (ra, rb) if r[0] is None))
            continue
        bins += [ra[0], rb[0]]
        issame.append(p.same)
        shapes.update((ra[1], rb[1]))
    if strict and res.unresolved:
        raise PackError(f"{len(res.unresolved)} pair(s) cannot be resolved and --strict (first: {res.unresolved[0]})")
    if not issame:
        raise PackError(f"no pair of {pairs} could be resolved under {root}"
                        + (f" (first problem: {res.unresolved[0]})" if res.unresolved else ""))
    write_bytes_atomic(dest, pickle.dumps((bins, issame), protocol=4))
    report = _unresolved_path(dest)
    if res.unresolved:
        write_bytes_atomic(report, ("\n".join(res.unresolved) + "\n").encode("utf-8"))
    elif report.exists():
        report.unlink()
    res.pairs = len(issame)
    res.same = sum(issame)
    res.different = res.pairs - res.same
    res.shapes = sorted(shapes)
    return res
