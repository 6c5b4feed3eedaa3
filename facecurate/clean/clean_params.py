"""clean's thresholds (:class:`CleanParams`, model-aware defaults) and the small
decision / reason codes used while computing (strings only in the results)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from facecurate.common import constants as C

# Reasons written to clean.csv (defined in constants.py).
R_CENTRE = C.REASON_CENTRE
R_BAND = C.REASON_UNCERTAIN
R_FAR = C.REASON_FAR
R_MINORITY = C.REASON_MINORITY
R_NOT_SUBJECT = C.REASON_NOT_SUBJECT
R_DUPLICATE = C.REASON_DUPLICATE
R_AMBIGUOUS = C.REASON_AMBIGUOUS
R_TOO_FEW = C.REASON_TOO_FEW
R_LOW_QUALITY = C.REASON_LOW_QUALITY
R_EXCLUDED = C.REASON_EXCLUDED
R_NO_EMBEDDING = C.REASON_NO_EMBEDDING
R_MANUAL = C.REASON_MANUAL  # a review's decision, kept by later runs
R_NEAR_OTHER = C.REASON_NEAR_OTHER
R_CANDIDATE = C.REASON_CANDIDATE
R_OCCLUDED = C.REASON_OCCLUDED


@dataclass
class CleanParams:
    """All thresholds are cosine similarities of L2-normalised embeddings."""

    keep: float  # subject faces at or above: keep
    drop: float  # below: drop; in between: review
    cw: float  # Chinese-whispers edge: similarity at or above
    join: float  # clusters whose centres are this close join the dominant person
    dup: float  # near-duplicate: similarity at or above (embeddings alone)
    merge: float  # identity centres at or above: merge candidates
    exclude: float  # identity centre vs an evaluation face at or above: excluded
    ambiguous_ratio: float = 0.6  # second person / dominant person at or above: ambiguous
    max_review: float = 0.03  # share of all faces sent to review at most
    min_images: int = 2  # identities with fewer kept photos are dropped (too_few_images)
    min_face: float = 0.0  # subject faces smaller (px) are low_quality drops
    ambiguous: str = "review"  # what happens to an ambiguous folder's faces: review | drop
    iters: int = 3
    dup_pixel: float = 0.93  # with the crops at hand, pairs from dup - 0.005 to dup + 0.005 are
    # duplicates only when their crops correlate at least this much (32x32 grey)
    cohort: float = 0.3  # score -= cohort * (mean sim to the 5 nearest other centres - its median)
    cohort_centre: float = 0.3  # score -= this * (centre's mean sim to its 20 nearest other-identity faces - median)
    spread: float = 0.5  # score -= spread * (folder's median inlier sim - median over folders)
    low_sharpness: float = 40.0  # crops below (variance of Laplacian) get the measured quality shift
    blocky: float = 2.0  # faces whose source shows a JPEG grid this strong (align's blockiness) get their own
    # measured quality shift (heavy JPEG: sharp by the Laplacian, yet the face's detail is gone)
    margin: float = 0.0  # a keep whose own-centre similarity exceeds its nearest other identity centre's by
    # less goes to review (near_other_identity); 0: off
    near_drop: float = 0.01  # subject faces this far below drop go to review while the budget has room
    occlusion: float = 0.1  # share of a face's cells that are flat (std < OCCLUSION_FLAT) from which it is occluded
    # (review ahead of the band; and its own measured quality lift where align recorded flat_share)
    occlusion_range: float = 0.06  # occluded subject faces down to drop - this go to review (ahead of the band)
    lost_photos: int = 3  # identities with this many photos with a face that keep nothing are flagged lost
    weak_share: float = 0.4  # ... that keep fewer photos than this share of them: weak_majority
    candidates: int = 3  # faces of a lost / weak_majority identity sent to review first
    loo: bool = True  # score each face against the centre of the others
    sample: int = 1000  # all-pairs clustering on at most this many faces per identity
    model: str = ""
    calibrated: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


#: Model-aware defaults keyed by the family of embeddings.json's model name. The dlib
#: row was tuned on the noisy LFW-dev benchmark (benchmarks/clean_noisy.py); dlib's
#: own same-person rule is a Euclidean distance < 0.6, i.e. cosine > 0.82.
MODEL_DEFAULTS: dict[str, dict] = {
    "dlib": dict(keep=0.945, drop=0.92, cw=0.93, join=0.95, dup=0.99, merge=0.975, exclude=0.96),
    # insightface ArcFace (w600k_r50, glintr100, mbf): same person typically > 0.4,
    # different people < 0.2 (512-D, cosine).
    "arcface": dict(keep=0.40, drop=0.30, cw=0.40, join=0.55, dup=0.95, merge=0.60, exclude=0.55),
}


def model_family(name: str) -> str:
    n = (name or "").lower()
    return "dlib" if "dlib" in n else "arcface"


def default_params(model: str, **overrides) -> CleanParams:
    d = dict(MODEL_DEFAULTS[model_family(model)])
    d.update({k: v for k, v in overrides.items() if v is not None})
    check_thresholds(d)
    return CleanParams(model=model, **d)


#: the thresholds that are cosine similarities (options --keep, --drop, --cw, --dup, --merge)
COSINE_THRESHOLDS = ("keep", "drop", "cw", "join", "dup", "merge", "exclude")


def check_cosines(d: dict) -> None:
    """ValueError for a cosine threshold of ``d`` outside [-1, 1] (None: not given).
    Needs no model, so clean checks the options with it before it embeds anything."""
    for k in COSINE_THRESHOLDS:
        if d.get(k) is not None and not -1.0 <= d[k] <= 1.0:
            raise ValueError(f"--{k} {d[k]}: a cosine similarity lies between -1 and 1")


def check_thresholds(d: dict) -> None:
    """ValueError for a cosine threshold outside [-1, 1] or a keep threshold below the
    drop threshold (with either, a run would succeed and keep nothing or review nothing)."""
    check_cosines(d)
    if d["keep"] < d["drop"]:
        raise ValueError(f"the keep threshold ({d['keep']}) is below the drop threshold ({d['drop']}); "
                         "faces between the two go to review, so --keep must be at least --drop")


# decisions and reasons as small codes while computing (strings only in the results)
KEEP, REVIEW, DROP = 0, 1, 2
DECISIONS = (C.DECISION_KEEP, C.DECISION_REVIEW, C.DECISION_DROP)
REASONS = (R_CENTRE, R_BAND, R_FAR, R_MINORITY, R_NOT_SUBJECT, R_DUPLICATE, R_AMBIGUOUS, R_TOO_FEW,
           R_LOW_QUALITY, R_EXCLUDED, R_NO_EMBEDDING, R_MANUAL, R_NEAR_OTHER, R_CANDIDATE, R_OCCLUDED)
RC = {r: i for i, r in enumerate(REASONS)}
