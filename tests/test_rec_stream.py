"""Scale of the stages that read a packed dataset (issue 14, item 5): embed plans a
.rec's shards and writes its store without holding anything per record, review of a
rec's clean.csv keeps only the rows the sheet shows, and pack's checksums do not
depend on where they are computed."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from facecurate.embed.embed import _part_bytes, shard_npz
from facecurate.embed.embed_rec import RecRange, plan_rec_shards, write_rec_store
from facecurate.common.recordio import IndexedRecordWriter, pack_header, pack_record
from facecurate.engines.runner import plan_shards, record_path


def _rec(d: Path, n: int, header: bool = False) -> Path:
    """A .rec of ``n`` tiny image records (labels k % 7); with ``header`` the
    insightface layout (key 0 a header, identity records after the images)."""
    d.mkdir(parents=True, exist_ok=True)
    rec = d / "train.rec"
    with IndexedRecordWriter(rec, d / "train.idx") as w:
        if header:
            w.write(0, pack_header([float(n + 1), float(n + 8)]))
        for k in range(n):
            w.write(k + header, pack_record(float(k % 7), b"img%d" % k))
        if header:
            for c in range(7):
                w.write(n + 1 + c, pack_header([1.0, 2.0]))
    return rec


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("header", [False, True])
def test_rec_plan_equals_the_item_plan(tmp_path, header):
    """Shards of image records only, with the digests a plan of the item list has
    (so a run planned either way resumes the other), and each worker's range reads
    exactly its records, with labels."""
    rec = _rec(tmp_path, 23, header)
    shards = plan_rec_shards(rec, 5)
    keys = [f"rec:{k + header}" for k in range(23)]
    want = plan_shards(keys, lambda k: k, 5)
    assert [(s.index, s.digest, len(s.items)) for s in shards] == [(s.index, s.digest, len(s.items)) for s in want]
    got = [it for s in shards for it in s.items.load()[0]]
    assert [it.aligned for it in got] == keys
    assert [it.identity for it in got] == [str(k % 7) for k in range(23)]
    assert got[3].data == b"img3" and got[3].source == f"train.rec:{3 + header}"


def test_a_corrupt_record_is_a_failure_of_its_own(tmp_path):
    """A record whose magic is damaged: recorded failed with the reason; the others
    of its shard are read."""
    rec = _rec(tmp_path, 6)
    offs = [int(line.split()[1]) for line in (tmp_path / "train.idx").read_text().splitlines()]
    with open(rec, "r+b") as f:
        f.seek(offs[2])
        f.write(b"XXXX")
    items, failed = plan_rec_shards(rec, 100)[0].items.load()
    assert [it.aligned for it in items] == ["rec:0", "rec:1", "rec:3", "rec:4", "rec:5"]
    assert len(failed) == 1 and failed[0][0] == "rec:2" and "bad magic" in failed[0][1]


def test_planning_a_rec_holds_nothing_per_record(tmp_path):
    """The plan of 4x the records (one shard each) takes about the same memory: the
    process that hands out the work never holds an item per record (it did: one Item
    per record, read with its label before any shard ran)."""
    small, large = _rec(tmp_path / "s", 2000), _rec(tmp_path / "l", 8000)
    plan_rec_shards(small, 1 << 20)  # imports and caches outside the measurement
    p_small = _peak(lambda: plan_rec_shards(small, 1 << 20))
    p_large = _peak(lambda: plan_rec_shards(large, 1 << 20))
    assert p_large < p_small + 64_000, (p_small, p_large)


def _fake_shards(rec: Path, work: Path, size: int, dim: int = 128) -> list:
    """The plan of ``rec`` and shard files as workers write them (vectors: any unit
    vectors; the store writer is what is under test)."""
    shards = plan_rec_shards(rec, size)
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in shards:
        items, _ = s.items.load()
        v = rng.standard_normal((len(items), dim)).astype(np.float32)
        res = {"keys": [it.aligned for it in items], "vectors": v / np.linalg.norm(v, axis=1, keepdims=True),
               "failed": [], "identities": [it.identity for it in items]}
        shard_npz(work, s.index).write_bytes(_part_bytes(res, dim))
        record_path(work, s.index).write_text(json.dumps({"digest": s.digest}))
    return shards


def test_rec_store_writer_is_bounded_and_equals_the_in_memory_store(tmp_path):
    """The store of 4x the records is written with about the same peak memory (one
    shard at a time, vectors through a memory map), and its files are byte for byte
    what the in-memory writer makes of the same shards."""
    from facecurate.embed.embed import EmbedConfig, _load_shards, _write_store, items_from_rec

    peaks = {}
    for n in (2000, 8000):
        d = tmp_path / str(n)
        rec = _rec(d, n)
        shards = _fake_shards(rec, d / "work", 250)
        write_rec_store(d, rec, d / "work", shards, 128)  # warm-up
        peaks[n] = _peak(lambda: write_rec_store(d, rec, d / "work", shards, 128))
    assert peaks[8000] < peaks[2000] * 1.3 + 100_000, peaks

    mem = tmp_path / "mem"
    mem.mkdir()
    info = {"name": "m", "sha256": "0", "dim": 128, "input_size": [1, 1]}
    _write_store(mem, items_from_rec(rec), *_load_shards(d / "work", shards), info, {}, EmbedConfig(), "rec")
    assert (mem / "embeddings.csv").read_text().count("\n") == 8001
    for name in ("embeddings.npy", "embeddings.csv"):
        assert (d / name).read_bytes() == (mem / name).read_bytes(), name
        assert (d / name).stat().st_mode == (mem / name).stat().st_mode, name  # not mkstemp's 0600


def test_rec_range_is_small(tmp_path):
    """What a worker is sent for a shard does not grow with the shard."""
    import pickle

    rec = _rec(tmp_path, 3000)
    one, = plan_rec_shards(rec, 5000)
    assert isinstance(one.items, RecRange) and len(one.items) == 3000
    assert len(pickle.dumps(one)) < 600


def _clean_csv(d: Path, n: int, review: int = 40) -> Path:
    """A rec clean.csv of ``n`` rows in 500 identities, the first ``review`` rows to review."""
    from facecurate.common.constants import REC_CLEAN_COLUMNS
    from facecurate.common.files import csv_text

    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        lab = k % 500
        dec = "review" if k < review else ("keep" if k % 5 else "drop")
        rows.append({"key": k, "label": lab, "identity": f"id{lab:04d}", "aligned": f"rec:{k}", "decision": dec,
                     "reason": "centre" if dec == "keep" else "far_from_centre",
                     "score": f"{(k * 7919 % 1000) / 1000:.4f}", "cluster": 0})
    (d / "clean.csv").write_text(csv_text(REC_CLEAN_COLUMNS, rows))
    return d


def test_review_of_a_large_clean_csv_holds_only_the_sheet(tmp_path):
    """review reads clean.csv as a stream: 4x the rows with the same review faces
    take about the same memory (it held every row as a dict), and the sheet is the
    one build_sections makes of the rows in memory (same references and counts)."""
    from facecurate.review.review import build_sections, clean_rows, load_clean, stream_sections, write_review

    small, large = _clean_csv(tmp_path / "s", 20_000), _clean_csv(tmp_path / "l", 80_000)
    write_review(small)  # warm-up
    peaks = {d: _peak(lambda: write_review(d)) for d in (small, large)}
    assert peaks[large] < peaks[small] * 1.3 + 100_000, peaks
    s = write_review(large)
    assert s["faces"] == 80_000 and s["review_faces"] == 40 and s["identities"] == 40

    rows = load_clean(large)[1]
    got, n = stream_sections(clean_rows(large), 6)
    assert [(x.identity, x.kept, x.dropped) for x in build_sections(rows, 6)] == \
        [(x.identity, x.kept, x.dropped) for x in got]
    assert n == 80_000
    for sec in got:  # against a plain in-memory computation
        kept = sorted((r for r in rows if r.identity == sec.identity and r.decision == "keep"),
                      key=lambda r: (-r.score, r.aligned))
        assert [r.aligned for r in sec.references] == [r.aligned for r in kept[:6]]
        assert sec.kept == len(kept)
        assert sec.dropped == sum(r.identity == sec.identity and r.decision == "drop" for r in rows)


@pytest.mark.parametrize("fail", [False, True])
def test_sums_hashed_by_the_child_equal_sums_hashed_in_line(tmp_path, fail, monkeypatch):
    """train.sums from the hashing child process is byte for byte the file hashing in
    pack's thread writes, records split around an aligned magic included; a pack that
    fails stops the child (no process left behind). The first batch is hashed in
    line, the rest by the child (the in-line share made small here)."""
    import struct

    from facecurate.pack import checksums
    from facecurate.pack.checksums import SumsWriter

    monkeypatch.setattr(checksums, "INLINE_BYTES", 1000)
    from facecurate.common.constants import RECORDIO_MAGIC
    from facecurate.common.recordio import RecordWriter

    magic = struct.pack("<I", RECORDIO_MAGIC)
    datas = [b"jpeg%05d" % k * (k % 50 + 1) for k in range(700)]
    datas[10] = b"abcd" * 3 + magic + b"tail"  # aligned in the payload: a split record
    texts = []
    for child in (False, True):
        rec, sums = tmp_path / f"{child}.rec", tmp_path / f"{child}.sums"
        with open(rec, "wb", buffering=0) as f, open(sums, "w", encoding="ascii", newline="\n") as sf:
            w = RecordWriter(f)
            sw = SumsWriter(sf, rec if child else None)
            sw.placeholder(0, 0, 40)
            for lo in range(0, len(datas), 256):
                batch = [(float(k % 9), datas[k], k + 1) for k in range(lo, min(len(datas), lo + 256))]
                offs = w.write_images(batch)
                sw.images(lo + 1, offs, [b[0] for b in batch], [b[1] for b in batch])
            if child:
                assert sw._hasher is not None  # the child took over after the first batch
            if child and fail:
                proc = sw._hasher.proc
                sw.close()
                assert not proc.is_alive()
                return
            sw.record(701, w.offset, pack_header([1.0, 2.0]))
            sw.fill(0, 0, pack_header([701.0, 702.0]))
            sw.close()
        texts.append(sums.read_text())
    assert texts[0] == texts[1] and texts[0].count("\n") == 703


def test_review_reads_only_the_offsets_of_the_faces_it_shows(tmp_path):
    """read_idx_keys streams the .idx in chunks (boundaries inside lines included) and
    keeps only the wanted keys, as filtering the whole index does; a bad line is
    still named; the sheet's KeyedRecords holds only the sheet's records and reads
    their bytes."""
    import numpy as np

    from facecurate.common.recdata import KeyedRecords
    from facecurate.common.recordio import RecordIOError, read_idx_arrays, read_idx_keys

    rec = _rec(tmp_path / "r", 5000, header=True)
    idx = rec.with_suffix(".idx")
    k_all, o_all = read_idx_arrays(idx)
    want = np.array([0, 1, 17, 2500, 4999, 5000, 123456])
    for chunk in (7, 64, 1 << 22):
        k, o = read_idx_keys(idx, want, chunk=chunk)
        m = np.isin(k_all, want)
        assert np.array_equal(k, k_all[m]) and np.array_equal(o, o_all[m])
    kr = KeyedRecords(rec.parent, keys=[17, 2500])
    assert kr.keys.size == 2 and kr.image(17) == b"img16" and kr.image(3) is None
    bad = tmp_path / "bad.idx"
    bad.write_bytes(idx.read_bytes()[:200] + b"x\n" + idx.read_bytes()[200:])
    with pytest.raises(RecordIOError):
        read_idx_keys(bad, want, chunk=64)


def test_review_of_a_rec_shows_every_face_from_the_record_bytes(tmp_path):
    """write_review on a packed dataset's clean.csv: every card's thumbnail comes from
    its record (none missing), through the sheet's own offsets."""
    import base64

    from facecurate.review.review import write_review

    d = tmp_path / "r"
    _rec(d, 3000)
    _clean_csv(d, 3000)
    s = write_review(d)
    assert s["review_faces"] == 40 and s["missing_crops"] == 0
    page = (d / "review.html").read_text()
    for k in (0, 39):
        assert base64.b64encode(b"img%d" % k).decode() in page
