"""files: names made safe to show and to open in a spreadsheet, and a failed write
that names the file it was writing."""

from __future__ import annotations

import itertools
import os
import resource
import signal
import subprocess
import sys

from facecurate.common import constants as C
from facecurate.common.files import SHEET_TRIGGERS, sheet_cell, shown, unsheet_cell, write_csv_atomic


def test_sheet_cells_run_no_formula_and_come_back_exactly():
    alphabet = ["=", "+", "-", "@", "\t", "\r", "'", "a", " "]
    for n in range(5):
        for t in map("".join, itertools.product(alphabet, repeat=n)):
            assert not sheet_cell(t).startswith(SHEET_TRIGGERS), repr(t)
            assert unsheet_cell(sheet_cell(t)) == t, repr(t)
    assert sheet_cell("=SUM(A1)") == "'=SUM(A1)" and sheet_cell("'t Hooft") == "'t Hooft"


def test_shown_escapes_controls_and_bidi_only():
    assert shown("a\x1b[2Jb\nc\u202ed\u2028e\\f é") == "a\\x1b[2Jb\\x0ac\\u202ed\\u2028e\\f é"
    assert shown("x\ny", keep_newlines=True) == "x\ny"


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))


def test_a_write_that_fails_names_the_file(tmp_path):
    """A disk that fills up (here: a file size limit, EFBIG, the same path in the
    code as ENOSPC) gives one line naming the file being written, exit 1."""
    out = tmp_path / "out"
    rows = [dict(source=f"id{i:02d}/img{i}.jpg", identity=f"id{i:02d}", face=0, status=C.STATUS_OK,
                 aligned=f"id{i:02d}/img{i}_0.jpg") for i in range(200)]
    write_csv_atomic(out / C.ALIGN_MANIFEST, C.ALIGN_COLUMNS, rows)
    p = subprocess.run([sys.executable, "-m", "facecurate", "report", str(out)], capture_output=True, text=True,
                       preexec_fn=_limit_file_size, timeout=120, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"Error: {out / C.REPORT_HTML}: cannot write: File too large"
    assert not (out / C.REPORT_HTML).exists() and not [f for f in os.listdir(out) if f.endswith(".tmp")]
