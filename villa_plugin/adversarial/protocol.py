"""The perturbation contract: what a model implements to be trained by ``villa_free_at``.

The adversarial engine knows nothing about any backbone: it asks the model for the shapes of its
perturbations (``perturbation_shapes``), for which positions are real tokens / regions
(``perturbation_masks``, used by the random start), for the task's KL convention
(``kl_reduction``), and calls ``forward(batch, perturbation={...})``. See docs/adding_a_backbone.md.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Protocol, Tuple, runtime_checkable

import torch

from villa_plugin.common.errors import ConfigError

GUIDE = "docs/adding_a_backbone.md"
PERTURBATION_KEYS = ("text", "image")


@runtime_checkable
class Perturbable(Protocol):
    """A model VILLA can perturb.

    - ``perturbation_shapes(batch)``: ``{"text": (B, Lt, H), "image": (B, Nb, D_img)}``, only the
      modalities the model supports; computed from the batch and the config (never by calling a
      submodule: that breaks FSDP2).
    - ``perturbation_masks(batch)``: the same keys, ``[B, L]`` bool masks (True = a real token /
      region) or None (all real); used for the random start (``adv_init_mag > 0``).
    - ``kl_reduction``: a name in :data:`villa_plugin.adversarial.losses.KL_REDUCTIONS`.
    - ``forward(batch, perturbation=None)``: ``{"scores": Tensor, "losses": {...}}``. δ is an fp32
      tensor per modality (or None); the model adds it where its backbone documents it, in fp32
      whatever its parameter dtype (upcast, add δ, run the next LayerNorm / projection input in
      fp32, cast to the compute dtype after). Optionally, a perturbed forward's output carries
      ``perturbed_input_norms``: ``{"text": [B] | None, "image": [B] | None}``, the detached row
      norms of the inputs δ is added to (the engine logs δ's size relative to them).
    """

    kl_reduction: str

    def perturbation_shapes(self, batch: Any) -> Dict[str, Tuple[int, ...]]:
        ...

    def perturbation_masks(self, batch: Any) -> Dict[str, Optional[torch.Tensor]]:
        ...

    def forward(self, batch: Any, perturbation: Optional[Dict[str, Optional[torch.Tensor]]] = None) -> Dict[str, Any]:
        ...


def check_perturbable(model: Any, name: Optional[str] = None) -> str:
    """Check ``model`` (unwrapped) against :class:`Perturbable`; return its ``kl_reduction``.

    Raises a ConfigError naming the first missing or unusable member and pointing to the guide.
    """
    from villa_plugin.adversarial.losses import get_kl_reduction

    label = f'Model "{name}" ({type(model).__name__})' if name else f"Model {type(model).__name__}"

    def fail(member: str, problem: str) -> ConfigError:
        return ConfigError(
            f"{label} does not accept perturbations: {problem} `{member}` of the Perturbable protocol "
            f"(villa_plugin.adversarial.protocol), which villa_free_at needs to train it adversarially. "
            f"Implement it (see {GUIDE}), or set model_config.{name or '<model>'}.adversarial.adv_training=false."
        )

    for method in ("perturbation_shapes", "perturbation_masks"):
        if not callable(getattr(model, method, None)):
            raise fail(f"{method}(batch)", "it has no")
    forward = getattr(model, "forward", None)
    if not callable(forward):
        raise fail("forward(batch, perturbation=None)", "it has no")
    if not _accepts_keyword(forward, "perturbation"):
        raise fail("forward(batch, perturbation=None)", "its forward does not take the keyword of")
    reduction = getattr(model, "kl_reduction", None)
    if not reduction:
        raise fail("kl_reduction", "it has no")
    try:
        get_kl_reduction(reduction)
    except ConfigError as err:
        raise ConfigError(f"{label}.kl_reduction: {err}") from None
    return reduction


def split_perturbation(model: Any, batch: Any, perturbation: Any) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(δ_text, δ_image)`` of a ``forward(batch, perturbation=)`` argument (None, or a dict with keys
    in :data:`PERTURBATION_KEYS`), each checked against ``model.perturbation_shapes(batch)``;
    ``ValueError`` naming the key and both shapes otherwise."""
    if perturbation is None:
        return None, None
    if not isinstance(perturbation, dict) or set(perturbation) - set(PERTURBATION_KEYS):
        keys = list(perturbation) if isinstance(perturbation, dict) else type(perturbation).__name__
        raise ValueError(f"perturbation must be None or a dict with keys in {PERTURBATION_KEYS}, got {keys}")
    shapes = model.perturbation_shapes(batch)
    for key in PERTURBATION_KEYS:
        delta = perturbation.get(key)
        if delta is not None and tuple(delta.shape) != shapes[key]:
            raise ValueError(f"perturbation['{key}'] has shape {tuple(delta.shape)}, expected {shapes[key]}")
    return perturbation.get("text"), perturbation.get("image")


def _accepts_keyword(function: Any, keyword: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return True
    return any(p.name == keyword or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
