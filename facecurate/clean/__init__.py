"""The clean stage: the store and align.csv (or a packed dataset) -> clean.csv,
identities.csv, merges.csv, clean.json (clean.py, clean_rec.py; the algorithm in
clean_*.py, similar.py and vectors.py: see docs/architecture.md)."""

from facecurate.clean.clean import run_clean
from facecurate.clean.clean_params import CleanParams, default_params

__all__ = ["CleanParams", "default_params", "run_clean"]
