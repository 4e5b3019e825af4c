"""Errors a user can fix: the command line prints their one-line message, no traceback."""


class CapsnetError(Exception):
    """A problem with the user's input (config, data, checkpoint, output folder) and its fix."""


class DatasetError(CapsnetError):
    """The dataset is missing, malformed or inconsistent."""


class CheckpointError(CapsnetError):
    """A file is not a usable checkpoint for this model."""


class NonFiniteLossError(CapsnetError):
    """The loss became NaN or infinite."""
