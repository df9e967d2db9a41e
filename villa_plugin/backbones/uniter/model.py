"""UNITER trunk (Chen et al., ECCV 2020), checkpoint-compatible with the official UNITER/VILLA releases.

Read top to bottom: config -> text embeddings -> image embeddings -> encoder -> pooler -> trunk.
Module attribute names reproduce the official checkpoint keys exactly (``embeddings.word_embeddings``,
``img_embeddings.img_linear``, ``encoder.layer.N.attention.self.query``, ``pooler.dense``, ...), so a
state dict of a task model holding this trunk as ``.uniter`` matches ``uniter-base.pt`` / ``villa-base.pt``.

VILLA's perturbations enter the embeddings: the text delta ``[B, Lt, H]`` is added to the word
embeddings before position/type addition and LayerNorm; the image delta ``[B, Nb, 2048]`` is added
to the raw region features before ``img_linear``. Both embedding blocks compute in fp32 whatever
the parameter dtype (bf16 storage, autocast) and cast to the parameter dtype after their last
LayerNorm, so a small δ is not rounded away (δ is fp32; see adversarial/protocol.py). With fp32
parameters and no autocast this is exactly the reference's computation.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from villa_plugin.backbones.bert_blocks import (
    BertStyleAttention,
    GeluIntermediate,
    ResidualOutput,
    TanhPooler,
    layer_norm_at_least_fp32,
    linear_at_least_fp32,
)
from villa_plugin.backbones.common import check_attention_shape, check_config_keys
from villa_plugin.common.errors import ConfigError

IMG_DIM = 2048  # BUTD region feature size
IMG_POS_DIM = 7  # [x1, y1, x2, y2, w, h, w*h], normalised
BUNDLED_ARCHITECTURES = {
    "base": "configs/models/uniter_configs/uniter-base.json",
    "large": "configs/models/uniter_configs/uniter-large.json",
}


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class UniterConfig:
    """Architecture hyper-parameters (the official ``config/uniter-{base,large}.json`` keys).

    ``layer_norm_eps`` and ``attn_implementation`` are not in the official files: every LayerNorm of
    UNITER uses 1e-12, and ``attn_implementation`` picks ``sdpa`` (torch's fused kernel) or ``eager``
    (the explicit softmax of the reference); both compute the same function.
    """

    vocab_size: int = 28996
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        if self.hidden_act != "gelu":
            raise ConfigError(
                f'UNITER uses hidden_act "gelu" (erf form); got "{self.hidden_act}". '
                f'Remove the key or set it to "gelu".'
            )
        check_attention_shape(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "UNITER config") -> "UniterConfig":
        """Build from a dict; unknown keys are an error naming ``source`` and the known keys."""
        check_config_keys(cls, values, source, "UNITER")
        return cls(**dict(values))

    @classmethod
    def from_json_file(cls, path: str) -> "UniterConfig":
        """Read an official-style JSON file (``uniter-base.json``)."""
        path = os.path.expanduser(str(path))
        if not os.path.isfile(path):
            raise ConfigError(f"UNITER config file not found: {path}. Use base, large or an existing JSON path.")
        try:
            with open(path, "r", encoding="utf-8") as handle:
                values = json.load(handle)
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"Cannot read UNITER config file {path}: {err}") from err
        if not isinstance(values, dict):
            raise ConfigError(f"UNITER config file {path} must hold a JSON object, got {type(values).__name__}.")
        return cls.from_dict(values, source=path)

    @classmethod
    def from_name(cls, name_or_path: str, overrides: Optional[Mapping[str, Any]] = None) -> "UniterConfig":
        """``base`` / ``large`` (the bundled official JSONs) or a JSON path, then non-null overrides."""
        if name_or_path in BUNDLED_ARCHITECTURES:
            from villa_plugin.config.paths import bundled_path

            path = bundled_path(BUNDLED_ARCHITECTURES[name_or_path])
        else:
            path = str(name_or_path)
        config = cls.from_json_file(path)
        changes = {k: v for k, v in (overrides or {}).items() if v is not None}
        if changes:
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(changes) - known)
            if unknown:
                raise ConfigError(f"Unknown UNITER architecture override(s) {unknown}; known keys: {sorted(known)}.")
            config = dataclasses.replace(config, **changes)
        return config

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Initialisation (the reference's ``init_weights``)
# ----------------------------------------------------------------------------------------------
def init_uniter_weights(module: nn.Module, initializer_range: float = 0.02) -> None:
    """Linear/Embedding weights ~ N(0, range), Linear biases 0, LayerNorm 1/0. Use with ``model.apply``."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        # As in the reference, this also overwrites the padding row of padding_idx embeddings.
        module.weight.data.normal_(mean=0.0, std=initializer_range)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


# ----------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------
class UniterTextEmbeddings(nn.Module):
    """``dropout(LN(word(ids) [+ delta] + position(pos_ids) + type(type_ids)))``.

    A forward with ``delta`` leaves ``perturbed_input_norm`` ``[B]``: the row L2 norm of the word
    embeddings δ was added to (detached), so VILLA can report δ's size relative to its input.
    """

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.perturbed_input_norm: Optional[torch.Tensor] = None

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        delta: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        words = self.word_embeddings(input_ids)
        compute_dtype = words.dtype
        words = words.float()
        if delta is not None:  # VILLA text perturbation: before position/type and LayerNorm, in fp32
            self.perturbed_input_norm = words.detach().flatten(1).norm(dim=1)  # [B], for δ's relative size
            words = words + delta.float()
        embeddings = (
            words + self.position_embeddings(position_ids).float() + self.token_type_embeddings(token_type_ids).float()
        )
        return self.dropout(layer_norm_at_least_fp32(self.LayerNorm, embeddings).to(compute_dtype))


class UniterImageEmbeddings(nn.Module):
    """``dropout(LN(img_ln(img_linear(feat [+ delta])) + pos_ln(pos_linear(pos7)) + type_emb))``.

    Image tokens have no position embedding; the type embedding comes from the text table.
    """

    def __init__(self, config: UniterConfig, img_dim: int = IMG_DIM):
        super().__init__()
        # Definition order matters only for readability; names match the checkpoint keys.
        self.img_linear = nn.Linear(img_dim, config.hidden_size)
        self.img_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pos_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pos_linear = nn.Linear(IMG_POS_DIM, config.hidden_size)
        self.mask_embedding = nn.Embedding(2, img_dim, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        img_feat: torch.Tensor,
        img_pos_feat: torch.Tensor,
        type_embeddings: torch.Tensor,
        img_masks: Optional[torch.Tensor] = None,
        delta: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        compute_dtype = self.img_linear.weight.dtype
        img_feat = img_feat.float()  # fp32 up to img_linear: δ is added to the raw features
        if img_masks is not None:  # pretraining (MRM/MRC) only
            with torch.no_grad():
                self.mask_embedding.weight[0, :].fill_(0)
            img_feat = img_feat + self.mask_embedding(img_masks.long()).float()
        if delta is not None:  # VILLA image perturbation: on the raw features, before img_linear
            img_feat = img_feat + delta.float()
        projected = linear_at_least_fp32(self.img_linear, img_feat)
        transformed_im = layer_norm_at_least_fp32(self.img_layer_norm, projected)
        projected_pos = linear_at_least_fp32(self.pos_linear, img_pos_feat)
        transformed_pos = layer_norm_at_least_fp32(self.pos_layer_norm, projected_pos)
        embeddings = transformed_im + transformed_pos + type_embeddings.float()
        return self.dropout(layer_norm_at_least_fp32(self.LayerNorm, embeddings).to(compute_dtype))


# ----------------------------------------------------------------------------------------------
# Encoder: post-LN BERT layers
# ----------------------------------------------------------------------------------------------
class UniterSelfAttention(BertStyleAttention):
    """BERT self-attention (``attention.self.*`` in the checkpoint)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``attention_mask`` ``[B, 1, 1, S]``: boolean (True keep; the sdpa path) or additive
        (0 keep, -10000 drop; eager, or callers of the layers)."""
        return self.attend(hidden_states, hidden_states, attention_mask)


class UniterSelfOutput(ResidualOutput):
    """``attention.output.*``: ``LN(x + dropout(dense(h)))`` on the hidden width."""

    def __init__(self, config: UniterConfig):
        super().__init__(config, config.hidden_size)


class UniterAttention(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.self = UniterSelfAttention(config)  # "attention.self.*" in the checkpoint
        self.output = UniterSelfOutput(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden_states, attention_mask), hidden_states)


UniterIntermediate = GeluIntermediate  # "intermediate.dense": erf GeLU


class UniterOutput(ResidualOutput):
    """``output.*``: ``LN(x + dropout(dense(h)))`` from the intermediate width."""

    def __init__(self, config: UniterConfig):
        super().__init__(config, config.intermediate_size)


class UniterLayer(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.attention = UniterAttention(config)
        self.intermediate = UniterIntermediate(config)
        self.output = UniterOutput(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        attention_output = self.attention(hidden_states, attention_mask)
        return self.output(self.intermediate(attention_output), attention_output)


class UniterEncoder(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.layer = nn.ModuleList([UniterLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, output_all_encoded_layers: bool = True
    ) -> List[torch.Tensor]:
        all_layers = []
        for layer in self.layer:
            hidden_states = layer(hidden_states, attention_mask)
            if output_all_encoded_layers:
                all_layers.append(hidden_states)
        if not output_all_encoded_layers:
            all_layers.append(hidden_states)
        return all_layers


class UniterPooler(TanhPooler):
    """``tanh(dense(h[:, 0]))``; called by the task heads, not by the trunk forward."""


# ----------------------------------------------------------------------------------------------
# Trunk
# ----------------------------------------------------------------------------------------------
class UniterModel(nn.Module):
    """The UNITER trunk: embeddings, image embeddings, encoder, pooler (keys ``uniter.*`` in checkpoints)."""

    def __init__(self, config: UniterConfig, img_dim: int = IMG_DIM):
        super().__init__()
        self.config = config
        self.embeddings = UniterTextEmbeddings(config)
        self.img_embeddings = UniterImageEmbeddings(config, img_dim)
        self.encoder = UniterEncoder(config)
        self.pooler = UniterPooler(config)
        self.apply(lambda module: init_uniter_weights(module, config.initializer_range))

    def _compute_txt_embeddings(self, input_ids, position_ids, txt_type_ids=None, txt_delta=None):
        if position_ids is None:
            position_ids = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)
        return self.embeddings(input_ids, position_ids, txt_type_ids, delta=txt_delta)

    def _extended_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 1, S]`` over heads and query positions: boolean for sdpa (a key-padding mask
        its fused kernels take without materialising a float bias; the padded keys' weights are
        exactly 0 either way), else the reference's additive ``(1 - m) * -10000``."""
        mask = attention_mask[:, None, None, :]
        if self.config.attn_implementation == "sdpa":
            return mask.bool()
        mask = mask.to(dtype=self.embeddings.word_embeddings.weight.dtype)
        return (1.0 - mask) * -10000.0

    def _compute_img_embeddings(self, img_feat, img_pos_feat, img_masks=None, img_type_ids=None, img_delta=None):
        if img_type_ids is None:  # image tokens are type 1, looked up in the shared text table
            img_type_ids = torch.ones(img_feat.shape[:2], dtype=torch.long, device=img_feat.device)
        type_embeddings = self.embeddings.token_type_embeddings(img_type_ids)
        return self.img_embeddings(img_feat, img_pos_feat, type_embeddings, img_masks, delta=img_delta)

    def forward(
        self,
        input_ids: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor],
        img_feat: Optional[torch.Tensor],
        img_pos_feat: Optional[torch.Tensor],
        attention_mask: torch.Tensor,
        gather_index: Optional[torch.Tensor] = None,
        img_masks: Optional[torch.Tensor] = None,
        output_all_encoded_layers: bool = True,
        txt_type_ids: Optional[torch.Tensor] = None,
        img_type_ids: Optional[torch.Tensor] = None,
        *,
        txt_delta: Optional[torch.Tensor] = None,
        img_delta: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Sequence output(s) ``[B, S, H]``: a list of every layer, or the last layer only.

        With both modalities, ``gather_index`` ``[B, S]`` packs ``cat(txt, img)`` into
        ``[CLS] text [SEP] regions [pad...]`` (the reference layout; built by
        ``villa_plugin.datasets.collate.build_gather_index``); ``None`` keeps the padded
        concatenation (MMF's layout), with ``attention_mask`` of length ``Lt + Nb``.
        ``input_ids=None`` runs on the image only, ``img_feat=None`` on the text only.
        """
        extended_mask = self._extended_mask(attention_mask)

        if input_ids is None:
            embedding_output = self._compute_img_embeddings(img_feat, img_pos_feat, img_masks, img_type_ids, img_delta)
        elif img_feat is None:
            embedding_output = self._compute_txt_embeddings(input_ids, position_ids, txt_type_ids, txt_delta)
        else:
            txt_emb = self._compute_txt_embeddings(input_ids, position_ids, txt_type_ids, txt_delta)
            img_emb = self._compute_img_embeddings(img_feat, img_pos_feat, img_masks, img_type_ids, img_delta)
            embedding_output = torch.cat([txt_emb, img_emb], dim=1)
            if gather_index is not None:
                index = gather_index.unsqueeze(-1).expand(-1, -1, embedding_output.size(-1))
                embedding_output = torch.gather(embedding_output, dim=1, index=index)
        if embedding_output.size(1) != attention_mask.size(1):
            raise ValueError(
                f"attention_mask has length {attention_mask.size(1)} but the packed sequence has "
                f"{embedding_output.size(1)} tokens (gather_index {'given' if gather_index is not None else 'absent'})."
            )

        encoded_layers = self.encoder(embedding_output, extended_mask, output_all_encoded_layers)
        return encoded_layers if output_all_encoded_layers else encoded_layers[-1]


# ----------------------------------------------------------------------------------------------
# Embedding growth (NLVR2 type ids, VCR type ids and tag vocabulary; architecture §3)
# ----------------------------------------------------------------------------------------------
def _trunk(model: nn.Module) -> UniterModel:
    if isinstance(model, UniterModel):
        return model
    trunk = getattr(model, "uniter", None)
    if isinstance(trunk, UniterModel):
        return trunk
    raise TypeError(f"Expected a UniterModel or a model with a .uniter trunk, got {type(model).__name__}")


def grow_type_embeddings(model: nn.Module, n_rows: int, copy_from: Mapping[int, int]) -> None:
    """Grow ``token_type_embeddings`` to ``n_rows``: old rows kept, new row r := old row ``copy_from[r]``.

    NLVR2 paired-attn: ``grow_type_embeddings(m, 3, {2: 1})``; VCR: ``grow_type_embeddings(m, 4, {2: 0, 3: 0})``.
    New rows not named in ``copy_from`` are drawn from N(0, initializer_range).
    """
    trunk = _trunk(model)
    old = trunk.embeddings.token_type_embeddings
    n_old = old.num_embeddings
    if n_rows < n_old:
        raise ValueError(f"token_type_embeddings already has {n_old} rows; cannot grow to {n_rows}")
    for new_row, src_row in copy_from.items():
        if not (n_old <= new_row < n_rows) or not (0 <= src_row < n_old):
            raise ValueError(f"copy_from entry {new_row}: {src_row} must map a new row in [{n_old}, {n_rows}) "
                             f"to an existing row in [0, {n_old})")
    new = nn.Embedding(n_rows, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    init_uniter_weights(new, trunk.config.initializer_range)
    with torch.no_grad():
        new.weight[:n_old].copy_(old.weight)
        for new_row, src_row in copy_from.items():
            new.weight[new_row].copy_(old.weight[src_row])
    new.weight.requires_grad_(old.weight.requires_grad)
    trunk.embeddings.token_type_embeddings = new
    trunk.config.type_vocab_size = n_rows


def grow_word_embeddings(model: nn.Module, n_new: int) -> None:
    """Append ``n_new`` rows ~ N(0, initializer_range) to ``word_embeddings`` (VCR: 81 tag tokens).

    Unlike the reference (which drops it), ``padding_idx=0`` is kept; pad tokens are masked anyway.
    """
    if n_new < 0:
        raise ValueError(f"n_new must be >= 0, got {n_new}")
    trunk = _trunk(model)
    old = trunk.embeddings.word_embeddings
    n_old = old.num_embeddings
    new = nn.Embedding(n_old + n_new, old.embedding_dim, padding_idx=old.padding_idx,
                       device=old.weight.device, dtype=old.weight.dtype)
    init_uniter_weights(new, trunk.config.initializer_range)
    with torch.no_grad():
        new.weight[:n_old].copy_(old.weight)
    new.weight.requires_grad_(old.weight.requires_grad)
    trunk.embeddings.word_embeddings = new
    trunk.config.vocab_size = n_old + n_new


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (works on meta-device modules)."""
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "IMG_DIM",
    "UniterConfig",
    "UniterModel",
    "UniterTextEmbeddings",
    "UniterImageEmbeddings",
    "UniterEncoder",
    "UniterPooler",
    "grow_type_embeddings",
    "grow_word_embeddings",
    "init_uniter_weights",
    "count_parameters",
]
