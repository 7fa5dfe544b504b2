"""The learning-rate range test: the suggestion rule, the schedule, divergence, files, --lr auto."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli.main import main
from pipeline.core.options import FinetuneOptions
from pipeline.finetuning import lr_find
from pipeline.finetuning.lr_find import find_lr, lr_schedule, smooth, suggest_lr
from pipeline.models.backbones import resolve_backbone
from pipeline.store.persistence import load_network
from tests.conftest import make_folder, run_finetune

SETTINGS = {"workers": 0, "batch_size": 8}


def _find(data, out, **settings):
    """The range test of the tiny backbone with flat settings; its files written in ``out``."""
    test = {k: settings.pop(k) for k in ("steps", "start_lr", "end_lr") if k in settings}
    result = find_lr(data, backbone=resolve_backbone("resnet18", "none", image_size=32),
                     options=FinetuneOptions.from_flat(settings), progress=False, **test)
    result.write(out)
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("lrf") / "images", per_class=10)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One feature and activation cache for the module's runs (keyed, so shared safely)."""
    return tmp_path_factory.mktemp("lrf-cache")


@pytest.fixture
def few_steps(monkeypatch):
    """--lr auto runs the default test; a short one keeps the suite fast."""
    monkeypatch.setattr(lr_find, "STEPS", 8)


def _curve(center: float, lrs: np.ndarray) -> np.ndarray:
    """A loss that falls from 3 to 1 fastest at ``center`` (on a log axis), then diverges."""
    x, c = np.log10(lrs), np.log10(center)
    rise = np.clip(x - (c + 2.5), 0, None)
    return 2 - np.tanh(2 * (x - c)) + 40 * rise ** 2


@pytest.mark.parametrize("center", [1e-5, 1e-3, 1e-2])
def test_the_suggestion_is_the_steepest_descent_of_the_loss(center):
    lrs = np.logspace(-7, 0, 141)  # 0.05 decades a step: every center is a point
    losses = _curve(center, lrs)
    assert suggest_lr(lrs, losses) == pytest.approx(center, rel=1e-9)
    # Not the other common rule: the minimum's rate / 10 is a decade or more away.
    assert np.log10(lrs[np.argmin(losses)] / 10 / center) >= 1 - 1e-9
    noisy = losses + np.random.default_rng(0).normal(0, 0.01, len(lrs))
    assert 10 ** -0.25 < suggest_lr(lrs, noisy) / center < 10 ** 0.25


def test_a_loss_that_never_falls_suggests_a_tenth_of_its_minimum_rate():
    lrs = np.logspace(-6, 0, 40)
    # The minimum is looked for after the first 40 // 20 points, whose smoothing is young.
    assert suggest_lr(lrs, np.linspace(1.0, 5.0, 40)) == pytest.approx(lrs[2] / 10)
    with pytest.raises(ValueError, match="increasing"):
        suggest_lr(lrs[::-1], np.ones(40))


def test_a_flat_noisy_curve_suggests_a_tenth_of_its_minimum_not_its_first_rate():
    # As a warm-started head gives it: the loss hardly moves until the rate is too high.
    lrs = lr_schedule(1e-7, 1.0, 30)
    noise = np.random.default_rng(1).normal(0, 0.004, 30)
    raw = 0.675 + noise + np.where(lrs > 1e-3, 2 * np.log10(lrs / 1e-3) ** 2, 0)
    losses = smooth(raw)
    low = 1 + int(np.argmin(losses[1:]))
    assert losses[1] - losses[low] < lr_find.MIN_FALL * losses[1]  # flat, to within noise
    assert suggest_lr(lrs, losses) == pytest.approx(lrs[low] / 10)
    # The same curve with a real fall before it diverges gets the steepest point of the fall.
    falling = smooth(raw - 0.3 * (np.tanh(2 * (np.log10(lrs) + 5)) + 1))
    assert 1e-6 < suggest_lr(lrs, falling) < 1e-4


def test_a_diverged_last_step_is_left_out_of_the_suggestion():
    lrs = np.logspace(-7, 0, 141)
    losses = _curve(1e-4, lrs)
    losses[-1] = np.nan
    assert suggest_lr(lrs, losses) == pytest.approx(1e-4, rel=1e-9)


def test_the_schedule_grows_by_one_factor_from_start_to_end():
    lrs = lr_schedule(1e-6, 1e-1, 11)
    assert lrs[0] == 1e-6 and lrs[-1] == pytest.approx(1e-1, rel=1e-12)
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], 10 ** 0.5)


def test_the_smoothed_loss_is_bias_corrected():
    np.testing.assert_allclose(smooth([2.0, 2.0, 2.0], 0.9), [2.0, 2.0, 2.0])
    assert smooth([1.0, 3.0], 0.5)[1] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)


def test_a_range_test_from_cached_activations_writes_its_curve(data, cache, tmp_path):
    out = tmp_path / "found"
    result = _find(data, out, cache_dir=cache, steps=10, start_lr=1e-6, end_lr=1e-3,
                   unfreeze=1, **SETTINGS)
    # Ten steps over 24 training images in batches of 8: three passes and a bit.
    assert not result.diverged and len(result.lrs) == 10
    lrs = np.array(result.lrs)  # read back from the optimizer at each step
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e-3)
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], 1e3 ** (1 / 9))
    np.testing.assert_allclose(result.smoothed, smooth(result.losses))
    assert result.suggested_lr == suggest_lr(result.lrs, result.smoothed)
    assert result.trained_from == "cached activations"
    assert list(cache.glob("*.activations.h5"))
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.csv", "lr_find.json",
                                                     "lr_find.png"]  # no weights kept
    with open(out / "lr_find.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    np.testing.assert_allclose([float(r["lr"]) for r in rows], lrs)
    np.testing.assert_allclose([float(r["smoothed_loss"]) for r in rows], result.smoothed)
    saved = json.loads((out / "lr_find.json").read_text())
    assert saved["suggested_lr"] == result.suggested_lr and saved["steps_run"] == 10
    assert (out / "lr_find.png").read_bytes()[:4] == b"\x89PNG"


def test_from_images_the_test_reads_the_images(data, cache, tmp_path):
    result = _find(data, tmp_path / "o", cache_dir=cache, steps=3, start_lr=1e-6,
                   end_lr=1e-5, from_images=True, **SETTINGS)
    assert result.trained_from == "images (--from-images)"


def test_a_diverging_loss_stops_the_test_early(data, cache, tmp_path):
    result = _find(data, tmp_path / "o", cache_dir=cache, steps=60, start_lr=1e-1,
                   end_lr=1e8, unfreeze=1, **SETTINGS)
    assert result.diverged and len(result.lrs) < 60
    last, before = result.smoothed[-1], np.array(result.smoothed[:-1])
    assert not np.isfinite(last) or last > 4 * before.min()
    # It stopped at the first step past 4x the best so far, not later.
    assert np.all(before <= 4 * np.minimum.accumulate(before))
    assert json.loads((tmp_path / "o" / "lr_find.json").read_text())["diverged"] is True


def test_lr_auto_trains_at_the_found_rate_and_a_resumed_run_keeps_it(
        data, cache, tmp_path, few_steps, monkeypatch):
    def stop_after_first(epoch, _row):
        if epoch == 1:
            raise KeyboardInterrupt

    auto = {"cache_dir": cache, "epochs": 2, "unfreeze": 1, **SETTINGS}
    with pytest.raises(KeyboardInterrupt):
        run_finetune(data, tmp_path / "auto", lr="auto", on_epoch=stop_after_first, **auto)
    found = json.loads((tmp_path / "auto" / "lr-find" / "lr_find.json").read_text())

    def no_second_test(*_args, **_kwargs):
        raise AssertionError("the resumed run ran the range test again")

    with monkeypatch.context() as patch:
        patch.setattr(lr_find, "_range_test", no_second_test)
        resumed = run_finetune(data, tmp_path / "auto", lr="auto", **auto)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.row["lr"] == found["suggested_lr"]
    assert resumed.row["lr_found_by"] == "lr-find"
    assert resumed.history[0]["lr"] == found["suggested_lr"]
    # The test's steps were undone: the same as a run given that rate from the start.
    given = run_finetune(data, tmp_path / "given", lr=found["suggested_lr"], **auto)
    assert given.row["lr_found_by"] == "given"
    a = load_network(resumed.files["model"]).state_dict
    b = load_network(given.files["model"]).state_dict
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_the_cli_takes_lr_auto_alone(data, cache, tmp_path, few_steps):
    args = ["finetune", str(data), "--backbone", "resnet18", "--weights", "none",
            "--image-size", "32", "--workers", "0", "--batch-size", "8", "--epochs", "1",
            "--cache-dir", str(cache), "--out", str(tmp_path / "o"), "-q"]
    result = CliRunner().invoke(main, [*args, "--lr", "auto"])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "o" / "unfreeze-1" / "results.json").read_text())[0]
    found = json.loads((tmp_path / "o" / "unfreeze-1" / "lr-find" / "lr_find.json").read_text())
    assert row["lr"] == found["suggested_lr"] and row["lr_found_by"] == "lr-find"
    assert row["trained_from"] == found["trained_from"] == "cached activations"
    mixed = CliRunner().invoke(main, [*args, "--lr", "auto,0.01"])
    assert mixed.exit_code == 2 and "'auto' stands alone" in mixed.output


def test_the_lr_find_command(data, cache, tmp_path):
    out = tmp_path / "o"
    args = ["lr-find", str(data), "--backbone", "resnet18", "--weights", "none",
            "--image-size", "32", "--workers", "0", "--batch-size", "8", "--steps", "4",
            "--start-lr", "1e-5", "--end-lr", "1e-2", "--cache-dir", str(cache), "--out",
            str(out), "-q"]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["steps_run"] == 4 and summary["trained_from"] == "cached activations"
    assert summary["suggested_lr"] == json.loads((out / "lr_find.json").read_text())[
        "suggested_lr"]
    two = CliRunner().invoke(main, [*args, "--unfreeze", "1,2"])
    assert two.exit_code == 2 and "one depth" in two.output
