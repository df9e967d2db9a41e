"""UNITER's pre-training heads (uniter-pretraining.md §2), with the official module names and ties.

- ``cls`` (:class:`MLMHead`): transform (Linear, erf-GELU, LayerNorm 1e-12), then a bias-free decoder
  whose weight **is** the word-embedding table, plus its own ``predictions.bias`` [V];
- ``feat_regress`` (:class:`RegionFeatureRegression`): Linear, GELU, LayerNorm, then
  ``F.linear(h, weight.t(), bias)`` where ``weight`` **is** ``img_linear.weight`` [H, 2048];
- ``region_classifier`` (:class:`RegionClassification`): Linear, GELU, LayerNorm, Linear(H, 1601);
- ``itm_output``: Linear(H, 2) on the trunk's pooler output (a plain ``nn.Linear``).

Ties are shared Parameters: ``state_dict()`` lists them under both names, ``named_parameters()``
once (under the trunk's name, because the trunk is registered first).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-12
IMG_LABEL_DIM = 1601  # background + 1600 Visual Genome classes


def _transform(hidden_size: int) -> nn.Sequential:
    """Linear(H, H) -> erf-GELU -> LayerNorm: the shared first block of the MRFR / MRC heads."""
    return nn.Sequential(
        nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
    )


class MLMTransform(nn.Module):
    """``predictions.transform``: dense -> GELU -> LayerNorm (keys ``dense.*``, ``LayerNorm.*``)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(hidden)))


class MLMPredictions(nn.Module):
    """``cls.predictions``: ``decoder(transform(h)) + bias`` with the decoder tied to the word embeddings."""

    def __init__(self, word_embedding_weight: nn.Parameter):
        super().__init__()
        vocab_size, hidden_size = word_embedding_weight.shape
        self.transform = MLMTransform(hidden_size)
        self.decoder = nn.Linear(hidden_size, vocab_size, bias=False)
        self.decoder.weight = word_embedding_weight  # the same Parameter, not a copy
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden)) + self.bias


class MLMHead(nn.Module):
    """``cls`` (BERT's ``BertOnlyMLMHead``): scores ``[n, V]`` for the masked positions' states ``[n, H]``."""

    def __init__(self, word_embedding_weight: nn.Parameter):
        super().__init__()
        self.predictions = MLMPredictions(word_embedding_weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.predictions(hidden)


class RegionFeatureRegression(nn.Module):
    """``feat_regress``: ``F.linear(net(h), weight.t(), bias)`` with ``weight`` tied to ``img_linear.weight``."""

    def __init__(self, hidden_size: int, img_linear_weight: nn.Parameter):
        super().__init__()
        self.net = _transform(hidden_size)
        self.weight = img_linear_weight  # [H, 2048], used transposed
        self.bias = nn.Parameter(torch.zeros(img_linear_weight.size(1)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.net(hidden), self.weight.t(), self.bias)


class RegionClassification(nn.Module):
    """``region_classifier``: Linear -> GELU -> LayerNorm -> Linear(H, label_dim) (keys ``net.0/2/3``)."""

    def __init__(self, hidden_size: int, label_dim: int = IMG_LABEL_DIM):
        super().__init__()
        self.net = nn.Sequential(*_transform(hidden_size), nn.Linear(hidden_size, label_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden)


__all__ = ["IMG_LABEL_DIM", "MLMHead", "RegionFeatureRegression", "RegionClassification"]
