"""timm: any architecture of timm's registry, ``timm/<arch>`` or ``timm/<arch>.<tag>``.

timm's own contract answers every question: ``pretrained_cfg`` gives the weights source and the
preprocessing, ``forward_head(pre_logits=True)`` the bottleneck, ``reset_classifier`` the new
head and ``group_matcher`` the blocks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import timm
import timm.models
from torch import nn

from pipeline.core.errors import BackboneError, WeightsError
from pipeline.data.images import file_sha256
from pipeline.models.families.base import Family, Resolution
from pipeline.models.preprocessing import Preprocessing
from pipeline.models.stages import Block, BlockError, collapse, is_under, unsupported
from pipeline.models.weights import (
    EnumWeights,
    FileWeights,
    HubTag,
    RandomInit,
    Weights,
    WeightsRequest,
    download_to_hub,
    hf_hub_file,
    hub_checkpoint,
    load_state_dict,
    one_line,
    random_init,
    read_state_dict,
    weights_file,
)

PREFIX = "timm/"
# Identity prefix of weights that timm's own pretrained loader reads (a tag's file).
TAG_IDENTITY = "timm:"


class PreLogits(nn.Module):
    """timm's own contract for the input of the classifier: ``forward_head(pre_logits=True)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class TimmFamily(Family):
    name = "timm"

    def names(self) -> list[str]:
        return []  # thousands: `timm.list_models()` lists them; spelled timm/<arch>

    def resolve(self, name: str, request: WeightsRequest, offline: bool) -> Resolution:
        model_name = name.removeprefix(PREFIX)
        if isinstance(request, HubTag):
            model_name = f"{timm.models.get_arch_name(model_name)}.{request.tag}"
        if not timm.is_model(model_name):
            raise BackboneError(f"unknown timm architecture {model_name!r}")
        cfg = pretrained_cfg(model_name)
        if isinstance(request, EnumWeights):
            raise WeightsError(f"{name} takes the weights default, tag:<tag>, a PATH or none, "
                               f"not {request.text!r}; timm weights are chosen by tag: "
                               "timm/<architecture>.<tag>", backbone=name, weights=request.text)
        if isinstance(request, RandomInit):
            source = random_init(0)
        elif isinstance(request, FileWeights):
            source = weights_file(request)
        elif request.kind in ("default", "tag"):
            source = tag_weights(name, model_name, cfg, offline)
            model_name = source.identity[len(TAG_IDENTITY):]  # the default tag, spelled out
        else:
            raise WeightsError(f"{name} has no {request.text} weights; use default, tag:<tag>, "
                               "PATH or none")
        return Resolution(model_name, source, preprocessing(cfg))

    def build(self, spec) -> nn.Module:
        if spec.weights.identity.startswith(TAG_IDENTITY):
            return pretrained(spec.arch, spec.weights.path)
        model = timm.create_model(spec.arch, pretrained=False)
        if spec.weights.path is not None:
            load_state_dict(model, read_state_dict(spec.weights.path), spec.weights.path.name)
        return model

    def classifier(self, model: nn.Module) -> tuple[str, nn.Module] | None:
        head = model.get_classifier()
        name = next((n for n, m in model.named_modules() if m is head), None)
        return (name, head) if name is not None else None

    def replace_classifier(self, model: nn.Module, n_classes: int) -> nn.Linear:
        model.reset_classifier(n_classes)
        return model.get_classifier()

    def layer_names(self, model: nn.Module) -> list[str]:
        return timm.models.get_graph_node_names(model)[1]

    def extractor(self, model: nn.Module, node: str) -> nn.Module:
        return timm.models.create_feature_extractor(model, return_nodes={node: "features"})

    def extractor_of(self, model: nn.Module, nodes: dict[str, str]) -> nn.Module:
        return timm.models.create_feature_extractor(model, return_nodes=nodes)

    def bottleneck(self, model: nn.Module) -> nn.Module:
        return PreLogits(model)

    def blocks(self, model: nn.Module) -> list[Block]:
        """The groups of ``model.group_matcher(coarse=True)``, less the stem group."""
        from timm.models import group_modules

        try:
            matcher = model.group_matcher(coarse=True)
        except (AttributeError, NotImplementedError):
            raise BlockError(unsupported(model)) from None
        # Module name (of those holding parameters) -> group ordinal, stem first, unmatched last.
        ordinal = group_modules(model, matcher, reverse=True)
        found = self.classifier(model)
        classifier = found[0] if found else None
        head = ordinal.get(classifier) if classifier is not None else None
        stem = _stem(matcher, ordinal)
        groups: dict[int, list[str]] = {}
        for name, group in ordinal.items():
            if group != stem and not (classifier and is_under(name, [classifier])):
                groups.setdefault(group, []).append(name)
        # The classifier's group is timm's "unmatched" one (head norms, pre-logits layers):
        # those sit above the last stage, so they join the top block.
        above = groups.pop(head, []) if head is not None else []
        stages = [groups[group] for group in sorted(groups)]
        if not stages:
            raise BlockError(unsupported(model))
        stages[-1] += above
        return [Block(modules[0], modules) for modules in (collapse(model, s) for s in stages)]

    def folded_norm(self, norm: nn.Module) -> nn.Module | None:
        from timm.layers import BatchNormAct2d

        if type(norm) is BatchNormAct2d:  # normalise, then drop (identity in eval), then act
            return nn.Sequential(norm.drop, norm.act)
        return super().folded_norm(norm)

    def fixed_size(self, module: nn.Module, input_shape: tuple[int, ...]) -> nn.Module | None:
        from timm.layers import Conv2dSame
        from timm.layers.padding import pad_same_arg

        if type(module) is not Conv2dSame:
            return None
        # TensorFlow's "same" padding, computed once for this input size instead of per call.
        pad = pad_same_arg(list(input_shape[-2:]), list(module.weight.shape[-2:]),
                           module.stride, module.dilation)
        left, right, top, bottom = pad
        symmetric = left == right and top == bottom  # then the convolution pads by itself
        conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size,
                         module.stride, (top, left) if symmetric else 0, module.dilation,
                         module.groups, bias=module.bias is not None)
        conv.weight, conv.bias = module.weight, module.bias
        return conv if symmetric else nn.Sequential(nn.ZeroPad2d(pad), conv)


def _stem(matcher: dict | Callable, ordinal: dict[str, int]) -> int | None:
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


def pretrained_cfg(model_name: str):
    try:
        return timm.models.get_pretrained_cfg(model_name)
    except RuntimeError:  # timm's answer to a tag the architecture does not have
        arch, tag = timm.models.split_model_name_tag(model_name)
        tags = ", ".join(n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*"))
        raise BackboneError(f"timm has no tag {tag!r} for {arch}; known: {tags}") from None


def preprocessing(cfg) -> Preprocessing:
    from timm.data import resolve_data_config

    # timm's own reading of a pretrained cfg (its defaults fill what the cfg leaves out).
    data = resolve_data_config({}, pretrained_cfg=cfg.to_dict() if cfg else {"tag": ""})
    crop = int(data["input_size"][-1])
    return Preprocessing(resize=math.floor(crop / data["crop_pct"]), crop=crop,
                         mean=tuple(data["mean"]), std=tuple(data["std"]),
                         interpolation=data["interpolation"])


def tag_weights(name: str, model_name: str, cfg, offline: bool) -> Weights:
    """The file of a timm tag's pretrained weights, fetched the way timm itself would."""
    arch = timm.models.get_arch_name(model_name)
    tagged = f"{arch}.{cfg.tag}" if cfg and cfg.tag else model_name
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        if "." not in model_name:
            raise WeightsError(f"no offline weights are bundled for {name}", backbone=name,
                               reason="no-weights-source")
        raise WeightsError(f"timm tag {tagged} has no weights source (no hf_hub_id, url or "
                           "file)", backbone=name, reason="no-weights-source")
    # timm's own order of preference (_builder._resolve_pretrained_source): a local file named
    # in the cfg, then the Hugging Face hub, then the url.
    if cfg.file:
        path = Path(cfg.file)
        if not path.is_file():
            raise WeightsError(f"timm tag {tagged} names weights file {path}, which does not "
                               "exist", backbone=name, path=path, reason="no-weights-source")
    elif cfg.hf_hub_id:
        path = hf_hub_file(tagged, cfg.hf_hub_id,
                           _hf_file_names(cfg.hf_hub_filename or "pytorch_model.bin"), offline)
    else:
        path = hub_checkpoint(tagged, cfg.url, offline, lambda: download_to_hub(cfg.url))
    return Weights(f"{TAG_IDENTITY}{tagged}", path, file_sha256(path))


def _hf_file_names(filename: str) -> list[str]:
    """The file names timm's ``load_state_dict_from_hf`` tries, safetensors first."""
    from timm.models import _hub

    if filename.endswith(".safetensors"):
        return [filename]
    return [*_hub._get_safe_alternatives(filename), filename]


def pretrained(model_name: str, path: Path) -> nn.Module:
    # timm's own loader applies the tag's filter fn (renamed keys, adapted classifier); the
    # overlay points it at the file already fetched, so nothing is downloaded here.
    try:
        return timm.create_model(model_name, pretrained=True,
                                 pretrained_cfg_overlay={"file": str(path)})
    except RuntimeError as err:
        raise WeightsError(f"weights file {path.name} does not fit timm {model_name}: "
                           f"{one_line(err)}") from None
