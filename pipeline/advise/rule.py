"""How deep to train, from a multi-layer cache: the data's size, its distance from the
pretraining, and the transfer-learning matrix that turns the two into a strategy.

Two numbers, both measured on the cache (``pipeline extract --layer blocks``), never on the test
split:

- **size**: the median number of training images per class; ``small`` below
  :data:`SMALL_PER_CLASS`.
- **similarity**: the linear probe of every block's pooled output, scored on validation. The
  penultimate layer is where the pretrained network is most specific to its own task (Yosinski
  et al. 2014); when a lower block probes better by more than :func:`gap_margin`, the blocks
  above it encode features this data does not want, and the data counts as ``dissimilar``.
  LogME (:mod:`pipeline.advise.logme`) of each layer is reported beside it, a second view that
  needs no training.

The matrix (the seeds' rule, after CS231n's transfer-learning notes): small and similar wants
the bottleneck and a light head (``--unfreeze 0``); large and dissimilar wants more of the
network retrained (``--unfreeze`` the blocks above the best-probing one, at least 2); in between,
fine-tune the top block (``--unfreeze 1``). The advice names the depths to sweep around it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.advise.logme import logme
from pipeline.core.errors import DataError
from pipeline.heads.compare import load_cache_data
from pipeline.heads.layers import probe_layers
from pipeline.report.plots import figure, save
from pipeline.report.tables import write_table

__all__ = ["SMALL_PER_CLASS", "Advice", "advise_cache", "gap_margin", "strategy"]

# Training images per class below which a set is small: the regime of Keras' "very little
# data" recipe (1,000 a class), where fine-tuning more than the top block over-fits.
SMALL_PER_CLASS = 1000
_MIN_GAP = 0.01  # a gap under one point is no evidence on any validation split
_WIDE_MARGIN = 0.1  # beyond this margin the probe gap says little: the advice says so


@dataclass
class Advice:
    """The strategy for one cache and the numbers that chose it."""

    cache: str
    backbone: str
    classes: int
    train_images: int
    per_class_median: float
    per_class_min: int
    small: bool
    bottleneck_val_accuracy: float
    best_layer: str
    best_val_accuracy: float
    gap: float  # best layer's validation accuracy minus the bottleneck's
    margin: float
    similar: bool
    blocks: int  # the backbone's blocks (``--unfreeze`` counts them)
    blocks_above_best: int
    unfreeze: int
    strategy: str
    sweep: list[int]
    reason: str
    layers: list[dict] = field(default_factory=list)  # per layer: validation accuracy, LogME
    files: dict[str, str] = field(default_factory=dict)

    def sentence(self) -> str:
        """The advice in one sentence, with its numbers."""
        return (f"Advice ({self.backbone}): {self.strategy} (--unfreeze {self.unfreeze}; sweep "
                f"{','.join(map(str, self.sweep))}): {self.reason}.")


def gap_margin(accuracy: float, n_val: int) -> float:
    """How far a lower layer must probe above the bottleneck to count: two binomial standard
    errors of the bottleneck's validation accuracy, and at least one point."""
    se = math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / max(n_val, 1))
    return max(_MIN_GAP, 2 * se)


def strategy(small: bool, similar: bool, blocks_above_best: int, blocks: int
             ) -> tuple[int, str]:
    """The matrix: ``(unfreeze, name)`` for a set's size and similarity."""
    if small and similar:
        return 0, "heads only"
    if not small and not similar:
        k = min(blocks, max(2, blocks_above_best))
        return k, "fine-tune all" if k == blocks else f"fine-tune the top {k} blocks"
    return 1, "fine-tune the top block"


def advise_cache(cache: str | os.PathLike, out: str | os.PathLike | None = None,
                 seed: int = 0) -> Advice:
    """Advice for the data of a cache extracted with ``--layer blocks``.

    Parameters
    ----------
    cache
        A feature cache whose layers are every block's output and the bottleneck.
    out
        Folder of ``advice.json|md`` and ``advice_layers.csv|md``; None: nothing written.
    seed
        Seed of the per-layer probes.
    """
    data = load_cache_data(cache)
    spec, layers = data.info["spec"], data.info.get("layers") or []
    if spec.get("layer") != "blocks" or len(layers) < 2:
        raise DataError(f"{cache}: advice needs every block's features; extract with "
                        "--layer blocks (this cache holds "
                        f"{spec.get('layer') or 'the bottleneck'})")
    counts = np.bincount(data.train.y, minlength=len(data.classes))
    probes = probe_layers([data], seed)
    for row, (_, start, stop) in zip(probes, layers):
        row["logme"] = logme(data.train.X[:, start:stop], data.train.y)
    bottleneck = probes[-1]
    best = max(probes, key=lambda r: (r["val_accuracy"], r["depth"]))  # ties: the higher
    gap = best["val_accuracy"] - bottleneck["val_accuracy"]
    margin = gap_margin(bottleneck["val_accuracy"], len(data.val.y))
    blocks = len(layers)  # every block's output below the top one, then the bottleneck
    above = blocks - 1 - best["depth"]
    per_class = float(np.median(counts))
    small, similar = per_class < SMALL_PER_CLASS, gap <= margin
    unfreeze, name = strategy(small, similar, above, blocks)
    reason = (f"{per_class:.0f} training images per class (median; small below "
              f"{SMALL_PER_CLASS}), and the {'best probe is' if similar else 'probe of'} "
              f"{best['layer']} at {best['val_accuracy']:.3f} validation accuracy against "
              f"the bottleneck's {bottleneck['val_accuracy']:.3f} (gap {gap:+.3f}, "
              f"{'within' if similar else 'beyond'} the margin {margin:.3f}: "
              f"{'similar to' if similar else 'far from'} the pretraining)")
    if small and not similar:
        reason += ("; the multilayer head (pipeline heads on this cache) uses the lower blocks "
                   "without training any")
    if margin >= _WIDE_MARGIN:
        reason += (f"; {len(data.val.y)} validation images cannot tell a gap under "
                   f"{margin:.2f} from noise, so sweep the depths")
    advice = Advice(
        str(cache), data.backbone, len(data.classes), len(data.train.y), per_class,
        int(counts.min()), small, bottleneck["val_accuracy"], best["layer"],
        best["val_accuracy"], gap, margin, similar, blocks, above, unfreeze, name,
        sorted({max(0, unfreeze - 1), unfreeze, min(blocks, unfreeze + 1)}), reason,
        [{k: r[k] for k in ("layer", "depth", "features", "val_accuracy", "logme")}
         for r in probes])
    if out is not None:
        advice.files = _write(advice, Path(out))
    return advice


def _plot(advice: Advice, path: Path) -> Path:
    """Validation accuracy of each block's probe, the bottleneck's margin, and LogME."""
    fig, ax = figure(figsize=(7, 4.5))
    depth = [r["depth"] for r in advice.layers]
    ax.plot(depth, [r["val_accuracy"] for r in advice.layers], marker="o",
            label="linear probe, validation accuracy")
    ax.axhline(advice.bottleneck_val_accuracy + advice.margin, color="tab:gray", ls="--",
               label=f"bottleneck + margin ({advice.margin:.3f})")
    ax.set_xticks(depth, [r["layer"] for r in advice.layers], rotation=30, ha="right")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(depth, [r["logme"] for r in advice.layers], marker="s", color="tab:orange",
              label="LogME (training split)")
    twin.set_ylabel("LogME")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], fontsize="small", loc="lower right")
    ax.set_title(f"{advice.backbone}: {advice.strategy} (--unfreeze {advice.unfreeze})")
    return save(fig, path)


def _write(advice: Advice, out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    csv, md = write_table(advice.layers, out / "advice_layers",
                          "Linear probe of each block on validation, and LogME on training.")
    (out / "advice.md").write_text(f"# Advice\n\n{advice.sentence()}\n\n"
                                   f"{md.read_text()}\n")
    files = {"advice_md": str(out / "advice.md"), "advice_layers_csv": str(csv),
             "advice_layers_md": str(md), "advice_png": str(_plot(advice, out / "advice.png")),
             "advice_json": str(out / "advice.json")}
    body = {**asdict(advice), "files": files, "sentence": advice.sentence()}
    (out / "advice.json").write_text(json.dumps(body, indent=2) + "\n")
    return files
