"""Range checks of declared values (config/value_checks.py) on the real defaults.yaml."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from villa_plugin.common.errors import ConfigError
from villa_plugin.config.value_checks import check_values

DEFAULTS = Path(__file__).resolve().parents[2] / "configs" / "defaults.yaml"


def _config(**overrides):
    config = OmegaConf.load(DEFAULTS)
    config.model, config.run_type = "m", "train"
    for key, value in overrides.items():
        OmegaConf.update(config, key.replace("__", "."), value, merge=False)
    return config


def test_defaults_and_edge_values_pass():
    check_values(_config())
    check_values(_config(optimizer__params__lr=0.0, training__max_updates=None, training__max_epochs=2))


def test_every_problem_is_listed_in_one_error():
    with pytest.raises(ConfigError) as caught:
        check_values(_config(optimizer__params__lr=float("nan"), optimizer__params__betas=[0.9, 1.0],
                             training__log_interval=0, training__max_epochs=0))
    text = str(caught.value)
    assert text.startswith("4 problems in the config:")
    for key in ("optimizer.params.lr=nan", "optimizer.params.betas=[0.9, 1.0]", "training.log_interval=0", "training.max_epochs=0"):
        assert key in text


@pytest.mark.parametrize("weights", [
    {"checkpoint__resume_file": "best.ckpt"}, {"checkpoint__resume": True}, {"checkpoint__resume_best": True},
    {"model_config": {"m": {"pretrained_checkpoint": "villa-base.pt"}}}, {"checkpoint__allow_random_weights": True},
])
def test_runs_without_training_need_weights(weights):
    with pytest.raises(ConfigError, match="run_type=test does not train"):
        check_values(_config(run_type="test"))
    check_values(_config(run_type="test", **weights))
