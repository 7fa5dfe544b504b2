"""Advice on how deep to train, measured from a multi-layer cache.

- ``logme.py``: the LogME transferability score of features for labels;
- ``rule.py``: size per class, the per-block probe gap, the matrix that gives the strategy;
- ``run.py``: :func:`advise`, from a data set (extracting its blocks) or a cache.
"""

from pipeline.advice.rule import AdviceResult, advise_cache
from pipeline.advice.run import advise

__all__ = ["AdviceResult", "advise", "advise_cache"]
