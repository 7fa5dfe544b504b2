"""The ``pipeline`` command: one thin click command per stage over the library functions.

Each command imports the library modules it runs only when it runs, so ``pipeline --help``
answers at once and a cache hit loads no framework; option defaults come from the stages'
options dataclasses (:mod:`pipeline.core.options`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pipeline.core import distributed, distribution
from pipeline.core.errors import PipelineError
from pipeline.core.options import (
    ACTIVATION_DTYPES,
    AUGMENTS,
    AUTO_LR,
    DEFAULT_BACKBONE,
    DEFAULT_CACHE_DIR,
    DEVICES,
    DTYPES,
    ENGINES,
    EXPORT_FORMATS,
    HEAD_INITS,
    LR_FIND_END_LR,
    LR_FIND_START_LR,
    LR_FIND_STEPS,
    MISTAKES,
    OPTIMIZERS,
    POOLS,
    SCHEDULES,
    SWEEP_MODES,
    TTA_MODES,
    ExtractOptions,
    FinetuneConfig,
    HeadsOptions,
    default,
)
from pipeline.store import run_record


class _Group(click.Group):
    """Turns our own errors into one line and exit code 1; anything else is a bug and raises."""

    def main(self, args=None, prog_name=None, **extra):
        # The run records (pipeline.store.run_record) give the command as it was typed, also when
        # the CLI runs in-process (click's CliRunner, scripts) under another sys.argv.
        argv = list(sys.argv[1:] if args is None else args)
        with run_record.command_line(["pipeline", *map(str, argv)]):
            return super().main(args, prog_name, **extra)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PipelineError as err:
            raise click.ClickException(_message(err)) from None
        finally:  # under torchrun: leave the process group cleanly
            distributed.shutdown()


def _message(err: PipelineError) -> str:
    """The error's one line; for one raised in a DataLoader worker, which torch re-raises with
    the worker's traceback as its text, the traceback's last line without the class name."""
    text = str(err)
    if text.startswith("Caught ") and "\n" in text.strip():
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def _fractions(_ctx, _param, value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise click.BadParameter("give three fractions, train,val,test, such as 0.8,0.1,0.1")
    return parts


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=None, default=str))


def _display(path) -> str:
    from pipeline.data.layouts import display

    return display(path)


def _markdown(rows) -> str:
    from pipeline.report.tables import markdown_table

    return markdown_table(rows)


def _keep_freed_memory(device: str) -> None:
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


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name=distribution.NAME)
def main() -> None:
    """Bottleneck features from pretrained CNNs, cached once, reused by every experiment."""


weights_option = click.option(
    "--weights", default="default", show_default=True,
    help="default, a torchvision weights name (IMAGENET1K_V2, ResNet50_Weights.IMAGENET1K_V2, "
         "DEFAULT), tag:<timm tag>, bundled, a state-dict PATH, or none (random init). Missing "
         "torchvision and timm files are downloaded into the hub cache unless --offline.")
device_option = click.option("--device", type=click.Choice(DEVICES), show_default=True,
                             default=default(ExtractOptions, "device"))


@main.command()
@click.argument("data", type=click.Path())
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True,
              help="efficientnet_lite0, any torchvision model name, or timm/<arch>[.<tag>].")
@weights_option
@click.option("--layer", default=None, help="Graph node to take instead of the bottleneck.")
@click.option("--pool", type=click.Choice(POOLS), default="avg", show_default=True)
@click.option("--image-size", type=int, default=None,
              help="Crop size instead of the weights' recipe (e.g. 96 for small images).")
@click.option("--dtype", type=click.Choice(DTYPES), default=default(ExtractOptions, "dtype"),
              show_default=True)
@cache_dir_option
@click.option("--batch-size", type=click.IntRange(min=1),
              default=default(ExtractOptions, "batch_size"),
              help="Images per forward pass [default: 8 on CPU, 64 on GPU].")
@click.option("--workers", type=click.IntRange(min=0), default=default(ExtractOptions, "workers"),
              help="DataLoader processes [default: 0 on 2 cores or fewer, else half the cores].")
@device_option
@click.option("--strict", is_flag=True, default=default(ExtractOptions, "strict"),
              help="Stop at the first unreadable image.")
@click.option("--hash-contents", is_flag=True, default=default(ExtractOptions, "hash_contents"),
              help="Fingerprint images by content hash, not size and mtime.")
@split_option
@click.option("--seed", type=int, default=default(ExtractOptions, "seed"), show_default=True)
@compile_option
@engine_option
@offline_option
@click.option("--repair/--no-repair", default=default(ExtractOptions, "repair"),
              show_default=True,
              help="A cache under this key found damaged (a chunk failing its checksum, a "
                   "truncated file) is moved aside to *.h5.damaged and built again; "
                   "--no-repair stops instead.")
@click.option("--lock-timeout", type=click.FloatRange(min=0),
              default=default(ExtractOptions, "lock_timeout"), show_default=True,
              help="Seconds to wait for another run writing the same cache, whose work is "
                   "then reused.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object on stdout, nothing else (progress stays on stderr).")
@click.option("--write-json", type=click.Path(dir_okay=False), default=None,
              help="Also write the JSON summary to this file.")
@quiet_option
def extract(data, as_json, write_json, quiet, **options) -> None:
    """Extract bottleneck features of the images in DATA once and cache them in HDF5.

    DATA is a folder root/<class>/<image>, a split folder root/{train,val,test}/<class>/<image>,
    or a CSV manifest path,label[,split].

    Under torchrun (torchrun --standalone --nproc-per-node N -m pipeline extract ...) each
    process extracts a shard and rank 0 assembles the same cache one process writes.
    """
    from pipeline.extract.features import extract_features

    _keep_freed_memory(options["device"])
    try:
        result = extract_features(data, progress=False if quiet else None, **options)
    except KeyboardInterrupt:
        click.echo("interrupted: the features written so far are kept; run the same command "
                   "again to resume", err=True)
        sys.exit(130)
    if not distributed.context().is_main:  # under torchrun rank 0 speaks for the job
        return
    summary = result.to_json()
    if write_json:
        Path(write_json).parent.mkdir(parents=True, exist_ok=True)
        Path(write_json).write_text(json.dumps(summary, indent=2) + "\n")
    if as_json:
        _emit_json(summary)
        return
    if result.hit:
        click.echo(f"cache hit: {result.cache_path} ({result.images} images, {result.dim}-d); "
                   "no model was run")
    else:
        rate = (result.images - result.resumed_from) / max(result.seconds, 1e-9)
        resumed = f", resumed at {result.resumed_from}" if result.resumed_from else ""
        procs = f" on {result.world_size} processes" if result.world_size > 1 else ""
        engine = f", {result.engine}" if result.engine != "torch" else ""
        click.echo(f"extracted {result.images} images ({result.dim}-d){procs} in "
                   f"{result.seconds:.1f} s ({rate:.0f} img/s{resumed}{engine}) -> "
                   f"{result.cache_path}")
    if result.engine_note:
        click.echo(result.engine_note)
    if result.repair_note:
        click.echo(result.repair_note)
    _describe_data(result)


def _describe_data(result) -> None:
    """Where the splits came from, what was ignored, skipped or found twice."""
    from pipeline.store import cache

    if result.labelled:
        click.echo("splits: " + "; ".join(f"{s} {result.splits[s]}: {result.split_sources[s]}"
                                          for s in result.splits))
    else:
        click.echo("unlabelled images (no class folders or label column): features and paths "
                   "only; `pipeline predict` and `pipeline cache export` take them")
    if result.ignored:
        counts = cache.ignored_counts(result.ignored)
        click.echo(f"ignored {len(result.ignored)} file(s) or folder(s): " + ", ".join(
            f"{n} {kind}" for kind, n in counts.items()) + f" (`pipeline cache info "
            f"{result.key[:8]}` lists them)", err=True)
    for path, reason in result.failures:
        click.echo(f"skipped unreadable {_display(path)}: {reason}", err=True)
    if result.failed:
        click.echo(f"{result.failed} unreadable image(s) skipped and listed in the cache",
                   err=True)
    _warn_duplicates(result.duplicates, result.key)


def _warn_duplicates(duplicates: dict | None, key: str) -> None:
    if not duplicates or not (duplicates["across_splits"] or duplicates["across_classes"]):
        return
    shown = "; ".join(" = ".join(_display(p) for p in g["paths"])
                      for g in duplicates["shown"][:3])
    click.echo(f"warning: identical images under other paths: {duplicates['across_splits']} "
               f"group(s) span two splits (a test image that is also a training image inflates "
               f"every score), {duplicates['across_classes']} span two classes: {shown}"
               f"{' ...' if len(duplicates['shown']) > 3 else ''} (`pipeline cache info "
               f"{key[:8]}` lists them)", err=True)


def _shots(_ctx, _param, value: str | None) -> list:
    if not value:
        return []
    try:
        shots = [v if v == "all" else int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter("give shots as numbers or 'all', such as 1,2,5,10,all") from None
    if any(s != "all" and s < 1 for s in shots):
        raise click.BadParameter("shots must be at least 1")
    return shots


@main.command()
@click.argument("caches", nargs=-1, required=True, type=click.Path())
@click.option("--heads", "head_specs", default=",".join(default(HeadsOptions, "heads")),
              show_default=True,
              help="Comma-separated heads: logreg, mlp, linear, or an import path with "
                   "parameters (sklearn.svm.LinearSVC:C=0.1); separate several with ';'.")
@click.option("--out", type=click.Path(file_okay=False), default=default(HeadsOptions, "out"),
              show_default=True, help="Folder of the tables, plots and saved heads.")
@click.option("--shots", callback=_shots, default=",".join(default(HeadsOptions, "shots")),
              help="Examples per class for the data-efficiency curve, e.g. 1,2,5,10,all.")
@click.option("--draws", type=click.IntRange(min=1), default=default(HeadsOptions, "draws"),
              show_default=True, help="Random draws per k.")
@click.option("--seed", type=int, default=default(HeadsOptions, "seed"), show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=default(HeadsOptions, "repeats"),
              show_default=True,
              help="Fit each head with this many seeds (seed, seed+1, ...) on the same splits "
                   "and report the spread of test accuracy over them.")
@positive_option
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
@quiet_option
@track_option
def heads(caches, head_specs, out, shots, draws, seed, repeats, positive, as_json, quiet,
          track) -> None:
    """Fit heads on cached features (CACHES: one or more .h5 files) and compare them."""
    from pipeline.heads import compare

    options = HeadsOptions(tuple(_split_heads(head_specs)), out, tuple(shots), draws, seed,
                           repeats, positive=positive)
    result = compare.fit_heads(caches, options=options, progress=False if quiet else None,
                               track=track)
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} activation cache(s) (fine-tuning's block "
                   f"inputs, not features): {', '.join(result.skipped)}", err=True)
    if as_json:
        _emit_json(result.to_json())
        return
    click.echo(_markdown(_table_columns(result.rows)))
    if result.shots:
        click.echo(_markdown(result.shots))
    click.echo(f"tables, plots and saved heads in {out}/")


def _split_heads(value: str) -> list[str]:
    # Commas separate heads, except inside one head's parameters: use ';' between heads that
    # carry parameters, e.g. "logreg;sklearn.svm.LinearSVC:C=0.1,max_iter=5000".
    parts = value.split(";") if ";" in value or ":" in value else value.split(",")
    return [p.strip() for p in parts if p.strip()]


def _table_columns(rows: list[dict]) -> list[dict]:
    keep = ("backbone", "head", "chosen", "test_accuracy", "test_accuracy_ci_low",
            "test_accuracy_ci_high", "test_accuracy_seeds_mean", "test_accuracy_seeds_std",
            "balanced_accuracy", "macro_f1", "log_loss", "ece", "fit_s", "predict_s")
    return [{k: r[k] for k in keep if k in r} for r in rows]


@main.command()
@click.argument("model", type=click.Path())
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="CSV file to write [default: print CSV to stdout].")
@device_option
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--workers", type=click.IntRange(min=0), default=None)
@offline_option
@tta_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@quiet_option
def predict(model, inputs, top_k, out, device, batch_size, workers, offline, tta, as_json,
            quiet) -> None:
    """Classify images (INPUTS: files, folders or feature caches) with a saved MODEL.

    A head (.head) classifies a cache's stored features (.h5, labelled or not) without running
    its backbone; images and folders run through the head's own backbone first. A fine-tuned
    network (.net) classifies images end to end, and reads a cache's images again.
    """
    from pipeline.deploy.predict import predict_images, write_predictions

    _keep_freed_memory(device)
    rows = predict_images(model, inputs, top_k, device, batch_size, workers,
                          progress=False if quiet else None, offline=offline, tta=tta)
    if as_json:
        _emit_json({"model": str(model), "predictions": rows})
        return
    if not out:
        write_predictions(rows, sys.stdout, top_k)
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        write_predictions(rows, fh, top_k)
    click.echo(f"{len(rows)} predictions -> {out}")


def _depths(_ctx, _param, value: str) -> list:
    from pipeline.models.blocks import BlockError, parse_layers

    try:
        return [v if v == "all" or parse_layers(v) else int(v) for v in value.split(",")]
    except (ValueError, BlockError):
        raise click.BadParameter("give block counts, layer counts or 'all', such as "
                                 "0,1,2,all or 15L,25L") from None


def _numbers(kind: type, example: str, word: str | None = None):
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


def _finetune_default(name: str):
    return default(FinetuneConfig, name)


# The training settings that finetune and lr-find share: the range test trains the network
# the fine-tune would, so it takes the same ones.
_TRAINING_OPTIONS = (
    click.option("--backbone-lr-ratio", type=click.FloatRange(min=0, min_open=True),
                 default=_finetune_default("backbone_lr_ratio"), show_default=True,
                 help="Backbone learning rate as a fraction of the head's."),
    click.option("--optimizer", type=click.Choice(OPTIMIZERS),
                 default=_finetune_default("optimizer"), show_default=True),
    click.option("--weight-decay", type=click.FloatRange(min=0),
                 default=_finetune_default("weight_decay"),
                 show_default=True),
    click.option("--augment", type=click.Choice(AUGMENTS), default=_finetune_default("augment"),
                 show_default=True),
    click.option("--from-images", is_flag=True, default=_finetune_default("from_images"),
                 help="Run every image through the frozen trunk each epoch instead of "
                      "training from its cached activations (which --bn-train and --unfreeze "
                      "all do anyway)."),
    click.option("--views", type=click.IntRange(min=1), default=_finetune_default("views"),
                 show_default=True,
                 help="Augmented views of each training image cached for the epochs to draw "
                      "from (with --augment standard)."),
    click.option("--activation-dtype", type=click.Choice(ACTIVATION_DTYPES),
                 default=_finetune_default("activation_dtype"), show_default=True,
                 help="Stored type of the cached activations."),
    click.option("--bn-train", is_flag=True, default=_finetune_default("bn_train"),
                 help="Update BatchNorm statistics (default: frozen)."),
    click.option("--head-init", type=click.Choice(HEAD_INITS),
                 default=_finetune_default("head_init"), show_default=True,
                 help="Warm-start the head from a linear probe, or random."),
)


def training_options(command):
    """Apply :data:`_TRAINING_OPTIONS`, listed in --help in that order."""
    for option in reversed(_TRAINING_OPTIONS):
        command = option(command)
    return command


@main.command(name="finetune")
@click.argument("data", type=click.Path())
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True)
@weights_option
@click.option("--image-size", type=int, default=None)
@click.option("--unfreeze", callback=_depths, default=str(_finetune_default("unfreeze")),
              show_default=True,
              help="Top blocks to train, or top layers with parameters (15L); several "
                   "(0,1,2,all) run the freeze-depth experiment, one run each in "
                   "OUT/unfreeze-K/.")
@click.option("--out", type=click.Path(file_okay=False), default="results/finetune",
              show_default=True)
@click.option("--epochs", type=click.IntRange(min=0), default=_finetune_default("epochs"),
              show_default=True)
@click.option("--lr", callback=_numbers(float, "0.1,0.01,0.001", AUTO_LR),
              default=str(_finetune_default("lr")), show_default=True,
              help="Head learning rate; several (0.1,0.01,...) sweep it; auto: the "
                   "suggestion of a range test run first (pipeline lr-find), kept in "
                   "OUT/lr-find/.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=_finetune_default("schedule"),
              show_default=True)
@click.option("--patience", type=click.IntRange(min=1), default=_finetune_default("patience"),
              show_default=True, help="Epochs without a better validation loss before stopping.")
@training_options
@click.option("--batch-size", callback=_numbers(int, "16,32,64,100"),
              default=str(_finetune_default("batch_size")), show_default=True,
              help="Images per step; several sweep it.")
@click.option("--sweep", "sweep_mode", type=click.Choice(SWEEP_MODES), default=None,
              help="How several --lr, --batch-size and --unfreeze values combine: every "
                   "combination (grid, the default when --lr or --batch-size has several), "
                   "or one factor at a time in that order, each at the best so far on "
                   "validation. Runs in OUT/runs/, the table in OUT/sweep.md.")
@split_option
@click.option("--seed", type=int, default=_finetune_default("seed"), show_default=True)
@positive_option
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train each depth with this many seeds (seed, seed+1, ...: head, minibatch "
                   "order, augmentation) on the same splits; the others in OUT/unfreeze-K/"
                   "repeats/.")
@cache_dir_option
@device_option
@click.option("--workers", type=click.IntRange(min=0), default=None)
@compile_option
@engine_option
@offline_option
@click.option("--tta", type=click.Choice(TTA_MODES), default=None,
              help="Also score the test images with test-time augmentation (flip: each "
                   "image and its mirror; crops: ten crops and mirrors), as a second results "
                   "row finetune-K+tta.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
@quiet_option
@track_option
def finetune_command(data, unfreeze, out, as_json, lr, batch_size, sweep_mode, quiet, track,
                     **options) -> None:
    """Fine-tune the top blocks of a backbone on DATA (linear probe first, then fine-tune).

    Under torchrun (torchrun --standalone --nproc-per-node N -m pipeline finetune ...) the
    processes train one model with DistributedDataParallel; --batch-size is per process.
    """
    from pipeline.finetuning.run import sweep_depths

    _keep_freed_memory(options["device"])
    progress = False if quiet else None
    if sweep_mode or len(lr) > 1 or len(batch_size) > 1:
        _sweep(data, {"lr": lr, "batch_size": batch_size, "unfreeze": unfreeze},
               sweep_mode or "grid", out, as_json, progress=progress, track=track, **options)
        return
    try:
        rows = sweep_depths(data, unfreeze, out, progress=progress, track=track, lr=lr[0],
                            batch_size=batch_size[0], **options)
    except KeyboardInterrupt:
        click.echo("interrupted: the last epoch's checkpoint is kept; run the same command "
                   "again to resume", err=True)
        sys.exit(130)
    if not distributed.context().is_main:
        return
    if as_json:
        _emit_json(rows)
        return
    click.echo(_markdown(rows))
    click.echo(f"freeze-depth table, curves, checkpoints and models in {out}/")


def _sweep(data, factors: dict, mode: str, out, as_json: bool, repeats: int, **options) -> None:
    from pipeline.finetuning.sweep import sweep

    if repeats > 1:
        raise PipelineError("--repeats trains one setting with several seeds; run it on the "
                            "sweep's chosen setting, not with --sweep")
    try:
        result = sweep(data, factors, mode, out, **options)
    except KeyboardInterrupt:
        click.echo("interrupted: finished runs and the last epoch's checkpoint are kept; run "
                   "the same command again to resume the sweep", err=True)
        sys.exit(130)
    if not distributed.context().is_main:
        return
    if as_json:
        _emit_json({"best": result.best, "runs": result.rows})
        return
    click.echo(Path(result.files["sweep_md"]).read_text(), nl=False)
    click.echo(f"sweep table and plot in {out}/, each run in {out}/runs/")


@main.command(name="lr-find")
@click.argument("data", type=click.Path())
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True)
@weights_option
@click.option("--image-size", type=int, default=None)
@click.option("--unfreeze", callback=_depths, default=str(_finetune_default("unfreeze")),
              show_default=True, help="The one depth the fine-tune will train (as finetune's).")
@click.option("--out", type=click.Path(file_okay=False), default="results/lr-find",
              show_default=True)
@click.option("--steps", type=click.IntRange(min=2), default=LR_FIND_STEPS, show_default=True,
              help="Steps at most, one learning rate each; fewer once the loss diverges.")
@click.option("--start-lr", type=click.FloatRange(min=0, min_open=True),
              default=LR_FIND_START_LR, show_default=True,
              help="The head's rate at the first step.")
@click.option("--end-lr", type=click.FloatRange(min=0, min_open=True), default=LR_FIND_END_LR,
              show_default=True, help="The head's rate at the last step.")
@click.option("--batch-size", type=click.IntRange(min=1),
              default=_finetune_default("batch_size"), show_default=True)
@training_options
@split_option
@click.option("--seed", type=int, default=_finetune_default("seed"), show_default=True)
@cache_dir_option
@device_option
@click.option("--workers", type=click.IntRange(min=0), default=None)
@engine_option
@offline_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@quiet_option
def lr_find_command(data, unfreeze, as_json, quiet, **options) -> None:
    """Learning-rate range test on DATA: the network finetune would train, the rate growing
    each step; suggests the head's --lr (the curve in OUT/lr_find.png)."""
    from pipeline.finetuning.lr_find import find_lr

    if len(unfreeze) != 1:
        raise click.BadParameter("give one depth: the test is for one run",
                                 param_hint="--unfreeze")
    _keep_freed_memory(options["device"])
    result = find_lr(data, unfreeze=unfreeze[0], progress=False if quiet else None, **options)
    if not distributed.context().is_main:
        return
    summary = {"suggested_lr": result.suggested_lr, "steps_run": len(result.lrs),
               "diverged": result.diverged, "trained_from": result.trained_from,
               "seconds": result.seconds, "files": result.files}
    if as_json:
        _emit_json(summary)
        return
    stop = ", stopped when the loss diverged" if result.diverged else ""
    click.echo(f"suggested lr {result.suggested_lr:.3g} ({len(result.lrs)} steps{stop}, from "
               f"{result.trained_from}, {result.seconds:.0f} s); curve in "
               f"{result.files['lr_find_png']}")


@main.command(name="blocks")
@click.argument("backbone")
@click.option("--weights", default="none", show_default=True,
              help="Weights to build the model with (blocks do not depend on them).")
@click.option("--layers", is_flag=True,
              help="List the layers with parameters instead, topmost first, as --unfreeze NL "
                   "counts them, each with its block.")
def blocks_command(backbone, weights, layers) -> None:
    """The blocks of BACKBONE that --unfreeze counts, lowest first."""
    from pipeline.models.backbones import resolve_backbone
    from pipeline.models.blocks import describe_blocks, describe_layers

    spec = resolve_backbone(backbone, weights)
    model = spec.build_classifier()
    if layers:
        head = model.get_submodule(spec.adapter.classifier(model)[0])
        click.echo(_markdown(describe_layers(model, spec.family, head)), nl=False)
        return
    click.echo(_markdown(describe_blocks(model, spec.family)), nl=False)


@main.command(name="report")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder of the report [default: FOLDER/report].")
@click.option("--mistakes", type=click.IntRange(min=0), default=MISTAKES, show_default=True,
              help="Most confident wrong test predictions of the best row drawn in "
                   "mistakes.png.")
@click.option("--json", "as_json", is_flag=True)
def report_command(folder, out, mistakes, as_json) -> None:
    """One table of the heads and fine-tunes found under FOLDER, with a chart."""
    from pipeline.report import summary as report

    result = report.write_report(folder, out, mistakes)
    if as_json:
        _emit_json(result)
        return
    for sentence in result["summary"]:
        click.echo(sentence + "\n")
    click.echo(_markdown(result["rows"]), nl=False)
    if len(result["cache_keys"]) > 1:
        click.echo(f"note: rows come from {len(result['cache_keys'])} feature caches; only rows "
                   "with the same cache_key share features and test images")
    click.echo(f"report: {result['files']['report_md']}, {result['files']['report_png']}")


@main.group(name="cache", cls=_Group)
def cache_group() -> None:
    """List, inspect, verify, export and remove feature caches."""


@cache_group.command(name="list")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True)
def cache_list(cache_dir, as_json) -> None:
    """One line per cache file, and per engine export (--engine onnxruntime, openvino)."""
    from pipeline.store.catalog import list_caches

    rows = list_caches(cache_dir)
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        click.echo(f"no caches in {cache_dir}")
    for row in rows:
        if row["status"] == "complete" and row["kind"] == "export":
            click.echo(f"{row['path']}  export  {row['backbone']}  {row['network']}"
                       f"  {row['bytes'] / 1e6:.1f} MB  {row['created']}")
        elif row["status"] == "complete":
            unit = "images" if row["kind"] == "features" else "rows"
            click.echo(f"{row['path']}  {row['kind']}  {row['backbone']}  {row['images']} {unit}"
                       f"  {row['dim']}-d  {row['bytes'] / 1e6:.1f} MB  {row['created']}")
        else:
            click.echo(f"{row['path']}  {row['status']}")


@cache_group.command(name="info")
@click.argument("name")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True)
def cache_info(name, cache_dir, as_json) -> None:
    """Key spec, sizes and failures of one cache (NAME: a path, file name or key prefix), or
    what an engine's export was made from."""
    from pipeline.store import cache, catalog, paths

    path = catalog.find_cache(cache_dir, name)
    if paths.is_export(path) and path.is_file():  # auto's note: which engines, and why not
        click.echo(path.read_text(), nl=False)
        return
    info = catalog.export_info(path) if paths.is_export(path) else cache.cache_info(path)
    if as_json:
        _emit_json(info)
        return
    if "network_part" in info:
        for field in ("path", "backbone", "network_part", "input_shape", "created", "exporters",
                      "files", "bytes"):
            click.echo(f"{field:12s} {info[field]}")
        click.echo("network")
        click.echo(json.dumps(info["network"], indent=2, sort_keys=True))
        return
    for field in ("path", "key", "images", "failed", "dim", "dtype", "labelled", "splits",
                  "classes", "data_root", "created", "timings", "versions"):
        click.echo(f"{field:10s} {info[field]}")
    for split in ("train", "val", "test"):
        if split in info["split_sources"]:
            click.echo(f"{split:10s} {info['split_sources'][split]}")
    _list("ignored", [(p["path"], p["reason"]) for p in info["ignored_paths"]])
    duplicates = info["duplicates"]
    if duplicates is not None:
        click.echo(f"duplicates {duplicates['groups']} group(s) of identical images "
                   f"({duplicates['images']} images): {duplicates['across_splits']} across "
                   f"splits, {duplicates['across_classes']} across classes")
        for group in duplicates["shown"]:
            click.echo("           " + " = ".join(_display(p) for p in group["paths"]))
    click.echo("spec")
    click.echo(json.dumps(info["spec"], indent=2, sort_keys=True))


@cache_group.command(name="verify")
@click.argument("name", required=False)
@cache_dir_option
@click.option("--json", "as_json", is_flag=True)
def cache_verify(name, cache_dir, as_json) -> None:
    """Read every chunk of a cache (NAME: a path, file name or key prefix), or of every
    complete cache in --cache-dir, against its checksums. Exit 1 if any is damaged.

    A damaged feature cache is moved aside and built again by the extract command that made
    it (an activation cache by the next fine-tune); `pipeline cache rm` removes it.
    """
    from pipeline.store import catalog, integrity
    from pipeline.store.paths import SUFFIX

    paths = ([catalog.find_cache(cache_dir, name)] if name else
             [Path(r["path"]) for r in catalog.list_caches(cache_dir)
              if r["path"].endswith(SUFFIX)])
    reports = [integrity.verify_cache(p) for p in paths]
    if as_json:
        _emit_json(reports)
    else:
        if not reports:
            click.echo(f"no caches in {cache_dir}")
        for r in reports:
            status = {"ok": "ok", "damaged": "DAMAGED",
                      "unchecked": "readable, no checksums (written before they were "
                                   "stored: a changed number cannot be seen)"}[r["status"]]
            click.echo(f"{r['path']}  {status}  {r['bytes'] / 1e6:.1f} MB read in "
                       f"{r['seconds']:.2f} s")
            for problem in r["problems"]:
                click.echo(f"    {problem}")
    if any(r["status"] == "damaged" for r in reports):
        sys.exit(1)


def _list(title: str, rows: list[tuple[str, str]], most: int = 50) -> None:
    click.echo(f"{title:10s} {len(rows)}")
    for path, reason in rows[:most]:
        click.echo(f"           {_display(path)}: {reason}")
    if len(rows) > most:
        click.echo(f"           ... and {len(rows) - most} more (--json lists every one)")


@cache_group.command(name="export")
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="parquet",
              show_default=True)
@click.option("--out", type=click.Path(), required=True,
              help="File to write (parquet, csv), or folder (npy).")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True)
def cache_export(name, fmt, out, cache_dir, as_json) -> None:
    """Write a cache's features with path, label, split and valid, for numpy, pandas, polars.

    NAME: a path, file name or key prefix. npy writes a folder of .npy files (features.npy
    memory-maps); parquet one file with a fixed-size list column 'features'; csv one file
    with columns f0..f<D-1>.
    """
    from pipeline.store.catalog import find_cache
    from pipeline.store.export import export_cache

    result = export_cache(find_cache(cache_dir, name), out, fmt)
    if as_json:
        _emit_json(result)
        return
    click.echo(f"{result['rows']} rows x {result['dim']} features -> {out} ({fmt})")


@cache_group.command(name="rm")
@click.argument("names", nargs=-1, required=True)
@cache_dir_option
def cache_rm(names, cache_dir) -> None:
    """Remove caches and engines' exports (NAMES: paths, file names or key prefixes)."""
    from pipeline.store import catalog

    for name in names:
        path = catalog.find_cache(cache_dir, name)
        catalog.remove_cache(path)
        click.echo(f"removed {path}")


@main.command(name="backbones")
def list_backbones() -> None:
    """Backbone names that --backbone accepts (plus timm/<arch>)."""
    from pipeline.models.backbones import list_backbones as backbone_names

    for name in backbone_names():
        click.echo(name)


@main.command()
@click.argument("backbone")
@click.option("--weights", default="none", show_default=True,
              help="Weights to build the model with (names do not depend on them).")
def layers(backbone, weights) -> None:
    """Graph node names of BACKBONE that --layer accepts, in execution order."""
    from pipeline.models.backbones import layer_names, resolve_backbone

    for name in layer_names(resolve_backbone(backbone, weights)):
        click.echo(name)
