"""The ``facecurate`` command group. Each stage's commands live in their own module
under ``facecurate/cli/`` and are thin wrappers over the importable API; the heavy
optional libraries (dlib, onnxruntime, onnx, ray, faiss) are imported only by the
commands that use them, so ``--help`` stays fast."""

from __future__ import annotations

import os
import warnings

import click

from facecurate import __version__
from facecurate.cli import align, clean, embed, models, pack, review
from facecurate.common.constants import EXIT_INTERRUPTED
from facecurate.common.files import shown
from facecurate.common.procs import LockedError
from facecurate.common.workspace import ManifestError
from facecurate.models.base import ModelError

#: What every stage says after Ctrl-C (each writes its files atomically and resumes).
INTERRUPTED = "interrupted: nothing is left half-written; rerun the same command to continue where it stopped"


class Interrupted(click.ClickException):
    exit_code = EXIT_INTERRUPTED


def os_error_message(e: OSError) -> str:
    """One line naming the path and the problem, e.g. ``cannot write /x/align.json:
    Read-only file system``."""
    what = e.strerror or str(e)
    if e.filename is None:
        return what
    path = os.fsdecode(e.filename)
    if e.filename2 is not None:
        path += f" -> {os.fsdecode(e.filename2)}"
    return f"{path}: {what}"


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library warning (an OUT made under other library versions) as one line on
    stderr, ``warning: ...``, without Python's file and line."""
    click.echo(f"warning: {shown(str(message))}", err=True)


class _Main(click.Group):
    """The command group; every command's errors pass through here: an OSError (a
    read-only or full disk, a missing permission) becomes one line naming the path
    (exit 1), another run holding OUT's lock one line naming its pid (exit 1), a
    model problem (a --model-dir without the model, an unreadable .onnx) its message, and
    Ctrl-C the same message in every stage (exit 130), never a traceback."""

    def invoke(self, ctx: click.Context):
        warnings.showwarning = _one_line_warning
        try:
            return super().invoke(ctx)
        except click.ClickException as e:  # names in a message are shown escaped (files.shown)
            e.message = shown(e.message, keep_newlines=True)
            raise
        except BrokenPipeError:
            raise  # click handles a closed stdout itself
        except OSError as e:
            raise click.ClickException(shown(os_error_message(e), keep_newlines=True)) from None
        except (LockedError, ManifestError, ModelError) as e:
            raise click.ClickException(shown(str(e), keep_newlines=True)) from None
        except KeyboardInterrupt:
            raise Interrupted(INTERRUPTED) from None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
      facecurate report OUT        OUT/report.html: counts, score histograms, noisiest identities
      facecurate pack OUT DEST     train.rec/.idx/.lst + property for arcface_torch
      facecurate inspect DEST      validate a .rec/.idx (ours or a public one)
      facecurate models list       installed weights, runtimes, converted graphs

    Every stage records what it did in OUT/, can be interrupted and rerun (it
    continues where it stopped), and gives byte-identical output for the same
    inputs, flags and library versions (each stage's .json records the versions;
    a resume under other versions is refused).
    """


for _mod in (align, embed, clean, review, pack, models):
    for _cmd in _mod.COMMANDS:
        main.add_command(_cmd)
