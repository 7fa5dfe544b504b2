"""The labels-per-class protocol of docs/unlabelled.md: supervised, self-trained and distilled
heads with k labelled images per class and the rest of the training split as the pool.

For each k and each of ``--draws`` seeded draws, k training images per class keep their labels
(the draw of ``pipeline heads --shots``); the rest of the training split, labels set aside,
is the pool (its labels only score the pseudo-labels). On the cache's whole validation split
(which chooses every setting) and test split (which scores), it fits:

- **supervised**: the stage-2 head ``logreg`` (C chosen among 0.01, 0.1 and 1) on the k
  labels a class;
- **self-trained**: the same head self-trained on the pool (``self_train`` with thresholds
  0.5 and 0.9 and up to 2 rounds, a smaller grid than the default to keep 15 draws in minutes);
- **distilled**: a linear ``StudentHead`` taught by the teacher on the k labels and the pool
  (``distill``, temperatures 1 and 4, alphas 0.5 and 0.9), beside the same student without
  teacher;
- the **teacher**: ``logreg`` fitted on every label of the training split, the pool's
  included. It is the best model the cache gives, and it has seen the pool's labels: the
  distilled row measures how much of it a student absorbs with k labels, not a gain without
  labels.

Each cell is the mean test accuracy over the draws and the 95% interval of that mean over both
the draws and the test images (``pipeline.metrics.significance.draws_interval``).

Usage:
    python scripts/unlabelled_protocol.py CACHE [--shots 5,10,20] [--draws 5] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pipeline.core.options import DistillOptions, SelfTrainOptions
from pipeline.distillation.run import distill
from pipeline.heads.compare import CacheData, load_cache_data, sample_shots
from pipeline.heads.pool import pool_from_arrays
from pipeline.heads.self_training import fit_prepared, self_train
from pipeline.heads.spec import make_head
from pipeline.metrics.significance import draws_interval
from pipeline.report.tables import markdown_table
from pipeline.store.cache import FeatureSplit
from pipeline.store.persistence import save_head

# logreg with the Cs it chooses on the demo's features (0.01 to 1, see LogRegHead), not its
# 13: five fits a draw, fifteen draws a set, on a shared 2-core machine.
HEAD = "logreg:Cs=(0.01,0.1,1.0)"
COLUMNS = ("supervised", "self-trained", "distilled", "student alone", "teacher")


def teacher_head(data: CacheData, folder: Path, seed: int) -> Path:
    """``logreg`` on every training label, saved as a head file."""
    head = fit_prepared(make_head("logreg"), data, seed, data.train.X, data.train.y)
    return save_head(folder / f"teacher-{data.info['key'][:8]}.head", head,
                     {"head": "logreg", "backbone": data.backbone, "classes": data.classes,
                      "dim": int(data.train.X.shape[1]), "cache_key": data.info["key"],
                      "spec": data.info["spec"], "request": data.info.get("request", {})})


def one_draw(data: CacheData, teacher: Path, k: int, draw: int, seed: int) -> dict:
    """Per method, whether it got each test image right; and the self-training details."""
    keep = sample_shots(data.train.y, k, np.random.default_rng([seed, k, draw]))
    rest = np.setdiff1d(np.arange(len(data.train.y)), keep)
    train = FeatureSplit(data.train.X[keep], data.train.y[keep],
                         [data.train.paths[i] for i in keep])
    subset = CacheData(data.path, data.info, train, data.val, data.test, data.leaked)
    pool = pool_from_arrays(data.train.X[rest], data.train.y[rest],
                            [data.train.paths[i] for i in rest])
    y = data.test.y
    trained = self_train(subset, pool=pool, progress=False,
                         options=SelfTrainOptions(heads=(HEAD,), thresholds=(0.5, 0.9),
                                                  rounds=2, seed=seed + draw))
    taught = distill(subset, teacher=teacher, pool=pool, progress=False,
                     options=DistillOptions(student="linear", temperatures=(1.0, 4.0),
                                            seed=seed + draw))
    student, alone, teacher_row = (taught.predictions[r["head"]] for r in taught.rows)
    row = trained.rows[0]
    return {"correct": {
        "supervised": trained.predictions["logreg"].y_pred == y,
        "self-trained": trained.predictions[row["head"]].y_pred == y,
        "distilled": student.y_pred == y, "student alone": alone.y_pred == y,
        "teacher": teacher_row.y_pred == y},
        "chosen": row["chosen"], "pseudo_accuracy": row["pseudo_accuracy"],
        "distill_chosen": taught.rows[0]["chosen"], "agreement": taught.rows[0]["agreement"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("--shots", default="5,10,20")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the tables here too")
    parser.add_argument("--folder", type=Path, default=Path("results/unlabelled"),
                        help="where the teacher head and the per-draw JSON go")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = load_cache_data(args.cache)
    teacher = teacher_head(data, args.folder, args.seed)
    summary, details = [], []
    for k in (int(s) for s in args.shots.split(",")):
        draws = [one_draw(data, teacher, k, d, args.seed) for d in range(args.draws)]
        cells = {"k": k, "pool": len(data.train.y) - k * len(data.classes)}
        for method in COLUMNS:
            correct = np.array([d["correct"][method] for d in draws])
            low, high = draws_interval(correct)
            cells[method] = f"{correct.mean():.3f} [{low:.3f}, {high:.3f}]"
        summary.append(cells)
        details += [{"k": k, "draw": i, **{m: float(d["correct"][m].mean()) for m in COLUMNS},
                     "self-training": d["chosen"], "pseudo-label accuracy": d["pseudo_accuracy"],
                     "distillation": d["distill_chosen"], "agreement": d["agreement"]}
                    for i, d in enumerate(draws)]
        print(markdown_table(summary[-1:]), flush=True)
    text = (f"Cache {data.path.name} ({data.backbone}, {len(data.train.y)} training, "
            f"{len(data.val.y)} validation, {len(data.test.y)} test images); "
            f"{args.draws} draws per k; {time.perf_counter() - started:.0f} s.\n\n"
            + markdown_table(summary) + "\nPer draw:\n\n" + markdown_table(details))
    print(text)
    (args.folder / f"protocol-{data.info['key'][:8]}.json").write_text(
        json.dumps({"summary": summary, "draws": details}, indent=2, default=str))
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
