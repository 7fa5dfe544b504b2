"""Stage 3: what is frozen stays bit-for-bit, warm start, resume, depth sweep, predict, report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.core.errors import DataError, OptionError, PipelineError
from pipeline.core.options import (
    ExtractOptions,
    FinetuneOptions,
    OptimizerOptions,
    PredictOptions,
    TrainingOptions,
)
from pipeline.deploy.predict import predict_images
from pipeline.finetuning.run import finetune, sweep_depths
from pipeline.finetuning.setup import FinetuneError
from pipeline.heads import LinearProbe
from pipeline.models.backbones import build_classifier, replace_classifier, resolve_backbone
from pipeline.report.summary import compare_results
from pipeline.store.cache import read_splits
from pipeline.store.persistence import load_model, load_network
from tests.conftest import fit_and_write, make_folder, make_split_folder, run_finetune

FT = {"workers": 0, "batch_size": 8, "epochs": 2, "patience": 5, "lr": 1e-2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("ft") / "images", per_class=10)


def _run(data, tmp_path, name="o", **kw):
    return run_finetune(data, tmp_path / name, cache_dir=tmp_path / "c", **{**FT, **kw})


def _feature_cache(cache_dir):
    """The feature cache (fine-tuning also writes ``*.activations.h5`` beside it)."""
    return next(p for p in cache_dir.glob("*.h5") if not p.name.endswith(".activations.h5"))


def _initial_state():
    return build_classifier(resolve_backbone("resnet18", "none", image_size=32)).state_dict()


def _final_state(result):
    return load_network(result.files["model"]).state_dict


def _is_bn_buffer(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def test_frozen_weights_and_bn_buffers_are_unchanged_and_unfrozen_blocks_change(data, tmp_path):
    before, after = _initial_state(), _final_state(_run(data, tmp_path, unfreeze=1))
    trainable = set(dict(build_classifier(resolve_backbone("resnet18", "none"))
                         .layer4.named_parameters(prefix="layer4")))
    for key, value in before.items():
        if key.startswith("fc."):
            continue  # the old 1000-class head was replaced
        if key in trainable:
            assert not torch.equal(after[key], value), f"{key} was not trained"
        else:  # frozen weights and every BatchNorm statistic, layer4's included
            assert torch.equal(after[key], value), f"{key} changed"
    assert after["fc.weight"].shape == (3, 512)


def test_bn_train_updates_the_statistics_of_trained_blocks_only(data, tmp_path):
    before = _initial_state()
    after = _final_state(_run(data, tmp_path, unfreeze=1, bn_train=True))
    assert not torch.equal(after["layer4.0.bn1.running_mean"], before["layer4.0.bn1.running_mean"])
    assert torch.equal(after["layer3.0.bn1.running_mean"], before["layer3.0.bn1.running_mean"])


def test_warm_start_predicts_what_the_linear_probe_predicts(data, tmp_path):
    result = _run(data, tmp_path, epochs=0)
    splits = read_splits(_feature_cache(tmp_path / "c"))
    probe = LinearProbe(random_state=0).fit(splits["train"].X, splits["train"].y,
                                            X_val=splits["val"].X, y_val=splits["val"].y)
    np.testing.assert_array_equal(result.test_pred, probe.predict(splits["test"].X))
    assert result.row["best_epoch"] == -1 and result.row["epochs_run"] == 0


# The former flat FinetuneConfig's fields and defaults, as checkpoints and scripts wrote them.
FORMER_DEFAULTS = {
    "unfreeze": 1, "epochs": 10, "lr": 1e-3, "backbone_lr_ratio": 0.1, "optimizer": "adamw",
    "weight_decay": 1e-4, "schedule": "cosine", "step_size": 5, "clip_grad": 1.0,
    "patience": 3, "augment": "standard", "bn_train": False, "head_init": "linear",
    "batch_size": 32, "seed": 0, "from_images": False, "views": 4,
    "activation_dtype": "float16"}


def _epochs(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_the_options_by_concern_train_as_the_former_flat_config(data, tmp_path):
    assert FinetuneOptions().flat() == FORMER_DEFAULTS  # no default moved
    spec = resolve_backbone("resnet18", "none", image_size=32)
    extract = ExtractOptions(cache_dir=tmp_path / "c", workers=0)
    by_concern = FinetuneOptions(optim=OptimizerOptions(lr=1e-2),
                                 training=TrainingOptions(batch_size=8, epochs=2, patience=5),
                                 extract=extract)
    flat = FinetuneOptions.from_flat({**FORMER_DEFAULTS, "lr": 1e-2, "batch_size": 8,
                                      "epochs": 2, "patience": 5})
    flat = flat.replace(extract=extract)
    assert flat == by_concern
    first = finetune(data, backbone=spec, options=by_concern, progress=False)
    again = finetune(data, backbone=spec, options=flat, progress=False)
    assert len(first.history) == 2 and _epochs(first.history) == _epochs(again.history)
    assert first.row["test_accuracy"] == again.row["test_accuracy"]
    assert not list(tmp_path.glob("*/checkpoint.pt"))  # no workdir: nothing written


def test_a_checkpoint_of_the_former_flat_config_resumes(data, tmp_path):
    def stop_after_first(epoch, _row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(data, tmp_path, name="old", epochs=2, on_epoch=stop_after_first)
    # Rewrite the checkpoint as the flat FinetuneConfig wrote it: one flat config.
    path = tmp_path / "old" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    args = json.loads(state["args"])
    assert set(args["config"]) == {"optim", "network", "training"}
    args["config"] = {k: v for concern in args["config"].values() for k, v in concern.items()}
    assert set(args["config"]) == set(FORMER_DEFAULTS) - {"from_images", "views",
                                                          "activation_dtype"}
    state["args"] = json.dumps(args, sort_keys=True)
    torch.save(state, path)
    resumed = _run(data, tmp_path, name="old", epochs=2)
    assert resumed.record.fields["resumed_from_epoch"] == 1
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    saved = json.loads((tmp_path / "old" / "run.json").read_text())["settings"]["options"]
    assert saved["optim"]["lr"] == FT["lr"] and saved["activations"]["views"] == 4


def test_random_head_init_differs_from_the_probe(data, tmp_path):
    warm = _final_state(_run(data, tmp_path, name="w", epochs=0))
    cold = _final_state(_run(data, tmp_path, name="r", epochs=0, head_init="random"))
    assert not torch.equal(warm["fc.weight"], cold["fc.weight"])


def test_resume_after_interruption_gives_the_same_weights(data, tmp_path):
    def stop_after_first(epoch, _row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(data, tmp_path, name="resumed", epochs=3, on_epoch=stop_after_first)
    resumed = _run(data, tmp_path, name="resumed", epochs=3)
    whole = _run(data, tmp_path, name="whole", epochs=3)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    a, b = _final_state(resumed), _final_state(whole)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert resumed.history[-1]["val_loss"] == whole.history[-1]["val_loss"]


def test_early_stopping_restores_the_best_epoch(data, tmp_path):
    # lr 2 diverges at once, so validation loss worsens after the first epoch whatever the
    # last bits of the trunk's activations (at lr 0.5 the run was chaotic: when it stopped
    # depended on them).
    result = _run(data, tmp_path, epochs=6, patience=1, lr=2.0)
    best = min(result.history, key=lambda h: h["val_loss"])
    assert result.row["best_epoch"] == best["epoch"]
    assert len(result.history) == best["epoch"] + 1  # stopped one epoch after the best
    checkpoint = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)
    saved = _final_state(result)
    assert all(torch.equal(saved[k], v) for k, v in checkpoint["best"]["state"].items())
    last = checkpoint["model"]
    assert not all(torch.equal(saved[k], last[k]) for k in last)  # not the last epoch's


def test_a_resumed_run_stops_at_the_epoch_an_uninterrupted_one_does(data, tmp_path):
    # From images: this trajectory (too high an lr) stops early; cached views take another.
    settings = {"epochs": 8, "patience": 2, "lr": 0.1, "from_images": True}
    whole = _run(data, tmp_path, name="whole", **settings)
    best = whole.row["best_epoch"]
    assert best > 1 and len(whole.history) == best + 2 < 8  # stopped by patience

    def stop_after_one_bad_epoch(epoch, _row):
        if epoch == best + 1:  # one epoch short of patience: the count must survive the restart
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(data, tmp_path, name="resumed", on_epoch=stop_after_one_bad_epoch, **settings)
    resumed = _run(data, tmp_path, name="resumed", **settings)
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in whole.history]
    assert resumed.row["best_epoch"] == whole.row["best_epoch"]
    a, b = _final_state(resumed), _final_state(whole)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_bad_requests_are_clear_errors(data, tmp_path):
    with pytest.raises(PipelineError, match="blocks"):
        _run(data, tmp_path, unfreeze=9)
    for name, value, message in (
            ("backbone_lr_ratio", -2.0, "backbone-lr-ratio must be a number > 0, not -2.0"),
            ("weight_decay", -1.0, "weight-decay must be a number >= 0"),
            ("clip_grad", 0.0, "clip-grad must be a number > 0")):
        with pytest.raises(OptionError, match=message):
            _run(data, tmp_path, name="bad", **{name: value})
    no_val = make_split_folder(tmp_path / "s", counts={"train": 4, "test": 2})
    with pytest.raises(DataError, match="no validation split"):  # val given a fraction of 0
        _run(no_val, tmp_path, name="nv", split_fractions=(1.0, 0.0, 0.0))
    _run(data, tmp_path, name="same", epochs=1)
    with pytest.raises(FinetuneError, match="another run"):
        _run(data, tmp_path, name="same", epochs=1, lr=0.1)
    (tmp_path / "same" / "checkpoint.pt").write_bytes(b"broken")
    with pytest.raises(FinetuneError, match="cannot read checkpoint"):
        _run(data, tmp_path, name="same", epochs=1)


def test_depth_sweep_table(data, tmp_path):
    options = FinetuneOptions.from_flat({**FT, "epochs": 1, "cache_dir": tmp_path / "c"})
    result = sweep_depths(data, [0, 1, "all"], options=options, workdir=tmp_path / "sweep",
                          backbone=resolve_backbone("resnet18", "none", image_size=32),
                          progress=False)
    assert not (tmp_path / "sweep" / "freeze_depth.md").exists()  # computed, not written
    result.write(tmp_path / "sweep")
    table = result.table
    assert [r["blocks_unfrozen"] for r in table] == [0, 1, 4]
    params = [r["trainable_parameters"] for r in table]
    assert params[0] == 512 * 3 + 3 and params[0] < params[1] < params[2]
    assert (tmp_path / "sweep" / "freeze_depth.md").exists()
    assert (tmp_path / "sweep" / "unfreeze-all" / "history.png").exists()


def test_predict_takes_a_fine_tuned_model(data, tmp_path):
    result = _run(data, tmp_path, epochs=1)
    assert result.files["model"].endswith("-finetune-1.net")
    saved = load_model(result.files["model"])
    assert saved.meta["unfrozen"] == 1 and saved.meta["classes"] == result.model.classes
    rows = predict_images(result.files["model"], [data], options=PredictOptions(workers=0)).rows
    by_path = {r["path"]: r["prediction"] for r in rows}
    splits = read_splits(_feature_cache(tmp_path / "c"))
    expected = [saved.meta["classes"][c] for c in result.test_pred]
    assert [by_path[str(data / p)] for p in splits["test"].paths] == expected


def test_the_result_holds_the_best_network_ready_to_predict(data, tmp_path):
    result = _run(data, tmp_path, epochs=2)
    network = result.model
    assert not network.module.training
    assert {p.device.type for p in network.module.parameters()} == {"cpu"}
    saved = _final_state(result)  # the best epoch's weights, as saved
    assert all(torch.equal(v, saved[k]) for k, v in network.module.state_dict().items())
    in_memory = predict_images(network, [data], options=PredictOptions(workers=0)).rows
    from_file = predict_images(result.files["model"], [data],
                               options=PredictOptions(workers=0)).rows
    assert [r["prediction"] for r in in_memory] == [r["prediction"] for r in from_file]


def test_report_puts_heads_and_fine_tunes_in_one_table(data, tmp_path):
    _run(data, tmp_path, name="runs/finetune", epochs=1)
    cache = _feature_cache(tmp_path / "c")
    fit_and_write([cache], tmp_path / "runs" / "heads", heads=("logreg",))
    result = compare_results(tmp_path / "runs")
    result.write(tmp_path / "runs" / "report")
    assert {r["method"] for r in result.rows} == {"transfer", "fine-tune"}
    assert len(result.cache_keys) == 1
    assert (tmp_path / "runs" / "report" / "report.png").exists()


def test_replace_classifier_for_timm_and_torchvision():
    for name in ("resnet18", "mobilenet_v3_small"):
        spec = resolve_backbone(name, "none")
        model = build_classifier(spec)
        head = replace_classifier(spec, model, 4)
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 4) and head.out_features == 4


class _CountingWrapper(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_compile_wraps_what_the_training_steps_call(data, tmp_path, monkeypatch):
    # Compiling on the CPU takes minutes here; a stand-in proves the steps go through it.
    wrappers = []
    monkeypatch.setattr(torch, "compile", lambda net: wrappers.append(_CountingWrapper(net))
                        or wrappers[-1])
    _run(data, tmp_path, epochs=1, compile=True)
    train_images = 24  # 0.8 of the 30 images
    assert len(wrappers) == 1 and wrappers[0].calls == -(-train_images // FT["batch_size"])


def test_a_fine_tune_writes_per_class_scores_and_the_positive_class_recall(tmp_path):
    import csv

    from pipeline.metrics.scoring import RowPredictions

    two = make_folder(tmp_path / "two", classes=("ok", "defect"), per_class=10)
    result = run_finetune(two, tmp_path / "o", cache_dir=tmp_path / "c", unfreeze=1,
                          positive="ok", **{**FT, "epochs": 1})
    row = result.row
    stored = RowPredictions.load(tmp_path / "o" / row["predictions"])
    label = stored.classes.index("ok")
    positives = stored.y_true == label
    assert row["positive_class"] == "ok"
    assert row["positive_recall"] == pytest.approx(np.mean(stored.y_pred[positives] == label))
    with open(result.files["per_class"]) as fh:
        per_class = list(csv.DictReader(fh))
    assert [r["class"] for r in per_class] == stored.classes
    assert sum(int(r["support"]) for r in per_class) == len(stored.y_true)
    assert (tmp_path / "o" / "confusion_matrix.png").stat().st_size > 0
    with pytest.raises(PipelineError, match="positive must be one of the classes, 'defect', "
                                            "'ok', not 'cat'"):
        run_finetune(two, tmp_path / "x", cache_dir=tmp_path / "c", positive="cat", **FT)
    assert not (tmp_path / "x").exists()  # refused before any training


def test_random_weights_and_every_block_is_the_from_scratch_baseline(data, tmp_path):
    before = _initial_state()
    scratch = _run(data, tmp_path, name="scratch", unfreeze="all", epochs=1)
    after = _final_state(scratch)
    assert (scratch.row["method"], scratch.row["head"]) == ("from scratch", "from-scratch")
    assert scratch.row["blocks_unfrozen"] == 4
    # the stem trains, and BatchNorm statistics are learnt: there are none pretrained to keep
    assert not torch.equal(after["conv1.weight"], before["conv1.weight"])
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])
    model = build_classifier(resolve_backbone("resnet18", "none"))
    assert scratch.row["trainable_parameters"] == sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith("fc.")) + 512 * 3 + 3
    # random weights at a smaller depth are an ordinary fine-tune: the stem stays as it was
    tuned = _run(data, tmp_path, name="tuned", unfreeze=1, epochs=1)
    assert tuned.row["method"] == "fine-tune"
    assert torch.equal(_final_state(tuned)["conv1.weight"], before["conv1.weight"])
    report = compare_results(tmp_path)
    report.write(tmp_path / "report")
    assert {r["method"] for r in report.rows} == {"from scratch", "fine-tune"}
