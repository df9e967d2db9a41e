"""mmf_run (villa_plugin.cli.run): the run steps, error paragraphs and exit codes.

The trainer is a test-only one registered under ``TRAINER`` (the core trainers may not exist yet);
the model and dataset are test-only registrations without defaults YAML.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import types

import pytest
import torch
from omegaconf import OmegaConf

from villa_plugin import cli
from villa_plugin.common.errors import DataError
from villa_plugin.datasets.base import BaseDatasetBuilder
from villa_plugin.models.base_model import BaseModel
from villa_plugin.registry import registry
from villa_plugin.trainers.base_trainer import MMFTrainer

TRAINER = "tst_cli_trainer"
LAUNCH_MODULE = "villa_plugin.distributed.launch"


class RecordingTrainer(MMFTrainer):
    """Records the config it was built with and whether run() was called; can raise on demand."""

    instances: list = []
    raise_in_run = None

    def __init__(self, config):
        self.config = config
        self.ran = False
        self.random_draw = torch.rand(1).item()  # seeded by mmf_run before the trainer exists
        RecordingTrainer.instances.append(self)

    def run(self):
        logging.getLogger("tst.trainer").info("trainer running")
        if RecordingTrainer.raise_in_run is not None:
            raise RecordingTrainer.raise_in_run
        self.ran = True


class _Model(BaseModel):
    pass


class _Builder(BaseDatasetBuilder):
    pass


@pytest.fixture(autouse=True)
def setup(monkeypatch, tmp_path):
    """Test components registered, the run inside tmp_path, no distributed launch module."""
    monkeypatch.delenv("MMF_USER_DIR", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, LAUNCH_MODULE, None)  # import fails as if absent
    registry.names("model")
    tables = {kind: dict(table) for kind, table in registry._tables.items()}
    registry.register_trainer(TRAINER, override=True)(RecordingTrainer)
    registry.register_model("tst_cli_model", override=True)(_Model)
    registry.register_builder("tst_cli_data", override=True)(_Builder)
    RecordingTrainer.instances = []
    RecordingTrainer.raise_in_run = None
    yield
    for kind, table in registry._tables.items():
        table.clear()
        table.update(tables[kind])


def base_args(tmp_path, *extra):
    return [
        "model=tst_cli_model",
        "dataset=tst_cli_data",
        f"training.trainer={TRAINER}",
        f"env.save_dir={tmp_path / 'run'}",
        "training.device=cpu",
        *extra,
    ]


def test_run_builds_saves_logs_and_runs_trainer(tmp_path, capsys):
    assert cli.run(base_args(tmp_path, "run_type=train_inference", "training.seed=3")) == 0
    (trainer,) = RecordingTrainer.instances
    assert trainer.ran and trainer.config.run_type == "train_inference"
    assert trainer.config.model == "tst_cli_model"
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.training.trainer == TRAINER and saved.training.seed == 3
    log = (tmp_path / "run" / "train.log").read_text()
    assert "trainer running" in log and "Config saved to" in log
    assert log.splitlines()[0][:4].isdigit()  # lines start with a timestamp
    assert "trainer running" in capsys.readouterr().out  # console logging too
    assert registry.get("current_device") == torch.device("cpu")


def test_seed_is_applied_before_the_trainer(tmp_path):
    cli.run(base_args(tmp_path, "training.seed=11"))
    cli.run(base_args(tmp_path, "training.seed=11", "env.overwrite=true"))
    cli.run(base_args(tmp_path, "training.seed=12", "env.overwrite=true"))
    draws = [t.random_draw for t in RecordingTrainer.instances]
    assert draws[0] == draws[1] != draws[2]


def test_random_seed_is_logged_and_saved_for_reruns(tmp_path):
    assert cli.run(base_args(tmp_path, "training.seed=-1")) == 0
    saved = tmp_path / "run" / "config.yaml"
    seed = OmegaConf.load(saved).training.seed
    assert seed >= 0 and f"seed: {seed}" in (tmp_path / "run" / "train.log").read_text()
    # rerunning the saved config repeats the run, random seed included
    assert cli.run([f"config={saved}", "env.overwrite=true"]) == 0
    first, second = RecordingTrainer.instances
    assert second.config.training.seed == seed and second.random_draw == first.random_draw
    plain = [OmegaConf.to_container(t.config, resolve=True) for t in (first, second)]
    assert (plain[0]["env"].pop("overwrite"), plain[1]["env"].pop("overwrite")) == (False, True)
    assert plain[0] == plain[1]


def _one_paragraph_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("mmf_run: error: ") and "Traceback" not in err
    assert "\n\n" not in err.strip()
    return err


def test_config_error_is_one_paragraph_exit_1(tmp_path, capsys):
    assert cli.run(base_args(tmp_path, "training.max_udpates=5")) == 1
    err = _one_paragraph_error(capsys)
    assert '"training.max_udpates"' in err and 'Did you mean "training.max_updates"?' in err
    assert RecordingTrainer.instances == []


def test_several_config_errors_still_one_paragraph(tmp_path, capsys):
    assert cli.run(base_args(tmp_path, "training.max_udpates=5", "training.seed=x")) == 1
    err = _one_paragraph_error(capsys)
    assert "2 problems" in err and "training.seed" in err


def test_unknown_trainer_is_a_user_error(tmp_path, capsys):
    assert cli.run(base_args(tmp_path, "training.trainer=tst_cli_trainr")) == 1
    err = _one_paragraph_error(capsys)
    assert 'Unknown trainer "tst_cli_trainr"' in err and f'Did you mean "{TRAINER}"?' in err


def test_missing_model_selection(tmp_path, capsys):
    assert cli.run([f"training.trainer={TRAINER}", "dataset=tst_cli_data"]) == 1
    assert "No model selected" in _one_paragraph_error(capsys)


def test_missing_config_file(tmp_path, capsys):
    assert cli.run(["config=nothing.yaml"]) == 1
    assert f'"nothing.yaml" not found (looked at: {tmp_path / "nothing.yaml"}' in _one_paragraph_error(capsys)


def test_invalid_run_type(tmp_path, capsys):
    assert cli.run(base_args(tmp_path, "run_type=tarin")) == 1
    assert 'Invalid run_type "tarin"' in _one_paragraph_error(capsys)


def test_user_error_from_trainer_exit_1(tmp_path, capsys):
    RecordingTrainer.raise_in_run = DataError("annotation file /x/y.json is missing")
    assert cli.run(base_args(tmp_path)) == 1
    assert "annotation file /x/y.json is missing" in _one_paragraph_error(capsys)


def test_unexpected_error_prints_traceback_exit_2(tmp_path, capsys):
    RecordingTrainer.raise_in_run = RuntimeError("bug in the loop")
    assert cli.run(base_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: bug in the loop" in err


def test_bad_device_is_a_user_error(tmp_path, capsys):
    assert cli.run(base_args(tmp_path, "training.device=tpu")) == 1
    assert 'training.device="tpu"' in _one_paragraph_error(capsys)


def test_distributed_hooks_wrap_the_trainer(tmp_path, monkeypatch):
    events = []

    @contextlib.contextmanager
    def fail_fast():
        events.append("fail_fast enter")
        try:
            yield
        except Exception as err:
            events.append(f"fail_fast saw {type(err).__name__}")
            raise

    fake = types.ModuleType(LAUNCH_MODULE)
    fake.setup = lambda config: events.append(f"setup {config.training.trainer}")
    fake.fail_fast = fail_fast
    fake.teardown = lambda: events.append("teardown")
    monkeypatch.setitem(sys.modules, LAUNCH_MODULE, fake)
    assert cli.run(base_args(tmp_path)) == 0
    assert events == [f"setup {TRAINER}", "fail_fast enter", "teardown"]
    assert RecordingTrainer.instances[0].ran

    events.clear()
    RecordingTrainer.raise_in_run = RuntimeError("rank failure")
    assert cli.run(base_args(tmp_path, "env.overwrite=true")) == 2
    assert events == [f"setup {TRAINER}", "fail_fast enter", "fail_fast saw RuntimeError"]


def test_only_setup_is_required_of_the_launch_module(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType(LAUNCH_MODULE)
    fake.setup = lambda config: calls.append(config.training.trainer)
    monkeypatch.setitem(sys.modules, LAUNCH_MODULE, fake)
    assert cli.run(base_args(tmp_path)) == 0
    assert calls == [TRAINER]


def test_help(capsys):
    assert cli.run(["--help"]) == 0
    assert "usage: mmf_run config=<yaml>" in capsys.readouterr().out


def test_logging_handlers_are_removed_after_run(tmp_path):
    before = list(logging.getLogger().handlers)
    cli.run(base_args(tmp_path))
    cli.run(base_args(tmp_path, "training.max_udpates=1"))
    assert logging.getLogger().handlers == before


# -- user errors caught before anything runs (docs/faults.md) ------------------------------------
@pytest.mark.parametrize("override, named", [
    ("optimizer.params.lr=-1", "optimizer.params.lr=-1 must be a finite number >= 0"),
    ("optimizer.params.betas=[0.9]", "optimizer.params.betas=[0.9] must be two numbers in [0, 1)"),
    ("training.num_workers=-1", "training.num_workers=-1 must be >= 0"),
    ("training.max_updates=0", "training.max_updates=0 must be a positive number of updates"),
    ("training.max_updates=-5", "training.max_updates=-5 must be a positive number of updates"),
])
def test_out_of_range_values_fail_before_the_trainer_exists(tmp_path, capsys, override, named):
    assert cli.run(base_args(tmp_path, override)) == 1
    assert named in _one_paragraph_error(capsys)
    assert RecordingTrainer.instances == []  # nothing built, no data read
    assert not (tmp_path / "run").exists()


def test_a_directory_as_config_is_named_as_such(tmp_path, capsys):
    (tmp_path / "configs_dir").mkdir()
    assert cli.run(base_args(tmp_path, "config=configs_dir")) == 1
    err = _one_paragraph_error(capsys)
    assert 'Config file "configs_dir" is a directory' in err and "not found" not in err


def test_predict_without_weights_needs_allow_random_weights(tmp_path, capsys):
    assert cli.run(base_args(tmp_path, "run_type=predict")) == 1
    err = _one_paragraph_error(capsys)
    assert "run_type=predict does not train, and no weights are configured" in err
    assert "checkpoint.resume_file" in err and "checkpoint.allow_random_weights=true" in err
    assert RecordingTrainer.instances == []
    assert cli.run(base_args(tmp_path, "run_type=predict", "checkpoint.allow_random_weights=true")) == 0
    assert cli.run(base_args(tmp_path, "run_type=val", "checkpoint.resume_file=x.ckpt")) == 0


class _BrokenRecords(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        raise DataError(f'Corrupt record "img_{index}" in img_db /data/img_db/x: truncated. Copy the db again.')


def test_data_error_in_a_dataloader_worker_is_one_short_paragraph(tmp_path, capsys):
    loader = torch.utils.data.DataLoader(_BrokenRecords(), batch_size=2, num_workers=1)
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    assert "Traceback" in str(caught.value)  # what torch re-raises: the worker's whole traceback
    RecordingTrainer.raise_in_run = caught.value
    assert cli.run(base_args(tmp_path)) == 1
    err = _one_paragraph_error(capsys)
    assert err.strip() == (
        'mmf_run: error: Corrupt record "img_0" in img_db /data/img_db/x: truncated. Copy the db again. '
        "(raised in DataLoader worker process 0)"
    )
