"""How the benchmarks print their numbers."""

from __future__ import annotations

__all__ = ["mb", "num"]


def num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
