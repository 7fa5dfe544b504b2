"""Head specs: ``NAME[:param=value,...]`` parsed into a classifier, and the registry of names.

``NAME`` is a key of :data:`HEADS` (``logreg``, ``mlp``, ``linear``, ``multilayer``) or the
import path of any scikit-learn classifier (``sklearn.svm.LinearSVC:C=0.1``). A new head of our
own is one module in ``pipeline/heads/`` plus one entry in :data:`HEADS`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re

from sklearn.base import BaseEstimator, is_classifier

from pipeline.core.errors import HeadError
from pipeline.heads.linear_probe import LinearProbe
from pipeline.heads.logreg import LogRegHead
from pipeline.heads.mlp import MLPHead
from pipeline.heads.multilayer import MultiLayerHead

# The short names of make_head and `pipeline heads --heads`; a new head is one entry here.
HEADS = {"logreg": LogRegHead, "mlp": MLPHead, "linear": LinearProbe,
         "multilayer": MultiLayerHead}
# A parameter value that is not a Python literal is taken as a string if it looks like one word:
# solver=saga, device=cuda:1.
_BARE_WORD = re.compile(r"[A-Za-z_][\w.:/+-]*\Z")



def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: ``a=(1,2),b=x`` -> ``a=(1,2)``, ``b=x``."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def _parse_value(key: str, text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        if _BARE_WORD.match(text):
            return text
        raise HeadError(
            f"cannot read the value {text!r} of {key!r}; write a Python literal "
            "such as 0.1, (256, 128), None or 'text'"
        ) from None


def _parse_spec(spec: str) -> tuple[str, dict]:
    """``NAME[:param=value[,param=value...]]`` -> name, parameters."""
    name, _, text = spec.partition(":")
    params = {}
    for item in _split_top_level(text):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or not key.isidentifier():
            raise HeadError(f"cannot read {item!r} in head {spec!r}; write param=value")
        if key in params:
            raise HeadError(f"parameter {key!r} is given twice in head {spec!r}")
        params[key] = _parse_value(key, value)
    return name.strip(), params


def _head_class(name: str) -> type:
    if name in HEADS:
        return HEADS[name]
    module_name, _, class_name = name.rpartition(".")
    if not module_name:
        raise HeadError(
            f"unknown head {name!r}; use one of {', '.join(HEADS)} "
            "or the import path of a classifier, such as sklearn.svm.LinearSVC"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise HeadError(f"cannot import {module_name!r} for head {name!r}: {err}") from err
    cls = getattr(module, class_name, None)
    if not inspect.isclass(cls):
        raise HeadError(f"{module_name!r} has no class {class_name!r}")
    return cls


def _is_classifier(estimator) -> bool:
    try:
        return is_classifier(estimator)
    except AttributeError:  # not a scikit-learn estimator at all: it has no tags
        return False


def make_head(spec: str) -> BaseEstimator:
    """Build a classifier from ``NAME[:param=value[,param=value...]]``.

    ``NAME`` is a key of ``HEADS`` or the import path of any scikit-learn classifier; values are
    Python literals, or strings when they are one bare word.

    Examples
    --------
    >>> make_head("mlp:hidden_sizes=(256,),dropout=0.5")
    MLPHead(dropout=0.5, hidden_sizes=(256,))
    >>> make_head("sklearn.svm.LinearSVC:C=0.1")
    LinearSVC(C=0.1)

    Raises
    ------
    HeadError
        Unknown name, a module that cannot be imported, a class that is not a classifier, an
        unknown parameter, an unreadable value, or a value the estimator's declared parameter
        constraints refuse.
    """
    name, params = _parse_spec(spec)
    cls = _head_class(name)
    try:
        estimator = cls()
    except TypeError as err:
        raise HeadError(f"{name!r} cannot be built without arguments: {err}") from err
    if not _is_classifier(estimator):
        raise HeadError(
            f"{name!r} is not a scikit-learn classifier; use one of {', '.join(HEADS)} "
            "or a classifier such as sklearn.svm.LinearSVC"
        )
    try:
        estimator.set_params(**params)
        if hasattr(estimator, "_parameter_constraints"):  # scikit-learn's and ours
            estimator._validate_params()  # now, not in the middle of fitting
    except (ValueError, TypeError) as err:
        raise HeadError(f"bad parameter for head {name!r}: {err}") from err
    return estimator


def head_name(spec: str) -> str:
    """A short name for tables: the registry name, or the class name of an import path."""
    name = spec.partition(":")[0].strip()
    return name if name in HEADS else name.rpartition(".")[2]
