"""Errors caused by user input (config, data files, checkpoints).

``mmf_run`` prints these as one paragraph and exits non-zero instead of showing a traceback, so
their message must name the file or key at fault and say how to fix it.
"""


class UserError(Exception):
    """Base class for errors the user can fix (bad config, missing file, wrong checkpoint)."""


class ConfigError(UserError):
    """A config key, value, type or file is wrong."""


class DataError(UserError):
    """A data file is missing, unreadable or holds a corrupt / inconsistent record."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, or does not fit the model / optimizer."""


class TrainingError(UserError):
    """Training cannot continue (e.g. too many non-finite losses)."""
