"""``pipeline drift``: is new data different from the reference, does it hurt, what to retrain."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.options import quiet_option
from pipeline.cli.output import emit_json
from pipeline.core.options import DEVICES
from pipeline.monitoring.options import SPLITS, DriftOptions

__all__ = ["drift_command"]

_DEFAULTS = DriftOptions()


def _splits(ctx, param, value: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in value.split(",") if s.strip())


@click.command("drift")
@click.argument("new", type=click.Path())
@click.option("--against", required=True, type=click.Path(),
              help="The reference: a feature cache, or a results folder whose best row's "
                   "model is judged (with the cache it was fitted on).")
@click.option("--model", type=click.Path(dir_okay=False), default=None,
              help="A .head or .net to judge instead of the best row's (with a cache and no "
                   "model, a logreg head is fitted on its training split).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder of drift.json|md and drift_gallery.png [default: AGAINST/drift for "
                   "a results folder, else results/drift].")
@click.option("--reference", "reference", default=",".join(_DEFAULTS.reference),
              show_default=True, callback=_splits,
              help=f"The reference splits NEW is compared with ({', '.join(SPLITS)}).")
@click.option("--level", type=float, default=_DEFAULTS.level, show_default=True,
              help="Significance level of shifted, harmful and each layer.")
@click.option("--permutations", type=int, default=_DEFAULTS.permutations, show_default=True,
              help="Permutations of the MMD and the novelty tests.")
@click.option("--neighbours", type=int, default=_DEFAULTS.neighbours, show_default=True,
              help="Novelty test: an image's novelty is its mean cosine distance to this many "
                   "nearest reference images.")
@click.option("--tail", type=float, default=_DEFAULTS.tail, show_default=True,
              help="Novelty test: an image is an outlier beyond the reference's 1 - TAIL "
                   "quantile of novelty.")
@click.option("--tolerance", type=float, default=_DEFAULTS.tolerance, show_default=True,
              help="An accuracy drop smaller than this is not harmful.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where NEW's features are cached [default: beside the reference cache].")
@click.option("--device", type=click.Choice(DEVICES), default=_DEFAULTS.device,
              show_default=True)
@click.option("--gallery", type=int, default=_DEFAULTS.gallery, show_default=True,
              help="New images most unlike the reference drawn in drift_gallery.png.")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print drift.json's object.")
@quiet_option
def drift_command(new, against, out, as_json, quiet, **settings) -> None:
    """Compare NEW (an image folder, manifest or cache) with the reference a model was built
    on: is it different, does it hurt, and what to retrain."""
    from pipeline.monitoring.run import drift

    options = DriftOptions(**settings)
    result = drift(new, against=against, options=options, progress=False if quiet else None)
    if out is None:
        out = Path(against) / "drift" if Path(against).is_dir() else Path("results/drift")
    result.write(out)
    if as_json:
        emit_json(result.to_json())
        return
    for note in result.notes:
        click.echo(note)
    click.echo(result.sentence)
    click.echo(f"drift.json|md and the gallery in {out}/")
