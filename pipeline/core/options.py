"""The settings of each stage as data: one dataclass per stage, whose defaults the CLI shows.

Importing this module loads no framework, so ``pipeline --help`` can show every default.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import ClassVar

from pipeline.core.contract import Between, OneOf, Options, Satisfies

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
EXPORT_FORMATS = ("npy", "parquet", "csv")  # pipeline cache export
# pipeline export: each format and the suffix of the file it writes beside the model
MODEL_FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
# How a JPEG is decoded (pipeline.data.decode): at the scale the network needs, or every pixel.
DECODE_MODES = ("draft", "exact")
DEFAULT_CACHE_DIR = os.environ.get("PIPELINE_CACHE_DIR", "cache")
# Where the CLI writes each stage's files when --out is not given (``result.write(out)``).
HEADS_OUT = "results/heads"
AUDIT_OUT = "results/audit"
ADVICE_OUT = "results/advice"
# numpy's and scikit-learn's seeds: a non-negative 32-bit integer.
SEED = [Between(0, 2**32 - 1, integer=True)]
FLAG = [OneOf((True, False))]


def _fractions(value) -> bool:
    return (isinstance(value, tuple | list) and len(value) == 3
            and all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
                    for v in value)
            and value[0] > 0 and abs(sum(value) - 1.0) < 1e-6)


def _path_like(value) -> bool:
    return isinstance(value, str | os.PathLike)


@dataclass(frozen=True, kw_only=True)
class ExtractOptions(Options):
    """How stage 1 reads the images and stores the features (the backbone is separate: a
    name or a spec, ``extract_features(data, backbone=..., options=...)``)."""

    dtype: str = "float32"  # stored feature type; "float16" halves the disk
    # the folder of the HDF5 caches: where a run looks for its key before computing anything
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

    constraints = {
        "dtype": [OneOf(DTYPES)],
        "cache_dir": [Satisfies(_path_like, "a folder")],
        "batch_size": [Between(1, None, integer=True), None],
        "workers": [Between(0, None, integer=True), None],
        "device": [OneOf(DEVICES)],
        "strict": FLAG,
        "hash_contents": FLAG,
        "split_fractions": [Satisfies(_fractions, "three fractions train,val,test, "
                                                  "non-negative, train above 0, summing to 1")],
        "seed": SEED,
        "compile": FLAG,
        "engine": [OneOf(ENGINES)],
        "repair": FLAG,
        "lock_timeout": [Between(0, None)],
        "decode": [OneOf(DECODE_MODES)],
    }


def _head_specs(value) -> bool:
    return (isinstance(value, tuple | list) and len(value) > 0
            and all(isinstance(v, str) and v.strip() for v in value))


def _shot_counts(value) -> bool:
    return isinstance(value, tuple | list) and all(
        v == "all" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
        for v in value)


@dataclass(frozen=True, kw_only=True)
class HeadsOptions(Options):
    """Which heads stage 2 fits on cached features, and how it compares them."""

    heads: tuple[str, ...] = DEFAULT_HEADS  # head specs, see pipeline.heads.make_head
    shots: tuple[int | str, ...] = ()  # examples per class for the data-efficiency curve
    draws: int = 5  # random draws per number of shots
    seed: int = 0  # seeds every head and every draw: the same seed gives the same table
    # fits per head with seeds seed, seed+1, ... on the same splits: the spread over seeds
    # (initialisation, minibatch order) beside the single run's interval over test images
    repeats: int = 1
    # a two-class problem's positive class (None: the second class), whose recall and
    # false-negative rate each row adds
    positive: str | None = None
    # a CSV with a ``path`` column (such as pipeline audit's label_issues.csv): those training
    # and validation images are left out of the fits; test images always stay
    exclude: str | os.PathLike | None = None

    constraints = {
        "heads": [Satisfies(_head_specs, "a non-empty sequence of head specs")],
        "shots": [Satisfies(_shot_counts, "a sequence of counts >= 1 or 'all'")],
        "draws": [Between(1, None, integer=True)],
        "seed": SEED,
        "repeats": [Between(1, None, integer=True)],
        "positive": [Satisfies(lambda v: isinstance(v, str), "a class name"), None],
        "exclude": [Satisfies(_path_like, "a path"), None],
    }


@dataclass(frozen=True, kw_only=True)
class AuditOptions(Options):
    """How ``pipeline audit`` screens a cache's data (pipeline.auditing)."""

    folds: int = 5  # K of the stratified K-fold that gives every image an out-of-fold probability
    # cosine similarity of L2-normalised features from which two images are near-duplicates
    # (pipeline.auditing.neighbours.DEFAULT_THRESHOLD says why 0.97)
    threshold: float = 0.97
    neighbours: int = 10  # nearest rows kept per image: outlier score and near-duplicate pairs
    top: int = 24  # suspects in each gallery and outlier list
    map: bool = True  # draw the 2-D map (openTSNE)
    map_points: int = 10_000  # points on the map at most (a seeded sample beyond)
    seed: int = 0  # seeds the folds, the map and its sample

    constraints = {
        "folds": [Between(2, None, integer=True)],  # one fold leaves nothing to fit on
        "threshold": [Between(0, 1, open="low")],
        "neighbours": [Between(1, None, integer=True)],
        "top": [Between(1, None, integer=True)],
        "map": FLAG,
        "map_points": [Between(2, None, integer=True)],
        "seed": SEED,
    }


@dataclass(frozen=True, kw_only=True)
class AdviseOptions(Options):
    """How ``pipeline advise`` measures a data set (pipeline.advice)."""

    seed: int = 0  # seeds the per-layer probes
    # How the blocks are extracted when the data is an image set, not a cache: the CLI gives
    # its --seed here too, so that the carved splits and the probes share one seed.
    extract: ExtractOptions = field(default_factory=ExtractOptions)

    constraints = {
        "seed": SEED,
        "extract": [Satisfies(lambda v: isinstance(v, ExtractOptions), "ExtractOptions")],
    }


@dataclass(frozen=True, kw_only=True)
class ReportOptions(Options):
    """What ``pipeline report`` draws beside its table (pipeline.report)."""

    # the best row's most confident wrong test predictions drawn in mistakes.png; 0: none
    mistakes: int = MISTAKES

    constraints = {"mistakes": [Between(0, None, integer=True)]}


def _unfreeze(value) -> bool:
    """A count of top blocks (>= 0), of top layers with parameters ("15L"), or "all"."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    if not isinstance(value, str):
        return False
    text = value.strip()
    if text.lower() == "all":
        return True
    return text[:-1].isdigit() and text[-1:].upper() == "L" and int(text[:-1]) >= 1


_POSITIVE = Between(0, None, open="low")
_COUNT = Between(1, None, integer=True)


@dataclass(frozen=True, kw_only=True)
class OptimizerOptions(Options):
    """How the optimizer moves the weights: rates, decay, schedule and clipping."""

    lr: float | str = 1e-3  # the new head's learning rate; "auto": found by lr-find first
    backbone_lr_ratio: float = 0.1  # pretrained blocks move ~10x slower than the new head
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9, Nesterov)
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # or "step": x0.1 every `step_size` epochs
    step_size: int = 5
    clip_grad: float = 1.0  # max gradient norm: a safety rail for the first steps

    constraints = {
        "lr": [_POSITIVE, OneOf((AUTO_LR,))],
        # A ratio of 0 or below would freeze, or climb the loss in, the trained blocks while
        # the head descends it.
        "backbone_lr_ratio": [_POSITIVE],
        "optimizer": [OneOf(OPTIMIZERS)],
        "weight_decay": [Between(0, None)],
        "schedule": [OneOf(SCHEDULES)],
        "step_size": [_COUNT],
        "clip_grad": [_POSITIVE],  # a norm of 0 would zero every step
    }


@dataclass(frozen=True, kw_only=True)
class NetworkOptions(Options):
    """What is trained: how many top blocks, their BatchNorm statistics, how the head starts."""

    unfreeze: int | str = 1  # top blocks trained, or "all", or "15L"; 0: the linear probe
    bn_train: bool = False  # update BatchNorm running statistics (small data: keep frozen)
    head_init: str = "linear"  # warm start from a linear probe on cached features; or "random"

    constraints = {
        "unfreeze": [Satisfies(_unfreeze, "a number of blocks >= 0, of layers (15L) or 'all'")],
        "bn_train": FLAG,
        "head_init": [OneOf(HEAD_INITS)],
    }


@dataclass(frozen=True, kw_only=True)
class TrainingOptions(Options):
    """The data each epoch sees and how long training goes on."""

    batch_size: int = 32  # images per step (per process under torchrun)
    augment: str = "standard"  # random resized crop, flip, rotation, shear, zoom; or "none"
    epochs: int = 10  # at most; early stopping may end sooner
    patience: int = 3  # epochs without a better validation loss before stopping
    # seeds the head's init, minibatch order and augmentation (and the splits, unless the
    # run is given a split seed of its own)
    seed: int = 0

    constraints = {
        "batch_size": [_COUNT],
        "augment": [OneOf(AUGMENTS)],
        "epochs": [Between(0, None, integer=True)],  # 0: the warm-started head, scored
        "patience": [_COUNT],
        "seed": SEED,
    }


@dataclass(frozen=True, kw_only=True)
class ActivationOptions(Options):
    """The cache of the frozen trunk's activations that the top blocks train from."""

    # Train the top blocks from the trunk's cached activations where that is exact (frozen
    # trunk and BatchNorm, not every block); True runs every image through the trunk each epoch.
    from_images: bool = False
    views: int = 4  # augmented views of each training image cached for the epochs to draw from
    activation_dtype: str = "float16"  # stored activations; float32 doubles the disk

    constraints = {
        "from_images": FLAG,
        "views": [_COUNT],
        "activation_dtype": [OneOf(ACTIVATION_DTYPES)],
    }


# Each concern of a fine-tune, under the name FinetuneOptions gives it (the old flat
# FinetuneConfig's fields are shared out by these).
FINETUNE_CONCERNS = {"optim": OptimizerOptions, "network": NetworkOptions,
                     "training": TrainingOptions, "activations": ActivationOptions}


@dataclass(frozen=True, kw_only=True)
class FinetuneOptions(Options):
    """How stage 3 trains the top blocks, one field per concern; every field is recorded in
    the checkpoint (all but ``activations`` and ``extract`` decide whether a run resumes)."""

    optim: OptimizerOptions = field(default_factory=OptimizerOptions)  # rates and schedule
    network: NetworkOptions = field(default_factory=NetworkOptions)  # what is trained
    training: TrainingOptions = field(default_factory=TrainingOptions)  # batches and epochs
    # where the trained blocks' input comes from (exact either way: it never decides a result)
    activations: ActivationOptions = field(default_factory=ActivationOptions)
    # how images are read and features cached (its seed is the run's split seed)
    extract: ExtractOptions = field(default_factory=ExtractOptions)

    constraints = {
        **{name: [Satisfies(lambda v, cls=cls: isinstance(v, cls), cls.__name__)]
           for name, cls in FINETUNE_CONCERNS.items()},
        "extract": [Satisfies(lambda v: isinstance(v, ExtractOptions), "ExtractOptions")],
    }

    @classmethod
    def from_flat(cls, settings: dict) -> FinetuneOptions:
        """Options from the flat fields of the former ``FinetuneConfig`` (a checkpoint's, a
        script's), and of ``ExtractOptions``: each key goes to the concern that has it."""
        return cls().with_flat(settings)

    def with_flat(self, settings: dict) -> FinetuneOptions:
        """A copy with ``settings`` (flat field names, such as a sweep's ``lr`` or
        ``unfreeze``) put in the concern that has each; a name no concern has is refused."""
        parts = split_settings(settings, *FINETUNE_CONCERNS.values(), ExtractOptions)
        if parts[-1]:
            raise TypeError(f"unexpected fine-tune setting(s) {', '.join(sorted(parts[-1]))}")
        names = [*FINETUNE_CONCERNS, "extract"]
        return dataclasses.replace(self, **{
            name: dataclasses.replace(getattr(self, name), **values)
            for name, values in zip(names, parts) if values})

    def flat(self) -> dict:
        """Every concern's fields in one dict, as the former ``FinetuneConfig`` held them."""
        return {k: v for name in FINETUNE_CONCERNS
                for k, v in dataclasses.asdict(getattr(self, name)).items()}


@dataclass(frozen=True, kw_only=True)
class PredictOptions(Options):
    """How ``pipeline predict`` runs a saved model on new images (pipeline.deploy.predict)."""

    top_k: int = 5  # classes listed per image, most probable first
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    batch_size: int | None = None  # images per forward pass; None: 8 on a CPU, 64 on a GPU
    workers: int | None = None  # loader processes; None: 0 on 2 cores or fewer, else half
    offline: bool | None = None  # never download the backbone's weights (None: PIPELINE_OFFLINE)
    # Test-time augmentation: average over each image and its mirror (flip), or ten crops and
    # mirrors (crops); None: the image alone.
    tta: str | None = None

    constraints = {
        "top_k": [_COUNT],
        # torch's own names: "cuda:1" picks a GPU
        "device": [Satisfies(lambda v: isinstance(v, str) and v.split(":")[0] in DEVICES,
                             "auto, cuda, cuda:N, mps or cpu")],
        "batch_size": [_COUNT, None],
        "workers": [Between(0, None, integer=True), None],
        "offline": [*FLAG, None],
        "tta": [OneOf(TTA_MODES), None],
    }


def _image_size(value) -> bool:
    return (isinstance(value, tuple | list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value))


@dataclass(frozen=True, kw_only=True)
class ExportOptions(Options):
    """How ``pipeline export`` writes a saved model as one file (pipeline.deploy.export)."""

    # onnx runs with onnxruntime alone, torchscript with torch alone
    format: str = "onnx"
    # (height, width) of the images the file takes: the resize before the crop is worked out
    # for it; None: the recipe's crop, square
    input_size: tuple[int, int] | None = None
    offline: bool | None = None  # never download the backbone's weights (None: PIPELINE_OFFLINE)

    constraints = {
        "format": [OneOf(tuple(MODEL_FORMATS))],
        "input_size": [Satisfies(_image_size, "a height and a width, each an integer >= 1 "
                                              "(e.g. 224,224)"), None],
        "offline": [*FLAG, None],
    }


@dataclass(frozen=True, kw_only=True)
class CacheExportOptions(Options):
    """How ``pipeline cache export`` writes a cache's features as plain files
    (pipeline.store.export)."""

    # npy: a folder of .npy files (features.npy memory-maps); parquet: one file with a
    # fixed-size list column (needs pyarrow); csv: one file, a column per feature
    format: str = "parquet"

    constraints = {"format": [OneOf(EXPORT_FORMATS)]}


def nested_config(config: dict) -> dict:
    """A checkpoint's or record's ``config``, by concern: one written by the former flat
    ``FinetuneConfig`` is shared out by field name; a nested one is returned as it is."""
    if all(isinstance(v, dict) for v in config.values()):
        return config
    owners = {f.name: name for name, cls in FINETUNE_CONCERNS.items() for f in fields(cls)}
    nested: dict[str, dict] = {}
    for key, value in config.items():
        nested.setdefault(owners.get(key, "unknown"), {})[key] = value
    return nested


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


# --- the unlabelled pool: self-training and distillation (pipeline.heads.self_training,
# pipeline.distillation) ---------------------------------------------------------------------

SELF_TRAIN_THRESHOLDS = (0.5, 0.8, 0.95)
STUDENTS = ("linear", "mlp")


def _unit_interval_tuple(values) -> bool:
    return (isinstance(values, tuple) and len(values) > 0
            and all(isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1
                    for v in values))


def _positive_tuple(values) -> bool:
    return (isinstance(values, tuple) and len(values) > 0
            and all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0
                    for v in values))


@dataclass(frozen=True, kw_only=True)
class SelfTrainOptions(Options):
    """How ``pipeline heads --unlabelled POOL --semi self-train`` self-trains each head."""

    heads: tuple[str, ...] = DEFAULT_HEADS  # the base heads (any head spec of stage 2)
    # confidence floors tried; the validation split chooses one (or none: round 0)
    thresholds: tuple[float, ...] = SELF_TRAIN_THRESHOLDS
    # rounds at most per threshold; the validation split chooses how many (0 is supervised)
    rounds: int = 4
    # pool images one class may take in a round at most: bounds the memory of the refits
    max_per_class: int = 5_000
    seed: int = 0

    constraints: ClassVar[dict[str, list]] = {
        "heads": [Satisfies(lambda v: isinstance(v, tuple) and len(v) > 0,
                            "a non-empty tuple of head specs")],
        "thresholds": [Satisfies(_unit_interval_tuple, "a non-empty tuple of numbers in [0, 1]")],
        "rounds": [Between(1, 50, integer=True)],
        "max_per_class": [Between(1, None, integer=True)],
        "seed": [Between(0, None, integer=True)],
    }


@dataclass(frozen=True, kw_only=True)
class DistillOptions(Options):
    """How ``pipeline distill`` trains a student head on a teacher's soft predictions."""

    student: str = "mlp"  # the student head on the cached features: "linear" or "mlp"
    # softmax temperatures of teacher and student tried; validation chooses one
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0)
    # weights of the soft-target loss against the true labels tried (1: soft targets only);
    # validation chooses one
    alphas: tuple[float, ...] = (0.5, 0.9)
    seed: int = 0
    # pool images read into memory at most (a seeded sample beyond): the student trains in
    # memory, and the teacher's predictions of the whole pool stay on disk
    max_pool: int = 100_000

    constraints: ClassVar[dict[str, list]] = {
        "student": [OneOf(STUDENTS)],
        "temperatures": [Satisfies(_positive_tuple, "a non-empty tuple of numbers > 0")],
        "alphas": [Satisfies(_unit_interval_tuple, "a non-empty tuple of numbers in [0, 1]")],
        "seed": [Between(0, None, integer=True)],
        "max_pool": [Between(1, None, integer=True)],
    }
