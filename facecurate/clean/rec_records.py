"""The image records of a packed dataset as clean reads them, outside the main flow:
the labels of records the store lacks, and the pixel check of near-duplicates on
record bytes (shared by :mod:`facecurate.clean.clean_rec` and the sharded run's workers)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from facecurate.clean.clean_common import CropSimilarity
from facecurate.common.recdata import KeyedRecords, image_label, int_label
from facecurate.common.recordio import RecordIOError, read_record, unpack_record


def labels_of(rec_path: Path, keys: Sequence[int]) -> list[int]:
    """Labels of a few records read from the .rec (the store's failed records)."""
    if not keys:
        return []
    kr = KeyedRecords(rec_path)
    out = []
    try:
        for k in keys:
            try:
                p = kr.payload(k)
                lab = image_label(unpack_record(p)[0]) if p is not None else float("nan")
            except RecordIOError:
                lab = float("nan")
            out.append(int_label(lab))
    finally:
        kr.close()
    return out



class RecCropSimilarity(CropSimilarity):
    """:class:`facecurate.clean.CropSimilarity` on record bytes: face i is the record at
    ``offsets[i]`` of the .rec (read on first use, 32x32 grey, mean removed)."""

    def __init__(self, rec_path: os.PathLike | str, offsets: Sequence[int]):
        super().__init__([])
        self.rec_path = str(rec_path)
        self.offsets = [int(o) for o in offsets]
        self._f = None

    def __getstate__(self):  # for worker processes: no open file, no cache
        return {"rec_path": self.rec_path, "offsets": self.offsets}

    def __setstate__(self, st):
        self.__init__(st["rec_path"], st["offsets"])

    def subset(self, rows: Sequence[int]) -> "RecCropSimilarity":
        return RecCropSimilarity(self.rec_path, [self.offsets[int(i)] for i in rows])

    def grey(self, i: int):
        import cv2

        try:
            if self._f is None:
                self._f = open(self.rec_path, "rb")
            img = unpack_record(read_record(self._f, self.offsets[i]).payload)[1]
            return cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_GRAYSCALE) if img else None
        except (RecordIOError, OSError):
            return None


__all__ = ["RecCropSimilarity", "labels_of"]
