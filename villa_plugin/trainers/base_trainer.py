"""The ``mmf`` trainer: MMF's training loop with UNITER's update semantics.

One update: ``strategy.zero_grad`` -> for each of ``update_frequency`` micro-batches
``run_training_batch(batch, is_last_micro_batch)`` (forward + backward; gradients are summed over
micro-batches, not averaged, as the reference) -> skip if any value was non-finite -> unscale ->
clip (``strategy.clip_grad_norm``) -> optimizer step -> schedule step -> callbacks (logging,
evaluation, early stopping, checkpoint, user callbacks).

Subclasses (e.g. ``villa_free_at``) override :meth:`run_training_batch`; it receives the batch
already on the device and returns detached values to log (any keys). The build steps are public
seams a subclass may override (detectron2 style): :meth:`build_datasets`, :meth:`build_model`,
:meth:`build_optimizer`; :meth:`backward` is the one place a loss is back-propagated.

Several train datasets (``datasets: a,b``): each update draws all its micro-batches from one of
them, chosen by a seeded, resumable source sampler (``multitasking.type``); see train_streams.py.
Every setting is read from the composed config (defaults live only in configs/defaults.yaml).
"""
from __future__ import annotations

import math
import os
import secrets
from typing import Any, Dict, List, Optional

import torch
from omegaconf import OmegaConf

from villa_plugin.checkpoint import (
    CheckpointFiles,
    check_model_weights,
    load_checkpoint,
    map_prefixes,
    model_weights,
    rng_state,
    set_rng_state,
)
from villa_plugin.common.config_access import setting
from villa_plugin.common.device import select_device
from villa_plugin.common.errors import CheckpointError, ConfigError, TrainingError
from villa_plugin.common.input_spec import InputSpec, check_model_fits_data
from villa_plugin.common.logger import TrainingLogger, ensure_console_logging, get_logger
from villa_plugin.common.sample_list import SampleList
from villa_plugin.datasets.loader import build_loader
from villa_plugin.datasets.task_mixture import TaskMixture, expand_train_datasets
from villa_plugin.distributed import build_strategy
from villa_plugin.metrics import parse_metric_specs
from villa_plugin.optim import build_optimizer as optimizer_from_config, build_scheduler
from villa_plugin.registry import registry
from villa_plugin.trainers.callbacks import EarlyStoppingCallback, build_callbacks
from villa_plugin.trainers.compile import compile_model, log_compile_stats
from villa_plugin.trainers.phase_timer import PhaseTimer, maybe_phase
from villa_plugin.trainers.preemption import StopSignals, stop_for_signal
from villa_plugin.trainers.runtime import RunPlan, autocast, cfg, check_precision
from villa_plugin.trainers.train_streams import DatasetStream, build_source_sampler

CHECKPOINT_FORMAT = 1


@registry.register_trainer("mmf")
class MMFTrainer:
    """``MMFTrainer(config).run()``; ``config`` is the composed OmegaConf config."""

    #: whether run_training_batch runs VILLA's adversarial loop (model_config.<m>.adversarial)
    runs_adversarial_loop = False

    def __init__(self, config: Any):
        self.config = config
        self.log = get_logger()
        self.num_updates = 0
        self.current_epoch = 0
        self.batch_in_epoch = 0  # batches of the current epoch already consumed
        self.nonfinite_skips = 0
        self.last_update_examples = 0
        self.stop_reason: Optional[str] = None
        self.scheduler = None
        self.scaler = None
        self.train_streams: Dict[str, DatasetStream] = {}
        self.grad_scalers: Dict[str, Any] = {}
        self.source_sampler = None
        #: set to a PhaseTimer to split each update's wall time into phases (benchmarks); None: off
        self.phase_timer: Optional[PhaseTimer] = None
        self.copy_non_blocking = False

    # ------------------------------------------------------------------------------------
    # entry point
    # ------------------------------------------------------------------------------------
    def run(self) -> Dict[str, float]:
        """Do what ``run_type`` asks; returns the final evaluation values (if any)."""
        plan = RunPlan.parse(self.config.run_type, setting(self.config, "evaluation.predict"))
        self.setup(plan)
        if getattr(self, "after_setup", None) is not None:  # mmf_run: now write config.yaml, train.log
            self.after_setup()
        final: Dict[str, float] = {}
        evaluated_update, checkpoint = self.num_updates, None  # the weights the final passes score
        try:
            if plan.train:
                self.train()
                best_update = self._restore_best_for_final_passes(plan)
                evaluated_update = self.num_updates if best_update is None else best_update
                checkpoint = None if best_update is None else "best.ckpt"
            for split, wanted in (("val", plan.val), ("test", plan.test)):
                if wanted:
                    report = self.evaluate(split)
                    self.training_logger.log_eval(evaluated_update, report, checkpoint=checkpoint)
                    final.update(report)
            if plan.predict:
                self.predict("test")
        finally:
            self.training_logger.close()
        return final

    # ------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------
    def setup(self, plan: RunPlan) -> None:
        """Device, strategy, datasets, model + optimizer, scheduler, metrics, callbacks, then the
        checkpoint the config asks to resume from (RNG state restored last)."""
        config = self.config
        self.plan = plan
        self.check_adversarial_settings()
        _apply_num_threads(setting(config, "training.num_threads"))
        self.device = select_device(setting(config, "training.device"))
        self.strategy = build_strategy(config, self.device)
        self.is_main = self.strategy.is_main
        self.save_dir = os.path.abspath(os.path.expanduser(str(setting(config, "env.save_dir"))))
        ensure_console_logging(self.is_main)
        self.precision = check_precision(str(setting(config, "training.precision")), self.device)
        seed = int(setting(config, "training.seed"))
        self.data_seed = seed if seed >= 0 else secrets.randbelow(2**31)
        self.datasets = self.build_datasets(plan)
        self.baselines = dataset_baselines(self.datasets)
        if self.is_main:
            for key, value in (kv for values in self.baselines.values() for kv in values.items()):
                self.log.info("%s: %.4f (chance level, reported beside the metrics)", key, value)
        self.raw_model = self.build_model()
        self.check_model_fits_data()
        self.model, self.optimizer = self.strategy.wrap(self.raw_model, self.build_optimizer)
        self.scaler = self.strategy.grad_scaler(self.precision)
        # pinned host batches can be copied asynchronously; the compute stream orders their use
        self.copy_non_blocking = self.device.type == "cuda" and bool(setting(config, "training.pin_memory"))
        self.metric_specs = parse_metric_specs(setting(config, "evaluation.metrics") or [])
        self.update_frequency = int(setting(config, "training.update_frequency"))
        if self.update_frequency < 1:
            raise ConfigError(f"training.update_frequency must be >= 1 (micro-batches per update), got {self.update_frequency}")
        if plan.train:
            self._build_train_streams()
            self.max_epochs = setting(config, "training.max_epochs")
            self.max_updates = self._total_updates()
            self.scheduler = build_scheduler(self.optimizer, config, num_training_steps=self.max_updates)
        else:
            self.max_updates, self.max_epochs = self.num_updates, None
        self.checkpoint_files = CheckpointFiles(self.save_dir, int(setting(config, "checkpoint.max_to_keep")))
        self.callbacks = build_callbacks(self, setting(config, "training.callbacks") or [])
        self._restore_from_config()
        self.training_logger = TrainingLogger(
            self.is_main,
            str(setting(config, "training.log_format")),
            self._tensorboard_dir(),
            setting(config, "training.progress_bar"),
            self.max_updates if plan.train else None,
            self.num_updates,
        )

    def check_adversarial_settings(self) -> None:
        """``adv_training: true`` needs a trainer that runs the adversarial loop: a plain trainer
        would train without adversaries, silently."""
        model = setting(self.config, "model")
        if self.runs_adversarial_loop or not model:
            return
        key = f"model_config.{model}.adversarial.adv_training"
        if cfg(self.config, key, False) is True:
            trainer = setting(self.config, "training.trainer")
            raise ConfigError(
                f"{key}=true, but training.trainer={trainer} ({type(self).__name__}) does not run the "
                f"adversarial loop, so the model would train without adversaries. Set "
                f"training.trainer=villa_free_at for VILLA, or {key}=false for plain fine-tuning."
            )

    def build_datasets(self, plan: RunPlan) -> Dict[str, Dict[str, Any]]:
        """``{split: {dataset_name: dataset}}`` for the splits this run needs; each dataset comes
        from its registered builder (``prepare()`` on rank 0 first, then ``build_dataset(split)``)."""
        names = setting(self.config, "datasets") or []
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n) for n in names]
        if not names:
            raise ConfigError("No dataset to run on: set datasets (or dataset=<name> on the command line)")
        splits = [s for s, wanted in (
            ("train", plan.train),
            ("val", plan.val or (plan.train and bool(setting(self.config, "training.early_stop.enabled")))),
            ("test", plan.test or plan.predict),
        ) if wanted]
        if len(set(names)) != len(names):
            raise ConfigError(f"datasets names a dataset twice: {names}")
        builders = {}
        for name in names:
            dataset_config = cfg(self.config, f"dataset_config.{name}", None)
            builder = registry.get_builder_class(name)(name, dataset_config if dataset_config is not None else OmegaConf.create({}))
            if self.is_main:  # rank 0 first: it may materialise files the others read
                builder.prepare()
            self.strategy.barrier()
            if not self.is_main:
                builder.prepare()
            builders[name] = builder
        return {split: {name: builders[name].build_dataset(split) for name in names} for split in splits}

    def build_model(self):
        """The registered model of ``model`` with ``model_config.<model>``: built, losses set up,
        on the device (not yet wrapped by the distributed strategy)."""
        config = self.config
        name = setting(config, "model")
        if not name:
            raise ConfigError("No model to build: set model (or model=<name> on the command line)")
        model_config = cfg(config, f"model_config.{name}", None)
        if model_config is None:
            raise ConfigError(f"model_config.{name} is missing; the model's config_path() YAML should declare it")
        raw = registry.get_model_class(name)(model_config)
        raw.build()
        raw.init_losses()
        raw.to(self.device)
        compile_model(raw, config)
        return raw

    def check_model_fits_data(self) -> None:
        """Every dataset's vocabulary, target width and feature width against the model's
        (``input_spec()`` of both): a ConfigError naming both settings, before the first forward."""
        model_spec = self.raw_model.input_spec() if hasattr(self.raw_model, "input_spec") else InputSpec()
        for split, datasets in self.datasets.items():
            for name, dataset in datasets.items():
                check_model_fits_data(model_spec, getattr(dataset, "input_spec", InputSpec()), f"{name} ({split})")

    def build_optimizer(self, param_groups):
        """The optimizer of the ``optimizer`` block over ``param_groups`` (the strategy calls this
        from ``wrap``; it may return an ``OptimizerSpec`` for sharding optimizers)."""
        return optimizer_from_config(param_groups, setting(self.config, "optimizer"))

    def _build_train_streams(self) -> None:
        """One loader per train dataset (seeded ``data_seed + index``) and the source sampler."""
        self.train_streams = {}
        streams = expand_train_datasets(self.datasets["train"])  # a task mixture: one stream per task
        for index, (name, (dataset, weight, _, _)) in enumerate(streams.items()):
            loader = build_loader(dataset, self.config, "train", self.strategy.rank, self.strategy.world_size, self.data_seed + index)
            self.train_streams[name] = DatasetStream(name, dataset, loader, weight)
        self.source_sampler = build_source_sampler(self.config, self.train_streams, self.data_seed)
        self._build_grad_scalers()
        if len(self.train_streams) > 1:
            shares = ", ".join(f"{n} {p:.3f}" for n, p in self.source_sampler.probabilities.items())
            self.log.info(f"{len(self.train_streams)} train datasets, one per update ({setting(self.config, 'multitasking.type')}): {shares}")

    def _build_grad_scalers(self) -> None:
        """fp16 with several train streams: one GradScaler per stream, used by the updates drawn from
        it (UNITER pre-training's apex ``num_losses`` / ``loss_id``: one loss scale per (task, dataset));
        ``self.scaler`` is the current update's."""
        self.grad_scalers = {}
        if self.scaler is not None and len(self.train_streams) > 1:
            self.grad_scalers = {name: self.strategy.grad_scaler(self.precision) for name in self.train_streams}

    @property
    def train_dataset(self):
        """The (first) train dataset."""
        return next(iter(self.train_streams.values())).dataset

    @property
    def train_loader(self):
        """The (first) train dataset's loader."""
        return next(iter(self.train_streams.values())).loader

    def _total_updates(self) -> int:
        max_updates = setting(self.config, "training.max_updates")
        max_epochs = self.max_epochs
        for stream in self.train_streams.values():
            if stream.batches_per_epoch == 0:
                raise ConfigError(
                    f"The train split of {stream.name} gives no batch on rank {self.strategy.rank} "
                    f"({len(stream.dataset)} examples in all): lower training.batch_size / "
                    f"training.batch_size_tokens or use more data"
                )
        if max_updates is None and max_epochs is None:
            raise ConfigError("Set training.max_updates or training.max_epochs")
        if max_epochs is not None and len(self.train_streams) > 1:
            raise ConfigError(
                f"training.max_epochs={max_epochs} is ambiguous with several train datasets "
                f"({', '.join(self.train_streams)}): set training.max_epochs=null and use training.max_updates"
            )
        per_epoch = self.train_loader.batch_sampler.num_batches
        from_epochs = math.ceil(max_epochs * per_epoch / self.update_frequency) if max_epochs is not None else None
        return int(min(x for x in (max_updates, from_epochs) if x is not None))

    def _tensorboard_dir(self) -> Optional[str]:
        if not setting(self.config, "training.tensorboard"):
            return None
        return setting(self.config, "env.tensorboard_logdir") or os.path.join(self.save_dir, "tensorboard")

    # ------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------
    def train(self) -> None:
        """Run updates until ``max_updates``, ``max_epochs`` or a stop request."""
        self.model.train()
        self.callbacks.call("on_train_start")
        self.log.info(f"training from update {self.num_updates} to {self.max_updates} (epoch {self.current_epoch})")
        with StopSignals() as signals:  # SIGTERM/SIGINT/SIGUSR1: checkpoint, then Preempted
            while self.stop_reason is None:
                if self.num_updates >= self.max_updates:
                    self.stop_reason = f"reached max_updates={self.max_updates}"
                elif not self.run_update():
                    self.stop_reason = f"reached max_epochs={self.max_epochs}"
                elif (signal_name := signals.agreed(self.strategy, self.device)) is not None:
                    stop_for_signal(self, signal_name)
        self.log.info(f"training stopped at update {self.num_updates}: {self.stop_reason}")
        log_compile_stats(self.config)
        self.callbacks.call("on_train_end")

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop after the current update (early stopping, user callbacks)."""
        self.stop_reason = reason

    def run_update(self) -> bool:
        """One optimizer update over ``update_frequency`` micro-batches; False when out of data."""
        timer = self.phase_timer
        if timer is not None:
            timer.begin_update()
        with maybe_phase(timer, "data"):
            batches = [b.to(self.device, non_blocking=self.copy_non_blocking) for b in self._next_micro_batches()]
        if not batches:
            if timer is not None:
                timer.end_update(recorded=False)
            return False
        with maybe_phase(timer, "optimizer"):
            self.strategy.zero_grad(self.model, self.optimizer)
        with maybe_phase(timer, "forward_backward"):
            results = [
                self.run_training_batch(batch, is_last_micro_batch=i == len(batches) - 1)
                for i, batch in enumerate(batches)
            ]
            self.last_update_examples = sum(b.get_batch_size() for b in batches)
            stats = _mean_over_micro_batches(results)
        if len(self.train_streams) > 1:  # per-dataset logging; every rank drew the same dataset
            stats[f"train/{self.last_update_source}/total_loss"] = stats["train/total_loss"]
        with maybe_phase(timer, "optimizer"):
            stepped, grad_norm = self._optimizer_step(stats)
        if not stepped:
            self._skip_nonfinite_update(stats)
            if timer is not None:
                timer.end_update(recorded=False)
            return True
        self.num_updates += 1
        if grad_norm is not None:
            stats["train/grad_norm"] = grad_norm.detach().float()
        with maybe_phase(timer, "logging"):
            self.callbacks.call("on_update_end", stats)
        if timer is not None:
            timer.end_update(examples=self.last_update_examples)
        return True

    def _optimizer_step(self, stats: Dict[str, torch.Tensor]):
        """Unscale, clip, check finiteness, step and schedule; ``(stepped, grad_norm)``."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if setting(self.config, "training.clip_gradients"):
            grad_norm = self.strategy.clip_grad_norm(self.model, self.optimizer, float(setting(self.config, "training.max_grad_l2_norm")))
        # with a scaler, inf/nan gradients are its business (it skips the step and lowers the scale)
        if not self._all_finite(stats, grad_norm if self.scaler is None else None):
            return False, grad_norm
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return True, grad_norm

    def run_training_batch(self, batch: SampleList, is_last_micro_batch: bool) -> Dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch (the override point of free-AT trainers).

        Runs under ``strategy.sync_context`` (gradients sync only on the last micro-batch) and
        autocast; the loss is the sum of ``output["losses"]``. Returns detached values to log.
        """
        with self.strategy.sync_context(self.model, is_last_micro_batch):
            with self.autocast():
                output = self.model(batch)
            losses = output.get("losses") if isinstance(output, dict) else None
            if not losses:
                raise TrainingError(
                    "The model returned no losses: configure model_config.<model>.losses (e.g. [logit_bce]) "
                    "and make sure the training batches carry targets"
                )
            total = sum(value.float().mean() for value in losses.values())
            self.backward(total)
        stats = {key: value.detach().float().mean() for key, value in losses.items()}
        stats["train/total_loss"] = total.detach()
        return stats

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """``loss.backward(retain_graph=...)``, through the grad scaler when there is one."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward(retain_graph=retain_graph)

    def autocast(self):
        """The autocast context of ``training.precision`` (none for fp32)."""
        return autocast(self.precision, self.device)

    def _next_micro_batches(self) -> List[SampleList]:
        """The micro-batches of the next update, all from the train dataset the source sampler
        picks; fewer than ``update_frequency`` (or none) once ``max_epochs`` are done."""
        self.last_update_source = self.source_sampler.next()
        stream = self.train_streams[self.last_update_source]
        if self.grad_scalers:
            self.scaler = self.grad_scalers[self.last_update_source]
        batches = []
        while len(batches) < self.update_frequency:
            batch = stream.next_batch(self.max_epochs)
            if batch is None:
                break
            batches.append(batch)
        self._sync_position()
        return batches

    def _sync_position(self) -> None:
        """``current_epoch``: the fewest epochs any train dataset has finished; ``batch_in_epoch``:
        the first train dataset's position (the whole position with one dataset)."""
        streams = list(self.train_streams.values())
        self.current_epoch = min(s.epoch for s in streams)
        self.batch_in_epoch = streams[0].batch_in_epoch

    def _all_finite(self, stats: Dict[str, torch.Tensor], grad_norm: Optional[torch.Tensor]) -> bool:
        values = [v.detach().float().sum().reshape(1).to(self.device) for v in stats.values()]
        if grad_norm is not None:
            values.append(grad_norm.detach().float().reshape(1).to(self.device))
        bad = (~torch.isfinite(torch.cat(values))).any().float().reshape(1)
        return self.strategy.all_reduce_sum(bad).item() == 0  # every rank skips together

    def _skip_nonfinite_update(self, stats: Dict[str, torch.Tensor]) -> None:
        if self.scaler is not None:
            self.scaler.update()  # unscale_ was called: close this scaler iteration
        self.nonfinite_skips += 1
        limit = int(setting(self.config, "training.max_nonfinite_skips"))
        shown = ", ".join(f"{k}={v.float().mean().item():.4g}" for k, v in stats.items())
        self.log.warning(
            f"non-finite loss or gradient before update {self.num_updates + 1} ({shown}); update skipped "
            f"({self.nonfinite_skips} skipped, limit training.max_nonfinite_skips={limit})"
        )
        if self.nonfinite_skips > limit:
            raise TrainingError(
                f"{self.nonfinite_skips} updates had non-finite losses or gradients (more than "
                f"training.max_nonfinite_skips={limit}); last values: {shown}. Lower optimizer.params.lr, use "
                f"training.precision=bf16 or fp32, or check the data for NaN/inf."
            )

    # ------------------------------------------------------------------------------------
    # evaluation and prediction
    # ------------------------------------------------------------------------------------
    def evaluate(self, split: str) -> Dict[str, float]:
        """Metrics and mean losses of every dataset of ``split``: ``<split>/<dataset>/<name>``."""
        was_training = self.model.training
        self.model.eval()
        report: Dict[str, float] = {}
        try:
            for name, dataset in self.datasets.get(split, {}).items():
                report.update(self._evaluate_dataset(split, name, dataset))
        finally:
            self.model.train(was_training)
        losses = [v for k, v in report.items() if k.rsplit("/", 1)[-1] in self._loss_names()]
        if losses:
            report[f"{split}/total_loss"] = float(sum(losses))
        report.update(self.baselines.get(split, {}))  # chance levels beside the metrics
        return report

    def _loss_names(self) -> set:
        losses = getattr(self.raw_model, "losses", None)
        return set(getattr(losses, "names", []) or [])

    def _evaluate_dataset(self, split: str, name: str, dataset, task: Optional[str] = None) -> Dict[str, float]:
        if isinstance(dataset, TaskMixture):  # every task view, with the metrics of its task
            report: Dict[str, float] = {}
            for view_task, view in dataset.views.items():
                report.update(self._evaluate_dataset(split, name, view, view_task))
            return report
        loader = build_loader(dataset, self.config, split, self.strategy.rank, self.strategy.world_size, self.data_seed)
        metrics = {spec.key: spec.build() for spec in self.metric_specs if spec.applies_to(name)}
        if task is not None:  # a task view: metrics declaring that task (class attribute ``task``)
            metrics = {key: m for key, m in metrics.items() if getattr(m, "task", None) == task}
        loss_sums: Dict[str, torch.Tensor] = {}
        count = 0
        last = None
        with torch.no_grad():
            for batch in loader:
                batch = batch.to(self.device)
                with self.autocast():
                    output = self.model(batch)
                size = batch.get_batch_size()
                for metric in metrics.values():
                    metric.update(batch, output)
                for key, value in (output.get("losses") or {}).items():
                    weighted = value.detach().float().mean() * size
                    loss_sums[key] = loss_sums[key] + weighted if key in loss_sums else weighted
                count += size
                last = batch
            # sharded wrappers gather parameters in forward: every rank runs as many forwards
            for _ in range(max(loader.batch_sampler.batch_counts()) - loader.batch_sampler.num_batches):
                if last is not None:
                    with self.autocast():
                        self.model(last)
        keys = sorted(loss_sums)
        packed = torch.stack([loss_sums[k].to(self.device) for k in keys] + [torch.tensor(float(count), device=self.device)])
        packed = self.strategy.all_reduce_sum(packed).cpu()
        total = float(packed[-1])
        report = {k: float(packed[i]) / max(total, 1.0) for i, k in enumerate(keys)}
        for key, metric in metrics.items():
            metric.reduce(self.strategy.all_reduce_sum, self.device)
            report[f"{split}/{name}/{key}"] = metric.compute()
        return report

    def predict(self, split: str = "test") -> List[str]:
        """Write every dataset's predictions for ``split`` (rank 0 writes); returns the files."""
        was_training = self.model.training
        self.model.eval()
        written = []
        try:
            for name, dataset in self.datasets.get(split, {}).items():
                if isinstance(dataset, TaskMixture):
                    raise ConfigError(f"{name} is trained as several tasks (pre-training) and writes no predictions: "
                                      f"use run_type=val for its metrics")
                records = []
                loader = build_loader(dataset, self.config, split, self.strategy.rank, self.strategy.world_size, self.data_seed)
                with torch.no_grad():
                    for batch in loader:
                        batch = batch.to(self.device)
                        with self.autocast():
                            output = self.model(batch)
                        records.extend(dataset.format_predictions(batch, output))
                records = self._gather_records(records)
                if self.is_main:
                    path = dataset.write_predictions(records, self._predict_path(name, split))
                    self.log.info(f"wrote {len(records)} predictions of {name}/{split} to {path}")
                    written.append(path)
        finally:
            self.model.train(was_training)
        return written

    def _gather_records(self, records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        if self.strategy.world_size == 1:
            return records
        gathered: List[Any] = [None] * self.strategy.world_size
        torch.distributed.all_gather_object(gathered, records)
        return [record for part in gathered for record in part]

    def _predict_path(self, name: str, split: str) -> str:
        configured = str(setting(self.config, "evaluation.predict_file") or "")
        if configured:
            path = configured.format(dataset=name, split=split)
        else:
            path = os.path.join(self.save_dir, "predictions", f"{name}_{split}.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return path

    # ------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------
    def checkpoint_state(self) -> Dict[str, Any]:
        """Everything a resume needs, as tensors and plain containers (call on every rank)."""
        return {
            "format_version": CHECKPOINT_FORMAT,
            "model": self.strategy.model_state_dict(self.model),
            "optimizer": self.strategy.optimizer_state_dict(self.optimizer),
            "lr_scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "fp16_scaler": self._scaler_state(),
            "rng": rng_state(),
            "sampler": self._sampler_state(),
            "counts": {"num_updates": self.num_updates, "current_epoch": self.current_epoch, "nonfinite_skips": self.nonfinite_skips},
            "callbacks": self.callbacks.state_dict(),
            "config": self._config_yaml(),
        }

    def _scaler_state(self) -> Optional[Dict[str, Any]]:
        if self.grad_scalers:
            return {"per_stream": {name: scaler.state_dict() for name, scaler in self.grad_scalers.items()}}
        return self.scaler.state_dict() if self.scaler is not None else None

    def _load_scaler_state(self, state: Dict[str, Any]) -> None:
        """One scaler's state, or ``{"per_stream": {stream: state}}`` (a state for every stream of this
        run that has one; a single state seeds every per-stream scaler)."""
        per_stream = state.get("per_stream")
        targets = self.grad_scalers or {None: self.scaler}
        for name, scaler in targets.items():
            if per_stream is None:
                scaler.load_state_dict(state)
            elif name in per_stream:
                scaler.load_state_dict(per_stream[name])

    def _sampler_state(self) -> Dict[str, Any]:
        """Data position: every train dataset's (epoch, batch) and the source sampler's draws;
        ``epoch`` / ``batch_in_epoch`` at the top are the whole position with one dataset."""
        return {
            "epoch": self.current_epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.data_seed,
            "datasets": {name: stream.state_dict() for name, stream in self.train_streams.items()},
            "source": self.source_sampler.state_dict() if self.source_sampler is not None else None,
        }

    def save_checkpoint(self, keep: bool = True, best: bool = False) -> None:
        """Write ``current.ckpt`` (+ ``models/model_<update>.ckpt`` when ``keep``, ``best.ckpt``
        when ``best``) on rank 0; the state is collected on every rank."""
        state = self.checkpoint_state()
        if self.is_main:
            self.checkpoint_files.save(state, self.num_updates, keep=keep, best=best)
        self.strategy.barrier()

    def _restore_from_config(self) -> None:
        resume_file = str(setting(self.config, "checkpoint.resume_file") or "")
        if setting(self.config, "checkpoint.resume_pretrained"):
            if not resume_file:
                raise ConfigError("checkpoint.resume_pretrained=True needs checkpoint.resume_file (the weights to load)")
            self.load_pretrained(resume_file, setting(self.config, "checkpoint.pretrained_state_mapping") or {})
            return
        if resume_file:
            path = resume_file
        elif setting(self.config, "checkpoint.resume_best"):
            path = self.checkpoint_files.best
        elif setting(self.config, "checkpoint.resume"):  # current.ckpt, else the newest readable models/model_N.ckpt
            state, path = self.checkpoint_files.load_latest()
            self.load_state(state, path)
            return
        else:
            return
        self.load_state(load_checkpoint(path), path)

    def load_pretrained(self, path: str, mapping: Any) -> None:
        """Load model weights only, renaming ``{prefix_in_file: prefix_in_model}``."""
        mapping = OmegaConf.to_container(mapping) if OmegaConf.is_config(mapping) else dict(mapping)
        weights = map_prefixes(model_weights(load_checkpoint(path)), mapping)
        if not weights:
            raise CheckpointError(f"{path}: no weights match checkpoint.pretrained_state_mapping {mapping}")
        missing, unexpected = self._load_model_weights(weights, strict=False, source=path)
        self.log.info(
            f"loaded pretrained weights from {path}: {len(weights) - len(unexpected)} tensors; "
            f"{len(missing)} model keys not in the file, {len(unexpected)} file keys unused"
        )

    def load_state(self, state: Dict[str, Any], path: str = "checkpoint") -> None:
        """Restore a full checkpoint (``checkpoint.reset.optimizer`` / ``.counts`` skip parts)."""
        self._load_model_weights(state["model"], strict=True, source=path)
        if not setting(self.config, "checkpoint.reset.optimizer") and state.get("optimizer") is not None:
            try:
                self.strategy.load_optimizer_state_dict(self.optimizer, state["optimizer"])
            except (ValueError, KeyError, RuntimeError) as error:
                raise CheckpointError(
                    f"{path}: the optimizer state does not fit this run's optimizer ({error}). Set "
                    f"checkpoint.reset.optimizer=True to start the optimizer fresh."
                ) from None
            if self.scaler is not None and state.get("fp16_scaler"):
                self._load_scaler_state(state["fp16_scaler"])
        if setting(self.config, "checkpoint.reset.counts"):
            self.log.info(f"loaded weights and optimizer from {path}; counters reset")
            return
        counts, sampler = state["counts"], state["sampler"]
        self.num_updates = int(counts["num_updates"])
        self.nonfinite_skips = int(counts.get("nonfinite_skips", 0))
        self.current_epoch, self.batch_in_epoch = int(sampler["epoch"]), int(sampler["batch_in_epoch"])
        self.data_seed = int(sampler.get("seed", self.data_seed))
        if self.plan.train:
            self._restore_train_position(sampler, path)
        if self.scheduler is not None and state.get("lr_scheduler"):
            self.scheduler.load_state_dict(state["lr_scheduler"])
        self.callbacks.load_state_dict(state.get("callbacks") or {})
        if self.strategy.world_size == 1:
            set_rng_state(state["rng"])
        else:  # one saved RNG state: rank 0 takes it, the others reseed apart from it
            if self.is_main:
                set_rng_state(state["rng"])
            else:
                torch.manual_seed(self.data_seed + 7919 * self.strategy.rank + self.num_updates)
        self.log.info(f"resumed from {path} at update {self.num_updates} (epoch {self.current_epoch}, batch {self.batch_in_epoch})")

    def _restore_train_position(self, sampler: Dict[str, Any], path: str) -> None:
        """Put every train dataset and the source sampler where the checkpoint left them."""
        saved = sampler.get("datasets")
        if saved is None:  # written before several train datasets existed: one dataset's position
            saved = {next(iter(self.train_streams)): {"epoch": sampler["epoch"], "batch_in_epoch": sampler["batch_in_epoch"]}}
        if set(saved) != set(self.train_streams):
            raise CheckpointError(
                f"{path} was saved training on {', '.join(sorted(saved))}, this run trains on "
                f"{', '.join(self.train_streams)}: resume with the same datasets, or set "
                f"checkpoint.reset.counts=True to keep only the weights and optimizer"
            )
        for index, (name, stream) in enumerate(self.train_streams.items()):
            stream.load_state_dict(saved[name], self.data_seed + index)
        source = sampler.get("source")
        self.source_sampler.load_state_dict(source or {"seed": self.data_seed, "draws": self.num_updates + self.nonfinite_skips})
        self._sync_position()

    def _restore_best_for_final_passes(self, plan: RunPlan) -> Optional[int]:
        """As MMF: final val/test/predict passes use the best checkpoint when one was tracked.
        Returns the update of the weights loaded (None: the current weights are kept)."""
        early = self.callbacks.find(EarlyStoppingCallback)
        if not (plan.val or plan.test or plan.predict) or early is None or early.best_update is None:
            return None
        if not os.path.isfile(self.checkpoint_files.best):
            return None
        state = load_checkpoint(self.checkpoint_files.best)
        self._load_model_weights(model_weights(state), strict=True, source=self.checkpoint_files.best)
        update = int((state.get("counts") or {}).get("num_updates", early.best_update))
        self.log.info(f"final evaluation uses best.ckpt (update {update}, {early.criteria}={early.best_value:.6g})")
        return update

    def _load_model_weights(self, weights, strict: bool, source: str):
        """Check keys and shapes against the unwrapped model, then load through the strategy.
        Returns (missing, unexpected) key lists."""
        missing, unexpected = check_model_weights(self.raw_model, weights, strict=strict, source=source)
        own = set(self.raw_model.state_dict())
        self.strategy.load_model_state_dict(self.model, {k: v for k, v in weights.items() if k in own}, strict=not missing)
        return missing, unexpected

    def _config_yaml(self) -> str:
        try:
            return OmegaConf.to_yaml(self.config, resolve=True)
        except Exception:  # an unresolvable interpolation must not block saving
            return OmegaConf.to_yaml(self.config, resolve=False)


def dataset_baselines(datasets: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """``{split: {"<split>/<dataset>/<name>": value}}``: each evaluated dataset's chance levels
    (:meth:`BaseDataset.baselines`, from its training split when the run has one)."""
    found: Dict[str, Dict[str, float]] = {}
    for split in ("val", "test"):
        for name, dataset in datasets.get(split, {}).items():
            baselines = getattr(dataset, "baselines", None)
            values = baselines(datasets.get("train", {}).get(name)) if baselines is not None else {}
            found[split] = {**found.get(split, {}), **{f"{split}/{name}/{k}": float(v) for k, v in values.items()}}
    return found


def _apply_num_threads(value: Any) -> None:
    """``training.num_threads``: torch's intra-op CPU threads (None keeps torch's default)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"training.num_threads must be a positive integer or null (torch's default), got {value!r}")
    torch.set_num_threads(value)


def _mean_over_micro_batches(results: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    keys = list(dict.fromkeys(k for result in results for k in result))
    return {k: torch.stack([r[k].detach().float().reshape(-1).mean() for r in results if k in r]).mean() for k in keys}
