"""The options every sharded stage shares: ``--engine``, ``--ray-address``, ``--part``."""

from __future__ import annotations

import click

from facecurate.engines import ENGINES
from facecurate.engines.runner import RunError, parse_part


def _part(_ctx, _param, value):
    if value is None:
        return None

    try:
        return parse_part(value)
    except RunError as e:
        raise click.BadParameter(str(e).split(": ", 1)[-1]) from None


def engine_options(f):
    """--engine, --ray-address and --part (applied bottom-up: listed here in reverse)."""
    f = click.option("--part", default=None, metavar="K/N", callback=_part,
                     help="Do only the shards whose index is K-1 modulo N and write their records "
                          "(N machines sharing OUT each run one part). The part that finds every "
                          "shard finished, or any later run without --part, merges them.")(f)
    f = click.option("--ray-address", default=None, metavar="HOST:PORT",
                     help="--engine ray: the cluster to connect to (default: RAY_ADDRESS, else a "
                          "Ray instance started on this machine for the run).")(f)
    f = click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
                     help="local: worker processes on this machine; ray: Ray actors on a cluster "
                          "(pip install 'facecurate[ray]'). RAW and OUT must be at the same path on "
                          "every node. Outputs are identical either way.")(f)
    return f
