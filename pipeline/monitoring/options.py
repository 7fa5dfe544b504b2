"""``pipeline drift``'s settings as data (imports nothing heavy, so ``--help`` is instant)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from pipeline.core.contract import Between, OneOf, Options, Satisfies

__all__ = ["DriftOptions", "SPLITS"]

SPLITS = ("train", "val", "test")


def _splits(value) -> bool:
    return (isinstance(value, tuple) and len(value) > 0
            and all(s in SPLITS for s in value) and len(set(value)) == len(value))


@dataclass(frozen=True, kw_only=True)
class DriftOptions(Options):
    """How ``pipeline drift`` compares new data with the reference and judges the model."""

    # Significance level of every decision: shifted, harmful, a layer where the shift shows.
    level: float = 0.05
    # The reference images the new set is compared with. Held-out splits by default: a head's
    # outputs on its own training images are over-confident, which would look like a shift.
    reference: tuple[str, ...] = ("val", "test")
    # Permutations of the MMD and the novelty tests; a p-value is at least
    # 1 / (permutations + 1).
    permutations: int = 200
    folds: int = 5  # of the cross-fitted domain classifier
    # The novelty test: an image's novelty is its mean cosine distance to this many nearest
    # reference images; an outlier is beyond the reference's 1 - tail quantile of novelty.
    neighbours: int = 3
    tail: float = 0.05
    # An accuracy drop smaller than this is not called harmful, however significant.
    tolerance: float = 0.02
    # A .head or .net to judge instead of the best row's model of a results folder (with a
    # cache as the reference and no model, a logreg head is fitted on its training split).
    model: str | os.PathLike | None = None
    # Where NEW's features are cached; None: beside the reference cache.
    cache_dir: str | os.PathLike | None = None
    device: str = "auto"  # that runs the backbone (or the fine-tuned network) on NEW
    gallery: int = 24  # the most different new images drawn
    seed: int = 0  # seeds the folds, the permutations, the bootstraps and the refit's split

    constraints: ClassVar[dict[str, list]] = {
        "level": [Between(0, 1, open="both")],
        "reference": [Satisfies(_splits, "a tuple of distinct splits among "
                                         + ", ".join(SPLITS))],
        "permutations": [Between(1, None, integer=True)],
        "folds": [Between(2, None, integer=True)],
        "neighbours": [Between(1, None, integer=True)],
        "tail": [Between(0, 1, open="both")],
        "tolerance": [Between(0, 1)],
        "device": [OneOf(("auto", "cuda", "mps", "cpu"))],
        "gallery": [Between(0, None, integer=True)],
        "seed": [Between(0, None, integer=True)],
    }
