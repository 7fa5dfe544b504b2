"""A trained model as one file to ship: uint8 images in, class probabilities out.

The file holds everything between a decoded image and its probabilities: the preprocessing
of the weights' recipe (resize of the shorter side, centre crop, scaling and normalisation,
the same torchvision operations ``pipeline predict`` applies), the backbone, and the head
(its linear form as one linear layer, or its own torch module, as the head gives them:
:mod:`pipeline.heads.protocol`) or the fine-tuned network. It runs with onnxruntime
(``--format onnx``) or torch alone (``--format torchscript``), with no ``pipeline`` import.

The input is a batch of RGB images as ``uint8`` of shape ``(N, H, W, 3)``, what
``numpy.asarray(PIL.Image.open(path).convert("RGB"))`` gives; the batch size is free, the
image size is fixed at export (``input_size``), because the resize before the crop is computed
from it. The class names and the input size travel in the file (ONNX metadata properties;
TorchScript's ``meta.json`` extra file).
"""

from __future__ import annotations

import functools
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from pipeline.core.atomic import write_bytes
from pipeline.core.contract import Result
from pipeline.core.errors import ExportError
from pipeline.core.extras import require, require_all
from pipeline.core.options import MODEL_FORMATS, ExportOptions
from pipeline.store.persistence import HEAD_SUFFIX, NETWORK_SUFFIX, SavedHead, load_model

__all__ = ["FORMATS", "ExportError", "ExportOptions", "ExportResult", "choose_model",
           "export_model", "resized_size"]

FORMATS = MODEL_FORMATS  # format -> the suffix of the file written beside the model
# What each format needs beyond torch: torch's ONNX exporter (dynamo) runs on onnxscript.
_NEEDS = {"onnx": ("onnx", "onnxscript"), "torchscript": ()}
# One ONNX file is one protobuf message, which protobuf caps at 2 GiB: a larger model would
# need its weights in files beside it, and the export promises one file.
_ONNX_LIMIT = 2**31


@dataclass
class ExportResult(Result):
    """The exported file's bytes, the model they came from and what the file expects;
    :meth:`write` puts the file on disk."""

    source: Path  # the saved model that was exported
    format: str
    classes: list[str]  # the probabilities' columns, in order
    input_size: tuple[int, int]  # (height, width) of the images the file takes
    data: bytes = field(repr=False)  # the whole file
    path: Path | None = None  # where the last write(out) put it; None until written

    @property
    def default_path(self) -> Path:
        """Beside the model, its name with the format's suffix (``.onnx``, ``.pt``)."""
        return self.source.with_suffix(FORMATS[self.format])

    def to_json(self) -> dict:
        return {"path": None if self.path is None else str(self.path),
                "source": str(self.source), "format": self.format, "classes": self.classes,
                "input_size": list(self.input_size)}

    def write(self, out: str | os.PathLike | None = None) -> list[Path]:
        """The file at ``out`` (None: :attr:`default_path`), all at once; its path."""
        self.path = write_bytes(Path(out) if out else self.default_path, self.data)
        return [self.path]


def choose_model(source: str | os.PathLike) -> Path:
    """The model file ``source`` names: itself, or the most accurate saved model of the
    results rows under a folder (ties: the first in path order)."""
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise ExportError(f"{source}: no such file or folder", path=source)
    best = None
    for results in sorted(source.rglob("results.json")):
        for row in json.loads(results.read_text()):
            model = Path(row.get("model") or "")
            if model.suffix not in (HEAD_SUFFIX, NETWORK_SUFFIX):
                continue
            model = model if model.is_absolute() or model.exists() else results.parent / model
            if model.exists() and (best is None or row["test_accuracy"] > best[0]):
                best = (row["test_accuracy"], model)
    if best is None:
        found = sorted([*source.rglob(f"*{HEAD_SUFFIX}"), *source.rglob(f"*{NETWORK_SUFFIX}")])
        if len(found) == 1:
            return found[0]
        if found:
            raise ExportError(f"{source}: no saved model (.head or .net) with a results row "
                              f"under it ({len(found)} model files: name one)", path=source,
                              found=found)
        raise ExportError(f"{source}: no saved model (.head or .net) with a results row under "
                          "it", path=source, found=found, reason="no-model")
    return best[1]


def export_model(source: str | os.PathLike, *,
                 options: ExportOptions = ExportOptions()) -> ExportResult:
    """The model at ``source`` (a ``.head`` or ``.net`` file, or a results folder: its most
    accurate model) as one ONNX or TorchScript file, in memory.

    Computes and writes nothing: ``result.write(out)`` writes the file (by default beside the
    model, its name with ``.onnx`` or ``.pt``).

    Parameters
    ----------
    source
        A saved model, or a folder of results (``pipeline heads`` / ``finetune`` output).
    options
        :class:`~pipeline.core.options.ExportOptions`: ``format`` (``"onnx"`` or
        ``"torchscript"``), ``input_size`` (``(height, width)`` of the images the file takes;
        default: the recipe's crop, square) and ``offline`` (as for
        :func:`pipeline.resolve_backbone`: the backbone is rebuilt from the model's request).

    Returns
    -------
    ExportResult
        The file's bytes, the model exported, its classes and the input size.

    Raises
    ------
    ExportError
        No saved model under ``source``, a head without a tensor form, or an ONNX model over
        protobuf's 2 GiB.
    MissingExtraError
        ``onnx`` without the onnx extra, before the model is built.
    """
    require_all(_NEEDS[options.format], f"{options.format} export")  # before the model is built
    model_path = choose_model(source)
    module, spec, classes = _classifier(model_path, options.offline)
    size = (tuple(options.input_size) if options.input_size
            else (spec.preprocessing.crop,) * 2)
    wrapped = _torch_modules().Preprocessed(module, spec.preprocessing, size).eval()
    meta = {"classes": classes, "input_size": list(size), "input": "uint8 (N, H, W, 3) RGB",
            "output": "float32 (N, classes) probabilities", "source": model_path.name,
            "backbone": spec.name}
    data = (_onnx if options.format == "onnx" else _torchscript)(wrapped, size, meta)
    return ExportResult(model_path, options.format, classes, size, data)


def _classifier(path: Path, offline):
    """The torch module from preprocessed images to probabilities, its backbone, classes."""
    saved = load_model(path)
    if isinstance(saved, SavedHead):
        from pipeline.deploy.predict import matching_backbone

        spec = matching_backbone(saved, offline)
        classes = list(saved.meta["classes"])
        head = _head_module(saved.estimator, len(classes))
        return _torch_modules().Sequential(_feature_model(spec), head), spec, classes
    from pipeline.finetuning.network import FinetunedNetwork

    net = FinetunedNetwork.from_saved(saved, offline)
    return _torch_modules().Softmax(net.module), net.spec, list(net.classes)


def _feature_model(spec):
    """The feature model ``pipeline predict`` runs (prepared for inference on the CPU)."""
    import torch

    from pipeline.extract.batches import prepare_model

    return prepare_model(spec, torch.device("cpu"))


def _head_module(estimator, n_classes: int):
    """A fitted head as torch layers giving probabilities over all ``n_classes`` columns.

    The head says what it is (:mod:`pipeline.heads.protocol`): an affine map of the features
    (its linear form), or a torch module of its own.
    """
    # Here, not at the top: the heads package loads torch, and importing this file needs none.
    from pipeline.heads.protocol import HasLinearForm, HasLogitModule

    if isinstance(estimator, HasLinearForm):
        layers = _linear(*estimator.linear_form())
    elif isinstance(estimator, HasLogitModule):
        layers = estimator.logit_module()
    else:
        raise ExportError(f"a {type(estimator).__name__} head has no tensor form to export; "
                          "export a logreg, linear, multilayer or mlp head, or a fine-tuned "
                          "network", head=type(estimator).__name__)
    labels = np.asarray(estimator.classes_, dtype=np.int64)
    return _torch_modules().Probabilities(layers.float(), labels, n_classes)


def _linear(weight: np.ndarray, bias: np.ndarray):
    import torch

    layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        layer.bias.copy_(torch.as_tensor(np.ravel(bias), dtype=torch.float32))
    return layer


@functools.cache
def _torch_modules() -> SimpleNamespace:
    """The module classes, defined on first use so that importing this file needs no torch."""
    import torch
    from torch import nn
    from torchvision.transforms.v2 import functional as F

    class Sequential(nn.Module):
        def __init__(self, features: nn.Module, head: nn.Module):
            super().__init__()
            self.features, self.head = features, head

        def forward(self, x):
            return self.head(self.features(x))

    class Softmax(nn.Module):
        def __init__(self, network: nn.Module):
            super().__init__()
            self.network = network.float().eval()

        def forward(self, x):
            return torch.softmax(self.network(x), dim=1)

    class Probabilities(nn.Module):
        """Scores of the head's own classes, softmaxed, then placed at their labels."""

        def __init__(self, layers: nn.Module, labels: np.ndarray, n_classes: int):
            super().__init__()
            self.layers = layers
            place = torch.zeros(len(labels), n_classes)
            place[torch.arange(len(labels)), torch.as_tensor(labels)] = 1.0
            self.register_buffer("place", place)

        def forward(self, x):
            return torch.softmax(self.layers(x), dim=1) @ self.place

    class Preprocessed(nn.Module):
        """uint8 (N, H, W, 3) images of one size through the recipe, then the classifier.

        torchvision resizes an 8-bit image as PIL does: the columns first, then the rows,
        each pass with 16-bit fixed-point weights and its result rounded to 8 bits. For a
        fixed input size each pass is a matrix product, so that is what the file holds: the
        weights are torchvision's own (its resize applied to an identity image), quantised as
        its 8-bit kernel quantises them, and cut to the centre crop; the sums run in float64,
        where they are exact. The exported graph then gives torchvision's pixels bit for
        bit, where a runtime's own Resize does not (onnxruntime's bicubic moved the demo's
        probabilities by up to 8e-3).
        """

        def __init__(self, classifier: nn.Module, recipe, size: tuple[int, int]):
            super().__init__()
            self.classifier = classifier.eval()
            crop = recipe.crop
            (height, width), resized = size, resized_size(size, recipe.resize)
            top, left = (int(round((side - crop) / 2.0)) for side in resized)
            rows = _fixed_point(_resize_matrix(height, resized[0], recipe, axis=0))
            columns = _fixed_point(_resize_matrix(width, resized[1], recipe, axis=1))
            self.register_buffer("rows", rows[top:top + crop].contiguous())
            self.register_buffer("columns_t", columns[left:left + crop].T.contiguous())
            self.register_buffer("mean", torch.tensor(recipe.mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(recipe.std).view(1, 3, 1, 1))

        def forward(self, images):
            x = images.permute(0, 3, 1, 2).to(torch.float64)
            x = _to_8_bits(torch.matmul(x, self.columns_t))  # the columns pass first
            x = _to_8_bits(torch.matmul(self.rows, x))
            x = (x.to(torch.float32) / 255.0 - self.mean) / self.std
            return self.classifier(x)

    def _to_8_bits(x):
        # The kernel adds half and shifts right (a floor), then clamps.
        return torch.clamp(torch.floor(x + 0.5), 0.0, 255.0)

    def _resize_matrix(before: int, after: int, recipe, axis: int) -> torch.Tensor:
        """(after, before): torchvision's resize of one axis as a matrix, from an identity."""
        identity = torch.eye(before, dtype=torch.float32)[None]  # (1, before, before)
        size = [after, before] if axis == 0 else [before, after]
        mode = F.InterpolationMode(recipe.interpolation)
        resized = F.resize(identity, size, interpolation=mode, antialias=True)[0]
        return resized if axis == 0 else resized.T

    def _fixed_point(weights: torch.Tensor) -> torch.Tensor:
        """The weights as torch's 8-bit antialiased kernel uses them: int16 at the most
        fractional bits (up to 22) that keep the largest weight below 2**15, rounded half
        away from zero; returned as float64 multiples of 2**-bits."""
        largest = weights.abs().max().item()
        bits = 0
        while bits < 22 and int(0.5 + largest * (1 << (bits + 1))) < (1 << 15):
            bits += 1
        scaled = weights.double() * (1 << bits)
        whole = torch.where(scaled < 0, torch.ceil(scaled - 0.5), torch.floor(scaled + 0.5))
        return whole / (1 << bits)

    return SimpleNamespace(Sequential=Sequential, Softmax=Softmax, Probabilities=Probabilities,
                           Preprocessed=Preprocessed)


def resized_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """``(height, width)`` after resizing the shorter side to ``shorter`` px, the longer in
    proportion, rounded down: what torchvision's ``Resize(shorter)`` gives."""
    height, width = size
    short, long = sorted((height, width))
    longer = int(shorter * long / short)
    return (longer, shorter) if width <= height else (shorter, longer)


def _example(size: tuple[int, int]):
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, *size, 3), dtype=torch.uint8, generator=generator)


def _onnx(module, size: tuple[int, int], meta: dict) -> bytes:
    import torch

    onnx = require("onnx", "onnx export")
    batch = torch.export.Dim("batch", min=1)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(module, (_example(size),), dynamo=True,
                                    input_names=["images"], output_names=["probabilities"],
                                    dynamic_shapes={"images": {0: batch}}, verbose=False)
    model = program.model_proto
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    if model.ByteSize() >= _ONNX_LIMIT:
        raise ExportError(f"the ONNX model is {model.ByteSize():,} bytes, over the 2 GiB that "
                          "one ONNX file holds; export it as torchscript",
                          bytes=model.ByteSize(), format="onnx")
    buffer = io.BytesIO()
    onnx.save_model(model, buffer)
    return buffer.getvalue()


def _torchscript(module, size: tuple[int, int], meta: dict) -> bytes:
    import torch

    module.requires_grad_(False)  # the file predicts; nothing in it trains
    with torch.no_grad():
        traced = torch.jit.trace(module, (_example(size),), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={"meta.json": json.dumps(meta)})
    return buffer.getvalue()
