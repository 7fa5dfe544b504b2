"""``pipeline advise``: heads only, the top block, or deeper, from the data's size and layers."""

from __future__ import annotations

import click

from pipeline.cli.options import (
    cache_dir_option,
    device_option,
    offline_option,
    quiet_option,
    split_option,
    weights_option,
)
from pipeline.cli.output import emit_json
from pipeline.core.options import ADVICE_OUT, DEFAULT_BACKBONE

__all__ = ["advise_command"]


@click.command("advise")
@click.argument("data", type=click.Path())
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True,
              help="efficientnet_lite0, any torchvision model name, or timm/<arch>[.<tag>].")
@weights_option
@click.option("--image-size", type=int, default=None,
              help="Crop size instead of the weights' recipe (e.g. 96 for small images).")
@cache_dir_option
@split_option
@device_option
@offline_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=ADVICE_OUT,
              show_default=True, help="Folder of advice.json|md and advice_layers.csv|md.")
@click.option("--json", "as_json", is_flag=True, help="Print the advice as one JSON object.")
@quiet_option
def advise_command(data, backbone, weights, image_size, offline, out, seed, as_json, quiet,
                   **extract) -> None:
    """Advise a strategy for DATA: an image folder (its blocks are extracted once into the
    cache, or found there) or a cache extracted with --layer blocks."""
    from pathlib import Path

    from pipeline.advice.run import advise
    from pipeline.core.options import AdviseOptions, ExtractOptions

    # One --seed: the carved splits of the extraction and the per-layer probes.
    options = AdviseOptions(seed=seed, extract=ExtractOptions(seed=seed, **extract))
    if Path(data).suffix != ".h5":  # a cache needs no backbone
        from pipeline.models.backbones import resolve_backbone

        backbone = resolve_backbone(backbone, weights, "blocks", image_size=image_size,
                                    seed=seed, offline=offline)
    advice = advise(data, backbone=backbone, options=options,
                    progress=False if quiet else None)
    advice.write(out)
    if as_json:
        emit_json(advice.to_json())
        return
    click.echo(advice.sentence())
    for row in advice.layers:
        click.echo(f"  {row['layer']:<12} {row['features']:>5} features  validation "
                   f"{row['val_accuracy']:.3f}  LogME {row['logme']:+.3f}")
    click.echo(f"advice in {out}/")
