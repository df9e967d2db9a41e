"""``mmf_run``: compose the config, prepare the run and hand it to the registered trainer.

    mmf_run config=projects/villa/vqa.yaml [model=villa] [datasets=vqa2] [run_type=train_val] \\
            [training.max_updates=100 ...]

Exit codes: 0 success, 1 a user error (bad config, missing file, unknown name, a full disk: printed
as one ``mmf_run: error: ...`` paragraph), 2 an unexpected error (traceback printed), 75 stopped by
SIGTERM / SIGINT / SIGUSR1 after writing a checkpoint (the resume command is printed; see
docs/faults.md), 130 interrupted (Ctrl-C twice, or outside training).
"""
from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import re
import shlex
import sys
import traceback
from typing import List, Optional, Sequence

from omegaconf import DictConfig

from villa_plugin.common.device import select_device, set_seed
from villa_plugin.common.errors import ConfigError, UserError, one_paragraph
from villa_plugin.config.compose import build_config
from villa_plugin.config.value_checks import check_values
from villa_plugin.registry import RegistryError, registry
from villa_plugin.run_dir import LOG_DATE_FORMAT, LOG_FORMAT, RunDirectory, on_setup_done
from villa_plugin.trainers.preemption import EXIT_PREEMPTED, Preempted

logger = logging.getLogger("villa_plugin.cli")

PROG = "mmf_run"
LAUNCH_MODULE = "villa_plugin.distributed.launch"
# OSErrors that are the user's to fix (disk full, limits, permissions, a file in a directory's place)
USER_OS_ERRORS = {errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                  errno.ENOTDIR, errno.EEXIST, errno.EISDIR}
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
        print(f"{PROG}: error: {one_paragraph(err)}", file=sys.stderr)
        return 1
    except Preempted as stop:
        if _rank() == 0:
            print(f"{PROG}: {stop}. Resume with: {resume_command(argv)}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno not in USER_OS_ERRORS:
            traceback.print_exc()
            return 2
        print(f"{PROG}: error: {_os_error_paragraph(err)}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 2
    finally:
        _remove_handlers(handlers)
        logging.getLogger().setLevel(root_level)


def _run(argv: List[str], handlers: List[logging.Handler]) -> None:
    config = build_config(argv)  # imports plugins (entry points, env.user_dir) first
    _require_selection(config)
    check_values(config)
    run_dir = RunDirectory(config, _rank())
    run_dir.check()  # nothing is written into save_dir until the trainer's set-up succeeded
    handlers.append(run_dir.buffer_logs())

    config.training.seed = set_seed(config.training.seed)  # saved, so a rerun repeats it
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
    preempted = None
    # Under torchrun, fail_fast ends a failing rank at once (a rank blocked in a collective could
    # otherwise hang); with one process it lets errors through to run()'s handling.
    try:
        with getattr(launch, "fail_fast", contextlib.nullcontext)():
            trainer = trainer_cls(config)
            on_setup_done(trainer, run_dir, handlers)
            try:
                trainer.run()
            except Preempted as stop:  # every rank stopped at the same update: end the run normally
                preempted = stop
            handler = run_dir.commit()  # trainers without the set-up hook: once the run succeeded
            if handler is not None:
                handlers.append(handler)
    finally:
        run_dir.close()
    if hasattr(launch, "teardown"):
        launch.teardown()
    if preempted is not None:
        raise preempted


def resume_command(argv: Sequence[str]) -> str:
    """``mmf_run`` with the same arguments, ``checkpoint.resume=True`` instead of any resume or
    overwrite setting (under torchrun: the same launcher command with these arguments)."""
    dropped = re.compile(r"^(checkpoint\.(resume|resume_best|resume_file)|env\.overwrite)=")
    kept = [arg for arg in argv if not dropped.match(arg)]
    command = shlex.join([PROG, *kept, "checkpoint.resume=True"])
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        command += " (start it with the same torchrun / srun launcher as this run)"
    return command


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


def _remove_handlers(handlers: List[logging.Handler]) -> None:
    root = logging.getLogger()
    for handler in handlers:
        root.removeHandler(handler)
        handler.close()


def _os_error_paragraph(err: OSError) -> str:
    """A file-system error the user can fix: the system's reason, the file and what to do."""
    where = f": {err.filename}" if err.filename else ""
    hint = {
        errno.EFBIG: "the file-size limit of this process (ulimit -f) was reached: raise it",
        errno.ENOSPC: "the disk is full: free space or write to another filesystem (env.save_dir, env.cache_dir)",
        errno.EDQUOT: "the disk quota is used up: free space or write elsewhere (env.save_dir, env.cache_dir)",
    }.get(err.errno, "check env.save_dir / env.cache_dir and the permissions of that path")
    return f"{err.strerror or err}{where}; {hint}."


if __name__ == "__main__":
    sys.exit(run())
