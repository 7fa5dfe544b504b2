"""``pipeline audit``: label issues, duplicates and leaks, outliers and a map, from a cache."""

from __future__ import annotations

import click

from pipeline.cli.options import quiet_option
from pipeline.cli.output import display, emit_json
from pipeline.core.options import AUDIT_OUT, AuditOptions, default

__all__ = ["audit_command"]


@click.command("audit")
@click.argument("cache", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default=AUDIT_OUT,
              show_default=True, help="Folder of the tables, galleries and map.")
@click.option("--folds", type=click.IntRange(min=2), default=default(AuditOptions, "folds"),
              show_default=True, help="K of the stratified K-fold out-of-fold probabilities.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True),
              default=default(AuditOptions, "threshold"), show_default=True,
              help="Cosine similarity of L2-normalised features from which two images are "
                   "near-duplicates.")
@click.option("--neighbours", type=click.IntRange(min=1),
              default=default(AuditOptions, "neighbours"), show_default=True,
              help="Nearest images per image, for outliers and near-duplicate pairs.")
@click.option("--top", type=click.IntRange(min=1), default=default(AuditOptions, "top"),
              show_default=True, help="Suspects in each gallery and outlier list.")
@click.option("--map/--no-map", "draw_map", default=default(AuditOptions, "map"),
              show_default=True, help="Draw the 2-D t-SNE map of the features.")
@click.option("--map-points", type=click.IntRange(min=2),
              default=default(AuditOptions, "map_points"), show_default=True,
              help="Images on the map at most (a seeded sample beyond, suspects kept).")
@click.option("--seed", type=int, default=default(AuditOptions, "seed"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the findings as one JSON object.")
@quiet_option
def audit_command(cache, out, folds, threshold, neighbours, top, draw_map, map_points, seed,
                  as_json, quiet) -> None:
    """Audit the images of a feature cache (CACHE: an .h5 file) from its features alone."""
    from pipeline.auditing.run import audit

    options = AuditOptions(folds=folds, threshold=threshold, neighbours=neighbours, top=top,
                           map=draw_map, map_points=map_points, seed=seed)
    result = audit(cache, options=options, progress=False if quiet else None)
    result.write(out)
    if as_json:
        emit_json(result.to_json())
        return
    summary = result.to_json()
    if result.label_issues_skipped:
        click.echo(result.label_issues_skipped)
    else:
        click.echo(f"label issues: {len(result.label_issues)} of {result.images} images "
                   f"(out-of-fold accuracy {result.out_of_fold_accuracy:.4f}, "
                   f"{result.folds} folds)")
    different = sum(bool(d.get("different_labels")) for d in result.duplicates)
    click.echo(f"duplicates: {summary['exact_pairs']} exact and {summary['near_pairs']} near "
               f"pairs (cosine >= {result.threshold}), {different} with different labels")
    for pair, kinds in result.leakage.items():
        click.echo(f"leakage {pair}: {kinds['exact']} exact, {kinds['near']} near")
    if result.outliers:
        o = result.outliers[0]
        click.echo(f"outliers: the farthest is {display(o.path)} (score {o.score:.3f}, "
                   f"robust z {o.robust_z:.1f})")
    click.echo(f"tables, galleries and map in {out}/")
