"""Cost of typed manifest rows: reading and writing align.csv and clean.csv through
the Workspace (typed rows, :mod:`facecurate.common.manifests`) against plain ``csv``
(``csv.DictReader`` rows of text; ``csv.writer`` of lists of text) in the same run.

    python benchmarks/manifests.py [--rows 200000] [--repeat 3]

Synthetic rows shaped like a real run's (every column filled as align and clean fill
it). Each timing is the median of ``--repeat`` runs; the printed ratio is typed /
plain (1.0: no cost). Writing through the Workspace includes the atomic rename, as
the baseline's file is written the same way (temporary name, fsync, rename).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facecurate.common import constants as C  # noqa: E402
from facecurate.common.manifests import AlignRow, CleanRow  # noqa: E402
from facecurate.common.workspace import Workspace  # noqa: E402


def align_rows(n: int) -> list[AlignRow]:
    out = []
    for i in range(n):
        ok = i % 10 != 9
        x1 = 100.0 + (i % 97) * 1.25
        out.append(AlignRow(
            source=f"person_{i // 20:05d}/photo_{i:07d}.jpg", identity=f"person_{i // 20:05d}", face=0 if ok else -1,
            status=C.STATUS_OK if ok else C.STATUS_NO_FACE, primary=True if ok else None,
            aligned=f"aligned/person_{i // 20:05d}/photo_{i:07d}_0.jpg" if ok else "",
            **({} if not ok else dict(
                x1=x1, y1=x1 + 3.5, x2=x1 + 120.25, y2=x1 + 140.75, det_score=0.9876 - (i % 13) / 1000,
                le_x=x1 + 30.1, le_y=x1 + 50.2, re_x=x1 + 80.3, re_y=x1 + 50.4, nose_x=x1 + 55.5,
                nose_y=x1 + 75.6, ml_x=x1 + 35.7, ml_y=x1 + 100.8, mr_x=x1 + 75.9, mr_y=x1 + 100.1,
                sharpness=123.4567 + i % 50, face_size=130.0 + i % 7, img_w=640, img_h=480,
                detector="dlib_hog")),
            message="" if ok else "no face found"))
    return out


def clean_rows(n: int) -> list[CleanRow]:
    out = []
    for i in range(n):
        x1 = 100.0 + (i % 97) * 1.25
        out.append(CleanRow(
            identity=f"person_{i // 20:05d}", aligned=f"aligned/person_{i // 20:05d}/photo_{i:07d}_0.jpg",
            decision=(C.DECISION_KEEP, C.DECISION_DROP, C.DECISION_REVIEW)[i % 3],
            reason=(C.REASON_CENTRE, C.REASON_FAR, C.REASON_UNCERTAIN)[i % 3], score=0.9 - (i % 50) / 100,
            cluster=i % 3 - 1, duplicate_of="", source=f"person_{i // 20:05d}/photo_{i:07d}.jpg", face=0,
            x1=x1, y1=x1 + 3.5, x2=x1 + 120.25, y2=x1 + 140.75, primary=True, det_score=0.9876,
            sharpness=123.4567 + i % 50))
    return out


def _median(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _plain_read(path: Path) -> list:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _plain_write(path: Path, columns, cells: list) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        w.writerows(cells)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def bench(name: str, rows: list, columns, ws: Workspace, read_typed, repeat: int) -> dict:
    path = ws.path(name)
    ws.write_table(name, columns, rows)
    text = [r.to_csv(columns) for r in rows]  # the baseline writes text it already has
    plain = ws.path(f"plain_{name}")
    got = read_typed()
    assert [r.to_csv(columns) for r in got] == text, f"{name}: typed rows do not round-trip"
    _plain_write(plain, columns, text)
    assert plain.read_bytes() == path.read_bytes(), f"{name}: typed and plain bytes differ"
    res = dict(
        read_plain=_median(lambda: _plain_read(path), repeat),
        read_typed=_median(read_typed, repeat),
        write_plain=_median(lambda: _plain_write(plain, columns, text), repeat),
        write_typed=_median(lambda: ws.write_table(name, columns, rows), repeat),
    )
    n = len(rows)
    print(f"{name}: {n} rows")
    for op in ("read", "write"):
        p, t = res[f"{op}_plain"], res[f"{op}_typed"]
        print(f"  {op:5s} plain {p:6.2f} s ({p / n * 1e6:5.1f} us/row)   typed {t:6.2f} s "
              f"({t / n * 1e6:5.1f} us/row)   typed/plain {t / p:4.2f}x")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        ws = Workspace(d)
        bench(C.ALIGN_MANIFEST, align_rows(a.rows), C.ALIGN_COLUMNS, ws, ws.align_rows, a.repeat)
        bench(C.CLEAN_CSV, clean_rows(a.rows), C.CLEAN_COLUMNS, ws, ws.clean_rows, a.repeat)


if __name__ == "__main__":
    main()
