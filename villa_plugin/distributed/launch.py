"""Process-group set-up for runs launched by ``torchrun`` (or any launcher that sets its
environment variables), and fail-fast handling of an error on one rank.

``setup(config)`` reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR`` /
``MASTER_PORT`` for ``env://``), makes ``cuda:$LOCAL_RANK`` the current device (MMF put every local
rank on cuda:0), and initialises the process group with ``distributed.backend`` (``auto``: nccl on
CUDA, gloo on CPU), ``distributed.init_method`` and ``distributed.timeout_s``. There is no dummy
CUDA all-reduce, so CPU/gloo runs work. Without ``WORLD_SIZE`` (or with 1) it does nothing.

Rank failures: an uncaught exception on any rank is logged with its rank and ends that process at
once with exit code 1 (``os._exit``, skipping interpreter teardown, which can block inside a
communicator). torchrun then stops the other ranks; a rank blocked in a collective without
torchrun gets an error from gloo when its peer disappears, or from the ``distributed.timeout_s``
watchdog under NCCL (``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` is set unless already set).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import traceback
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist

from villa_plugin.common.errors import ConfigError
from villa_plugin.distributed.base import config_value

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "nccl", "gloo")


def env_int(name: str, default: Optional[int] = None) -> Optional[int]:
    """An integer environment variable; a ConfigError names it when it is not an integer."""
    value = os.environ.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"Environment variable {name}={value!r} must be an integer (torchrun sets it).") from None


def resolve_backend(config: Any) -> str:
    """``distributed.backend`` with ``auto`` resolved: nccl when this run uses CUDA, else gloo."""
    backend = str(config_value(config, "distributed.backend", "auto")).lower()
    if backend not in BACKENDS:
        raise ConfigError(f"distributed.backend={backend!r} must be one of {' | '.join(BACKENDS)}.")
    uses_cuda = torch.cuda.is_available() and str(config_value(config, "training.device", "auto")).lower() != "cpu"
    if backend == "auto":
        return "nccl" if uses_cuda else "gloo"
    if backend == "nccl" and not uses_cuda:
        raise ConfigError(
            "distributed.backend=nccl needs CUDA (and training.device not cpu); use distributed.backend=gloo "
            "or auto for CPU runs."
        )
    return backend


def setup(config: Any = None) -> Tuple[int, int, int]:
    """Initialise ``torch.distributed`` from the launcher's environment; returns
    ``(rank, world_size, local_rank)``. A no-op returning ``(0, 1, 0)`` for one process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), env_int("LOCAL_RANK", 0)
    world_size = env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return 0, 1, 0
    rank, local_rank = env_int("RANK"), env_int("LOCAL_RANK", 0)
    if rank is None:
        raise ConfigError(f"WORLD_SIZE={world_size} but RANK is not set: launch with torchrun, which sets both.")
    init_method = str(config_value(config, "distributed.init_method", "env://"))
    if init_method == "env://":
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise ConfigError(
                f"distributed.init_method=env:// needs {' and '.join(missing)} in the environment "
                f"(torchrun sets them; on several machines pass --master_addr/--master_port or --rdzv_endpoint)."
            )
    backend = resolve_backend(config)
    if backend == "nccl":
        select_cuda_device(local_rank)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = datetime.timedelta(seconds=float(config_value(config, "distributed.timeout_s", 600)))
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
    install_failure_handler()
    logger.info("rank %d/%d (local rank %d): %s process group ready", rank, world_size, local_rank, backend)
    return rank, world_size, local_rank


def select_cuda_device(local_rank: int) -> torch.device:
    """Make ``cuda:local_rank`` the current device (one GPU per local rank)."""
    count = torch.cuda.device_count()
    if not 0 <= local_rank < count:
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but this machine has {count} CUDA device(s): start at most {count} "
            f"processes per node (torchrun --nproc_per_node={count})."
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def teardown() -> None:
    """Destroy the process group at the normal end of a run (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        # All ranks reach here at a normal end; the barrier keeps one rank from tearing the group
        # down while another still has collectives in flight (gloo then aborts the process).
        dist.barrier()
        dist.destroy_process_group()


# -- rank failures ------------------------------------------------------------------------
def report_failure(error: BaseException) -> None:
    """Log ``error`` with this process's rank to stderr."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (env_int("RANK", 0), env_int("WORLD_SIZE", 1))
    from villa_plugin.common.errors import UserError, one_paragraph

    if isinstance(error, UserError):  # the message says what to fix; no traceback
        detail = f"{type(error).__name__}: {one_paragraph(error)}\n"
    else:
        detail = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    sys.stderr.write(f"[rank {rank}/{world}] failed, ending this process so the run stops on every rank:\n{detail}")


def abort(code: int = 1) -> None:
    """Flush the streams and end the process now, without teardown that could block."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


def _excepthook(exc_type, exc, tb) -> None:
    report_failure(exc.with_traceback(tb) if exc is not None else exc_type())
    abort(1)


def install_failure_handler() -> None:
    """Make an uncaught exception end this rank at once (see the module docstring)."""
    sys.excepthook = _excepthook


@contextlib.contextmanager
def fail_fast():
    """Wrap a distributed run: an exception, or ``sys.exit`` with a non-zero code, is reported
    with the rank and ends the process at once. Does nothing special for one process."""
    try:
        yield
    except SystemExit as error:
        if error.code in (0, None) or not dist.is_initialized():
            raise
        abort(error.code if isinstance(error.code, int) else 1)
    except BaseException as error:  # noqa: BLE001 - every failure must end this rank
        if not dist.is_initialized():
            raise
        report_failure(error)
        abort(1)
