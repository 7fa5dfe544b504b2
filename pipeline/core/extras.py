"""Optional dependencies: imported where needed, or one line naming the extra to install."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from pipeline.core.errors import MissingExtraError

__all__ = ["EXTRAS", "installed", "require", "require_all"]

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


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it (``--help`` and a
    choice between engines stay fast)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent missing, or a module hidden as None
        return False


def require_all(modules, purpose: str) -> None:
    """Raise :class:`MissingExtraError` for the first of ``modules`` not installed, without
    importing any: the check before long work that needs them later."""
    for module in modules:
        if not installed(module):
            top = module.partition(".")[0]
            raise MissingExtraError(top, EXTRAS.get(top, top), purpose)
