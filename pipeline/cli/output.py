"""How commands print: JSON on stdout, names that survive any terminal, Markdown tables."""

from __future__ import annotations

import json

import click

__all__ = ["display", "emit_json", "markdown"]


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=None, default=str))


def display(path) -> str:
    """A name as its bytes on disk, shown losslessly (PIL loads only when one is shown)."""
    from pipeline.data.layouts import display as lossless

    return lossless(path)


def markdown(rows) -> str:
    from pipeline.report.tables import markdown_table

    return markdown_table(rows)
