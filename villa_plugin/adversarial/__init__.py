"""VILLA's adversarial core: the Perturbable contract, perturbations, the free-AT engine, the symmetric KL.

Free of trainer and distributed code; see docs/architecture.md ("Adversarial engine").
"""
from villa_plugin.adversarial.config import AdversarialConfig
from villa_plugin.adversarial.engine import FreeATEngine, task_loss_of
from villa_plugin.adversarial.losses import KL_REDUCTIONS, reduce_kl, symmetric_kl
from villa_plugin.adversarial.perturbation import (
    ascent_direction,
    ascent_step,
    init_delta,
    perturbation_masks,
    perturbation_shapes,
    project,
    row_norms,
)
from villa_plugin.adversarial.protocol import Perturbable, check_perturbable

__all__ = [
    "AdversarialConfig",
    "FreeATEngine",
    "KL_REDUCTIONS",
    "Perturbable",
    "ascent_direction",
    "ascent_step",
    "check_perturbable",
    "init_delta",
    "perturbation_masks",
    "perturbation_shapes",
    "project",
    "reduce_kl",
    "row_norms",
    "symmetric_kl",
    "task_loss_of",
]
