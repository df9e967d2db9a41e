"""Per-modality perturbations: shapes, initialisation, the ascent step and the projection.

Every delta is an fp32 leaf tensor ``[B, ...]``; norms are taken per example over the flattened
row (VILLA/FreeLB). Everything here is host-sync free: data-dependent choices use ``torch.where``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

MODALITIES = ("text", "image")
EPS = 1e-8


def unwrapped(model: nn.Module, unwrap: Optional[Callable[[nn.Module], nn.Module]] = None) -> nn.Module:
    """The bare model under a DDP / ShardedDDP / FSDP1 wrapper (``unwrap`` wins if given)."""
    if unwrap is not None:
        return unwrap(model)
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return model


def perturbation_shapes(model: nn.Module, batch: Any, unwrap: Optional[Callable] = None) -> Dict[str, Tuple[int, ...]]:
    """``{"text": (B, Lt, H), "image": (B, Nb, D_img)}`` from the unwrapped model.

    Shapes come from the batch and the config only: calling a wrapped submodule outside the root
    forward (as the official code does for the shape) crashes under FSDP2.
    """
    return {k: tuple(int(d) for d in v) for k, v in unwrapped(model, unwrap).perturbation_shapes(batch).items()}


def init_delta(
    shape: Sequence[int],
    *,
    device: torch.device,
    norm_type: str = "l2",
    init_mag: float = 0.0,
    mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """A new fp32 leaf delta (``requires_grad=True``).

    ``init_mag == 0`` (VILLA's default): zeros. Otherwise FreeLB's random start, with ``mask``
    ``[B, L]`` marking the real positions (all real when None):
    l2: ``U(-1, 1) · mask · mag / sqrt(len · D)`` per example; linf: ``U(-mag, mag) · mask``.
    """
    shape = tuple(int(d) for d in shape)
    if init_mag <= 0:
        return torch.zeros(shape, dtype=torch.float32, device=device, requires_grad=True)
    if mask is None:
        mask = torch.ones(shape[:2], dtype=torch.float32, device=device)
    mask = mask.to(device=device, dtype=torch.float32).reshape(shape[:2] + (1,) * (len(shape) - 2))
    noise = torch.rand(shape, dtype=torch.float32, device=device, generator=generator) * 2 - 1
    if norm_type == "l2":
        feature_size = math.prod(shape[2:])
        lengths = mask.reshape(shape[0], -1).sum(1).clamp_min(1.0)
        scale = init_mag / torch.sqrt(lengths * feature_size)
        delta = noise * mask * scale.reshape((-1,) + (1,) * (len(shape) - 1))
    elif norm_type == "linf":
        delta = noise * init_mag * mask
    else:
        raise ValueError(f"norm_type must be l2 or linf, got {norm_type!r}")
    return delta.detach().requires_grad_()


def row_norms(tensor: torch.Tensor, norm_type: str = "l2") -> torch.Tensor:
    """Per-example norm over the flattened row, in fp32: shape ``[B]``."""
    flat = tensor.detach().float().reshape(tensor.size(0), -1)
    if norm_type == "l2":
        return flat.norm(p=2, dim=1)
    if norm_type == "linf":
        return flat.abs().amax(dim=1)
    raise ValueError(f"norm_type must be l2 or linf, got {norm_type!r}")


def ascent_direction(grad: torch.Tensor, norm_type: str = "l2") -> torch.Tensor:
    """``g / max(‖g‖, 1e-8)`` per row: the l2 norm for ``l2``, ``max|g|`` (not sign) for ``linf``."""
    grad = grad.float()
    norms = row_norms(grad, norm_type).clamp_min(EPS)
    return grad / norms.reshape((-1,) + (1,) * (grad.dim() - 1))


def project(delta: torch.Tensor, max_norm: float, norm_type: str = "l2") -> torch.Tensor:
    """Project onto the ``max_norm`` ball (no-op when ``max_norm <= 0``).

    l2: rows whose norm exceeds ``max_norm`` are rescaled to it; linf: elementwise clamp.
    """
    if max_norm <= 0:
        return delta
    if norm_type == "linf":
        return delta.clamp(-max_norm, max_norm)
    norms = row_norms(delta, "l2")
    factor = torch.where(norms > max_norm, max_norm / norms.clamp_min(EPS), torch.ones_like(norms))
    return delta * factor.reshape((-1,) + (1,) * (delta.dim() - 1))


def ascent_step(
    delta: torch.Tensor,
    grad: Optional[torch.Tensor],
    lr: float,
    *,
    norm_type: str = "l2",
    max_norm: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One gradient-ascent update of ``delta``; returns ``(new_leaf_delta, skipped)``.

    ``new = project(delta + lr · ascent_direction(grad))``. If ``grad`` holds a non-finite value
    (e.g. an fp16 overflow under a GradScaler) the delta is kept unchanged and ``skipped`` is 1,
    else 0 (a 0-d int tensor on the delta's device, so no host sync). A missing gradient (the delta
    did not reach the loss) counts as a zero gradient: the delta is kept.
    """
    base = delta.detach()
    if grad is None:
        return base.clone().requires_grad_(), torch.zeros((), dtype=torch.long, device=base.device)
    finite = torch.isfinite(grad).all()
    safe_grad = torch.where(finite, grad.float(), torch.zeros((), dtype=torch.float32, device=grad.device))
    updated = project(base + lr * ascent_direction(safe_grad, norm_type), max_norm, norm_type)
    new = torch.where(finite, updated, base).to(torch.float32)
    return new.detach().requires_grad_(), (~finite).long()


def perturbation_masks(
    model: nn.Module, batch: Any, shapes: Dict[str, Tuple[int, ...]], unwrap: Optional[Callable] = None
) -> Dict[str, Optional[torch.Tensor]]:
    """The unwrapped model's ``perturbation_masks(batch)``, checked against ``shapes``.

    Each mask is ``[B, L]`` (True = a real token / region) or None (all real); a mask of another
    shape is a ValueError naming the modality.
    """
    masks = dict(unwrapped(model, unwrap).perturbation_masks(batch) or {})
    for modality, mask in masks.items():
        if mask is None or modality not in shapes:
            continue
        expected = tuple(shapes[modality][:2])
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != expected:
            found = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"perturbation_masks()[{modality!r}] must be a [B, L] = {expected} mask (True = real), got {found}."
            )
        masks[modality] = mask.bool()
    return masks
