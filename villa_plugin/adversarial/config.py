"""The ``model_config.<model>.adversarial`` block as a validated dataclass."""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional, Tuple

from villa_plugin.common.errors import ConfigError

MODALITY_CHOICES = "[text] | [image] | [image, text] | [text, image, alter]"
NORM_TYPES = ("l2", "linf")
FORMULATIONS = ("exact", "official")

# Allowed modality sets (any order) -> canonical tuple.
_MODALITIES = {
    frozenset(["text"]): ("text",),
    frozenset(["image"]): ("image",),
    frozenset(["image", "text"]): ("image", "text"),
    frozenset(["text", "image", "alter"]): ("text", "image", "alter"),
}


@dataclass(frozen=True)
class AdversarialConfig:
    """VILLA's adversarial hyper-parameters (names follow the official flags).

    ``adv_modality`` is stored as a canonical tuple: ``("text",)``, ``("image",)``,
    ``("image", "text")`` (both perturbed in one forward) or ``("text", "image", "alter")`` (one
    forward per modality per step). ``formulation`` picks the official gradient computation
    (``retain_graph``, the clean branch back-propagated K times) or the exact cheaper one (one clean
    backward); both give the same gradients. ``kl_detach_clean`` detaches the clean logits (opt-in,
    NOT equivalent).
    """

    adv_training: bool = True
    adv_modality: Tuple[str, ...] = ("text",)
    adv_steps: int = 3
    adv_lr_txt: float = 1e-3
    adv_lr_img: float = 1e-3
    adv_init_mag: float = 0.0
    norm_type: str = "l2"
    adv_max_norm: float = 0.0
    adv_kl_weight: float = 1.5
    formulation: str = "exact"
    kl_detach_clean: bool = False
    key_prefix: str = field(default="adversarial", compare=False, repr=False)

    def __post_init__(self) -> None:
        prefix = self.key_prefix
        object.__setattr__(self, "adv_modality", _check_modality(self.adv_modality, prefix))
        for name in ("adv_training", "kl_detach_clean"):
            object.__setattr__(self, name, _check_bool(getattr(self, name), f"{prefix}.{name}"))
        steps = self.adv_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(
                f"{prefix}.adv_steps must be an integer >= 1 (the number of ascent steps K; the "
                f"released configs use 3), got {steps!r}."
            )
        for name in ("adv_lr_txt", "adv_lr_img", "adv_init_mag", "adv_max_norm", "adv_kl_weight"):
            object.__setattr__(self, name, _check_non_negative(getattr(self, name), f"{prefix}.{name}"))
        _check_choice(self.norm_type, NORM_TYPES, f"{prefix}.norm_type")
        _check_choice(self.formulation, FORMULATIONS, f"{prefix}.formulation")

    # -- derived facts ------------------------------------------------------------------
    @property
    def perturb_text(self) -> bool:
        return "text" in self.adv_modality

    @property
    def perturb_image(self) -> bool:
        return "image" in self.adv_modality

    @property
    def alter(self) -> bool:
        """One forward per modality per step (the other one clean), loss divided by 2K."""
        return "alter" in self.adv_modality

    def lr_for(self, modality: str) -> float:
        return self.adv_lr_txt if modality == "text" else self.adv_lr_img

    def never_updated(self) -> List[str]:
        """Why δ never moves from its start (accepted settings that disable the ascent); [] if it moves.

        ``adv_steps: 1``: the only ascent step is the last one, whose gradient updates the
        parameters but not δ. A zero ``adv_lr_txt`` / ``adv_lr_img`` freezes that modality's δ.
        """
        if not self.adv_training:
            return []
        if self.adv_steps == 1:
            return ["adv_steps=1: the single ascent step is the last one, so δ is never updated"]
        lr_keys = {"text": "adv_lr_txt", "image": "adv_lr_img"}
        return [
            f"{lr_keys[m]}=0: δ_{m} is never updated"
            for m in ("text", "image")
            if m in self.adv_modality and self.lr_for(m) == 0
        ]

    def never_updated_warning(self) -> Optional[str]:
        """One warning line for :meth:`never_updated`, or None."""
        reasons = self.never_updated()
        if not reasons:
            return None
        start = (
            "0, so the run adds no perturbation (task + α·KL between two dropout samples, not VILLA)"
            if self.adv_init_mag <= 0
            else "its random start (adv_init_mag), so the run trains on random noise, not adversarial δ"
        )
        return (
            f"{self.key_prefix}: {'; '.join(reasons)}. δ stays at {start}. Set adv_steps >= 2 "
            f"(the released configs use 3) and non-zero adv_lr_* for adversarial training."
        )

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, block: Optional[Mapping[str, Any]], key_prefix: str = "adversarial") -> "AdversarialConfig":
        """Build from a plain dict / DictConfig; unknown keys are rejected with a suggestion."""
        block = _to_plain(block) if block is not None else {}
        if not isinstance(block, Mapping):
            raise ConfigError(f"{key_prefix} must be a mapping of adversarial settings, got {type(block).__name__}.")
        known = [f.name for f in dataclasses.fields(cls) if f.name != "key_prefix"]
        for key in block:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f' Did you mean "{close[0]}"?' if close else ""
                raise ConfigError(
                    f"Unknown key {key_prefix}.{key}.{hint} Known keys: {', '.join(known)}."
                )
        return cls(**dict(block), key_prefix=key_prefix)

    @classmethod
    def from_model_config(cls, config: Any, model_name: Optional[str] = None) -> "AdversarialConfig":
        """Read ``model_config.<model>.adversarial`` from a full config (``config.model`` when
        ``model_name`` is not given). A model without the block trains without adversaries."""
        model_name = model_name or _get(config, "model")
        model_config = _get(_get(config, "model_config") or {}, model_name) if model_name else None
        prefix = f"model_config.{model_name}.adversarial"
        block = _get(model_config, "adversarial") if model_config is not None else None
        if block is None:
            return cls(adv_training=False, key_prefix=prefix)
        return cls.from_dict(block, key_prefix=prefix)


def _get(container: Any, key: str) -> Any:
    if container is None:
        return None
    if hasattr(container, "get"):
        return container.get(key, None)
    return getattr(container, key, None)


def _to_plain(block: Any) -> Any:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(block, DictConfig):
            return OmegaConf.to_container(block, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return block


def _check_modality(value: Any, prefix: str) -> Tuple[str, ...]:
    key = f"{prefix}.adv_modality"
    if isinstance(value, str) or not _is_sequence(value):
        raise ConfigError(
            f"{key} must be a list, one of {MODALITY_CHOICES}; got {value!r}. "
            f"Write e.g. `adv_modality: [text]` (a bare string is not accepted)."
        )
    items = list(value)
    if not all(isinstance(item, str) for item in items) or len(set(items)) != len(items):
        raise ConfigError(f"{key} must be one of {MODALITY_CHOICES} (any order, no repeats); got {items!r}.")
    canonical = _MODALITIES.get(frozenset(items))
    if canonical is None:
        raise ConfigError(f"{key} must be one of {MODALITY_CHOICES} (any order); got {items!r}.")
    return canonical


def _is_sequence(value: Any) -> bool:
    try:
        from omegaconf import ListConfig

        if isinstance(value, ListConfig):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(value, (list, tuple))


def _check_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}.")
    return value


def _check_non_negative(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a number >= 0, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number >= 0, got {value!r}.") from None
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{key} must be a finite number >= 0, got {value!r}.")
    return number


def _check_choice(value: Any, choices: Tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {' | '.join(choices)}, got {value!r}.")
