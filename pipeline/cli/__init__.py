"""The ``pipeline`` command: one thin click module per command group."""

from pipeline.cli.main import main, run

__all__ = ["main", "run"]
