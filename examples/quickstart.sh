#!/usr/bin/env bash
# The whole pipeline on real photos with the embedded, offline dlib models:
#   bash examples/quickstart.sh [RAW [OUT]]
# RAW: one folder per identity, RAW/<identity>/*.jpg (your own photos, or any such tree).
# Without RAW: $FACECURATE_DATA/photos, else the project's shared test photos
# (13 people) in shared/data/photos beside the checkout. These are test data of the
# project's workspace, not part of the repository: outside it, give RAW or set
# FACECURATE_DATA to a folder that holds photos/<identity>/*.jpg.
# OUT defaults to ./out. FACECURATE_DATA is not read when RAW is given.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -ge 1 ]; then
    RAW=$1
else
    shared=$(cd "$here/../.." && pwd)/shared/data  # the project's workspace: shared/ beside the checkout
    RAW=${FACECURATE_DATA:-$shared}/photos
fi
OUT=${2:-out}
if [ ! -d "$RAW" ]; then
    {
        echo "quickstart: no photo folder at $RAW"
        if [ $# -ge 1 ]; then
            echo "  RAW must be a folder of identity folders: RAW/<identity>/*.jpg"
        else
            echo "  the default photos are the project's shared test data (shared/data/photos beside the"
            echo "  checkout, or \$FACECURATE_DATA/photos); they are not part of the repository."
        fi
        echo "  use your own: bash examples/quickstart.sh RAW [OUT], with RAW/<identity>/*.jpg,"
        echo "  or set FACECURATE_DATA to a folder that holds photos/<identity>/*.jpg"
    } >&2
    exit 2
fi
facecurate align "$RAW" "$OUT"          # crops + OUT/align.csv
facecurate embed "$OUT"                 # OUT/embeddings.npy/.csv/.json
facecurate clean "$OUT"                 # OUT/clean.csv, identities.csv, merges.csv
facecurate review "$OUT"                # OUT/review.html + review.csv (boundary cases)
facecurate report "$OUT"                # OUT/report.html
facecurate pack "$OUT" "$OUT/pack"      # train.rec/.idx/.lst + property for arcface_torch
facecurate inspect "$OUT/pack/train"    # validate what was written
