"""Errors caused by user input (config, data files, checkpoints).

``mmf_run`` prints these as one paragraph and exits non-zero instead of showing a traceback, so
their message must name the file or key at fault and say how to fix it.
"""
import re


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


_WORKER_HEADER = re.compile(r"^Caught \w+ in DataLoader worker process (\d+)\.")


def one_paragraph(err: BaseException) -> str:
    """The error's message without blank lines (one paragraph); KeyError-style quotes removed. An
    error torch re-raised from a DataLoader worker (its message is the worker's whole traceback)
    is reduced to its own message, naming the worker."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    header = _WORKER_HEADER.match(text)
    if header is not None:
        cls = type(err)
        for prefix in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
            at = text.rfind("\n" + prefix)
            if at >= 0:
                text = f"{text[at + 1 + len(prefix):].strip()} (raised in DataLoader worker process {header.group(1)})"
                break
    lines = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines) or type(err).__name__
