"""What decides a backbone's features, as data: a name, its family, weights, preprocessing, layer.

A :class:`BackboneSpec` is a value, like timm's ``PretrainedCfg``: it imports nothing of the
families or of the feature model, so every module that only reads a spec (a cache key, a
loader's crop size) stays free of the builders. :func:`pipeline.models.backbones.resolve_backbone`
makes one; :func:`pipeline.models.backbones.build_classifier` and
:func:`~pipeline.models.backbones.build_feature_model` build networks from one, and
:func:`pipeline.models.families.family_of` gives its family's adapter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.models.preprocessing import Preprocessing
from pipeline.models.weights import Weights

__all__ = ["BackboneSpec"]


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that decides a backbone's features, resolved without building the model."""

    name: str
    family: str  # the adapter's name in pipeline.models.families
    arch: str  # the family's own model name (timm: with its tag)
    weights: Weights
    preprocessing: Preprocessing
    layer: str | None = None  # None: the input of the final classifier layer
    pool: str = "avg"
    request: dict | None = None  # the resolve_backbone arguments that rebuild this spec
    # The family as cache keys record it (the registry's key_name; None: ``family``): the
    # bundled Lite0 is keyed as timm's, as caches written before the adapters recorded it.
    family_key: str | None = None

    def key(self) -> dict:
        """The parts of a feature-cache key that this backbone decides."""
        return {
            "backbone": self.name,
            "family": self.family_key or self.family,
            "weights": self.weights.identity,
            "weights_sha256": self.weights.sha256,
            "layer": self.layer or "bottleneck",
            "pool": self.pool,
            "preprocessing": asdict(self.preprocessing),
            "image_size": self.preprocessing.crop,
        }
