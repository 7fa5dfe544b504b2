"""``pipeline extract``: stage 1, bottleneck features cached in HDF5."""

from __future__ import annotations

import sys

import click

from pipeline.cli.options import (
    cache_dir_option,
    compile_option,
    device_option,
    engine_option,
    keep_freed_memory,
    offline_option,
    quiet_option,
    split_option,
    weights_option,
)
from pipeline.cli.output import display, emit_json
from pipeline.core import distributed
from pipeline.core.options import (
    DECODE_MODES,
    DEFAULT_BACKBONE,
    DTYPES,
    POOLS,
    ExtractOptions,
    default,
)

__all__ = ["extract"]


@click.command()
@click.argument("data", type=click.Path())
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True,
              help="efficientnet_lite0, any torchvision model name, or timm/<arch>[.<tag>].")
@weights_option
@click.option("--layer", default=None,
              help="Graph node to take instead of the bottleneck; several, comma-separated "
                   "(bottleneck among them), or blocks: every block and the bottleneck, from "
                   "one pass, side by side in one cache.")
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
@click.option("--decode", type=click.Choice(DECODE_MODES),
              default=default(ExtractOptions, "decode"), show_default=True,
              help="draft: a large JPEG is decoded by libjpeg at 1/2 to 1/8 scale (still twice "
                   "the recipe's resize), several times faster on photos; exact: every pixel. "
                   "Other formats decode the same either way.")
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
def extract(data, backbone, weights, layer, pool, image_size, offline, as_json, write_json,
            quiet, **options) -> None:
    """Extract bottleneck features of the images in DATA once and cache them in HDF5.

    DATA is a folder root/<class>/<image>, a split folder root/{train,val,test}/<class>/<image>,
    a CSV manifest path,label[,split], or shards: Parquet or Arrow files (a file, a folder, a
    save_to_disk folder) or WebDataset tars ('shards/train-{0000..0009}.tar', or their folder).

    Under torchrun (torchrun --standalone --nproc-per-node N -m pipeline extract ...) each
    process extracts a shard and rank 0 assembles the same cache one process writes.
    """
    from pipeline.extract.features import extract_features
    from pipeline.models.backbones import resolve_backbone

    opts = ExtractOptions(**options)
    keep_freed_memory(opts.device)
    try:
        # --seed also seeds a random init (--weights none), as the splits it carves.
        spec = resolve_backbone(backbone, weights, layer, pool, image_size, opts.seed,
                                offline=offline)
        result = extract_features(data, backbone=spec, options=opts,
                                  progress=False if quiet else None)
    except KeyboardInterrupt:
        click.echo("interrupted: the features written so far are kept; run the same command "
                   "again to resume", err=True)
        sys.exit(130)
    if not distributed.context().is_main:  # under torchrun rank 0 speaks for the job
        return
    if write_json:
        result.write_summary(write_json)
    if as_json:
        emit_json(result.to_json())
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
                   "only; `pipeline audit`, `pipeline predict` and `pipeline cache export` "
                   "take them")
    if result.ignored:
        counts = cache.ignored_counts(result.ignored)
        click.echo(f"ignored {len(result.ignored)} file(s) or folder(s): " + ", ".join(
            f"{n} {kind}" for kind, n in counts.items()) + f" (`pipeline cache info "
            f"{result.key[:8]}` lists them)", err=True)
    for path, reason in result.failures:
        click.echo(f"skipped unreadable {display(path)}: {reason}", err=True)
    if result.failed:
        click.echo(f"{result.failed} unreadable image(s) skipped and listed in the cache",
                   err=True)
    _warn_duplicates(result.duplicates, result.key)


def _warn_duplicates(duplicates: dict | None, key: str) -> None:
    if not duplicates or not (duplicates["across_splits"] or duplicates["across_classes"]):
        return
    shown = "; ".join(" = ".join(display(p) for p in g["paths"])
                      for g in duplicates["shown"][:3])
    click.echo(f"warning: identical images under other paths: {duplicates['across_splits']} "
               f"group(s) span two splits (a test image that is also a training image inflates "
               f"every score), {duplicates['across_classes']} span two classes: {shown}"
               f"{' ...' if len(duplicates['shown']) > 3 else ''} (`pipeline cache info "
               f"{key[:8]}` lists them)", err=True)
