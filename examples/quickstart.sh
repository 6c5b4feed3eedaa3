#!/usr/bin/env bash
# The whole pipeline on real photos with the embedded, offline dlib models:
#   bash examples/quickstart.sh [RAW] [OUT]
# RAW defaults to the shared test photos (13 people, one folder each).
set -euo pipefail
RAW=${1:-${FACECURATE_DATA:-../shared/data}/photos}
OUT=${2:-out}
facecurate align "$RAW" "$OUT"          # crops + OUT/align.csv
facecurate embed "$OUT"                 # OUT/embeddings.npy/.csv/.json
facecurate clean "$OUT"                 # OUT/clean.csv, identities.csv, merges.csv
facecurate review "$OUT"                # OUT/review.html + review.csv (boundary cases)
facecurate report "$OUT"                # OUT/report.html
facecurate pack "$OUT" "$OUT/pack"      # train.rec/.idx/.lst + property for arcface_torch
facecurate inspect "$OUT/pack/train"    # validate what was written
