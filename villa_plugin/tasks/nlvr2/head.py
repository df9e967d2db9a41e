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

The trunk pooler is not used (``uses_pooler = False``: the model freezes it). The head's children are
registered on the model under their own names, so the state-dict keys are the official
``attn1.in_proj_weight``, ``fc.0.weight``, ``attn_pool.fc.0.weight``, ``nlvr2_output.weight``.
Task loss: cross-entropy (mean); VILLA's KL reduction: ``kl.sum(1).mean()`` (``sum_classes_mean``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from villa_plugin.common.errors import ConfigError
from villa_plugin.models.heads import TaskHead
from villa_plugin.models.trunk import EmbeddingGrowth, TrunkDims, TrunkOutput
from villa_plugin.registry import registry

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


@registry.register_head("nlvr2_paired_attn")
class Nlvr2PairedAttnHead(TaskHead):
    """Cross-attention between the two rows of each example, attention pooling, ``nlvr2_output``."""

    module_name = "nlvr2_paired_attn"
    kl_reduction = "sum_classes_mean"
    uses_pooler = False
    embedding_growth = EmbeddingGrowth(type_rows=NLVR2_TYPE_ROWS, type_copy_from=NLVR2_TYPE_COPY)

    def __init__(self, dims: TrunkDims, num_labels: int = 2, head_config: Optional[Dict[str, Any]] = None):
        super().__init__(dims, num_labels, head_config or {})
        if num_labels != 2:
            raise ConfigError(f"The nlvr2_paired_attn head predicts True/False: set num_labels: 2 (got {num_labels}).")
        hidden = dims.hidden_size
        self.attn1 = nn.MultiheadAttention(hidden, dims.num_attention_heads, dropout=dims.attention_probs_dropout_prob)
        self.attn2 = nn.MultiheadAttention(hidden, dims.num_attention_heads, dropout=dims.attention_probs_dropout_prob)
        self.fc = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Dropout(dims.hidden_dropout_prob))
        self.attn_pool = AttentionPool(hidden, dims.attention_probs_dropout_prob)
        self.nlvr2_output = nn.Linear(2 * hidden, num_labels)

    def forward(self, trunk: TrunkOutput, batch: Any) -> torch.Tensor:
        """Logits ``[examples, 2]`` from the trunk output of ``2 × examples`` rows (no pooler)."""
        return self.paired_logits(trunk.sequence, trunk.layout.attn_masks)

    def paired_logits(self, sequence_output: torch.Tensor, attn_masks: torch.Tensor) -> torch.Tensor:
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


__all__ = ["AttentionPool", "Nlvr2PairedAttnHead", "NLVR2_TYPE_ROWS", "NLVR2_TYPE_COPY"]
