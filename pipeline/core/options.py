"""The settings of each stage as data: one dataclass per stage, whose defaults the CLI shows.

Importing this module loads no framework, so ``pipeline --help`` can show every default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

DEFAULT_BACKBONE = "efficientnet_lite0"
DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("float32", "float16")
# Inference engines of the frozen network (pipeline.models.engines): auto picks the fastest
# installed.
ENGINES = ("auto", "torch", "onnxruntime", "openvino")
ACTIVATION_DTYPES = ("float16", "float32")
POOLS = ("avg", "max")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step")
AUGMENTS = ("standard", "none")
HEAD_INITS = ("linear", "random")
# Test-time augmentation (pipeline.finetuning.tta): the image and its mirror, or ten crops and
# mirrors.
TTA_MODES = ("flip", "crops")
MISTAKES = 16  # the best row's wrong test predictions that pipeline report draws, at most
# grid: every combination; one-at-a-time: each factor in turn at the best so far
# (pipeline.finetuning.sweep)
SWEEP_MODES = ("grid", "one-at-a-time")
# --lr auto: the learning-rate range test picks the head's rate first (pipeline.finetuning.lr_find)
AUTO_LR = "auto"
# The learning-rate range test (pipeline.finetuning.lr_find): steps at most, first and last head lr.
LR_FIND_STEPS, LR_FIND_START_LR, LR_FIND_END_LR = 100, 1e-7, 1.0
DEFAULT_HEADS = ("logreg", "mlp", "linear")
EXPORT_FORMATS = ("npy", "parquet", "csv")
# How a JPEG is decoded (pipeline.data.decode): at the scale the network needs, or every pixel.
DECODE_MODES = ("draft", "exact")
DEFAULT_CACHE_DIR = os.environ.get("PIPELINE_CACHE_DIR", "cache")


@dataclass(frozen=True)
class ExtractOptions:
    """How stage 1 reads the images and stores the features (the backbone is separate)."""

    dtype: str = "float32"  # stored feature type; "float16" halves the disk
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR
    batch_size: int | None = None  # images per forward pass; None: 8 on a CPU, 64 on a GPU
    workers: int | None = None  # loader processes; None: 0 on 2 cores or fewer, else half
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    strict: bool = False  # stop at the first unreadable image instead of skipping it
    hash_contents: bool = False  # fingerprint images by content hash, not size and mtime
    # train,val,test fractions for the splits the data does not give (carved out of train)
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0  # seeds the carved splits (and a random init of a backbone named here)
    compile: bool = False  # torch.compile the network (pays off on long GPU runs)
    # What runs the frozen network: torch prepared for inference (BatchNorm folded, static
    # padding, channels_last), an exported copy in onnxruntime or openvino (optional extras,
    # verified against torch before use), or auto: the fastest installed for the device.
    # Not auto by default: an export costs seconds to minutes once per backbone, and a
    # non-torch engine gives other last bits, hence another cache key.
    engine: str = "torch"
    # A complete cache found damaged (a chunk failing its checksum, a truncated file) is moved
    # aside and built again; False: stop with one line instead.
    repair: bool = True
    # Seconds to wait for another run writing the same cache (then reuse what it finished).
    lock_timeout: float = 3600.0
    # "draft": a large JPEG is decoded by libjpeg at 1/2 to 1/8 scale (still twice the
    # recipe's resize) and resized from there, several times faster on photos and within about
    # a pixel level of a full decode; "exact": every pixel, as before. Other formats decode
    # the same either way. Part of the cache key for data with JPEGs (pipeline.data.decode).
    decode: str = "draft"


@dataclass(frozen=True)
class HeadsOptions:
    """Which heads stage 2 fits on cached features, and where their results go."""

    heads: tuple[str, ...] = DEFAULT_HEADS  # head specs, see pipeline.heads.make_head
    out: str | os.PathLike = "results/heads"
    shots: tuple[int | str, ...] = ()  # examples per class for the data-efficiency curve
    draws: int = 5  # random draws per number of shots
    seed: int = 0
    # fits per head with seeds seed, seed+1, ... on the same splits: the spread over seeds
    # (initialisation, minibatch order) beside the single run's interval over test images
    repeats: int = 1
    # a two-class problem's positive class (None: the second class), whose recall and
    # false-negative rate each row adds
    positive: str | None = None
    # a CSV with a ``path`` column (such as pipeline audit's label_issues.csv): those training
    # and validation images are left out of the fits; test images always stay
    exclude: str | os.PathLike | None = None


@dataclass(frozen=True)
class AuditOptions:
    """How ``pipeline audit`` screens a cache's data (pipeline.audit)."""

    out: str | os.PathLike = "results/audit"
    folds: int = 5  # K of the stratified K-fold that gives every image an out-of-fold probability
    # cosine similarity of L2-normalised features from which two images are near-duplicates
    # (pipeline.audit.neighbours.DEFAULT_THRESHOLD says why 0.97)
    threshold: float = 0.97
    neighbours: int = 10  # nearest rows kept per image: outlier score and near-duplicate pairs
    top: int = 24  # suspects in each gallery and outlier list
    map: bool = True  # draw the 2-D map (openTSNE)
    map_points: int = 10_000  # points on the map at most (a seeded sample beyond)
    seed: int = 0


@dataclass(frozen=True)
class FinetuneConfig:
    """How the top blocks are trained; every field is recorded in the checkpoint."""

    unfreeze: int | str = 1  # top blocks trained, or "all"; 0 is the linear probe by this loop
    epochs: int = 10
    lr: float | str = 1e-3  # the new head's learning rate; "auto": found by lr-find first
    backbone_lr_ratio: float = 0.1  # pretrained blocks move ~10x slower than the new head
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9, Nesterov)
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # or "step": x0.1 every `step_size` epochs
    step_size: int = 5
    clip_grad: float = 1.0  # max gradient norm: a safety rail for the first steps
    patience: int = 3  # epochs without a better validation loss before stopping
    augment: str = "standard"  # random resized crop, flip, rotation, shear, zoom; or "none"
    bn_train: bool = False  # update BatchNorm running statistics (small data: keep frozen)
    head_init: str = "linear"  # warm start from a linear probe on cached features; or "random"
    batch_size: int = 32
    seed: int = 0
    # Train the top blocks from the trunk's cached activations where that is exact (frozen
    # trunk and BatchNorm, not every block); True runs every image through the trunk each epoch.
    from_images: bool = False
    views: int = 4  # augmented views of each training image cached for the epochs to draw from
    activation_dtype: str = "float16"  # stored activations; float32 doubles the disk


ACTIVATION_FIELDS = ("from_images", "views", "activation_dtype")


def default(cls: type, name: str):
    """The default of field ``name`` of options dataclass ``cls`` (for the CLI)."""
    return next(f.default for f in fields(cls) if f.name == name)


def split_settings(settings: dict, *classes: type) -> list[dict]:
    """``settings`` shared out by the dataclass whose field each key is, then the rest."""
    parts: list[dict] = [{} for _ in classes] + [{}]
    for key, value in settings.items():
        owner = next((i for i, c in enumerate(classes)
                      if key in {f.name for f in fields(c)}), len(classes))
        parts[owner][key] = value
    return parts
