"""The compact table: one cell per score with its interval, only the columns some row fills."""

from __future__ import annotations

from pipeline.report.compact import compact_rows, format_interval, format_p

BEST = {"method": "fine-tune", "backbone": "resnet18", "head": "finetune-1", "chosen": "unfreeze=1",
        "test_accuracy": 0.9141, "test_accuracy_ci_low": 0.9085, "test_accuracy_ci_high": 0.9195,
        "diff_vs_best": 0.0, "diff_vs_best_ci_low": 0.0, "diff_vs_best_ci_high": 0.0,
        "p_vs_best": 1.0, "macro_f1": 0.9133, "ece": 0.0213, "fit_s": 812.44,
        "log_loss": 0.25, "log_loss_ci_low": 0.24, "cache_key": "a" * 20, "predictions": "p.npz"}
HEAD = {**BEST, "method": "transfer", "head": "logreg", "chosen": "C=0.01",
        "test_accuracy": 0.9021, "test_accuracy_ci_low": 0.8961, "test_accuracy_ci_high": 0.9078,
        "diff_vs_best": -0.012, "diff_vs_best_ci_low": -0.0165, "diff_vs_best_ci_high": -0.0074,
        "p_vs_best": 2e-7, "fit_s": 41.0}


def test_scores_and_intervals_share_a_cell_and_the_rest_stays_in_the_csv():
    best, head = compact_rows([BEST, HEAD])
    assert list(best) == ["method", "backbone", "head", "setting", "accuracy [95% CI]",
                          "Δ vs best [95% CI]", "p", "macro-F1", "ECE", "fit s"]
    assert head["accuracy [95% CI]"] == "0.902 [0.896, 0.908]"
    assert head["Δ vs best [95% CI]"] == "-0.012 [-0.017, -0.007]"
    assert (head["p"], head["macro-F1"], head["ECE"], head["fit s"]) == (
        "< 0.001", "0.913", "0.021", "41.0")
    assert (best["Δ vs best [95% CI]"], best["p"]) == ("best", "")  # the reference itself


def test_columns_no_row_fills_are_left_out():
    heads_only = [{k: v for k, v in HEAD.items() if "vs_best" not in k and k != "method"}]
    assert list(compact_rows(heads_only)[0]) == [
        "backbone", "head", "setting", "accuracy [95% CI]", "macro-F1", "ECE", "fit s"]


def test_rows_of_several_caches_name_their_cache_and_seeds_show_their_spread():
    other = {**HEAD, "cache_key": "b" * 20, "repeats": 3, "test_accuracy_seeds_mean": 0.9012,
             "test_accuracy_seeds_std": 0.0021}
    rows = compact_rows([BEST, other])
    assert [r["cache"] for r in rows] == ["aaaaaaaa", "bbbbbbbb"]
    assert [r["seeds"] for r in rows] == ["", "0.901 ± 0.002 (3)"]


def test_formatting_of_blank_and_signed_values():
    assert format_interval("", 0.1, 0.2) == ""
    assert format_interval(0.5, "", "") == "0.500"
    assert format_interval(0.01, -0.002, 0.03, signed=True) == "+0.010 [-0.002, +0.030]"
    assert (format_p(0.0004), format_p(0.05), format_p(float("nan"))) == ("< 0.001", "0.050", "")
