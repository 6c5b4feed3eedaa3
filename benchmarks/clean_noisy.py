"""Noisy LFW-dev benchmark for `facecurate clean` (issue 4, part 4).

Stages (each cached under --cache, default $FACECURATE_BENCH_CACHE or
/tmp/fc/cache/clean_noisy; each folder is named by the settings that made it, so a
cached stage is reused only for the same settings):

  lfw-embed   dlib descriptors of every LFW *dev* photo (face nearest the centre);
              used only to pick look-alike intruders.       -> lfw_dev_dlib.npz
  build       noisy per-identity folders RAW/<identity>/... + ground truth gt.csv
                                                             -> bench-seed<S>/
  pipeline    facecurate align + embed on RAW (the real stages; aligned crops and the
              embedding store)                               -> bench-seed<S>/OUT-<key>/
              (<key>: a digest of align's and embed's settings and the facecurate version)
  evaluate    facecurate clean vs the seed methods on the same embeddings: only clean
              runs again (seconds), on the cached crops and store (or on --out OUT)
              (benchmarks/clean_float16.py: the same with the store in float16)

Only identities listed in splits/lfw-dev.txt are used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FACECURATE_DATA", REPO.parent / "shared" / "data")).resolve()
CACHE = Path(os.environ.get("FACECURATE_BENCH_CACHE", "/tmp/fc/cache/clean_noisy"))
SEED = 4


def dev_ids() -> list[str]:
    return [s.strip() for s in (DATA / "splits" / "lfw-dev.txt").read_text().splitlines() if s.strip()]


# ----------------------------------------------------------------------------- lfw-embed
def _lfw_embed_part(rels: list) -> list:
    """(rel, unit descriptor) of the photos ``rels`` in which a face is found (worker)."""
    import cv2
    import dlib

    from facecurate.models.dlib_models import SHAPE68, DlibHOGDetector, dlib_descriptors, model_file
    from facecurate.common.records import nearest_to_centre

    det = DlibHOGDetector(max_upsample=1)
    sp = dlib.shape_predictor(model_file(SHAPE68))
    out = []
    for rel in rels:
        bgr = cv2.imread(str(DATA / "lfw" / rel))
        if bgr is None:
            continue
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        d = nearest_to_centre(det.detect(rgb), rgb.shape[1], rgb.shape[0])
        if d is None:
            continue
        x1, y1, x2, y2 = (int(round(v)) for v in d.box)
        shape = sp(rgb, dlib.rectangle(x1, y1, x2 - 1, y2 - 1))
        v = dlib_descriptors([dlib.get_face_chip(rgb, shape, 150, 0.25)])[0]
        out.append((rel, v / np.linalg.norm(v)))
    return out


def lfw_embed(cache: Path, workers: int = 1) -> Path:
    """Embed every LFW dev photo with dlib (detector + 68 landmarks + dlib's own chip),
    on ``workers`` spawned processes (the same result in the same order for any number)."""
    import multiprocessing as mp

    out = cache / "lfw_dev_dlib.npz"
    if out.exists():
        return out
    paths = [f"{i}/{f}" for i in dev_ids() for f in sorted(os.listdir(DATA / "lfw" / i))]
    parts = [paths[a:a + 250] for a in range(0, len(paths), 250)]
    t0 = time.time()
    found = []
    with mp.get_context("spawn").Pool(max(1, workers)) as pool:
        for k, part in enumerate(pool.imap(_lfw_embed_part, parts)):
            found += part
            print(f"lfw-embed {min(len(paths), (k + 1) * 250)}/{len(paths)} {time.time() - t0:.0f}s",
                  file=sys.stderr, flush=True)
    tmp = cache / "lfw_dev_dlib.tmp.npz"
    np.savez(tmp, names=np.array([r for r, _ in found]), emb=np.array([v for _, v in found], np.float32))
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------- build
GT_COLUMNS = ("source", "identity", "kind", "degrade", "dup_of", "panels")
KINDS = (  # noise items per folder, drawn with these weights
    ("intruder", 0.25), ("lookalike", 0.25), ("duplicate", 0.2), ("nonface", 0.1),
    ("group_without_subject", 0.05), ("exact_duplicate", 0.05), ("costar", 0.1),
)
CAP = 20  # genuine photos per folder at most


def _imread(p):
    import cv2

    img = cv2.imread(str(p))
    if img is None:
        raise RuntimeError(f"cannot read {p}")
    return img


def _degrade(img, kind, rng):
    import cv2

    h, w = img.shape[:2]
    if kind == "blur":
        return cv2.GaussianBlur(img, (0, 0), float(rng.uniform(2.0, 3.5)))
    if kind == "lowres":
        s = float(rng.uniform(0.15, 0.25))
        small = cv2.resize(img, (max(8, int(w * s)), max(8, int(h * s))), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if kind == "occlusion":  # a grey block over the lower or one side of the face
        out = img.copy()
        cx, cy = w // 2, h // 2
        if rng.random() < 0.5:  # mouth / chin
            out[cy + 12: cy + 60, cx - 45: cx + 45] = int(rng.integers(0, 255))
        else:  # one side, eye to chin
            x0 = cx - 55 if rng.random() < 0.5 else cx + 5
            out[cy - 30: cy + 60, x0: x0 + 50] = int(rng.integers(0, 255))
        return out
    if kind == "jpeg":
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(4, 9))])
        return cv2.imdecode(buf, cv2.IMREAD_COLOR)
    raise ValueError(kind)


def _nonface(rng, dogs):
    """A picture with no human face: a crop of dlib's dogs.jpg, a texture, or noise."""
    import cv2

    k = int(rng.integers(0, 3))
    if k == 0:
        h, w = dogs.shape[:2]
        s = int(rng.integers(min(h, w) // 3, min(h, w)))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        return cv2.resize(dogs[y:y + s, x:x + s], (250, 250))
    if k == 1:  # smooth random texture
        small = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
        return cv2.resize(small, (250, 250), interpolation=cv2.INTER_CUBIC)
    return rng.integers(0, 256, (250, 250, 3)).astype(np.uint8)


def bench_root(cache: Path, seed: int = SEED) -> Path:
    return cache / f"bench-seed{seed}"


#: embed's settings for the benchmark (align's are AlignConfig's defaults)
EMBED_SETTINGS = dict(model="dlib", flip=True, dlib_feed="five")


def out_dir(cache: Path, seed: int = SEED) -> Path:
    """The pipeline's OUT for these settings: align's config, embed's settings, align.csv's
    columns and the facecurate version name it, so a change of any of them makes a new one."""
    import dataclasses
    import hashlib

    import facecurate
    from facecurate.align import AlignConfig
    from facecurate.common.constants import ALIGN_COLUMNS

    key = json.dumps(dict(align=dataclasses.asdict(AlignConfig()), embed=EMBED_SETTINGS,
                          version=facecurate.__version__, align_columns=list(ALIGN_COLUMNS)), sort_keys=True)
    return bench_root(cache, seed) / f"OUT-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def build(cache: Path, seed: int = SEED) -> Path:
    """Write RAW/<identity>/*.jpg and gt.csv. Deterministic for a seed."""
    import cv2

    from facecurate.common.files import write_csv_atomic

    root = bench_root(cache, seed)
    if (root / "gt.csv").exists():
        return root
    raw = root / "RAW"
    rng = np.random.default_rng(seed)
    z = np.load(lfw_embed(cache))
    names = [str(n) for n in z["names"]]
    emb = z["emb"]
    row_of = {n: i for i, n in enumerate(names)}
    ids = dev_ids()
    photos = {i: sorted(os.listdir(DATA / "lfw" / i)) for i in ids}
    subjects = [i for i in ids if len(photos[i]) >= 3]
    pool = [f"{i}/{f}" for i in ids if len(photos[i]) < 3 for f in photos[i]]  # other people
    pool_rows = np.array([row_of[p] for p in pool if p in row_of])
    pool_names = [names[r] for r in pool_rows]
    excess = {}  # subject photos not used as that subject's genuine ones (co-stars elsewhere)
    genuine = {}
    for s in subjects:
        ph = list(photos[s])
        rng.shuffle(ph)
        genuine[s] = sorted(ph[:CAP])
        excess[s] = sorted(ph[CAP:])
    dogs = _imread(DATA / "dlib-faces" / "dogs.jpg")
    used_lookalike: set[str] = set()
    rows = []

    def save(ident, name, img, **gt):
        p = raw / ident / name
        p.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(p), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
        rows.append(dict(source=f"{ident}/{name}", identity=ident, **gt))

    for s in subjects:
        gen = genuine[s]
        n = len(gen)
        rate = float(rng.uniform(0.1, 0.5))
        m = max(1, int(round(rate * n)))
        kinds = rng.choice([k for k, _ in KINDS], size=m, p=[w for _, w in KINDS])
        # one genuine photo in ~30% of folders goes into a group photo (subject among others)
        n_group = int(rng.random() < 0.3) + int(rng.random() < 0.1)
        group_set = set(rng.choice(gen, size=min(n_group, n), replace=False).tolist())
        degr = {}
        for g in gen:
            if rng.random() < 0.1:
                degr[g] = str(rng.choice(["blur", "lowres", "occlusion", "jpeg"]))
        srows = [row_of[f"{s}/{g}"] for g in gen if f"{s}/{g}" in row_of]
        centre = emb[srows].mean(0) if srows else None
        stored = {}
        for g in gen:
            img = _imread(DATA / "lfw" / s / g)
            photo = f"{s}/{g}"
            if g in group_set:
                k = int(rng.integers(2, 5))
                others = [pool[int(j)] for j in rng.choice(len(pool), size=k - 1, replace=False)]
                pos = int(rng.integers(0, k))
                panels, tiles = [], []
                for j in range(k):
                    if j == pos:
                        tiles.append(img)
                        panels.append([j * 250, 0, j * 250 + 250, 250, s, photo, 1])
                    else:
                        o = others.pop()
                        tiles.append(_imread(DATA / "lfw" / o))
                        panels.append([j * 250, 0, j * 250 + 250, 250, o.split("/")[0], o, 0])
                canvas = np.concatenate(tiles, axis=1)
                save(s, "group_" + g, canvas, kind="group", degrade="", dup_of="", panels=json.dumps(panels))
                continue
            d = degr.get(g, "")
            if d:
                img = _degrade(img, d, rng)
            stored[g] = img
            save(s, g, img, kind="genuine", degrade=d, dup_of="",
                 panels=json.dumps([[0, 0, 250, 250, s, photo, 1]]))
        for t, kind in enumerate(kinds):
            name = f"web_{t:03d}.jpg"
            if kind in ("duplicate", "exact_duplicate") and stored:
                g = sorted(stored)[int(rng.integers(0, len(stored)))]
                img = stored[g]
                photo = f"{s}/{g}"
                if kind == "exact_duplicate":
                    p = raw / s / name
                    (raw / s / g).parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes((raw / s / g).read_bytes())
                    rows.append(dict(source=f"{s}/{name}", identity=s, kind=kind, degrade=degr.get(g, ""),
                                     dup_of=photo, panels=json.dumps([[0, 0, 250, 250, s, photo, 1]])))
                    continue
                sc = float(rng.uniform(0.6, 1.6))
                c = int(rng.integers(0, 8))
                im = img[c:250 - c, c:250 - c]
                size = int(round((250 - 2 * c) * sc))
                im = cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA if sc < 1 else cv2.INTER_CUBIC)
                ok, buf = cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(50, 90))])
                im = cv2.imdecode(buf, cv2.IMREAD_COLOR)
                f = size / (250 - 2 * c)
                save(s, name, im, kind="duplicate", degrade=degr.get(g, ""), dup_of=photo,
                     panels=json.dumps([[-c * f, -c * f, (250 - c) * f, (250 - c) * f, s, photo, 1]]))
            elif kind == "lookalike" and centre is not None:
                sims = emb[pool_rows] @ centre
                order = np.argsort(-sims, kind="stable")
                cand = [pool_names[j] for j in order[:40] if pool_names[j] not in used_lookalike][:10]
                o = cand[int(rng.integers(0, len(cand)))]
                used_lookalike.add(o)
                save(s, name, _imread(DATA / "lfw" / o), kind="lookalike", degrade="", dup_of="",
                     panels=json.dumps([[0, 0, 250, 250, o.split("/")[0], o, 0]]))
            elif kind == "costar":
                others = [x for x in subjects if x != s and excess[x]]
                x = others[int(rng.integers(0, len(others)))]
                o = f"{x}/{excess[x][int(rng.integers(0, len(excess[x])))]}"
                save(s, name, _imread(DATA / "lfw" / o), kind="costar", degrade="", dup_of="",
                     panels=json.dumps([[0, 0, 250, 250, x, o, 0]]))
            elif kind == "nonface":
                save(s, name, _nonface(rng, dogs), kind="nonface", degrade="", dup_of="", panels="[]")
            elif kind == "group_without_subject":
                k = int(rng.integers(2, 4))
                others = [pool[int(j)] for j in rng.choice(len(pool), size=k, replace=False)]
                canvas = np.concatenate([_imread(DATA / "lfw" / o) for o in others], axis=1)
                panels = [[j * 250, 0, j * 250 + 250, 250, o.split("/")[0], o, 0] for j, o in enumerate(others)]
                save(s, name, canvas, kind="group_without_subject", degrade="", dup_of="", panels=json.dumps(panels))
            else:  # intruder (or a duplicate/lookalike that could not be made)
                o = pool[int(rng.integers(0, len(pool)))]
                save(s, name, _imread(DATA / "lfw" / o), kind="intruder", degrade="", dup_of="",
                     panels=json.dumps([[0, 0, 250, 250, o.split("/")[0], o, 0]]))
    write_csv_atomic(root / "gt.csv", GT_COLUMNS, rows)
    return root


# ----------------------------------------------------------------------------- pipeline
def pipeline(cache: Path, workers: int = 1) -> Path:
    """The real stages on the built folders: align then embed (both resume)."""
    from facecurate.align.align import AlignConfig, run_align

    root = build(cache)
    out = out_dir(cache)
    t0 = time.time()
    s = run_align(root / "RAW", out, AlignConfig(), workers=workers)
    print(f"align: {s.get('crops')} crops, {time.time() - t0:.0f}s", file=sys.stderr)
    t0 = time.time()
    try:
        from facecurate.embed.embed import run_embed
    except ImportError:  # the embed stage has not landed: dlib's own chip, same store format
        embed_surrogate(root / "RAW", out)
    else:
        run_embed(out, workers=workers, show_progress=False, **EMBED_SETTINGS)
    print(f"embed: {time.time() - t0:.0f}s", file=sys.stderr)
    return out


def embed_surrogate(raw: Path, out: Path) -> None:
    """dlib descriptors from the source photos (68 landmarks in align's box, dlib's
    150x150 chip), written in the embed stage's store format, model "dlib"."""
    import cv2
    import dlib

    from facecurate.common.files import read_csv, write_csv_atomic, write_text_atomic
    from facecurate.models.dlib_models import SHAPE68, dlib_descriptors, model_file

    if (out / "embeddings.npy").exists():
        return
    sp = dlib.shape_predictor(model_file(SHAPE68))
    rows = [r for r in read_csv(out / "align.csv") if r["aligned"]]
    vecs = []
    cache_img = {}
    for k, r in enumerate(rows):
        if r["source"] not in cache_img:
            cache_img.clear()
            bgr = cv2.imread(str(raw / r["source"]))
            cache_img[r["source"]] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        rgb = cache_img[r["source"]]
        x1, y1, x2, y2 = (int(round(float(r[c]))) for c in ("x1", "y1", "x2", "y2"))
        shape = sp(rgb, dlib.rectangle(x1, y1, x2 - 1, y2 - 1))
        v = dlib_descriptors([dlib.get_face_chip(rgb, shape, 150, 0.25)])[0]
        vecs.append(v / np.linalg.norm(v))
        if k % 500 == 0:
            print(f"embed-surrogate {k}/{len(rows)}", file=sys.stderr, flush=True)
    np.save(out / "embeddings.tmp.npy", np.array(vecs, np.float32))
    os.replace(out / "embeddings.tmp.npy", out / "embeddings.npy")
    write_csv_atomic(out / "embeddings.csv", ("aligned", "source", "identity", "face"), rows)
    write_text_atomic(out / "embeddings.json", json.dumps({"model": "dlib-surrogate", "dim": 128}))


# ----------------------------------------------------------------------------- evaluate
DEFINITIONS = {
    "face": "a row of align.csv with a crop (every detected face, bystanders included)",
    "genuine face": "the face of the folder's subject in a photo of the subject (group photos included, "
                    "degraded photos included); matched by geometry: the detected face nearest the centre of "
                    "the subject's 250x250 panel, within 22% of the panel width",
    "purity": "kept genuine faces / kept faces (review faces are not kept)",
    "retention": "distinct genuine photos with a kept genuine face / distinct genuine photos whose subject "
                 "face align detected (re-hosted copies of one photo count once; review faces are not kept)",
    "retention_all": "as retention, over every distinct genuine photo put in the folders (align misses count)",
    "review_share": "review faces / faces",
    "clean_after_review": "clean's kept faces plus the review faces a person would approve (genuine ones, "
                          "taken from the ground truth); review impostors removed",
    "duplicates_caught": "surplus copies (beyond one per distinct genuine photo) not kept / surplus copies "
                         "detected",
    "cases.degradation": "per degradation of the distinct genuine photos whose subject face align detected "
                         "(group: the subject inside a group photo): photos, kept (a copy kept), "
                         "kept_or_review (a copy kept or in review) and their shares",
    "cases.impure_keeps": "kept faces that are not genuine, by the noise role of their photo (bystander: "
                          "another face of a photo of the subject or of a group photo with the subject)",
    "cases.nothing_kept": "folders with no kept face; of them, those with at least 3 genuine photos detected, "
                          "and how many of those clean flagged in identities.csv (lost / weak_majority / ambiguous)",
    "cases.impure_folders": "folders whose kept faces are less than 0.9 genuine",
}


def label_faces(root: Path, rows: list[dict]) -> tuple[list, list, dict]:
    """Per align row: (genuine: bool, photo key or None); and the genuine photo list."""
    from facecurate.common.files import read_csv

    gt = {r["source"]: r for r in read_csv(root / "gt.csv")}
    by_src = {}
    for i, r in enumerate(rows):
        by_src.setdefault(r["source"], []).append(i)
    genuine = [False] * len(rows)
    key = [None] * len(rows)
    photos = {}
    for src, g in gt.items():
        for x0, y0, x1, y1, person, photo, subj in json.loads(g["panels"]):
            if subj:
                photos.setdefault((g["identity"], photo), False)
            w = x1 - x0
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            best, bd = None, None
            for i in by_src.get(src, []):
                r = rows[i]
                fx = (float(r["x1"]) + float(r["x2"])) / 2
                fy = (float(r["y1"]) + float(r["y2"])) / 2
                dd = ((fx - cx) ** 2 + (fy - cy) ** 2) ** 0.5
                if dd < 0.22 * w and (bd is None or dd < bd):
                    best, bd = i, dd
            if best is not None and subj:
                genuine[best] = True
                key[best] = (g["identity"], photo)
                photos[(g["identity"], photo)] = True
    return genuine, key, photos


def metrics(kept, review, genuine, key, photos) -> dict:
    kept = np.asarray(kept, bool)
    review = np.asarray(review, bool)
    genuine = np.asarray(genuine, bool)
    n_kept = int(kept.sum())
    copies = {}
    for i in np.nonzero(genuine)[0]:
        copies.setdefault(key[i], []).append(i)
    retained = sum(1 for k, v in copies.items() if kept[v].any())
    detected = sum(1 for v in photos.values() if v)
    surplus = sum(len(v) - 1 for v in copies.values())
    surplus_kept = sum(max(0, int(kept[v].sum()) - 1) for v in copies.values())
    return dict(
        purity=round(float((kept & genuine).sum() / max(1, n_kept)), 4),
        retention=round(retained / max(1, detected), 4),
        retention_all=round(retained / max(1, len(photos)), 4),
        review_share=round(float(review.sum() / max(1, len(kept))), 4),
        duplicates_caught=round(1 - surplus_kept / max(1, surplus), 4),
        kept=n_kept, kept_impure=int((kept & ~genuine).sum()), review=int(review.sum()),
    )


def _roles(root: Path, rows: list[dict], genuine: list) -> tuple[list, dict]:
    """Per align row: the noise role of a non-genuine face (None for genuine faces);
    and per genuine photo key, its degradation ("group" for a subject in a group photo)."""
    from facecurate.common.files import read_csv

    gt = {r["source"]: r for r in read_csv(root / "gt.csv")}
    degrade = {}
    for g in gt.values():
        for *_, photo, subj in json.loads(g["panels"]):
            if subj and g["kind"] in ("genuine", "group"):
                degrade[(g["identity"], photo)] = "group" if g["kind"] == "group" else (g["degrade"] or "none")
    role = []
    for r, gen in zip(rows, genuine):
        kind = gt[r["source"]]["kind"]
        role.append(None if gen else "bystander" if kind in ("genuine", "group", "duplicate", "exact_duplicate")
                    else kind)
    return role, degrade


def cases(root: Path, rows: list[dict], kept, review, genuine, key, photos, identities: list[dict]) -> dict:
    """The per-case figures (see DEFINITIONS["cases.*"])."""
    role, degrade = _roles(root, rows, genuine)
    kept_photo, seen_photo = set(), set()
    for i, r in enumerate(rows):
        if genuine[i] and kept[i]:
            kept_photo.add(key[i])
        if genuine[i] and (kept[i] or review[i]):
            seen_photo.add(key[i])
    deg: dict = {}
    for k, found in sorted(photos.items()):
        if found:
            d = deg.setdefault(degrade.get(k, "none"), dict(photos=0, kept=0, kept_or_review=0))
            d["photos"] += 1
            d["kept"] += k in kept_photo
            d["kept_or_review"] += k in seen_photo
    for d in deg.values():
        d["kept_share"] = round(d["kept"] / d["photos"], 4)
        d["kept_or_review_share"] = round(d["kept_or_review"] / d["photos"], 4)
    impure: dict = {}
    for i in range(len(rows)):
        if kept[i] and not genuine[i]:
            impure[role[i]] = impure.get(role[i], 0) + 1
    per_id: dict = {}
    for i, r in enumerate(rows):
        c = per_id.setdefault(r["identity"], [0, 0])
        c[0] += kept[i]
        c[1] += kept[i] and genuine[i]
    n_gen: dict = {}
    for (ident, _), found in photos.items():
        n_gen[ident] = n_gen.get(ident, 0) + bool(found)
    flags = {r["identity"]: r["flags"] for r in identities}
    empty = sorted(i for i in flags if per_id.get(i, [0])[0] == 0)
    big = [i for i in empty if n_gen.get(i, 0) >= 3]
    flagged = [i for i in big if {"lost", "weak_majority", "ambiguous"} & set(flags[i].split(";"))]
    return dict(degradation=dict(sorted(deg.items())), impure_keeps=dict(sorted(impure.items())),
                nothing_kept=dict(folders=len(empty), with_3_genuine=len(big), flagged=len(flagged),
                                  unflagged=sorted(set(big) - set(flagged))),
                impure_folders=sorted(i for i, (k, g) in per_id.items() if k and g / k < 0.9))


def seed_cw(emb, ident, dist):
    """Seed method 1: one Chinese-whispers pass (dlib) at a Euclidean distance,
    keep the largest cluster of every folder."""
    import dlib

    keep = np.zeros(len(emb), bool)
    for g in np.unique(ident):
        rows = np.nonzero(ident == g)[0]
        labs = np.asarray(dlib.chinese_whispers_clustering([dlib.vector(v.astype(float).tolist())
                                                            for v in emb[rows]], float(dist)))
        vals, cnt = np.unique(labs, return_counts=True)
        keep[rows[labs == vals[np.argmax(cnt)]]] = True
    return keep


def seed_centre(emb, ident, thr, iters):
    """Seed method 2: cosine to the folder mean above a constant; iterated: the mean
    of what was kept, again (iters times)."""
    keep = np.zeros(len(emb), bool)
    for g in np.unique(ident):
        rows = np.nonzero(ident == g)[0]
        e = emb[rows]
        m = e.mean(0)
        k = np.ones(len(rows), bool)
        for _ in range(1 + iters):
            c = m / max(np.linalg.norm(m), 1e-12)
            k = e @ c >= thr
            if not k.any():
                break
            m = e[k].mean(0)
        keep[rows[k]] = True
    return keep


def linked_copy(src: Path, dst: Path) -> Path:
    """A copy of OUT's inputs to clean (crops, align.csv, the store) as hard links, without
    its work folder and clean's outputs; a file replaced in it (atomic rename) leaves
    OUT's own untouched."""
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, copy_function=os.link,
                    ignore=shutil.ignore_patterns(".facecurate", "clean.*", "identities.csv", "merges.csv"))
    return dst


def variant_out(root: Path, src: Path, lookalike_share: float, seed: int = 0) -> Path:
    """OUT without a share of the look-alike photos: a copy of OUT (crops hard-linked,
    embedding store shared) whose align.csv keeps each look-alike source with
    probability ``lookalike_share`` (seeded). Every other item is unchanged."""
    from facecurate.common import constants as C
    from facecurate.common.files import read_csv, write_csv_atomic

    dst = linked_copy(src, src.parent / f"{src.name}_lookalikes_{lookalike_share:g}")
    rng = np.random.default_rng(seed)
    look = sorted(r["source"] for r in read_csv(root / "gt.csv") if r["kind"] == "lookalike")
    gone = {s for s in look if rng.random() >= lookalike_share}
    rows = read_csv(src / C.ALIGN_MANIFEST)
    (dst / C.ALIGN_MANIFEST).unlink()
    write_csv_atomic(dst / C.ALIGN_MANIFEST, list(rows[0].keys()), [r for r in rows if r["source"] not in gone])
    return dst


def evaluate(cache: Path, clean_args: dict | None = None, baselines: bool = True,
             lookalike_share: float = 1.0, out: Path | None = None) -> dict:
    """clean (and the seed methods) on ``out`` (default: the pipeline's OUT under
    ``cache``), scored with the ground truth of ``cache``'s benchmark."""
    from facecurate.clean import clean as fc
    from facecurate.clean.vectors import normalize
    from facecurate.common.files import read_csv

    root = bench_root(cache)
    out = out or out_dir(cache)
    out = out if lookalike_share >= 1.0 else variant_out(root, out, lookalike_share)
    t0 = time.time()
    summary = fc.run_clean(out, show_progress=False, **(clean_args or {}))
    t_clean = time.time() - t0
    rows = read_csv(out / "clean.csv")
    genuine, key, photos = label_faces(root, rows)
    kept = [r["decision"] == "keep" for r in rows]
    review = [r["decision"] == "review" for r in rows]
    res = {"definitions": DEFINITIONS, "out": str(out), "lookalike_share": lookalike_share, "faces": len(rows),
           "identities": summary["identities"],
           "genuine_photos": len(photos), "genuine_photos_detected": sum(photos.values()),
           "clean": dict(metrics(kept, review, genuine, key, photos), seconds=round(t_clean, 1),
                         thresholds=summary["thresholds"], reasons=summary["reasons"])}
    # after a person has reviewed the review faces (decisions taken from the ground truth)
    res["clean_after_review"] = metrics([a or (b and g) for a, b, g in zip(kept, review, genuine)], review, genuine,
                                        key, photos)
    res["cases"] = cases(root, rows, kept, review, genuine, key, photos, read_csv(out / "identities.csv"))
    if not baselines:
        return res
    vecs, where, _ = fc.store_index(out)
    emb = normalize(np.asarray(vecs[[where[r["aligned"]] for r in rows]], np.float32))
    names = sorted({r["identity"] for r in rows})
    gid = {n: i for i, n in enumerate(names)}
    ident = np.array([gid[r["identity"]] for r in rows])
    prim = np.array([r["primary"] == "1" for r in rows])
    none = [False] * len(rows)
    base = {}
    for faces, mask in (("all_faces", np.ones(len(rows), bool)), ("primary_faces", prim)):
        sub = np.nonzero(mask)[0]

        def full(k):
            out_ = np.zeros(len(rows), bool)
            out_[sub[k]] = True
            return out_

        for d in (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6):
            base[f"cw_{d}_{faces}"] = metrics(full(seed_cw(emb[sub], ident[sub], d)), none, genuine, key, photos)
        for t in np.round(np.arange(0.90, 0.9851, 0.005), 3):
            base[f"centre_{t}_{faces}"] = metrics(full(seed_centre(emb[sub], ident[sub], t, 0)), none, genuine,
                                                   key, photos)
            base[f"iterated_{t}_{faces}"] = metrics(full(seed_centre(emb[sub], ident[sub], t, 5)), none,
                                                     genuine, key, photos)
    res["baselines"] = base
    verdict = {}
    for name in ("clean", "clean_after_review"):
        c = res[name]
        for fam in ("cw", "centre", "iterated"):
            pts = {k: v for k, v in base.items() if k.startswith(fam + "_")}
            best_ret = max([v["retention"] for v in pts.values() if v["purity"] >= c["purity"]], default=0.0)
            best_pur = max([v["purity"] for v in pts.values() if v["retention"] >= c["retention"]], default=0.0)
            verdict[f"{name} vs {fam}"] = dict(
                best_retention_at_clean_purity=best_ret, best_purity_at_clean_retention=best_pur,
                clean_dominates=bool(best_ret < c["retention"] and best_pur < c["purity"]))
    res["verdict"] = verdict
    return res


def brief(res: dict) -> dict:
    """The figures the issue asks for, without the baselines and definitions."""
    c = res["clean"]
    out = {k: c[k] for k in ("purity", "retention", "review_share", "kept", "kept_impure", "review", "seconds")}
    out["after_review"] = {k: res["clean_after_review"][k] for k in ("purity", "retention")}
    out.update(res["cases"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["lfw-embed", "build", "pipeline", "evaluate", "all"])
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--workers", type=int, default=1, help="processes (lfw-embed and pipeline stages)")
    ap.add_argument("--no-baselines", action="store_true", help="evaluate clean only")
    ap.add_argument("--lookalike-share", type=float, default=1.0,
                    help="evaluate on a copy of OUT that keeps this share of the look-alike photos (1: all; "
                         "1/3 gives a set whose seed baselines are closer to the issue's reference figures)")
    ap.add_argument("--clean-args", type=json.loads, default=None,
                    help='run_clean keyword arguments as JSON, e.g. \'{"model_overrides": {"keep": 0.95}}\'')
    ap.add_argument("--brief", action="store_true", help="print the headline and per-case figures only")
    ap.add_argument("--out", type=Path, default=None,
                    help="evaluate this OUT (a copy of a pipeline OUT: clean writes into it) instead of the "
                         "pipeline's OUT under --cache; the result is printed, not written to --cache")
    a = ap.parse_args(argv)
    a.cache.mkdir(parents=True, exist_ok=True)
    if a.stage in ("lfw-embed", "all"):
        print(lfw_embed(a.cache, a.workers))
    if a.stage in ("build", "all"):
        print(build(a.cache))
    if a.stage in ("pipeline", "all"):
        print(pipeline(a.cache, a.workers))
    if a.stage in ("evaluate", "all"):
        res = evaluate(a.cache, a.clean_args, baselines=not a.no_baselines, lookalike_share=a.lookalike_share,
                       out=a.out)
        text = json.dumps(brief(res) if a.brief else res, indent=1, sort_keys=True)
        name = "evaluate.json" if a.lookalike_share >= 1.0 else f"evaluate_lookalikes_{a.lookalike_share:g}.json"
        if a.out is None:
            (a.cache / name).write_text(text + "\n")
        print(text)


if __name__ == "__main__":
    main()
