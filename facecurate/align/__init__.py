"""The align stage: RAW photos -> aligned crops and align.csv (align.py)."""

from facecurate.align.align import AlignConfig, AlignError, read_manifest, run_align

__all__ = ["AlignConfig", "AlignError", "read_manifest", "run_align"]
