"""What the drift stage found, and how it reads: drift.json, drift.md with its one sentence,
and the gallery of the most different new images (:class:`DriftResult` writes all three)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.core.atomic import save_figure, write_json, write_text
from pipeline.core.contract import Result, to_plain
from pipeline.data.layouts import display

__all__ = ["DriftResult", "sentence"]

JSON, MARKDOWN, GALLERY = "drift.json", "drift.md", "drift_gallery.png"


@dataclass
class DriftResult(Result):
    """What :func:`drift` found; ``write(out)`` writes drift.json, drift.md and the gallery."""

    new: str
    against: str
    reference_cache: str
    new_cache: str
    model: str
    reference_splits: list[str]
    n_reference: int
    n_new: int
    level: float
    shifted: bool
    harmful: bool | None  # None: neither labels nor a validation split to judge by
    action: str  # none, watch, refit, fine-tune, judge
    unfreeze: int | None  # where fine-tuning should start (--unfreeze)
    sentence: str
    domain_classifier: dict
    mmd: dict
    label_shift: dict
    softmax: dict
    atc: dict | None = None
    accuracy: dict | None = None
    refit: dict | None = None
    layers: list[dict] = field(default_factory=list)
    new_classes: dict[str, int] = field(default_factory=dict)  # never seen by the model
    notes: list[str] = field(default_factory=list)
    gallery: list[dict] = field(default_factory=list)  # the most different new images
    gallery_root: str = ""
    seconds: float = 0.0
    novelty: dict = field(default_factory=dict)  # new images unlike any reference image

    def to_json(self) -> dict:
        return to_plain(asdict(self))

    def write(self, out: str | os.PathLike) -> list[Path]:
        """``drift.json`` (this result), ``drift.md`` and ``drift_gallery.png`` in ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files = [write_json(out / JSON, self.to_json()),
                 write_text(out / MARKDOWN, markdown(self))]
        if self.gallery:
            files.append(save_figure(gallery_figure(self), out / GALLERY, dpi=110))
        return files


def _p(p: float) -> str:
    return f"p = {p:.2g}" if p >= 1e-4 else "p < 0.0001"


def evidence(result: DriftResult) -> str:
    """The four measures in a clause."""
    c, m, g, v = result.domain_classifier, result.mmd, result.label_shift, result.novelty
    return (f"domain classifier AUC {c['auc']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}], "
            f"{_p(c['p_value'])}; MMD² {m['mmd2']:.4f} [{m['ci_low']:.4f}, {m['ci_high']:.4f}], "
            f"{_p(m['p_value'])}; predicted classes G = {g['g']:.1f}, {_p(g['p_value'])}; "
            f"novel images {v['excess']:+.1%} [{v['ci_low']:+.1%}, {v['ci_high']:+.1%}], "
            f"{_p(v['p_value'])}")


def accuracy_clause(result: DriftResult) -> str:
    if result.accuracy is not None:
        a = result.accuracy
        return (f"accuracy {a['new']:.3f} [{a['new_ci_low']:.3f}, {a['new_ci_high']:.3f}] on "
                f"NEW against {a['reference']:.3f} on the reference")
    if result.atc is not None:
        a = result.atc
        return (f"accuracy expected by ATC {a['expected']:.3f} [{a['ci_low']:.3f}, "
                f"{a['ci_high']:.3f}] on NEW against {a['reference_expected']:.3f} on the "
                "reference")
    return ""


def sentence(result: DriftResult) -> str:
    """What to do, in one sentence with its numbers."""
    n = f"NEW ({result.n_new} images)"
    unseen = (f"; it holds {len(result.new_classes)} class(es) the model has never seen "
              f"({', '.join(result.new_classes)})" if result.new_classes else "")
    if result.action == "none":
        tail = f"; {accuracy_clause(result)}" if accuracy_clause(result) else ""
        return (f"No shift: {n} cannot be told from the reference ({evidence(result)})"
                f"{unseen}{tail}.")
    if result.action == "judge":
        return (f"{n} differs from the reference ({evidence(result)}){unseen}, but whether it "
                "hurts cannot be judged: it has no labels and the reference no validation "
                "split to calibrate ATC.")
    if result.action == "watch":
        what = "A shift that does not hurt" if result.shifted else "No shift that hurts"
        return (f"{what}: {n} differs from the reference ({evidence(result)}), but the "
                f"{accuracy_clause(result)} is no significant drop: keep the model and watch.")
    harm = f"A harmful shift: {n} ({evidence(result)}){unseen}; {accuracy_clause(result)}"
    if result.action == "refit":
        r = result.refit
        return (f"{harm}; a {r['head']} head refitted on the reference and half of NEW scores "
                f"{r['accuracy']:.3f} on the other half (the deployed model "
                f"{r['deployed_accuracy']:.3f}): refitting the head on old + new features "
                "suffices.")
    if result.refit is not None:
        r = result.refit
        tried = (f"; a {r['head']} head refitted on the reference and half of NEW reaches only "
                 f"{r['accuracy']:.3f} on the other half")
    else:
        tried = "; label some of NEW to try refitting the head on old + new features first"
    where = next((r["layer"] for r in result.layers if r["shifted"]), None)
    start = (f"from {where} up" if where and result.unfreeze and result.unfreeze > 1
             else "with the top block")
    return (f"{harm}{tried}: it needs fine-tuning, starting {start} "
            f"(--unfreeze {result.unfreeze}).")


def markdown(result: DriftResult) -> str:
    """drift.md: the sentence, the notes, and a table per measure."""
    from pipeline.report.tables import markdown_table

    def interval(low, high, digits=3):
        return f"[{low:.{digits}f}, {high:.{digits}f}]"

    c, m, g, s = result.domain_classifier, result.mmd, result.label_shift, result.softmax
    v = result.novelty
    measures = [
        {"measure": "domain classifier AUC", "statistic": f"{c['auc']:.3f}",
         "95% interval": interval(c["ci_low"], c["ci_high"]), "p": f"{c['p_value']:.3g}",
         "p (Holm)": f"{c['p_holm']:.3g}"},
        {"measure": "proxy A-distance", "statistic": f"{c['proxy_a_distance']:.3f}",
         "95% interval": interval(c["pad_ci_low"], c["pad_ci_high"]), "p": "", "p (Holm)": ""},
        {"measure": f"MMD² (RBF, σ {m['bandwidth']:.3g}, {m['permutations']} permutations)",
         "statistic": f"{m['mmd2']:.5f}", "95% interval": interval(m["ci_low"], m["ci_high"], 5),
         "p": f"{m['p_value']:.3g}", "p (Holm)": f"{m['p_holm']:.3g}"},
        {"measure": f"predicted classes (G-test, {g['dof']} dof): total variation",
         "statistic": f"{g['total_variation']:.3f}",
         "95% interval": interval(g["ci_low"], g["ci_high"]), "p": f"{g['p_value']:.3g}",
         "p (Holm)": f"{g['p_holm']:.3g}"},
        {"measure": f"novelty: excess share of new images beyond the reference's "
                    f"{1 - v['tail']:.0%} quantile of distance to {v['neighbours']} nearest "
                    f"({v['outliers']} of {v['n_new']}, {v['outlier_share']:.3f} against "
                    f"{v['expected_share']:.3f} without a shift)",
         "statistic": f"{v['excess']:+.3f}", "95% interval": interval(v["ci_low"], v["ci_high"]),
         "p": f"{v['p_value']:.3g}", "p (Holm)": f"{v['p_holm']:.3g}"},
        {"measure": "softmax: mean confidence change (KS per class, Holm)",
         "statistic": f"{s['confidence_change']:+.3f}",
         "95% interval": interval(s["ci_low"], s["ci_high"]), "p": f"{s['p_value']:.3g}",
         "p (Holm)": ""},
    ]
    parts = [f"# Drift\n\n{result.sentence}\n",
             f"NEW: {display(result.new)} ({result.n_new} images); reference: "
             f"{display(result.reference_cache)}, split(s) {', '.join(result.reference_splits)} "
             f"({result.n_reference} images); model: {result.model}; level {result.level}.\n"]
    parts += [f"- {note}" for note in result.notes]
    parts += ["", "## Is it different?", "", markdown_table(measures)]
    if result.layers:
        parts += ["", "## Where in the network", "", markdown_table([
            {"layer": r["layer"], "AUC": f"{r['auc']:.3f}",
             "AUC interval": interval(r["auc_ci_low"], r["auc_ci_high"]),
             "MMD²": f"{r['mmd2']:.5f}", "novel": f"{r['novelty_excess']:+.3f}",
             "p (Holm)": f"{r['p_holm']:.3g}",
             "shifted": "yes" if r["shifted"] else "no"} for r in result.layers])]
    parts += ["", "## Predicted classes", "", markdown_table([
        {"class": r["class"], "reference": f"{r['reference_share']:.3f}",
         "new": f"{r['new_share']:.3f}", "difference": f"{r['difference']:+.3f}",
         "95% interval": interval(r["ci_low"], r["ci_high"])} for r in g["per_class"]])]
    parts += ["", "## Does it hurt?", ""]
    if result.accuracy is not None:
        a = result.accuracy
        parts.append(f"- measured accuracy on NEW {a['new']:.3f} "
                     f"{interval(a['new_ci_low'], a['new_ci_high'])} against {a['reference']:.3f}"
                     f" on the reference: {a['difference']:+.3f} "
                     f"{interval(a['ci_low'], a['ci_high'])}, p (drop) = {a['p_drop']:.3g}")
    if result.atc is not None:
        a = result.atc
        parts.append(f"- expected by ATC (threshold {a['threshold']:.3f} on validation): "
                     f"{a['expected']:.3f} {interval(a['ci_low'], a['ci_high'])} against "
                     f"{a['reference_expected']:.3f} on the reference")
    if result.refit is not None:
        r = result.refit
        parts.append(f"- refit ({r['head']}, reference train + {r['fit_images']} of NEW): "
                     f"{r['accuracy']:.3f} on the other {r['held_images']} against the "
                     f"deployed {r['deployed_accuracy']:.3f} (McNemar p = "
                     f"{r['p_vs_deployed']:.3g}); {r['reference_accuracy']:.3f} on the "
                     "reference")
    parts.append(f"- harmful: {result.harmful}")
    if result.gallery:
        parts += ["", f"The {len(result.gallery)} new images most unlike the reference: "
                  f"[{GALLERY}]({GALLERY})."]
    return "\n".join(parts) + "\n"


def gallery_figure(result: DriftResult):
    """The most different new images, each with its score and predicted class."""
    from pipeline.report.tiles import tile_sheet

    measure = result.gallery[0].get("measure", "domain classifier") if result.gallery else ""
    what = ("novelty: mean cosine distance to the nearest reference images"
            if measure == "novelty" else "domain classifier score")
    return tile_sheet([g["path"] for g in result.gallery],
                      [f"{g['score']:.2f} {g['predicted'][:18]}" for g in result.gallery],
                      result.gallery_root,
                      f"New images most unlike the reference ({what})",
                      columns=6, size=128, tile_inches=(2.2, 2.5), caption_size=7,
                      empty="no new image")
