"""Lightweight heads on cached bottleneck features, as scikit-learn classifiers.

One module per head, and one for what they share:

- ``logreg.py``: :class:`LogRegHead`, standardisation and logistic regression, C chosen on
  validation data;
- ``mlp.py``: :class:`MLPHead`, a small PyTorch MLP, early-stopped;
- ``linear_probe.py``: :class:`LinearProbe`, a grid of linear heads trained as one batched
  model, with its grid optimizer;
- ``multilayer.py``: :class:`MultiLayerHead`, features of several layers chosen by a
  group-lasso probe (Head2Toe), logistic regression on the chosen ones;
- ``layers.py``: the linear probe on each layer of a multi-layer cache (the layer curve);
- ``_base.py``: the base estimators, target encoding, the selection split, standardisation;
- ``spec.py``: the registry :data:`HEADS` and the ``NAME[:param=value,...]`` specs that
  :func:`make_head` builds.

A new head is one module here, subclassing ``_base.BaseHead`` (or ``_base.TorchHead`` when
torch trains it), plus one entry in ``spec.HEADS``.
"""

from pipeline.heads.linear_probe import LinearProbe
from pipeline.heads.logreg import LogRegHead
from pipeline.heads.mlp import MLPHead
from pipeline.heads.multilayer import MultiLayerHead
from pipeline.heads.spec import HEADS, HeadError, head_name, make_head

__all__ = ["HEADS", "HeadError", "LinearProbe", "LogRegHead", "MLPHead", "MultiLayerHead",
           "head_name", "make_head"]
