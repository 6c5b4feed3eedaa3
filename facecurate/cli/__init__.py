"""The ``facecurate`` command group. Each stage's commands live in their own module
under ``facecurate/cli/`` and are thin wrappers over the importable API; heavy imports
(dlib, onnxruntime) happen inside the commands, so ``--help`` stays fast."""

from __future__ import annotations

import click

from facecurate import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="facecurate")
def main() -> None:
    """Turn crawled per-identity photo folders into a clean face-recognition
    training set.

    \b
    The pipeline, one subcommand per stage:
      facecurate align RAW OUT     detect, align to 112x112 ArcFace crops, manifest
      facecurate embed OUT         L2-normalised embeddings of the crops
      facecurate clean OUT         keep / drop / review per face, merges, duplicates
      facecurate review OUT        HTML contact sheet + CSV for the boundary cases
      facecurate pack OUT DEST     train.rec/.idx/.lst + property for arcface_torch
      facecurate models list       installed weights, runtimes, converted graphs

    Every stage records what it did in OUT/, can be interrupted and rerun (it
    continues where it stopped), and gives byte-identical output for the same
    inputs and flags.
    """


from facecurate.cli import align as _align  # noqa: E402
from facecurate.cli import embed as _embed  # noqa: E402
from facecurate.cli import clean as _clean  # noqa: E402
from facecurate.cli import pack as _pack  # noqa: E402
from facecurate.cli import models as _models  # noqa: E402
from facecurate.cli import review as _review  # noqa: E402

for _mod in (_align, _embed, _clean, _review, _pack, _models):
    for _cmd in _mod.COMMANDS:
        main.add_command(_cmd)
