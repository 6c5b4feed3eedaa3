"""Every constant that more than one stage needs: the ArcFace template, file names,
manifest columns, the RecordIO framing. Change them here and only here."""

from __future__ import annotations

import numpy as np

# --- ArcFace alignment ------------------------------------------------------------
#: 112x112 template (x, y): left eye, right eye, nose tip, left mouth corner,
#: right mouth corner (insightface ``arcface_dst``).
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
ARCFACE_BASE_SIZE = 112

#: dlib 68-point indices that give the five ArcFace points (eyes are means).
DLIB68_LEFT_EYE = tuple(range(36, 42))
DLIB68_RIGHT_EYE = tuple(range(42, 48))
DLIB68_NOSE_TIP = 30
DLIB68_MOUTH_LEFT = 48
DLIB68_MOUTH_RIGHT = 54

# --- Image reading ------------------------------------------------------------------
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: Refuse to decode anything larger than this many pixels (decompression bombs).
MAX_IMAGE_PIXELS = 100_000_000
#: Detect on a copy whose longer side is at most this many pixels.
DETECT_MAX_SIDE = 1024
#: ... and images whose longer side is below this are searched at twice their size.
DETECT_MIN_SIDE = 512
JPEG_QUALITY = 95

# --- Untrusted input (facecurate/filetree.py, facecurate/pairs.py) -------------------
#: ``--max-bytes``: a photo or crop larger than this is recorded ``too_large`` unread
#: (align's RAW, the crop folders given to embed and pack).
MAX_INPUT_BYTES = 100 * 1024 * 1024
#: A verification .bin larger than this is refused before it is read (insightface's
#: lfw.bin is about 65 MB, its cfp_fp.bin and agedb_30.bin under 100 MB).
MAX_VERIFICATION_BIN_BYTES = 1024 * 1024 * 1024
#: The message of an input that is a FIFO, socket or device (never opened).
NOT_REGULAR = "not a regular file"

# --- Output file names (inside OUT/) -------------------------------------------------
ALIGN_MANIFEST = "align.csv"
ALIGN_META = "align.json"
EMBEDDINGS_NPY = "embeddings.npy"
EMBEDDINGS_CSV = "embeddings.csv"
EMBEDDINGS_META = "embeddings.json"
#: embeddings.csv: row i names vector i of embeddings.npy
EMBEDDINGS_COLUMNS = ("aligned", "source", "identity", "face")
CLEAN_CSV = "clean.csv"
IDENTITIES_CSV = "identities.csv"
MERGES_CSV = "merges.csv"
REVIEW_CSV = "review.csv"
REVIEW_HTML = "review.html"
REPORT_HTML = "report.html"
#: clean's thresholds and summary (beside clean.csv).
CLEAN_META = "clean.json"
#: Every file clean (re)writes in OUT.
CLEAN_OUTPUTS = (CLEAN_CSV, IDENTITIES_CSV, MERGES_CSV, CLEAN_META)
#: Per-shard working files live here so that a killed run can resume.
WORK_DIR = ".facecurate"
#: A stage's run lock: OUT/.facecurate/<stage>.lock (kernel lock; the file holds the pid).
LOCK_SUFFIX = ".lock"
#: Inside a stage's work folder OUT/.facecurate/<stage>/: the shard plan, the merge
#: record, and per shard its record (.json) and data (align .csv, embed .npz).
PLAN_FILE = "plan.json"
MERGED_FILE = "merged.json"
#: ... and the library versions its shards were made under (a resume under other
#: versions is refused: see provenance.py).
VERSIONS_FILE = "versions.json"
#: The key of align.json, embeddings.json, clean.json and pack.json that records the
#: library versions that decided their bytes.
VERSIONS_KEY = "versions"
SHARD_STEM = "shard_{index:06d}"
#: align's input files per shard (``--shard-size``): the unit of work and of
#: resumption. The shard plan depends only on the sorted input list and this number.
ALIGN_SHARD_SIZE = 64
#: embed's faces per shard: 64 with dlib itself (one process per core), at least 256
#: (or the batch size) on ONNX Runtime.
EMBED_SHARD_SIZE_DLIB = 64
EMBED_SHARD_SIZE_ONNX = 256
SHARD_RECORD = SHARD_STEM + ".json"
SHARD_CSV = SHARD_STEM + ".csv"
SHARD_NPZ = SHARD_STEM + ".npz"
#: embed's record of the settings of a run in progress (beside its shards)
EMBED_SIGNATURE = "signature.json"
#: embed --dtype: the type of embeddings.npy's numbers. float16 halves the store on disk
#: and in the page cache; every reader computes in float32 (a float16 store reads as
#: the float32 store rounded to float16). The first is the default, and the type of a
#: store whose embeddings.json records none.
STORE_DTYPES = ("float32", "float16")
#: align's choices: which faces get a crop, the crop format, the fallback detector.
ALIGN_FACES = ("all", "primary")
CROP_FORMATS = ("jpg", "png")
FALLBACK_DETECTORS = ("dlib-cnn", "dlib", "none")
#: What dlib's ResNet is fed (embed --dlib-feed): chips from the photo's five points or
#: its 68 landmarks, or the aligned crop itself.
DLIB_FEEDS = ("five", "68", "crop")
#: Which face stands for an image in eval-pairs (--pick).
EVAL_PICKS = ("centre", "primary")
#: The layout align expects, for messages.
RAW_LAYOUT = "RAW/<identity>/<photo>"
#: Exit status after Ctrl-C (128 + SIGINT), the shell's convention.
EXIT_INTERRUPTED = 130

# --- align.csv ------------------------------------------------------------------------
LANDMARK_COLUMNS = (
    "le_x", "le_y", "re_x", "re_y", "nose_x", "nose_y",
    "ml_x", "ml_y", "mr_x", "mr_y",
)
ALIGN_COLUMNS = (
    "source",  # path relative to RAW (POSIX)
    "identity",  # top-level folder under RAW
    "face",  # index of the face within the source, -1 when none
    "status",  # ok, or the reason there is no crop
    "primary",  # 1 for align's guess of the photo's subject
    "aligned",  # crop path relative to OUT, empty unless ok
    "x1", "y1", "x2", "y2",  # face box in source pixels
    "det_score",
    *LANDMARK_COLUMNS,  # the 5 ArcFace points in source pixels
    "sharpness",  # variance of the Laplacian of the grey crop
    "blockiness",  # strength of a JPEG 8x8 grid over the face box in the source (about 1: none)
    "flat_share",  # share of the crop's face cells that are flat (a covered part of the face)
    "face_size",  # sqrt(box area) in source pixels
    "img_w", "img_h",  # source size after EXIF orientation
    "detector",
    "message",  # human-readable detail for non-ok rows
)
#: status values of align.csv
STATUS_OK = "ok"
STATUS_NO_FACE = "no_face"
STATUS_TOO_SMALL = "too_small"
STATUS_DECODE_ERROR = "decode_error"
STATUS_UNSUPPORTED = "unsupported"
STATUS_TOO_LARGE = "too_large"
STATUS_UNREADABLE = "unreadable"
STATUS_NOT_PRIMARY = "not_primary"  # face found but --faces primary wrote no crop
STATUS_ERROR = "error"  # an unexpected failure on one file (the message says what)

# --- clean decisions -------------------------------------------------------------------
DECISION_KEEP = "keep"
DECISION_DROP = "drop"
DECISION_REVIEW = "review"

# --- MXNet RecordIO ----------------------------------------------------------------------
RECORDIO_MAGIC = 0xCED7230A
RECORDIO_LEN_BITS = 29
RECORDIO_MAX_PART = (1 << RECORDIO_LEN_BITS) - 1
IRHEADER_FORMAT = "<IfQQ"  # flag, label, id, id2
IRHEADER_SIZE = 24
#: float32 holds integers exactly only up to 2**24 (the insightface layout stores keys
#: as float labels).
MAX_FLOAT_KEY = 1 << 24
#: The smallest record an image, header or identity record can be: the 8-byte framing
#: head and the 24-byte IRHeader. A file of S bytes holds at most S // this many of them,
#: the bound a count read from a crafted file is checked against before anything is
#: allocated.
MIN_IMAGE_RECORD = 8 + IRHEADER_SIZE
#: Labels (and header / identity-record ranges) must be integers below this (insightface
#: and arcface_torch hold them as int32).
LABEL_LIMIT = 1 << 31
#: A record length above this is checked against the file's size before it is read (a
#: crafted length would otherwise allocate up to 512 MiB for a few bytes of file).
RECORDIO_CHECKED_READ = 1 << 20

# --- pack: files inside DEST --------------------------------------------------------------
REC_NAME = "train.rec"
IDX_NAME = "train.idx"
LST_NAME = "train.lst"
PROPERTY_NAME = "property"
#: one checksum per record (docs/formats.md, "Checksums"): ``key offset length sha256``
SUMS_NAME = "train.sums"
SUMS_SUFFIX = ".sums"
SUMS_COLUMNS = ("key", "offset", "length", "sha256")
LABELS_CSV = "labels.csv"
PACK_ERRORS_CSV = "pack_errors.csv"
PACK_META = "pack.json"
#: pack writes every file as DEST/.<name>.pack-tmp and renames them into place at the end.
PACK_TMP_SUFFIX = ".pack-tmp"
PACK_FILES = (REC_NAME, IDX_NAME, LST_NAME, SUMS_NAME, PROPERTY_NAME, LABELS_CSV, PACK_ERRORS_CSV, PACK_META)
LABELS_COLUMNS = ("identity", "label", "images")
PACK_ERROR_COLUMNS = ("identity", "path", "reason", "message")
#: unpack records in DEST which .rec it unpacks (size and hashes, docs in README): a
#: non-empty DEST without it, or with another .rec's, is refused.
UNPACK_META = "unpack.json"
#: bytes hashed at each end of the .rec for unpack.json's fingerprint
UNPACK_FINGERPRINT_BYTES = 1 << 20
#: unpack: labels.csv names shared by several labels get folders NAME + this + label
UNPACK_SAME_NAME_SEP = "__"
#: unpack: a folder name longer than this many bytes (UTF-8) is cut and given a hash
#: suffix (most file systems allow 255 bytes per name)
UNPACK_MAX_NAME_BYTES = 200
#: pack-pairs lists the pairs it left out in DEST + this suffix.
UNRESOLVED_SUFFIX = ".unresolved.txt"

#: RecordIO dataset layouts (docs/formats.md): ``plain`` = every record an image;
#: ``insightface`` = header record at key 0, images, then one identity record per
#: class. inspect reports the latter, as it finds it in any .rec, as
#: ``insightface-header``.
LAYOUT_PLAIN = "plain"
LAYOUT_INSIGHTFACE = "insightface"
LAYOUT_HEADER = "insightface-header"

#: reasons in pack_errors.csv
PACK_MISSING = "missing"  # listed crop does not exist
PACK_UNREADABLE = "unreadable"  # exists but cannot be read (permissions, I/O error, directory)
PACK_NOT_IMAGE = "not_image"  # not a decodable image (or not an image file type)
PACK_WRONG_SIZE = "wrong_size"  # decodes, but not the target size
PACK_EMPTY_IDENTITY = "empty_identity"  # identity with no usable crop
PACK_BELOW_MIN = "below_min_images"  # identity dropped by --min-images
PACK_DUPLICATE = "duplicate"  # same crop listed twice
PACK_BAD_ROW = "bad_row"  # manifest row that cannot be used (no path, tab in name, ...)
PACK_UNSUPPORTED = "unsupported"  # a FIFO, socket or device, or a link leading out of the folder
PACK_TOO_LARGE = "too_large"  # larger than --max-bytes (read no further)

# --- clean.csv / review.csv (interface between clean, review and pack) ---------------
CLEAN_COLUMNS = (
    "source", "identity", "face", "aligned",
    "x1", "y1", "x2", "y2",
    "primary", "det_score", "sharpness",
    "decision",  # keep | drop | review
    "reason",  # why: centre, far_from_centre, minority_cluster, not_subject, duplicate, ... manual
    "score",  # cosine similarity to the robust identity centre
    "cluster",  # Chinese-whispers cluster id within the identity (0 = dominant), -1 none
    "duplicate_of",  # aligned path of the kept copy when reason is duplicate
    "previous_decision",  # audit: decision before a manual review was applied
    "previous_reason",
)
#: clean.csv of a packed dataset (``clean DEST`` where DEST holds train.rec): one row per
#: image record, in key order; ``aligned`` is ``rec:<key>`` (the embedding store's key,
#: what review and report use), ``label`` the record's label (a vector's first value).
REC_CLEAN_COLUMNS = (
    "key", "label", "identity", "aligned",
    "decision", "reason", "score", "cluster", "duplicate_of",
    "previous_decision", "previous_reason",
)
#: the embedding-store key of record ``key`` of a .rec
REC_KEY_PREFIX = "rec:"
#: labels.csv of a pack made from a .rec: the new label's old label(s) and name(s)
REC_LABELS_COLUMNS = ("identity", "label", "images", "old_label", "old_identity")
#: pack_errors.csv reasons of a pack made from a .rec
PACK_NOT_KEPT = "not_kept"  # clean did not keep the record (its decision and reason in the message)
PACK_NOT_CLEANED = "not_in_clean_csv"  # an image record clean.csv does not list
PACK_BAD_RECORD = "bad_record"  # an image record without image bytes, or whose label changed since clean
#: reasons in clean.csv
REASON_CENTRE = "centre"  # kept: close to the identity centre
REASON_UNCERTAIN = "uncertain"  # review: between the keep and drop thresholds
REASON_FAR = "far_from_centre"
REASON_MINORITY = "minority_cluster"
REASON_NOT_SUBJECT = "not_subject"  # another face of a photo whose subject is kept
REASON_DUPLICATE = "duplicate"
REASON_AMBIGUOUS = "ambiguous_identity"
REASON_TOO_FEW = "too_few_images"
REASON_LOW_QUALITY = "low_quality"
REASON_EXCLUDED = "excluded"
REASON_NO_EMBEDDING = "no_embedding"
#: clean.csv reason of a decision a person made in a review (`review apply`); later
#: clean runs keep it unless told to discard it.
REASON_MANUAL = "manual"
#: review: at or above keep, but its similarity to another identity's centre comes
#: within the look-alike margin of its similarity to its own centre
REASON_NEAR_OTHER = "near_other_identity"
#: review: one of the best faces of an identity that kept nothing, or little (flags
#: lost / weak_majority), sent to review first
REASON_CANDIDATE = "identity_candidate"
#: review: below drop, but part of the face is covered (flat patches); ahead of the band
REASON_OCCLUDED = "occluded"
#: The order review work is done in, by reason (lower first): clean's review budget keeps
#: its faces in this order (then by score, highest first) and the review page shows them
#: in it. A review reason not named here ranks with the band (REASON_UNCERTAIN).
REVIEW_PRIORITY = {REASON_CANDIDATE: 0, REASON_OCCLUDED: 1, REASON_NEAR_OTHER: 2, REASON_UNCERTAIN: 2}
#: clean's occlusion signal: an aligned crop (resized to OCCLUSION_SIDE) is cut into
#: OCCLUSION_GRID x OCCLUSION_GRID cells; the cells of rows OCCLUSION_ROWS and columns
#: OCCLUSION_COLS cover the face of the ArcFace template, and a cell whose grey values
#: have a standard deviation below OCCLUSION_FLAT_STD is flat (a scarf, a hand, a block)
OCCLUSION_SIDE = 112
OCCLUSION_GRID = 8
OCCLUSION_ROWS = (2, 8)
OCCLUSION_COLS = (1, 7)
OCCLUSION_FLAT_STD = 2.0
#: clean's low-quality groups, each lifted by its own measured gap (blurred: align's
#: sharpness; compressed: blockiness; occluded: flat_share), as clean.json's
#: ``quality_lift`` names them
QUALITY_GROUPS = ("blurred", "compressed", "occluded")
#: clean's per-identity summary, identities.csv
IDENTITY_COLUMNS = (
    "identity", "images", "faces", "kept", "dropped", "review", "duplicates", "not_subject",
    "clusters", "dominant_share", "noise", "median_score", "flags",
)
#: flags of identities.csv (";"-separated)
FLAG_AMBIGUOUS = "ambiguous"  # a second person nearly as large as the dominant one
FLAG_EXCLUDED = "excluded"  # named by --exclude, or matching its evaluation faces
FLAG_NO_FACES = "no_faces"  # align found no face in any of its photos
FLAG_TOO_FEW = "too_few"  # fewer kept photos than --min-images
FLAG_MERGE_CANDIDATE = "merge_candidate"  # in merges.csv
FLAG_LOST = "lost"  # photos with a face (CleanParams.lost_photos or more), nothing kept
FLAG_WEAK = "weak_majority"  # kept photos fewer than CleanParams.weak_share of its photos with a face
#: identities.csv flags of identities clean kept nothing, or little, of: the report lists
#: them at the top and the review page shows them first, in this order
AT_RISK_FLAGS = (FLAG_LOST, FLAG_WEAK)
#: clean's merge candidates, merges.csv: two identities that look like one person
MERGE_COLUMNS = ("a", "b", "similarity")
#: review.csv and the HTML page's export: a person fills in `decision` (keep/drop).
REVIEW_COLUMNS = ("aligned", "identity", "source", "face", "score", "reason", "decision")
#: The text columns of the CSVs meant for spreadsheets (review.csv, identities.csv):
#: written with a quote before a leading = + - @ tab or CR (files.sheet_cell), read back
#: exactly (files.unsheet_cell). clean.csv, align.csv and the other CSVs are written as
#: they are, for programs.
SHEET_COLUMNS = ("aligned", "identity", "source")
#: Environment variables that size the BLAS/OpenMP thread pools; workers (one per core)
#: set them to 1.
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
