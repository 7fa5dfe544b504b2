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
  LogME (:mod:`pipeline.advice.logme`) of each layer is reported beside it, a second view that
  needs no training.

The matrix (the seeds' rule, after CS231n's transfer-learning notes): small and similar wants
the bottleneck and a light head (``--unfreeze 0``); large and dissimilar wants more of the
network retrained (``--unfreeze`` the blocks above the best-probing one, at least 2); in between,
fine-tune the top block (``--unfreeze 1``). The advice names the depths to sweep around it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.advice.logme import logme
from pipeline.core.atomic import write_json, write_text
from pipeline.core.contract import Result
from pipeline.core.errors import DataError
from pipeline.core.options import AdviseOptions
from pipeline.heads.compare import load_cache_data
from pipeline.heads.layers import probe_layers
from pipeline.report.plots import figure, save
from pipeline.report.tables import markdown_document, write_table

__all__ = ["SMALL_PER_CLASS", "AdviceResult", "advise_cache", "gap_margin", "strategy"]

# Training images per class below which a set is small: the regime of Keras' "very little
# data" recipe (1,000 a class), where fine-tuning more than the top block over-fits.
SMALL_PER_CLASS = 1000
_MIN_GAP = 0.01  # a gap under one point is no evidence on any validation split
_WIDE_MARGIN = 0.1  # beyond this margin the probe gap says little: the advice says so


@dataclass
class AdviceResult(Result):
    """The strategy for one cache and the numbers that chose it; :meth:`write` puts
    ``advice.json|md|png`` and ``advice_layers.csv|md`` in a folder."""

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
    # The files of the last write(out), by kind; empty until the result is written.
    files: dict[str, str] = field(default_factory=dict)

    def sentence(self) -> str:
        """The advice in one sentence, with its numbers."""
        return (f"Advice ({self.backbone}): {self.strategy} (--unfreeze {self.unfreeze}; sweep "
                f"{','.join(map(str, self.sweep))}): {self.reason}.")

    def to_json(self) -> dict:
        """Every field, and the sentence (``advice.json``, ``pipeline advise --json``)."""
        return {**super().to_json(), "sentence": self.sentence()}

    def write(self, out: str | os.PathLike) -> list[Path]:
        """``advice.md|json|png`` and ``advice_layers.csv|md`` into the folder ``out``."""
        out = Path(out)
        preamble = "Linear probe of each block on validation, and LogME on training."
        csv, md = write_table(self.layers, out / "advice_layers", preamble)
        write_text(out / "advice.md", f"# Advice\n\n{self.sentence()}\n\n"
                                      f"{markdown_document(self.layers, preamble)}\n")
        self.files = {"advice_md": str(out / "advice.md"), "advice_layers_csv": str(csv),
                      "advice_layers_md": str(md),
                      "advice_png": str(save(self.figure(), out / "advice.png")),
                      "advice_json": str(out / "advice.json")}
        write_json(out / "advice.json", self.to_json())
        return [Path(f) for f in self.files.values()]

    def figure(self):
        """Validation accuracy of each block's probe, the bottleneck's margin, and LogME."""
        fig, ax = figure(figsize=(7, 4.5))
        depth = [r["depth"] for r in self.layers]
        ax.plot(depth, [r["val_accuracy"] for r in self.layers], marker="o",
                label="linear probe, validation accuracy")
        ax.axhline(self.bottleneck_val_accuracy + self.margin, color="tab:gray", ls="--",
                   label=f"bottleneck + margin ({self.margin:.3f})")
        ax.set_xticks(depth, [r["layer"] for r in self.layers], rotation=30, ha="right")
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.plot(depth, [r["logme"] for r in self.layers], marker="s", color="tab:orange",
                  label="LogME (training split)")
        twin.set_ylabel("LogME")
        lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(lines, [h.get_label() for h in lines], fontsize="small", loc="lower right")
        ax.set_title(f"{self.backbone}: {self.strategy} (--unfreeze {self.unfreeze})")
        return fig


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


def advise_cache(cache: str | os.PathLike, *, options: AdviseOptions = AdviseOptions()
                 ) -> AdviceResult:
    """Advice for the data of a cache extracted with ``--layer blocks``; writes nothing.

    Parameters
    ----------
    cache
        A feature cache whose layers are every block's output and the bottleneck.
    options
        :class:`~pipeline.core.options.AdviseOptions`: its ``seed`` seeds the per-layer probes.
    """
    seed = options.seed
    data = load_cache_data(cache)
    spec, layers = data.info["spec"], data.info.get("layers") or []
    if spec.get("layer") != "blocks" or len(layers) < 2:
        raise DataError(f"{cache}: advice needs every block's features (this cache holds "
                        f"{spec.get('layer') or 'the bottleneck'})", path=cache,
                        layer=spec.get("layer"), reason="needs-blocks")
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
    return AdviceResult(
        str(cache), data.backbone, len(data.classes), len(data.train.y), per_class,
        int(counts.min()), small, bottleneck["val_accuracy"], best["layer"],
        best["val_accuracy"], gap, margin, similar, blocks, above, unfreeze, name,
        sorted({max(0, unfreeze - 1), unfreeze, min(blocks, unfreeze + 1)}), reason,
        [{k: r[k] for k in ("layer", "depth", "features", "val_accuracy", "logme")}
         for r in probes])

