"""Trainer callbacks: hooks run in a fixed order after each update.

Order: ``logging`` (losses, lr, throughput), ``evaluation`` (every ``evaluation_interval``),
``early_stopping`` (tracks the best ``training.early_stop.criteria``), ``checkpoint`` (last among
the built-ins, so a checkpoint records this update's evaluation outcome and the RNG state after
everything the update consumed), then the user's ``training.callbacks: [{type, params}]`` in order.

Hooks: ``on_train_start()``, ``on_update_end(stats)`` (``stats``: detached tensors of the update,
averaged over its micro-batches), ``on_validation_end(split, report)``, ``on_train_end()``.
A callback with state returns it from ``state_dict()`` (plain values); checkpoints keep it.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import torch

from villa_plugin.common.config_access import setting
from villa_plugin.common.errors import ConfigError
from villa_plugin.registry import registry


class Callback:
    """Base class of registered callbacks; ``__init__(trainer, **params)``."""

    def __init__(self, trainer, **params: Any):
        self.trainer = trainer
        self.params = params

    def on_train_start(self) -> None:
        pass

    def on_update_end(self, stats: Dict[str, torch.Tensor]) -> None:
        pass

    def on_validation_end(self, split: str, report: Dict[str, float]) -> None:
        pass

    def on_train_end(self) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


class CallbackList:
    """The trainer's callbacks in call order."""

    def __init__(self, callbacks: List[Callback]):
        self.callbacks = list(callbacks)

    def call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args)

    def find(self, cls: type) -> Optional[Callback]:
        return next((c for c in self.callbacks if isinstance(c, cls)), None)

    def state_dict(self) -> Dict[str, Dict[str, Any]]:
        states = {}
        for i, callback in enumerate(self.callbacks):
            state = callback.state_dict()
            if state:
                states[f"{i}:{type(callback).__name__}"] = state
        return states

    def load_state_dict(self, states: Dict[str, Dict[str, Any]]) -> None:
        for i, callback in enumerate(self.callbacks):
            key = f"{i}:{type(callback).__name__}"
            if key in states:
                callback.load_state_dict(states[key])


@registry.register_callback("logging")
class LoggingCallback(Callback):
    """Averages update stats over ``log_interval`` updates (and across ranks) and logs them with
    the lr, updates/s, examples/s and ETA. Reads device values only when it logs. A value is
    averaged over the updates that reported it (``train/<dataset>/...`` of several train datasets
    over the updates drawn from that dataset)."""

    def on_train_start(self) -> None:
        self.interval = int(setting(self.trainer.config, "training.log_interval"))
        self._reset()

    def _reset(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, int] = {}
        self.updates = 0
        self.examples = 0
        self.started = time.perf_counter()

    def on_update_end(self, stats: Dict[str, torch.Tensor]) -> None:
        trainer = self.trainer
        for key, value in stats.items():
            value = value.detach().float().reshape(-1).mean()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1
        self.updates += 1
        self.examples += trainer.last_update_examples
        trainer.training_logger.progress(1)
        if self.updates and (trainer.num_updates % self.interval == 0 or trainer.num_updates >= trainer.max_updates):
            self.flush()

    def flush(self) -> None:
        trainer = self.trainer
        keys = sorted(self.sums)
        device = trainer.device
        packed = torch.stack([self.sums[k].to(device) for k in keys] + [torch.tensor(float(self.examples), device=device)])
        packed = trainer.strategy.all_reduce_sum(packed).cpu()
        world = trainer.strategy.world_size
        values = {k: float(packed[i]) / (self.counts[k] * world) for i, k in enumerate(keys)}
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        lr = trainer.scheduler.lr_at(trainer.num_updates) if trainer.scheduler is not None else 0.0
        trainer.training_logger.log_train(
            trainer.num_updates, trainer.max_updates, trainer.current_epoch, values, lr,
            self.updates / elapsed, float(packed[-1]) / elapsed,
        )
        trainer.training_logger.progress(0, values)
        self._reset()


@registry.register_callback("evaluation")
class EvaluationCallback(Callback):
    """Evaluates the val split every ``training.evaluation_interval`` updates (when one is built)."""

    def on_update_end(self, stats: Dict[str, torch.Tensor]) -> None:
        trainer = self.trainer
        interval = int(setting(trainer.config, "training.evaluation_interval"))
        if interval > 0 and trainer.num_updates % interval == 0 and trainer.datasets.get("val"):
            report = trainer.evaluate("val")
            trainer.training_logger.log_eval(trainer.num_updates, report)
            trainer.callbacks.call("on_validation_end", "val", report)


@registry.register_callback("early_stopping")
class EarlyStoppingCallback(Callback):
    """Tracks the best ``training.early_stop.criteria`` on val; when ``enabled``, stops training
    once it has not improved for more than ``patience`` updates."""

    def __init__(self, trainer, **params: Any):
        super().__init__(trainer, **params)
        config = trainer.config
        self.enabled = bool(setting(config, "training.early_stop.enabled"))
        self.criteria = str(setting(config, "training.early_stop.criteria") or "")
        self.minimize = bool(setting(config, "training.early_stop.minimize"))
        self.patience = int(setting(config, "training.early_stop.patience"))
        if self.enabled and not self.criteria:
            raise ConfigError("training.early_stop.enabled=True needs training.early_stop.criteria, e.g. val/vqa2/vqa_accuracy")
        self.best_value: Optional[float] = None
        self.best_update: Optional[int] = None

    def _key(self, report: Dict[str, float]) -> str:
        for key in (self.criteria, f"val/{self.criteria}"):
            if key in report:
                return key
        raise ConfigError(
            f'training.early_stop.criteria "{self.criteria}" is not among the evaluation values: {sorted(report)}'
        )

    def on_validation_end(self, split: str, report: Dict[str, float]) -> None:
        if split != "val" or not self.criteria:
            return
        value = report[self._key(report)]
        update = self.trainer.num_updates
        better = self.best_value is None or (value < self.best_value if self.minimize else value > self.best_value)
        if better:
            self.best_value, self.best_update = float(value), update
        elif self.enabled and update - self.best_update > self.patience:
            self.trainer.request_stop(
                f"early stopping: {self.criteria} has not improved on {self.best_value:.6g} (update "
                f"{self.best_update}) for {update - self.best_update} updates (patience {self.patience})"
            )

    def improved_at(self, update: int) -> bool:
        return self.best_update == update

    def state_dict(self) -> Dict[str, Any]:
        return {"best_value": self.best_value, "best_update": self.best_update}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best_value, self.best_update = state.get("best_value"), state.get("best_update")


@registry.register_callback("checkpoint")
class CheckpointCallback(Callback):
    """Saves every ``training.checkpoint_interval`` updates (``current.ckpt`` + ``models/``), writes
    ``best.ckpt`` when early stopping saw a new best, and saves once more at the end of training."""

    def on_train_start(self) -> None:
        self.interval = int(setting(self.trainer.config, "training.checkpoint_interval"))
        self.last_saved: Optional[int] = None

    def on_update_end(self, stats: Dict[str, torch.Tensor]) -> None:
        trainer = self.trainer
        periodic = self.interval > 0 and trainer.num_updates % self.interval == 0
        early = trainer.callbacks.find(EarlyStoppingCallback)
        best = early is not None and early.improved_at(trainer.num_updates)
        if periodic or best:
            trainer.save_checkpoint(keep=periodic, best=best)
            self.last_saved = trainer.num_updates

    def on_train_end(self) -> None:
        if self.last_saved != self.trainer.num_updates and self.trainer.num_updates > 0:
            self.trainer.save_checkpoint(keep=True, best=False)
            self.last_saved = self.trainer.num_updates


BUILTIN_CALLBACKS = ("logging", "evaluation", "early_stopping", "checkpoint")


def build_callbacks(trainer, user_specs: Any) -> CallbackList:
    """The built-ins in their order, then ``training.callbacks`` entries (``{type, params}``)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(user_specs):
        user_specs = OmegaConf.to_container(user_specs, resolve=True)
    callbacks = [registry.get_callback_class(name)(trainer) for name in BUILTIN_CALLBACKS]
    for spec in user_specs or []:
        if isinstance(spec, str):
            spec = {"type": spec}
        if not isinstance(spec, dict) or not spec.get("type"):
            raise ConfigError(f"training.callbacks entries must be {{type, params}}, got {spec!r}")
        callbacks.append(registry.get_callback_class(spec["type"])(trainer, **(spec.get("params") or {})))
    return CallbackList(callbacks)
