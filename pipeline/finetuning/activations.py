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

import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from pipeline.core.errors import ActivationError
from pipeline.core.progress import note
from pipeline.data.images import ImageFiles, ImageSet
from pipeline.models.families import family_of
from pipeline.models.stages import Block, is_under
from pipeline.store import locks
from pipeline.store.integrity import damaged, failure_reason
from pipeline.store.paths import PARTIAL, cache_path
from pipeline.store.writer import FeatureWriter, check_disk

# Relative tolerance of the check that a cut network gives the whole network's logits.
_CUT_RTOL = 1e-4
# Activation rows are large (2.5 to 44 KB for Lite0): small chunks, so that reading the random
# rows of a shuffled batch reads, and checksums, little besides them. Measured 2026-12-04 on
# the demo's caches, a batch of 32 random rows with Fletcher-32: 22, 10.5 and 1.8 ms in 64 KiB
# chunks against 33, 23 and 6.6 ms in 1 MiB ones.
_CHUNK_BYTES = 64 << 10



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


def lowest_trained(spec, model: nn.Module, blocks: Sequence[Block], unfreeze: int) -> Block:
    """The block whose input is cached when the top ``unfreeze`` of ``blocks`` are trained."""
    if not 0 <= unfreeze <= len(blocks):
        raise ActivationError(f"no block boundary below the top {unfreeze} of {len(blocks)} "
                              "blocks")
    if unfreeze:
        return blocks[len(blocks) - unfreeze]
    # At 0 the head alone trains: the boundary is the classifier's input (the bottleneck).
    classifier = family_of(spec).classifier(model)[0]
    return Block(classifier, (classifier,))


def cut_network(spec, model: nn.Module, block: Block) -> Cut:
    """Cut ``model`` (its classifier already the new head) at the input of ``block``.

    Raises
    ------
    ActivationError
        For a boundary that other tensors cross, or that does not give the model's logits.
    """
    adapter = family_of(spec)
    whole = adapter.extractor(model, adapter.classifier(model)[0]).eval()
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
                                      "cross its boundary", backbone=name, block=block,
                                      reason="cut-needs-images")
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
                              "logits", backbone=spec.name, block=cut.block,
                              reason="cut-needs-images")


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

    def view_rows(self, views: np.ndarray) -> np.ndarray:
        """The rows of view ``views[j]`` of the ``j``-th training image, for every ``j``."""
        return self.n_images + views * len(self.train) + np.arange(len(self.train))


def activation_key_spec(feature_spec: dict, block: str, dtype: str, views: int,
                        augment: str, seed: int) -> dict:
    """The feature key's inputs, plus what decides the stored activations (the graph node
    cut at follows from the block, the network being the feature key's). The feature key's
    engine, if any, is kept: the activation pass runs the trunk on the engine that extracted
    the features (:func:`prepare_trunk`), and its last bits are that engine's."""
    return {**feature_spec, "activations": {
        "block": block, "dtype": dtype, "views": views,
        "augment": augment if views else "none", "view_seed": seed if views else None}}


def activation_file(cache_dir, backbone: str, key: str) -> Path:
    path = cache_path(cache_dir, backbone, key)
    return path.with_name(path.stem + ".activations.h5")


class _Views(ImageFiles):
    """Augmented view ``view`` of each image, seeded by image and view: a resumed pass
    writes the very crops an uninterrupted one would.

    torchvision's random transforms draw from torch's one global generator, so the seeding
    and the drawing hold a lock: threads decoding batches side by side (an engine's streams)
    would otherwise draw from each other's seeds. Decoding itself runs outside it.
    """

    _rng = threading.Lock()

    def __init__(self, images: ImageSet, transform, shape, seed: int, view: int):
        super().__init__(images, transform, shape)
        self.seed, self.view = seed, view

    def preprocess(self, image, i: int):
        with self._rng, torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + self.view * 100_003 + i)
            return self.transform(image)


class _Concatenated(nn.Module):
    """Every boundary's activation of a multi-output lower graph, flattened side by side."""

    def __init__(self, lower: fx.GraphModule):
        super().__init__()
        self.lower = lower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lower(x)
        return torch.cat([out[k].flatten(1) for k in sorted(out, key=_ordinal)], dim=1)


def prepare_trunk(spec, trunk: nn.Module, images: ImageSet, device: torch.device,
                  engine: str, cache_dir, what: dict, streams: int = 1):
    """The frozen ``trunk`` (images -> a tensor) ready to run on ``engine`` (resolved, not
    ``auto``): torch prepared for inference, or an export of it kept in ``cache_dir`` under
    a key over the backbone's key and ``what`` (which boundaries the trunk ends at), checked
    against the eager trunk on the data's first images like extraction's engine
    (:func:`pipeline.models.engines.prepare`, which raises
    :class:`~pipeline.models.engines.EngineError`
    in one line when it cannot be used).
    """
    from pipeline.extract.features import example_images
    from pipeline.models import engines

    example = example_images(spec, images)
    network = {**spec.key(), **what}
    export = (engines.export_path(cache_dir, spec.name, network, tuple(example.shape[1:]))
              if engines.get_engine(engine).exported else None)
    return engines.prepare(engine, trunk.eval(), example, family_of(spec), device, export, network,
                           streams=streams)


def write_activations(cuts: Sequence[Cut], keys: Sequence[tuple[dict, str]], paths: Sequence[Path],
                      images: ImageSet, plan: ActivationPlan, spec, view_transform, dtype: str,
                      seed: int, device: torch.device, batch_size: int, workers: int,
                      progress: bool | str | None = None, engine: str = "torch") -> None:
    """One trunk pass that writes every cut's activation file (resuming unfinished ones).

    The rows go through extraction's own loop (:func:`pipeline.extract.batches.feature_batches`):
    the plain images, then each view of the training images, the trunk run by ``engine``
    (the one that extracted the features; an exported one in its streams, its export kept
    beside the files). The writer lock of every file is held (:mod:`pipeline.store.locks`); a file
    another run finished meanwhile is not written.
    """
    with contextlib.ExitStack() as held:
        for path in sorted(paths):  # one order for every run: no two wait for each other
            held.enter_context(locks.writing(path, on_wait=lambda text: note(text, progress)))
        todo = [i for i, path in enumerate(paths) if not path.exists()]
        if todo:
            _write_activations([cuts[i] for i in todo], [keys[i] for i in todo],
                               [paths[i] for i in todo], images, plan, spec, view_transform,
                               dtype, seed, device, batch_size, workers, progress, engine)


def _write_activations(cuts, keys, paths, images, plan, spec, view_transform, dtype, seed,
                       device, batch_size, workers, progress, engine) -> None:
    from pipeline.extract.batches import feature_batches
    from pipeline.models import engines

    lower = _lower_many(cuts)
    lower.to(device, memory_format=torch.channels_last).eval()
    crop = spec.preprocessing.crop
    shapes = _shapes(lower, crop, device)
    dims = [int(np.prod(s)) for s in shapes]
    partials = [p.with_name(p.name + PARTIAL) for p in paths]
    written = sum(p.stat().st_size for p in partials if p.exists())  # a pass to resume
    check_disk(paths[0].parent,
               sum(plan.rows * d * np.dtype(dtype).itemsize for d in dims) - written,
               "the activation cache", "no-room-activations")
    meta = _meta(images, plan, spec)
    writers = [FeatureWriter(path, key_spec, key, dim, dtype, meta, _CHUNK_BYTES)
               for path, (key_spec, key), dim in zip(paths, keys, dims)]
    for writer, shape in zip(writers, shapes):
        writer.file.attrs["activation_shape"] = list(shape)
    bounds = np.cumsum([0, *dims])
    shape = (3, crop, crop)
    # Plain rows as extraction reads images (8-bit crops normalised a batch at a time); views
    # come out of their augmentation already normalised.
    plain = ImageFiles(images, spec.preprocessing.transform(normalize=False), shape,
                       dtype="uint8")
    sources = [(np.arange(plan.n_images), plain, "activations")]
    sources += [(plan.train, _Views(images, view_transform, shape, seed, v),
                 f"activations view {v + 1}/{plan.views}")
                for v in range(plan.views)]
    # The trunk prepared for inference (BatchNorm folded, static padding) or exported, checked
    # against the eager graph on the data's first images.
    streams = engines.get_engine(engine).streams(device.type, workers)
    trunk = prepare_trunk(spec, _Concatenated(lower), images, device, engine, paths[0].parent,
                          {"activations": [cut.node for cut in cuts]}, streams)
    model = trunk.run
    try:
        row, done = 0, min(w.rows_done for w in writers)
        for indices, files, desc in sources:
            lo = min(len(indices), max(0, done - row))
            row += lo
            for batch in feature_batches(model, spec, images, device, indices[lo:], batch_size,
                                         workers, progress, desc, lo, files,
                                         streams=trunk.streams):
                failed = np.flatnonzero(~batch.valid) + row
                failures = [(int(r), reason) for r, (_, reason) in zip(failed, batch.failures)]
                for writer, a, b in zip(writers, bounds[:-1], bounds[1:]):
                    if writer.rows_done < row + len(batch.index):  # else written before a kill
                        writer.write(row, batch.features[:, a:b], batch.valid, failures)
                row += len(batch.index)
        for w in writers:
            w.finish({"timings": {"written": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                      "plan": {"n_images": plan.n_images, "views": plan.views}})
    finally:
        for w in writers:
            w.close()


def _lower_many(cuts: Sequence[Cut]) -> fx.GraphModule:
    """One lower graph returning every cut's boundary (they share one network).

    The graph of the highest boundary holds every lower one: the trunk runs once for all.
    """
    deepest = max(cuts, key=lambda cut: len(cut.lower.graph.nodes))
    nodes = {n.name: n for n in deepest.lower.graph.nodes}
    return _lower(deepest.lower, [nodes[cut.node] for cut in cuts])


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


# --- reading ---------------------------------------------------------------------------------

class CachedActivations(torch.utils.data.Dataset):
    """Rows of an activation cache as ``(activation, image index, error, "", label)``, like the
    image loaders' items; the file is opened lazily in each process (h5py handles do not pickle).

    A DataLoader fetches a batch through ``__getitems__``: its rows in one sorted HDF5 read
    instead of one read per row.
    """

    def __init__(self, path: Path, rows: np.ndarray, images: np.ndarray, labels: np.ndarray):
        self.path, self.rows, self.images, self.labels = path, rows, images, labels
        self._file = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int):
        return self.__getitems__([j])[0]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getitems__(self, js: Sequence[int]) -> list[tuple]:
        import h5py

        rows = self.rows[np.asarray(js)]
        # h5py reads increasing, distinct rows; a padded DDP shard may repeat one.
        wanted, where = np.unique(rows, return_inverse=True)
        try:
            if self._file is None:
                self._file = h5py.File(self.path, "r")
                self._shape = tuple(self._file.attrs["activation_shape"])
            values = self._file["features"][wanted].astype(np.float32)[where]
        except OSError as err:  # a chunk failing its checksum, a truncated file
            self.close()
            # Derived data the next run rebuilds by itself: out of its way.
            raise damaged(self.path, failure_reason(err), move=True) from None
        x = torch.from_numpy(values).view(len(js), *self._shape)
        return [(x[k], int(self.images[j]), "", "", int(self.labels[j]))
                for k, j in enumerate(js)]
