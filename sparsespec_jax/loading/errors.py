"""The one exception type every loader raises, so callers can catch bad checkpoints in one place."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, inconsistent with its config, or of an unsupported kind.

    The message always names the offending path and, where it applies, the tensor or field.
    """
