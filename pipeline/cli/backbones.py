"""``pipeline backbones``, ``layers`` and ``blocks``: what a backbone offers."""

from __future__ import annotations

import click

from pipeline.cli.output import markdown
from pipeline.models.backbones import build_classifier
from pipeline.models.families import family_of

__all__ = ["blocks_command", "layers", "list_backbones"]


@click.command(name="blocks")
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
    model = build_classifier(spec)
    if layers:
        head = model.get_submodule(family_of(spec).classifier(model)[0])
        click.echo(markdown(describe_layers(model, spec.family, head)), nl=False)
        return
    click.echo(markdown(describe_blocks(model, spec.family)), nl=False)


@click.command(name="backbones")
def list_backbones() -> None:
    """Backbone names that --backbone accepts (plus timm/<arch>)."""
    from pipeline.models.backbones import list_backbones as backbone_names

    for name in backbone_names():
        click.echo(name)


@click.command()
@click.argument("backbone")
@click.option("--weights", default="none", show_default=True,
              help="Weights to build the model with (names do not depend on them).")
def layers(backbone, weights) -> None:
    """Graph node names of BACKBONE that --layer accepts, in execution order."""
    from pipeline.models.backbones import layer_names, resolve_backbone

    for name in layer_names(resolve_backbone(backbone, weights)):
        click.echo(name)
