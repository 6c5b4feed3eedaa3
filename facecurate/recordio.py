"""The RecordIO readers and writers at the path the README has always named
(``facecurate.recordio``); the code is in :mod:`facecurate.common.recordio`."""

from facecurate.common.recordio import (
    MAGIC_BYTES,
    IndexedRecordReader,
    IndexedRecordWriter,
    IRHeader,
    Record,
    RecordIOError,
    RecordWriter,
    file_size,
    frame,
    frame_image,
    idx_text,
    iter_records,
    pack_header,
    pack_record,
    read_idx,
    read_idx_arrays,
    read_idx_keys,
    read_record,
    unpack_record,
)

__all__ = [
    "MAGIC_BYTES", "IRHeader", "IndexedRecordReader", "IndexedRecordWriter", "Record", "RecordIOError",
    "RecordWriter", "file_size", "frame", "frame_image", "idx_text", "iter_records", "pack_header",
    "pack_record", "read_idx", "read_idx_arrays", "read_idx_keys", "read_record", "unpack_record",
]
