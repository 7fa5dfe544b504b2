"""The installed distribution: its name on PyPI (the import package and command are `pipeline`)."""

from importlib.metadata import version as _version

NAME = "cnn-bottleneck-pipeline"
PARQUET_EXTRA = "parquet"


def version() -> str:
    return _version(NAME)
