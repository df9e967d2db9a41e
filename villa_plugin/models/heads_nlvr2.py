"""NLVR2 head ``nlvr2_paired_attn`` (UNITER's ``UniterForNlvr2PairedAttn``, the released configs' choice).

Each example is two rows, ``[text; left image]`` and ``[text; right image]`` (consecutive in the
batch), with image type ids 1 and 2 (``use_img_type``), so the shared type table grows to 3 rows
(row 2 := row 1). On the trunk's sequence output:

1. rows 2i / 2i+1 are the left / right sequences of example i;
2. ``attn1`` (left attends to right) and ``attn2`` (right to left) are ``MultiheadAttention(H,
   heads, dropout)`` with ``key_padding_mask = attn_masks == 0``;
3. ``fc`` = Seq(Linear(2H, H), ReLU, Dropout) on ``[cross-attention; self]`` (shared by both sides);
4. ``attn_pool``: softmax over ``fc.0``-scored tokens (Seq(Linear(H, 1), ReLU)), pads at -1e4,
   dropout on the weights;
5. ``nlvr2_output`` = Linear(2H, 2) on ``[pool_left; pool_right]``: logits ``[examples, 2]`` (True = 1).

The trunk pooler is not used (the model freezes it, see ``HeadSpec.uses_pooler``). The module is *flat*:
its children are registered on the model under their own names, so the state-dict keys are the
official ``attn1.in_proj_weight``, ``fc.0.weight``, ``attn_pool.fc.0.weight``, ``nlvr2_output.weight``.
Task loss: cross-entropy (mean); VILLA's KL reduction: ``kl.sum(1).mean()`` (``sum_classes_mean``).
"""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn

from villa_plugin.common.errors import ConfigError
from villa_plugin.models.heads import HeadSpec, register_head
from villa_plugin.backbones.uniter.model import UniterConfig, UniterModel

NLVR2_TYPE_ROWS = 3
NLVR2_TYPE_COPY = {2: 1}  # the right image's type row starts as the image type row


class AttentionPool(nn.Module):
    """Softmax attention pooling over tokens: ``Σ_t softmax(relu(w·h_t + b) + mask_t) h_t``."""

    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(hidden_size, 1), nn.ReLU())
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """``hidden [B, T, H]``, ``pad_mask [B, T]`` (True at pads) -> ``[B, H]``."""
        score = self.fc(hidden).squeeze(-1) + pad_mask.to(hidden.dtype) * -1e4
        weights = self.dropout(F.softmax(score, dim=1))
        return weights.unsqueeze(1).matmul(hidden).squeeze(1)


class Nlvr2PairedAttnHead(nn.Module):
    """Cross-attention between the two rows of each example, attention pooling, ``nlvr2_output``."""

    flat_state_dict_keys = True  # registered.py puts the children on the model (official key names)

    def __init__(self, config: UniterConfig, num_labels: int = 2):
        super().__init__()
        hidden = config.hidden_size
        self.attn1 = nn.MultiheadAttention(hidden, config.num_attention_heads, dropout=config.attention_probs_dropout_prob)
        self.attn2 = nn.MultiheadAttention(hidden, config.num_attention_heads, dropout=config.attention_probs_dropout_prob)
        self.fc = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Dropout(config.hidden_dropout_prob))
        self.attn_pool = AttentionPool(hidden, config.attention_probs_dropout_prob)
        self.nlvr2_output = nn.Linear(2 * hidden, num_labels)

    def forward(self, sequence_output: torch.Tensor, attn_masks: torch.Tensor) -> torch.Tensor:
        rows, length, hidden = sequence_output.shape
        if rows % 2:
            raise ValueError(
                f"nlvr2_paired_attn needs two rows per example (left, right image), got {rows} rows; "
                f"use the nlvr2 builder's batches."
            )
        left, right = sequence_output.contiguous().view(rows // 2, 2 * length, hidden).chunk(2, dim=1)
        pad = (attn_masks == 0).contiguous().view(rows // 2, 2 * length)
        left_pad, right_pad = pad.chunk(2, dim=1)
        left_t, right_t = left.transpose(0, 1), right.transpose(0, 1)  # [T, B, H] for MultiheadAttention
        l2r, _ = self.attn1(left_t, right_t, right_t, key_padding_mask=right_pad, need_weights=False)
        r2l, _ = self.attn2(right_t, left_t, left_t, key_padding_mask=left_pad, need_weights=False)
        left = self.fc(torch.cat([l2r, left_t], dim=-1)).transpose(0, 1)
        right = self.fc(torch.cat([r2l, right_t], dim=-1)).transpose(0, 1)
        pooled = torch.cat([self.attn_pool(left, left_pad), self.attn_pool(right, right_pad)], dim=-1)
        return self.nlvr2_output(pooled)


def build_nlvr2_paired_attn(config: UniterConfig, num_labels: int, head_config: Dict[str, Any]) -> nn.Module:
    if num_labels != 2:
        raise ConfigError(f"The nlvr2_paired_attn head predicts True/False: set num_labels: 2 (got {num_labels}).")
    return Nlvr2PairedAttnHead(config, num_labels)


def nlvr2_head_forward(head: nn.Module, uniter: UniterModel, sequence_output: torch.Tensor, batch: Any) -> torch.Tensor:
    """Logits ``[examples, 2]`` from the trunk output of ``2 × examples`` rows (no pooler)."""
    return head(sequence_output, batch["attn_masks"])


NLVR2_HEAD = register_head(
    HeadSpec(
        name="nlvr2_paired_attn",
        module_name="nlvr2_paired_attn",
        build=build_nlvr2_paired_attn,
        kl_reduction="sum_classes_mean",
        forward=nlvr2_head_forward,
        uses_pooler=False,
    )
)

__all__ = ["AttentionPool", "Nlvr2PairedAttnHead", "NLVR2_HEAD", "NLVR2_TYPE_ROWS", "NLVR2_TYPE_COPY"]
