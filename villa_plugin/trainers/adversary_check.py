"""``adversary_check``: warns once when VILLA's adversary barely changes the model's predictions.

``villa_free_at`` adds this callback when ``adv_training`` is on. Over the first
``training.adversary_check.updates`` updates of a run (a resumed run checks again) it sums what the step already logs
(``train/adv/kl`` and ``train/adv/delta_ratio_<modality>``, device tensors: nothing is read back
inside the step), then reads the sums once. When the KL the ascent adds (``train/adv/kl_gain``: the
later ascent steps' KL minus step 0's, whose δ is 0 without a random start, so dropout's own
divergence between the clean and the perturbed forward cancels; ``train/adv/kl`` when K = 1) is below
``training.adversary_check.min_kl`` it logs one warning with the measured KL, δ's norm relative to
the input it perturbs, the step sizes and how to choose them (docs/villa.md).

Why the default ``min_kl`` = 4e-4: the logged KL is the per-example symmetric KL
``KL(p‖q) + KL(q‖p)`` between the clean and the perturbed predicted distributions, averaged over the
batch (the ``mean_times_classes`` and ``sum_classes_mean`` reductions; ``mean``, VCR's, divides it by
the number of classes, which makes the check stricter there). Pinsker's inequality on each term gives
``KL(p‖q) + KL(q‖p) >= 4·TV(p, q)²``, and by Jensen the batch mean of TV is at most ``sqrt(mean KL / 4)``:
below 4e-4 the worst-case perturbation the ascent found moves at most 1% of the predicted probability
mass, and the KL term adds at most ``adv_kl_weight · 4e-4`` (6e-4 at VILLA's 1.5) to a task loss of
order 1: the run is close to plain fine-tuning at K+1 times its cost. Without dropout the KL of step 0
is exactly 0 (δ_0 = 0, same forward), the gain is the KL itself and this is a bound: the warning never
fires on an adversary that moves the predictions by more than 1%. With dropout the gain is an
estimate (the difference of two noisy means): the check warns only when the mean gain plus two
standard errors (over the checked updates) is below ``min_kl``, so dropout noise makes it stay
silent rather than warn on an adversary it cannot measure.
The bundled VQA demo does warn (measured: KL 1e-6 to 1e-5 over its first updates; docs/villa.md).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from villa_plugin.common.config_access import setting
from villa_plugin.common.errors import ConfigError
from villa_plugin.registry import registry
from villa_plugin.trainers.callbacks import Callback

KL_KEY = "train/adv/kl"
GAIN_KEY = "train/adv/kl_gain"
SQUARES_KEY = "kl_gain_squared"  # the check's own sum, for the gain's standard error
RATIO_PREFIX = "train/adv/delta_ratio_"
INPUT_NAMES = {"text": "word embeddings", "image": "region features"}
LR_KEYS = {"text": "adv_lr_txt", "image": "adv_lr_img"}


def standard_error(mean: float, mean_of_squares: Optional[float], samples: int) -> float:
    """The standard error of a mean of ``samples`` per-update values (0 without a spread to measure)."""
    if mean_of_squares is None or samples < 2:
        return 0.0
    variance = max(mean_of_squares - mean * mean, 0.0) * samples / (samples - 1)
    return math.sqrt(variance / samples)


def max_prediction_shift(kl: float) -> float:
    """The most total-variation distance a mean symmetric KL of ``kl`` allows: ``sqrt(kl / 4)``."""
    return math.sqrt(max(kl, 0.0) / 4.0)


@registry.register_callback("adversary_check")
class AdversaryCheckCallback(Callback):
    """See the module docstring. ``warning`` holds the text logged (None while none was)."""

    def __init__(self, trainer, **params):
        super().__init__(trainer, **params)
        config = trainer.config
        self.updates = int(setting(config, "training.adversary_check.updates"))
        self.min_kl = float(setting(config, "training.adversary_check.min_kl"))
        if self.updates < 0 or self.min_kl < 0:
            raise ConfigError("training.adversary_check.updates and .min_kl must be >= 0 (updates: 0 turns the check off)")
        self.sums: Dict[str, torch.Tensor] = {}
        self.seen = 0
        self.done = self.updates == 0
        self.warning: Optional[str] = None

    def on_update_end(self, stats: Dict[str, torch.Tensor]) -> None:
        if self.done or KL_KEY not in stats:
            return
        for key, value in stats.items():
            if key in (KL_KEY, GAIN_KEY) or key.startswith(RATIO_PREFIX):
                value = value.detach().float().reshape(())
                self._add(key, value)
                if key == GAIN_KEY:
                    self._add(SQUARES_KEY, value * value)
        self.seen += 1
        if self.seen >= self.updates:
            self.done = True
            self._check()

    def _add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def _check(self) -> None:
        trainer = self.trainer
        keys = sorted(self.sums)
        packed = torch.stack([self.sums[k].to(trainer.device) for k in keys])
        packed = trainer.strategy.all_reduce_sum(packed).cpu() / (self.seen * trainer.strategy.world_size)
        means = dict(zip(keys, packed.tolist()))
        measured = GAIN_KEY if GAIN_KEY in means else KL_KEY
        samples = self.seen * trainer.strategy.world_size
        error = standard_error(means[measured], means.get(SQUARES_KEY), samples) if measured == GAIN_KEY else 0.0
        if means[measured] + 2 * error >= self.min_kl:
            trainer.log.info(f"adversary_check: mean {measured} over the first {self.seen} updates is "
                             f"{means[measured]:.3g} ± {error:.2g} (not clearly below min_kl {self.min_kl:g}): no warning")
            return
        ratios = {k[len(RATIO_PREFIX):]: v for k, v in means.items() if k.startswith(RATIO_PREFIX)}
        self.warning = self._message(means[KL_KEY], means.get(GAIN_KEY), error, ratios)
        if trainer.is_main:
            trainer.log.warning(self.warning)

    def _message(self, kl: float, gain: Optional[float], error: float, ratios: Dict[str, float]) -> str:
        adv = self.trainer.adv_config
        steps = ", ".join(
            f"{adv.key_prefix}.{LR_KEYS[m]}={adv.lr_for(m):g}"
            + (f": δ's norm is {ratios[m]:.2e} of the {INPUT_NAMES[m]}' norm" if m in ratios else "")
            for m in adv.adv_modality if m in LR_KEYS
        )
        effect = kl if gain is None else gain
        measured = (f"the symmetric KL between clean and perturbed predictions averaged {kl:.2e} (train/adv/kl)"
                    if gain is None else
                    f"the ascent added {gain:.2e} (± {error:.1e}) to the symmetric KL between clean and perturbed predictions "
                    f"(train/adv/kl_gain; train/adv/kl, which includes the dropout-only divergence: {kl:.2e})")
        return (
            f"VILLA's adversary looks ineffective: over the first {self.seen} updates {measured}, below "
            f"training.adversary_check.min_kl={self.min_kl:g}, so the perturbations move at most about "
            f"{100 * max_prediction_shift(effect):.2g}% of the predicted probability mass and the run is close to "
            f"plain fine-tuning at {adv.adv_steps + 1}x its cost. Step sizes: {steps}. Features or embeddings "
            f"of another scale than BUTD's / UNITER's need step sizes scaled with them; the KL grows about with "
            f"the square of δ (10x adv_lr_* gives ~100x the KL; about {math.sqrt(self.min_kl / max(effect, 1e-30)):.2g}x "
            f"would reach min_kl). See docs/villa.md, \"Choosing adv_lr_* for new "
            f"features\". (Set training.adversary_check.updates=0 to turn this check off.)"
        )


__all__ = ["AdversaryCheckCallback", "max_prediction_shift", "standard_error"]
