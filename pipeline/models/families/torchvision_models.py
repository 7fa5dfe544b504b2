"""torchvision: every classification model of ``torchvision.models``, with its weights enums.

The weights enum gives the recipe (``weights.transforms()``) and the file; the blocks are each
architecture's own stages, listed in :data:`LAYOUTS` (see :mod:`pipeline.models.blocks` for the
rules).
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision
import torchvision.models as tvm
from torch import nn

from pipeline.core.errors import BackboneError, WeightsError
from pipeline.data.images import file_sha256
from pipeline.models.families.base import Family, Resolution
from pipeline.models.preprocessing import Preprocessing
from pipeline.models.stages import (
    Block,
    BlockError,
    collapse,
    is_under,
    parameter_owners,
    unsupported,
)
from pipeline.models.weights import (
    EnumWeights,
    FileWeights,
    RandomInit,
    Weights,
    WeightsRequest,
    hub_checkpoint,
    load_state_dict,
    random_init,
    read_state_dict,
    weights_file,
)


class TorchvisionFamily(Family):
    name = "torchvision"

    def names(self) -> list[str]:
        return torchvision.models.list_models(module=torchvision.models)

    def resolve(self, name: str, request: WeightsRequest, offline: bool) -> Resolution:
        try:
            enum = torchvision.models.get_model_weights(name)
        except (ValueError, KeyError):
            raise BackboneError(f"unknown backbone {name!r}", backbone=name,
                                reason="unknown-backbone") from None
        # The default member's recipe also serves random init and a user's file.
        chosen = _member(name, enum, request) if isinstance(request, EnumWeights) else enum.DEFAULT
        if isinstance(request, RandomInit):
            source = random_init(0)
        elif isinstance(request, FileWeights):
            source = weights_file(request)
        elif request.kind in ("default", "enum"):
            source = _enum_weights(name, chosen, offline)
        else:
            raise WeightsError(f"{name} has no {request.text!r} weights: torchvision weights "
                               f"are enum members ({enum.__name__}.<member>), a PATH or none")
        return Resolution(name, source, _preprocessing(chosen.transforms()))

    def build(self, spec) -> nn.Module:
        if spec.weights.identity.startswith("file:"):
            model = torchvision.models.get_model(spec.arch, weights=None)
            load_state_dict(model, read_state_dict(spec.weights.path), spec.weights.path.name)
            return model
        if not spec.weights.pretrained:
            return torchvision.models.get_model(spec.arch, weights=None)  # seeded by the caller
        # Through the enum, torchvision applies each family's key quirks (DenseNet's old names);
        # the file is already in the hub cache, so nothing is downloaded.
        return torchvision.models.get_model(spec.arch, weights=spec.weights.identity)

    def blocks(self, model: nn.Module) -> list[Block]:
        layout = next((fn for cls, fn in LAYOUTS if isinstance(model, cls)), None)
        if layout is None:
            raise BlockError(unsupported(model))
        stem, stages = layout(model)
        final = self.classifier(model)
        placed = [*stem, *(module for _, modules in stages for module in modules)]
        placed += [final[0]] if final else []
        # Every layout leaves only layers above the last stage unplaced (1x1 conv heads, norms,
        # hidden Linear layers before the classifier).
        above = [name for name in parameter_owners(model) if not is_under(name, placed)]
        blocks = [Block(name, modules) for name, modules in stages]
        top = blocks[-1]
        blocks[-1] = Block(top.name, top.modules + collapse(model, above))
        return blocks


def _member(name: str, enum, request: EnumWeights):
    known = ", ".join([w.name for w in enum] + ["DEFAULT"])
    if request.enum_class not in (None, enum.__name__):
        raise WeightsError(f"{request.enum_class} are not weights of {name}: use "
                           f"{enum.__name__}.<member>, one of {known}")
    try:
        return enum.verify(request.member)
    except KeyError:
        raise WeightsError(f"{name} has no weights {request.text!r}; known: {known}") from None


def _enum_weights(name: str, chosen, offline: bool) -> Weights:
    # torchvision's own loader downloads into the hub cache, checks the hash in the file name
    # and shows a progress bar; the state dict it returns is read again when the model is built.
    cached = hub_checkpoint(name, chosen.url, offline,
                            lambda: chosen.get_state_dict(progress=True, check_hash=True))
    return Weights(f"{type(chosen).__name__}.{chosen.name}", cached, file_sha256(cached))


def _preprocessing(transforms) -> Preprocessing:
    return Preprocessing(
        resize=int(transforms.resize_size[0]),
        crop=int(transforms.crop_size[0]),
        mean=tuple(float(m) for m in transforms.mean),
        std=tuple(float(s) for s in transforms.std),
        interpolation=transforms.interpolation.value,
    )


# --- blocks: each architecture's stages ---------------------------------------------------------
# A stage as (block name, its module names); a layout is (stem module names, stages lowest first).
_Stage = tuple[str, tuple[str, ...]]
_Layout = tuple[tuple[str, ...], list[_Stage]]


def _resnet(model: nn.Module) -> _Layout:
    return ("conv1", "bn1"), [(f"layer{i}", (f"layer{i}",)) for i in range(1, 5)]


def _feature_chain(model: nn.Module) -> _Layout:
    # features.0 is the stem conv; the last child, the 1x1 conv before pooling, is not a stage
    # and joins the top block with the other layers above the stages.
    names = [f"features.{i}" for i in range(len(model.features))]
    return (names[0],), [(name, (name,)) for name in names[1:-1]]


def _mnasnet(model: nn.Module) -> _Layout:
    # layers: the stem's convs, then the stacks (plain nn.Sequential), then the 1x1 conv head.
    names = [f"layers.{i}" for i in range(len(model.layers))]
    stacks = [type(layer) is nn.Sequential for layer in model.layers]
    first = stacks.index(True)
    return tuple(names[:first]), [(n, (n,)) for n, stack in zip(names, stacks) if stack]


def _regnet(model: nn.Module) -> _Layout:
    names = [f"trunk_output.{name}" for name, _ in model.trunk_output.named_children()]
    return ("stem",), [(name, (name,)) for name in names]


def _vgg(model: nn.Module) -> _Layout:
    stages, start = [], 0
    for i, layer in enumerate(model.features):
        if isinstance(layer, nn.MaxPool2d):
            modules = tuple(f"features.{j}" for j in range(start, i + 1))
            stages.append((f"features.{start}-{i}", modules))
            start = i + 1
    return (), stages


def _convnext(model: nn.Module) -> _Layout:
    # features: stem, stage, then (downsampling, stage) pairs.
    stages = [("features.1", ("features.1",))]
    stages += [(f"features.{i + 1}", (f"features.{i}", f"features.{i + 1}"))
               for i in range(2, len(model.features), 2)]
    return ("features.0",), stages


def _densenet(model: nn.Module) -> _Layout:
    """Dense blocks, each closed by the transition after it.

    A transition (BN, ReLU, 1x1 conv, pool) normalises and compresses the output of the dense
    block before it; torchvision builds it in the same loop step as that block, and timm's
    coarse ``group_matcher`` groups ``denseblockN`` with ``transitionN``. So the top block is
    ``denseblock4`` (with ``norm5``) and ``transition3`` is in block 3.
    """
    children = [name for name, _ in model.features.named_children()]
    first = children.index("denseblock1")
    stages: list[_Stage] = []
    for child in children[first:]:
        name = f"features.{child}"
        if child.startswith("denseblock"):
            stages.append((name, (name,)))
        elif child.startswith("transition"):
            stages[-1] = (stages[-1][0], (*stages[-1][1], name))
    return tuple(f"features.{child}" for child in children[:first]), stages


# Subclasses first would matter if one family derived from another; none does in torchvision.
LAYOUTS: tuple[tuple[type[nn.Module], Callable[[nn.Module], _Layout]], ...] = (
    (tvm.ResNet, _resnet),
    (tvm.EfficientNet, _feature_chain),
    (tvm.MobileNetV2, _feature_chain),
    (tvm.MobileNetV3, _feature_chain),
    (tvm.MNASNet, _mnasnet),
    (tvm.RegNet, _regnet),
    (tvm.VGG, _vgg),
    (tvm.ConvNeXt, _convnext),
    (tvm.DenseNet, _densenet),
)
