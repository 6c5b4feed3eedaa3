"""What clean reads besides the faces, the same for a folder OUT
(:mod:`facecurate.clean.clean`) and a packed dataset (:mod:`facecurate.clean.clean_rec`): the
embedding store's model and runtime (from embeddings.json), and ``--exclude`` (a
folder or text file of identity names, or a verification .bin whose images are
embedded with the store's model)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from facecurate.clean.clean_params import model_family
from facecurate.common.constants import MAX_INPUT_BYTES
from facecurate.common.filetree import FileProblem, read_regular
from facecurate.common.imageio import ImageError, decode_image
from facecurate.clean.vectors import normalize
from facecurate.clean.verification_bin import read_verification_bin
from facecurate.models.zoo import make_embedder

__all__ = ["model_name", "store_runtime", "failed_keys", "read_exclude", "embed_images", "exclusions"]


def model_name(meta: dict) -> str:
    """The model a store was made with (embeddings.json); ``dlib`` when it does not say."""
    for k in ("model", "name", "model_name"):
        v = meta.get(k)
        if isinstance(v, str):
            return v
        if isinstance(v, dict) and isinstance(v.get("name"), str):
            return v["name"]
    return "dlib"


def store_runtime(meta: dict) -> str:
    """The runtime of dlib's model a store was made with (no ``runtime``: dlib)."""
    return "onnx" if str((meta.get("signature") or {}).get("runtime", "")).startswith("onnx") else "dlib"


def failed_keys(meta: dict) -> set:
    """The store keys the embed stage recorded as failed."""
    return {f.get("aligned") for f in meta.get("failed", []) if isinstance(f, dict)}


def read_exclude(path: Path) -> tuple[set[str], list]:
    """Names (folder of identities, or a text file of names) or encoded images (a
    verification .bin, read with no code run: :mod:`facecurate.clean.verification_bin`).
    Only regular files are read (ValueError for a FIFO or device, or a .bin refused)."""
    path = Path(path)
    if path.is_dir():
        names = {e.name for e in path.iterdir() if not e.name.startswith(".")}
        names |= {Path(n).stem for n in names}
        return names, []
    if path.suffix == ".bin":
        return set(), read_verification_bin(path)[0]
    try:  # a text file of names
        text = read_regular(path, MAX_INPUT_BYTES).decode("utf-8")
    except FileProblem as e:
        raise ValueError(f"--exclude {path}: {e.message}") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"--exclude {path}: no such file or folder") from None
    return {s.strip() for s in text.splitlines() if s.strip()}, []


def embed_images(images: list[bytes], meta: dict, runtime: str = "auto") -> np.ndarray:
    """Embeddings of encoded aligned crops (a verification .bin) with the store's model
    (dlib: the embed stage's chip from the crop's five template points) on ``runtime``.
    Images that do not decode (or whose header claims more than ``MAX_IMAGE_PIXELS``)
    are skipped; 64 are decoded at a time."""
    if not images:
        return np.zeros((0, int(meta.get("dim", 128))), np.float32)
    if model_family(model_name(meta)) != "dlib":
        raise RuntimeError("--exclude with a .bin needs the dlib store; for other models pass a folder of "
                           "identity names")
    emb = make_embedder("dlib", feed="crop", runtime=runtime)
    out = []
    for b0 in range(0, len(images), 64):
        chips = []
        for b in images[b0:b0 + 64]:
            try:
                chips.append(emb.from_crop(decode_image(b)))
            except ImageError:
                continue
        if chips:
            out.append(emb.run(chips, bool(meta.get("flip", False))))
    if not out:
        return np.zeros((0, int(meta.get("dim", 128))), np.float32)
    return normalize(np.concatenate(out))


def exclusions(exclude: Sequence[str | os.PathLike], names: Sequence[str], meta: dict, runtime: str = "auto"):
    """``--exclude``: (the numbers of the identities in ``names`` it names, the vectors
    of its evaluation images or None). ``runtime`` auto: the store's own, so the
    images are embedded as the store's faces were."""
    ex_ids: set[int] = set()
    ex_vecs = None
    for e in exclude:
        nm, imgs = read_exclude(Path(e))
        low = {s.lower().replace(" ", "_") for s in nm}
        ex_ids |= {i for i, x in enumerate(names) if x.lower().replace(" ", "_") in low}
        if imgs:
            v = embed_images(imgs, meta, store_runtime(meta) if runtime == "auto" and meta else runtime)
            ex_vecs = v if ex_vecs is None else np.concatenate([ex_vecs, v])
    return ex_ids, ex_vecs
