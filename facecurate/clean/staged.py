"""clean of a packed dataset as a sharded stage: millions of identities on one machine
or a cluster, in bounded memory, with the outputs of :func:`facecurate.clean.clean_rec.run_clean_rec`.

The run (``run_staged``):

* **plan** — one streamed pass over the store's embeddings.csv and the .idx writes the
  face table (``table/*.npy``: each face's key, label, identity number and record
  offset; faces = the store's rows, in key order) and cuts the identities, in label
  order, into shards of about ``shard_faces`` faces. The plan depends only on the
  inputs and ``shard_faces``, never on the engine, the workers or the part;
* four **steps** over the shards (:mod:`facecurate.clean.shard_steps`), each run by the
  engines' runner (local processes or Ray actors; ``--part K/N``), with a per-shard
  record as the resume state;
* between them, **global steps** in this process, from small per-shard summaries:
  the identity centres (exclusion, merge partners, the cohort of centres and the
  centres' crowding), the exact median of the cohort means (two passes of counting
  over the shards' files), the review budget over the review candidates only, and
  at the end the merge search over the kept centres and identities.csv.

This process holds per-identity arrays (centres, counts, flags) and the review
candidates, never an array over all faces. Everything lives under
``DEST/.facecurate/clean/<settings digest>/``: a rerun with the same settings
continues, other settings start afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from facecurate.clean.clean_cohort import CohortPlan, plan_cohort
from facecurate.clean.clean_common import clean_summary, clean_versions, identity_row
from facecurate.clean.clean_core import excluded_by_vectors, fill_review, limit_review
from facecurate.clean.clean_params import CleanParams
from facecurate.clean.shard_steps import STEPS, CleanShardWorker, Layout, flag_names, load, plan_arrays, read_rows, \
    save
from facecurate.clean.rec_records import labels_of
from facecurate.clean.similar import have_faiss, similar_pairs
from facecurate.clean.vectors import all_unit, normalize
from facecurate.common import constants as C
from facecurate.common.files import atomic_write, csv_cell, progress, write_text_atomic
from facecurate.common.manifests import MergeRow
from facecurate.common.recdata import int_label, rec_key
from facecurate.common.recordio import iter_idx
from facecurate.common.workspace import Workspace
from facecurate.engines import get_engine
from facecurate.engines.local import LocalEngine, LocalPool
from facecurate.engines.runner import RunError, Shard, WorkerSpec, fail_message, merge_if_due, run_shards

#: faces per shard of identities (a shard's rows and its analysis fit a worker's memory)
SHARD_FACES = 200_000
#: rows of embeddings.csv / the face table handled at a time
CHUNK = 1 << 20


class NotStageable(Exception):
    """The store's order does not allow the sharded run (keys not increasing, labels not
    grouped): the in-memory run handles it."""


# ----------------------------------------------------------------------------- plan
def _store_digest(ws: Workspace, rec_path: Path) -> str:
    """Names the store and the .rec as they are now (sizes and modification times)."""
    h = hashlib.sha256()
    for path in (ws.path(C.EMBEDDINGS_NPY), ws.path(C.EMBEDDINGS_CSV), ws.path(C.EMBEDDINGS_META), rec_path,
                 rec_path.with_suffix(".idx")):
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _settings_digest(store: str, p: CleanParams, ex_ids, ex_vecs, shard_faces: int) -> str:
    h = hashlib.sha256(store.encode())
    h.update(json.dumps(dict(params=p.as_dict(), excluded=sorted(int(g) for g in ex_ids), shard_faces=shard_faces,
                             versions=clean_versions()), sort_keys=True, default=str).encode())
    if ex_vecs is not None:
        h.update(np.ascontiguousarray(ex_vecs, np.float32).tobytes())
    return h.hexdigest()[:16]


def _open_table(tables: Path, name: str, n: int, dtype) -> np.ndarray:
    tables.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(tables / f".{name}.npy.tmp", mode="w+", dtype=dtype, shape=(n,))


def _finish_table(tables: Path, arrays: dict) -> None:
    for name in list(arrays):
        arrays[name].flush()
        del arrays[name]
        (tables / f".{name}.npy.tmp").replace(tables / f"{name}.npy")


def build_table(dest: Path, rec_path: Path, tables: Path, n: int, show_progress: bool) -> dict:
    """The face table of the store's ``n`` rows (see the module), streamed; returns the
    per-identity summary: labels (k,) and first face of each identity (k + 1,)."""
    done = tables / "identities.npz"
    if done.exists():
        return load(done)
    ws = Workspace(dest)
    t = {name: _open_table(tables, name, n, dt) for name, dt in (("key", np.int64), ("label", np.int64),
                                                                 ("identity", np.int32), ("offset", np.int64))}
    last_key, last_lab, ident = -1, None, -1
    id_labels, id_start = [], []
    i = 0
    bar = progress(total=n, desc="clean (plan)", unit="face", disable=None if show_progress else True)
    rows = ws.store_columns("aligned", "identity")
    while True:
        keys, labs = [], []
        for aligned, lab_text in rows:
            k = rec_key(aligned)
            lab = int_label(lab_text)
            if k is None or lab < 0:
                raise NotStageable(f"row {aligned!r}")  # the in-memory run names it
            keys.append(k)
            labs.append(lab)
            if len(keys) >= CHUNK:
                break
        if not keys:
            break
        ka, la = np.asarray(keys, np.int64), np.asarray(labs, np.int64)
        if i + ka.size > n:
            raise NotStageable("more rows than vectors")
        if ka[0] <= last_key or (ka.size > 1 and (np.diff(ka) <= 0).any()):
            raise NotStageable("keys not increasing")
        if (last_lab is not None and la[0] < last_lab) or (la.size > 1 and (np.diff(la) < 0).any()):
            raise NotStageable("labels not grouped in key order")
        new = np.r_[last_lab is None or la[0] != last_lab, la[1:] != la[:-1]]
        starts = np.flatnonzero(new)
        id_labels.extend(la[starts].tolist())
        id_start.extend((starts + i).tolist())
        t["key"][i:i + ka.size], t["label"][i:i + ka.size] = ka, la
        t["identity"][i:i + ka.size] = ident + np.cumsum(new)
        ident += int(new.sum())
        last_key, last_lab = int(ka[-1]), int(la[-1])
        i += ka.size
        bar.update(ka.size)
    bar.close()
    if i != n:
        raise NotStageable("fewer rows than vectors")
    t["offset"][:] = -1
    key = t["key"]
    for ik, io_ in iter_idx(rec_path.with_suffix(".idx")):
        pos = np.searchsorted(key, ik)
        ok = pos < n
        ok[ok] = key[pos[ok]] == ik[ok]
        pos, off = pos[ok], io_[ok]
        first = t["offset"][pos] < 0  # a key listed twice: its first line (as KeyedRecords)
        t["offset"][pos[first]] = off[first]
    del key
    _finish_table(tables, t)
    out = dict(labels=np.asarray(id_labels, np.int64), start=np.asarray(id_start + [n], np.int64))
    save(done, **out)
    return out


def plan_staged_shards(start: np.ndarray, shard_faces: int, salt: str) -> list[Shard]:
    """Consecutive identities in shards of at least ``shard_faces`` faces (the last may
    be smaller): Shard.items is the range of its faces."""
    shards = []
    k = len(start) - 1
    g = 0
    while g < k:
        end = int(np.searchsorted(start, start[g] + shard_faces, "left"))
        end = min(k, max(end, g + 1))
        a, b = int(start[g]), int(start[end])
        digest = hashlib.sha256(f"{salt}:{a}:{b}:{g}:{end}".encode()).hexdigest()[:32]
        shards.append(Shard(len(shards), range(a, b), digest))
        g = end
    return shards


# ----------------------------------------------------------------------------- globals
@contextlib.contextmanager
def _phase(desc: str, show: bool):
    """A one-step bar for a global step of the driver (seen on a terminal while it works)."""
    bar = progress(total=1, desc=desc, unit="step", disable=None if show else True)
    try:
        yield
        bar.update(1)
    finally:
        bar.close()


def _centres(lay: Layout, shards: Sequence[Shard], start: np.ndarray) -> dict:
    """Per identity, from the analyse step's files: centres, median, clusters, share, ambiguous; unit rows."""
    k = lay.identities
    out = dict(centre=np.zeros((k, lay.dim), np.float32), median=np.full(k, np.nan), nclus=np.zeros(k, np.int64),
               dominant_share=np.zeros(k, np.float64), ambiguous=np.zeros(k, bool))
    unit = True
    for s in shards:
        g0 = int(np.searchsorted(start, s.items.start))
        z = load(lay.step_file("analyse", s.index))
        g1 = g0 + len(z["nclus"])
        for name in out:
            out[name][g0:g1] = z[name]
        unit &= bool(z["unit"])
    out["unit"] = unit
    return out


def _global1(lay: Layout, per_id: dict, ex_ids, ex_vecs, workers) -> None:
    """Exclusion and the cohort's plan from the centres."""
    p = lay.params
    k = lay.identities
    excluded = set(int(g) for g in ex_ids) | excluded_by_vectors(per_id["centre"], ex_vecs, p)
    plan = CohortPlan({}, None, None, 0, None, None)
    if lay.offsets:
        def sample(pick):
            vecs = np.load(lay.store, mmap_mode="r")
            x = np.array(vecs[pick], np.float32)
            del vecs
            fid = np.array(np.load(lay.table("identity"), mmap_mode="r")[pick]).astype(np.int64)
            return (normalize(x) if lay.normalize else x), fid
        with LocalPool(workers) as pool:
            plan = plan_cohort(per_id["centre"], np.arange(k), per_id["median"], p, lay.faces, sample, pool=pool)
    save(lay.global_file("global1"), excluded=np.asarray(sorted(excluded), np.int64), **plan_arrays(plan, k))


def _bucket(v: np.ndarray) -> np.ndarray:
    """An order-preserving 16-bit bucket of float32 values."""
    u = np.ascontiguousarray(v, np.float32).view(np.uint32)
    key = np.where(u >> 31 == 1, ~u, u | np.uint32(0x80000000))
    return (key >> 16).astype(np.int64)


def exact_median(parts) -> float:
    """np.median of the concatenation of the float32 arrays ``parts()`` yields, exactly,
    in two passes of counting (memory: one part and 65536 counters)."""
    hist = np.zeros(1 << 16, np.int64)
    n = 0
    nan = False
    for v in parts():
        nan |= bool(np.isnan(v).any())
        v = v[~np.isnan(v)]
        hist += np.bincount(_bucket(v), minlength=1 << 16)
        n += v.size
    if nan:
        return float("nan")
    if n == 0:
        return float(np.median(np.zeros(0, np.float32)))
    ranks = sorted({(n - 1) // 2, n // 2})
    cum = np.cumsum(hist)
    want = {int(np.searchsorted(cum, r, "right")) for r in ranks}
    got = []
    for v in parts():
        v = v[~np.isnan(v)]
        got.append(v[np.isin(_bucket(v), sorted(want))])
    vals = np.sort(np.concatenate(got))
    before = int(cum[min(want) - 1]) if min(want) > 0 else 0
    mid = np.asarray([vals[r - before] for r in ranks], np.float32)
    if len(mid) == 1 and n % 2 == 0:
        mid = np.r_[mid, mid]
    return float(np.median(mid))


def _global2(lay: Layout, shards: Sequence[Shard]) -> None:
    """The cohort's reference: the exact median of the inliers' cohort means (of every
    face's when there is no inlier; the shards' records count them)."""
    has_inl = any(rec["stats"]["inliers"] for rec in _records(lay.step_dir("cohort"), shards))

    def parts():
        for s in shards:
            z = load(lay.step_file("cohort", s.index))
            yield z["co"][z["inl"]] if has_inl else z["co"]
    save(lay.global_file("global2"), ref=np.float64(exact_median(parts)))


def _global3(lay: Layout, shards: Sequence[Shard]) -> int:
    """The review budget over the review candidates of every shard (limit_review, then
    fill_review, on the candidates in face order: the same choice as on all faces)."""
    parts = [load(lay.step_file("decide", s.index)) for s in shards]
    idx = np.concatenate([z["cand"] for z in parts]).astype(np.int64)
    dec = np.concatenate([z["cand_decision"] for z in parts]).astype(np.uint8)
    rea = np.concatenate([z["cand_reason"] for z in parts]).astype(np.uint8)
    score = np.concatenate([z["cand_score"] for z in parts]).astype(np.float32)
    d0, r0 = dec.copy(), rea.copy()
    resolved = limit_review(dec, rea, score, lay.params, lay.faces)
    fill_review(dec, rea, score, lay.params, lay.faces)
    ch = (dec != d0) | (rea != r0)
    save(lay.global_file("global3"), index=idx[ch], decision=dec[ch], reason=rea[ch], resolved=np.int64(resolved))
    return resolved


# ----------------------------------------------------------------------------- outputs
def _outputs(lay: Layout, shards: Sequence[Shard], start: np.ndarray, per_id: dict, label_names: dict,
             failed: dict, manual_total: int, model: str, workers) -> dict:
    """identities.csv, merges.csv, clean.csv (the shards' parts joined) and clean.json."""
    p, k, d = lay.params, lay.identities, lay.dim
    dest = Path(lay.dest)
    fin = np.zeros((k, d), np.float32)  # the kept faces' centres (the analysed centre where none is kept)
    has = np.zeros(k, bool)
    flags = np.zeros(k, np.uint8)
    counts = {name: np.zeros(k, np.int64) for name in ("faces", "kept", "review", "dropped", "duplicates",
                                                       "not_subject")}
    med = np.full(k, np.nan)
    decisions = {C.DECISION_KEEP: 0, C.DECISION_DROP: 0, C.DECISION_REVIEW: 0}
    reasons: dict = {}
    rows_total = manual_kept = 0
    for s in shards:
        g0 = int(np.searchsorted(start, s.items.start))
        z = load(lay.step_file("decide", s.index))
        g1 = g0 + len(z["has"])
        fin[g0:g1], has[g0:g1], flags[g0:g1] = z["fin"], z["has"], z["flags"]
        w = load(lay.step_file("write", s.index))
        med[g0:g1] = w["median"]
        for name in counts:
            counts[name][g0:g1] = w[name]
    for rec in _records(lay.step_dir("write"), shards):
        st = rec["stats"]
        rows_total += st["rows"]
        manual_kept += st["manual_kept"]
        for key, v in st["decisions"].items():
            decisions[key] = decisions.get(key, 0) + v
        for key, v in st["reasons"].items():
            reasons[key] = reasons.get(key, 0) + v
    excluded = load(lay.global_file("global1"))["excluded"]
    live = np.flatnonzero(has & ~np.isin(np.arange(k), excluded))
    fin = fin[live] if live.size < k else fin
    t0 = time.perf_counter()
    with LocalPool(workers) as pool, _phase(f"clean: merge search ({_search_kind(len(live))}, {len(live)} "
                                            "kept centres)", lay.show):
        pairs = similar_pairs(fin, p.merge, pool=pool)
    del fin
    merge_s = time.perf_counter() - t0
    merges = [(int(live[a]), int(live[b]), s) for a, b, s in pairs]
    bit = 1 << 5  # FLAG_ORDER's merge_candidate
    for a, b, _ in merges:
        flags[a] |= bit
        flags[b] |= bit
    labels = load(Path(lay.tables) / "identities.npz")["labels"]
    names = [label_names.get(int(lab), str(int(lab))) for lab in labels.tolist()]
    ws = Workspace(dest)
    ws.remove_stale_temps(C.CLEAN_OUTPUTS)
    # identities.csv: every label of an image record, with or without an embedded face
    f_lab = failed["label"][failed["label"] >= 0]
    all_labs, f_cnt = np.unique(f_lab, return_counts=True)
    extra = dict(zip(all_labs.tolist(), f_cnt.tolist()))
    rows_labels = sorted(set(labels.tolist()) | set(extra))
    g_of = {int(lab): g for g, lab in enumerate(labels.tolist())}
    flag_counts = {f: 0 for f in (C.FLAG_AMBIGUOUS, C.FLAG_EXCLUDED, C.FLAG_LOST, C.FLAG_WEAK)}

    def ident_rows():
        for lab in rows_labels:
            g = g_of.get(lab)
            n_img = extra.get(lab, 0) + (int(counts["faces"][g]) if g is not None else 0)
            inf = None
            if g is not None:
                inf = dict(faces=int(counts["faces"][g]), kept=int(counts["kept"][g]),
                           dropped=int(counts["dropped"][g]), review=int(counts["review"][g]),
                           duplicates=int(counts["duplicates"][g]), not_subject=int(counts["not_subject"][g]),
                           clusters=int(per_id["nclus"][g]), dominant_share=float(per_id["dominant_share"][g]),
                           flags=flag_names(int(flags[g])))
                for f in inf["flags"]:
                    if f in flag_counts:
                        flag_counts[f] += 1
            yield identity_row(label_names.get(lab, str(lab)), n_img, inf,
                               float(med[g]) if g is not None else float("nan"))
    ws.write_identities(ident_rows())
    merge_rows = [MergeRow(a=names[a], b=names[b], similarity=float(s)) for a, b, s in merges]
    ws.write_merges(merge_rows)
    _join_csv(ws.path(C.CLEAN_CSV), lay.step_dir("write"), shards)
    resolved = int(load(lay.global_file("global3"))["resolved"])
    summary = dict(input="rec", **clean_summary(rows_total, decisions, reasons, len(rows_labels), flag_counts,
                                                merge_rows, resolved, p, model, manual_kept,
                                                manual_total - manual_kept))
    ws.write_clean_meta(dict(summary=summary, params=p.as_dict(), versions=clean_versions()))
    return dict(summary, merge_search=_search_kind(len(live)), merge_search_s=round(merge_s, 2))


def _search_kind(n: int) -> str:
    if n <= 20000:
        return "exact (blocks)"
    return "faiss IVF" if have_faiss() else "numpy IVF"


def _records(folder: Path, shards: Sequence[Shard]):
    for s in shards:
        yield json.loads((folder / f"{s.name}.json").read_text())


def _join_csv(path: Path, parts: Path, shards: Sequence[Shard]) -> None:
    import csv
    import io

    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator="\n").writerow([csv_cell(c) for c in C.REC_CLEAN_COLUMNS])
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue().encode("utf-8"))
        for s in shards:
            with open(parts / f"shard_{s.index:06d}.csv", "rb") as src:
                shutil.copyfileobj(src, f, 1 << 22)


# ----------------------------------------------------------------------------- run
def run_staged(dest: Path, rec_path: Path, p: CleanParams, model: str, label_names: dict, exclusions, *,
               engine="local", workers=None, ray_address=None, part=None, shard_faces: int | None = None,
               show_progress: bool = True, previous_manual=None, on_shard=None) -> dict:
    """The sharded clean of ``dest`` (see the module). ``on_shard(step, record)`` is
    called after each shard finished now. ``exclusions(names)`` gives
    (identity numbers, vectors) to exclude for the identities' names. Returns the
    summary; with ``part``, the summary of what this part did when the outputs are not
    due yet. Raises NotStageable when the store's order does not allow it."""
    t_start = time.perf_counter()
    ws = Workspace(dest)
    n, d = _store_shape(ws)
    shard_faces = int(shard_faces or SHARD_FACES)
    root = dest / C.WORK_DIR / "clean"
    store = _store_digest(ws, rec_path)
    tables = root / f"table-{store}"
    ids = build_table(dest, rec_path, tables, n, show_progress)
    start = ids["start"]
    k = len(start) - 1
    ex_ids, ex_vecs = exclusions([label_names.get(int(lab), str(int(lab))) for lab in ids["labels"].tolist()])
    digest = _settings_digest(store, p, ex_ids, ex_vecs, shard_faces)
    work = root / digest
    if part is None:  # a whole run forgets other settings' work
        for old in root.iterdir():
            if old.is_dir() and old.name not in (digest, tables.name):
                shutil.rmtree(old, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    shards = plan_staged_shards(start, shard_faces, digest)
    unit_file = tables / "unit.json"
    if not unit_file.exists() and _store_dtype(ws) != np.float32:  # float16 rows often miss unit length
        write_text_atomic(unit_file, json.dumps({"unit": _all_unit(ws, show_progress)}))
    unit = json.loads(unit_file.read_text())["unit"] if unit_file.exists() else None
    offsets = bool(n and (p.cohort or p.cohort_centre or p.margin or p.spread))
    names = _names(ids["labels"], label_names)
    manual = previous_manual or {}
    write_key = hashlib.sha256(json.dumps([manual, names], sort_keys=True).encode()).hexdigest()[:12]
    lay = Layout(str(dest), str(work), str(tables), str(ws.path(C.EMBEDDINGS_NPY)), str(rec_path), n, k, d,
                 unit is False, p, offsets, write_key, show_progress)
    if part is None:  # the write steps of other manual decisions or names
        for old in work.glob("write-*"):
            if old != lay.step_dir("write"):
                shutil.rmtree(old, ignore_errors=True)
    _write_small_files(lay, rec_path, shards, label_names, names, manual, ws)
    if engine == "local" and not ray_address:  # the driver keeps to its per-identity arrays: shards go to children
        eng = LocalEngine(workers, own_lane=False)
    else:
        eng = engine if not isinstance(engine, str) else get_engine(engine, workers=workers, address=ray_address)
    steps, per_id, plan_digest = {}, None, f"{digest}-{write_key}"
    for i, step in enumerate(STEPS):
        if step == "cohort" and not (offsets and _has_cohort(lay)):
            continue
        t0 = time.perf_counter()
        spec = WorkerSpec(CleanShardWorker, (lay, step), str(lay.step_dir(step)), must_see=(str(dest),))
        lay.step_dir(step).mkdir(exist_ok=True)
        stats, complete = run_shards(eng, spec, shards, part=part, desc=f"clean {i + 1}/4 {step}", unit="face",
                                     show_progress=show_progress,
                                     on_shard=None if on_shard is None else lambda rec, st=step: on_shard(st, rec))
        if stats.failed:
            raise RunError(fail_message("clean", stats))
        steps[step] = dict(seconds=round(time.perf_counter() - t0, 2), **stats.summary())
        if not complete:
            return dict(input="rec", faces=n, identities=k, complete=False, part=list(part) if part else None,
                        step=step, steps=steps,
                        note=f"step {step} is finished for this part's shards; the next step needs every "
                             "part's: run the parts again, or run once without --part to finish")
        if step == "analyse":
            per_id = _centres(lay, shards, start)
            if unit is None:
                write_text_atomic(unit_file, json.dumps({"unit": per_id["unit"]}))
            if not per_id["unit"] and not lay.normalize:  # renormalise every row, as the in-memory run does
                shutil.rmtree(work / "analyse", ignore_errors=True)
                return run_staged(dest, rec_path, p, model, label_names, exclusions, engine=eng, workers=workers,
                                  part=part, shard_faces=shard_faces, show_progress=show_progress,
                                  previous_manual=previous_manual, on_shard=on_shard)
            if not lay.global_file("global1").exists():
                t0 = time.perf_counter()
                with _phase(f"clean: {k} identity centres (exclusion, merge partners, cohort)", show_progress):
                    _global1(lay, per_id, ex_ids, ex_vecs, workers)
                steps["centres"] = dict(seconds=round(time.perf_counter() - t0, 2))
            del per_id["centre"]  # (k, d): the largest thing this process holds; the outputs need the rest
        elif step == "cohort" and not lay.global_file("global2").exists():
            with _phase("clean: the cohort's median", show_progress):
                _global2(lay, shards)
        elif step == "decide" and not lay.global_file("global3").exists():
            with _phase("clean: the review budget", show_progress):
                _global3(lay, shards)
    if per_id is None:
        per_id = _centres(lay, shards, start)
    failed = load(work / "failed.npz")
    summary = merge_if_due(dest, "clean", work, plan_digest, part, lambda: _outputs(
        lay, shards, start, per_id, label_names, failed, len(previous_manual or {}), model, workers),
        outputs=C.CLEAN_OUTPUTS)
    if summary is None:
        return dict(input="rec", faces=n, identities=k, complete=True, merged_by_another_run=True, steps=steps)
    summary["engine"] = dict(name=eng.name, shards=len(shards), shard_faces=shard_faces, steps=steps,
                             seconds=round(time.perf_counter() - t_start, 2))
    return summary


def _has_cohort(lay: Layout) -> bool:
    g = lay.global_file("global1")
    return bool(load(g)["has_cohort"]) if g.exists() else True


def _store_dtype(ws: Workspace):
    v = ws.store_vectors(mmap=True)
    dt = v.dtype
    del v
    return dt


def _all_unit(ws: Workspace, show_progress: bool, block: int = 8192) -> bool:
    """Whether every row of the store has unit length (the in-memory run's test, row by
    row), one streamed pass. Each block is read through a map of its own that
    is closed at once: a map held over the pass would keep the whole store's pages
    counted in this process's memory (PSS)."""
    path = ws.path(C.EMBEDDINGS_NPY)
    n = _store_shape(ws)[0]
    for lo in progress(range(0, n, block), desc="clean (unit rows)", unit="block",
                       disable=None if show_progress else True):
        vecs = np.load(path, mmap_mode="r")
        x = np.asarray(vecs[lo:lo + block], np.float64)
        del vecs
        if not all_unit(x):
            return False
    return True


def _store_shape(ws: Workspace) -> tuple[int, int]:
    v = ws.store_vectors(mmap=True)
    if v.ndim != 2:
        raise NotStageable("store is not a matrix")
    shape = v.shape
    del v
    return int(shape[0]), int(shape[1])


def _names(labels: np.ndarray, label_names: dict) -> dict:
    """label (as text) -> name, for the identities' labels that labels.csv names."""
    return {str(int(lab)): label_names[int(lab)] for lab in labels.tolist() if int(lab) in label_names}


def _write_small_files(lay: Layout, rec_path: Path, shards, label_names: dict, names: dict, manual: dict,
                       ws: Workspace) -> None:
    """The write step's names.json and manual.json, and failed.npz (the records the
    store lacks, with their labels and the shard whose key range holds them)."""
    meta = ws.store_meta()
    fk = sorted({rec_key(f.get("aligned", "")) for f in meta.get("failed", [])
                 if isinstance(f, dict) and rec_key(f.get("aligned", "")) is not None})
    keys = np.load(lay.table("key"), mmap_mode="r")
    if fk and lay.faces:
        pos = np.searchsorted(keys, np.asarray(fk, np.int64))
        ok = (pos >= lay.faces) | (keys[np.minimum(pos, lay.faces - 1)] != np.asarray(fk))
        fk = [k for k, o in zip(fk, ok.tolist()) if o]
    f_labels = np.asarray(labels_of(rec_path, fk), np.int64)
    names = dict(names)
    for lab in f_labels.tolist():
        if lab >= 0 and lab in label_names:
            names[str(lab)] = label_names[lab]
    last = np.asarray([int(keys[s.items.stop - 1]) for s in shards], np.int64)
    del keys
    shard_of = np.minimum(np.searchsorted(last, np.asarray(fk, np.int64), "left"), max(len(shards) - 1, 0))
    out = lay.step_dir("write")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "names.json", json.dumps(names, sort_keys=True))
    write_text_atomic(out / "manual.json", json.dumps(manual, sort_keys=True))
    save(Path(lay.work) / "failed.npz", key=np.asarray(fk, np.int64), label=f_labels,
         shard=shard_of.astype(np.int64))


__all__ = ["run_staged", "NotStageable", "exact_median", "build_table", "plan_staged_shards", "SHARD_FACES",
           "read_rows"]
