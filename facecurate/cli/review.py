"""``facecurate review OUT``, ``facecurate review apply OUT DECISIONS.csv`` and
``facecurate report OUT``."""

from __future__ import annotations

import sys

import click

from facecurate.common.files import emit_summary, say
from facecurate.review.report import write_report
from facecurate.review.review import apply_decisions, write_review

_SHEET = "sheet"


class _SheetContext(click.Context):
    @property
    def command_path(self) -> str:  # the default subcommand has an empty name
        return super().command_path.rstrip()


class _SheetCommand(click.Command):
    context_class = _SheetContext


class _ReviewGroup(click.Group):
    """A group whose default subcommand is ``sheet``: ``review OUT`` means
    ``review sheet OUT``; ``review apply ...`` is the apply subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [_SHEET, *args]
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        # `review OUT` errors read "Usage: facecurate review OUT", not "... review sheet OUT"
        return ("" if name == _SHEET else name), cmd, rest

    def format_options(self, ctx, formatter):
        sheet = self.commands[_SHEET]
        recs = [p.get_help_record(ctx) for p in sheet.get_params(ctx) if isinstance(p, click.Option)]
        recs = [r for r in recs if r and not r[0].startswith("-h")]
        recs.append(("-h, --help", "Show this message and exit."))
        with formatter.section("Options of `review OUT`"):
            formatter.write_dl(recs)
        self.format_commands(ctx, formatter)


@click.group("review", cls=_ReviewGroup, invoke_without_command=False, no_args_is_help=True, options_metavar="",
             subcommand_metavar="OUT [OPTIONS] | apply OUT DECISIONS.csv [OPTIONS]")
def review():
    """Hand the faces clean could not decide to a person, and take the answers back.

    \b
    facecurate review OUT
        writes OUT/review.html: a self-contained contact sheet (open it in any
        browser; no server, no network; review-2.html, ... beyond --page-size).
        One section per identity: its most central kept faces as reference,
        then every review face with its score and reason and keep/drop buttons
        (keyboard: k, d, x, arrows). "Export decisions" downloads
        review-decisions.csv. Also writes OUT/review.csv (decision column
        blank) for spreadsheet users.
    facecurate review apply OUT DECISIONS.csv
        merges the decisions (the pages' exports or a filled-in review.csv) into
        OUT/clean.csv: reason `manual`, clean's decision kept in
        previous_decision / previous_reason. Applying a file twice changes nothing.
    """


@review.command(_SHEET, cls=_SheetCommand, hidden=True)
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--references", type=click.IntRange(0, 50), default=6, show_default=True,
              help="Kept faces closest to the identity centre shown as reference in each section.")
@click.option("--page-size", type=click.IntRange(0), default=2000, show_default=True,
              help="At most this many review faces per HTML page (review.html, review-2.html, ...); an "
                   "identity is never split. 0: one page.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def sheet(out, references, page_size, as_json):
    """Write OUT/review.html and OUT/review.csv from OUT/clean.csv."""
    try:
        summary = write_review(out, references=references, page_size=page_size)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if summary["missing_crops"]:
        say(f"warning: {summary['missing_crops']} crop file(s) missing, shown as placeholders "
            f"(e.g. {', '.join(summary['missing_examples'])})", err=True)
    if summary["identities_note"]:
        say(f"warning: {summary['identities_note']}", err=True)
    emit_summary(f"review: {summary['review_faces']} faces to review in {summary['identities']} identities",
                 summary, as_json)


@review.command("apply", short_help="Merge keep/drop decisions into OUT/clean.csv.")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.argument("decisions", metavar="DECISIONS.csv...", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False))
@click.option("--strict", is_flag=True,
              help="Apply nothing when any row is rejected (default: apply the valid rows, list the others).")
@click.option("--dry-run", is_flag=True, help="Check and count, but do not write clean.csv.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def apply(out, decisions, strict, dry_run, as_json):
    """Merge keep/drop decisions from DECISIONS.csv (one or more files: the
    page's exports or a filled-in review.csv) into OUT/clean.csv.

    DECISIONS.csv needs columns `aligned` and `decision` (keep or drop; blank =
    still undecided); `identity`, when present, must match. Accepted rows get
    reason `manual`; the decision clean made is kept in previous_decision /
    previous_reason. clean.csv is replaced atomically.

    Rejected rows (unknown crop, invalid decision, wrong identity, contradicting
    an earlier row) are listed on stderr and the exit status is 1; the valid rows
    are still applied unless --strict.
    """
    try:
        summary = apply_decisions(out, decisions, strict=strict, dry_run=dry_run)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    for p in summary["problems"]:
        say(f"rejected: {p}", err=True)
    if not as_json:
        summary = dict(summary)
        n = len(summary.pop("problems"))
        summary["problems"] = n
    verb = "would change (--dry-run: nothing written)" if dry_run else "changed"
    emit_summary(f"review apply: {summary['changed']} decision(s) {verb} in {summary['clean_csv']}",
                 summary, as_json)
    if summary["rejected"]:
        if strict:
            click.echo(f"--strict: {summary['rejected']} row(s) rejected, clean.csv left unchanged", err=True)
        sys.exit(1)


@click.command("report")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--top", type=click.IntRange(0, 1000), default=25, show_default=True,
              help="How many of the noisiest identities to list (with thumbnails).")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Write the page here instead of OUT/report.html.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def report(out, top, output, as_json):
    """Write OUT/report.html: one self-contained page to judge a run at a glance.

    Per-stage counts (align statuses, embeddings, clean decisions and reasons,
    manual review), similarity-to-centre histograms of kept / dropped / review
    faces with clean's thresholds, merge candidates, and the noisiest identities
    with thumbnails of what was kept and dropped. Reads whatever stages have run.
    """
    try:
        summary = write_report(out, top=top, output=output)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    emit_summary(f"report: {summary['html']}", summary, as_json)


COMMANDS = [review, report]
