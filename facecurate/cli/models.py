"""``facecurate models list`` and ``facecurate models export``."""

from __future__ import annotations

import click

from facecurate.common.files import emit_summary
from facecurate.models.dlib_onnx import DlibOnnxError, export, inventory


@click.group("models")
def models() -> None:
    """The models facecurate can use: what is installed, what is cached, and
    ONNX exports of the embedded default (dlib's 128-D ResNet)."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the listing as one JSON object.")
def list_models(as_json):
    """Show dlib's installed weight files, the runtimes (dlib, ONNX Runtime and its
    providers, onnx) and the ONNX graphs converted from dlib's weights in the cache
    ($FACECURATE_CACHE/models, else $XDG_CACHE_HOME/facecurate/models, else
    ~/.cache/facecurate/models)."""
    inv = inventory()
    if as_json:
        emit_summary("models", inv, True)
        return
    click.echo("dlib weights (face_recognition_models):")
    for w in inv["weights"]:
        click.echo(f"  {w['file']}: " + (f"{w['bytes']:,} bytes  {w['path']}" if "path" in w else w["missing"]))
    click.echo("runtimes:")
    for k, v in inv["runtimes"].items():
        click.echo(f"  {k}: {', '.join(v) if isinstance(v, list) else (v or 'not installed')}")
    click.echo(f"  dlib's model runs on (--runtime auto): {inv['dlib_runtime_auto']}")
    click.echo(f"converted graphs in {inv['cache']}:")
    for c in inv["cached"]:
        state = "current" if c["current"] else "from another .dat"
        click.echo(f"  {c['file']}: {c['bytes']:,} bytes, {c['model']}, source sha256 "
                   f"{c['source_sha256'][:16]}... ({state})")
    if not inv["cached"]:
        click.echo("  none yet (converted at the first embed with the ONNX runtime)")


@models.command("export")
@click.argument("name", type=click.Choice(["dlib-resnet"]))
@click.argument("dest", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def export_model(name, dest, as_json):
    """Write NAME as an ONNX graph to DEST.

    dlib-resnet: dlib's 128-D face-recognition ResNet, converted from the
    installed dlib_face_recognition_resnet_model_v1.dat (verified against dlib
    before it is written). Input N x 3 x 150 x 150 RGB 0..255 (dlib's face chip;
    the graph subtracts the means and scales itself), output N x 128, not
    normalised. The metadata records the source file's sha256 and origin.
    """
    try:
        summary = export(dest, name)
    except (DlibOnnxError, OSError) as e:
        raise click.ClickException(str(e)) from None
    emit_summary(f"models export: {name} -> {dest}", summary, as_json)


COMMANDS = [models]
