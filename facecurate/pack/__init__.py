"""pack and the RecordIO tools: what pack reads (pack_inputs.py), the order of the
crops (packer.py; pack_rec.py for a packed dataset), writing and committing DEST
(dest.py), train.sums (checksums.py), inspect
(inspect_rec.py), unpack (unpack.py) and pairs files / pack-pairs (pairs.py)."""

from facecurate.pack.dest import PackResult
from facecurate.pack.packer import pack
from facecurate.pack.pack_inputs import PackError

__all__ = ["PackError", "PackResult", "pack"]
