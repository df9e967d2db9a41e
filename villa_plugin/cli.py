"""``mmf_run``: compose the config, prepare the run and hand it to the registered trainer.

    mmf_run config=projects/villa/vqa.yaml [model=villa] [datasets=vqa2] [run_type=train_val] \\
            [training.max_updates=100 ...]

Exit codes: 0 success, 1 a user error (bad config, missing file, unknown name: printed as one
``mmf_run: error: ...`` paragraph), 2 an unexpected error (traceback printed), 130 interrupted.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import DictConfig

from villa_plugin.common.device import select_device, set_seed
from villa_plugin.common.errors import ConfigError, UserError
from villa_plugin.config.compose import build_config, save_config
from villa_plugin.registry import RegistryError, registry

logger = logging.getLogger("villa_plugin.cli")

PROG = "mmf_run"
LAUNCH_MODULE = "villa_plugin.distributed.launch"
LOG_FILE = "train.log"
LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s : %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"
USAGE = f"""usage: {PROG} config=<yaml> [model=<name>] [datasets=<name>[,<name>]] [run_type=<type>] [key.sub=value ...]

  config=<yaml>      experiment config (looked up in the current directory, then the bundled configs)
  model=<name>       registered model (default: the config's `model:`)
  datasets=<names>   registered dataset builders, comma-separated (alias: dataset=)
  run_type=<type>    train | val | test | train_val | predict (MMF forms such as train_inference too)
  key.sub=value      any declared config key; list items as key[N]=value; `key value` also works
  env.user_dir=<dir> import your own plugin package first (or set MMF_USER_DIR)
"""


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``mmf_run``; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(USAGE, end="")
        return 0
    root_level = logging.getLogger().level
    handlers = _setup_console_logging()
    try:
        _run(argv, handlers)
        return 0
    except (UserError, RegistryError) as err:
        print(f"{PROG}: error: {_paragraph(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        return 2
    finally:
        _remove_handlers(handlers)
        logging.getLogger().setLevel(root_level)


def _run(argv: List[str], handlers: List[logging.Handler]) -> None:
    config = build_config(argv)  # imports plugins (entry points, env.user_dir) first
    _require_selection(config)
    save_dir = Path(str(config.env.save_dir))
    save_dir.mkdir(parents=True, exist_ok=True)
    handlers.append(_add_file_handler(save_dir))

    config.training.seed = set_seed(config.training.seed)  # saved, so a rerun repeats it
    if _rank() == 0:
        logger.info("Config saved to %s", save_config(config, save_dir))
    device = select_device(config.training.device)
    registry.register("current_device", device)
    logger.info("Device: %s | seed: %d | run_type: %s", device, config.training.seed, config.run_type)
    launch = _launch_module()
    if launch is not None:
        launch.setup(config)

    trainer_cls = registry.get_trainer_class(config.training.trainer)
    logger.info(
        "Trainer %s, model %s, datasets %s", config.training.trainer, config.model, ",".join(config.datasets)
    )
    # Under torchrun, fail_fast ends a failing rank at once (a rank blocked in a collective could
    # otherwise hang); with one process it lets errors through to run()'s handling.
    with getattr(launch, "fail_fast", contextlib.nullcontext)():
        trainer = trainer_cls(config)
        trainer.run()
    if hasattr(launch, "teardown"):
        launch.teardown()


def _require_selection(config: DictConfig) -> None:
    if not config.model:
        raise ConfigError(
            "No model selected: pass model=<name> or set `model:` in the experiment config. "
            f"Registered models: {', '.join(registry.names('model')) or '(none)'}."
        )
    if not config.datasets:
        raise ConfigError(
            "No dataset selected: pass datasets=<name>[,<name>] or set `datasets:` in the experiment "
            f"config. Registered datasets: {', '.join(registry.names('builder')) or '(none)'}."
        )


def _launch_module():
    """``villa_plugin.distributed.launch`` (``setup(config)``, optional ``fail_fast()`` and
    ``teardown()``), or None when that module does not exist."""
    try:
        return importlib.import_module(LAUNCH_MODULE)
    except ModuleNotFoundError as err:
        if err.name == LAUNCH_MODULE:
            return None
        raise


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


# -- logging -----------------------------------------------------------------------------------
def _setup_console_logging() -> List[logging.Handler]:
    """Timestamped console logging (INFO on rank 0, WARNING on other ranks) on the root logger."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    handler.setLevel(logging.INFO if _rank() == 0 else logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return [handler]


def _add_file_handler(save_dir: Path) -> logging.Handler:
    """``<save_dir>/train.log`` on rank 0, ``train_rank<N>.log`` on the others."""
    rank = _rank()
    name = LOG_FILE if rank == 0 else f"train_rank{rank}.log"
    handler = logging.FileHandler(save_dir / name, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    return handler


def _remove_handlers(handlers: List[logging.Handler]) -> None:
    root = logging.getLogger()
    for handler in handlers:
        root.removeHandler(handler)
        handler.close()


def _paragraph(err: BaseException) -> str:
    """The error's message without blank lines (one paragraph); KeyError-style quotes removed."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    lines = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines) or type(err).__name__


if __name__ == "__main__":
    sys.exit(run())
