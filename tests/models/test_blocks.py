"""Blocks: each supported family splits into its own stages, lowest first, for fine-tuning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.cli.messages import one_line
from pipeline.models.backbones import build_classifier, resolve_backbone
from pipeline.models.blocks import (
    Block,
    BlockError,
    block_parameters,
    describe_blocks,
    describe_layers,
    find_blocks,
    freeze_below,
    parameterised_layers,
    parse_layers,
    parse_unfreeze,
    unfreeze_depth,
)
from pipeline.models.families import get_family

# Block counts by the rules in pipeline/models/blocks.py: EfficientNet b0 has 7 stages
# (features.1-7,
# features.8 joins the top); MobileNet v3 small has 11 inverted-residual blocks (features.1-11).
EXPECTED_BLOCKS = {
    "resnet18": 4,
    "vgg11": 5,
    "mobilenet_v3_small": 11,
    "efficientnet_b0": 7,
    "convnext_tiny": 4,
    "densenet121": 4,
    "regnet_y_400mf": 4,
    "efficientnet_lite0": 7,
}
NAMES = list(EXPECTED_BLOCKS)


@pytest.fixture(scope="module")
def network():
    """Builds each random-init network once per module (vgg11 alone takes seconds)."""
    built: dict[str, tuple[str, nn.Module]] = {}

    def build(name: str) -> tuple[str, nn.Module]:
        if name not in built:
            spec = resolve_backbone(name, "none")
            built[name] = (spec.family, build_classifier(spec))
        return built[name]

    return build


def classifier(model: nn.Module, family: str) -> nn.Module:
    return get_family(family).classifier(model)[1]


def parameter_names(model: nn.Module, block: Block) -> set[str]:
    """Qualified parameter names, read from the module names alone (not block_parameters)."""
    return {f"{m}.{p}" for m in block.modules
            for p, _ in model.get_submodule(m).named_parameters()}


@pytest.mark.parametrize("name", NAMES)
def test_block_count(network, name):
    family, model = network(name)
    assert len(find_blocks(model, family)) == EXPECTED_BLOCKS[name]


@pytest.mark.parametrize("name", NAMES)
def test_blocks_are_disjoint_hold_parameters_and_leave_out_the_classifier(network, name):
    family, model = network(name)
    blocks = find_blocks(model, family)
    named = [parameter_names(model, block) for block in blocks]
    assert all(named)
    assert len(set().union(*named)) == sum(len(n) for n in named)
    params = block_parameters(model, blocks)
    assert [len(p) for p in params] == [len(n) for n in named]
    in_blocks = {id(p) for group in params for p in group}
    assert not in_blocks & {id(p) for p in classifier(model, family).parameters()}


@pytest.mark.parametrize("name", NAMES)
def test_blocks_run_in_forward_order(network, name):
    family, model = network(name)
    blocks = find_blocks(model, family)
    first_call: dict[int, int] = {}

    def hook(i):
        def record(module, args):
            first_call.setdefault(i, len(first_call))  # returns None: the input stays as is

        return record

    handles = [model.get_submodule(b.modules[0]).register_forward_pre_hook(hook(i))
               for i, b in enumerate(blocks)]
    try:
        with torch.inference_mode():
            model(torch.randn(1, 3, 32, 32))
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(first_call, key=first_call.get) == list(range(len(blocks)))


@pytest.mark.parametrize(("name", "index", "module"), [
    ("resnet18", -1, "layer4"),
    ("vgg11", 0, "features.2"),  # the first MaxPool2d closes block 1
    ("efficientnet_b0", -1, "features.8"),  # the last 1x1 conv joins the top block
    ("mobilenet_v3_small", -1, "classifier.0"),  # the hidden Linear too
    ("convnext_tiny", 1, "features.2"),  # downsampling opens the stage after it
    ("convnext_tiny", -1, "classifier.0"),  # the LayerNorm2d before the Linear
    ("densenet121", 0, "features.transition1"),  # a transition closes the block before it
    ("densenet121", -1, "features.norm5"),
    ("efficientnet_lite0", 0, "blocks.0"),
    ("efficientnet_lite0", -1, "conv_head"),
    ("efficientnet_lite0", -1, "bn2"),
])
def test_layers_fall_in_the_documented_block(network, name, index, module):
    family, model = network(name)
    assert module in find_blocks(model, family)[index].modules


@pytest.mark.parametrize(("name", "stem"), [
    ("resnet18", ["conv1", "bn1"]),
    ("efficientnet_b0", ["features.0"]),
    ("regnet_y_400mf", ["stem"]),
    ("efficientnet_lite0", ["conv_stem", "bn1"]),
])
def test_stem_is_in_no_block(network, name, stem):
    family, model = network(name)
    modules = [m for block in find_blocks(model, family) for m in block.modules]
    assert not set(stem) & set(modules)


def test_lite0_blocks_are_timm_stages(network):
    family, model = network("efficientnet_lite0")
    assert [b.name for b in find_blocks(model, family)] == [f"blocks.{i}" for i in range(7)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [0, 1, "all"])
def test_freeze_below_trains_the_top_blocks_and_the_head(network, name, k):
    family, model = network(name)
    head = classifier(model, family)
    blocks = find_blocks(model, family)
    top = blocks[len(blocks) - 1:] if k == 1 else blocks if k == "all" else []
    assert freeze_below(model, family, k, head=head) == top
    head_names = {n for n, p in model.named_parameters() if any(p is h for h in head.parameters())}
    expected = set().union(head_names, *(parameter_names(model, b) for b in top))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert head_names <= trainable


def test_freeze_below_without_head_freezes_everything_at_zero(network):
    family, model = network("resnet18")
    assert freeze_below(model, family, 0) == []
    assert not any(p.requires_grad for p in model.parameters())


def test_freeze_below_refuses_too_many_blocks(network):
    family, model = network("resnet18")
    with pytest.raises(BlockError, match="has 4 blocks"):
        freeze_below(model, family, 5)


def test_describe_blocks_counts_parameters(network):
    family, model = network("resnet18")
    rows = describe_blocks(model, family)
    assert [r["index"] for r in rows] == [1, 2, 3, 4]
    assert [r["name"] for r in rows] == ["layer1", "layer2", "layer3", "layer4"]
    assert all(r["modules"] == 1 for r in rows)
    below_or_head = [model.conv1, model.bn1, model.fc]
    outside = sum(p.numel() for m in below_or_head for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert sum(r["parameters"] for r in rows) == total - outside


@pytest.mark.parametrize(("value", "expected"), [("all", 4), ("ALL", 4), (0, 0), (3, 3), ("2", 2),
                                                 (4, 4)])
def test_parse_unfreeze_accepts_counts_and_all(value, expected):
    assert parse_unfreeze(value, 4) == expected


@pytest.mark.parametrize("value", [5, -1, "7", "-2"])
def test_parse_unfreeze_refuses_counts_out_of_range(value):
    with pytest.raises(BlockError, match="has 4 blocks") as err:
        parse_unfreeze(value, 4)
    assert "pipeline" not in str(err.value)  # the library names no command
    assert (err.value.requested, err.value.available) == (int(value), 4)
    assert "`pipeline blocks BACKBONE` lists them" in one_line(err.value)  # the CLI does
    assert "\n" not in one_line(err.value)


def test_parse_unfreeze_names_the_backbone():
    with pytest.raises(BlockError, match=r"resnet18 has 4 blocks") as err:
        parse_unfreeze(9, 4, backbone="resnet18")
    assert err.value.backbone == "resnet18"
    assert one_line(err.value).endswith("; `pipeline blocks resnet18` lists them")


def test_parse_unfreeze_refuses_text():
    with pytest.raises(BlockError, match="number of blocks or 'all'"):
        parse_unfreeze("top", 4)


def test_unknown_layout_is_a_user_error():
    model = build_classifier(resolve_backbone("squeezenet1_0", "none"))
    with pytest.raises(BlockError, match="cannot find the blocks of SqueezeNet; fine-tuning"):
        find_blocks(model, "torchvision")


def test_unknown_family_is_a_bug(network):
    _, model = network("resnet18")
    with pytest.raises(ValueError, match="unknown backbone family"):
        find_blocks(model, "keras")


def _resnet18():
    spec = resolve_backbone("resnet18", "none")
    return spec, build_classifier(spec)


def test_layers_are_counted_by_hand_on_resnet18():
    _, model = _resnet18()
    layers = parameterised_layers(model, model.fc)
    # stem conv1 + bn1, then 4 stages x 2 basic blocks x (conv1, bn1, conv2, bn2), plus the
    # downsample conv and bn of layer2.0, layer3.0 and layer4.0; fc is the head: 2+32+6 = 40
    assert len(layers) == 40
    assert layers[:2] == ["conv1", "bn1"] and layers[-1] == "layer4.1.bn2" and "fc" not in layers
    assert layers[-6:] == ["layer4.0.downsample.0", "layer4.0.downsample.1", "layer4.1.conv1",
                           "layer4.1.bn1", "layer4.1.conv2", "layer4.1.bn2"]


def test_a_hand_built_sequence_counts_layers_with_parameters_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Dropout()),
                          nn.Flatten(), nn.Linear(4, 2))
    assert parameterised_layers(model) == ["0", "1", "4.0", "6"]
    assert parameterised_layers(model, model[6]) == ["0", "1", "4.0"]


def test_layer_counts_freeze_exactly_the_top_layers_and_give_the_covering_depth():
    spec, model = _resnet18()
    unfrozen = freeze_below(model, spec.family, "6L", model.fc)
    trained = {name.rsplit(".", 1)[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {"layer4.0.downsample.0", "layer4.0.downsample.1", "layer4.1.conv1",
                       "layer4.1.bn1", "layer4.1.conv2", "layer4.1.bn2", "fc"}
    assert unfrozen[0].name == "top 6 layers"
    assert unfreeze_depth(model, spec.family, "6L", model.fc) == 1  # all inside layer4
    assert unfreeze_depth(model, spec.family, "15L", model.fc) == 2  # reaches into layer3
    assert unfreeze_depth(model, spec.family, "39L", model.fc) == 5  # bn1 of the stem
    assert unfreeze_depth(model, spec.family, 3, model.fc) == 3
    with pytest.raises(BlockError, match="has 40 layers"):
        freeze_below(model, spec.family, "41L", model.fc)


@pytest.mark.parametrize(("text", "layers"), [("15L", 15), ("15l", 15), ("2", None),
                                              ("all", None), (3, None)])
def test_parse_layers(text, layers):
    assert parse_layers(text) == layers


@pytest.mark.parametrize("text", ["L", "xL", "0L"])
def test_bad_layer_counts_are_refused(text):
    with pytest.raises(BlockError):
        parse_layers(text)


def test_describe_layers_lists_them_topmost_first_with_their_block():
    spec, model = _resnet18()
    rows = describe_layers(model, spec.family, model.fc)
    assert [r["from_top"] for r in rows] == list(range(1, 41))
    assert (rows[0]["name"], rows[0]["block"]) == ("layer4.1.bn2", "layer4")
    assert (rows[-1]["name"], rows[-1]["block"], rows[-1]["type"]) == ("conv1", "stem", "Conv2d")
    assert rows[-1]["parameters"] == 64 * 3 * 7 * 7


def test_the_blocks_command_lists_layers_and_the_finetune_command_parses_them(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli.main import main

    listed = CliRunner().invoke(main, ["blocks", "resnet18", "--layers"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert len(lines) == 2 + 40 and "| 1 | layer4.1.bn2 | BatchNorm2d |" in lines[2]
    refused = CliRunner().invoke(main, ["finetune", str(tmp_path), "--unfreeze", "1,15X"])
    assert refused.exit_code == 2 and "layer counts" in refused.output
