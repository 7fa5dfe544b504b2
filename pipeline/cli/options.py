"""The options several commands share, their parsers, and the process setup they ask for.

Defaults come from the stages' options dataclasses (:mod:`pipeline.core.options`), so
``--help`` shows the library's own defaults.
"""

from __future__ import annotations

from dataclasses import fields

import click

from pipeline.core.options import (
    ACTIVATION_DTYPES,
    AUGMENTS,
    DEFAULT_CACHE_DIR,
    DEVICES,
    ENGINES,
    FINETUNE_CONCERNS,
    HEAD_INITS,
    OPTIMIZERS,
    TTA_MODES,
    ExtractOptions,
    default,
)

__all__ = ["cache_dir_option", "compile_option", "depths", "device_option", "engine_option",
           "finetune_default", "keep_freed_memory", "numbers", "offline_option", "positive_option",
           "quiet_option", "split_option", "track_option", "training_options", "tta_option",
           "weights_option"]


def _fractions(_ctx, _param, value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise click.BadParameter("give three fractions, train,val,test, such as 0.8,0.1,0.1")
    return parts


def keep_freed_memory(device: str) -> None:
    """The CLI's choice for its own process: on a CPU, keep freed memory for the next batch
    (about 2x faster forward passes here; see :func:`pipeline.core.devices.keep_freed_memory`)."""
    from pipeline.core import devices

    if devices.device_type(device) == "cpu":
        devices.keep_freed_memory()


compile_option = click.option(
    "--compile", is_flag=True, default=default(ExtractOptions, "compile"),
    help="torch.compile the network (pays off on long GPU runs).")


tta_option = click.option(
    "--tta", type=click.Choice(TTA_MODES), default=None,
    help="Test-time augmentation: average the probabilities over each image and its mirror "
         "(flip), or over ten crops and mirrors (crops, five times slower).")


positive_option = click.option(
    "--positive", default=None, metavar="CLASS",
    help="Two-class data: the positive class, whose recall and false-negative rate each "
         "results row adds [default: the second class].")


engine_option = click.option(
    "--engine", type=click.Choice(ENGINES), default=default(ExtractOptions, "engine"),
    show_default=True,
    help="What runs the frozen network: torch (BatchNorm folded, static padding, "
         "channels_last), onnxruntime or openvino (an ONNX export kept in the cache folder, "
         "checked against torch first; pip install 'cnn-bottleneck-pipeline[onnx]' or "
         "'[openvino]'), or auto: the fastest installed for the device.")


split_option = click.option(
    "--split", "split_fractions", show_default=True, callback=_fractions,
    default=",".join(map(str, default(ExtractOptions, "split_fractions"))),
    help="train,val,test fractions of the training images, for the splits the data does not "
         "give (carved, stratified and seeded, out of train).")


offline_option = click.option(
    "--offline", is_flag=True, default=None,
    help="Never download weights; a missing file is an error naming it (env PIPELINE_OFFLINE=1).")


cache_dir_option = click.option(
    "--cache-dir", default=DEFAULT_CACHE_DIR, show_default=True, type=click.Path(),
    help="Folder of the HDF5 feature caches (env PIPELINE_CACHE_DIR).")


quiet_option = click.option(
    "-q", "--quiet", is_flag=True,
    help="No progress on stderr (a bar on a terminal; in a log a line every 30 s, env "
         "PIPELINE_PROGRESS_INTERVAL, and one per fine-tuning epoch).")


track_option = click.option(
    "--track/--no-track", default=None,
    help="Log each fit to MLflow (parameters, per-epoch metrics, results, plots, model): to "
         "MLFLOW_TRACKING_URI, else to a local store in mlruns/ beside --out. Needs pip "
         "install 'cnn-bottleneck-pipeline[track]'. [default: on when MLFLOW_TRACKING_URI "
         "is set]")


weights_option = click.option(
    "--weights", default="default", show_default=True,
    help="default, a torchvision weights name (IMAGENET1K_V2, ResNet50_Weights.IMAGENET1K_V2, "
         "DEFAULT), tag:<timm tag>, bundled, a state-dict PATH, or none (random init). Missing "
         "torchvision and timm files are downloaded into the hub cache unless --offline.")


device_option = click.option("--device", type=click.Choice(DEVICES), show_default=True,
                             default=default(ExtractOptions, "device"))


def depths(_ctx, _param, value: str) -> list:
    from pipeline.models.blocks import BlockError, parse_layers

    try:
        return [v if v == "all" or parse_layers(v) else int(v) for v in value.split(",")]
    except (ValueError, BlockError):
        raise click.BadParameter("give block counts, layer counts or 'all', such as "
                                 "0,1,2,all or 15L,25L") from None


def numbers(kind: type, example: str, word: str | None = None):
    """A click callback: one value, or several separated by commas (a sweep's); ``word``
    (``auto``) is taken alone, in place of a number."""
    def parse(_ctx, _param, value) -> list:
        if word is not None and word in str(value).split(","):
            if str(value) != word:
                raise click.BadParameter(f"{word!r} stands alone: give it or numbers, not both")
            return [word]
        try:
            values = [kind(v) for v in str(value).split(",")]
        except ValueError:
            raise click.BadParameter(f"give one value or several, such as {example}") from None
        if any(v <= 0 for v in values):
            raise click.BadParameter("every value must be positive")
        return values
    return parse


def finetune_default(name: str):
    """The default of fine-tune option ``name``, whichever concern of
    :class:`~pipeline.core.options.FinetuneOptions` holds it."""
    owner = next(cls for cls in FINETUNE_CONCERNS.values()
                 if name in {f.name for f in fields(cls)})
    return default(owner, name)


# The training settings that finetune and lr-find share: the range test trains the network
# the fine-tune would, so it takes the same ones.
_TRAINING_OPTIONS = (
    click.option("--backbone-lr-ratio", type=click.FloatRange(min=0, min_open=True),
                 default=finetune_default("backbone_lr_ratio"), show_default=True,
                 help="Backbone learning rate as a fraction of the head's."),
    click.option("--optimizer", type=click.Choice(OPTIMIZERS),
                 default=finetune_default("optimizer"), show_default=True),
    click.option("--weight-decay", type=click.FloatRange(min=0),
                 default=finetune_default("weight_decay"),
                 show_default=True),
    click.option("--augment", type=click.Choice(AUGMENTS), default=finetune_default("augment"),
                 show_default=True),
    click.option("--from-images", is_flag=True, default=finetune_default("from_images"),
                 help="Run every image through the frozen trunk each epoch instead of "
                      "training from its cached activations (which --bn-train and --unfreeze "
                      "all do anyway)."),
    click.option("--views", type=click.IntRange(min=1), default=finetune_default("views"),
                 show_default=True,
                 help="Augmented views of each training image cached for the epochs to draw "
                      "from (with --augment standard)."),
    click.option("--activation-dtype", type=click.Choice(ACTIVATION_DTYPES),
                 default=finetune_default("activation_dtype"), show_default=True,
                 help="Stored type of the cached activations."),
    click.option("--bn-train", is_flag=True, default=finetune_default("bn_train"),
                 help="Update BatchNorm statistics (default: frozen)."),
    click.option("--head-init", type=click.Choice(HEAD_INITS),
                 default=finetune_default("head_init"), show_default=True,
                 help="Warm-start the head from a linear probe, or random."),
)


def training_options(command):
    """Apply :data:`_TRAINING_OPTIONS`, listed in --help in that order."""
    for option in reversed(_TRAINING_OPTIONS):
        command = option(command)
    return command
