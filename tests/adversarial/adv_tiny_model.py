"""A tiny vision-and-language model that accepts VILLA perturbations, for the adversarial tests.

Text: word embedding (+ δ_txt) + position embedding -> LayerNorm -> dropout.
Image: raw features (+ δ_img) -> Linear -> LayerNorm -> dropout.
Both -> one transformer encoder layer -> first token -> classifier.
It records every perturbation dict it is called with (``calls``) so tests can inspect the deltas.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from torch import nn

from villa_plugin.common.sample_list import SampleList
from villa_plugin.models.base_model import BaseModel

VOCAB, TXT_LEN, N_BOX, IMG_DIM, HIDDEN, N_CLASSES = 20, 5, 3, 6, 8, 3


class TinyVLModel(BaseModel):
    """``config``: dict with ``dropout`` (float), ``losses`` (MMF loss specs), ``kl_reduction``."""

    def __init__(self, config: Optional[Dict[str, Any]] = None):
        config = {"dropout": 0.0, "losses": ["logit_bce"], "kl_reduction": "mean_times_classes", **(config or {})}
        super().__init__(config)
        self.kl_reduction = config["kl_reduction"]
        self.calls = []
        self.nan_grad_modality: Optional[str] = None  # inject a NaN gradient into this delta

    def build(self) -> None:
        p = self.config["dropout"]
        self.word_embeddings = nn.Embedding(VOCAB, HIDDEN, padding_idx=0)
        self.position_embeddings = nn.Embedding(TXT_LEN, HIDDEN)
        self.txt_layer_norm = nn.LayerNorm(HIDDEN)
        self.img_linear = nn.Linear(IMG_DIM, HIDDEN)
        self.img_layer_norm = nn.LayerNorm(HIDDEN)
        self.dropout = nn.Dropout(p)
        self.encoder = nn.TransformerEncoderLayer(HIDDEN, 2, 16, dropout=p, batch_first=True)
        self.classifier = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Dropout(p), nn.Linear(HIDDEN, N_CLASSES))

    def forward(self, batch, perturbation: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        self.calls.append(perturbation)
        perturbation = perturbation or {}
        words = self.word_embeddings(batch["input_ids"])
        txt_delta, img_delta = perturbation.get("text"), perturbation.get("image")
        if txt_delta is not None:
            words = words + self._maybe_poison(txt_delta, "text")
        positions = self.position_embeddings(torch.arange(words.size(1), device=words.device))
        txt = self.dropout(self.txt_layer_norm(words + positions))
        feat = batch["img_feat"]
        if img_delta is not None:
            feat = feat + self._maybe_poison(img_delta, "image")
        img = self.dropout(self.img_layer_norm(self.img_linear(feat)))
        hidden = self.encoder(torch.cat([txt, img], dim=1))
        return {"scores": self.classifier(hidden[:, 0])}

    def _maybe_poison(self, delta: torch.Tensor, modality: str) -> torch.Tensor:
        if self.nan_grad_modality == modality and delta.requires_grad:
            delta.register_hook(lambda g: torch.full_like(g, math.nan))
        return delta

    def perturbation_shapes(self, batch) -> Dict[str, tuple]:
        bsz, txt_len = batch["input_ids"].shape
        return {"text": (bsz, txt_len, HIDDEN), "image": tuple(batch["img_feat"].shape)}

    def perturbation_masks(self, batch) -> Dict[str, Optional[torch.Tensor]]:
        return {"text": batch["input_ids"] != 0, "image": None}


def make_model(dropout: float = 0.0, seed: int = 0, **config: Any) -> TinyVLModel:
    torch.manual_seed(seed)
    model = TinyVLModel({"dropout": dropout, **config})
    model.build()
    model.init_losses()
    model.train()
    return model


def make_batch(batch_size: int = 4, seed: int = 1) -> SampleList:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch_size, TXT_LEN), generator=g)
    ids[0, -2:] = 0  # padding in one row
    targets = torch.rand(batch_size, N_CLASSES, generator=g)
    return SampleList(
        input_ids=ids,
        img_feat=torch.randn(batch_size, N_BOX, IMG_DIM, generator=g),
        targets=targets,
        dataset_name="tiny",
        dataset_type="train",
    )
