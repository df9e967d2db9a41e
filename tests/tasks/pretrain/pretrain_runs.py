"""Composed pre-training runs on the bundled demo (real config, builder, model and trainer), made small."""
from __future__ import annotations

from typing import Sequence

from villa_plugin.config.compose import build_config

DEMO = "projects/villa/demo_pretrain.yaml"


def pretrain_config(tmp_path, cache_dir, *extra: str, config: str = DEMO):
    """The composed ``demo_pretrain.yaml`` for a short CPU run in ``tmp_path`` (demo cached in ``cache_dir``)."""
    argv: Sequence[str] = [
        f"config={config}", f"env.cache_dir={cache_dir}", f"env.save_dir={tmp_path}/save", "training.device=cpu",
        "training.tensorboard=false", "training.progress_bar=false", "training.evaluation_interval=0",
        "run_type=train", *extra,
    ]
    return build_config(list(argv))
