"""eval-pairs: align and embed a pairs file's photos, 10-fold accuracy (evalpairs.py)."""

from facecurate.evalpairs.evalpairs import run_eval_pairs

__all__ = ["run_eval_pairs"]
