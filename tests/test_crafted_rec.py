"""Crafted .rec files (issue 23, item 4): every count, label and range read from a
file is checked against the file's size and its number of records before anything is
allocated. Each crafted file gives a one-line error within 1 s and under 200 MB, from
inspect, embed, clean and pack run as the user runs them (a child process, whose peak
memory is its own ``ru_maxrss``). The files are written with facecurate's own RecordIO
writer around real LFW photos."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

from facecurate.cli import main as cli
from facecurate.common.constants import RECORDIO_MAGIC
from facecurate.embed.embed import EmbedError, items_from_rec
from facecurate.embed.embed_rec import plan_rec_shards
from facecurate.common.recordio import IndexedRecordWriter, RecordIOError, frame, pack_header, pack_record, read_record
from test_recdata import photos  # noqa: F401  (fixture: six real LFW JPEGs)

#: The child limits its address space to 2 GiB (a crafted count must not even reserve
#: memory) and imports every stage before its clock starts: the limits are on the work.
#: Its peak memory is its own VmHWM (ru_maxrss would count the pages of the forking
#: pytest process).
_CHILD = """
import os, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
import facecurate.clean.clean, facecurate.embed.embed, facecurate.pack.inspect_rec  # noqa: E401
import facecurate.pack.pack_rec, facecurate.pack.packer  # noqa: E401
from facecurate.cli import main
t = time.perf_counter()
try:
    main(sys.argv[1:], prog_name="facecurate")
finally:
    seconds = time.perf_counter() - t
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(os.environ["FACECURATE_TEST_MEASURE"], "w") as f:
        f.write(f"{seconds!r} {hwm}")
"""
MAX_RSS_MB = 200
MAX_SECONDS = 1.0


def _run(tmp_path: Path, *args: str) -> tuple[int, str, float, float]:
    """Run the CLI in a child process: (exit status, stderr, peak resident memory in
    MB, seconds of work)."""
    measure = tmp_path / "measure.txt"
    measure.unlink(missing_ok=True)
    env = dict(os.environ, FACECURATE_TEST_MEASURE=str(measure), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _CHILD, *map(str, args)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, timeout=120)
    seconds, hwm = measure.read_text().split() if measure.exists() else ("-1", "0")
    return r.returncode, r.stderr, int(hwm) / 1024, float(seconds)


def _write(path: Path, records) -> Path:
    with IndexedRecordWriter(path.with_suffix(".rec"), path.with_suffix(".idx")) as w:
        for key, payload in records:
            w.write(key, payload)
    return path.with_suffix(".rec")


def _crafted(kind: str, photos: list[bytes], d: Path) -> Path:
    """A .rec of real photos with one crafted count or label; ``d/train.rec``."""
    d.mkdir(parents=True, exist_ok=True)
    rec = d / "train.rec"
    if kind.startswith("header"):
        end = {"header_3e9": 3e9, "header_2e7": 2e7}[kind]
        return _write(rec, [(0, pack_header([4.0, end]))] + [(k, pack_record(0.0, photos[k])) for k in (1, 2, 3)])
    bad = {"label_3e9": 3e9, "label_inf": float("inf"), "label_nan": float("nan"), "label_negative": -2.0,
           "label_fraction": 1.5}[kind]
    return _write(rec, [(k, pack_record(float(k // 2), img)) for k, img in enumerate(photos[:4])]
                  + [(4, pack_record(bad, photos[4]))])


def _one_line_error(rc: int, err: str, rss: float, seconds: float, want: str) -> None:
    assert rc == 1, err
    assert "Traceback" not in err and "MemoryError" not in err, err
    assert want in err, err
    assert rss < MAX_RSS_MB, f"{rss:.0f} MB"
    assert 0 <= seconds < MAX_SECONDS, f"{seconds:.2f} s"


# ----------------------------------------------------------------------------- inspect
@pytest.mark.parametrize("kind,want", [
    ("header_3e9", "key 0: header label [4.0, 3000000000.0] is not a valid"),
    ("header_2e7", "key 0: header label [4, 20000000] claims 19999996 identities after 3 images, but the file "
                   "holds 4 records at most"),
    ("label_3e9", "1 image label(s) are not an integer in [0, 2^31) (first: key 4, label 3000000000.0)"),
    ("label_inf", "(first: key 4, label inf)"),
    ("label_nan", "(first: key 4, label nan)"),
    ("label_negative", "(first: key 4, label -2.0)"),
    ("label_fraction", "(first: key 4, label 1.5)"),
])
def test_inspect_reports_a_crafted_rec_as_damaged(photos, tmp_path, kind, want):  # noqa: F811
    """The issue's reproductions: a header claiming 3e9 identities gave a traceback
    ("Unable to allocate 22.4 GiB" at np.arange), a 2e7 header in a small file took
    700 MB, and labels of 3e9 or inf were not named as bad labels."""
    rec = _crafted(kind, photos, tmp_path / "d")
    rc, err, rss, seconds = _run(tmp_path, "inspect", rec)
    _one_line_error(rc, err, rss, seconds, f"error: {want}" if kind.startswith("header") else want)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err


@pytest.mark.parametrize("kind", ["header_3e9", "header_2e7"])
def test_embed_refuses_a_crafted_header_before_loading_a_model(photos, tmp_path, kind):  # noqa: F811
    """embed took the 3e9 header for a valid layout and embedded the file."""
    rec = _crafted(kind, photos, tmp_path / "d")
    rc, err, rss, seconds = _run(tmp_path, "embed", rec)
    _one_line_error(rc, err, rss, seconds, "corrupt .rec at key 0: header label")
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "d" / "embeddings.npy").exists()


@pytest.mark.parametrize("kind", ["label_3e9", "label_inf", "label_nan", "label_negative", "label_fraction"])
def test_embed_records_a_bad_label_as_failed(photos, tmp_path, kind):  # noqa: F811
    """An image record whose label is not an integer in [0, 2^31) is never an identity:
    embed used to store 3e9 (and inf) as the record's identity, which clean and pack
    then took for a class."""
    rec = _crafted(kind, photos, tmp_path / "d")
    (shard,) = plan_rec_shards(rec, 64)
    items, failed = shard.items.load()
    assert [it.aligned for it in items] == ["rec:0", "rec:1", "rec:2", "rec:3"]
    assert [k for k, _ in failed] == ["rec:4"]
    assert "is not an integer in [0, 2^31)" in failed[0][1]
    with pytest.raises(EmbedError, match=r"rec:4: bad image record: label"):
        items_from_rec(rec)


def test_a_crafted_record_length_allocates_nothing(tmp_path):
    """A record head announcing 512 MiB in a file of a few bytes is refused from the
    file's size before it is read (the read itself allocated the 512 MiB)."""
    first = frame(pack_record(0.0, b"\xff\xd8\xff\xd9"))
    buf = first + struct.pack("<II", RECORDIO_MAGIC, (1 << 29) - 1) + b"x" * 8
    tracemalloc.start()
    with pytest.raises(RecordIOError, match="announces 536870911 bytes but the file ends after 8 of a"):
        read_record(io.BytesIO(buf), len(first))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20


def test_inspect_of_a_file_that_is_not_a_rec(tmp_path, photos):  # noqa: F811
    """`inspect some.jpg` said `some.jpg.rec does not exist`."""
    jpg = tmp_path / "some.jpg"
    jpg.write_bytes(photos[0])
    for cmd in (["inspect", str(jpg)], ["unpack", str(jpg), str(tmp_path / "u")]):
        r = CliRunner().invoke(cli, cmd)
        assert r.exit_code == 1
        assert r.output.strip() == f"Error: {jpg} is not a RecordIO file (it does not start with the RecordIO " \
                                   "magic 0xced7230a)"
    assert not (tmp_path / "u").exists()


# ----------------------------------------------------------------------------- clean and pack
def _embed_and_clean(d: Path, records) -> dict:
    """Write ``d/train.rec``, embed it (real dlib model) and clean it; embed's summary."""
    from facecurate.clean.clean import run_clean
    from facecurate.embed.embed import run_embed

    _write(d / "train.rec", records)
    s = run_embed(d / "train.rec", flip=False, workers=1, runtime="dlib", show_progress=False)
    run_clean(d, runtime="dlib", workers=1, show_progress=False)
    return s


@pytest.fixture(scope="module")
def cleaned_rec(tmp_path_factory, photos) -> Path:  # noqa: F811
    """A plain .rec of six real photos (labels 0, 0, 1, 1, 2, 2), embedded and cleaned."""
    d = tmp_path_factory.mktemp("cleaned")
    _embed_and_clean(d, [(k, pack_record(float(k // 2), img)) for k, img in enumerate(photos)])
    return d


def test_clean_and_pack_leave_out_records_with_bad_labels(photos, tmp_path):  # noqa: F811
    """End to end: two records labelled 3e9 and inf fail in embed, are dropped by clean
    (label -1, no embedding; clean gave a traceback for inf), and pack (which
    allocated a table as long as the largest label) packs the rest. Pack calls the
    records clean left out not_kept, not input problems (item 13)."""
    d = tmp_path / "d"
    d.mkdir()
    s = _embed_and_clean(d, [(k, pack_record(float(k // 2), img)) for k, img in enumerate(photos)]
                         + [(6, pack_record(3e9, photos[0])), (7, pack_record(float("inf"), photos[1]))])
    assert (s["embedded"], s["failed"]) == (6, 2)
    with open(d / "clean.csv", newline="") as f:
        rows = {r["key"]: r for r in csv.DictReader(f)}
    assert [(rows[k]["label"], rows[k]["decision"], rows[k]["reason"]) for k in ("6", "7")] == \
        [("-1", "drop", "no_embedding")] * 2
    r = CliRunner().invoke(cli, ["pack", str(d), str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "input problem" not in r.output
    not_kept = sum(row["decision"] != "keep" for row in rows.values())
    assert f"{not_kept} record(s) clean did not keep were left out (not_kept: a decision, no problem)" in r.output
    r = CliRunner().invoke(cli, ["pack", str(d), str(tmp_path / "q"), "--json"])
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert (s["input_errors"], s["input_errors_by_reason"], s["not_kept"]) == (0, {}, not_kept)


def _edit_csv(path: Path, key_col: str, key: str, col: str, value: str) -> None:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    i, j = rows[0].index(key_col), rows[0].index(col)
    for r in rows[1:]:
        if r[i] == key:
            r[j] = value
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


@pytest.mark.parametrize("label", ["inf", "3000000000", "nan", "-5", "2.5"])
def test_clean_refuses_a_store_with_a_crafted_label(cleaned_rec, tmp_path, label):
    """A store whose identity is not a label (what embed wrote for a crafted record
    before): clean gave a traceback (OverflowError in _int_label) for inf and took 3e9
    for a class."""
    d = shutil.copytree(cleaned_rec, tmp_path / "d", ignore=shutil.ignore_patterns(".facecurate"))
    _edit_csv(d / "embeddings.csv", "aligned", "rec:1", "identity", label)
    rc, err, rss, seconds = _run(tmp_path, "clean", d)
    _one_line_error(rc, err, rss, seconds, f"row 'rec:1' has label '{label}', not an integer in [0, 2^31)")
    assert len(err.strip().splitlines()) == 1, err


def test_pack_refuses_a_crafted_label_in_clean_csv(cleaned_rec, tmp_path):
    """pack_rec._plan allocated a table as long as the largest label (22 GiB for 3e9)."""
    d = shutil.copytree(cleaned_rec, tmp_path / "d", ignore=shutil.ignore_patterns(".facecurate"))
    _edit_csv(d / "clean.csv", "key", "1", "label", "3000000000")
    rc, err, rss, seconds = _run(tmp_path, "pack", d, tmp_path / "p")
    _one_line_error(rc, err, rss, seconds, "line 3: label 3000000000 is not an integer in [0, 2^31) (nor -1)")
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p").exists()


def test_pack_and_clean_refuse_a_crafted_header(cleaned_rec, tmp_path, photos):  # noqa: F811
    """A source whose key 0 claims 2e7 identities: pack and clean refuse it in one line."""
    d = shutil.copytree(cleaned_rec, tmp_path / "d", ignore=shutil.ignore_patterns(".facecurate"))
    _crafted("header_2e7", photos, d)
    rc, err, rss, seconds = _run(tmp_path, "pack", d, tmp_path / "p")
    _one_line_error(rc, err, rss, seconds, "corrupt .rec or .idx: key 0: header label [4, 20000000] claims")
    assert len(err.strip().splitlines()) == 1, err
    rc, err, rss, seconds = _run(tmp_path, "clean", d)
    _one_line_error(rc, err, rss, seconds, "corrupt .rec at key 0: header label [4, 20000000] claims")
    assert len(err.strip().splitlines()) == 1, err
