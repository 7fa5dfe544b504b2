"""What a head answers for the comparison and for export, asked by method, never by class name.

scikit-learn asks an estimator what it can do (``hasattr(estimator, "predict_proba")``, its
``__sklearn_tags__``); the pipeline asks a head four more things, each a method a head has or
lacks (:class:`typing.Protocol`, checked with ``isinstance``):

- ``linear_form()``: its prediction as one affine map of the raw features and a softmax
  (:class:`LinearForm`), for a head that has one; export writes it as one linear layer;
- ``logit_module()``: otherwise, a torch module from raw features to logits (the MLP);
- ``chosen_params()``: the hyperparameters it chose on validation data, for the results
  table's ``chosen`` column;
- ``wants_layers()``: whether it should be given a multi-layer cache's column spans
  (``set_params(layers=...)``) before it is fitted.

A classifier of another library answers none of them: the comparison shows the parameters it
was given, and export refuses it.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

__all__ = ["ChoosesParams", "HasLinearForm", "HasLogitModule", "LinearForm", "TakesLayers",
           "chosen_params", "fold_standardisation", "folded_module", "wants_layers"]


class LinearForm(NamedTuple):
    """``predict_proba(X) == softmax(X @ coef.T + intercept)`` on raw features.

    One row per class of ``classes_``, also for two classes (the first row is then zeros and
    the second the model's one logit, so the softmax gives its sigmoid).
    """

    coef: np.ndarray  # (n_classes, n_features)
    intercept: np.ndarray  # (n_classes,)


@runtime_checkable
class HasLinearForm(Protocol):
    def linear_form(self) -> LinearForm: ...


@runtime_checkable
class HasLogitModule(Protocol):
    def logit_module(self): ...  # a torch.nn.Module: raw features (N, D) -> logits (N, C)


@runtime_checkable
class ChoosesParams(Protocol):
    def chosen_params(self) -> dict[str, object]: ...


@runtime_checkable
class TakesLayers(Protocol):
    def wants_layers(self) -> bool: ...


def fold_standardisation(weight: np.ndarray, bias: np.ndarray, mean: np.ndarray,
                         scale: np.ndarray) -> LinearForm:
    """An affine map of standardised features, ``((X - mean) / scale) @ weight.T + bias``, as
    the same map of the raw features ``X``.

    Parameters
    ----------
    weight : ndarray of shape (n_out, n_features)
    bias : ndarray of shape (n_out,)
    mean, scale : ndarray of shape (n_features,)
        A fitted scaler's ``mean_`` and ``scale_``.
    """
    coef = np.asarray(weight, np.float64) / np.asarray(scale, np.float64)[None, :]
    return LinearForm(coef, np.asarray(bias, np.float64) - coef @ np.asarray(mean, np.float64))


def chosen_params(estimator) -> dict[str, object] | None:
    """What ``estimator`` chose on validation data; None when it does not say."""
    return estimator.chosen_params() if isinstance(estimator, ChoosesParams) else None


def wants_layers(estimator) -> bool:
    """Whether ``estimator`` should be given a multi-layer cache's column spans."""
    return isinstance(estimator, TakesLayers) and estimator.wants_layers()


def folded_module(module, mean: np.ndarray, scale: np.ndarray):
    """A float32 copy of a torch ``module`` of standardised features whose first layer is
    linear, taking raw features instead: the scaler folded into that layer."""
    import copy

    import torch

    module = copy.deepcopy(module).double().eval()
    first = module[0]
    with torch.no_grad():
        weight, bias = fold_standardisation(first.weight.numpy(), first.bias.numpy(), mean, scale)
        first.weight.copy_(torch.from_numpy(weight))
        first.bias.copy_(torch.from_numpy(bias))
    return module.float().requires_grad_(False)
