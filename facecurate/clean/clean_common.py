"""What the clean stage's two file sides share: :mod:`facecurate.clean.clean` (a folder
OUT) and :mod:`facecurate.clean.clean_rec` (a packed dataset): the versions clean.json
records, the crops' pixel check, and the identities.csv rows and clean.json summary
made from :func:`facecurate.clean.clean_core.clean_core`'s result."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from facecurate.clean.clean_core import CoreResult
from facecurate.clean.clean_params import COSINE_THRESHOLDS, CleanParams
from facecurate.common import constants as C
from facecurate.common.manifests import IdentityRow, MergeRow
from facecurate.common.provenance import library_versions
from facecurate.common.quality import flat_share


def clean_versions() -> dict:
    """The library versions clean.json records: numpy decides the scores, OpenCV the
    crops' pixel check, faiss (when installed) the cross-identity search above
    ``similar_pairs``'s exact size."""
    return library_versions(["faiss"])


class CropSimilarity:
    """Correlation of two aligned crops, 32x32 grey, mean removed (1.0: same pixels up to
    brightness and contrast). Thumbnails are read on first use and cached; a crop that
    cannot be read compares as 0 (never a duplicate by pixels)."""

    SIDE = 32

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = list(paths)
        self._cache: dict[int, np.ndarray | None] = {}

    def subset(self, rows: Sequence[int]) -> "CropSimilarity":
        """The same comparison on the crops ``rows`` (renumbered 0..), e.g. for a worker."""
        return CropSimilarity([self.paths[int(i)] for i in rows])

    def grey(self, i: int) -> np.ndarray | None:
        """Crop ``i`` as a grey image, or None when it cannot be read."""
        import cv2

        return cv2.imread(str(self.paths[i]), cv2.IMREAD_GRAYSCALE)

    def thumb(self, i: int) -> np.ndarray | None:
        if i not in self._cache:
            import cv2

            im = self.grey(i)
            t = None
            if im is not None and im.size:
                t = cv2.resize(im, (self.SIDE, self.SIDE), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
                t -= t.mean()
                t /= float(np.linalg.norm(t)) + 1e-6
            self._cache[i] = t
        return self._cache[i]

    def __call__(self, i: int, j: int) -> float:
        a, b = self.thumb(i), self.thumb(j)
        return 0.0 if a is None or b is None else float(a @ b)

    def flat_share(self, i: int) -> float:
        """Share of the face's cells of crop ``i`` that are flat (see
        ``constants.OCCLUSION_*``): a covered part of the face; 0.0 when it cannot be read."""
        return flat_share(self.grey(i))


def kept_medians(identity: np.ndarray, res: CoreResult, n_ids: int) -> list[float]:
    """Per identity number, the median score of its kept faces (nan when none); one
    sort of the faces, not a pass over all of them per identity."""
    kept = np.asarray(res.decision, dtype=object) == C.DECISION_KEEP if len(identity) else np.zeros(0, bool)
    order = np.argsort(identity, kind="stable")
    bounds = np.searchsorted(identity[order], np.arange(n_ids + 1))
    out = []
    for g in range(n_ids):
        idx = order[bounds[g]:bounds[g + 1]]
        sc = res.score[idx][kept[idx]]
        out.append(float(np.median(sc)) if sc.size else float("nan"))
    return out


def identity_row(name: str, images: int, inf: dict | None, median: float) -> IdentityRow:
    """One identities.csv row from clean_core's counts of the identity (None: it has
    no face) and the median score of its kept faces."""
    if inf is None:
        inf = dict(faces=0, kept=0, dropped=0, review=0, duplicates=0, not_subject=0, clusters=0,
                   dominant_share=0.0, flags=[C.FLAG_NO_FACES])
    noise = 1.0 - (inf["kept"] + inf["review"]) / images if images else 0.0
    return IdentityRow(
        identity=name, images=images, faces=inf["faces"], kept=inf["kept"], dropped=inf["dropped"],
        review=inf["review"], duplicates=inf["duplicates"], not_subject=inf["not_subject"],
        clusters=inf["clusters"], dominant_share=float(inf["dominant_share"]), noise=max(0.0, noise),
        median_score=median, flags=";".join(inf["flags"]))


def flag_counts(ident_rows: list[IdentityRow]) -> dict:
    """How many identities.csv rows carry each flag clean.json counts."""
    out = {f: 0 for f in (C.FLAG_AMBIGUOUS, C.FLAG_EXCLUDED, C.FLAG_LOST, C.FLAG_WEAK)}
    for r in ident_rows:
        for f in r.flag_list:
            if f in out:
                out[f] += 1
    return out


def clean_summary(faces: int, counts: Mapping[str, int], reasons: Mapping[str, int], identities: int,
                  flags: Mapping[str, int], merge_rows: list[MergeRow], review_resolved: int, p: CleanParams,
                  model: str, manual_kept: int, manual_lost: int, quality: Mapping | None = None) -> dict:
    """clean.json's summary (and run_clean's return value), for a folder or a .rec:
    ``faces`` rows of clean.csv, ``counts`` of them by decision, ``reasons`` by reason,
    ``identities`` rows of identities.csv and ``flags`` their counts (:func:`flag_counts`);
    ``quality``: the folder flow's quality lifts (``CoreResult.quality``), as ``quality_lift``."""
    extra = {} if quality is None else dict(quality_lift={k: dict(v) for k, v in quality.items()})
    return dict(
        faces=faces, identities=identities,
        keep=counts.get(C.DECISION_KEEP, 0), drop=counts.get(C.DECISION_DROP, 0),
        review=counts.get(C.DECISION_REVIEW, 0),
        review_share=round(counts.get(C.DECISION_REVIEW, 0) / faces, 4) if faces else 0.0,
        manual_kept=manual_kept, manual_lost=manual_lost,
        reasons=dict(sorted(reasons.items())),
        ambiguous=flags.get(C.FLAG_AMBIGUOUS, 0), excluded=flags.get(C.FLAG_EXCLUDED, 0),
        lost=flags.get(C.FLAG_LOST, 0), weak_majority=flags.get(C.FLAG_WEAK, 0),
        merge_candidates=len(merge_rows), review_resolved_by_budget=review_resolved,
        model=model, thresholds={k: round(getattr(p, k), 4) for k in COSINE_THRESHOLDS},
        calibrated=bool(p.calibrated), **extra,
    )
