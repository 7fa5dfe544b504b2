"""Run records: a ``run.json`` beside a stage's results says what produced them.

A results table alone does not say which command, library versions, device or data made it;
folder names are all that tie them together. Every stage therefore writes a small JSON record
beside its results when it finishes: the command line and the settings, the versions of this
library and of torch, torchvision, timm and scikit-learn, the device, the seed, the feature
cache's key and the data's fingerprint, start and end time, and the files written. A run
that fails writes none, so a record always describes the results beside it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from pathlib import Path

from pipeline.core import distribution
from pipeline.core.atomic import atomic_write
from pipeline.store.paths import extract_record_path

__all__ = ["FORMAT", "FORMAT_VERSION", "RECORD", "RunRecord", "cache_fields", "command",
           "command_line", "device_name", "read_record", "shared_fields",
           "versions"]

FORMAT = "pipeline-run"
FORMAT_VERSION = 1
RECORD = "run.json"
# The command line as the CLI received it; None: the process's own (sys.argv).
_COMMAND: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "pipeline_command", default=None)
# The fields that the runs of one sweep share, for the sweep's own record.
_SHARED = ("cache_key", "data_fingerprint", "data", "caches", "device", "world_size")
# The distributions whose versions change the numbers (numerics, defaults, kernels).
_DISTRIBUTIONS = ("torch", "torchvision", "timm", "scikit-learn", "numpy", "scipy", "h5py",
                  "pillow")


@contextlib.contextmanager
def command_line(argv: Sequence[str]) -> Iterator[None]:
    """Records written inside the block give ``argv`` as their command (the CLI's arguments
    as it received them, also when it is called in-process, as tests and scripts do)."""
    token = _COMMAND.set(tuple(argv))
    try:
        yield
    finally:
        _COMMAND.reset(token)


def command() -> list[str]:
    """The command line of this run: the CLI's (:func:`command_line`), else ``sys.argv``."""
    given = _COMMAND.get()
    if given is not None:
        return list(given)
    return [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else []


def versions(extra: Iterable[str] = ()) -> dict[str, str | None]:
    """This library's version and those of :data:`_DISTRIBUTIONS` (None: not installed)."""
    out: dict[str, str | None] = {"pipeline": distribution.version(),
                                  "python": platform.python_version()}
    for name in (*_DISTRIBUTIONS, *extra):
        try:
            out[name] = _version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def device_name(device) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H100 80GB HBM3)``: a torch device with its model."""
    text = str(device)
    if getattr(device, "type", None) == "cuda":
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        text = f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return text


def cache_fields(cache_path: str | os.PathLike) -> dict:
    """What identifies a feature cache in a record: its path, key, the data's fingerprint and
    root, and the record of the extraction that wrote it (None if it has none)."""
    from pipeline.store.cache import open_cache

    with open_cache(cache_path) as f:
        spec = json.loads(f.attrs["spec"])
        key, root = str(f.attrs["key"]), str(f.attrs["data_root"])
    record = extract_record_path(cache_path)
    return {"cache": str(Path(cache_path).absolute()), "cache_key": key,
            "data_fingerprint": spec["dataset"]["fingerprint"], "data": root,
            "extract_record": str(record.absolute()) if record.exists() else None}


class RunRecord:
    """One stage's record: made when the stage starts, written when it has finished.

    Parameters
    ----------
    stage
        ``extract``, ``heads``, ``finetune``, ``sweep``, ``freeze-depth`` or ``report``.
    settings
        The stage's settings (options dataclasses are turned into dicts).
    seed
        The seed of the run, if it has one.
    """

    def __init__(self, stage: str, settings: Mapping | None = None, seed: int | None = None):
        self.stage = stage
        self.fields: dict = {"settings": _plain(settings or {}), "seed": seed, "device": None,
                             "cache_key": None, "data_fingerprint": None, "data": None}
        self.started = time.time()
        self._clock = time.perf_counter()

    def update(self, **fields) -> RunRecord:
        """Add or replace fields (``device``, ``cache_key``, ``data_fingerprint``, ...)."""
        self.fields.update({k: _plain(v) for k, v in fields.items()})
        return self

    def with_caches(self, paths: Iterable[str | os.PathLike]) -> RunRecord:
        """The caches read: one sets ``cache_key`` and ``data_fingerprint``; several set them
        to lists, in the order given. ``caches`` lists each with its extraction's record."""
        caches = [cache_fields(p) for p in paths]
        one = len(caches) == 1
        return self.update(
            caches=caches,
            cache_key=caches[0]["cache_key"] if one else [c["cache_key"] for c in caches],
            data_fingerprint=(caches[0]["data_fingerprint"] if one
                              else [c["data_fingerprint"] for c in caches]),
            data=caches[0]["data"] if one else [c["data"] for c in caches])

    def write(self, path: str | os.PathLike, files: Iterable[str | os.PathLike] = (),
              extra_versions: Iterable[str] = ()) -> Path:
        """Write the record to ``path`` (atomically); ``files`` are the files the run wrote,
        listed relative to the record's folder where they are under it."""
        path = Path(path)
        folder = path.parent.absolute()
        ended = time.time()
        record = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "stage": self.stage,
            "command": shlex.join(command()), "argv": command(), "cwd": os.getcwd(),
            "host": platform.node(),
            "pipeline_version": distribution.version(), "versions": versions(extra_versions),
            **self.fields,
            "started": _iso(self.started), "ended": _iso(ended),
            "seconds": round(time.perf_counter() - self._clock, 3),
            "files": sorted({_relative(Path(f), folder) for f in files}),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w") as fh:  # never half a record under the final name
            fh.write(json.dumps(record, indent=2, default=str) + "\n")
        return path


def shared_fields(path: str | os.PathLike) -> dict:
    """What the record of several runs (a sweep, a freeze-depth experiment) takes from the
    record at ``path`` of one of them: cache, data and device, which they share. Empty when
    there is no record (a run finished before records were written)."""
    if not Path(path).exists():
        return {}
    record = read_record(path)
    return {k: record[k] for k in _SHARED if k in record}


def read_record(path: str | os.PathLike) -> dict:
    """A record written by :meth:`RunRecord.write`."""
    record = json.loads(Path(path).read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a run record (format {record.get('format')!r})")
    return record


def _relative(path: Path, folder: Path) -> str:
    path = path.absolute()
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


def _plain(value):
    """Dataclasses and paths as JSON takes them."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
