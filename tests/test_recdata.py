"""One rule for which RecordIO records are images (facecurate.common.recdata), shared by
embed's .rec input, inspect and unpack; and one pairs parser for pack-pairs and
eval-pairs. The records hold real LFW photos."""

from __future__ import annotations

import pytest

from facecurate.embed.embed import EmbedError, items_from_rec
from facecurate.evalpairs.evalpairs import PairsError, read_pairs
from facecurate.pack.inspect_rec import inspect
from facecurate.pack.pairs import parse_pairs
from facecurate.common.recordio import IndexedRecordWriter, RecordIOError, pack_header, pack_record
from facecurate.pack.unpack import unpack


@pytest.fixture(scope="module")
def photos(lfw_dir, lfw_dev_ids) -> list[bytes]:
    """Six real JPEGs of three LFW dev identities (two each)."""
    out = []
    for ident in lfw_dev_ids:
        files = sorted((lfw_dir / ident).iterdir())
        if len(files) >= 2:
            out += [f.read_bytes() for f in files[:2]]
        if len(out) == 6:
            return out
    pytest.skip("not enough LFW dev identities with two photos")


def _write(path, records) -> None:
    with IndexedRecordWriter(path.with_suffix(".rec"), path.with_suffix(".idx")) as w:
        for key, payload in records:
            w.write(key, payload)


def _three_views(rec):
    """Which keys embed, unpack and inspect take as images, and their labels."""
    items = items_from_rec(rec)
    embed_view = {int(it.aligned.split(":")[1]): it.identity for it in items}
    dest = rec.parent / "unpacked"
    res = unpack(rec, dest, names=False)
    unpack_view = {int(f.stem): str(int(f.parent.name)) for f in dest.rglob("*.jpg")}
    ins = inspect(rec, full=True)
    return embed_view, unpack_view, ins, res


def test_vector_label_images_count_in_every_tool_plain_layout(photos, tmp_path):
    """A plain .rec whose image records carry two-value vector labels (e.g. label +
    age): every tool takes every record as an image with the first value as label.
    embed used to skip them (it took any flag >= 2 for a header or identity record)."""
    rec = tmp_path / "train.rec"
    _write(rec, [(k, pack_record([float(k // 2), 30.0 + k], img)) for k, img in enumerate(photos)])
    embed_view, unpack_view, ins, res = _three_views(rec)
    want = {k: str(k // 2) for k in range(6)}
    assert embed_view == want
    assert unpack_view == want and res.errors == []
    assert ins.ok, ins.errors
    assert (ins.layout, ins.images, ins.classes, ins.vector_labels) == ("plain", 6, 3, 6)


def test_vector_label_images_count_in_every_tool_insightface_layout(photos, tmp_path):
    """Header at key 0, vector-label images at keys 1..6, identity records after:
    the same six images for embed, unpack and inspect; header and identity records
    for none of them."""
    rec = tmp_path / "train.rec"
    recs = [(0, pack_header([7.0, 10.0]))]
    recs += [(k + 1, pack_record([float(k // 2), 1.0], img)) for k, img in enumerate(photos)]
    recs += [(7 + c, pack_header([1.0 + 2 * c, 3.0 + 2 * c])) for c in range(3)]
    _write(rec, recs)
    embed_view, unpack_view, ins, res = _three_views(rec)
    want = {k + 1: str(k // 2) for k in range(6)}
    assert embed_view == want
    assert unpack_view == want and res.errors == []
    assert ins.ok, ins.errors
    assert (ins.layout, ins.images, ins.classes, ins.identity_records) == ("insightface-header", 6, 3, 3)


def test_image_at_key_zero_with_vector_label_is_not_a_header(photos, tmp_path):
    """Key 0 holds image bytes: the file is plain even though its label is a vector."""
    rec = tmp_path / "train.rec"
    _write(rec, [(k, pack_record([float(k), 5.0], img)) for k, img in enumerate(photos[:2])])
    embed_view, unpack_view, ins, _ = _three_views(rec)
    assert embed_view == unpack_view == {0: "0", 1: "1"}
    assert ins.layout == "plain" and ins.images == 2


def test_invalid_header_is_reported_by_every_tool(photos, tmp_path):
    """A header whose range is not 1 <= first <= end: inspect reports it, unpack and
    embed stop with the same message instead of guessing."""
    rec = tmp_path / "train.rec"
    _write(rec, [(0, pack_header([0.0, 3.0])), (1, pack_record(0.0, photos[0]))])
    ins = inspect(rec)
    assert not ins.ok and any("key 0: header label [0.0, 3.0] is not a valid" in e for e in ins.errors)
    with pytest.raises(RecordIOError, match=r"header label \[0.0, 3.0\]"):
        unpack(rec, tmp_path / "u")
    with pytest.raises(EmbedError, match=r"header label \[0.0, 3.0\]"):
        items_from_rec(rec)


def test_one_pairs_parser(tmp_path):
    """pack-pairs and eval-pairs read a pairs file with the same parser: the header is
    the first non-blank line, line numbers are the file's own."""
    p = tmp_path / "pairs.txt"
    p.write_text("\n1\t1\nAl_Gore\t1\t2\n\nAl_Gore\t3\tBo_Derek\t12\n")
    parsed = parse_pairs(p)
    assert parsed.header == (1, 1)
    assert [(x.line, x.a, x.b, x.same) for x in parsed.lines] == [
        (3, ("Al_Gore", 1), ("Al_Gore", 2), True), (5, ("Al_Gore", 3), ("Bo_Derek", 12), False)]
    assert [(x.a, x.b) for x in read_pairs(p)] == [("Al_Gore/Al_Gore_0001.jpg", "Al_Gore/Al_Gore_0002.jpg"),
                                                   ("Al_Gore/Al_Gore_0003.jpg", "Bo_Derek/Bo_Derek_0012.jpg")]
    p.write_text("\n1\t1\nAl_Gore\t1\t2\n\nAl_Gore\tx\tBo_Derek\t12\n")
    assert parse_pairs(p).lines[1].problem == "image number 'x' is not an integer"
    with pytest.raises(PairsError, match="line 5: image number 'x' is not an integer"):
        read_pairs(p)
