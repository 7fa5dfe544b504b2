"""``pipeline finetune`` and ``pipeline lr-find``: stage 3, its sweeps and the range test."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.cli.options import (
    cache_dir_option,
    compile_option,
    depths,
    device_option,
    engine_option,
    finetune_default,
    keep_freed_memory,
    numbers,
    offline_option,
    positive_option,
    quiet_option,
    split_option,
    track_option,
    training_options,
    weights_option,
)
from pipeline.cli.output import emit_json, markdown
from pipeline.core import distributed
from pipeline.core.errors import PipelineError
from pipeline.core.options import (
    AUTO_LR,
    DEFAULT_BACKBONE,
    LR_FIND_END_LR,
    LR_FIND_START_LR,
    LR_FIND_STEPS,
    SCHEDULES,
    SWEEP_MODES,
    TTA_MODES,
    ActivationOptions,
    ExtractOptions,
    FinetuneOptions,
    NetworkOptions,
    OptimizerOptions,
    TrainingOptions,
)

__all__ = ["finetune_command", "lr_find_command"]


@click.command(name="finetune")
@click.argument("data", type=click.Path())
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True)
@weights_option
@click.option("--image-size", type=int, default=None)
@click.option("--unfreeze", callback=depths, default=str(finetune_default("unfreeze")),
              show_default=True,
              help="Top blocks to train, or top layers with parameters (15L); several "
                   "(0,1,2,all) run the freeze-depth experiment, one run each in "
                   "OUT/unfreeze-K/.")
@click.option("--out", type=click.Path(file_okay=False), default="results/finetune",
              show_default=True)
@click.option("--epochs", type=click.IntRange(min=0), default=finetune_default("epochs"),
              show_default=True)
@click.option("--lr", callback=numbers(float, "0.1,0.01,0.001", AUTO_LR),
              default=str(finetune_default("lr")), show_default=True,
              help="Head learning rate; several (0.1,0.01,...) sweep it; auto: the "
                   "suggestion of a range test run first (pipeline lr-find), kept in "
                   "OUT/lr-find/.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=finetune_default("schedule"),
              show_default=True)
@click.option("--patience", type=click.IntRange(min=1), default=finetune_default("patience"),
              show_default=True, help="Epochs without a better validation loss before stopping.")
@training_options
@click.option("--batch-size", callback=numbers(int, "16,32,64,100"),
              default=str(finetune_default("batch_size")), show_default=True,
              help="Images per step; several sweep it.")
@click.option("--sweep", "sweep_mode", type=click.Choice(SWEEP_MODES), default=None,
              help="How several --lr, --batch-size and --unfreeze values combine: every "
                   "combination (grid, the default when --lr or --batch-size has several), "
                   "or one factor at a time in that order, each at the best so far on "
                   "validation. Runs in OUT/runs/, the table in OUT/sweep.md.")
@split_option
@click.option("--seed", type=int, default=finetune_default("seed"), show_default=True)
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
                     repeats, positive, tta, **flags) -> None:
    """Fine-tune the top blocks of a backbone on DATA (linear probe first, then fine-tune).

    Under torchrun (torchrun --standalone --nproc-per-node N -m pipeline finetune ...) the
    processes train one model with DistributedDataParallel; --batch-size is per process.
    """
    keep_freed_memory(flags["device"])
    progress = False if quiet else None
    backbone = _backbone(flags)
    options = _options(flags, lr=lr[0], batch_size=batch_size[0], unfreeze=unfreeze[0])
    if sweep_mode or len(lr) > 1 or len(batch_size) > 1:
        if repeats > 1:
            raise PipelineError("--repeats trains one setting with several seeds; run it on "
                                "the sweep's chosen setting, not with --sweep")
        _sweep(data, {"lr": lr, "batch_size": batch_size, "unfreeze": unfreeze},
               sweep_mode or "grid", out, as_json, backbone=backbone, options=options,
               progress=progress, track=track, positive=positive, tta=tta)
        return
    from pipeline.finetuning.run import sweep_depths

    try:
        result = sweep_depths(data, unfreeze, backbone=backbone, options=options,
                              repeats=repeats, workdir=out, progress=progress, track=track,
                              positive=positive, tta=tta)
    except KeyboardInterrupt:
        click.echo("interrupted: the last epoch's checkpoint is kept; run the same command "
                   "again to resume", err=True)
        sys.exit(130)
    result.write(out)
    if not distributed.context().is_main:
        return
    if as_json:
        emit_json(result.table)
        return
    click.echo(markdown(result.table))
    click.echo(f"freeze-depth table, curves, checkpoints and models in {out}/")


def _backbone(flags: dict):
    """The backbone the flags name, resolved (its random init, if any, seeded by --seed)."""
    from pipeline.models.backbones import resolve_backbone

    return resolve_backbone(flags.pop("backbone"), flags.pop("weights"),
                            image_size=flags.pop("image_size"), seed=flags["seed"],
                            offline=flags.pop("offline"))


def _options(flags: dict, **chosen) -> FinetuneOptions:
    """The fine-tune's options, by concern, from the command's flags (``chosen``: the one
    value of a flag that may list several)."""
    given = {**flags, **chosen}

    def optional(*names: str) -> dict:
        # lr-find has no --epochs, --patience, --schedule or --compile: the options' defaults
        return {name: given[name] for name in names if name in given}

    return FinetuneOptions(
        optim=OptimizerOptions(lr=given["lr"], backbone_lr_ratio=given["backbone_lr_ratio"],
                               optimizer=given["optimizer"],
                               weight_decay=given["weight_decay"], **optional("schedule")),
        network=NetworkOptions(unfreeze=given["unfreeze"], bn_train=given["bn_train"],
                               head_init=given["head_init"]),
        training=TrainingOptions(batch_size=given["batch_size"], augment=given["augment"],
                                 seed=given["seed"], **optional("epochs", "patience")),
        activations=ActivationOptions(from_images=given["from_images"], views=given["views"],
                                      activation_dtype=given["activation_dtype"]),
        extract=ExtractOptions(cache_dir=given["cache_dir"], device=given["device"],
                               workers=given["workers"], engine=given["engine"],
                               split_fractions=given["split_fractions"], seed=given["seed"],
                               **optional("compile")))


def _sweep(data, factors: dict, mode: str, out, as_json: bool, **kwargs) -> None:
    from pipeline.finetuning.sweep import sweep

    try:
        result = sweep(data, factors, mode=mode, workdir=out, **kwargs)
    except KeyboardInterrupt:
        click.echo("interrupted: finished runs and the last epoch's checkpoint are kept; run "
                   "the same command again to resume the sweep", err=True)
        sys.exit(130)
    result.write(out)
    if not distributed.context().is_main:
        return
    if as_json:
        emit_json({"best": result.best, "runs": result.rows})
        return
    click.echo(Path(result.files["sweep_md"]).read_text(), nl=False)
    click.echo(f"sweep table and plot in {out}/, each run in {out}/runs/")


@click.command(name="lr-find")
@click.argument("data", type=click.Path())
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True)
@weights_option
@click.option("--image-size", type=int, default=None)
@click.option("--unfreeze", callback=depths, default=str(finetune_default("unfreeze")),
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
              default=finetune_default("batch_size"), show_default=True)
@training_options
@split_option
@click.option("--seed", type=int, default=finetune_default("seed"), show_default=True)
@cache_dir_option
@device_option
@click.option("--workers", type=click.IntRange(min=0), default=None)
@engine_option
@offline_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@quiet_option
def lr_find_command(data, unfreeze, out, as_json, quiet, steps, start_lr, end_lr,
                    **flags) -> None:
    """Learning-rate range test on DATA: the network finetune would train, the rate growing
    each step; suggests the head's --lr (the curve in OUT/lr_find.png)."""
    from pipeline.finetuning.lr_find import find_lr

    if len(unfreeze) != 1:
        raise click.BadParameter("give one depth: the test is for one run",
                                 param_hint="--unfreeze")
    keep_freed_memory(flags["device"])
    backbone = _backbone(flags)
    options = _options(flags, lr=start_lr, unfreeze=unfreeze[0])
    result = find_lr(data, backbone=backbone, options=options, steps=steps, start_lr=start_lr,
                     end_lr=end_lr, progress=False if quiet else None)
    result.write(out)
    if not distributed.context().is_main:
        return
    if as_json:
        summary = result.to_json()
        emit_json({**{k: summary[k] for k in ("suggested_lr", "steps_run", "diverged",
                                              "trained_from", "seconds")},
                   "files": result.files})
        return
    stop = ", stopped when the loss diverged" if result.diverged else ""
    click.echo(f"suggested lr {result.suggested_lr:.3g} ({len(result.lrs)} steps{stop}, from "
               f"{result.trained_from}, {result.seconds:.0f} s); curve in "
               f"{result.files['lr_find_png']}")
