"""The errors a user can cause; the CLI turns each into one line and a non-zero exit."""


class PipelineError(Exception):
    """A mistake in the user's input or environment, with a message that says what to do."""


class DataError(PipelineError):
    """The image folder or manifest cannot be used as given."""


class BackboneError(PipelineError):
    """Unknown backbone, or a layer that the backbone does not have."""


class WeightsError(PipelineError):
    """Pretrained weights are missing or do not fit the architecture."""


class CacheError(PipelineError):
    """A feature cache is missing, incomplete, busy, or not one of ours."""


class WriteError(PipelineError):
    """A file could not be written (a full disk, a quota, an I/O error); the previous file at
    that path, if any, is unchanged."""


class OptionError(PipelineError):
    """A stage's setting is outside what it accepts; carries which option, its value and the
    range it must lie in."""

    def __init__(self, option: str, value, allowed: str):
        self.option, self.value, self.allowed = option, value, allowed
        super().__init__(f"{option.replace('_', '-')} must be {allowed}, not {value!r}")


class MissingExtraError(PipelineError):
    """An optional dependency is not installed; carries the module and the extra that brings
    it, so the one line says what to install."""

    def __init__(self, module: str, extra: str, purpose: str):
        self.module, self.extra, self.purpose = module, extra, purpose
        super().__init__(f"{purpose} needs {module}, which is not installed: "
                         f"pip install 'cnn-bottleneck-pipeline[{extra}]'")
