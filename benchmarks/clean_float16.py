"""What `embed --dtype float16` does to clean's decisions (issue 21, item 4), on the noisy
LFW-dev benchmark of benchmarks/clean_noisy.py:

    python benchmarks/clean_noisy.py pipeline --workers 2        # once: build, align, embed
    cp -a CACHE/bench-seed4/OUT-<key> /tmp/OUT                     # clean writes into what it evaluates
    python benchmarks/clean_float16.py --cache CACHE --out /tmp/OUT [--brief] [--baselines]

Runs clean_noisy's ``evaluate`` on OUT as it is and on a copy beside it (OUT_float16,
hard-linked) whose store is what ``embed --dtype float16`` stores: the same rows cast
to float16, embeddings.json recording the dtype. Prints both evaluations and the faces
whose decision differs.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clean_noisy as cn  # noqa: E402

DTYPE = "float16"


def float16_out(src: Path) -> Path:
    """A copy of OUT (:func:`clean_noisy.linked_copy`) with its store in float16."""
    from facecurate.common import constants as C
    from facecurate.common.files import write_bytes_atomic
    from facecurate.common.workspace import Workspace

    dst = cn.linked_copy(src, src.parent / f"{src.name}_{DTYPE}")
    ws = Workspace(dst)
    buf = io.BytesIO()
    np.save(buf, ws.store_vectors().astype(DTYPE))
    write_bytes_atomic(dst / C.EMBEDDINGS_NPY, buf.getvalue())  # a new file: OUT's own link is left alone
    meta = ws.store_meta()
    ws.write_store_meta(dict(meta, dtype=DTYPE, signature=dict(meta.get("signature") or {}, dtype=DTYPE)))
    return dst


def compare(cache: Path, out: Path, **kw) -> dict:
    """clean_noisy's evaluate on OUT and on :func:`float16_out`, and the changed decisions."""
    from facecurate.common.files import read_csv

    runs = {"as_is": cn.evaluate(cache, out=out, **kw), DTYPE: cn.evaluate(cache, out=float16_out(out), **kw)}
    a, b = ({r["aligned"]: r for r in read_csv(Path(res["out"]) / "clean.csv")} for res in runs.values())
    assert a.keys() == b.keys()
    changed = [dict(aligned=k, as_is=a[k]["decision"], **{DTYPE: b[k]["decision"]})
               for k in sorted(a) if a[k]["decision"] != b[k]["decision"]]
    score = [abs(float(a[k]["score"] or 0) - float(b[k]["score"] or 0)) for k in a]
    return dict(runs, faces=len(a), changed_decisions=len(changed), changed=changed[:100],
                changed_reasons=sum(a[k]["reason"] != b[k]["reason"] for k in a),
                max_score_change=round(max(score, default=0.0), 6))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=cn.CACHE, help="clean_noisy's cache (its gt.csv)")
    ap.add_argument("--out", type=Path, required=True, help="a copy of a pipeline OUT (clean writes into it)")
    ap.add_argument("--baselines", action="store_true", help="evaluate the seed methods too")
    ap.add_argument("--brief", action="store_true", help="the headline and per-case figures only")
    a = ap.parse_args(argv)
    res = compare(a.cache, a.out, baselines=a.baselines)
    if a.brief:
        res.update({k: cn.brief(res[k]) for k in ("as_is", DTYPE)})
    print(json.dumps(res, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
