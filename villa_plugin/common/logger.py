"""Training output on rank 0: console lines, TensorBoard scalars and a tqdm progress bar.

Console line every ``training.log_interval`` updates (``training.log_format``: ``simple`` or
``json``): update/max, epoch, every logged value, lr, updates/s, examples/s and ETA. TensorBoard
scalars go to ``env.tensorboard_logdir`` (default ``<save_dir>/tensorboard``) when
``training.tensorboard``. The bar shows when ``training.progress_bar`` is true, or ``auto`` and
stderr is a terminal.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Any, Dict, Optional

LOGGER_NAME = "villa_plugin"


def get_logger(name: str = LOGGER_NAME) -> logging.Logger:
    return logging.getLogger(name)


def ensure_console_logging(is_main: bool = True) -> logging.Logger:
    """Give the package logger a console handler when nothing else logs (``mmf_run`` sets up the
    root logger and ``<save_dir>/train.log`` itself; a trainer run from Python relies on this)."""
    logger = get_logger()
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO if is_main else logging.WARNING)
    if not logging.getLogger().handlers and not logger.handlers:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(message)s", "%Y-%m-%dT%H:%M:%S"))
        logger.addHandler(console)
    return logger


def progress_bar_enabled(setting: Any, is_main: bool) -> bool:
    """``training.progress_bar``: true / false, or auto (on when stderr is a terminal); rank 0 only."""
    text = str(setting).strip().lower()
    if not is_main or text in ("false", "off", "no", "0"):
        return False
    if text in ("true", "on", "yes", "1"):
        return True
    if text == "auto":
        return sys.stderr.isatty()
    from villa_plugin.common.errors import ConfigError

    raise ConfigError(f'training.progress_bar must be auto, true or false; got "{setting}"')


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m{seconds % 60:02d}s"


class TrainingLogger:
    """Rank-0 sink for training / evaluation values; a no-op on other ranks."""

    def __init__(self, is_main: bool, log_format: str = "simple", tensorboard_dir: Optional[str] = None, progress_bar: Any = "auto", total_updates: Optional[int] = None, initial_update: int = 0):
        self.is_main = is_main
        self.log_format = log_format
        self.logger = get_logger()
        self.writer = None
        self.bar = None
        if not is_main:
            return
        if log_format not in ("simple", "json"):
            from villa_plugin.common.errors import ConfigError

            raise ConfigError(f'training.log_format must be "simple" or "json", got "{log_format}"')
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        if progress_bar_enabled(progress_bar, is_main):
            from tqdm import tqdm

            self.bar = tqdm(total=total_updates, initial=initial_update, unit="upd", dynamic_ncols=True)

    def _emit(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            self.logger.info(message)

    def log_train(self, update: int, max_updates: Optional[int], epoch: int, values: Dict[str, float], lr: float, updates_per_s: float, examples_per_s: float) -> None:
        """One training line plus scalars (values keyed like ``train/<dataset>/<loss>``)."""
        if not self.is_main:
            return
        remaining = (max_updates - update) if max_updates else 0
        eta = format_duration(remaining / updates_per_s) if updates_per_s > 0 and max_updates else "?"
        record = {"update": update, "max_updates": max_updates, "epoch": epoch, **values, "lr": lr,
                  "updates_per_s": round(updates_per_s, 4), "examples_per_s": round(examples_per_s, 2), "eta": eta}
        if self.log_format == "json":
            self._emit(json.dumps(record))
        else:
            shown = ", ".join(f"{k}: {v:.4f}" for k, v in values.items())
            self._emit(
                f"progress: {update}/{max_updates}, epoch: {epoch}, {shown}, lr: {lr:.4e}, "
                f"ups: {updates_per_s:.2f}, ex/s: {examples_per_s:.1f}, eta: {eta}"
            )
        self.scalars(update, {**values, "train/lr": lr, "train/updates_per_s": updates_per_s, "train/examples_per_s": examples_per_s})

    def log_eval(self, update: int, report: Dict[str, float], checkpoint: Optional[str] = None) -> None:
        """One evaluation line plus scalars (keys ``<split>/<dataset>/<metric>``). ``update`` is the
        update of the weights evaluated; ``checkpoint`` names their file when they are not the
        current weights (the final passes score ``best.ckpt``)."""
        if not self.is_main:
            return
        if self.log_format == "json":
            self._emit(json.dumps({"update": update, **({"checkpoint": checkpoint} if checkpoint else {}), **report}))
        else:
            what = f"evaluation of {checkpoint} (the best checkpoint, update {update})" if checkpoint else f"evaluation at update {update}"
            self._emit(f"{what}: " + ", ".join(f"{k}: {v:.4f}" for k, v in report.items()))
        self.scalars(update, report)

    def info(self, message: str) -> None:
        if self.is_main:
            self._emit(message)

    def scalars(self, update: int, values: Dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key if "/" in key else f"train/{key}", value, update)

    def progress(self, n: int = 1, postfix: Optional[Dict[str, float]] = None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k.rsplit("/", 1)[-1]: f"{v:.4f}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
