"""Which library versions made an output.

facecurate's promise is byte-identical output for the same inputs, flags *and library
versions*: a new OpenCV release changes the crops' pixels and JPEG bytes (OpenCV 5.1
against 4.14: 4.8 % of a crop's pixels, by up to 3 levels), dlib and ONNX Runtime
change the embeddings, numpy the float sums of clean. So every stage's JSON
(align.json, embeddings.json, clean.json, pack.json) records the versions that
decided its bytes, a resumed align or embed refuses to mix versions in one OUT, and a
later stage warns when it reads an OUT made under other versions.
"""

from __future__ import annotations

import functools
import warnings
from importlib import metadata
from typing import Iterable, Mapping, Optional

from facecurate import __version__
from facecurate.common.constants import VERSIONS_KEY

#: The libraries whose versions decide output bytes, by the key recorded in the JSON
#: files, with the distributions that may provide each (the first one installed wins).
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "facecurate": ("facecurate",),
    "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
               "opencv-contrib-python"),
    "numpy": ("numpy",),
    "dlib": ("dlib-bin", "dlib"),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss"),
}
#: Recorded by every stage; onnxruntime and faiss only where they ran.
BASE_LIBRARIES = ("facecurate", "opencv", "numpy", "dlib")


def _module_version(key: str) -> Optional[str]:
    """The imported module's own version, for a library installed without metadata
    (a source build of OpenCV or dlib)."""
    try:
        if key == "opencv":
            import cv2
            return str(cv2.__version__)
        if key == "dlib":
            import dlib
            return str(dlib.__version__)
        if key == "numpy":
            import numpy
            return str(numpy.__version__)
    except ImportError:
        return None
    return None


@functools.lru_cache(maxsize=None)  # what is installed does not change under a running process
def library_version(key: str) -> Optional[str]:
    """``"opencv-python-headless 5.1.0.95"``-style version of one library (the
    distribution's name and version), None when it is not installed."""
    if key == "facecurate":
        return f"facecurate {__version__}"
    for dist in DISTRIBUTIONS.get(key, (key,)):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    found = _module_version(key)
    return f"{key} {found}" if found else None


def library_versions(extra: Iterable[str] = ()) -> dict[str, Optional[str]]:
    """The versions to record: the base libraries plus those of ``extra`` that are
    installed (``onnxruntime`` when a model ran on it, ``faiss`` for clean)."""
    found = {k: library_version(k) for k in BASE_LIBRARIES}
    found.update({k: v for k, v in ((k, library_version(k)) for k in extra) if v})
    return found


def describe(versions: Mapping[str, Optional[str]]) -> str:
    """One line: ``facecurate 0.1.0, opencv-python-headless 5.1.0.95, ...``."""
    return ", ".join(str(v) for k, v in sorted(versions.items(), key=lambda kv: _order(kv[0])) if v) \
        or "no versions"


def _order(key: str) -> tuple[int, str]:
    keys = list(DISTRIBUTIONS)
    return (keys.index(key) if key in keys else len(keys), key)


def differences(recorded: Mapping, current: Optional[Mapping] = None) -> list[str]:
    """The keys of ``recorded`` whose version differs from ``current`` (default: what
    is installed now); empty when they agree."""
    if current is None:
        current = {k: library_version(k) for k in recorded}
    return sorted((k for k in recorded if recorded.get(k) != current.get(k)), key=_order)


def recorded_versions(meta: Mapping) -> Optional[dict]:
    """The versions a stage's JSON recorded; None when it holds none (an OUT made
    before facecurate recorded them)."""
    v = meta.get(VERSIONS_KEY) if isinstance(meta, Mapping) else None
    return dict(v) if isinstance(v, Mapping) else None


def resume_message(what: str, recorded: Optional[Mapping], current: Mapping) -> Optional[str]:
    """The one-line refusal of a resume under other versions, None when they agree.
    ``what`` names the earlier work (``"OUT/.facecurate/align"``)."""
    if recorded is None:
        return (f"{what} was started by a facecurate that did not record library versions, so its "
                f"finished shards may come from other versions than this run's ({describe(current)}); "
                "rerun with --overwrite to start again")
    if not differences(recorded, current):
        return None
    return (f"{what} was started under {describe(recorded)}; this run has {describe(current)}: "
            "resuming would mix outputs of two versions in one dataset. Rerun with --overwrite to "
            "start again (or install the recorded versions to resume)")


class VersionsWarning(UserWarning):
    """A stage reads an output that other library versions made."""


def warn_if_other(path, meta: Mapping) -> Optional[str]:
    """Warn (:class:`VersionsWarning`, one line) when ``meta`` (a stage's JSON, read
    from ``path``) records versions other than those installed now. Returns the
    message, or None when they agree or nothing was recorded."""
    recorded = recorded_versions(meta)
    if not recorded:
        return None
    diff = differences(recorded)
    if not diff:
        return None
    now = {k: library_version(k) for k in diff}
    msg = (f"{path} was made under {describe({k: recorded[k] for k in diff})}; installed now: "
           f"{describe(now)} (same inputs under other versions give other bytes)")
    warnings.warn(msg, VersionsWarning, stacklevel=2)
    return msg


__all__ = ["BASE_LIBRARIES", "VERSIONS_KEY", "VersionsWarning", "describe", "differences", "library_version",
           "library_versions", "recorded_versions", "resume_message", "warn_if_other"]
