"""Fixtures: tiny image sets written to a temporary folder, and a tiny random backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# A random-init torchvision model at a tiny input size keeps the suite fast and offline.
TINY = {"backbone": "resnet18", "weights": "none", "image_size": 32, "workers": 0}


def extract_tiny(data, cache_dir, *, weights: str = TINY["weights"],
                 image_size: int | None = TINY["image_size"], layer: str | None = None,
                 progress=None, on_batch=None, **options):
    """``extract_features`` with TINY's backbone (its ``weights``, ``image_size`` and ``layer``
    as given) resolved with ``options``' seed, and ``ExtractOptions(cache_dir=cache_dir,
    workers=0, **options)``."""
    from pipeline.core.options import ExtractOptions
    from pipeline.extract.features import extract_features
    from pipeline.models.backbones import resolve_backbone

    opts = ExtractOptions(cache_dir=cache_dir, **{"workers": TINY["workers"], **options})
    spec = resolve_backbone(TINY["backbone"], weights, layer, image_size=image_size,
                            seed=opts.seed)
    return extract_features(data, backbone=spec, options=opts, progress=progress,
                            on_batch=on_batch)


def fit_and_write(caches, out: Path, **options):
    """``fit_heads`` with ``HeadsOptions(**options)``, its result written to ``out`` (as
    ``pipeline heads`` does)."""
    from pipeline.core.options import HeadsOptions
    from pipeline.heads.compare import fit_heads

    result = fit_heads(list(caches), options=HeadsOptions(**options), progress=False)
    result.write(out)
    return result


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 36)) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 10) -> Path:
    """``root/<class>/<i>.png`` with distinct random pictures."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{i:03d}.png", seed=100 * c + i)
    return root


def make_split_folder(root: Path, counts=None, classes=("cat", "dog")) -> Path:
    """``root/{train,val,test}/<class>/<i>.png``."""
    counts = counts or {"train": 6, "val": 2, "test": 3}
    seed = 0
    for split, n in counts.items():
        for name in classes:
            for i in range(n):
                seed += 1
                write_image(root / split / name / f"{i:03d}.png", seed=seed)
    return root


@pytest.fixture(autouse=True)
def fresh_memo(tmp_path: Path, monkeypatch) -> Path:
    """Each test resolves backbones afresh: no answer remembered by another test or the user."""
    memo = tmp_path / "resolved-memo"
    monkeypatch.setenv("PIPELINE_MEMO_DIR", str(memo))
    return memo


@pytest.fixture(autouse=True)
def no_tracking_server(monkeypatch) -> None:
    """No test logs to the MLflow server of whoever runs the suite (MLFLOW_TRACKING_URI);
    the tracking tests set their own local store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "images")


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    return make_split_folder(tmp_path / "split")


def run_finetune(data, out, *, backbone: str = "resnet18", weights: str = "none",
                 image_size: int | None = 32, write: bool = True, progress=False, **settings):
    """``pipeline.finetune`` on ``data`` with its checkpoints in ``out`` and (``write``) its
    files written there, the options built from flat settings (``lr``, ``unfreeze``,
    ``cache_dir``, ``workers``, ... as :meth:`FinetuneOptions.from_flat` shares them out);
    ``split_seed``, ``positive``, ``tta``, ``on_epoch``, ``track`` and ``activation_depths``
    go to the call. The backbone's random init is seeded as the stage seeds the splits."""
    from pipeline.core.options import FinetuneOptions
    from pipeline.finetuning.run import finetune
    from pipeline.models.backbones import resolve_backbone

    call = {k: settings.pop(k) for k in ("split_seed", "positive", "tta", "on_epoch", "track",
                                         "activation_depths") if k in settings}
    options = FinetuneOptions.from_flat(settings)
    seed = call.get("split_seed")
    spec = resolve_backbone(backbone, weights, image_size=image_size,
                            seed=options.training.seed if seed is None else seed)
    result = finetune(data, backbone=spec, options=options, workdir=out, progress=progress,
                      **call)
    if write:
        result.write(out)
    return result
