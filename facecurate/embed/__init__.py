"""The embed stage: crops (align.csv, a crop folder or a .rec) -> the embedding store
(embed.py; embed_rec.py for a .rec)."""

from facecurate.embed.embed import EmbedError, load_store, run_embed

__all__ = ["EmbedError", "load_store", "run_embed"]
