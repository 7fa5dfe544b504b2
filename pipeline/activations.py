"""Cached block activations: the frozen trunk's output at block boundaries, computed once.

With the trunk frozen and in eval mode (BatchNorm statistics frozen), the input of the lowest
trained block is a fixed function of the image. One pass of the trunk stores it, per boundary
that a freeze-depth sweep asks for, in an HDF5 file laid out like a feature cache (one row per
image, flattened); fine-tuning then runs only the trained blocks and the head on every epoch.

The network is cut at a boundary by its traced graph (the family's own ``torch.fx`` tracer, as
for ``--layer``): ``lower`` maps images to the boundary's activation, ``upper`` maps that
activation to the logits. A cut is refused unless ``upper(lower(x))`` gives the network's own
logits, so a skip connection across the boundary can never be silently dropped.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from pipeline import distributed
from pipeline.blocks import Block, is_under
from pipeline.cache import FeatureWriter, cache_path
from pipeline.data import ImageFiles, ImageSet
from pipeline.devices import autocast
from pipeline.errors import CacheError, PipelineError

# Relative tolerance of the check that a cut network gives the whole network's logits.
_CUT_RTOL = 1e-4
# Activation rows are large (tens to hundreds of KiB): small chunks, so that reading the random
# rows of a shuffled batch reads little besides them.
_CHUNK_BYTES = 256 << 10


class ActivationError(PipelineError):
    """A network that cannot be cut at a block boundary, or a cache that cannot be written."""


@dataclass
class Cut:
    """The network cut at the input of one block: images -> activation -> logits."""

    block: str  # the lowest trained block's name
    node: str  # the graph node whose output is that block's input
    lower: fx.GraphModule  # images -> {"activation": tensor}
    upper: nn.Module  # activation -> logits; shares the network's own modules and parameters


class _Logits(nn.Module):
    """The upper graph, returning the logits tensor instead of the feature extractor's dict."""

    def __init__(self, graph: fx.GraphModule):
        super().__init__()
        self.graph_module = graph

    def forward(self, activation: torch.Tensor) -> torch.Tensor:
        return self.graph_module(activation)["features"]


def cut_network(spec, model: nn.Module, unfreeze: int) -> Cut:
    """Cut ``model`` (its classifier already the new head) below its top ``unfreeze`` blocks.

    Raises
    ------
    ActivationError
        For ``unfreeze`` outside 0 .. blocks, or a boundary that other tensors cross.
    """
    adapter = spec.adapter
    blocks = adapter.blocks(model)
    if not 0 <= unfreeze <= len(blocks):
        raise ActivationError(f"no block boundary below the top {unfreeze} of {len(blocks)} "
                              "blocks")
    classifier = adapter.classifier(model)[0]
    # At 0 the head alone trains: the boundary is the classifier's input (the bottleneck).
    block = (blocks[len(blocks) - unfreeze] if unfreeze else Block(classifier, (classifier,)))
    whole = adapter.extractor(model, classifier).eval()
    graph = whole.graph
    first = next((n for n in graph.nodes
                  if n.op == "call_module" and is_under(n.target, block.modules)), None)
    if first is None or not first.all_input_nodes:
        raise ActivationError(f"cannot find the input of block {block.name} of {spec.name}")
    boundary = first.all_input_nodes[0]
    cut = Cut(block.name, boundary.name, _lower(whole, boundary),
              _Logits(_upper(whole, boundary, spec.name, block.name)))
    _check_cut(spec, model, cut)
    return cut


def _lower(whole: fx.GraphModule, boundaries) -> fx.GraphModule:
    """Images -> ``{"activation": ...}`` (or ``{"activation_i": ...}`` for several nodes)."""
    many = isinstance(boundaries, (list, tuple))
    targets = list(boundaries) if many else [boundaries]
    graph, env = fx.Graph(), {}
    last = max(list(whole.graph.nodes).index(t) for t in targets)
    for i, node in enumerate(whole.graph.nodes):
        if i > last:
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
    names = [f"activation_{i}" for i in range(len(targets))] if many else ["activation"]
    graph.output({name: env[t] for name, t in zip(names, targets)})
    lower = fx.GraphModule(whole, graph)
    lower.graph.eliminate_dead_code()  # what only the layers above the boundary needed
    lower.recompile()
    return lower


def _upper(whole: fx.GraphModule, boundary: fx.Node, name: str, block: str) -> fx.GraphModule:
    """``boundary``'s activation -> the network's output, refusing a graph it does not cut."""
    graph, env = fx.Graph(), {}
    env[boundary] = graph.placeholder("activation")
    after = False
    for node in whole.graph.nodes:
        if node is boundary:
            after = True
            continue
        if not after:
            continue
        for dep in node.all_input_nodes:
            if dep in env:
                continue
            if dep.op != "get_attr":  # a tensor from below the boundary crosses it
                raise ActivationError(f"{name}: tensors other than the input of block {block} "
                                      "cross its boundary; fine-tune from images "
                                      "(--from-images)")
            env[dep] = graph.node_copy(dep, lambda n: env[n])
        env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(whole, graph)


@torch.no_grad()
def _check_cut(spec, model: nn.Module, cut: Cut) -> None:
    was_training = model.training
    model.eval()
    try:
        crop = spec.preprocessing.crop
        x = torch.randn(2, 3, crop, crop, generator=torch.Generator().manual_seed(0))
        x = x.to(next(model.parameters()).device)
        logits = model(x)
        rebuilt = cut.upper(cut.lower(x)["activation"])
    finally:
        model.train(was_training)
    scale = logits.abs().max().clamp_min(1e-6)
    if logits.shape != rebuilt.shape or (logits - rebuilt).abs().max() > _CUT_RTOL * scale:
        raise ActivationError(f"{spec.name} cut below block {cut.block} does not give its own "
                              "logits; fine-tune from images (--from-images)")


# --- the cache -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ActivationPlan:
    """Which rows an activation cache holds: every image once, then ``views`` augmented views
    of each training image (``train`` lists their image indices, in order)."""

    n_images: int
    train: np.ndarray
    views: int

    @property
    def rows(self) -> int:
        return self.n_images + self.views * len(self.train)

    def view_row(self, view: int, j: int) -> int:
        """The row of view ``view`` of the ``j``-th training image."""
        return self.n_images + view * len(self.train) + j


def activation_key_spec(feature_spec: dict, cut: Cut, dtype: str, views: int,
                        augment: str, seed: int) -> dict:
    """The feature key's inputs, plus what decides the stored activations."""
    return {**feature_spec, "activations": {
        "block": cut.block, "node": cut.node, "dtype": dtype, "views": views,
        "augment": augment if views else "none", "view_seed": seed if views else None}}


def activation_file(cache_dir, backbone: str, key: str) -> Path:
    path = cache_path(cache_dir, backbone, key)
    return path.with_name(path.stem + ".activations.h5")


def check_disk(folder: Path, needed: int) -> None:
    """Stop before writing when the disk cannot hold ``needed`` more bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise CacheError(f"the activation cache needs {needed / 1e9:.2f} GB but {folder} has "
                         f"{free / 1e9:.2f} GB free; free some space, use another --cache-dir, "
                         "fewer --views, or --from-images")


class _SeededViews:
    """View ``view`` of image ``i`` augmented with its own seed: the same crops after a resume."""

    def __init__(self, transform, seed: int, view: int):
        self.transform, self.seed, self.view = transform, seed, view

    def __call__(self, image, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + self.view * 100_003 + index)
            return self.transform(image)


class _ViewFiles(ImageFiles):
    """Images whose transform also takes the image index (for per-image seeds)."""

    def __getitem__(self, i: int):
        plain, self.transform = self.transform, (lambda image: self.views(image, i))
        try:
            return super().__getitem__(i)
        finally:
            self.transform = plain


def write_activations(cuts: Sequence[Cut], keys: Sequence[tuple[dict, str]], paths: Sequence[Path],
                      images: ImageSet, plan: ActivationPlan, spec, plain_transform,
                      view_transform, dtype: str, seed: int, device: torch.device,
                      batch_size: int, workers: int, progress: bool) -> None:
    """One trunk pass that writes every cut's activation file (resuming unfinished ones)."""
    from tqdm import tqdm

    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if not todo:
        return
    model_lower = _lower_many(cuts, todo)
    model_lower.to(device, memory_format=torch.channels_last).eval()
    crop = spec.preprocessing.crop
    shapes = _shapes(model_lower, crop, device)
    dims = [int(np.prod(s)) for s in shapes]
    needed = sum(plan.rows * d * np.dtype(dtype).itemsize for d in dims)
    check_disk(paths[todo[0]].parent, needed)
    writers = []
    for j, i in enumerate(todo):
        meta = _meta(images, plan, spec)
        writer = FeatureWriter(paths[i], keys[i][0], keys[i][1], dims[j], dtype, meta)
        writer.file.attrs["activation_shape"] = list(shapes[j])
        writers.append(writer)
    started = min(w.rows_done for w in writers)
    sources = [(np.arange(plan.n_images), ImageFiles(images, plain_transform, (3, crop, crop)))]
    for view in range(plan.views):
        files = _ViewFiles(images, plain_transform, (3, crop, crop))
        files.views = _SeededViews(view_transform, seed, view)
        sources.append((plan.train, files))
    try:
        with tqdm(total=plan.rows, initial=started, unit="img", disable=not progress,
                  desc=f"activations {spec.name}", dynamic_ncols=True) as bar:
            offset = 0
            for indices, files in sources:
                lo = max(0, started - offset)
                if lo < len(indices):
                    _pass(model_lower, files, indices[lo:], offset + lo, writers, device,
                          batch_size, workers, bar)
                offset += len(indices)
        for w in writers:
            w.finish({"timings": {"written": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                      "plan": {"n_images": plan.n_images, "views": plan.views}})
    finally:
        for w in writers:
            w.close()


def _lower_many(cuts: Sequence[Cut], todo: Sequence[int]) -> fx.GraphModule:
    """One lower graph returning every boundary of ``todo``'s cuts (they share one network).

    The graph of the highest boundary holds every lower one: the trunk runs once for all.
    """
    deepest = max(todo, key=lambda i: len(cuts[i].lower.graph.nodes))
    nodes = {n.name: n for n in cuts[deepest].lower.graph.nodes}
    return _lower(cuts[deepest].lower, [nodes[cuts[i].node] for i in todo])


@torch.no_grad()
def _shapes(lower: fx.GraphModule, crop: int, device) -> list[tuple[int, ...]]:
    out = lower(torch.zeros(1, 3, crop, crop, device=device))
    return [tuple(out[k].shape[1:]) for k in sorted(out, key=_ordinal)]


def _ordinal(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def _meta(images: ImageSet, plan: ActivationPlan, spec) -> dict:
    rows = np.concatenate([np.arange(plan.n_images), np.tile(plan.train, plan.views)])
    return {"paths": [images.paths[i] for i in rows], "labels": images.labels[rows],
            "split": images.splits[rows], "classes": images.classes,
            "data_root": str(images.root), "ignored": [], "request": spec.request}


def _pass(lower, files, indices, start, writers, device, batch_size, workers, bar) -> None:
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(files, indices.tolist()),
                                         batch_size=batch_size, shuffle=False,
                                         num_workers=workers)
    row = start
    for x, _index, errors, _digest in loader:
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(device):
            out = lower(x)
        valid = np.array([not e for e in errors])
        for name in sorted(out, key=_ordinal):
            writer = writers[_ordinal(name)]
            if writer.rows_done >= row + len(x):
                continue  # this file already holds the batch (written before a kill)
            values = out[name].float().flatten(1).cpu().numpy()
            values[~valid] = np.nan
            failures = [(row + k, e) for k, e in enumerate(errors) if e]
            writer.write(row, values, valid, failures)
        row += len(x)
        bar.update(len(x))


# --- reading ---------------------------------------------------------------------------------

class CachedActivations(torch.utils.data.Dataset):
    """Rows of an activation cache as ``(activation, image index, error, "", label)``, like the
    image loaders' items; the file is opened lazily in each process (h5py handles do not pickle)."""

    def __init__(self, path: Path, rows: np.ndarray, images: np.ndarray, labels: np.ndarray):
        self.path, self.rows, self.images, self.labels = path, rows, images, labels
        self._file = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int):
        import h5py

        if self._file is None:
            self._file = h5py.File(self.path, "r")
            self._shape = tuple(self._file.attrs["activation_shape"])
        values = self._file["features"][int(self.rows[j])]
        x = torch.from_numpy(values.astype(np.float32)).view(self._shape)
        return x, int(self.images[j]), "", "", int(self.labels[j])


def shard_rows(rows: np.ndarray, ctx: distributed.Context) -> np.ndarray:
    return rows[distributed.shard_indices(len(rows), ctx)]
