"""Fixtures: tiny image sets written to a temporary folder, and a tiny random backbone."""

from __future__ import annotations

import hashlib
import json
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


# What a synthetic cache says it was extracted with: no network, tiny "images".
SYNTHETIC_SPEC = {"backbone": "synthetic", "family": "synthetic", "weights": "random",
                  "weights_sha256": None, "layer": "bottleneck", "pool": "avg",
                  "preprocessing": {"crop": 8}, "image_size": 8, "autocast": None}


def path_digest(text: str) -> bytes:
    """A stand-in SHA-256 (hex bytes, as a cache stores it) for an image named ``text``."""
    return hashlib.sha256(text.encode()).hexdigest().encode()


def write_cache(path: Path, X: np.ndarray, *, paths: list[str] | None = None,
                digests: list[bytes] | None = None, labels=None, split=None, classes=None,
                key: str = "synthetic0000", spec: dict | None = None, data_root: str = "",
                prefix: str = "img") -> Path:
    """A complete cache file of our format holding exactly these rows, built in milliseconds
    (no images, no network): ``paths`` default to ``prefix/000000.png`` ..., ``digests`` to
    each path's :func:`path_digest`, the spec to :data:`SYNTHETIC_SPEC` updated by ``spec``."""
    import h5py

    from pipeline.store.cache import SHA_DTYPE, write_strings
    from pipeline.store.integrity import FORMAT, FORMAT_VERSION

    paths = paths if paths is not None else [f"{prefix}/{i:06d}.png" for i in range(len(X))]
    digests = digests if digests is not None else [path_digest(p) for p in paths]
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=X.astype(np.float32),
                         chunks=(max(1, min(len(X), 256)), X.shape[1]), fletcher32=True)
        f.create_dataset("valid", data=np.ones(len(X), bool))
        write_strings(f, "paths", paths)
        f.create_dataset("content_sha256", data=np.array(digests, dtype=SHA_DTYPE))
        if labels is not None:
            f.create_dataset("labels", data=np.asarray(labels, np.int64))
            write_strings(f, "split", split)
            write_strings(f, "classes", classes)
        f.create_dataset("failed_index", data=np.zeros(0, np.int64))
        write_strings(f, "failed_reason", [])
        full = {**SYNTHETIC_SPEC, **(spec or {}), "dataset": {"fingerprint": key},
                "splits": {"source": {}}}
        f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, key=key,
                       spec=json.dumps(full), complete=True, rows_done=len(X),
                       labelled=labels is not None, data_root=data_root, request="{}",
                       versions="{}", timings="{}", created="2026-12-07")
    return path
