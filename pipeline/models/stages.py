"""The vocabulary of a backbone's stages, which every family adapter uses to name its blocks.

Kept below :mod:`pipeline.models.families` and :mod:`pipeline.models.blocks`: the adapters build
:class:`Block` values from these helpers, and :mod:`~pipeline.models.blocks` asks the adapters
for them, so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.core.errors import BlockError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["STEM", "Block", "BlockError", "collapse", "is_under", "parameter_owners",
           "unsupported"]

_SUPPORTED = ("resnet, efficientnet, mobilenet, mnasnet, regnet, vgg, convnext, densenet "
              "and timm models")


STEM = "stem"  # the name of the layers below the first block



@dataclass(frozen=True)
class Block:
    """One stage of a backbone: the modules whose parameters and buffers form it."""

    name: str  # the stage's own module name, as `pipeline blocks` shows it
    modules: tuple[str, ...]  # qualified names as in model.named_modules(), none inside another


# --- shared by the family adapters ---------------------------------------------------------------

def unsupported(model: nn.Module) -> str:
    return f"cannot find the blocks of {type(model).__name__}; fine-tuning supports {_SUPPORTED}"


def is_under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def parameter_owners(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if _owns_parameters(module)]


def collapse(model: nn.Module, owners: Iterable[str]) -> tuple[str, ...]:
    """The fewest module names, in model order, whose parameters are exactly those of ``owners``.

    timm groups leaf modules (``blocks.0.0.conv_dw``, ...); a stage whose leaves all fall in one
    group is named once (``blocks.0``), and its parameter-free layers come with it.
    """
    wanted = set(owners)
    chosen: list[str] = []
    for name, module in model.named_modules():
        if not name or is_under(name, chosen):
            continue
        inside = {f"{name}.{sub}" if sub else name
                  for sub, child in module.named_modules() if _owns_parameters(child)}
        if inside and inside <= wanted:
            chosen.append(name)
    return tuple(chosen)
