"""TrainingLogger: console lines, progress bar switch, rank-0 only."""
from __future__ import annotations

import json

import pytest

from villa_plugin.common.errors import ConfigError
from villa_plugin.common.logger import TrainingLogger, format_duration, progress_bar_enabled


def test_progress_bar_setting():
    assert progress_bar_enabled(True, True) and progress_bar_enabled("true", True)
    assert not progress_bar_enabled(True, False)  # rank 0 only
    assert not progress_bar_enabled("false", True) and not progress_bar_enabled(False, True)
    assert not progress_bar_enabled("auto", True)  # pytest's stderr is not a terminal
    with pytest.raises(ConfigError, match="progress_bar"):
        progress_bar_enabled("sometimes", True)


def test_simple_and_json_lines_with_eta(caplog):
    with caplog.at_level("INFO", logger="villa_plugin"):
        TrainingLogger(True, "simple").log_train(10, 110, 0, {"train/total_loss": 0.5}, 1e-4, 2.0, 64.0)
        TrainingLogger(True, "json").log_eval(10, {"val/x/accuracy": 0.25})
        TrainingLogger(False, "simple").log_train(10, 110, 0, {"train/total_loss": 0.5}, 1e-4, 2.0, 64.0)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("progress: 10/110, epoch: 0, train/total_loss: 0.5000, lr: 1.0000e-04")
    assert "ups: 2.00, ex/s: 64.0, eta: 0h00m50s" in messages[0]
    assert json.loads(messages[1]) == {"update": 10, "val/x/accuracy": 0.25}
    assert format_duration(3725) == "1h02m05s"


def test_bar_counts_updates(capsys):
    logger = TrainingLogger(True, "simple", progress_bar=True, total_updates=5, initial_update=2)
    logger.progress(1, {"train/total_loss": 0.5})
    assert logger.bar.n == 3
    logger.close()
    assert "3/5" in capsys.readouterr().err
