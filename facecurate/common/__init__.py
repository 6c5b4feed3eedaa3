"""What every stage shares, below all of them: constants, files and folders
(atomic writes, the untrusted-folder walk, image decoding), geometry, the RecordIO
framing and datasets, the typed rows of OUT's CSVs and the workspace that reads and
writes them, run locks and library provenance. Nothing here imports a stage, a model
or an engine (tests/test_layers.py)."""
