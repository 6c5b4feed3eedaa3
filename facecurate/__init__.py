"""facecurate: crawled per-identity photo folders -> clean face-recognition training set."""

__version__ = "0.1.0"
