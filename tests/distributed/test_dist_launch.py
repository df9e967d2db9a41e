"""launch.setup reads torchrun's environment; a failing or hanging rank ends the whole run
(both processes) within a bounded time, with the error visible."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from villa_plugin.common.errors import ConfigError
from villa_plugin.distributed import launch

SCRIPT = textwrap.dedent(
    """
    import sys, time, torch, torch.distributed as dist
    from omegaconf import OmegaConf
    from villa_plugin.distributed import launch

    mode, timeout_s = sys.argv[1], float(sys.argv[2])
    config = OmegaConf.create({"training": {"device": "cpu"},
                               "distributed": {"backend": "auto", "init_method": "env://", "timeout_s": timeout_s}})
    rank, world, local_rank = launch.setup(config)
    assert (world, local_rank) == (2, rank) and dist.get_backend() == "gloo"
    print(f"rank {rank} of {world} ready", flush=True)
    if rank == 1:
        if mode == "raise":
            with launch.fail_fast():
                time.sleep(0.5)
                raise RuntimeError("boom from rank 1")
        time.sleep(600)  # mode "hang": never joins the collective below
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for rank 1
    dist.barrier()
    print("rank 0 finished normally", flush=True)
    """
)


def _torchrun(tmp_path, mode, timeout_s):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), mode, str(timeout_s)]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    return done, time.monotonic() - start


def test_exception_on_one_rank_ends_every_rank(tmp_path):
    done, seconds = _torchrun(tmp_path, "raise", 120)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "rank 0 of 2 ready" in output and "rank 1 of 2 ready" in output
    assert "[rank 1/2] failed" in output and "RuntimeError: boom from rank 1" in output
    assert "rank 0 finished normally" not in output
    assert seconds < 90, f"took {seconds:.0f} s: the blocked rank 0 was not ended promptly"


def test_hanging_rank_is_bounded_by_the_timeout(tmp_path):
    done, seconds = _torchrun(tmp_path, "hang", 3)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "[rank 0/2] failed" in output and "Timed out" in output
    assert seconds < 90, f"took {seconds:.0f} s"


# -- set-up without processes -----------------------------------------------------------------
def _config(**distributed):
    return OmegaConf.create({"training": {"device": "cpu"}, "distributed": {"backend": "auto", "init_method": "env://", "timeout_s": 5, **distributed}})


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    return monkeypatch


@pytest.mark.parametrize("world", [None, "1"])
def test_setup_is_a_no_op_for_one_process(clean_env, world):
    if world is not None:
        clean_env.setenv("WORLD_SIZE", world)
    assert launch.setup(_config()) == (0, 1, 0)
    assert not dist.is_initialized()
    launch.teardown()  # nothing to tear down: no error


def test_setup_needs_rank_and_master_address(clean_env):
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="RANK is not set"):
        launch.setup(_config())
    clean_env.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT"):
        launch.setup(_config())
    clean_env.setenv("RANK", "zero")
    with pytest.raises(ConfigError, match="RANK='zero' must be an integer"):
        launch.setup(_config())


def test_backend_resolution():
    assert launch.resolve_backend(_config(backend="gloo")) == "gloo"
    assert launch.resolve_backend(_config(backend="auto")) == "gloo"  # training.device=cpu
    with pytest.raises(ConfigError, match="must be one of auto"):
        launch.resolve_backend(_config(backend="mpi"))
    with pytest.raises(ConfigError, match="nccl needs CUDA"):
        launch.resolve_backend(_config(backend="nccl"))


def test_cuda_device_comes_from_local_rank(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert launch.select_cuda_device(1) == torch.device("cuda", 1)
    assert chosen == [1]
    with pytest.raises(ConfigError, match="LOCAL_RANK=2 but this machine has 2 CUDA"):
        launch.select_cuda_device(2)


def test_fail_fast_reraises_without_a_process_group():
    with pytest.raises(RuntimeError, match="plain"):
        with launch.fail_fast():
            raise RuntimeError("plain")
    with pytest.raises(SystemExit):
        with launch.fail_fast():
            sys.exit(2)


def test_failure_report_names_the_rank(capsys, clean_env):
    clean_env.setenv("RANK", "3")
    clean_env.setenv("WORLD_SIZE", "4")
    try:
        raise RuntimeError("disk full")
    except RuntimeError as error:
        launch.report_failure(error)
    launch.report_failure(ConfigError("distributed.backend=mpi must be one of auto | nccl | gloo."))
    err = capsys.readouterr().err
    assert "[rank 3/4] failed" in err and "Traceback" in err and "RuntimeError: disk full" in err
    assert "ConfigError: distributed.backend=mpi" in err
