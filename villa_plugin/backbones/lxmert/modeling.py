"""The LXMERT trunk (Tan & Bansal, EMNLP 2019) as the official port runs it (lxmert.md §2).

Read top to bottom: embeddings -> visual feature encoder -> attention blocks -> BERT layer ->
cross-modality X-layer -> encoder -> pooler -> trunk. Attribute names reproduce the official
checkpoint keys after ``bert.`` (HF: ``lxmert.``): ``embeddings.word_embeddings``,
``encoder.visn_fc.visn_fc``, ``encoder.layer.N.attention.self.query``, ``encoder.r_layers.N.*``,
``encoder.x_layers.N.visual_attention.att.query``, ``encoder.x_layers.N.lang_self_att.self.query``,
``pooler.dense`` (see keys.py).

VILLA's perturbations (lxmert.md §9.1): the text δ ``[B, Lt, H]`` is added to the word embeddings
before the position/type addition and LayerNorm; the image δ ``[B, Nb, visual_feat_dim]`` is added
to the raw region features before ``visn_fc``; boxes are never perturbed. Both the embedding sum +
LayerNorm and ``visn_fc`` + its LayerNorm always run in fp32 (autocast off), whether or not a δ is
given, so a bf16 model neither rounds δ away nor sees a clean pass computed differently from the
perturbed ones. In an fp32 model this is exactly the official computation.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from villa_plugin.backbones.bert_blocks import (
    BertStyleAttention,
    GeluIntermediate,
    ResidualOutput,
    TanhPooler,
    at_least_fp32,
    autocast_off,
    layer_norm_at_least_fp32,
    linear_at_least_fp32,
)
from villa_plugin.backbones.lxmert.config import LxmertConfig

MASK_VALUE = -10000.0  # the reference's additive mask constant (HF uses finfo.min)


def additive_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``[B, S]`` 1/0 (or bool) mask -> ``(1 - m) · -10000`` as ``[B, 1, 1, S]`` in ``dtype``; None stays None."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE


def init_lxmert_weights(module: nn.Module, initializer_range: float = 0.02) -> None:
    """The reference's ``init_bert_weights``: Linear/Embedding ~ N(0, range) (padding rows included),
    Linear biases 0, LayerNorm 1/0. Use with ``model.apply``."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=initializer_range)
    elif isinstance(module, nn.LayerNorm):
        module.weight.data.fill_(1.0)
        module.bias.data.zero_()
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
class LxmertEmbeddings(nn.Module):
    """``dropout(LN(word(ids) [+ δ] + position + type))``; all three tables have ``padding_idx=0``
    (so the [PAD] word row, position row 0 and type row 0 never get a gradient, as in the reference).
    A forward with ``delta`` leaves ``perturbed_input_norm`` ``[R]``: the row L2 norm of the word
    embeddings δ was added to (detached), so VILLA can report δ's size relative to its input."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size, padding_idx=0)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.perturbed_input_norm: Optional[torch.Tensor] = None

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        delta: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        length = input_ids.size(1)
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"LXMERT text length {length} exceeds max_position_embeddings "
                f"{self.position_embeddings.num_embeddings}; truncate the text (the reference uses 20)."
            )
        position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        words = self.word_embeddings(input_ids)
        compute_dtype = words.dtype
        with autocast_off(words.device):
            words = at_least_fp32(words)
            if delta is not None:  # VILLA text δ: before position/type and LayerNorm
                self.perturbed_input_norm = words.detach().float().flatten(1).norm(dim=1)
                words = words + delta.to(words.dtype)
            summed = (
                words
                + self.position_embeddings(position_ids).to(words.dtype)
                + self.token_type_embeddings(token_type_ids).to(words.dtype)
            )
            normed = layer_norm_at_least_fp32(self.LayerNorm, summed)
        return self.dropout(normed.to(compute_dtype))


class LxmertVisualFeatEncoder(nn.Module):
    """``dropout((LN(visn_fc(feat [+ δ])) + LN(box_fc(box))) / 2)`` (the official ``VisualFeatEncoder``)."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.visn_fc = nn.Linear(config.visual_feat_dim, config.hidden_size)
        self.visn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.box_fc = nn.Linear(config.visual_pos_dim, config.hidden_size)
        self.box_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor, delta: Optional[torch.Tensor] = None) -> torch.Tensor:
        compute_dtype = self.visn_fc.weight.dtype
        with autocast_off(feats.device):
            feats = at_least_fp32(feats)
            if delta is not None:  # VILLA image δ: on the raw features, before visn_fc
                feats = feats + delta.to(feats.dtype)
            x = layer_norm_at_least_fp32(self.visn_layer_norm, linear_at_least_fp32(self.visn_fc, feats))
            x = x.to(compute_dtype)
        y = self.box_layer_norm(self.box_fc(boxes.to(compute_dtype)))
        return self.dropout((x + y) / 2)


# ----------------------------------------------------------------------------------------------
# Attention and feed-forward blocks (post-LN)
# ----------------------------------------------------------------------------------------------
class LxmertAttention(BertStyleAttention):
    """Multi-head attention of ``hidden`` (queries) over ``context`` (keys/values): the official
    ``BertAttention``, used for self-attention (context = hidden) and cross-attention."""

    def forward(
        self, hidden: torch.Tensor, context: torch.Tensor, attention_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``attention_mask``: additive ``[B, 1, 1, S_context]`` or None (every position attends)."""
        return self.attend(hidden, context, attention_mask)


LxmertResidualOutput = ResidualOutput  # the official BertAttOutput / BertOutput


class LxmertSelfAttLayer(nn.Module):
    """Self-attention sub-layer (keys ``self.*``, ``output.*``)."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.self = LxmertAttention(config)
        self.output = LxmertResidualOutput(config, config.hidden_size)

    def forward(self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.output(self.self(hidden, hidden, attention_mask), hidden)


class LxmertCrossAttLayer(nn.Module):
    """Cross-attention sub-layer (keys ``att.*``, ``output.*``); one module serves both directions."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.att = LxmertAttention(config)
        self.output = LxmertResidualOutput(config, config.hidden_size)

    def forward(
        self, hidden: torch.Tensor, context: torch.Tensor, context_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        return self.output(self.att(hidden, context, context_mask), hidden)


LxmertIntermediate = GeluIntermediate  # the official BertIntermediate


class LxmertLayer(nn.Module):
    """A BERT layer (language and object-relationship encoders): ``attention``, ``intermediate``, ``output``."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.attention = LxmertSelfAttLayer(config)
        self.intermediate = LxmertIntermediate(config)
        self.output = LxmertResidualOutput(config, config.intermediate_size)

    def forward(self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        attended = self.attention(hidden, attention_mask)
        return self.output(self.intermediate(attended), attended)


class LxmertXLayer(nn.Module):
    """Cross-modality layer: shared cross-attention in both directions, then self-attention and FFN
    per modality (the official ``LXRTXLayer``)."""

    VISUAL_HALF = ("visn_self_att", "visn_inter", "visn_output")

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.visual_attention = LxmertCrossAttLayer(config)
        self.lang_self_att = LxmertSelfAttLayer(config)
        self.visn_self_att = LxmertSelfAttLayer(config)
        self.lang_inter = LxmertIntermediate(config)
        self.lang_output = LxmertResidualOutput(config, config.intermediate_size)
        self.visn_inter = LxmertIntermediate(config)
        self.visn_output = LxmertResidualOutput(config, config.intermediate_size)

    def forward(
        self,
        lang: torch.Tensor,
        lang_mask: Optional[torch.Tensor],
        visn: torch.Tensor,
        visn_mask: Optional[torch.Tensor],
        visual_output: bool = True,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``visual_output=False`` skips the visual half (its result would be unused)."""
        lang_att = self.visual_attention(lang, visn, visn_mask)
        lang_att = self.lang_self_att(lang_att, lang_mask)
        lang_out = self.lang_output(self.lang_inter(lang_att), lang_att)
        if not visual_output:
            return lang_out, None
        visn_att = self.visual_attention(visn, lang, lang_mask)  # both directions read the layer inputs
        visn_att = self.visn_self_att(visn_att, visn_mask)
        return lang_out, self.visn_output(self.visn_inter(visn_att), visn_att)


class LxmertEncoder(nn.Module):
    """Visual feature encoder, ``l_layers`` language layers, ``r_layers`` object-relationship layers,
    ``x_layers`` cross-modality layers (official ``LXRTEncoder``; attribute order as in the reference)."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.visn_fc = LxmertVisualFeatEncoder(config)
        self.layer = nn.ModuleList([LxmertLayer(config) for _ in range(config.l_layers)])
        self.x_layers = nn.ModuleList([LxmertXLayer(config) for _ in range(config.x_layers)])
        self.r_layers = nn.ModuleList([LxmertLayer(config) for _ in range(config.r_layers)])

    def forward(
        self,
        lang: torch.Tensor,
        lang_mask: Optional[torch.Tensor],
        feats: torch.Tensor,
        boxes: torch.Tensor,
        visn_mask: Optional[torch.Tensor],
        img_delta: Optional[torch.Tensor] = None,
        visual_output: bool = True,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        visn = self.visn_fc(feats, boxes, delta=img_delta)
        for layer in self.layer:
            lang = layer(lang, lang_mask)
        for layer in self.r_layers:
            visn = layer(visn, visn_mask)
        last = len(self.x_layers) - 1
        for index, layer in enumerate(self.x_layers):
            lang, visn = layer(lang, lang_mask, visn, visn_mask, visual_output=visual_output or index < last)
        return lang, visn


class LxmertPooler(TanhPooler):
    """``tanh(dense(lang[:, 0]))``: the pooled language [CLS]."""


# ----------------------------------------------------------------------------------------------
# Trunk
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LxmertOutput:
    """``language`` [B, Lt, H] and ``vision`` [B, Nb, H] (None unless ``visual_output``) after the
    last X-layer; ``pooled`` [B, H]."""

    language: torch.Tensor
    vision: Optional[torch.Tensor]
    pooled: torch.Tensor


class LxmertModel(nn.Module):
    """The LXMERT trunk (official ``LXRTModel``; ``bert.*`` / HF ``lxmert.*`` in checkpoints).

    ``visual_output=False`` (fine-tuning, the official mode ``'x'``): nothing reads the last
    X-layer's visual half, so it is not computed and its parameters (``VISUAL_HALF`` of the last
    X-layer: 16 tensors) are frozen, which keeps DDP / ZeRO working without
    ``find_unused_parameters``; they stay in the state dict, so checkpoints round-trip.
    Pre-training heads that read the visual stream need ``visual_output=True``.
    """

    def __init__(self, config: LxmertConfig, visual_output: bool = False):
        super().__init__()
        self.config = config
        self.visual_output = visual_output
        self.embeddings = LxmertEmbeddings(config)
        self.encoder = LxmertEncoder(config)
        self.pooler = LxmertPooler(config)
        self.apply(lambda module: init_lxmert_weights(module, config.initializer_range))
        if not visual_output:
            for name in self.unused_parameter_names():
                self.get_parameter(name).requires_grad_(False)

    def unused_parameter_names(self) -> List[str]:
        """Names (relative to this module) of the parameters no fine-tuning output depends on."""
        if self.visual_output:
            return []
        last = len(self.encoder.x_layers) - 1
        prefixes = tuple(f"encoder.x_layers.{last}.{part}." for part in LxmertXLayer.VISUAL_HALF)
        return [name for name, _ in self.named_parameters() if name.startswith(prefixes)]

    def forward(
        self,
        input_ids: torch.Tensor,
        text_mask: Optional[torch.Tensor],
        feats: torch.Tensor,
        boxes: torch.Tensor,
        visual_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        *,
        txt_delta: Optional[torch.Tensor] = None,
        img_delta: Optional[torch.Tensor] = None,
    ) -> LxmertOutput:
        """``input_ids`` [B, Lt]; ``text_mask`` [B, Lt] (1 = real token; None: all real);
        ``feats`` [B, Nb, visual_feat_dim]; ``boxes`` [B, Nb, 4] (x1, y1, x2, y2 divided by W, H);
        ``visual_mask`` [B, Nb] or None (the reference passes none: all regions attend)."""
        if boxes.size(-1) != self.config.visual_pos_dim:
            raise ValueError(
                f"LXMERT boxes must have {self.config.visual_pos_dim} columns (x1, y1, x2, y2 / W, H), "
                f"got shape {tuple(boxes.shape)}."
            )
        dtype = self.embeddings.word_embeddings.weight.dtype
        lang_mask, visn_mask = additive_mask(text_mask, dtype), additive_mask(visual_mask, dtype)
        lang = self.embeddings(input_ids, token_type_ids, delta=txt_delta)
        lang, visn = self.encoder(
            lang, lang_mask, feats, boxes, visn_mask, img_delta=img_delta, visual_output=self.visual_output
        )
        return LxmertOutput(language=lang, vision=visn, pooled=self.pooler(lang))


__all__ = [
    "LxmertModel",
    "LxmertOutput",
    "LxmertEmbeddings",
    "LxmertVisualFeatEncoder",
    "LxmertEncoder",
    "LxmertXLayer",
    "LxmertLayer",
    "LxmertPooler",
    "additive_mask",
    "init_lxmert_weights",
]
