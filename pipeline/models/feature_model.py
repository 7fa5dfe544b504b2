"""The network cut at its bottleneck (or a named layer): images in, one feature vector out."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.core.errors import BackboneError

if TYPE_CHECKING:
    from pipeline.models.backbones import BackboneSpec

# Relative tolerance of the check that the bottleneck really is the classifier's input.
_BOTTLENECK_RTOL = 1e-3


class FeatureModel(nn.Module):
    """Maps images to one feature vector each; spatial maps are pooled over height and width."""

    def __init__(self, body: nn.Module, pool: str, final_layer: nn.Module | None):
        super().__init__()
        self.body = body
        self.pool = pool
        # The classifier layer the default bottleneck feeds; kept to check and to reuse.
        self.final_layer = final_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if isinstance(out, dict):
            out = out["features"]
        if out.ndim == 4:
            out = out.amax(dim=(2, 3)) if self.pool == "max" else out.mean(dim=(2, 3))
        elif out.ndim == 3:  # token sequences (transformers): pool over tokens
            out = out.amax(dim=1) if self.pool == "max" else out.mean(dim=1)
        return out.flatten(1)


def make_feature_model(spec: BackboneSpec, model: nn.Module) -> FeatureModel:
    """Cut ``model`` at ``spec.layer``, or at the input of its final classifier layer."""
    adapter = spec.adapter
    final = adapter.classifier(model)
    if spec.layer is None:
        body = adapter.bottleneck(model)
    else:
        names = adapter.layer_names(model)
        # A module's name stands for its last node, as in torchvision's feature_extraction.
        if spec.layer not in names and not any(n.startswith(spec.layer + ".") for n in names):
            raise BackboneError(f"{spec.name} has no layer {spec.layer!r}; `pipeline layers "
                                f"{spec.name}` lists them")
        body = adapter.extractor(model, spec.layer)
    features = FeatureModel(body, spec.pool, final[1] if final else None).eval()
    if spec.layer is None:
        _check_bottleneck(spec, model, features)
    return features


@torch.inference_mode()
def _check_bottleneck(spec: BackboneSpec, model: nn.Module, features: FeatureModel) -> None:
    """Refuse a bottleneck whose features do not give the model's own logits."""
    x = torch.randn(2, 3, spec.preprocessing.crop, spec.preprocessing.crop,
                    generator=torch.Generator().manual_seed(0))
    logits, rebuilt = model(x), features.final_layer(features(x))
    scale = logits.abs().max().clamp_min(1e-6)
    if logits.shape != rebuilt.shape or (logits - rebuilt).abs().max() > _BOTTLENECK_RTOL * scale:
        raise BackboneError(f"cannot find the bottleneck of {spec.name} generically; "
                            "choose a layer with --layer (see `pipeline layers`)")
