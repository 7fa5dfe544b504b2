"""``pipeline export``: a saved head or fine-tuned network as one ONNX or TorchScript file."""

from __future__ import annotations

import click

from pipeline.cli.options import offline_option
from pipeline.cli.output import emit_json
from pipeline.core.options import ExportOptions, default

__all__ = ["export_command"]


def _size(ctx, param, value):
    if value is None:
        return None
    try:
        height, width = (int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give HEIGHT,WIDTH, e.g. 28,28") from None
    return height, width


@click.command(name="export")
@click.argument("source", type=click.Path())
@click.option("--format", "format_", default=default(ExportOptions, "format"), show_default=True,
              help="onnx (runs with onnxruntime alone) or torchscript (torch alone).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="File to write [default: beside the model, .onnx or .pt].")
@click.option("--input-size", callback=_size, default=None, metavar="HEIGHT,WIDTH",
              help="Size of the images the file takes [default: the recipe's crop, square].")
@offline_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def export_command(source, format_, out, input_size, offline, as_json) -> None:
    """Export SOURCE (a .head or .net file, or a results folder: its most accurate model)
    as one file: uint8 images (N, H, W, 3) in, class probabilities out, preprocessing
    included."""
    from pipeline.deploy.export import export_model

    options = ExportOptions(format=format_, input_size=input_size, offline=offline)
    result = export_model(source, options=options)
    result.write(out)  # None: beside the model
    if as_json:
        emit_json(result.to_json())
        return
    height, width = result.input_size
    click.echo(f"exported {result.source} as {result.format} -> {result.path} (uint8 images "
               f"(N, {height}, {width}, 3) in, probabilities of {len(result.classes)} classes "
               "out)")
