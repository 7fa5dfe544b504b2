"""One shape for every stage: options in, a result out, the result writes itself.

A stage is ``stage(inputs, *, options=StageOptions()) -> StageResult``. Its options are a
frozen, keyword-only dataclass whose ranges are declared as data (``constraints``, as
scikit-learn's ``_parameter_constraints``) and checked once, when the options are built; its
result is a dataclass with ``to_json()`` for the record and ``write(out)`` for the files, every
file through :mod:`pipeline.core.atomic`. The stage computes and writes nothing; the CLI parses
its flags, builds the options by keyword, calls the stage, writes the result and prints.

Importing this module loads no framework, so ``pipeline --help`` stays instant.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipeline.core.errors import OptionError

__all__ = ["Between", "OneOf", "Options", "Result", "Satisfies", "to_plain"]


@dataclass(frozen=True)
class Between:
    """A number from ``low`` to ``high`` (``None``: unbounded); ``open`` names the ends that
    are excluded ("low", "high" or "both"); ``integer``: a whole number as well."""

    low: float | None = None
    high: float | None = None
    open: str = ""
    integer: bool = False

    def holds(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if isinstance(value, float) and math.isnan(value):
            return False
        low_open = self.open in ("low", "both")
        high_open = self.open in ("high", "both")
        if self.low is not None and (value < self.low or (low_open and value == self.low)):
            return False
        return not (self.high is not None
                    and (value > self.high or (high_open and value == self.high)))

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is None and self.high is None:
            return kind
        if self.high is None:
            return f"{kind} {'>' if self.open in ('low', 'both') else '>='} {self.low:g}"
        if self.low is None:
            return f"{kind} {'<' if self.open in ('high', 'both') else '<='} {self.high:g}"
        left = "(" if self.open in ("low", "both") else "["
        right = ")" if self.open in ("high", "both") else "]"
        return f"{kind} in {left}{self.low:g}, {self.high:g}{right}"


@dataclass(frozen=True)
class OneOf:
    """One of the listed values."""

    values: Collection

    def holds(self, value) -> bool:
        return value in self.values

    def describe(self) -> str:
        return "one of " + ", ".join(map(repr, self.values))


@dataclass(frozen=True)
class Satisfies:
    """Anything for which ``check`` is true; ``description`` says what that is."""

    check: Callable[[Any], bool]
    description: str

    def holds(self, value) -> bool:
        return bool(self.check(value))

    def describe(self) -> str:
        return self.description


@dataclass(frozen=True, kw_only=True)
class Options:
    """Base of every stage's options.

    A subclass lists its fields with a why-comment each and declares their ranges in
    ``constraints``: field name -> a list of :class:`Between`, :class:`OneOf` or
    :class:`Satisfies`, any of which may hold, plus ``None`` where ``None`` is allowed. The
    check runs once, when the value is built, so every stage, the CLI and a script refuse the
    same values with the same line (:class:`~pipeline.core.errors.OptionError`).
    """

    constraints: ClassVar[dict[str, list]] = {}

    def __post_init__(self) -> None:
        for name, allowed in self.constraints.items():
            value = getattr(self, name)
            if value is None and None in allowed:
                continue
            checks = [c for c in allowed if c is not None]
            if not any(c.holds(value) for c in checks):
                described = " or ".join(c.describe() for c in checks)
                if None in allowed:
                    described += " or unset"
                raise OptionError(name, value, described)

    def replace(self, **changes) -> Options:
        """A copy with ``changes``, checked again."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return to_plain(dataclasses.asdict(self))


class Result:
    """Base of every stage's result (a dataclass): ``to_json`` and ``write``.

    ``to_json`` is the result as plain JSON values (the default turns the dataclass's fields
    into dicts, lists, strings and numbers); ``write(out)`` writes the stage's files into the
    folder ``out`` through :mod:`pipeline.core.atomic` and returns their paths. A stage never
    writes; its caller decides where, and whether, the result lands on disk.
    """

    def to_json(self) -> dict:
        return to_plain(dataclasses.asdict(self))  # type: ignore[call-overload]

    def write(self, out: str | os.PathLike) -> list[Path]:
        raise NotImplementedError(f"{type(self).__name__} does not say how it is written")


def to_plain(value):
    """``value`` with paths as strings, tuples and sets as lists, numpy scalars as numbers."""
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()  # a numpy scalar
    if hasattr(value, "tolist"):
        return value.tolist()  # a numpy array
    return value
