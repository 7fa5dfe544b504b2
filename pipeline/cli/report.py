"""``pipeline report``: every results row of a run in one table, with paired tests."""

from __future__ import annotations

import click

from pipeline.cli.output import emit_json, markdown
from pipeline.core.options import ReportOptions, default

__all__ = ["report_command"]


@click.command(name="report")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder of the report [default: FOLDER/report].")
@click.option("--mistakes", type=click.IntRange(min=0), default=default(ReportOptions, "mistakes"),
              show_default=True,
              help="Most confident wrong test predictions of the best row drawn in "
                   "mistakes.png.")
@click.option("--json", "as_json", is_flag=True)
def report_command(folder, out, mistakes, as_json) -> None:
    """One table of the heads and fine-tunes found under FOLDER, with a chart."""
    from pathlib import Path

    from pipeline.report.summary import compare_results

    result = compare_results(folder, options=ReportOptions(mistakes=mistakes))
    result.write(Path(out) if out else Path(folder) / "report")
    if as_json:
        emit_json(result.to_json())
        return
    for sentence in result.summary:
        click.echo(sentence + "\n")
    click.echo(markdown(result.compact), nl=False)
    if len(result.cache_keys) > 1:
        click.echo(f"note: rows come from {len(result.cache_keys)} feature caches; only rows "
                   "with the same cache_key share features and test images")
    files = result.files
    click.echo(f"report: {files['report_html']} (one page, every plot), {files['report_md']}; "
               f"every column in {files['report_csv']}")
