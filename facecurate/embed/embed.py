"""Stage 2: L2-normalised face embeddings of the aligned crops.

``run_embed(OUT)`` embeds every ``ok`` crop of ``OUT/align.csv`` (or every image of a
plain ``<identity>/*`` folder of crops, or every image record of a ``.rec``) and
writes the store:

* ``OUT/embeddings.npy``  float32 (N, D), each row L2-normalised (float16 with
  ``dtype="float16"``: the same rows rounded, half the bytes; shards stay float32 and
  are cast at the merge);
* ``OUT/embeddings.csv``  row i names vector i (``aligned, source, identity, face``),
  in the order of ``align.csv``;
* ``OUT/embeddings.json`` the model (name, file hash, dimension, input size,
  normalisation, flip, how crops were fed), the vectors' ``dtype`` and the run's counts.

Work is split in fixed shards of the row list by the run machinery
(:mod:`facecurate.engines.runner`, any engine of :mod:`facecurate.engines`); each finished
shard is written atomically to ``OUT/.facecurate/embed/shard_NNNNNN.npz`` and then
recorded, so a killed run loses at most the shards in flight and a rerun embeds only
what is missing. The store files are merged from the shards at the end (atomic
writes), so they are byte-identical to an uninterrupted run's. A store made with
another model / flip / feeding / dtype is refused.

Models come from :func:`facecurate.models.zoo.make_embedder` and are used through
the :class:`facecurate.models.base.Embedder` protocol:

* ``dlib`` (default, offline): dlib's 128-D ResNet descriptor on dlib's 150x150 chip,
  rebuilt from the *source photo* when ``align.csv`` gives one, else warped from the
  crop (:mod:`facecurate.models.dlib_resnet`). ``runtime`` decides what runs the
  network: ``onnx`` (dlib's weights converted to ONNX, on ONNX Runtime), ``dlib``
  (dlib itself, one process per core) or ``auto`` (onnx when ONNX Runtime is
  installed). The store's signature records ``runtime`` for the ONNX runtime, so the
  two never share a store.
* ``arcface``: any insightface ArcFace-style ONNX recogniser (``--model-dir`` or an
  ``.onnx`` path), fed the aligned crops (:mod:`facecurate.models.arcface`).
"""

from __future__ import annotations

import functools
import io
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from facecurate import __version__
from facecurate.common.constants import (
    ALIGN_MANIFEST,
    EMBEDDINGS_CSV,
    EMBEDDINGS_META,
    EMBEDDINGS_NPY,
    EMBED_SHARD_SIZE_DLIB,
    EMBED_SHARD_SIZE_ONNX,
    EMBED_SIGNATURE,
    MAX_INPUT_BYTES,
    REC_NAME,
    STORE_DTYPES,
    VERSIONS_KEY,
    WORK_DIR,
)
from facecurate.common.files import write_bytes_atomic
from facecurate.common.manifests import EmbeddingRow
from facecurate.common.recdata import is_rec_dataset
from facecurate.common.workspace import ManifestError, MissingFile, Workspace
from facecurate.embed.embed_inputs import EmbedError, Item, Loader, items_from_align, items_from_folder, shard_npz
from facecurate.embed.embed_rec import check_rec, items_from_rec, plan_rec_shards, write_rec_store
from facecurate.engines import get_engine
from facecurate.engines.local import default_workers as cores
from facecurate.models.base import ONNX_RUNTIME_TAG, ModelError
from facecurate.models.zoo import make_embedder
from facecurate.common.procs import run_lock
from facecurate.common.provenance import library_versions
from facecurate.engines.runner import (RunError, WorkerSpec, check_meta, check_plan, check_versions, clear,
                                       fail_message, finished, in_part, merge_if_due, parse_part, plan_shards,
                                       recorded_size, run_shards)

EMBED_DIR = "embed"


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class EmbedConfig:
    model: str = "dlib"  # dlib | arcface | path to an .onnx
    model_dir: Optional[str] = None
    flip: bool = True
    dlib_feed: str = "five"
    device: str = "auto"
    batch_size: Optional[int] = None
    fp16: bool = False
    runtime: str = "auto"  # dlib's model: auto | dlib | onnx
    max_bytes: int = MAX_INPUT_BYTES  # crops (and source photos) larger than this are not read


def signature(info: dict, flip: bool, source_kind: str, dtype: str = STORE_DTYPES[0]) -> dict:
    """What must be the same for every vector of one store."""
    sig = {"name": info["name"], "sha256": info["sha256"], "dim": info["dim"],
           "input_size": info["input_size"], "feed": info.get("feed", ""), "flip": bool(flip),
           "input": source_kind}
    if info.get("runtime"):  # dlib's model on ONNX Runtime (a store made by dlib has none)
        sig["runtime"] = info["runtime"]
    if dtype != STORE_DTYPES[0]:  # a float32 store's signature is the one made before --dtype
        sig["dtype"] = dtype
    return sig


def store_dtype(meta: dict) -> str:
    """The type of a store's vectors as its embeddings.json (or signature) records it;
    float32 when it records none (a store made before ``--dtype``)."""
    sig = meta.get("signature")
    return str(meta.get("dtype") or (sig.get("dtype") if isinstance(sig, dict) else None) or STORE_DTYPES[0])


# ----------------------------------------------------------------------------- worker
_EMBEDDERS: dict = {}


def cached_embedder(cfg: "EmbedConfig"):
    """One embedder per process and config, from the model zoo: the run's own process
    builds it to read the model's signature, and its in-process worker lane reuses it
    (one ONNX session). A model problem is an :class:`EmbedError`."""
    if cfg not in _EMBEDDERS:
        _EMBEDDERS.clear()
        try:
            _EMBEDDERS[cfg] = make_embedder(cfg.model, model_dir=cfg.model_dir, feed=cfg.dlib_feed,
                                            runtime=cfg.runtime, device=cfg.device, batch_size=cfg.batch_size,
                                            fp16=cfg.fp16)
        except ModelError as e:
            raise EmbedError(str(e)) from None
    return _EMBEDDERS[cfg]


def _prepare_chunk(embedder, loader: Loader, items: Sequence[Item]):
    inputs, keep, failed, feeds = [], [], [], {}
    for it in items:
        if it.problem:
            failed.append((it.aligned, it.problem))
            continue
        try:
            x, how = embedder.prepare(it, loader)
        except Exception as e:  # noqa: BLE001 - record every failure with its reason
            status = getattr(e, "status", None)
            failed.append((it.aligned, f"{status}: {e}" if status else f"{type(e).__name__}: {e}"))
            continue
        inputs.append(x)
        keep.append(it.aligned)
        feeds[how] = feeds.get(how, 0) + 1
    return inputs, keep, failed, feeds


def _embed_in_batches(embedder, inputs, flip: bool, batch_size: int) -> np.ndarray:
    out = [embedder.run(inputs[i:i + batch_size], flip) for i in range(0, len(inputs), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, embedder.dim), np.float32)


class EmbedWorker:
    """One per worker process (model loaded once): embeds a shard of faces into
    ``shard_NNNNNN.npz``. With ``threads`` (ONNX), the next shard's crops are read
    and preprocessed by a thread pool while the model runs on this one (ordered
    read-ahead; cv2 decoding and warping release the GIL)."""

    def __init__(self, cfg: "EmbedConfig", batch_size: int, work: str, threads: int = 0):
        self.embedder = cached_embedder(cfg)
        self.cfg, self.batch_size, self.work = cfg, batch_size, Path(work)
        self.loader = Loader(cfg.max_bytes)
        self.threads = threads
        self._pool = self._lead = None
        if threads:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=threads)  # decodes a shard's crops
            self._lead = ThreadPoolExecutor(max_workers=1)  # prepares the next shard
        self._ahead: dict = {}
        self._local = threading.local()

    def _prep(self, shard):
        t0 = time.perf_counter()
        items, unread = _shard_items(shard)
        if not self.threads:
            inputs, keep, failed, feeds = _prepare_chunk(self.embedder, self.loader, items)
            return (inputs, keep, unread + failed, feeds), None, _identities(shard, items), time.perf_counter() - t0

        def one(it):
            if not hasattr(self._local, "loader"):
                self._local.loader = Loader(self.cfg.max_bytes)
            return _prepare_chunk(self.embedder, self._local.loader, [it])

        inputs, keep, failed, feeds = [], [], list(unread), {}
        for i, k, f, fd in self._pool.map(one, items):
            inputs += i
            keep += k
            failed += f
            for key, v in fd.items():
                feeds[key] = feeds.get(key, 0) + v
        blob = self.embedder.blob(inputs, self.cfg.flip) if inputs else None
        return (inputs, keep, failed, feeds), blob, _identities(shard, items), time.perf_counter() - t0

    def prefetch(self, shard) -> None:
        if self.threads and shard.index not in self._ahead:
            self._ahead[shard.index] = self._lead.submit(self._prep, shard)

    def run(self, shard) -> dict:
        fut = self._ahead.pop(shard.index, None)
        (inputs, keep, failed, feeds), blob, idents, t_prep = fut.result() if fut else self._prep(shard)
        t1 = time.perf_counter()
        if blob is not None:
            vecs = self.embedder.forward(blob, len(inputs), self.cfg.flip)
        else:
            vecs = _embed_in_batches(self.embedder, inputs, self.cfg.flip, self.batch_size)
        t_model = time.perf_counter() - t1
        res = {"keys": keep, "vectors": vecs, "failed": failed}
        if idents is not None:  # .rec input: the labels read with the records
            res["identities"] = [idents[k] for k in keep]
        write_bytes_atomic(shard_npz(self.work, shard.index), _part_bytes(res, self.embedder.dim))
        return {"embedded": len(keep), "failed": len(failed), "feeds": feeds,
                "t_prepare": round(t_prep, 4), "t_model": round(t_model, 4)}


# ----------------------------------------------------------------------------- parts
def _shard_items(shard) -> tuple[Sequence[Item], list]:
    """(items, failures) of a shard: its items, or a .rec range's records read now."""
    if hasattr(shard.items, "load"):  # embed_rec.RecRange
        return shard.items.load()
    return shard.items, []


def _identities(shard, items: Sequence[Item]) -> Optional[dict]:
    """key -> identity of a .rec range's items (known only once read); None otherwise."""
    return {it.aligned: it.identity for it in items} if hasattr(shard.items, "load") else None


def _part_bytes(res: dict, dim: int) -> bytes:
    buf = io.BytesIO()
    fk = [k for k, _ in res["failed"]]
    fr = [r for _, r in res["failed"]]
    extra = {"identities": np.array(res["identities"], dtype=str)} if "identities" in res else {}
    np.savez(buf, keys=np.array(res["keys"], dtype=str), vectors=np.asarray(res["vectors"], np.float32).reshape(-1, dim),
             failed_keys=np.array(fk, dtype=str), failed_reasons=np.array(fr, dtype=str), **extra)
    return buf.getvalue()


def _load_shards(work: Path, shards) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Vectors and failures of the plan's finished shards."""
    vecs: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    for idx in sorted(finished(work, shards)):
        with np.load(shard_npz(work, idx)) as z:
            for k, v in zip(z["keys"].tolist(), z["vectors"]):
                vecs[k] = v
            for k, r in zip(z["failed_keys"].tolist(), z["failed_reasons"].tolist()):
                failed[k] = r
    return vecs, failed


# ----------------------------------------------------------------------------- run
def _resolve_input(target: Path, out: Optional[Path], follow_external_links: bool = False,
                   ) -> tuple[object, str, Path, dict]:
    """(items, or the .rec path for a .rec, input kind, store folder, align meta)."""
    if target.is_file() and target.suffix == ".rec":
        return check_rec(target), "rec", (out or target.parent), {}
    if is_rec_dataset(target):  # a folder holding train.rec (+ .idx) and no align.csv
        return check_rec(target / REC_NAME), "rec", (out or target), {}
    if not target.is_dir():
        raise EmbedError(f"not found: {target} (expected an align OUT folder, a folder of crops or a .rec)")
    if (target / ALIGN_MANIFEST).exists():
        items, meta = items_from_align(target)
        return items, "align", (out or target), meta
    items = items_from_folder(target, follow_external_links)
    if not items:  # most often the wrong folder: say what embed looks for
        raise EmbedError(f"nothing to embed in {target}: no {ALIGN_MANIFEST} (run `facecurate align RAW "
                         f"{target}` first), no image files, no {REC_NAME}")
    return items, "folder", (out or target), {}


def default_workers(embedder) -> int:
    """dlib's descriptor is single-threaded: one process per usable core (as align); an
    ONNX session is one worker whose threads use the cores."""
    return cores() if embedder.per_core else 1


def _hold_store_lock(fn):
    """Run ``fn`` holding the store's embed lock: a second run writing the same store
    at the same time is refused (:class:`facecurate.common.procs.LockedError`)."""
    @functools.wraps(fn)
    def locked(out_dir, *args, **kw):
        target = Path(out_dir)
        store = Path(kw["store_dir"]) if kw.get("store_dir") else \
            target if target.is_dir() else target.parent if target.suffix == ".rec" and target.is_file() else None
        if store is None:  # not an input run_embed takes: let it say so
            return fn(out_dir, *args, **kw)
        part = kw.get("part")
        try:
            part = parse_part(part) if isinstance(part, str) else part
        except RunError as e:
            raise EmbedError(str(e)) from None
        with run_lock(store, EMBED_DIR, part):
            return fn(out_dir, *args, **kw)
    return locked


@_hold_store_lock
def run_embed(out_dir, model: str = "dlib", model_dir: Optional[str] = None, batch_size: Optional[int] = None,
              workers: Optional[int] = None, flip: bool = True, device: str = "auto",
              show_progress: bool = True, *, fp16: bool = False, dlib_feed: str = "five",
              store_dir=None, overwrite: bool = False, chunk_size: Optional[int] = None,
              on_chunk: Optional[Callable[[dict], None]] = None, runtime: str = "auto", engine="local",
              ray_address: Optional[str] = None, part=None, max_bytes: int = MAX_INPUT_BYTES,
              follow_external_links: bool = False, dtype: str = STORE_DTYPES[0]) -> dict:
    """Embed every crop of ``out_dir`` (an align OUT, a folder of crops, or a .rec) into
    the store in ``store_dir`` (default: ``out_dir``, or the .rec's folder). Resumes;
    refuses to mix models or dtypes. ``dtype``: of embeddings.npy (``STORE_DTYPES``;
    float16 halves it). ``engine``/``part`` as in :func:`facecurate.align.align.run_align`;
    ``chunk_size``: faces per shard. A crop folder's files are read only when regular
    and at most ``max_bytes``, and its symlinks followed only while they stay inside
    it (``follow_external_links``: wherever they lead). Returns a summary dict."""
    t_start = time.perf_counter()
    if dtype not in STORE_DTYPES:
        raise EmbedError(f"dtype {dtype!r}: the store holds one of {', '.join(STORE_DTYPES)}")
    cfg = EmbedConfig(model=str(model), model_dir=model_dir, flip=bool(flip), dlib_feed=dlib_feed,
                      device=device, batch_size=batch_size, fp16=fp16, runtime=runtime, max_bytes=max_bytes)
    target = Path(out_dir)
    items, kind, store, _align_meta = _resolve_input(target, Path(store_dir) if store_dir else None,
                                                     follow_external_links)
    store.mkdir(parents=True, exist_ok=True)
    work = store / WORK_DIR / EMBED_DIR
    embedder = cached_embedder(cfg)  # tells the signature (and runs the in-process lane)
    info = embedder.info()
    sig = signature(info, cfg.flip, kind, dtype)
    part = _part(part, overwrite)
    if overwrite:
        clear(work, [store / n for n in (EMBEDDINGS_NPY, EMBEDDINGS_CSV, EMBEDDINGS_META)])
    _check_signature(store, work, sig)
    work.mkdir(parents=True, exist_ok=True)
    try:
        check_versions(work, embed_versions(info), part)
    except RunError as e:
        raise EmbedError(str(e)) from None
    check_meta(work / EMBED_SIGNATURE, sig, lambda old, new: None, part=part)

    per_core = embedder.per_core
    batch_size = max(1, int(embedder.batch_size if batch_size is None else batch_size))
    # Fixed shards of the full list, whatever the workers, engine or part: a rerun redoes
    # whole shards of the same composition, so its vectors equal an uninterrupted run's.
    size = int(chunk_size or recorded_size(
        work, EMBED_SHARD_SIZE_DLIB if per_core else max(EMBED_SHARD_SIZE_ONNX, batch_size)))
    shards = _plan(items, kind, size)
    plan = check_plan(work, shards, size, part)
    eng, threads = _engine(engine, embedder, workers, ray_address)
    spec = WorkerSpec(EmbedWorker, (cfg, batch_size, str(work), threads), str(work),
                      must_see=(str(store),), gpu=not per_core and cfg.device != "cpu")
    stats, complete = run_shards(eng, spec, shards, part=part, desc="embed", unit="face",
                                 show_progress=show_progress, on_shard=on_chunk)
    if stats.failed:
        raise EmbedError(fail_message("embed", stats))
    summary = None
    if complete:
        summary = merge_if_due(store, EMBED_DIR, work, plan, part, lambda: _merge(
            store, items, work, shards, info, sig, cfg, kind),
            outputs=(EMBEDDINGS_NPY, EMBEDDINGS_CSV, EMBEDDINGS_META))
    summary = summary or {"store": str(store), "input": kind, "model": info["name"], "dim": int(info["dim"]),
                          "dtype": dtype, "faces": sum(len(s.items) for s in shards)}
    summary = _summary(summary, stats, shards, part, complete, batch_size, embedder, t_start)
    summary["runtime"] = info.get("runtime") or embedder.runtime
    return summary


def _plan(items, kind: str, size: int):
    """Fixed shards of ``size`` faces: of the item list, or of a .rec's image records
    (:func:`facecurate.embed.embed_rec.plan_rec_shards`, one pass over its .idx)."""
    if kind == "rec":
        return plan_rec_shards(items, size)
    return plan_shards(items, lambda it: it.aligned, size)


def _merge(store: Path, items, work: Path, shards, info: dict, sig: dict, cfg: "EmbedConfig", kind: str) -> dict:
    if kind == "rec":  # streamed: vectors and rows shard after shard, never all in memory
        count, fails = write_rec_store(store, Path(items), work, shards, int(info["dim"]), store_dtype(sig))
        faces = sum(len(s.items) for s in shards)
        return _write_meta(store, info, sig, cfg, kind, count, fails, faces)
    return _write_store(store, items, *_load_shards(work, shards), info, sig, cfg, kind)


def _part(part, overwrite: bool):
    try:
        part = parse_part(part) if isinstance(part, str) else part
    except RunError as e:
        raise EmbedError(str(e)) from None
    if part is not None and overwrite:
        raise EmbedError("--overwrite cannot be combined with --part: clear the store with one run first")
    return part


def _engine(engine, embedder, workers: Optional[int], ray_address: Optional[str]):
    """(engine, prep threads per worker). dlib: one process per core; ONNX: one
    worker (per GPU under Ray) with ``workers`` threads preparing crops ahead."""
    if embedder.per_core:  # under Ray, default: one worker per CPU of the cluster
        n, threads = workers or (default_workers(embedder) if engine == "local" else None), 0
    else:
        n, threads = (1 if engine == "local" else None), max(1, int(workers or 1))
    if not isinstance(engine, str):
        return engine, threads
    try:
        return get_engine(engine, workers=n, address=ray_address), threads
    except RunError as e:
        raise EmbedError(str(e)) from None


def _summary(summary: dict, stats, shards, part, complete: bool, batch_size: int, embedder, t_start) -> dict:
    feeds: dict[str, int] = {}
    for rec in stats.records:
        for k, v in rec["stats"]["feeds"].items():
            feeds[k] = feeds.get(k, 0) + v
    now = sum(rec["units"] for rec in stats.records)
    elapsed = time.perf_counter() - t_start
    summary.update({
        "embedded_now": sum(rec["stats"]["embedded"] for rec in stats.records),
        "resumed": sum(len(s.items) for s in shards if in_part(s.index, part)) - now,
        "workers": stats.workers if now else 0, "batch_size": batch_size,
        "seconds": round(elapsed, 2),
        "faces_per_second": round(now / elapsed, 2) if now and elapsed > 0 else None,
        "feeds": dict(sorted(feeds.items())), "provider": embedder.provider,
        "timings": {"prepare": round(sum(r["stats"]["t_prepare"] for r in stats.records), 2),
                    "model": round(sum(r["stats"]["t_model"] for r in stats.records), 2)},
        "part": f"{part[0]}/{part[1]}" if part else None, "merged": complete, "engine": stats.summary(),
    })
    return summary


def embed_versions(info: dict) -> dict:
    """The library versions that decide the store's bytes: ONNX Runtime's when the
    model ran on it (dlib's network converted to ONNX records that runtime; an
    insightface model is an .onnx file)."""
    onnx = info.get("runtime") == ONNX_RUNTIME_TAG or str(info.get("file") or "").endswith(".onnx")
    return library_versions(["onnxruntime"] if onnx else [])


def _check_signature(store: Path, work: Path, sig: dict) -> None:
    old = None
    try:
        if (work / EMBED_SIGNATURE).exists():
            old = Workspace(work).read_json(EMBED_SIGNATURE, required=True)
        elif (store / EMBEDDINGS_META).exists():
            old = Workspace(store).read_json(EMBEDDINGS_META, required=True).get("signature")
    except ManifestError as e:
        raise EmbedError(str(e)) from None
    if old is None:
        return
    if not isinstance(old, dict):
        raise EmbedError(f"{store}: the store's recorded signature is not readable; rerun with --overwrite")
    old, now = {**old, "dtype": store_dtype(old)}, {**sig, "dtype": store_dtype(sig)}  # float32 unless named
    if old != now:
        diff = ", ".join(f"{k}: {old.get(k)!r} in the store, {now.get(k)!r} now"
                         for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k))
        raise EmbedError(
            f"{store} already holds embeddings made differently ({diff}); vectors of two models or "
            "settings cannot share one store. Rerun with the store's settings, use --overwrite to "
            "start again, or write to another folder (--out).")


def _write_store(store: Path, items: Sequence[Item], vecs: dict, failed: dict, info: dict, sig: dict,
                 cfg: EmbedConfig, kind: str) -> dict:
    rows, mats = [], []
    for it in items:
        v = vecs.get(it.aligned)
        if v is None:
            continue
        rows.append(EmbeddingRow(aligned=it.aligned, source=it.source, identity=it.identity, face=it.face))
        mats.append(v)
    dim = int(info["dim"])
    arr = np.ascontiguousarray(np.array(mats, np.float32).reshape(len(mats), dim), store_dtype(sig))
    buf = io.BytesIO()
    np.save(buf, arr)
    fails = [{"aligned": it.aligned, "reason": failed[it.aligned]} for it in items if it.aligned in failed]
    Workspace(store).write_store(buf.getvalue(), rows)  # the meta after: _write_meta
    return _write_meta(store, info, sig, cfg, kind, len(rows), fails, len(items))


def _write_meta(store: Path, info: dict, sig: dict, cfg: "EmbedConfig", kind: str, count: int, fails: list,
                faces: int) -> dict:
    """embeddings.json (after the vectors and rows), and the run's summary."""
    dim = int(info["dim"])
    meta = {
        "model": info["name"], "model_info": {k: v for k, v in info.items() if k not in ("provider", "file")},
        "model_file": info.get("file"), "sha256": info["sha256"], "dim": dim,
        "input_size": info["input_size"], "normalisation": "l2", "flip": cfg.flip,
        "feed": info.get("feed"), "input": kind, "dtype": store_dtype(sig), "count": count, "failed": fails,
        "signature": sig, "version": __version__, VERSIONS_KEY: embed_versions(info),
    }
    Workspace(store).write_store_meta(meta)  # written last: it marks the store whole
    return {"store": str(store), "input": kind, "model": info["name"], "dim": dim, "dtype": store_dtype(sig),
            "flip": cfg.flip,
            "feed": info.get("feed"), "faces": faces, "embedded": count, "failed": len(fails),
            "failures": fails[:20]}


def load_store(out_dir, *, mmap: bool = False, missing_ok: bool = False):
    """(vectors float32 (N, D), rows [EmbeddingRow], meta) of the embedding store in
    ``out_dir`` (read by :meth:`facecurate.common.workspace.Workspace.store`), for embed,
    clean and eval-pairs. ``mmap``: map the vectors read-only instead of reading them
    (clean's large stores), as stored: float32 or float16 (the caller casts). A missing
    store is an EmbedError, or None with ``missing_ok``; a store whose .csv and .npy
    disagree is always an EmbedError."""
    ws = Workspace(out_dir)
    if missing_ok and not ws.has_store():
        return None
    try:
        st = ws.store(mmap=mmap)
    except (MissingFile, ManifestError) as e:
        raise EmbedError(str(e)) from None
    return st.vecs, st.rows, st.meta


__all__ = ["run_embed", "load_store", "EmbedError", "EmbedConfig", "Item", "Loader", "items_from_align",
           "items_from_folder", "items_from_rec", "cached_embedder", "store_dtype"]
