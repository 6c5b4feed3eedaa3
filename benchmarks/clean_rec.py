"""Quality of cleaning a packed dataset (issue 14, part 6): the noisy LFW-dev benchmark
of benchmarks/clean_noisy.py, packed *without* clean, then embed -> clean on the .rec.

    python benchmarks/clean_noisy.py pipeline --workers 2     # once: build, align, embed (folders)
    python benchmarks/clean_rec.py [--cache /tmp/fc/cache/clean_noisy] [--workers 2]

Steps (cached under clean_noisy's OUT for its settings, OUT-<key>/../REC-<key>):
  pack    `facecurate pack` of the aligned OUT without clean.csv: align.csv's ok +
          primary rows, i.e. each photo's primary face becomes one record (bystanders and
          other faces are gone; labels = sorted identity order, names in labels.csv)
  embed   `facecurate embed REC/train.rec` (default dlib chain; a .rec is fed from the
          112x112 crop, not from the source photo)
  clean   `facecurate clean REC` (identities = labels; no subject choice, no bystanders)
Evaluated with clean_noisy's ground truth and definitions (each record is mapped back
to its align row through train.lst): purity and retention of genuine records for
  * the rec flow,
  * the folder flow on the same photos (`clean OUT`, every face, bystanders included),
  * the seed methods (Chinese whispers, iterated centre) on the rec's own embeddings,
and, as the reference for what the rec lost, the genuine photos whose subject face
was not align's primary face (they are not in the rec at all).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clean_noisy as cn  # noqa: E402


def _align_only(out: Path, view: Path) -> Path:
    """A view of OUT without clean's files (so pack reads align.csv): align.csv/json
    copied, identity folders symlinked."""
    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    for name in ("align.csv", "align.json"):
        shutil.copyfile(out / name, view / name)
    for e in out.iterdir():
        if e.is_dir() and not e.name.startswith("."):
            os.symlink(e.resolve(), view / e.name)
    return view


def make_rec(root: Path, workers: int) -> Path:
    from facecurate.clean.clean import run_clean
    from facecurate.clean.clean_inputs import store_runtime
    from facecurate.embed.embed import run_embed
    from facecurate.pack.packer import pack

    out = cn.out_dir(root.parent)
    rec = root / out.name.replace("OUT", "REC")
    if not (rec / "train.rec").exists():
        view = _align_only(out, root / out.name.replace("OUT", "OUT_align_only"))
        pack(view, rec, shuffle=True)
    t0 = time.time()
    meta_p = rec / "embeddings.json"  # an existing store is continued on its own runtime
    runtime = store_runtime(json.loads(meta_p.read_text())) if meta_p.exists() else "auto"
    s = run_embed(rec / "train.rec", workers=workers, show_progress=False, runtime=runtime)
    t_embed = time.time() - t0
    t0 = time.time()
    summary = run_clean(rec, show_progress=False)
    return rec, dict(embed_seconds=round(t_embed, 1), embedded=s["embedded"],
                     clean_seconds=round(time.time() - t0, 1), clean=summary)


def evaluate(cache: Path, workers: int) -> dict:
    from facecurate.clean import clean as fc
    from facecurate.clean.vectors import normalize
    from facecurate.common.files import read_csv

    root, out = cn.bench_root(cache), cn.out_dir(cache)
    rec, info = make_rec(root, workers)
    align = [r for r in read_csv(out / "align.csv") if r["aligned"]]
    genuine_a, key_a, photos = cn.label_faces(root, align)
    by_aligned = {r["aligned"]: i for i, r in enumerate(align) if r["aligned"]}
    path_of = {}
    for line in (rec / "train.lst").read_text().splitlines():
        k, _lab, path = line.split("\t")
        path_of[int(k)] = path
    rows = read_csv(rec / "clean.csv")
    ai = [by_aligned[path_of[int(r["key"])]] for r in rows]
    genuine = [genuine_a[i] for i in ai]
    key = [key_a[i] for i in ai]
    kept = [r["decision"] == "keep" for r in rows]
    review = [r["decision"] == "review" for r in rows]
    in_rec = {key_a[i] for i in ai if genuine_a[i]}
    res = {"definitions": dict(cn.DEFINITIONS, record="an ok + primary row of align.csv, packed"),
           "records": len(rows), "genuine_photos": len(photos), "genuine_photos_detected": sum(photos.values()),
           "genuine_photos_in_rec": len(in_rec), **info,
           "rec_flow": cn.metrics(kept, review, genuine, key, photos),
           "rec_flow_after_review": cn.metrics([a or (b and g) for a, b, g in zip(kept, review, genuine)], review,
                                               genuine, key, photos)}
    # retention over the genuine photos the rec still holds (what clean itself lost)
    for name in ("rec_flow", "rec_flow_after_review"):
        k = np.asarray([a for a in (kept if name == "rec_flow" else
                                    [a or (b and g) for a, b, g in zip(kept, review, genuine)])], bool)
        held = {key[i] for i in np.flatnonzero(k) if genuine[i]}
        res[name]["retention_of_photos_in_rec"] = round(len(held) / max(1, len(in_rec)), 4)
    # the folder flow on the same photos (every face; the subject chosen per photo)
    folder = fc.run_clean(out, show_progress=False)
    frows = read_csv(out / "clean.csv")
    fg, fk, _ = cn.label_faces(root, frows)
    res["folder_flow"] = dict(cn.metrics([r["decision"] == "keep" for r in frows],
                                         [r["decision"] == "review" for r in frows], fg, fk, photos),
                              faces=len(frows), reasons=folder["reasons"])
    # the seeds on the rec's embeddings
    vecs, where, _ = fc.store_index(rec)
    emb = normalize(np.asarray(vecs[[where[r["aligned"]] for r in rows]], np.float32))
    labs = np.array([int(r["label"]) for r in rows])
    none = [False] * len(rows)
    base = {}
    for d in (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6):
        base[f"cw_{d}"] = cn.metrics(cn.seed_cw(emb, labs, d), none, genuine, key, photos)
    for t in np.round(np.arange(0.90, 0.9851, 0.005), 3):
        base[f"centre_{t}"] = cn.metrics(cn.seed_centre(emb, labs, t, 0), none, genuine, key, photos)
        base[f"iterated_{t}"] = cn.metrics(cn.seed_centre(emb, labs, t, 5), none, genuine, key, photos)
    res["seeds_on_rec_embeddings"] = base
    c = res["rec_flow"]
    res["verdict"] = {fam: dict(
        best_retention_at_rec_flow_purity=max([v["retention"] for k, v in base.items()
                                               if k.startswith(fam + "_") and v["purity"] >= c["purity"]],
                                              default=0.0),
        best_purity_at_rec_flow_retention=max([v["purity"] for k, v in base.items()
                                               if k.startswith(fam + "_") and v["retention"] >= c["retention"]],
                                              default=0.0)) for fam in ("cw", "centre", "iterated")}
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=cn.CACHE)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    if not (cn.out_dir(a.cache) / "embeddings.npy").exists():
        raise SystemExit(f"run `python benchmarks/clean_noisy.py pipeline --cache {a.cache}` first")
    res = evaluate(a.cache, a.workers)
    text = json.dumps(res, indent=1, sort_keys=True)
    (a.cache / "evaluate_rec.json").write_text(text + "\n")
    short = {k: res[k] for k in ("records", "genuine_photos_detected", "genuine_photos_in_rec", "rec_flow",
                                 "rec_flow_after_review", "folder_flow", "verdict")}
    print(json.dumps(short, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
