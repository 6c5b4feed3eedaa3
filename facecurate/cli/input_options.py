"""The options of the stages that read an untrusted folder (align's RAW, the crop
folders of embed and pack): ``--max-bytes`` and ``--follow-external-links``."""

from __future__ import annotations

import click

from facecurate.common.constants import MAX_INPUT_BYTES


def input_options(folder: str):
    """--max-bytes and --follow-external-links; ``folder`` names the boundary in the help."""
    def deco(f):
        f = click.option("--follow-external-links", is_flag=True,
                         help=f"Follow symlinks whose real path leads out of {folder} (default: such a link "
                              "is recorded as unsupported, with its target, and not read).")(f)
        f = click.option("--max-bytes", type=click.IntRange(min=1), default=MAX_INPUT_BYTES, show_default=True,
                         help="Record larger files as too_large without reading them.")(f)
        return f
    return deco
