"""A fine-tuned network as a predictor: images in, its own logits, class probabilities out.

Unlike a head, which classifies a backbone's bottleneck features, a fine-tuned network is the
whole backbone with a new classifier, trained end to end; it never goes through the feature
path (no feature model, no cached features). It is saved as a ``.net`` file by
:mod:`pipeline.store.persistence`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.core.devices import autocast
from pipeline.models.backbones import (
    BackboneSpec,
    build_classifier,
    replace_classifier,
    resolve_backbone,
)
from pipeline.store.persistence import ModelFileError, SavedNetwork, load_network, save_network

# Key fields that decide what a network sees: all must match when it is rebuilt. The weights
# need not: the saved state dict replaces every one of them.
_INPUT_FIELDS = ("backbone", "preprocessing")


@dataclass
class FinetunedNetwork:
    """A backbone with its own classifier, fine-tuned: what ``finetune()`` returns and
    ``pipeline predict`` runs.

    Attributes
    ----------
    module
        The network, in eval mode; ``module(x)`` gives logits over ``classes``.
    spec
        The backbone it was built from: ``spec.preprocessing.transform()`` turns a PIL image
        into the tensor ``module`` expects.
    meta
        What rebuilds it, as saved: ``classes``, ``backbone``, ``request``, ``spec`` (the key),
        ``cache_key``, ``head`` and ``unfrozen`` (see
        :class:`pipeline.store.persistence.SavedNetwork`).
    """

    module: nn.Module
    spec: BackboneSpec
    meta: dict

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @classmethod
    def from_module(cls, module: nn.Module, spec: BackboneSpec, classes, *, request: dict,
                    cache_key: str, unfrozen: int) -> FinetunedNetwork:
        """Wrap a trained ``module``: moved to the CPU, in eval mode.

        Parameters
        ----------
        request
            The arguments of :func:`pipeline.resolve_backbone` that give ``spec`` (a feature
            cache's ``request``).
        cache_key
            The feature cache its head was warm-started on and its splits came from.
        unfrozen
            How many of the top blocks were trained.
        """
        meta = {"backbone": spec.name, "classes": list(classes), "cache_key": cache_key,
                "request": request, "spec": spec.key(), "head": f"finetune-{unfrozen}",
                "unfrozen": unfrozen}
        # Through JSON, as a saved file holds it: tuples become lists.
        return cls(module.to("cpu").eval(), spec, json.loads(json.dumps(meta)))

    @classmethod
    def from_saved(cls, saved: SavedNetwork, offline: bool | None = None) -> FinetunedNetwork:
        """Rebuild the network from its request and load its weights.

        The backbone is resolved as it was for training (its weights decide the architecture
        of some models and the preprocessing), then the saved weights replace all of them.
        """
        request = dict(saved.meta["request"])
        spec = resolve_backbone(request.pop("backbone"), **request, offline=offline)
        here = json.loads(json.dumps(spec.key()))
        for name in _INPUT_FIELDS:
            if saved.meta["spec"].get(name) != here.get(name):
                raise ModelFileError(
                    f"this network was trained with {name}={saved.meta['spec'].get(name)!r}, "
                    f"but its backbone here gives {name}={here.get(name)!r}; fine-tune it again")
        module = build_classifier(spec)
        replace_classifier(spec, module, len(saved.meta["classes"]))
        try:
            module.load_state_dict(saved.state_dict)
        except RuntimeError as err:  # another architecture under the same name
            raise ModelFileError(f"the saved weights do not fit {spec.name} as built here "
                                 f"({str(err).splitlines()[0]}); fine-tune it again") from None
        return cls(module.eval(), spec, saved.meta)

    @classmethod
    def load(cls, path: str | os.PathLike, offline: bool | None = None) -> FinetunedNetwork:
        """A ``.net`` file (or a fine-tuned ``.head`` of the previous version), rebuilt."""
        return cls.from_saved(load_network(path), offline)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the weights and ``meta`` as a ``.net`` file."""
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
        return save_network(path, state, self.meta)

    @torch.inference_mode()
    def predict_proba(self, x: torch.Tensor) -> np.ndarray:
        """Class probabilities, ``softmax(module(x))`` in float64, of preprocessed images.

        ``x`` is a batch as ``spec.preprocessing.transform()`` makes them; it is moved to the
        module's device, and run in eval mode (the module's mode is put back after).
        """
        device = next(self.module.parameters()).device
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":  # the weights are channels_last on a GPU
            x = x.contiguous(memory_format=torch.channels_last)
        with _eval(self.module), autocast(device):
            logits = self.module(x)
        return torch.softmax(logits.double(), dim=1).cpu().numpy()

    @contextlib.contextmanager
    def placed(self, device: torch.device) -> Iterator[FinetunedNetwork]:
        """The network on ``device`` for the ``with`` block, back where it was after."""
        before = next(self.module.parameters()).device
        self.module.to(device, memory_format=torch.channels_last)
        try:
            yield self
        finally:
            self.module.to(before)


@contextlib.contextmanager
def _eval(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
