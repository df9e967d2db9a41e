"""BERT's post-LN blocks, shared by the UNITER and LXMERT backbones: multi-head attention (``query`` /
``key`` / ``value`` Linear layers, eager softmax or PyTorch's sdpa), the residual output
``LN(x + dropout(dense(h)))`` and the erf-GeLU intermediate. The parameter names are the
checkpoints' (``attention.self.query.weight``, ``output.LayerNorm.bias`` and so on); a backbone's
modules subclass these or use them as they are."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn



# ----------------------------------------------------------------------------------------------
# fp32 islands: where a backbone adds VILLA's fp32 δ, the sum and the layers right after it run in
# (at least) fp32 whatever the parameter dtype, so bf16 storage does not round δ away.
# ----------------------------------------------------------------------------------------------
def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or kept as it is when wider (fp64 reference tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def autocast_off(device: torch.device):
    """A context that disables autocast on ``device`` (a no-op where autocast does not exist)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def linear_at_least_fp32(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` with ``x`` and the weights in at least fp32, autocast off: exactly
    ``linear(x)`` for fp32 weights and input."""
    x = at_least_fp32(x)
    bias = None if linear.bias is None else linear.bias.to(x.dtype)
    with autocast_off(x.device):
        return F.linear(x, linear.weight.to(x.dtype), bias)


def layer_norm_at_least_fp32(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` with ``x`` and the weights in at least fp32: exactly ``norm(x)`` for fp32 input and weights."""
    x = at_least_fp32(x)
    return F.layer_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)

class BertStyleAttention(nn.Module):
    """Attention of ``hidden`` (queries) over ``context`` (keys / values), output ``[B, Lq, H]``.

    ``config`` needs ``hidden_size``, ``num_attention_heads``, ``attention_probs_dropout_prob`` and
    ``attn_implementation`` (``eager`` | ``sdpa``).
    """

    def __init__(self, config: Any):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.attn_implementation = config.attn_implementation

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def attend(self, hidden: torch.Tensor, context: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """``attention_mask`` ``[B, 1, 1, S_context]``: additive (0 keep, -10000 drop), boolean (True
        keep; the sdpa path only) or None (every position attends)."""
        query = self._split_heads(self.query(hidden))
        key = self._split_heads(self.key(context))
        value = self._split_heads(self.value(context))
        if self.attn_implementation == "sdpa":
            if attention_mask is not None and attention_mask.dtype != torch.bool:
                attention_mask = attention_mask.to(query.dtype)
            # The Dropout module's p is read here so that changing it (set_dropout) takes effect.
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=self.dropout.p if self.training else 0.0
            )
        else:
            scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = self.dropout(F.softmax(scores, dim=-1))
            out = torch.matmul(probs.to(value.dtype), value)
        batch, _, length, _ = out.shape
        return out.transpose(1, 2).reshape(batch, length, self.num_attention_heads * self.attention_head_size)


class ResidualOutput(nn.Module):
    """``LN(x + dropout(dense(h)))``: BERT's ``SelfOutput`` (``in_size = hidden_size``) and ``Output``
    (``in_size = intermediate_size``). ``config``: ``hidden_size``, ``layer_norm_eps``, ``hidden_dropout_prob``."""

    def __init__(self, config: Any, in_size: int):
        super().__init__()
        self.dense = nn.Linear(in_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class GeluIntermediate(nn.Module):
    """``gelu(dense(h))`` with the exact (erf) GeLU, ``hidden_size`` -> ``intermediate_size``."""

    def __init__(self, config: Any):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden))


class TanhPooler(nn.Module):
    """``tanh(dense(h[:, 0]))``: BERT's pooler on the first position (``config``: ``hidden_size``)."""

    def __init__(self, config: Any):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))
