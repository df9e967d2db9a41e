"""LXMERT trunk + one task head, registered as model ``lxmert``; trainable by VILLA (``Perturbable``).

Model config (``model_config.lxmert``, see ``configs/models/lxmert/defaults.yaml``):

- ``architecture``: overrides of :class:`LxmertConfig` (``null`` keeps the default), e.g. a tiny
  ``{hidden_size: 32, num_attention_heads: 4, intermediate_size: 64, l_layers: 2, r_layers: 1, x_layers: 2}``;
- ``dropout``: p of every dropout in the trunk (``null`` keeps the architecture's values);
- ``head``: a registered LXMERT head (:class:`LxmertHead`: ``lxmert_vqa``, ``lxmert_gqa``,
  ``lxmert_nlvr2``) and ``num_labels`` (3129 VQA, 1842 GQA, 2 NLVR2);
- ``losses``: MMF loss specs (null: the head's official task loss, ``default_losses``);
- ``pretrained_checkpoint``: an official / HF / plugin file loaded in ``build()`` through
  :func:`load_lxmert_checkpoint` (its :class:`LoadReport` is ``self.load_report``);
  ``answer_surgery.{task_answers, pretrain_answers}``: with a pre-trained file, copy its 9,500-answer
  QA head into the task head (``--loadLXMERTQA``); both empty: the QA head is ignored (``--loadLXMERT``);
- ``adversarial``: read by the ``villa_free_at`` trainer (``adv_training: false`` = plain LXMERT).

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

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from villa_plugin.adversarial.protocol import split_perturbation
from villa_plugin.backbones.common import existing_checkpoint
from villa_plugin.backbones.lxmert import optimization  # noqa: F401  (registers bert_adam)
from villa_plugin.backbones.lxmert.answer_table import pretrain_answer_list
from villa_plugin.backbones.lxmert.config import LxmertConfig
from villa_plugin.backbones.lxmert.heads import LxmertHead
from villa_plugin.backbones.lxmert.keys import load_lxmert_checkpoint
from villa_plugin.backbones.lxmert.modeling import LxmertModel, init_lxmert_weights
from villa_plugin.common.errors import CheckpointError, ConfigError, DataError
from villa_plugin.common.input_spec import InputSpec, Size
from villa_plugin.config.paths import bundled_path
from villa_plugin.models.base_model import BaseModel
from villa_plugin.models.heads import build_head, get_head_class
from villa_plugin.models.trunk import TokenLayout, TrunkDims, TrunkOutput
from villa_plugin.optim import build_param_groups
from villa_plugin.registry import registry

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


@registry.register_model("lxmert")
class LxmertForTask(BaseModel):
    """``self.lxmert`` (:class:`LxmertModel`) + the head's ``self.logit_fc`` (the official head).

    After ``build()``: ``lxmert_config``, ``head`` (the :class:`LxmertHead`), ``kl_reduction`` (the
    head's VILLA KL convention), ``load_report`` (or None). State-dict keys: ``lxmert.<official
    suffix>`` and ``logit_fc.{0,2,3}.*`` (HF's names for the trunk; the official fine-tuned names for
    the head).
    """

    KEY = "model_config.lxmert"

    def __init__(self, config: Any):
        super().__init__(config)
        self.load_report = None

    @classmethod
    def config_path(cls) -> str:
        return bundled_path("configs/models/lxmert/defaults.yaml")

    def build(self) -> None:
        cfg = _plain(self.config)
        overrides = dict(cfg.get("architecture") or {})
        dropout = cfg.get("dropout", None)
        if dropout is not None:
            if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
                raise ConfigError(f"{self.KEY}.dropout must be a probability in [0, 1) or null, got {dropout!r}.")
            overrides.update(hidden_dropout_prob=float(dropout), attention_probs_dropout_prob=float(dropout))
        self.lxmert_config = LxmertConfig.from_dict(overrides, source=f"{self.KEY}.architecture")
        self.lxmert = LxmertModel(self.lxmert_config, visual_output=False)
        head_cls = lxmert_head_class(str(cfg.get("head", "lxmert_vqa")))
        head = build_head(head_cls, TrunkDims.of(self.lxmert_config), cfg.get("num_labels", 3129), cfg,
                          init_lxmert_weights)
        for child_name, child in head.named_children():  # logit_fc: the official key names
            self.add_module(child_name, child)
        object.__setattr__(self, "_head", head)  # a view for forward, not a submodule
        self.kl_reduction = head_cls.kl_reduction
        self._load_pretrained(cfg)

    @property
    def head(self) -> LxmertHead:
        return self.__dict__["_head"]

    def input_spec(self) -> InputSpec:
        """Word-embedding rows (``architecture.vocab_size``), ``num_labels`` for heads that score a
        dataset's labels, and the region-feature width (``architecture.visual_feat_dim``)."""
        labels = getattr(self.head, "label_width", None)
        return InputSpec(
            vocab_size=Size(self.lxmert.embeddings.word_embeddings.num_embeddings, f"{self.KEY}.architecture.vocab_size"),
            label_width=Size(labels, f"{self.KEY}.num_labels") if labels else None,
            feature_dim=Size(self.lxmert_config.visual_feat_dim, f"{self.KEY}.architecture.visual_feat_dim"),
        )

    def _load_pretrained(self, cfg: Dict[str, Any]) -> None:
        checkpoint = cfg.get("pretrained_checkpoint") or ""
        surgery = cfg.get("answer_surgery") or {}
        answer_files = {k: surgery.get(k) or "" for k in ("task_answers", "pretrain_answers")}
        if not checkpoint:
            if any(answer_files.values()):
                raise ConfigError(f"{self.KEY}.answer_surgery is set but {self.KEY}.pretrained_checkpoint is empty: "
                                  f"the surgery copies the pre-trained QA head. Set both, or clear answer_surgery.")
            return
        path = existing_checkpoint(f"{self.KEY}.pretrained_checkpoint", checkpoint)
        if any(answer_files.values()) and not all(answer_files.values()):
            raise ConfigError(f"{self.KEY}.answer_surgery needs both task_answers and pretrain_answers "
                              f"(got {answer_files}).")
        label2ans = pretrain = None
        if all(answer_files.values()):
            label2ans = read_answer_list(answer_files["task_answers"], f"{self.KEY}.answer_surgery.task_answers")
            pretrain = pretrain_answer_list(
                read_json(answer_files["pretrain_answers"], f"{self.KEY}.answer_surgery.pretrain_answers"))
        self.load_report = load_lxmert_checkpoint(self, path, label2ans=label2ans, pretrain_answers=pretrain)
        if label2ans is not None and not any("answer head copied" in note for note in self.load_report.notes):
            raise CheckpointError(
                f"{self.KEY}.answer_surgery is set but {checkpoint} ({self.load_report.layout} layout) has no "
                f"pre-training QA head (answer_head.logit_fc.* beside cls.* / obj_predict_head.*), so nothing was "
                f"copied. Clear answer_surgery for this file, or point pretrained_checkpoint at model_LXRT.pth."
            )

    def init_losses(self) -> None:
        from villa_plugin.losses import Losses

        specs = _plain(self.config).get("losses") or self.head.default_losses
        self.losses = Losses(specs)

    def get_optimizer_parameters(self, optimizer_config) -> list:
        """``villa_plugin.optim.build_param_groups`` (the official LXMERT runs: ``no_decay: []``, one group)."""
        if hasattr(optimizer_config, "get") and optimizer_config.get("params") is None and optimizer_config.get("optimizer"):
            optimizer_config = optimizer_config.get("optimizer")  # the full config was passed
        return build_param_groups(self, optimizer_config)

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
        """``{"scores": logits [examples, num_labels]}`` (losses are added by ``BaseModel.__call__``). A
        perturbed forward adds ``perturbed_input_norms``: the row L2 norms ``[R]`` of the inputs δ is
        added to (word embeddings, raw region features), as UNITER's."""
        txt_delta, img_delta = split_perturbation(self, batch, perturbation)
        output = self.lxmert(
            batch["input_ids"],
            self.text_mask(batch),
            batch["img_feat"],
            self.boxes(batch),
            self.visual_mask(batch),
            txt_delta=txt_delta,
            img_delta=img_delta,
        )
        layout = TokenLayout(attn_masks=self.text_mask(batch).long(), text_width=int(batch["input_ids"].size(1)),
                             image_width=0, packed=False)
        result = {"scores": self.head(TrunkOutput(output.language, output.pooled, layout), batch)}
        if txt_delta is not None or img_delta is not None:
            result["perturbed_input_norms"] = {
                "text": self.lxmert.embeddings.perturbed_input_norm if txt_delta is not None else None,
                "image": batch["img_feat"].detach().float().flatten(1).norm(dim=1) if img_delta is not None else None,
            }
        return result


def lxmert_head_class(name: str) -> type:
    """The registered head ``name``; it must be an :class:`LxmertHead` (UNITER's heads read UNITER's
    joint sequence, type rows or re-encode rows, which the LXMERT trunk does not provide)."""
    head_cls = get_head_class(name)
    if not issubclass(head_cls, LxmertHead):
        lxmert_heads = [n for n in registry.names("head") if issubclass(registry.get_head_class(n), LxmertHead)]
        raise ConfigError(f'model_config.lxmert.head = "{name}" is a head for UNITER\'s joint sequence, not an LXMERT '
                          f"head (pooled language [CLS]); use one of {lxmert_heads}.")
    return head_cls


def read_json(path: str, key: str) -> Any:
    """A JSON file named by config ``key``; DataError naming both when it is missing or malformed."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as err:
        raise DataError(f"{key} = {path}: cannot read it as JSON ({err}).") from err


def read_answer_list(path: str, key: str) -> List[str]:
    """Task answers by label: a JSON list (``label2ans``) or dict ``{answer: label}`` (``ans2label``)."""
    data = read_json(path, key)
    if isinstance(data, list):
        return [str(a) for a in data]
    if isinstance(data, dict) and sorted(data.values()) == list(range(len(data))):
        return [a for a, _ in sorted(data.items(), key=lambda item: item[1])]
    raise DataError(f"{key} = {path}: expected a list of answers or an {{answer: label}} dict with labels 0..n-1.")


def build_lxmert_for_task(config: Dict[str, Any]) -> LxmertForTask:
    """``LxmertForTask(config)`` built and with its losses initialised."""
    model = LxmertForTask(config)
    model.build()
    model.init_losses()
    return model


__all__ = ["LxmertForTask", "build_lxmert_for_task", "lxmert_head_class", "read_answer_list"]
