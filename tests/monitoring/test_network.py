"""Drift judged with a fine-tuned network (a .net) as the deployed model: its probabilities
come from running it on the image files, reference and new, as ``pipeline predict`` would."""

from __future__ import annotations

import numpy as np

from pipeline.core.options import PredictOptions
from pipeline.deploy.predict import predict_images
from pipeline.monitoring.options import DriftOptions
from pipeline.monitoring.run import drift
from tests.conftest import extract_tiny, make_folder, make_split_folder, run_finetune


def test_a_fine_tuned_network_is_judged_on_the_images(tmp_path):
    reference = make_split_folder(tmp_path / "ref", {"train": 16, "val": 8, "test": 8},
                                  classes=("a", "b"))
    run_finetune(reference, tmp_path / "ft", cache_dir=tmp_path / "c", workers=0, epochs=1,
                 unfreeze=1, split_seed=0)
    (network,) = (tmp_path / "ft" / "models").glob("*.net")
    cache = extract_tiny(reference, tmp_path / "c").cache_path
    new = make_folder(tmp_path / "new", classes=("a", "b"), per_class=8)
    result = drift(new, against=cache,
                   options=DriftOptions(permutations=30, gallery=4, model=network))
    assert result.model == network.name
    assert result.softmax and result.atc is not None and result.accuracy is not None
    # the measured accuracy is the network's own on NEW's files, as predict gives it
    files = sorted(new.rglob("*.png"))
    rows = predict_images(network, files, progress=False, options=PredictOptions(top_k=1)).rows
    right = np.mean([row["top_k"][0][0] == f.parent.name for row, f in zip(rows, files)])
    assert result.accuracy["new"] == right
    assert result.accuracy["n_new"] == len(files) == 16
