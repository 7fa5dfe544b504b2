"""``pipeline cache``: list, inspect, verify, export and remove feature caches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pipeline.cli.group import Group
from pipeline.cli.options import cache_dir_option
from pipeline.cli.output import display, emit_json
from pipeline.core.options import EXPORT_FORMATS, CacheExportOptions, default

__all__ = ["cache_export", "cache_group", "cache_info", "cache_list", "cache_rm", "cache_verify"]


@click.group(name="cache", cls=Group)
def cache_group() -> None:
    """List, inspect, verify, export and remove feature caches."""


@cache_group.command(name="list")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True)
def cache_list(cache_dir, as_json) -> None:
    """One line per cache file, and per engine export (--engine onnxruntime, openvino)."""
    from pipeline.store.catalog import list_caches

    rows = list_caches(cache_dir)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo(f"no caches in {cache_dir}")
    for row in rows:
        if row["status"] == "complete" and row["kind"] == "export":
            click.echo(f"{row['path']}  export  {row['backbone']}  {row['network']}"
                       f"  {row['bytes'] / 1e6:.1f} MB  {row['created']}")
        elif row["status"] == "complete":
            unit = "images" if row["kind"] == "features" else "rows"
            click.echo(f"{row['path']}  {row['kind']}  {row['backbone']}  {row['images']} {unit}"
                       f"  {row['dim']}-d  {row['bytes'] / 1e6:.1f} MB  {row['created']}")
        else:
            click.echo(f"{row['path']}  {row['status']}")


@cache_group.command(name="info")
@click.argument("name")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True)
def cache_info(name, cache_dir, as_json) -> None:
    """Key spec, sizes and failures of one cache (NAME: a path, file name or key prefix), or
    what an engine's export was made from."""
    from pipeline.store import cache, catalog, paths

    path = catalog.find_cache(cache_dir, name)
    if paths.is_export(path) and path.is_file():  # auto's note: which engines, and why not
        click.echo(path.read_text(), nl=False)
        return
    info = catalog.export_info(path) if paths.is_export(path) else cache.cache_info(path)
    if as_json:
        emit_json(info)
        return
    if "network_part" in info:
        for field in ("path", "backbone", "network_part", "input_shape", "created", "exporters",
                      "files", "bytes"):
            click.echo(f"{field:12s} {info[field]}")
        click.echo("network")
        click.echo(json.dumps(info["network"], indent=2, sort_keys=True))
        return
    for field in ("path", "key", "images", "failed", "dim", "dtype", "labelled", "splits",
                  "classes", "data_root", "created", "timings", "versions"):
        click.echo(f"{field:10s} {info[field]}")
    for split in ("train", "val", "test"):
        if split in info["split_sources"]:
            click.echo(f"{split:10s} {info['split_sources'][split]}")
    _list("ignored", [(p["path"], p["reason"]) for p in info["ignored_paths"]])
    duplicates = info["duplicates"]
    if duplicates is not None:
        click.echo(f"duplicates {duplicates['groups']} group(s) of identical images "
                   f"({duplicates['images']} images): {duplicates['across_splits']} across "
                   f"splits, {duplicates['across_classes']} across classes")
        for group in duplicates["shown"]:
            click.echo("           " + " = ".join(display(p) for p in group["paths"]))
    click.echo("spec")
    click.echo(json.dumps(info["spec"], indent=2, sort_keys=True))


@cache_group.command(name="verify")
@click.argument("name", required=False)
@cache_dir_option
@click.option("--json", "as_json", is_flag=True)
def cache_verify(name, cache_dir, as_json) -> None:
    """Read every chunk of a cache (NAME: a path, file name or key prefix), or of every
    complete cache in --cache-dir, against its checksums. Exit 1 if any is damaged.

    A damaged feature cache is moved aside and built again by the extract command that made
    it (an activation cache by the next fine-tune); `pipeline cache rm` removes it.
    """
    from pipeline.store import catalog, integrity
    from pipeline.store.paths import SUFFIX

    paths = ([catalog.find_cache(cache_dir, name)] if name else
             [Path(r["path"]) for r in catalog.list_caches(cache_dir)
              if r["path"].endswith(SUFFIX)])
    reports = [integrity.verify_cache(p) for p in paths]
    if as_json:
        emit_json(reports)
    else:
        if not reports:
            click.echo(f"no caches in {cache_dir}")
        for r in reports:
            status = {"ok": "ok", "damaged": "DAMAGED",
                      "unchecked": "readable, no checksums (written before they were "
                                   "stored: a changed number cannot be seen)"}[r["status"]]
            click.echo(f"{r['path']}  {status}  {r['bytes'] / 1e6:.1f} MB read in "
                       f"{r['seconds']:.2f} s")
            for problem in r["problems"]:
                click.echo(f"    {problem}")
    if any(r["status"] == "damaged" for r in reports):
        sys.exit(1)


def _list(title: str, rows: list[tuple[str, str]], most: int = 50) -> None:
    click.echo(f"{title:10s} {len(rows)}")
    for path, reason in rows[:most]:
        click.echo(f"           {display(path)}: {reason}")
    if len(rows) > most:
        click.echo(f"           ... and {len(rows) - most} more (--json lists every one)")


@cache_group.command(name="export")
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS),
              default=default(CacheExportOptions, "format"),
              show_default=True)
@click.option("--out", type=click.Path(), required=True,
              help="File to write (parquet, csv), or folder (npy).")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True)
def cache_export(name, fmt, out, cache_dir, as_json) -> None:
    """Write a cache's features with path, label, split and valid, for numpy, pandas, polars.

    NAME: a path, file name or key prefix. npy writes a folder of .npy files (features.npy
    memory-maps); parquet one file with a fixed-size list column 'features'; csv one file
    with columns f0..f<D-1>.
    """
    from pipeline.store.catalog import find_cache
    from pipeline.store.export import export_cache

    result = export_cache(find_cache(cache_dir, name),
                          options=CacheExportOptions(format=fmt))
    result.write(out)
    if as_json:
        emit_json(result.to_json())
        return
    click.echo(f"{result.rows} rows x {result.dim} features -> {out} ({fmt})")


@cache_group.command(name="rm")
@click.argument("names", nargs=-1, required=True)
@cache_dir_option
def cache_rm(names, cache_dir) -> None:
    """Remove caches and engines' exports (NAMES: paths, file names or key prefixes)."""
    from pipeline.store import catalog

    for name in names:
        path = catalog.find_cache(cache_dir, name)
        catalog.remove_cache(path)
        click.echo(f"removed {path}")
