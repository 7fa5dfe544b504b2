"""The questions every backbone family answers, with the answers most families share.

A family adapter turns a backbone name and a weights request into weights and preprocessing
(without building anything), builds the network, and knows its anatomy: the final classifier,
the bottleneck (the classifier's input), named layers and the ordered blocks that fine-tuning
unfreezes. Nothing outside an adapter asks which family a model belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from pipeline.core.errors import BackboneError

if TYPE_CHECKING:  # annotations only: the registry imports this module without torch
    from torch import nn

    from pipeline.models.backbone_spec import BackboneSpec
    from pipeline.models.preprocessing import Preprocessing
    from pipeline.models.stages import Block
    from pipeline.models.weights import Weights, WeightsRequest


@dataclass(frozen=True)
class Resolution:
    """What a family reads from a name and a weights request, before any model is built."""

    arch: str  # the family's own model name (timm: with the pretrained tag spelled out)
    weights: Weights
    preprocessing: Preprocessing


class Family:
    """Base of the family adapters; subclass it and register it in
    :mod:`pipeline.models.families`."""

    name: ClassVar[str] = ""

    def names(self) -> list[str]:
        """Backbone names to list in ``pipeline backbones``."""
        return []

    def resolve(self, name: str, request: WeightsRequest, offline: bool) -> Resolution:
        """Weights (fetched if allowed, so their checksum is known) and preprocessing."""
        raise NotImplementedError

    def build(self, spec: BackboneSpec) -> nn.Module:
        """The whole network with ``spec.weights`` loaded (random init is seeded by the caller)."""
        raise NotImplementedError

    def classifier(self, model: nn.Module) -> tuple[str, nn.Module] | None:
        """The final classifier layer and its module name; by default the last ``nn.Linear``."""
        from torch import nn

        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        return linears[-1] if linears else None

    def replace_classifier(self, model: nn.Module, n_classes: int) -> nn.Linear:
        """Swap the final classifier for a new ``n_classes`` one, and return it."""
        from torch import nn

        found = self.classifier(model)
        if found is None:
            raise BackboneError(f"{type(model).__name__} has no final Linear layer to replace")
        name, old = found
        parent, _, attr = name.rpartition(".")
        head = nn.Linear(old.in_features, n_classes)
        setattr(model.get_submodule(parent) if parent else model, attr, head)
        return head

    def layer_names(self, model: nn.Module) -> list[str]:
        """Graph node names, in execution order, that ``layer`` accepts."""
        from torchvision.models import feature_extraction

        return feature_extraction.get_graph_node_names(model)[1]

    def extractor(self, model: nn.Module, node: str) -> nn.Module:
        """A module mapping images to the output of graph node ``node`` (as ``{"features": x}``)."""
        from torchvision.models import feature_extraction

        return feature_extraction.create_feature_extractor(model, return_nodes={node: "features"})

    def extractor_of(self, model: nn.Module, nodes: dict[str, str]) -> nn.Module:
        """A module mapping images to the outputs of several graph nodes in one pass, as a
        dict ``{nodes[node]: output}``."""
        from torchvision.models import feature_extraction

        return feature_extraction.create_feature_extractor(model, return_nodes=nodes)

    def bottleneck(self, model: nn.Module) -> nn.Module:
        """A module mapping images to the classifier's input; by default the graph node just
        before the final classifier, which the feature model checks on every build."""
        found = self.classifier(model)
        if found is None:
            raise BackboneError(f"{type(model).__name__} has no final Linear layer to take the "
                                "input of", backbone=None, reason="no-bottleneck")
        names = self.layer_names(model)
        return self.extractor(model, names[names.index(found[0]) - 1])

    def blocks(self, model: nn.Module) -> list[Block]:
        """The stages fine-tuning unfreezes, lowest first (see :mod:`pipeline.models.blocks`)."""
        raise NotImplementedError

    def folded_norm(self, norm: nn.Module) -> nn.Module | None:
        """What runs in place of a BatchNorm layer once its scale and shift are folded into
        the convolution before it (:mod:`pipeline.models.engines`); None: leave this layer alone.

        By default a plain ``nn.BatchNorm2d`` becomes the identity; a family whose norm layers
        do more (timm's ``BatchNormAct2d`` also applies its activation) says what remains.
        """
        from torch import nn

        return nn.Identity() if type(norm) is nn.BatchNorm2d else None

    def fixed_size(self, module: nn.Module, input_shape: tuple[int, ...]) -> nn.Module | None:
        """``module`` for inputs of this one ``input_shape``, where it recomputes per call what
        the shape decides (TensorFlow's "same" padding); None: ``module`` as it is."""
        return None
