"""The review pages and apply (review.py) and report.html (report.py)."""

from facecurate.review.report import write_report
from facecurate.review.review import apply_decisions, write_review

__all__ = ["apply_decisions", "write_report", "write_review"]
