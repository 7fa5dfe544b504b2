"""The ordered blocks (stages) of a backbone, lowest first, for unfreezing the top K in fine-tuning.

A block is one of the model's own stages, named by the modules that hold its parameters and
buffers. The rules, per family:

torchvision
    - ResNet, ResNeXt, Wide ResNet: ``layer1`` .. ``layer4``.
    - EfficientNet (v1, v2), MobileNet v2 and v3: each child of ``features`` after
      ``features.0``; these are stages in EfficientNet (7 in b0) but single inverted-residual
      blocks in MobileNet (11 in v3 small, 17 in v2).
    - MNASNet: the six stacks in ``layers``.
    - RegNet: ``trunk_output.block1`` .. ``block4``.
    - VGG: the layers of ``features`` up to and including each MaxPool2d (5 blocks).
    - ConvNeXt: the four stages ``features.1, .3, .5, .7``; each downsampling layer
      (``features.2, .4, .6``) opens the stage after it, as timm's ``stages.N.downsample`` does.
    - DenseNet: ``denseblock1`` .. ``denseblock4``; each transition closes the dense block
      before it (see :func:`_densenet`).
timm
    timm's own contract: the groups of ``model.group_matcher(coarse=True)``, less the stem
    group; for ``tf_efficientnet_lite0`` (our ``efficientnet_lite0``) the 7 stages
    ``blocks.0`` .. ``blocks.6``.

The stem (the convolutions before the first stage) is in no block: it stays frozen even when
every block is unfrozen, as its edge and colour filters transfer across datasets; VGG has no
stem. Layers with parameters between the last stage and the final classifier (the last 1x1 conv
of EfficientNet and MobileNet, DenseNet's ``norm5``, ConvNeXt's LayerNorm, the hidden Linear
layers of VGG and MobileNet v3, timm's ``conv_head``) join the top block: they lie above every
stage, so unfreezing any block must unfreeze them too. The final classifier Linear is in no
block; the head is trained separately.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torchvision.models as tvm
from torch import nn

from pipeline.backbones import _final_linear
from pipeline.errors import PipelineError

__all__ = ["Block", "BlockError", "block_parameters", "describe_blocks", "find_blocks",
           "freeze_below", "parse_unfreeze"]

_SUPPORTED = ("resnet, efficientnet, mobilenet, mnasnet, regnet, vgg, convnext, densenet "
              "and timm models")

# A stage as (block name, its module names); a layout is (stem module names, stages lowest first).
_Stage = tuple[str, tuple[str, ...]]
_Layout = tuple[tuple[str, ...], list[_Stage]]


class BlockError(PipelineError):
    """A backbone whose blocks cannot be found, or a number of blocks it does not have."""


@dataclass(frozen=True)
class Block:
    """One stage of a backbone: the modules whose parameters and buffers form it."""

    name: str  # the stage's own module name, as `pipeline blocks` shows it
    modules: tuple[str, ...]  # qualified names as in model.named_modules(), none inside another


# --- torchvision layouts ------------------------------------------------------------------------

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
_TORCHVISION_LAYOUTS: tuple[tuple[type[nn.Module], Callable[[nn.Module], _Layout]], ...] = (
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


def _torchvision_blocks(model: nn.Module) -> list[Block]:
    layout = next((fn for cls, fn in _TORCHVISION_LAYOUTS if isinstance(model, cls)), None)
    if layout is None:
        raise BlockError(_unsupported(model))
    stem, stages = layout(model)
    final = _final_linear(model)
    placed = [*stem, *(module for _, modules in stages for module in modules)]
    placed += [final[0]] if final else []
    # Every layout leaves only layers above the last stage unplaced (1x1 conv heads, norms,
    # hidden Linear layers before the classifier).
    above = [name for name in _param_owners(model) if not _under(name, placed)]
    blocks = [Block(name, modules) for name, modules in stages]
    top = blocks[-1]
    blocks[-1] = Block(top.name, top.modules + _collapse(model, above))
    return blocks


# --- timm ---------------------------------------------------------------------------------------

def _timm_blocks(model: nn.Module) -> list[Block]:
    from timm.models import group_modules

    try:
        matcher = model.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError):
        raise BlockError(_unsupported(model)) from None
    # Module name (of those holding parameters) -> group ordinal, stem first, unmatched last.
    ordinal = group_modules(model, matcher, reverse=True)
    classifier = _module_name(model, model.get_classifier())
    head = ordinal.get(classifier) if classifier is not None else None
    stem = _timm_stem(matcher, ordinal)
    groups: dict[int, list[str]] = {}
    for name, group in ordinal.items():
        if group != stem and not (classifier and _under(name, [classifier])):
            groups.setdefault(group, []).append(name)
    # The classifier's group is timm's "unmatched" one (head norms, pre-logits layers): those
    # sit above the last stage, so they join the top block.
    above = groups.pop(head, []) if head is not None else []
    stages = [groups[group] for group in sorted(groups)]
    if not stages:
        raise BlockError(_unsupported(model))
    stages[-1] += above
    return [Block(modules[0], modules) for modules in (_collapse(model, s) for s in stages)]


def _timm_stem(matcher: dict | Callable, ordinal: dict[str, int]) -> int | None:
    """The stem's group ordinal, or None for a model whose matcher names no stem."""
    if callable(matcher):
        return 0  # timm's callable matchers give the stem ordinal 0 (cait, inception)
    spec = matcher.get("stem")
    if spec is None:
        return None
    # A dict entry is a regex, or (regex, suffix) pairs; timm matches with re.match.
    patterns = [spec] if isinstance(spec, str) else [pair[0] for pair in spec]
    stem = {ordinal[name] for name in ordinal if any(re.match(p, name) for p in patterns)}
    return min(stem) if stem else None


# --- shared -------------------------------------------------------------------------------------

def _unsupported(model: nn.Module) -> str:
    return f"cannot find the blocks of {type(model).__name__}; fine-tuning supports {_SUPPORTED}"


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _param_owners(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if _owns_parameters(module)]


def _module_name(model: nn.Module, target: nn.Module) -> str | None:
    return next((name for name, module in model.named_modules() if module is target), None)


def _collapse(model: nn.Module, owners: Iterable[str]) -> tuple[str, ...]:
    """The fewest module names, in model order, whose parameters are exactly those of ``owners``.

    timm groups leaf modules (``blocks.0.0.conv_dw``, ...); a stage whose leaves all fall in one
    group is named once (``blocks.0``), and its parameter-free layers come with it.
    """
    wanted = set(owners)
    chosen: list[str] = []
    for name, module in model.named_modules():
        if not name or _under(name, chosen):
            continue
        inside = {f"{name}.{sub}" if sub else name
                  for sub, child in module.named_modules() if _owns_parameters(child)}
        if inside and inside <= wanted:
            chosen.append(name)
    return tuple(chosen)


# --- public -------------------------------------------------------------------------------------

def find_blocks(model: nn.Module, family: str) -> list[Block]:
    """The blocks of a backbone, in forward order, lowest first.

    Parameters
    ----------
    model
        The whole network, as ``BackboneSpec.build_classifier()`` returns it.
    family
        ``"torchvision"`` or ``"timm"``, the ``BackboneSpec.family``.

    Returns
    -------
    list of Block
        Disjoint blocks; the stem and the final classifier are in none of them.

    Raises
    ------
    BlockError
        For a model whose stages this module does not know how to find.
    """
    if family == "timm":
        return _timm_blocks(model)
    if family == "torchvision":
        return _torchvision_blocks(model)
    raise ValueError(f"unknown backbone family {family!r}")


def block_parameters(model: nn.Module, blocks: list[Block]) -> list[list[nn.Parameter]]:
    """The parameters of each block, in the order of ``blocks``.

    A parameter shared by two blocks (tied weights) is listed with the first of them only, so
    no parameter is ever in two lists.
    """
    seen: set[int] = set()
    result = []
    for block in blocks:
        params = []
        for name in block.modules:
            for param in model.get_submodule(name).parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    params.append(param)
        result.append(params)
    return result


def parse_unfreeze(value: str | int, n_blocks: int, *, backbone: str | None = None) -> int:
    """The number of top blocks to unfreeze: an integer from 0 to ``n_blocks``, or ``"all"``.

    Parameters
    ----------
    value
        An int, its text (``"2"``), or ``"all"`` for every block.
    n_blocks
        How many blocks the backbone has.
    backbone
        The backbone's name, for the error message.

    Raises
    ------
    BlockError
        For text that is no number, or a number outside 0 .. ``n_blocks``.
    """
    if isinstance(value, str) and value.strip().lower() == "all":
        return n_blocks
    try:
        k = int(value)
    except ValueError:
        raise BlockError(f"unfreeze takes a number of blocks or 'all', not {value!r}") from None
    if not 0 <= k <= n_blocks:
        raise BlockError(
            f"cannot unfreeze {k} blocks: {backbone or 'the backbone'} has {n_blocks} blocks "
            f"(choose 0 to {n_blocks} or all); `pipeline blocks {backbone or 'BACKBONE'}` "
            "lists them")
    return k


def freeze_below(model: nn.Module, family: str, k: str | int,
                 head: nn.Module | None = None) -> list[Block]:
    """Freeze every parameter of ``model`` except those of its top ``k`` blocks and of ``head``.

    Only ``requires_grad`` changes. Buffers (BatchNorm running statistics) are the training
    loop's concern: it keeps the BatchNorm layers in eval mode so that their statistics stay
    those of the pretrained weights.

    Parameters
    ----------
    model
        The whole network.
    family
        ``"torchvision"`` or ``"timm"``.
    k
        How many blocks to unfreeze from the top, as :func:`parse_unfreeze` accepts it; 0
        trains the head alone.
    head
        The new classifier module, trained whatever ``k`` is.

    Returns
    -------
    list of Block
        The unfrozen blocks, lowest first.
    """
    blocks = find_blocks(model, family)
    k = parse_unfreeze(k, len(blocks))
    unfrozen = blocks[len(blocks) - k:]  # not blocks[-k:], which is every block when k is 0
    model.requires_grad_(False)
    for params in block_parameters(model, unfrozen):
        for param in params:
            param.requires_grad_(True)
    if head is not None:
        head.requires_grad_(True)
    return unfrozen


def describe_blocks(model: nn.Module, family: str) -> list[dict]:
    """One row per block, lowest first, for ``pipeline blocks BACKBONE``.

    Returns
    -------
    list of dict
        ``index`` (1 is the lowest block), ``name``, ``modules`` (how many module names form
        the block) and ``parameters`` (how many scalars they hold).
    """
    blocks = find_blocks(model, family)
    return [
        {"index": i, "name": block.name, "modules": len(block.modules),
         "parameters": sum(p.numel() for p in params)}
        for i, (block, params) in enumerate(zip(blocks, block_parameters(model, blocks)), start=1)
    ]
