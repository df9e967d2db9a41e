"""The free adversarial training loop of VILLA (one micro-batch), in two equivalent formulations.

Per micro-batch with K = ``adv_steps`` and δ_0 = 0 (or FreeLB's random start), the parameter
gradients accumulated in ``.grad`` are::

    (1/K) Σ_{t=0}^{K-1} ∇θ [ task(f(x+δ_t), y) + α · KLRED(SymKL(f(x), f(x+δ_t))) ]

(``alter``: each step has two forwards, one per perturbed modality, and the divisor is 2K) with
``δ_{t+1} = proj(δ_t + lr · g_t/‖g_t‖)``, g_t = ∇δ of the step loss, and the gradient flowing
through the clean logits f(x) as well (villa-algorithm.md §3).

- ``official``: the clean graph is retained and back-propagated on each of the K backwards.
- ``exact``: steps 0..K-2 use a detached leaf copy c̃ of the clean logits as the KL reference; the
  last backward adds the surrogate ``(z_c · c̃.grad).sum()`` so the clean branch is back-propagated
  once (§8). ``backward`` may scale the loss (GradScaler) or apply any other constant factor s:
  the engine measures s with a zero-valued probe added to the first step's loss (its gradient is
  s) and divides c̃.grad by it, so the result is exact for any linear ``backward``.
- ``kl_detach_clean``: clean logits computed under ``no_grad`` (opt-in, NOT equivalent).

Sync rules (distributed.md §7): the clean forward and steps 0..K-2 run inside
``sync_context(False)``, the last step's forward and backward inside
``sync_context(is_last_micro_batch)``. No ``.item()`` is called: statistics stay on the device.
The one exception is a start-up check: on the first ascent step of an engine's first micro-batch
each δ's gradient is read back once (one host sync) to fail loudly when the model ignores or
detaches a perturbation (δ would stay 0: the run would be dropout consistency, not VILLA). Later
steps are not checked, so the steady state stays sync-free.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import torch
from torch import nn

from villa_plugin.adversarial.config import AdversarialConfig
from villa_plugin.adversarial.losses import get_kl_reduction, symmetric_kl
from villa_plugin.adversarial.perturbation import (
    MODALITIES,
    ascent_step,
    init_delta,
    perturbation_masks,
    perturbation_shapes,
    row_norms,
)
from villa_plugin.common.errors import TrainingError

logger = logging.getLogger(__name__)

Backward = Callable[..., Any]  # backward(loss, retain_graph=False)
SyncContext = Callable[[bool], ContextManager]


def task_loss_of(output: Dict[str, Any]) -> torch.Tensor:
    """The task loss of a model output: the sum of ``output["losses"].values()``."""
    losses = output.get("losses") if isinstance(output, dict) else None
    if not losses:
        raise ValueError(
            "The model output has no 'losses': adversarial training needs the task loss. Configure "
            "model_config.<model>.losses and make sure the training batch carries 'targets'."
        )
    return sum(losses.values())


class FreeATEngine:
    """Runs VILLA's clean forward + K ascent steps for one micro-batch; see the module docstring.

    ``step`` leaves the accumulated parameter gradients in ``.grad`` and returns detached
    statistics. The model is called as ``model(batch)`` for the clean pass and
    ``model(batch, perturbation={"text": δ_txt | None, "image": δ_img | None})`` for perturbed ones;
    it stays in whatever mode the caller set (train mode: dropout active in every forward).
    """

    def __init__(self, adv_config: AdversarialConfig):
        if not isinstance(adv_config, AdversarialConfig):
            adv_config = AdversarialConfig.from_dict(adv_config)
        self.config = adv_config
        warning = adv_config.never_updated_warning()
        if warning:
            logger.warning(warning)
        self.delta_gradients_checked = False  # see the module docstring: checked once, then never

    def step(
        self,
        model: nn.Module,
        batch: Any,
        *,
        backward: Backward,
        sync_context: Optional[SyncContext] = None,
        is_last_micro_batch: bool = True,
        kl_reduction: str = "mean_times_classes",
        shapes: Optional[Dict[str, Tuple[int, ...]]] = None,
        forward_context: Optional[Callable[[], ContextManager]] = None,
        unwrap: Optional[Callable[[nn.Module], nn.Module]] = None,
        generator: Optional[torch.Generator] = None,
        consistency: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch; returns detached statistics.

        - ``backward(loss, retain_graph=False)``: back-propagates ``loss`` (applying the grad scaler).
        - ``sync_context(is_last)``: context for gradient sync (no-sync unless ``is_last``).
        - ``kl_reduction``: ``mean_times_classes`` | ``sum_classes_mean`` | ``mean`` (the model's
          ``kl_reduction``).
        - ``shapes``: ``{"text": (B, Lt, H), "image": (B, Nb, D_img)}``; default: asked from the
          unwrapped model (``unwrap`` or the ``.module`` chain), as are the masks of the random
          start (the model's ``perturbation_masks``; see ``adversarial/protocol.py``).
        - ``forward_context()``: wraps every model call (e.g. autocast); backward runs outside it.
        - ``generator``: RNG for the random start when ``adv_init_mag > 0``.
        - ``consistency(adv_scores, clean_scores)``: the term weighted by ``adv_kl_weight`` (default: the
          symmetric KL reduced by ``kl_reduction``); e.g. a per-task term in pre-training (MRFR's MSE).

        Returned keys: ``loss`` (mean per-forward objective task + α·KL), ``task_loss``, ``kl``
        (means over the perturbed forwards), ``clean_task_loss`` (the clean forward's loss) and,
        with adversaries, ``kl_gain`` (K >= 2: the mean KL of steps 1..K-1 minus step 0's, whose δ_0
        is 0 without a random start: what the ascent adds to the dropout-only divergence),
        ``delta_norm_<modality>`` (mean row L2 norm of the last δ),
        ``delta_ratio_<modality>`` (that norm over the mean row norm of the input δ is added to,
        when the model's output reports ``perturbed_input_norms``) and ``ascent_skips`` (δ
        updates skipped for a non-finite gradient).
        """
        sync_context = sync_context or (lambda is_last: contextlib.nullcontext())
        forward_context = forward_context or contextlib.nullcontext
        if not self.config.adv_training:
            return self._plain_step(model, batch, backward, sync_context, is_last_micro_batch, forward_context)
        if consistency is None:
            reduce = get_kl_reduction(kl_reduction)
            consistency = lambda adv, clean: reduce(symmetric_kl(adv, clean))  # noqa: E731
        run = _Run(self.config, model, batch, backward, forward_context, consistency)
        run.check_delta_gradients = not self.delta_gradients_checked
        shapes = shapes if shapes is not None else perturbation_shapes(model, batch, unwrap)
        masks = perturbation_masks(model, batch, shapes, unwrap) if self.config.adv_init_mag > 0 else {}
        run.init_deltas(shapes, masks, generator)
        steps = self.config.adv_steps
        with sync_context(False):
            run.clean_forward()
            for t in range(steps - 1):
                run.ascent_step(t)
        with sync_context(is_last_micro_batch):
            run.ascent_step(steps - 1)
        self.delta_gradients_checked = True
        return run.stats()

    @staticmethod
    def _plain_step(model, batch, backward, sync_context, is_last_micro_batch, forward_context):
        # adv_training=false: exactly the plain trainer's forward + backward, nothing extra.
        with sync_context(is_last_micro_batch):
            with forward_context():
                output = model(batch)
            loss = task_loss_of(output)
            backward(loss)
        loss = loss.detach()
        return {"loss": loss, "task_loss": loss}


class _Run:
    """State of one micro-batch: deltas, clean logits, accumulated statistics."""

    def __init__(self, config: AdversarialConfig, model, batch, backward, forward_context, consistency):
        self.cfg = config
        self.model = model
        self.batch = batch
        self.backward = backward
        self.forward_context = forward_context
        self.consistency = consistency
        self.active: List[str] = [m for m in MODALITIES if m in config.adv_modality]
        self.detach_clean = config.kl_detach_clean
        self.exact = config.formulation == "exact" and not self.detach_clean
        self.forwards_per_step = 2 if config.alter else 1
        self.deltas: Dict[str, torch.Tensor] = {}
        self.z_clean: Optional[torch.Tensor] = None
        self.clean_leaf: Optional[torch.Tensor] = None
        self.scale_probe: Optional[torch.Tensor] = None
        self.device = _batch_device(batch, model)
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        self.task_sum, self.kl_sum, self.clean_task = zero.clone(), zero.clone(), zero.clone()
        self.kl_first = zero.clone()  # the KL of step 0, whose δ_0 no ascent has moved yet
        self.skips = torch.zeros((), dtype=torch.long, device=self.device)
        self.check_delta_gradients = False
        self.input_norms: Dict[str, torch.Tensor] = {}

    # -- set-up ---------------------------------------------------------------------------
    def init_deltas(self, shapes: Dict[str, Tuple[int, ...]], masks: Dict[str, Optional[torch.Tensor]], generator) -> None:
        missing = [m for m in self.active if m not in shapes]
        if missing:
            raise ValueError(
                f"adv_modality perturbs {missing} but the model's perturbation_shapes gives only "
                f"{sorted(shapes)}; use a modality the model supports."
            )
        for m in self.active:
            self.deltas[m] = init_delta(
                shapes[m],
                device=self.device,
                norm_type=self.cfg.norm_type,
                init_mag=self.cfg.adv_init_mag,
                mask=masks.get(m),
                generator=generator,
            )

    def clean_forward(self) -> None:
        grad_mode = torch.no_grad() if self.detach_clean else contextlib.nullcontext()
        with grad_mode, self.forward_context():
            output = self.model(self.batch)
        z = output["scores"]
        if output.get("losses"):
            self.clean_task = task_loss_of(output).detach().float()
        if self.detach_clean:
            z = z.detach()
        elif self.exact and self.cfg.adv_steps > 1:
            self.clean_leaf = z.detach().float().requires_grad_()
        self.z_clean = z

    # -- one ascent step --------------------------------------------------------------------
    def ascent_step(self, t: int) -> None:
        last = t == self.cfg.adv_steps - 1
        reference = self.clean_leaf if (self.clean_leaf is not None and not last) else self.z_clean
        loss = None
        for perturbation in self._perturbations():
            with self.forward_context():
                output = self.model(self.batch, perturbation=perturbation)
            task = task_loss_of(output)
            self._note_input_norms(output)
            kl = self.consistency(output["scores"], reference)
            self.task_sum += task.detach().float()
            self.kl_sum += kl.detach().float()
            if t == 0:
                self.kl_first += kl.detach().float()
            term = task + self.cfg.adv_kl_weight * kl
            loss = term if loss is None else loss + term
        loss = loss / (self.cfg.adv_steps * self.forwards_per_step)
        if self.clean_leaf is not None and t == 0:
            # Zero-valued probe: its gradient is the factor s that backward() applies (GradScaler).
            self.scale_probe = torch.zeros((), dtype=loss.dtype, device=loss.device, requires_grad=True)
            loss = loss + self.scale_probe
        if last:
            loss = self._add_clean_surrogate(loss)
        retain = not last and not self.exact and not self.detach_clean
        if retain:
            self.backward(loss, retain_graph=True)
        else:
            self.backward(loss)
        if t == 0 and self.check_delta_gradients:
            self._check_delta_gradients()
        if not last:
            self._update_deltas()

    def _note_input_norms(self, output: Dict[str, Any]) -> None:
        """The mean row norm of each perturbed input, when the model reports them (optional output
        ``perturbed_input_norms``): δ's size relative to its input is logged as ``delta_ratio_<m>``."""
        norms = output.get("perturbed_input_norms") or {}
        for m in self.active:
            if norms.get(m) is not None:
                self.input_norms[m] = norms[m].detach().float().mean()

    def _perturbations(self) -> List[Dict[str, Optional[torch.Tensor]]]:
        if self.cfg.alter:
            return [{"text": self.deltas["text"], "image": None}, {"text": None, "image": self.deltas["image"]}]
        return [{m: self.deltas.get(m) for m in MODALITIES}]

    def _check_delta_gradients(self) -> None:
        """Fail when a δ got no gradient or an identically zero one (one host sync; first step only)."""
        missing = [m for m in self.active if self.deltas[m].grad is None]
        if not missing:
            nonzero = torch.stack([self.deltas[m].grad.ne(0).any() for m in self.active]).tolist()
            missing = [m for m, moved in zip(self.active, nonzero) if not moved]
        if missing:
            model = type(self.model).__name__
            raise TrainingError(
                f"Adversarial training cannot perturb {missing}: on the first ascent step the gradient "
                f"of δ_{'/δ_'.join(missing)} is {'missing' if self.deltas[missing[0]].grad is None else 'identically zero'}, "
                f"so δ would stay 0 and the run would not be VILLA. {model}.forward(batch, perturbation=...) "
                f"must add perturbation[{missing[0]!r}] to its input without detaching it (see "
                f"docs/adding_a_backbone.md), or drop the modality from {self.cfg.key_prefix}.adv_modality."
            )

    def _add_clean_surrogate(self, loss: torch.Tensor) -> torch.Tensor:
        leaf = self.clean_leaf
        if leaf is None:  # official / detached / K = 1: nothing to add
            return loss
        if leaf.grad is None or self.scale_probe is None or self.scale_probe.grad is None:
            which = "the clean-logits leaf" if leaf.grad is None else "the scale probe"
            raise TrainingError(
                f"{self.cfg.key_prefix}.formulation=exact: {which} got no gradient from steps 0..K-2, so "
                f"the clean branch's KL gradient cannot be added. The backward function must back-propagate "
                f"into every leaf of the loss (loss.backward(), not torch.autograd.backward(..., inputs=params)); "
                f"fix it, or use formulation: official."
            )
        upstream = leaf.grad / self.scale_probe.grad  # undo backward's factor: exact for powers of 2
        return loss + (self.z_clean.float() * upstream).sum()

    def _update_deltas(self) -> None:
        for m in self.active:
            delta = self.deltas[m]
            self.deltas[m], skipped = ascent_step(
                delta,
                delta.grad,
                self.cfg.lr_for(m),
                norm_type=self.cfg.norm_type,
                max_norm=self.cfg.adv_max_norm,
            )
            self.skips += skipped

    # -- results ----------------------------------------------------------------------------
    def stats(self) -> Dict[str, torch.Tensor]:
        n = float(self.cfg.adv_steps * self.forwards_per_step)
        task, kl = self.task_sum / n, self.kl_sum / n
        out = {
            "loss": task + self.cfg.adv_kl_weight * kl,
            "task_loss": task,
            "kl": kl,
            "clean_task_loss": self.clean_task,
            "ascent_skips": self.skips,
        }
        if self.cfg.adv_steps > 1:  # what the ascent adds: the later steps' KL over step 0's
            later = (self.kl_sum - self.kl_first) / ((self.cfg.adv_steps - 1) * self.forwards_per_step)
            out["kl_gain"] = later - self.kl_first / self.forwards_per_step
        for m, delta in self.deltas.items():
            out[f"delta_norm_{m}"] = row_norms(delta, "l2").mean()
            if m in self.input_norms:
                out[f"delta_ratio_{m}"] = out[f"delta_norm_{m}"] / self.input_norms[m].clamp_min(1e-12)
        return out


def _batch_device(batch: Any, model: nn.Module) -> torch.device:
    values = batch.values() if hasattr(batch, "values") else []
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.device
    for param in model.parameters():
        return param.device
    return torch.device("cpu")
