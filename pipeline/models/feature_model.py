"""The network cut at its bottleneck (or named layers): images in, one feature vector out.

Several layers (``layer="layer2,layer3,bottleneck"``, or ``"blocks"``: every block's output
and the bottleneck) come out of one forward pass, each pooled, side by side in one vector;
:meth:`FeatureModel.layer_slices` says which columns hold which layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.core.errors import BackboneError
from pipeline.models.families import family_of

if TYPE_CHECKING:
    from pipeline.models.backbone_spec import BackboneSpec

# Relative tolerance of the check that the bottleneck really is the classifier's input.
_BOTTLENECK_RTOL = 1e-3


BOTTLENECK = "bottleneck"
# ``layer="blocks"``: the output of every block below the top one, then the bottleneck.
BLOCKS = "blocks"


def requested_layers(layer: str | None) -> list[str]:
    """The layers a ``layer`` setting names, in its order: one, or several comma-separated."""
    if layer is None:
        return [BOTTLENECK]
    return [name.strip() for name in layer.split(",") if name.strip()]


def is_multi_layer(layer: str | None) -> bool:
    names = requested_layers(layer)
    return len(names) > 1 or names == [BLOCKS]


class FeatureModel(nn.Module):
    """Maps images to one feature vector each; spatial maps are pooled over height and width.

    ``outputs``: the keys of the body's output dict to pool and put side by side (one for a
    single layer).
    """

    def __init__(self, body: nn.Module, pool: str, final_layer: nn.Module | None,
                 outputs: tuple[str, ...] = ("features",)):
        super().__init__()
        self.body = body
        self.pool = pool
        # The classifier layer the default bottleneck feeds; kept to check and to reuse.
        self.final_layer = final_layer
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if not isinstance(out, dict):
            return self._pooled(out)
        if len(self.outputs) == 1:
            return self._pooled(out[self.outputs[0]])
        return torch.cat([self._pooled(out[name]) for name in self.outputs], dim=1)

    def _pooled(self, out: torch.Tensor) -> torch.Tensor:
        if out.ndim == 4:
            out = out.amax(dim=(2, 3)) if self.pool == "max" else out.mean(dim=(2, 3))
        elif out.ndim == 3:  # token sequences (transformers): pool over tokens
            out = out.amax(dim=1) if self.pool == "max" else out.mean(dim=1)
        return out.flatten(1)

    @torch.inference_mode()
    def layer_slices(self, crop: int) -> list[tuple[str, int, int]]:
        """``(layer, first column, column after the last)`` of each layer in the features."""
        device = next(self.parameters()).device
        out = self.body(torch.zeros(1, 3, crop, crop, device=device))
        if not isinstance(out, dict) or len(self.outputs) == 1:
            return [(self.outputs[0], 0, int(self.forward(
                torch.zeros(1, 3, crop, crop, device=device)).shape[1]))]
        slices, start = [], 0
        for name in self.outputs:
            width = int(self._pooled(out[name]).shape[1])
            slices.append((name, start, start + width))
            start += width
        return slices


def make_feature_model(spec: BackboneSpec, model: nn.Module) -> FeatureModel:
    """Cut ``model`` at ``spec.layer``, or at the input of its final classifier layer."""
    adapter = family_of(spec)
    final = adapter.classifier(model)
    if is_multi_layer(spec.layer):
        return _multi_layer_model(spec, model, final)
    if spec.layer is None:
        body = adapter.bottleneck(model)
    else:
        names = adapter.layer_names(model)
        # A module's name stands for its last node, as in torchvision's feature_extraction.
        if spec.layer not in names and not any(n.startswith(spec.layer + ".") for n in names):
            raise BackboneError(f"{spec.name} has no layer {spec.layer!r}",
                                backbone=spec.name, layer=spec.layer, reason="unknown-layer")
        body = adapter.extractor(model, spec.layer)
    features = FeatureModel(body, spec.pool, final[1] if final else None).eval()
    if spec.layer is None:
        _check_bottleneck(spec, model, features)
    return features


def _multi_layer_model(spec: BackboneSpec, model: nn.Module, final) -> FeatureModel:
    """Every requested layer from one pass: one graph cut with a node per layer."""
    adapter = family_of(spec)
    names = requested_layers(spec.layer)
    if names == [BLOCKS]:
        names = [block.name for block in adapter.blocks(model)[:-1]] + [BOTTLENECK]
    graph = adapter.layer_names(model)
    nodes = {}
    for name in names:
        if name == BOTTLENECK:
            if final is None:
                raise BackboneError(f"{spec.name} has no final Linear layer, so no bottleneck; "
                                    "name its layers instead")
            nodes[name] = graph[graph.index(final[0]) - 1]
        elif name in graph or any(n.startswith(name + ".") for n in graph):
            nodes[name] = name
        else:
            raise BackboneError(f"{spec.name} has no layer {name!r}", backbone=spec.name,
                                layer=name, reason="unknown-layer")
    if len(set(nodes.values())) != len(names):
        raise BackboneError(f"layers {', '.join(names)} name the same node twice")
    body = adapter.extractor_of(model, {node: name for name, node in nodes.items()})
    features = FeatureModel(body, spec.pool, final[1] if final else None, tuple(names)).eval()
    if BOTTLENECK in names:
        _check_bottleneck(spec, model, features, names.index(BOTTLENECK))
    return features


@torch.inference_mode()
def _check_bottleneck(spec: BackboneSpec, model: nn.Module, features: FeatureModel,
                      group: int = 0) -> None:
    """Refuse a bottleneck whose features do not give the model's own logits (``group``: which
    of several layers is the bottleneck)."""
    x = torch.randn(2, 3, spec.preprocessing.crop, spec.preprocessing.crop,
                    generator=torch.Generator().manual_seed(0))
    name, start, stop = features.layer_slices(spec.preprocessing.crop)[group]
    logits, rebuilt = model(x), features.final_layer(features(x)[:, start:stop])
    scale = logits.abs().max().clamp_min(1e-6)
    if logits.shape != rebuilt.shape or (logits - rebuilt).abs().max() > _BOTTLENECK_RTOL * scale:
        raise BackboneError(f"cannot find the bottleneck of {spec.name} generically",
                            backbone=spec.name, reason="no-bottleneck")
