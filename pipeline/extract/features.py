"""Stage 1: run a frozen backbone once over an image set and cache its features in HDF5."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core import distributed
from pipeline.core.atomic import write_json
from pipeline.core.contract import Result, to_plain
from pipeline.core.devices import (
    autocast_dtype,
    autocast_name,
    default_workers,
    device_type,
)
from pipeline.core.options import (
    DEFAULT_BACKBONE,
    DEFAULT_CACHE_DIR,
    DTYPES,
    ExtractOptions,
)
from pipeline.core.progress import note
from pipeline.data.decode import may_draft
from pipeline.data.early import EARLY_IMAGES, EarlyDecodes
from pipeline.data.early import can_start as early_decoding_possible
from pipeline.data.images import (
    ImageFiles,
    ImageSet,
    file_stamps,
    fingerprint_files,
    fingerprint_splits,
    load_image_set,
)
from pipeline.data.shards import split_address
from pipeline.extract.batches import extraction_reads, feature_dim
from pipeline.extract.rows import ExtractionRun, engine_record, library_versions
from pipeline.extract.sharded import extract_sharded
from pipeline.models import engines
from pipeline.models.backbones import BackboneSpec, build_feature_model, resolve_backbone
from pipeline.models.families import family_of
from pipeline.store import locks, run_record
from pipeline.store.cache import stored_duplicates, stored_summary
from pipeline.store.integrity import CacheDamaged, failure_reason, quarantine, verify_cache
from pipeline.store.paths import PARTIAL, cache_key, cache_path
from pipeline.store.writer import FeatureWriter, check_disk

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_CACHE_DIR", "DTYPES", "ExtractOptions", "ExtractResult", "example_images",
           "extract_features", "feature_key_spec"]

# The file ExtractResult.write puts in a folder: the summary, as `pipeline extract --json`.
SUMMARY = "extract.json"


# Images of the data set an engine's features are checked on against eager torch's.
_CHECK_IMAGES = 4


@dataclass
class ExtractResult(Result):
    """What one ``extract`` call did; ``to_json`` is the CLI's ``--json`` object.

    The cache itself is the store's (:mod:`pipeline.store.writer` writes it while the stage
    runs, so that an interrupted run resumes); :meth:`write` writes the summary beside it.
    """

    cache_path: Path
    hit: bool
    images: int
    failed: int
    dim: int
    seconds: float
    key: str
    resumed_from: int = 0  # rows found already written, by an interrupted run
    failures: list[tuple[str, str]] = field(default_factory=list)
    world_size: int = 1  # processes that extracted (torchrun)
    labelled: bool = True
    splits: dict[str, int] = field(default_factory=dict)  # readable or not, per split
    split_sources: dict[str, str] = field(default_factory=dict)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # files of the data not taken
    duplicates: dict | None = None  # identical files under other paths (cache.find_duplicates)
    engine: str = "torch"  # what ran the network (pipeline.models.engines); "auto" resolved
    engine_note: str = ""  # why auto did not use its first choice, if it did not
    repair_note: str = ""  # a damaged cache found under this key, moved aside and rebuilt

    def to_json(self) -> dict:
        out = asdict(self)
        out["cache_path"] = str(self.cache_path)
        out["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        out["ignored"] = [{"path": p, "reason": r} for p, r in self.ignored]
        return to_plain(out)

    def write(self, out: str | os.PathLike) -> list[Path]:
        """The summary (:meth:`to_json`) as ``extract.json`` in the folder ``out``."""
        return [self.write_summary(Path(out) / SUMMARY)]

    def write_summary(self, path: str | os.PathLike) -> Path:
        """The summary (:meth:`to_json`) as the JSON file ``path`` (``--write-json``)."""
        return write_json(path, self.to_json())

    def described(self, images: ImageSet) -> ExtractResult:
        """This result with what the data set says about itself and the cache about
        duplicates."""
        self.labelled, self.split_sources = images.labelled, images.split_sources
        self.splits = images.split_counts() if images.labelled else {}
        self.ignored = images.ignored
        self.duplicates = stored_duplicates(self.cache_path)
        return self


def extract_features(
    data: str | os.PathLike | ImageSet,
    *,
    backbone: str | BackboneSpec = DEFAULT_BACKBONE,
    options: ExtractOptions = ExtractOptions(),
    progress: bool | str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> ExtractResult:
    """Extract bottleneck features of every image once, or find them in the cache.

    The features go to the HDF5 cache (the store's file, named by the cache key, written
    while the stage runs so that an interrupted run resumes); nothing else is written:
    ``result.write(out)`` writes the summary.

    Parameters
    ----------
    data
        Image folder, split folder or CSV manifest (see
        :func:`pipeline.data.images.load_image_set`), or an image set already read with
        ``options``' split fractions and seed.
    backbone
        A :class:`~pipeline.models.backbones.BackboneSpec` from
        :func:`pipeline.resolve_backbone` (other weights, a layer, pooling, an image size,
        offline), or a backbone name, resolved with its default weights at its bottleneck
        (and ``options.seed`` for a random init).
    options
        How images are read and features stored: :class:`~pipeline.core.options.ExtractOptions`
        (``dtype``, ``cache_dir``, ``batch_size``, ``workers``, ``device``, ``strict``,
        ``hash_contents``, ``split_fractions``, ``seed``, ``compile``, ``engine``, ``repair``,
        ``lock_timeout``).
    progress
        A bar where stderr is a terminal, elsewhere a line every 30 s and at the end
        (:mod:`pipeline.core.progress`); False: nothing.
    on_batch
        Called with ``(rows_done, total)`` each time rows are safely on disk, a chunk's worth
        (or two seconds' worth) at a time (under torchrun: of this rank's shard).

    Notes
    -----
    Under ``torchrun`` every rank extracts every ``world_size``-th image into a shard file and
    rank 0 assembles the shards into the same cache, under the same key, that one process
    writes; an interrupted job resumes each shard where it stopped.

    An extraction that ran records itself beside the cache, in ``<backbone>-<key>.run.json``
    (:mod:`pipeline.store.run_record`); a cache hit writes nothing.

    Returns
    -------
    ExtractResult
        ``hit`` is True when the cache already held these features and no model ran (on a
        machine without a GPU a hit does not even import torch).
    """
    started = time.perf_counter()
    record = run_record.RunRecord("extract")
    opts = options
    images = (data if isinstance(data, ImageSet)
              else load_image_set(data, opts.split_fractions, opts.seed))
    spec = (backbone if isinstance(backbone, BackboneSpec)
            else resolve_backbone(backbone, seed=opts.seed))
    ctx, run_on = distributed.context(), None
    if ctx.distributed:  # before the ranks share out work over their image lists
        ctx, run_on = distributed.setup(opts.device)
        distributed.check_agree(fingerprint_splits(images), "images (paths, labels or splits)")
    amp = autocast_name(opts.device) if run_on is None else _amp_name(autocast_dtype(run_on))
    crop = spec.preprocessing.crop
    export = engines.export_path(opts.cache_dir, spec.name, spec.key(), (3, crop, crop))
    engine = engines.resolve_engine(
        opts.engine, device_type(opts.device) if run_on is None else run_on.type, opts.compile,
        export)
    stamps = _shared_stamps(images, opts.hash_contents, ctx)
    key_spec = feature_key_spec(spec, images, opts.dtype, opts.hash_contents, amp, stamps,
                                engine, opts.decode)
    key = cache_key(key_spec)
    distributed.check_agree(key, "images or settings (their cache keys differ)")
    final = cache_path(opts.cache_dir, spec.name, key)
    repaired = _repair(final, opts, ctx)
    if distributed.broadcast(final.exists()):
        return _hit(final, key, started, engine).described(images)
    workers = default_workers(ctx.local_world_size) if opts.workers is None else opts.workers
    # Not before the cache is known to miss; closed whichever way extraction ends.
    early = _early_decodes(images, spec, opts, ctx, workers)
    try:
        if run_on is None:
            ctx, run_on = distributed.setup(opts.device)
        dtype, batch_size = opts.dtype, opts.batch_size
        prepared, dim, layers = _prepare_engine(spec, images, run_on, engine,
                                                opts.engine != "auto", export, ctx,
                                                engines.get_engine(engine).streams(run_on.type,
                                                                                   workers),
                                                opts.decode)
        if prepared.engine != engine:  # auto could not use its choice: torch's cache, maybe a hit
            engine = prepared.engine
            key_spec = feature_key_spec(spec, images, opts.dtype, opts.hash_contents, amp, stamps,
                                        engine, opts.decode)
            key = cache_key(key_spec)
            final = cache_path(opts.cache_dir, spec.name, key)
            repaired = _repair(final, opts, ctx)
            if distributed.broadcast(final.exists()):
                hit = _hit(final, key, started, engine)
                hit.engine_note = prepared.note
                return hit.described(images)
        model = prepared.run
        if opts.compile:
            import torch

            model = torch.compile(model)
        meta = {"paths": images.paths, "labels": images.labels, "split": images.splits,
                "classes": images.classes, "data_root": str(images.root), "ignored": images.ignored,
                # The arguments that rebuild this backbone, for `pipeline predict` on new images.
                "request": spec.request,
                # Several layers side by side: which columns hold which (None for one layer).
                "layers": layers}
        if not ctx.is_main:  # one bar or log per job, not one per rank
            progress = False
        run = ExtractionRun(model, spec, images, run_on, batch_size, workers, opts.strict,
                            progress, on_batch,
                            engines.get_engine(prepared.engine).decodes_ahead(run_on.type),
                            prepared.streams, opts.decode, early)
        if ctx.distributed:
            shards = extract_sharded(run, ctx, final, key_spec, key, dim, dtype, meta, started,
                                     prepared, opts)
            images_n, dim, failures = stored_summary(final)
            result = ExtractResult(final, False, images_n, len(failures), dim,
                                   time.perf_counter() - started, key,
                                   sum(sh["resumed_from"] for sh in shards), failures,
                                   ctx.world_size)
        else:
            with locks.writing(final, opts.lock_timeout, lambda text: note(text, progress)):
                if final.exists():  # another run finished it while this one waited
                    result = _hit(final, key, started, engine)
                else:
                    result = _extract_locked(run, final, key_spec, key, dim, dtype, meta, started,
                                             prepared)
        result.repair_note = repaired
        if result.hit:
            return _with_engine(result, prepared).described(images)
        return _recorded(_with_engine(result, prepared).described(images),
                         record, opts, spec, images, key_spec, run_on, ctx)
    finally:
        if early is not None:
            early.close()


def _early_decodes(images: ImageSet, spec: BackboneSpec, opts: ExtractOptions,
                   ctx: distributed.Context, workers: int) -> EarlyDecodes | None:
    """A helper process decoding the first images while this one imports torch and builds
    the network (:mod:`pipeline.data.early`), where that pays: torch not yet imported, one
    process decoding in this one (no loader processes, no torchrun), and drafted JPEGs, the
    images whose decoding outweighs the forward pass. Other images are cheap to decode or
    decoded in full, too big to hold many of; an image in a shard is read by the shard's own
    pass."""
    if (not early_decoding_possible() or ctx.distributed or workers or opts.decode != "draft"
            or not may_draft(images.paths)
            or any(split_address(p) for p in images.paths[:EARLY_IMAGES])):
        return None
    first = range(min(len(images), EARLY_IMAGES))
    return EarlyDecodes([images.absolute(i) for i in first], **extraction_reads(spec, opts.decode))


def _extract_locked(run: ExtractionRun, final: Path, key_spec: dict, key: str, dim: int, dtype: str,
                    meta: dict, started: float, prepared: engines.Prepared) -> ExtractResult:
    """Write (or resume) the cache ``final``, its writer lock held."""
    check_disk(final.parent, _cache_bytes(final, len(run.images), dim, dtype),
               "the feature cache", "no-room-features")
    writer = FeatureWriter(final, key_spec, key, dim, dtype, meta)
    resumed_from = writer.rows_done
    try:
        looping = time.perf_counter()
        forward_s = run.rows(writer, np.arange(len(run.images)))
        loop_s = time.perf_counter() - looping
        failures = writer.failures()
        seconds = time.perf_counter() - started
        # loop_seconds: decoding, forward and writing, without the run's fixed start (imports,
        # building and preparing the network), which a large data set makes negligible.
        writer.finish({"timings": {"seconds": seconds, "loop_seconds": loop_s,
                                   "forward_seconds": forward_s,
                                   # images a helper process decoded while this one started
                                   "decoded_early": run.early.taken if run.early else 0,
                                   "resumed_from": resumed_from, "device": str(run.device),
                                   "engine": engine_record(prepared)},
                       "versions": library_versions(prepared.engine)})
    finally:
        writer.close()
    return ExtractResult(final, False, len(run.images), len(failures), dim, seconds, key,
                         resumed_from, failures)


def _cache_bytes(final: Path, n: int, dim: int, dtype: str) -> int:
    """What the cache file still needs on disk: its features, less a partial file's bytes."""
    partial = final.with_name(final.name + PARTIAL)
    have = partial.stat().st_size if partial.exists() else 0
    return max(0, n * dim * np.dtype(dtype).itemsize - have)


def _repair(final: Path, opts: ExtractOptions, ctx: distributed.Context) -> str:
    """Verify a complete cache at ``final`` chunk by chunk before it is served (rank 0); a
    damaged one is moved aside so that it is built again, and the note says so.

    Raises
    ------
    CacheDamaged
        The cache is damaged and ``opts.repair`` is off.
    """
    if not ctx.is_main or not final.exists():
        return ""
    report = verify_cache(final)
    if report["status"] != "damaged":
        return ""
    problems = report["problems"]
    what = problems[0] + (f", and {len(problems) - 1} more" if len(problems) > 1 else "")
    if not opts.repair:
        raise CacheDamaged(f"{final} is damaged ({what}) and repair is off", path=final,
                           problems=problems, reason="damaged-no-repair")
    try:
        aside = quarantine(final)
    except OSError as err:  # a read-only cache folder, say
        raise CacheDamaged(f"{final} is damaged ({what}) and cannot be moved aside "
                           f"({failure_reason(err)}); remove it", path=final, problems=problems,
                           reason="damaged-stuck") from None
    return f"the cache was damaged ({what}); moved it to {aside.name} and built it anew"


def _recorded(result: ExtractResult, record: run_record.RunRecord, opts: ExtractOptions,
              spec: BackboneSpec, images: ImageSet, key_spec: dict, device: torch.device,
              ctx: distributed.Context) -> ExtractResult:
    """``result``, once rank 0 has written the extraction's record beside the cache."""
    if ctx.is_main:
        record.update(settings={"data": str(images.root), "backbone": spec.request,
                                "options": opts},
                      seed=opts.seed, device=run_record.device_name(device),
                      world_size=ctx.world_size, cache_key=result.key,
                      data_fingerprint=key_spec["dataset"]["fingerprint"],
                      data=str(images.root), images=result.images, failed=result.failed,
                      resumed_from=result.resumed_from, engine=result.engine)
        record.write(run_record.extract_record_path(result.cache_path), [result.cache_path])
    return result


def _amp_name(amp) -> str | None:
    return str(amp).removeprefix("torch.") if amp else None


def _hit(final: Path, key: str, started: float, engine: str) -> ExtractResult:
    images_n, dim, failures = stored_summary(final)
    return ExtractResult(final, True, images_n, len(failures), dim,
                         time.perf_counter() - started, key, failures=failures, engine=engine)


def _with_engine(result: ExtractResult, prepared: engines.Prepared) -> ExtractResult:
    result.engine, result.engine_note = prepared.engine, prepared.note
    return result


def _prepare_engine(spec: BackboneSpec, images: ImageSet, device: torch.device, engine: str,
                    strict: bool, export: Path, ctx: distributed.Context, streams: int = 1,
                    decode: str = "draft") -> tuple[engines.Prepared, int, list | None]:
    """``engine`` ready on ``device`` for ``streams`` batches at once, checked on the data's
    first images, the feature size and, for several layers, each one's columns. Rank 0
    prepares first (it writes any export); the others then take its engine."""
    from pipeline.models.feature_model import is_multi_layer  # torch: not on a cache hit

    eager = build_feature_model(spec)
    example = example_images(spec, images, decode)
    dim = feature_dim(eager, spec, example.device)
    layers = (eager.layer_slices(spec.preprocessing.crop) if is_multi_layer(spec.layer)
              else None)
    prepared = None
    if ctx.is_main:
        prepared = engines.prepare(engine, eager, example, family_of(spec), device, export,
                                   spec.key(), strict, streams)
    chosen = distributed.broadcast(prepared.engine if prepared is not None else None)
    if prepared is None:
        prepared = engines.prepare(chosen, eager, example, family_of(spec), device, export,
                                   spec.key(), streams=streams)
    return prepared, dim, layers


def example_images(spec: BackboneSpec, images: ImageSet, decode: str = "draft") -> torch.Tensor:
    """The first few readable images of the set, preprocessed (seeded noise if none is)."""
    import torch

    crop = spec.preprocessing.crop
    files = ImageFiles(images, spec.preprocessing.transform(), (3, crop, crop),
                       recipe=spec.preprocessing, decode=decode)
    found = []
    for i in range(min(len(images), 4 * _CHECK_IMAGES)):
        x, _, error, _ = files[i]
        if not error:
            found.append(x)
        if len(found) == _CHECK_IMAGES:
            break
    if not found:
        return torch.randn(2, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    return torch.stack(found)


def feature_key_spec(spec: BackboneSpec, images: ImageSet, dtype: str, hash_contents: bool,
                     amp: str | None, stamps: list[str] | None = None,
                     engine: str = "torch", decode: str = "draft") -> dict:
    """Everything that changes the stored numbers; its hash names the cache file.

    ``amp`` is the autocast dtype's name ("bfloat16", "float16") on a GPU, None in float32.
    ``engine`` (resolved, not ``auto``) is recorded unless it is torch, so that caches written
    before there were engines keep their keys: another engine's features differ from torch's
    in their last bits. ``decode`` (:mod:`pipeline.data.decode`) is recorded, in either mode,
    when the data holds JPEGs (:func:`~pipeline.data.decode.may_draft`), the only images the
    modes decode differently: a PNG set keeps the key it had before there were modes, and
    ``pipeline predict`` reads a head's mode from its key (absent: the modes agree on its data).
    """
    return {
        **({"engine": engine} if engine != "torch" else {}),
        **({"decode": decode} if may_draft(images.paths) else {}),
        **spec.key(),
        "autocast": amp,
        "dataset": {
            "fingerprint": fingerprint_files(images, hash_contents, stamps),
            "fingerprint_method": "sha256" if hash_contents else "size+mtime",
            "images": len(images),
        },
        "splits": {"sha256": fingerprint_splits(images), "source": images.split_sources},
        "dtype": dtype,
    }


def _shared_stamps(images: ImageSet, hash_contents: bool, ctx: distributed.Context
                   ) -> list[str]:
    """Every file's stamp, each rank stating (or hashing) only its shard of the files.

    With ``--hash-contents`` on a large set, hashing every file on every rank would read the
    data set once per rank; shared out, it is read once per job, and the fingerprint is the
    one a single process computes.
    """
    mine = file_stamps(images, hash_contents, distributed.shard_indices(len(images), ctx))
    stamps: list[str] = [""] * len(images)
    for rank, part in enumerate(distributed.all_gather(mine)):
        stamps[rank::ctx.world_size] = part
    return stamps
