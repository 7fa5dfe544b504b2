"""Test-time augmentation: class probabilities averaged over mirrored and cropped views.

Each test image is classified several times, as views that training made the network
indifferent to, and the softmax probabilities are averaged (not the logits: each view's
probabilities are a prediction of its own, and their mean stays a distribution).

``flip``: the image as the recipe preprocesses it, and its horizontal mirror. Two passes;
training showed the network both (``RandomHorizontalFlip``), so the mirror is an image of the
training distribution. It is the default.

``crops``: the ten views of torchvision's ``TenCrop``: the four corner crops and the centre
crop of the recipe's crop size, cut from the image at the recipe's resize size (its centre
square: a batch needs one shape), and their mirrors. Ten passes. It is not the default: it
costs five times ``flip``, and at the usual ratio (224 of 256) a corner crop is the centre
crop moved 16 px towards a corner, so it adds little but the loss of part of a centred
object; its reported gains are those of older networks on ImageNet. Where the recipe resizes
straight to the crop size there is nothing to cut, and ``crops`` is ``flip``.

Neither suits pictures whose mirror is another class (text, digits, some medical images).

:func:`evaluate_network` scores a fine-tuned network's test split this way (``pipeline
finetune --tta``), :func:`average` and :class:`ViewFeatures` serve ``pipeline predict --tta``:
a network's softmax per view, or a head's probabilities on each view's features.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core import distributed
from pipeline.core.errors import TTAError
from pipeline.core.options import TTA_MODES
from pipeline.metrics.scoring import positive_scores, scores_with_intervals
from pipeline.models.preprocessing import Preprocessing

if TYPE_CHECKING:
    import torch

    from pipeline.data.images import ImageSet
    from pipeline.finetuning.network import FinetunedNetwork

__all__ = ["TTA_MODES", "TTAError", "ViewFeatures", "average", "check_mode",
           "evaluate_network", "input_size", "mean_over_views", "score_split", "transform",
           "view_count", "views"]



def check_mode(mode: str | None) -> str | None:
    """``mode`` if it is one of :data:`TTA_MODES` (None: no augmentation)."""
    if mode is not None and mode not in TTA_MODES:
        raise TTAError(f"tta must be one of {', '.join(TTA_MODES)}, not {mode!r}")
    return mode


def _cuts(preprocessing: Preprocessing, mode: str) -> bool:
    """Whether ``mode`` cuts crops: ``crops``, where the recipe resizes above its crop."""
    return mode == "crops" and preprocessing.resize > preprocessing.crop


def input_size(preprocessing: Preprocessing, mode: str) -> int:
    """The side of the square images :func:`views` cuts from: the crop, or the resize size."""
    return preprocessing.resize if _cuts(preprocessing, mode) else preprocessing.crop


def transform(preprocessing: Preprocessing, mode: str):
    """A PIL image to the normalised tensor of :func:`input_size`: the recipe's own
    preprocessing, or for ``crops`` its resize with the centre square at that size."""
    return replace(preprocessing, crop=input_size(preprocessing, mode)).transform()


def view_count(preprocessing: Preprocessing, mode: str) -> int:
    """How many views :func:`views` makes of each image."""
    return 10 if _cuts(preprocessing, mode) else 2


def views(x: torch.Tensor, mode: str, crop: int) -> list[torch.Tensor]:
    """The views of a batch ``x`` (``(n, 3, s, s)``, s from :func:`input_size`), each
    ``(n, 3, crop, crop)``: ``x`` and its mirror, or ``TenCrop``'s ten crops of ``crop``."""
    if mode == "crops" and x.shape[-1] > crop:
        from torchvision.transforms.v2 import functional as F

        return list(F.ten_crop(x, [crop, crop]))
    return [x, x.flip(-1)]


def average(predict: Callable[[torch.Tensor], np.ndarray], x: torch.Tensor, mode: str,
            crop: int) -> np.ndarray:
    """``predict``'s class probabilities averaged over the :func:`views` of batch ``x``.

    Parameters
    ----------
    predict
        A batch of preprocessed images to ``(n, classes)`` probabilities
        (:meth:`pipeline.finetuning.network.FinetunedNetwork.predict_proba`).
    x, mode, crop
        As for :func:`views`.

    Returns
    -------
    numpy.ndarray
        ``(n, classes)`` float64.
    """
    return np.mean([np.asarray(predict(v), np.float64) for v in views(x, mode, crop)], axis=0)


class ViewFeatures:
    """A feature model run on each view of a batch: the views' features side by side,
    ``(n, views * dim)``, for a head to classify view by view (:func:`mean_over_views`)."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], mode: str, crop: int):
        self.model, self.mode, self.crop = model, mode, crop

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.cat([self.model(v) for v in views(x, self.mode, self.crop)], dim=1)


def mean_over_views(proba: Callable[[np.ndarray], np.ndarray], features: np.ndarray,
                    n_views: int) -> np.ndarray:
    """The mean of ``proba`` over the views' features that :class:`ViewFeatures` put side by
    side."""
    return np.mean([proba(block) for block in np.split(features, n_views, axis=1)], axis=0)


def evaluate_network(network: FinetunedNetwork, images: ImageSet, rows: np.ndarray,
                     mode: str, device: torch.device, batch_size: int,
                     workers: int | None = None) -> np.ndarray:
    """Class probabilities of images ``rows`` of ``images``, averaged over their views.

    The network runs whole, on images read again (never on cached activations: those are of
    the unmirrored, uncropped image). Under torchrun each rank reads its share and every rank
    returns all of them, in the order of ``rows``.

    Returns
    -------
    numpy.ndarray
        ``(len(rows), classes)`` float64.
    """
    import torch

    from pipeline.core.devices import default_workers
    from pipeline.data.images import ImageFiles

    ctx = distributed.context()
    recipe = network.spec.preprocessing
    size = input_size(recipe, mode)
    files = ImageFiles(images, transform(recipe, mode), (3, size, size))
    mine = np.asarray(rows)[distributed.shard_indices(len(rows), ctx)]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(files, mine.tolist()), batch_size=batch_size, shuffle=False,
        num_workers=default_workers(ctx.local_world_size) if workers is None else workers,
        pin_memory=device.type == "cuda")
    index, proba = [], []
    with network.placed(device):
        for x, i, _errors, _digest in loader:
            index.append(i.numpy())
            proba.append(average(network.predict_proba, x, mode, recipe.crop))
    shares = distributed.all_gather((index, proba))
    got = np.concatenate([i for share in shares for i in share[0]])
    position = {int(r): j for j, r in enumerate(rows)}
    out = np.empty((len(rows), len(network.classes)))
    out[[position[int(i)] for i in got]] = np.concatenate([p for s in shares for p in s[1]])
    return out


def score_split(network: FinetunedNetwork, images: ImageSet, rows: np.ndarray,
                labels: np.ndarray, mode: str, device: torch.device, batch_size: int,
                workers: int | None = None, positive: str | None = None
                ) -> tuple[np.ndarray, dict]:
    """Score images ``rows`` of ``images`` (their ``labels``) with test-time augmentation.

    Returns
    -------
    proba : numpy.ndarray
        ``(len(rows), classes)``: :func:`evaluate_network`'s averaged probabilities.
    scores : dict
        The columns of a results row that they decide: each score with its 95% interval, the
        positive class's recall and false-negative rate (two classes), and the augmented
        pass's seconds as ``predict_s``. :func:`pipeline.finetuning.run.finetune` puts them in
        a row of their own beside the plain one, so that ``pipeline report`` compares the two
        image by image.
    """
    started = time.perf_counter()
    proba = evaluate_network(network, images, rows, mode, device, batch_size, workers)
    pred = proba.argmax(1)
    scores = scores_with_intervals(labels, pred, proba, proba.shape[1])
    scores.update(positive_scores(labels, pred, images.classes, positive))
    scores["predict_s"] = time.perf_counter() - started
    return proba, scores
