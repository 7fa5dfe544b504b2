"""The command group class: our own errors end in one line and exit code 1, bugs still raise."""

from __future__ import annotations

import sys

import click

from pipeline.cli.messages import one_line
from pipeline.core import distributed
from pipeline.core.errors import PipelineError
from pipeline.store import run_record

__all__ = ["Group"]


class Group(click.Group):
    """Turns our own errors into one line and exit code 1; anything else is a bug and raises."""

    def main(self, args=None, prog_name=None, **extra):
        # The run records (pipeline.store.run_record) give the command as it was typed, also when
        # the CLI runs in-process (click's CliRunner, scripts) under another sys.argv.
        argv = list(sys.argv[1:] if args is None else args)
        with run_record.command_line(["pipeline", *map(str, argv)]):
            return super().main(args, prog_name, **extra)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PipelineError as err:
            raise click.ClickException(one_line(err)) from None
        finally:  # under torchrun: leave the process group cleanly
            distributed.shutdown()

