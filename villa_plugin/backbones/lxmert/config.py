"""LXMERT architecture hyper-parameters (lxmert.md §2); field names follow HF's ``LxmertConfig``."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping

from villa_plugin.backbones.common import check_attention_shape, check_config_keys
from villa_plugin.common.errors import ConfigError


@dataclasses.dataclass
class LxmertConfig:
    """The official LXMERT-base values by default (bert-base-uncased + 9/5/5 layers).

    ``l_layers`` / ``r_layers`` / ``x_layers``: language, object-relationship and cross-modality
    layers. ``visual_feat_dim`` / ``visual_pos_dim``: BUTD feature size and the 4-d box.
    ``attn_implementation``: ``eager`` (the reference's explicit softmax) or ``sdpa`` (torch's fused
    kernel); both compute the same function.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    l_layers: int = 9
    r_layers: int = 5
    x_layers: int = 5
    visual_feat_dim: int = 2048
    visual_pos_dim: int = 4
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    attn_implementation: str = "eager"

    def __post_init__(self) -> None:
        check_attention_shape(self, "LXMERT ")
        if self.x_layers < 1:
            raise ConfigError(f"LXMERT x_layers must be >= 1 (the pooler reads the last X-layer), got {self.x_layers}.")
        for name in ("l_layers", "r_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"LXMERT {name} must be >= 0, got {getattr(self, name)}.")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "LXMERT config") -> "LxmertConfig":
        """Build from a mapping; an unknown key is a ConfigError naming ``source`` and the known keys."""
        check_config_keys(cls, values, source, "LXMERT")
        return cls(**{k: v for k, v in values.items() if v is not None})

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)
