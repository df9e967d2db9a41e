"""LXMERT trunk + one task head, trainable by VILLA (implements the ``Perturbable`` contract).

Model config (a mapping; ``model_config.lxmert`` once the model is registered):

- ``architecture``: overrides of :class:`LxmertConfig` (``null`` keeps the default), e.g. a tiny
  ``{hidden_size: 32, num_attention_heads: 4, intermediate_size: 64, l_layers: 2, r_layers: 1, x_layers: 2}``;
- ``dropout``: p of every dropout in the trunk (``null`` keeps the architecture's values);
- ``head``: ``vqa`` | ``gqa`` | ``nlvr2`` and ``num_labels`` (3129 VQA, 1842 GQA, 2 NLVR2);
- ``losses``: MMF loss specs (default: the head's official task loss).

Batch keys: ``input_ids`` [R, Lt] (0 = [PAD]); optional ``input_mask`` [R, Lt] (default
``input_ids != 0``); ``img_feat`` [R, Nb, D]; ``img_pos_feat`` [R, Nb, 4] (x1/W, y1/H, x2/W, y2/H)
or UNITER's 6/7-column ``norm_bb`` layout, whose first four columns are exactly these; optional
``num_bbs`` (a visual mask is built only when some row has fewer than Nb regions; the reference
passes none); ``targets``. NLVR2 batches have two rows per example (left, right image).

Perturbations (lxmert.md §9.1): ``{"text": [R, Lt, H], "image": [R, Nb, D]}``, fp32, each optional;
text δ on the word embeddings before position/type + LayerNorm, image δ on the raw features before
``visn_fc``. NLVR2 has one δ per row: the two copies of a sentence are perturbed independently, as in
the official port.

Official bug not copied: LXMERT-AdvTrain's text-only branch (``adv_modality == ["text"]``)
references the undefined ``img_embeds_init`` and raises NameError; the released runs are text-only
only because the shell passes the *string* ``"[text]"``, which takes the "both" branch where the
image δ is created but never added (lxmert.md §9.5-9.6). Here ``[text]``, ``[image]`` and both are
plain modality sets handled by the engine: text-only perturbs the text and nothing else.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from villa_plugin.backbones.lxmert.config import LxmertConfig
from villa_plugin.backbones.lxmert.heads import LxmertHeadSpec, build_lxmert_head, get_lxmert_head
from villa_plugin.backbones.lxmert.modeling import LxmertModel
from villa_plugin.common.errors import ConfigError
from villa_plugin.models.base_model import BaseModel

PERTURBATION_KEYS = ("text", "image")
BOX_COLUMNS = 4
UNITER_BOX_COLUMNS = (6, 7)  # norm_bb (x1, y1, x2, y2, w, h) [+ area]


def _plain(config: Any) -> Dict[str, Any]:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(config):
            return OmegaConf.to_container(config, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(config or {})


class LxmertForTask(BaseModel):
    """``self.lxmert`` (:class:`LxmertModel`) + ``self.logit_fc`` (the official head).

    After ``build()``: ``lxmert_config``, ``head_spec``, ``kl_reduction`` (the head's VILLA KL
    convention). State-dict keys: ``lxmert.<official suffix>`` and ``logit_fc.{0,2,3}.*`` (HF's
    names for the trunk; the official fine-tuned names for the head).
    """

    def build(self) -> None:
        cfg = _plain(self.config)
        overrides = dict(cfg.get("architecture") or {})
        dropout = cfg.get("dropout", None)
        if dropout is not None:
            if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
                raise ConfigError(f"LXMERT dropout must be a probability in [0, 1) or null, got {dropout!r}.")
            overrides.update(hidden_dropout_prob=float(dropout), attention_probs_dropout_prob=float(dropout))
        self.lxmert_config = LxmertConfig.from_dict(overrides, source="LXMERT architecture")
        self.head_spec: LxmertHeadSpec = get_lxmert_head(str(cfg.get("head", "vqa")))
        self.lxmert = LxmertModel(self.lxmert_config, visual_output=False)
        self.logit_fc = build_lxmert_head(self.head_spec, self.lxmert_config, cfg.get("num_labels", 3129))
        self.kl_reduction = self.head_spec.kl_reduction

    def init_losses(self) -> None:
        from villa_plugin.losses import Losses

        specs = _plain(self.config).get("losses") or self.head_spec.losses
        self.losses = Losses(specs)

    # -- inputs ---------------------------------------------------------------------------
    @staticmethod
    def text_mask(batch) -> torch.Tensor:
        """``[R, Lt]`` bool, True on real tokens (``input_mask`` if given, else ``input_ids != 0``)."""
        mask = batch.get("input_mask") if hasattr(batch, "get") else None
        return (batch["input_ids"] != 0) if mask is None else mask.bool()

    @staticmethod
    def visual_mask(batch) -> Optional[torch.Tensor]:
        """``[R, Nb]`` bool from ``num_bbs`` when some row is padded, else None (all regions attend)."""
        num_bbs = batch.get("num_bbs") if hasattr(batch, "get") else None
        feats = batch["img_feat"]
        if num_bbs is None:
            return None
        counts = [int(n) for n in num_bbs]  # a host list: deciding needs no device sync
        if len(counts) != feats.size(0):
            raise ValueError(f"num_bbs has {len(counts)} entries for {feats.size(0)} rows of img_feat.")
        if all(n == feats.size(1) for n in counts):
            return None
        counts_t = torch.as_tensor(counts, device=feats.device)
        return torch.arange(feats.size(1), device=feats.device).unsqueeze(0) < counts_t.unsqueeze(1)

    @staticmethod
    def boxes(batch) -> torch.Tensor:
        """``[R, Nb, 4]``: ``img_pos_feat`` itself, or the first four columns of UNITER's layout."""
        boxes = batch["img_pos_feat"]
        if boxes.size(-1) in UNITER_BOX_COLUMNS:
            return boxes[..., :BOX_COLUMNS]
        if boxes.size(-1) != BOX_COLUMNS:
            raise ValueError(
                f"img_pos_feat must have 4 columns (x1/W, y1/H, x2/W, y2/H) or UNITER's 6/7, got shape {tuple(boxes.shape)}."
            )
        return boxes

    # -- Perturbable --------------------------------------------------------------------------
    def perturbation_shapes(self, batch) -> Dict[str, Tuple[int, ...]]:
        """``{"text": (R, Lt, H), "image": (R, Nb, D)}`` for this batch."""
        ids, feats = batch["input_ids"], batch["img_feat"]
        return {
            "text": (int(ids.size(0)), int(ids.size(1)), self.lxmert_config.hidden_size),
            "image": tuple(int(d) for d in feats.shape),
        }

    def perturbation_masks(self, batch) -> Dict[str, Optional[torch.Tensor]]:
        """``{"text": [R, Lt] bool, "image": [R, Nb] bool or None}``, True = a real token / region."""
        return {"text": self.text_mask(batch), "image": self.visual_mask(batch)}

    def forward(self, batch, perturbation: Optional[Dict[str, Optional[torch.Tensor]]] = None) -> Dict[str, Any]:
        """``{"scores": logits [examples, num_labels]}`` (losses are added by ``BaseModel.__call__``)."""
        txt_delta, img_delta = self._split_perturbation(batch, perturbation)
        output = self.lxmert(
            batch["input_ids"],
            self.text_mask(batch),
            batch["img_feat"],
            self.boxes(batch),
            self.visual_mask(batch),
            txt_delta=txt_delta,
            img_delta=img_delta,
        )
        return {"scores": self.logit_fc(output.pooled)}

    def _split_perturbation(self, batch, perturbation):
        if perturbation is None:
            return None, None
        if not isinstance(perturbation, dict) or set(perturbation) - set(PERTURBATION_KEYS):
            keys = list(perturbation) if isinstance(perturbation, dict) else type(perturbation).__name__
            raise ValueError(f"perturbation must be None or a dict with keys in {PERTURBATION_KEYS}, got {keys}")
        shapes = self.perturbation_shapes(batch)
        for key in PERTURBATION_KEYS:
            delta = perturbation.get(key)
            if delta is not None and tuple(delta.shape) != shapes[key]:
                raise ValueError(f"perturbation['{key}'] has shape {tuple(delta.shape)}, expected {shapes[key]}")
        return perturbation.get("text"), perturbation.get("image")


def build_lxmert_for_task(config: Dict[str, Any]) -> LxmertForTask:
    """``LxmertForTask(config)`` built and with its losses initialised."""
    model = LxmertForTask(config)
    model.build()
    model.init_losses()
    return model


__all__ = ["LxmertForTask", "build_lxmert_for_task"]
