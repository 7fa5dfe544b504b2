"""The ordered blocks (stages) of a backbone, lowest first, for unfreezing the top K in fine-tuning.

A block is one of the model's own stages, named by the modules that hold its parameters and
buffers. Each family adapter (:mod:`pipeline.models.families`) finds its own blocks; this module
holds
what is common to all: the block type, freezing, and the ``--unfreeze`` count. The rules, per
family:

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
      before it (see ``pipeline.models.families.torchvision_models``).
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

from typing import TYPE_CHECKING

from pipeline.models.stages import STEM, Block, BlockError, is_under, parameter_owners

if TYPE_CHECKING:
    from torch import nn

__all__ = ["STEM", "Block", "BlockError", "block_parameters", "describe_blocks", "describe_layers",
           "find_blocks", "freeze_below", "parameterised_layers", "parse_layers",
           "parse_unfreeze", "stem", "unfreeze_depth"]


# --- public -------------------------------------------------------------------------------------

def find_blocks(model: nn.Module, family: str) -> list[Block]:
    """The blocks of a backbone, in forward order, lowest first.

    Parameters
    ----------
    model
        The whole network, as :func:`pipeline.models.backbones.build_classifier` returns it.
    family
        The ``BackboneSpec.family`` (a name registered in :mod:`pipeline.models.families`).

    Returns
    -------
    list of Block
        Disjoint blocks; the stem and the final classifier are in none of them.

    Raises
    ------
    BlockError
        For a model whose stages this module does not know how to find.
    """
    from pipeline.models.families import get_family

    return get_family(family).blocks(model)


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
            f"(choose 0 to {n_blocks} or all)", backbone=backbone, requested=k,
            available=n_blocks, reason="too-many-blocks")
    return k


def parse_layers(value: str | int) -> int | None:
    """The number of layers in an ``--unfreeze`` value counted in layers (``"15L"``), or None
    for a count of blocks or ``"all"``."""
    if (not isinstance(value, str) or value.strip().lower() == "all"
            or not value.strip().upper().endswith("L")):
        return None
    try:
        n = int(value.strip()[:-1])
    except ValueError:
        raise BlockError(f"unfreeze takes a number of blocks, of layers (15L) or 'all', "
                         f"not {value!r}") from None
    if n < 1:
        raise BlockError(f"unfreeze {value!r}: count at least one layer")
    return n


def parameterised_layers(model: nn.Module, head: nn.Module | None = None) -> list[str]:
    """The layers with parameters of their own (convolutions, norms, linear layers), in model
    order, lowest first, without ``head``: what ``--unfreeze 15L`` counts from the top, as
    Keras users count the trainable layers of ``model.layers[-15:]`` (Keras also lists layers
    without weights, activations and pooling, which train nothing and are not counted here)."""
    skip = {name for name, module in model.named_modules() if module is head}
    return [name for name in parameter_owners(model) if name and not is_under(name, skip)]


def _top_layers(model: nn.Module, n: int, head: nn.Module | None) -> list[str]:
    layers = parameterised_layers(model, head)
    if n > len(layers):
        raise BlockError(f"cannot unfreeze {n} layers: the backbone has {len(layers)} layers "
                         "with parameters below its head", backbone=None, requested=n,
                         available=len(layers), reason="too-many-layers")
    return layers[len(layers) - n:]


def stem(model: nn.Module, family: str, head: nn.Module | None = None) -> Block:
    """The layers with parameters below the first block (in no block), as one block: what
    only a from-scratch run trains."""
    blocks = find_blocks(model, family)
    inside = [name for block in blocks for name in block.modules]
    return Block(STEM, tuple(name for name in parameterised_layers(model, head)
                             if not is_under(name, inside)))


def unfreeze_depth(model: nn.Module, family: str, k: str | int,
                   head: nn.Module | None = None) -> int:
    """How many top blocks hold everything ``--unfreeze k`` trains: ``k`` for a count of
    blocks; for layers, the blocks from the one holding the lowest trained layer up (one more
    than the blocks when that layer is in the stem). The input of the lowest of them is what
    cached activations store."""
    blocks = find_blocks(model, family)
    n = parse_layers(k)
    if n is None:
        return parse_unfreeze(k, len(blocks))
    trained = _top_layers(model, n, head)
    # Layers above the last stage belong to the top block: a layer in no block is the stem's.
    owner = [i for i, block in enumerate(blocks) if is_under(trained[0], block.modules)]
    return len(blocks) - owner[0] if owner else len(blocks) + 1


def freeze_below(model: nn.Module, family: str, k: str | int,
                 head: nn.Module | None = None) -> list[Block]:
    """Freeze every parameter of ``model`` except those of its top ``k`` blocks and of ``head``.

    ``k`` counted in layers (``"15L"``) trains the top 15 of :func:`parameterised_layers`
    instead, which may start inside a block or reach into the stem; they are returned as one
    block named ``top 15 layers``.

    Only ``requires_grad`` changes. Buffers (BatchNorm running statistics) are the training
    loop's concern: it keeps the BatchNorm layers in eval mode so that their statistics stay
    those of the pretrained weights.

    Parameters
    ----------
    model
        The whole network.
    family
        The ``BackboneSpec.family``.
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
    n = parse_layers(k)
    if n is None:
        k = parse_unfreeze(k, len(blocks))
        unfrozen = blocks[len(blocks) - k:]  # not blocks[-k:], which is every block when k is 0
    else:
        unfrozen = [Block(f"top {n} layers", tuple(_top_layers(model, n, head)))]
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


def describe_layers(model: nn.Module, family: str, head: nn.Module | None = None) -> list[dict]:
    """One row per layer with parameters, topmost first, for ``pipeline blocks --layers``:
    ``from_top`` (what ``--unfreeze NL`` counts), ``name``, ``type``, ``parameters`` and the
    ``block`` it belongs to (``stem`` below the first block)."""
    blocks = find_blocks(model, family)
    rows = []
    for i, name in enumerate(reversed(parameterised_layers(model, head)), start=1):
        module = model.get_submodule(name)
        block = next((b.name for b in blocks if is_under(name, b.modules)), "stem")
        rows.append({"from_top": i, "name": name, "type": type(module).__name__,
                     "parameters": sum(p.numel() for p in module.parameters(recurse=False)),
                     "block": block})
    return rows
