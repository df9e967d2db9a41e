"""The run directory (``env.save_dir``) of ``mmf_run``: its contents are protected, and a run
writes into it only once its set-up has succeeded.

- :meth:`RunDirectory.check` (no writes): ``env.save_dir`` / ``env.cache_dir`` must be creatable
  directories (no regular file on the way), ``<save_dir>/models`` must not be a file, and a
  training run into a non-empty ``save_dir`` needs ``checkpoint.resume=True`` (or
  ``resume_best``) to continue it, or ``env.overwrite=true`` to replace it.
- Until :meth:`RunDirectory.commit`, log records are kept in memory; ``commit`` (called by the
  trainer once set-up succeeded, else by ``mmf_run`` after the run) creates the directory, writes
  ``config.yaml`` and ``train.log`` (with the records so far), and under ``env.overwrite=true``
  deletes the previous run's checkpoints. A failed start (bad resume file, data error) therefore
  leaves an existing run directory exactly as it was.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig

from villa_plugin.checkpoint import MODELS_DIR, CheckpointFiles
from villa_plugin.common.config_access import config_value
from villa_plugin.common.errors import ConfigError
from villa_plugin.config.compose import SAVED_CONFIG_NAME, save_config
from villa_plugin.config.run_type import parse_run_type

logger = logging.getLogger("villa_plugin.run_dir")

LOG_FILE = "train.log"
LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s : %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"


def regular_file_on_path(path: Path) -> Optional[Path]:
    """The first existing component of ``path`` (itself or an ancestor) that is not a directory."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


def check_directory_key(config: DictConfig, key: str) -> None:
    """ConfigError when the directory of config ``key`` cannot be created: a file is in the way."""
    value = config_value(config, key, None)
    if not value:
        return
    path = Path(os.path.expanduser(str(value))).absolute()
    blocker = regular_file_on_path(path)
    if blocker is not None:
        what = "is" if blocker == path else "lies under"
        raise ConfigError(
            f"{key}={path} {what} the regular file {blocker}, so it cannot be a directory. Set {key} to "
            f"another directory, or move {blocker} away."
        )


class RunDirectory:
    """``env.save_dir`` of one ``mmf_run`` invocation on this rank."""

    def __init__(self, config: DictConfig, rank: int = 0):
        self.config = config
        self.rank = rank
        self.path = Path(os.path.expanduser(str(config.env.save_dir))).absolute()
        self.trains = parse_run_type(str(config.run_type)).train
        self.continues = bool(config_value(config, "checkpoint.resume", False)) or bool(
            config_value(config, "checkpoint.resume_best", False)
        )
        self.overwrite = bool(config_value(config, "env.overwrite", False))
        self.committed = False
        self._buffer: Optional[logging.handlers.MemoryHandler] = None

    # -- before anything is written ---------------------------------------------------------
    def check(self) -> None:
        """Refuse a save_dir that cannot be created or that holds a run this one would destroy."""
        check_directory_key(self.config, "env.save_dir")
        check_directory_key(self.config, "env.cache_dir")
        models = self.path / MODELS_DIR
        if models.exists() and not models.is_dir():
            raise ConfigError(
                f"{models} is a file, but checkpoints go into a directory of that name. Move or delete it, "
                f"or set env.save_dir to another directory."
            )
        entries = self._entries()
        if self.trains and entries and not self.continues and not self.overwrite:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ConfigError(
                f"env.save_dir={self.path} is not empty ({shown}): this training run would overwrite that "
                f"run's checkpoints. Continue it with checkpoint.resume=True, choose a new env.save_dir, or "
                f"replace it with env.overwrite=true (deletes its checkpoints)."
            )

    def _entries(self) -> List[str]:
        try:
            return sorted(os.listdir(self.path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    # -- logging until commit ---------------------------------------------------------------
    def buffer_logs(self) -> logging.Handler:
        """Keep log records in memory until :meth:`commit` writes them to ``train.log``."""
        self._buffer = logging.handlers.MemoryHandler(capacity=10**9, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
        self._buffer.setLevel(logging.INFO)
        logging.getLogger().addHandler(self._buffer)
        return self._buffer

    # -- once set-up succeeded ----------------------------------------------------------------
    def commit(self) -> Optional[logging.Handler]:
        """Create the directory, write ``config.yaml`` (rank 0) and ``train.log``; under
        ``env.overwrite=true`` delete the previous run's checkpoints first. Returns the file
        log handler (None when already committed)."""
        if self.committed:
            return None
        self.committed = True
        had_entries = bool(self._entries())
        self.path.mkdir(parents=True, exist_ok=True)
        handler = self._file_handler()
        if self.rank == 0:
            if self.trains and self.overwrite and had_entries and not self.continues:
                self._remove_previous_checkpoints()
            config_path = self.path / SAVED_CONFIG_NAME
            if not self.trains and config_path.exists():
                logger.info("Kept %s of the training run (this run_type=%s does not train)", config_path, self.config.run_type)
            else:
                logger.info("Config saved to %s", save_config(self.config, self.path))
        return handler

    def _file_handler(self) -> logging.Handler:
        name = LOG_FILE if self.rank == 0 else f"train_rank{self.rank}.log"
        handler = logging.FileHandler(self.path / name, encoding="utf-8")
        handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
        handler.setLevel(logging.INFO)
        root = logging.getLogger()
        if self._buffer is not None:
            self._buffer.setTarget(handler)
            self._buffer.flush()
            root.removeHandler(self._buffer)
            self._buffer.close()
            self._buffer = None
        root.addHandler(handler)
        return handler

    def _remove_previous_checkpoints(self) -> None:
        files = CheckpointFiles(str(self.path))
        doomed = [files.current, files.best] + [files.model_file(u) for u in files.kept_updates()]
        removed = [path for path in doomed if os.path.isfile(path)]
        for path in removed:
            os.remove(path)
        logger.warning(
            "env.overwrite=true: deleted %d checkpoint file(s) of the previous run in %s (%s)",
            len(removed), self.path, ", ".join(os.path.relpath(p, self.path) for p in removed) or "none",
        )

    def close(self) -> None:
        """Drop records still buffered (the run never committed: nothing is written)."""
        if self._buffer is not None:
            logging.getLogger().removeHandler(self._buffer)
            self._buffer.close()
            self._buffer = None


def on_setup_done(trainer: Any, run_dir: RunDirectory, handlers: List[logging.Handler]) -> None:
    """Give ``trainer`` the hook the ``mmf`` trainer calls once its set-up succeeded."""

    def commit() -> None:
        handler = run_dir.commit()
        if handler is not None:
            handlers.append(handler)

    trainer.after_setup = commit

