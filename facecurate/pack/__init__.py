"""pack and the RecordIO tools: what pack reads (pack_inputs.py), writing DEST
(packer.py; pack_rec.py for a packed dataset), train.sums (checksums.py), inspect
(inspect_rec.py), unpack (unpack.py) and pairs files / pack-pairs (pairs.py)."""

from facecurate.pack.packer import PackResult, pack
from facecurate.pack.pack_inputs import PackError

__all__ = ["PackError", "PackResult", "pack"]
