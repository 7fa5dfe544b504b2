"""``pipeline heads``: stage 2, heads fitted on cached features and compared."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.options import positive_option, quiet_option, track_option
from pipeline.cli.output import emit_json, markdown
from pipeline.core.options import (
    HEADS_OUT,
    SELF_TRAIN_THRESHOLDS,
    HeadsOptions,
    SelfTrainOptions,
    default,
)

__all__ = ["heads"]


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


def _thresholds(_ctx, _param, value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter("give thresholds as numbers in [0, 1], such as 0.5,0.8,0.95"
                                 ) from None


@click.command()
@click.argument("caches", nargs=-1, required=True, type=click.Path())
@click.option("--heads", "head_specs", default=",".join(default(HeadsOptions, "heads")),
              show_default=True,
              help="Comma-separated heads: logreg, mlp, linear, multilayer, or an import "
                   "path with parameters (sklearn.svm.LinearSVC:C=0.1); separate several "
                   "with ';'. The default adds multilayer on a cache of several layers.")
@click.option("--out", type=click.Path(file_okay=False), default=HEADS_OUT,
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
@click.option("--exclude", type=click.Path(dir_okay=False), default=None,
              help="A CSV with a path column (pipeline audit's label_issues.csv): leave those "
                   "training and validation images out of the fits; test images stay.")
@click.option("--unlabelled", "pool", type=click.Path(dir_okay=False), default=None,
              help="The cache of unlabelled images (pipeline extract FOLDER) of the same "
                   "backbone, weights, layer and preprocessing: each head is also self-trained "
                   "on it, a row <head>+self-train beside <head> (out/self-train/).")
@click.option("--semi", type=click.Choice(["self-train"]), default="self-train",
              show_default=True, help="How the --unlabelled pool is used.")
@click.option("--thresholds", callback=_thresholds,
              default=",".join(map(str, SELF_TRAIN_THRESHOLDS)), show_default=True,
              help="Confidence floors of the pseudo-labels tried; validation chooses one.")
@click.option("--rounds", type=click.IntRange(min=1),
              default=default(SelfTrainOptions, "rounds"), show_default=True,
              help="Self-training rounds at most; validation chooses how many (0: none).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
@quiet_option
@track_option
def heads(caches, head_specs, out, shots, draws, seed, repeats, positive, exclude, pool, semi,
          thresholds, rounds, as_json, quiet, track) -> None:
    """Fit heads on cached features (CACHES: one or more .h5 files) and compare them."""
    from pipeline.heads import compare
    from pipeline.report.compact import compact_rows

    options = HeadsOptions(heads=tuple(_split_heads(head_specs)), shots=tuple(shots),
                           draws=draws, seed=seed, repeats=repeats, positive=positive,
                           exclude=exclude)
    if track:  # --track without MLflow stops before any fit, not after them
        from pipeline.store import tracking

        tracking.check(track)
    if pool is not None:  # a pool that cannot be used stops the command before any fit
        from pipeline.heads.pool import open_pool
        from pipeline.store.cache import cache_info

        open_pool(pool, caches[0], cache_info(caches[0]))
    result = compare.fit_heads(caches, options=options, progress=False if quiet else None)
    result.write(out, track=track)
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} activation cache(s) (fine-tuning's block "
                   f"inputs, not features): {', '.join(result.skipped)}", err=True)
    semi_result = None
    if pool is not None:  # the supervised rows above; the self-trained ones beside them
        semi_result = _self_train(result, caches, pool, options, thresholds, rounds, out,
                                  quiet, track)
    if as_json:
        emit_json({**result.to_json(), **({"self_train": semi_result.to_json()}
                                          if semi_result else {})})
        return
    click.echo(markdown(compact_rows(result.rows)))
    if semi_result is not None:
        click.echo(markdown(compact_rows(semi_result.rows)))
    if result.shots:
        click.echo(markdown(result.shots))
    click.echo(f"tables, plots and saved heads in {out}/")


def _self_train(result, caches, pool, options: HeadsOptions, thresholds, rounds, out, quiet,
                track):
    """Self-train the heads of ``options`` on the one feature cache with ``pool``; write the
    rows to ``out/self-train``."""
    from pipeline.core.errors import PipelineError
    from pipeline.heads.self_training import self_train

    features = [c for c in caches if str(c) not in result.skipped]
    if len(features) != 1:
        raise PipelineError(f"--unlabelled takes one labelled cache, not {len(features)}; "
                            "run pipeline heads once per cache")
    semi = SelfTrainOptions(heads=tuple(options.heads), thresholds=thresholds, rounds=rounds,
                            seed=options.seed)
    found = self_train(features[0], pool=pool, options=semi, progress=False if quiet else None)
    found.write(Path(out) / "self-train", track=track)
    return found


def _split_heads(value: str) -> list[str]:
    # Commas separate heads, except inside one head's parameters: use ';' between heads that
    # carry parameters, e.g. "logreg;sklearn.svm.LinearSVC:C=0.1,max_iter=5000".
    parts = value.split(";") if ";" in value or ":" in value else value.split(",")
    return [p.strip() for p in parts if p.strip()]
