"""The trainer toys plus a callback that sleeps after each update, so a run lasts long enough to be
signalled at a random moment (``env.user_dir=<this file>``)."""
from __future__ import annotations

import time

import trainer_toys  # noqa: F401  (registers the toy model and dataset)
from villa_plugin.registry import registry
from villa_plugin.trainers.callbacks import Callback


@registry.register_callback("test_sleep", override=True)
class SleepAfterUpdate(Callback):
    """Sleeps ``seconds`` after every update (no effect on weights or RNG)."""

    def on_update_end(self, stats) -> None:
        time.sleep(float(self.params.get("seconds", 0.0)))
