"""``pipeline predict``: a saved head or fine-tuned network on new images."""

from __future__ import annotations

import sys

import click

from pipeline.cli.options import (
    device_option,
    keep_freed_memory,
    offline_option,
    quiet_option,
    tta_option,
)
from pipeline.cli.output import emit_json

__all__ = ["predict"]


@click.command()
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
    from pipeline.core.options import PredictOptions
    from pipeline.deploy.predict import predict_images

    keep_freed_memory(device)
    options = PredictOptions(top_k=top_k, device=device, batch_size=batch_size,
                             workers=workers, offline=offline, tta=tta)
    result = predict_images(model, inputs, options=options, progress=False if quiet else None)
    if as_json:
        emit_json(result.to_json())
        return
    if not out:
        result.to_csv(sys.stdout)
        return
    result.write(out)
    click.echo(f"{len(result.rows)} predictions -> {out}")
