"""Optional dependencies: imported where needed, or one line naming the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from pipeline.core.errors import MissingExtraError

__all__ = ["EXTRAS", "require"]

# Module -> the extra of pyproject.toml that installs it (pip install 'cnn-bottleneck-pipeline[X]').
EXTRAS = {
    "cleanlab": "audit",
    "openTSNE": "audit",
    "onnxruntime": "onnx",
    "onnx": "onnx",
    "onnxscript": "onnx",
    "openvino": "openvino",
    "mlflow": "track",
    "sqlalchemy": "track",
    "alembic": "track",
    "pyarrow": "parquet",
}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming the extra that brings it.

    ``purpose`` says what needs it ("pipeline audit"), for the one line. Only the module
    itself missing is turned into that line; a missing dependency *of* an installed module is a
    broken install and raises as it is.
    """
    top = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name not in (top, module):
            raise
        raise MissingExtraError(top, EXTRAS.get(top, top), purpose) from None
