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
