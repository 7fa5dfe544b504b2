"""``pipeline distill``: a student head on cached features taught by a teacher."""

from __future__ import annotations

import click

from pipeline.cli.options import quiet_option, track_option
from pipeline.cli.output import emit_json, markdown
from pipeline.core.options import STUDENTS, DistillOptions, default

__all__ = ["distill_command"]


def _numbers(_ctx, param, value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"give {param.name} as comma-separated numbers") from None


@click.command(name="distill")
@click.argument("teacher", type=click.Path(exists=True, dir_okay=False))
@click.argument("cache", type=click.Path())
@click.option("--unlabelled", "pool", type=click.Path(dir_okay=False), default=None,
              help="The cache of unlabelled images (same backbone, weights, layer and "
                   "preprocessing): the teacher labels them softly for the student.")
@click.option("--student", type=click.Choice(STUDENTS), default=default(DistillOptions, "student"),
              show_default=True, help="The student head on the cached features.")
@click.option("--temperatures", callback=_numbers, show_default=True,
              default=",".join(map(str, default(DistillOptions, "temperatures"))),
              help="Softmax temperatures tried; validation chooses one.")
@click.option("--alphas", callback=_numbers, show_default=True,
              default=",".join(map(str, default(DistillOptions, "alphas"))),
              help="Weights of the teacher's soft targets against the true labels tried "
                   "(1: soft targets only); validation chooses one.")
@click.option("--seed", type=int, default=default(DistillOptions, "seed"), show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder of the rows, the grid, the saved student and the run record.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@quiet_option
@track_option
def distill_command(teacher, cache, pool, student, temperatures, alphas, seed, out, as_json,
                    quiet, track) -> None:
    """Train a student head on CACHE's features from TEACHER's soft predictions.

    TEACHER is a fine-tuned network (.net, pipeline finetune) or a saved head (.head). Its
    predictions are stored beside the caches, so a second run only trains.
    """
    from pipeline.distillation.run import distill
    from pipeline.report.compact import compact_rows

    options = DistillOptions(student=student, temperatures=temperatures, alphas=alphas,
                             seed=seed)
    result = distill(cache, teacher=teacher, pool=pool, options=options,
                     progress=False if quiet else None)
    result.write(out, track=track)
    if as_json:
        emit_json(result.to_json())
        return
    click.echo(markdown(compact_rows(result.rows)))
    row = result.rows[0]
    click.echo(f"agreement with the teacher (top-1): {row['agreement']:.3f} "
               f"[{row['agreement_ci_low']:.3f}, {row['agreement_ci_high']:.3f}]; teacher's "
               f"predictions {'reused' if result.teacher['reused'] else 'computed and stored'}")
    click.echo(f"rows, grid and the student in {out}/ (pipeline export {row['model']})")
