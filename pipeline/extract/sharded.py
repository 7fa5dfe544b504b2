"""Extraction under torchrun: each rank writes its shard of the images, rank 0 assembles the
shards into the very cache one process writes (same key, same rows, same order)."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.core import distributed
from pipeline.core.options import ExtractOptions
from pipeline.core.progress import note
from pipeline.extract.rows import ExtractionRun, engine_record, library_versions
from pipeline.models import engines
from pipeline.store import locks
from pipeline.store.paths import shard_path, shard_paths
from pipeline.store.writer import FeatureWriter, assemble_shards

__all__ = ["assemble", "extract_shard", "extract_sharded"]


def extract_sharded(run: ExtractionRun, ctx: distributed.Context, final: Path, key_spec: dict,
                    key: str, dim: int, dtype: str, meta: dict, started: float,
                    prepared: engines.Prepared, opts: ExtractOptions) -> list[dict]:
    """Each rank writes its shard; rank 0 assembles them into the cache one process writes.
    Each holds the writer lock of the file it writes (:mod:`pipeline.store.locks`). What each
    rank did in its shard."""
    def wait_note(text: str) -> None:
        note(text, run.progress)

    with locks.writing(shard_path(final, ctx.rank, ctx.world_size), opts.lock_timeout,
                       wait_note):
        shard = extract_shard(run, ctx, final, key_spec, key, dim, dtype, meta)
    shards = distributed.all_gather(shard)  # also waits until every shard is complete
    if ctx.is_main:
        with locks.writing(final, opts.lock_timeout, wait_note):
            if not final.exists():  # else another job assembled it while this one waited
                assemble(final, shards, key_spec, key, dim, dtype, meta, run.device, started,
                          prepared)
    distributed.barrier()
    if not final.exists():
        raise distributed.DistributedError(
            f"{final} was assembled by rank 0 but this rank cannot see it; the cache folder "
            f"{final.parent} must be one every rank sees at the same path (a shared file "
            "system)", path=final)
    return shards


def extract_shard(run: ExtractionRun, ctx, final, key_spec, key, dim, dtype, meta) -> dict:
    """Write (or finish, or find complete) this rank's shard file; what this run did there."""
    rows = distributed.shard_indices(len(run.images), ctx)
    path = shard_path(final, ctx.rank, ctx.world_size)
    info = {"rank": ctx.rank, "path": str(path), "rows": len(rows), "resumed_from": len(rows),
            "seconds": 0.0, "forward_seconds": 0.0}
    if path.exists():
        return info
    started = time.perf_counter()
    shard_meta = {**meta, "paths": [meta["paths"][i] for i in rows], "labels":
                  meta["labels"][rows], "split": meta["split"][rows], "index": rows}
    shard_spec = {**key_spec, "shard": {"rank": ctx.rank, "world_size": ctx.world_size}}
    writer = FeatureWriter(path, shard_spec, f"{key}/shard-{ctx.rank}-of-{ctx.world_size}", dim,
                           dtype, shard_meta)
    info["resumed_from"] = writer.rows_done
    try:
        info["forward_seconds"] = run.rows(writer, rows, desc=f"rank {ctx.rank}")
        info["seconds"] = time.perf_counter() - started
        writer.finish({"timings": info})
    finally:
        writer.close()
    return info


def assemble(final, shards, key_spec, key, dim, dtype, meta, device, started,
              prepared: engines.Prepared) -> None:
    for s in shards:
        if not Path(s["path"]).exists():
            raise distributed.DistributedError(
                f"rank {s['rank']}'s shard {s['path']} is not visible to rank 0; the cache "
                f"folder {final.parent} must be one every rank sees at the same path (a shared "
                "file system)", path=Path(s["path"]), rank=s["rank"])
    writer = FeatureWriter(final, key_spec, key, dim, dtype, meta)
    try:
        assembling = time.perf_counter()
        assemble_shards(writer, [Path(s["path"]) for s in shards])
        timings = {"seconds": time.perf_counter() - started,
                   "forward_seconds": sum(s["forward_seconds"] for s in shards),
                   "resumed_from": sum(s["resumed_from"] for s in shards),
                   "assemble_seconds": time.perf_counter() - assembling,
                   "device": str(device), "world_size": len(shards), "shards": shards,
                   "engine": engine_record(prepared)}
        writer.finish({"timings": timings, "versions": library_versions(prepared.engine)})
    finally:
        writer.close()
    for old in shard_paths(final):  # this run's shards, and any left by another world size
        old.unlink()
