"""The errors a user can cause, in one module: each carries its facts; the CLI words the advice.

Every layer raises these with a neutral message (what is wrong, in words that hold for a
script as much as for the command line, naming no command) and the facts as keywords, which
become attributes: ``CacheError(message, path=path, reason="activation-cache")`` has
``err.path`` and ``err.reason``. The CLI (:mod:`pipeline.cli.messages`) prints the message on
one line, with the advice the command line adds for its ``reason`` (which command lists what
is there, which to run first), and exits non-zero. A bug is not one of these and still raises
with its traceback.
"""

from __future__ import annotations

__all__ = ["ActivationError", "BackboneError", "BlockError", "CacheDamaged", "CacheError",
           "DataError", "DistributedError", "EngineError", "ExportError", "FinetuneError",
           "HeadError", "LRFindError", "LockTimeout", "MissingExtraError", "ModelFileError",
           "OptionError", "PipelineError", "PoolError", "SweepError", "TTAError", "TeacherError",
           "TrackingError", "WeightsError", "WriteError"]


def _rebuilt(cls: type, args: tuple, state: dict) -> PipelineError:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class PipelineError(Exception):
    """A mistake in the user's input or environment.

    Parameters
    ----------
    message
        What is wrong and, where the library can say it, what to change; no CLI command.
    reason
        A short fixed name of the case ("activation-cache", "unknown-layer"), for the CLI's
        advice; None where the message says all there is.
    **facts
        What the message is about (``path``, ``key``, ``backbone``, what differs), each kept
        as an attribute of the same name and in ``facts``.
    """

    def __init__(self, message: str = "", *, reason: str | None = None, **facts):
        super().__init__(message)
        self.reason = reason
        self.facts = facts
        self.__dict__.update(facts)

    def __reduce__(self):
        # Keep the facts across pickling (a DataLoader worker, a process pool): Exception's
        # own reduction would call the class with its message alone.
        return _rebuilt, (type(self), self.args, dict(self.__dict__))


class DataError(PipelineError):
    """The image folder, manifest or split cannot be used as given."""


class BackboneError(PipelineError):
    """Unknown backbone, or a layer that the backbone does not have (facts: ``backbone``,
    ``layer``)."""


class BlockError(PipelineError):
    """A backbone whose blocks cannot be found, or a number of blocks or layers it does not
    have (facts: ``backbone``, ``requested``, ``available``)."""


class WeightsError(PipelineError):
    """Pretrained weights are missing or do not fit the architecture."""


class EngineError(PipelineError):
    """An inference engine that does not run on the device, or gives other features."""


class CacheError(PipelineError):
    """A feature cache is missing, incomplete, busy, or not one of ours (fact: ``path``)."""


class CacheDamaged(CacheError):
    """A complete cache whose bytes changed on disk: a chunk fails its checksum, or the file
    is truncated."""


class LockTimeout(CacheError):
    """Another live run kept the file locked longer than this run would wait."""


class ModelFileError(PipelineError):
    """A saved model that cannot be used: missing, corrupt, of another kind, or made for other
    features (fact: ``path``)."""


class HeadError(PipelineError):
    """Unknown head, a class that is not a classifier, or a bad head parameter."""


class ExportError(PipelineError):
    """An export that cannot be written as asked: a cache as a table (CSV, Parquet, npy) or a
    model as one ONNX or TorchScript file (none found, an unknown format, a head without a
    tensor form)."""


class FinetuneError(PipelineError):
    """A fine-tuning run that cannot start or resume as asked."""


class SweepError(FinetuneError):
    """A sweep that cannot run as asked, or whose folder holds another sweep's runs."""


class LRFindError(FinetuneError):
    """A learning-rate range test that cannot run as asked."""


class ActivationError(FinetuneError):
    """A network that cannot be cut at a block boundary, or an activation cache that cannot be
    written."""


class TTAError(PipelineError):
    """Test-time augmentation asked for what it cannot do."""


class TrackingError(PipelineError):
    """Tracking asked for, but its store cannot be used."""


class DistributedError(PipelineError):
    """The processes of one job disagree about their inputs or cannot see each other's files."""


class WriteError(PipelineError):
    """A file could not be written (a full disk, a quota, an I/O error); the previous file at
    that path, if any, is unchanged."""


class OptionError(PipelineError):
    """A stage's setting is outside what it accepts; carries which option, its value and the
    range it must lie in."""

    def __init__(self, option: str, value, allowed: str):
        super().__init__(f"{option.replace('_', '-')} must be {allowed}, not {value!r}",
                         option=option, value=value, allowed=allowed)


class MissingExtraError(PipelineError):
    """An optional dependency is not installed; carries the module and the extra that brings
    it, so the one line says what to install."""

    def __init__(self, module: str, extra: str, purpose: str):
        super().__init__(f"{purpose} needs {module}, which is not installed: "
                         f"pip install 'cnn-bottleneck-pipeline[{extra}]'",
                         module=module, extra=extra, purpose=purpose)


class TeacherError(PipelineError):
    """A teacher that cannot teach this cache: unreadable, other classes, other features."""


class PoolError(DataError):
    """A pool that cannot be used with the labelled cache: empty, another feature space, or the
    labelled cache itself."""
