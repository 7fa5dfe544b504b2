"""The family registry: which adapter answers for a backbone name.

Each family is one module with a :class:`~pipeline.models.families.base.Family` subclass, registered
here by name with the names it claims. Modules are imported on first use, so resolving a
backbone whose answers are remembered (see :mod:`pipeline.models.backbones`) imports no framework.

To add a family (open_clip, Hugging Face, ...): write ``pipeline/models/families/<family>.py`` with
a
``Family`` subclass answering its questions, and add one :func:`register_family` line below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.core.errors import BackboneError
from pipeline.models.families.base import Family, Resolution

if TYPE_CHECKING:
    from pipeline.models.backbone_spec import BackboneSpec

__all__ = ["Family", "Resolution", "family_for", "family_of", "get_family", "key_name",
           "list_families", "register_family"]


@dataclass(frozen=True)
class _Entry:
    target: str  # "module:Class" of the adapter
    claims: Callable[[str], bool] | None  # None: the fallback for names nobody else claims
    key_name: str  # the family as cache keys record it


_REGISTRY: dict[str, _Entry] = {}
_LOADED: dict[str, Family] = {}


def register_family(name: str, target: str, claims: Callable[[str], bool] | None,
                    key_name: str | None = None) -> None:
    """Register the adapter class at ``target`` (``"module:Class"``) under ``name``.

    ``claims(backbone_name)`` says whether the family answers for a name; families are asked
    in registration order, and the one registered with ``claims=None`` answers for the rest.
    ``key_name`` is the family as cache keys record it (default ``name``).
    """
    if name in _REGISTRY:
        raise ValueError(f"backbone family {name!r} is already registered")
    if claims is None and any(e.claims is None for e in _REGISTRY.values()):
        raise ValueError("only one backbone family can be the fallback")
    _REGISTRY[name] = _Entry(target, claims, key_name or name)


def get_family(name: str) -> Family:
    """The adapter registered as ``name`` (the ``family`` of a backbone spec)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone family {name!r}")
    if name not in _LOADED:
        module, _, cls = _REGISTRY[name].target.partition(":")
        adapter = getattr(importlib.import_module(module), cls)()
        _LOADED[name] = adapter
    return _LOADED[name]


def family_of(spec: BackboneSpec) -> Family:
    """The adapter that answers for ``spec``'s family: how its network is built and cut."""
    return get_family(spec.family)


def family_for(backbone: str) -> str:
    """The name of the family that answers for ``backbone``."""
    for name, entry in _REGISTRY.items():
        if entry.claims is not None and entry.claims(backbone):
            return name
    fallback = next((n for n, e in _REGISTRY.items() if e.claims is None), None)
    if fallback is None:
        raise BackboneError(f"unknown backbone {backbone!r}", backbone=backbone,
                            reason="unknown-backbone")
    return fallback


def key_name(family: str) -> str:
    """How cache keys name ``family``, without importing its adapter."""
    return _REGISTRY[family].key_name


def list_families() -> list[str]:
    return list(_REGISTRY)


# The bundled Lite0 builds timm's tf_efficientnet_lite0, and caches written before the
# adapters existed record it as timm's: its key name stays "timm" so they remain valid.
register_family("lite0", "pipeline.models.families.lite0:Lite0Family",
                lambda name: name == "efficientnet_lite0", key_name="timm")
register_family("timm", "pipeline.models.families.timm_models:TimmFamily",
                lambda name: name.startswith("timm/"))
register_family("torchvision",
                "pipeline.models.families.torchvision_models:TorchvisionFamily", None)
