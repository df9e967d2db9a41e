"""Registered models ``uniter`` (plain fine-tuning) and ``villa`` (adversarial): UNITER trunk + a task head.

Both are the same class; ``villa`` differs only by its defaults (``adversarial.adv_training: true``
with the official VQA-base values), so ``model=uniter`` on a VILLA experiment is the plain baseline.

Model config (``model_config.<name>``, see ``configs/models/<name>/defaults.yaml``):

- ``uniter_config``: ``base`` | ``large`` (the bundled official JSONs) | a path to a UNITER JSON;
- ``architecture``: overrides of that JSON (``null`` keeps its value), e.g. a tiny
  ``{hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64}``;
- ``dropout``: p of every dropout in the trunk (the reference's ``set_dropout``; ``null`` keeps the
  JSON's ``hidden_dropout_prob`` / ``attention_probs_dropout_prob``); it wins over ``architecture``;
- ``head`` (a registered head, ``vqa`` by default; see :mod:`villa_plugin.models.heads`) and
  ``num_labels`` (3129 for VQA);
- ``img_dim``: the width of the region features (2048 for BUTD features and the released
  checkpoints; another width builds ``img_linear`` for it, trained from scratch);
- ``pretrained_checkpoint``: official ``.pt`` / MMF / ``.safetensors`` file loaded in ``build()``;
- ``losses``; ``adversarial`` (read by the ``villa_free_at`` trainer, not by the model).

Embedding growth (NLVR2, VCR; uniter-architecture.md §3, §5): a head class may declare an
:class:`EmbeddingGrowth` (more type-embedding rows, extra vocabulary rows). ``build()`` decides the
order from the checkpoint's shapes: a pretrained ``uniter-*`` / ``villa-*`` file (2 type rows,
28996 words) loads *before* the growth; a fine-tuned or 2nd-stage file that already has the grown
shapes loads *after* it (as does a file without embeddings, e.g. head weights only).

The head: its children are registered on the model under their own names, so its state-dict keys
are the official top-level ones (``vqa_output.*``, ``attn1.*``, ``rank_output.*``); ``model.head``
is the head object. Its forward receives a :class:`TrunkOutput` (sequence, pooled, layout and an
encoder for heads that score rows of their own), never the trunk module.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch

from villa_plugin.adversarial.protocol import split_perturbation
from villa_plugin.backbones.common import existing_checkpoint
from villa_plugin.common.errors import CheckpointError, ConfigError
from villa_plugin.common.input_spec import InputSpec, Size
from villa_plugin.config.paths import bundled_path
from villa_plugin.models.base_model import BaseModel
from villa_plugin.backbones.uniter.checkpoint_keys import (
    LoadReport,
    load_uniter_checkpoint,
    normalize_state_dict,
    read_checkpoint_file,
    unwrap_state_dict,
)
from villa_plugin.models.heads import TaskHead, build_head, get_head_class
from villa_plugin.models.trunk import EmbeddingGrowth, TokenLayout, TrunkDims, TrunkOutput, eval_mode
from villa_plugin.backbones.uniter.model import (
    IMG_DIM,
    UniterConfig,
    UniterModel,
    grow_type_embeddings,
    grow_word_embeddings,
    init_uniter_weights,
)
from villa_plugin.backbones.uniter.perturbation import uniter_perturbation_masks
from villa_plugin.optim import build_param_groups
from villa_plugin.registry import registry

TYPE_KEY = "uniter.embeddings.token_type_embeddings.weight"
WORD_KEY = "uniter.embeddings.word_embeddings.weight"


def apply_embedding_growth(model: torch.nn.Module, growth: EmbeddingGrowth) -> None:
    """Grow ``model.uniter``'s embeddings; a type table that already has ``type_rows`` rows is kept."""
    trunk = model.uniter
    if growth.type_rows and trunk.embeddings.token_type_embeddings.num_embeddings < growth.type_rows:
        grow_type_embeddings(model, growth.type_rows, growth.type_copy_from)
    if growth.extra_words:
        grow_word_embeddings(model, growth.extra_words)


def _plain(config: Any) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(config):
        return OmegaConf.to_container(config, resolve=True)
    return dict(config or {})


def trunk_config(cfg: Mapping[str, Any], key: str) -> UniterConfig:
    """The :class:`UniterConfig` of a model config's ``uniter_config`` + ``architecture`` + ``dropout``
    (``key`` names the block in errors)."""
    overrides = dict(cfg.get("architecture") or {})
    dropout = cfg.get("dropout", 0.1)
    if dropout is not None:
        if not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"{key}.dropout must be a probability in [0, 1) or null, got {dropout!r}.")
        overrides.update(hidden_dropout_prob=float(dropout), attention_probs_dropout_prob=float(dropout))
    try:
        return UniterConfig.from_name(str(cfg.get("uniter_config", "base")), overrides)
    except ConfigError as err:
        raise ConfigError(f"{key}.uniter_config / {key}.architecture: {err}") from err


@registry.register_model("uniter")
class UNITER(BaseModel):
    """UNITER trunk (``self.uniter``) plus one task head (``self.<head.module_name>``, e.g. ``vqa_output``).

    After ``build()``: ``kl_reduction`` (the head's KL convention for VILLA), ``head_module_name``,
    ``uniter_config`` (:class:`UniterConfig`) and ``load_report`` (a :class:`LoadReport` or None).
    """

    model_name = "uniter"

    def __init__(self, config: Any):
        super().__init__(config)
        self.load_report: Optional[LoadReport] = None

    @classmethod
    def config_path(cls) -> str:
        return bundled_path(f"configs/models/{cls.model_name}/defaults.yaml")

    def _key(self, key: str) -> str:
        return f"model_config.{self.model_name}.{key}"

    def build(self) -> None:
        cfg = _plain(self.config)
        self.uniter_config = trunk_config(cfg, f"model_config.{self.model_name}")
        self.img_dim = cfg.get("img_dim", IMG_DIM)
        if isinstance(self.img_dim, bool) or not isinstance(self.img_dim, int) or self.img_dim < 1:
            raise ConfigError(f"{self._key('img_dim')} must be a positive integer (the region feature width), "
                              f"got {self.img_dim!r}.")
        self.uniter = UniterModel(self.uniter_config, self.img_dim)
        # mask_embedding serves pretraining (masked region modelling) only: freeze it so DDP/ZeRO do
        # not wait for a gradient that fine-tuning never produces (HF AdamW skips it either way).
        self.uniter.img_embeddings.mask_embedding.weight.requires_grad_(False)

        self.head_name = str(cfg.get("head", "vqa"))
        head_cls = get_head_class(self.head_name)
        if not head_cls.uses_pooler:  # same reason as mask_embedding above
            self.uniter.pooler.requires_grad_(False)
        num_labels = cfg.get("num_labels", 3129)
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ConfigError(f"{self._key('num_labels')} must be a positive integer, got {num_labels!r}.")
        head = build_head(head_cls, TrunkDims.of(self.uniter_config), num_labels, cfg, init_uniter_weights)
        for child_name, child in head.named_children():  # official top-level key names
            self.add_module(child_name, child)
        object.__setattr__(self, "_head", head)  # a view for forward, not a submodule
        self.head_module_name = head_cls.module_name
        self.kl_reduction = head_cls.kl_reduction
        self.embedding_growth: Optional[EmbeddingGrowth] = head_cls.embedding_growth

        checkpoint = cfg.get("pretrained_checkpoint") or ""
        if not checkpoint:
            if self.embedding_growth is not None:
                apply_embedding_growth(self, self.embedding_growth)
            return
        path = existing_checkpoint(self._key("pretrained_checkpoint"), checkpoint)
        if self.embedding_growth is None:
            self.load_report = load_uniter_checkpoint(self, path, head_module=self.head_module_name)
            return
        state = unwrap_state_dict(read_checkpoint_file(path), path)
        if self._checkpoint_is_grown(state, path):
            apply_embedding_growth(self, self.embedding_growth)
            self.load_report = load_uniter_checkpoint(self, state, head_module=self.head_module_name, source=path)
        else:
            self.load_report = load_uniter_checkpoint(self, state, head_module=self.head_module_name, source=path)
            apply_embedding_growth(self, self.embedding_growth)
            self.load_report.notes.append(
                f"embeddings grown after loading (pretrained checkpoint): {self.embedding_growth}"
            )

    def _checkpoint_is_grown(self, state: Mapping[str, Any], source: str) -> bool:
        """True when ``state`` already has the grown embedding shapes (fine-tuned / 2nd-stage files)
        or no embeddings at all; False for a pretrained file (the trunk's current shapes)."""
        growth = self.embedding_growth
        renamed, _ = normalize_state_dict(state, self.state_dict().keys(), head_module=self.head_module_name)
        embeddings = self.uniter.embeddings
        checks = []
        if growth.type_rows and TYPE_KEY in renamed:
            checks.append(("token_type_embeddings rows", int(renamed[TYPE_KEY].shape[0]),
                           embeddings.token_type_embeddings.num_embeddings, growth.type_rows))
        if growth.extra_words and WORD_KEY in renamed:
            vocab = embeddings.word_embeddings.num_embeddings
            checks.append(("word_embeddings rows", int(renamed[WORD_KEY].shape[0]), vocab, vocab + growth.extra_words))
        verdicts = set()
        for what, found, before, after in checks:
            if found == after:
                verdicts.add(True)
            elif found == before:
                verdicts.add(False)
            else:
                raise CheckpointError(
                    f"Checkpoint {source}: {what} = {found}, but head \"{self.head_name}\" expects {before} "
                    f"(a pretrained uniter-*/villa-* file, loaded before the embedding growth) or {after} (a "
                    f"fine-tuned / 2nd-stage file, loaded after it). Check {self._key('uniter_config')} and "
                    f"{self._key('architecture')} (vocab_size / type_vocab_size give the pre-growth sizes)."
                )
        if len(verdicts) > 1:
            raise CheckpointError(
                f"Checkpoint {source} mixes grown and pretrained embedding shapes ({checks}); it fits neither "
                f"loading order of head \"{self.head_name}\"."
            )
        return verdicts != {False}

    def input_spec(self) -> InputSpec:
        """Word-embedding rows before any head growth (``architecture.vocab_size``), ``num_labels``
        (the scores' width for heads that score labels) and ``img_dim``."""
        words = self.uniter.embeddings.word_embeddings.num_embeddings
        grown = self.embedding_growth.extra_words if self.embedding_growth is not None else 0
        labels = getattr(self.head, "label_width", None)
        return InputSpec(
            vocab_size=Size(words - grown, self._key("architecture.vocab_size")),
            label_width=Size(labels, self._key("num_labels")) if labels else None,
            feature_dim=Size(self.img_dim, self._key("img_dim")),
        )

    @property
    def head(self) -> TaskHead:
        return self.__dict__["_head"]

    # -- forward --------------------------------------------------------------------------
    def forward(self, sample_list, perturbation: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """``{"scores": logits [B, num_labels]}``; ``perturbation`` = ``{"text": [B, Lt, H], "image": [B, Nb, img_dim]}``
        (either may be None or absent). A perturbed forward adds ``perturbed_input_norms``: the row
        L2 norms ``[B]`` of the inputs δ is added to (word embeddings, raw region features)."""
        txt_delta, img_delta = split_perturbation(self, sample_list, perturbation)
        sequence_output = self.uniter(
            sample_list["input_ids"],
            sample_list.get("position_ids"),
            sample_list["img_feat"],
            sample_list["img_pos_feat"],
            sample_list["attn_masks"],
            sample_list.get("gather_index"),
            output_all_encoded_layers=False,
            txt_type_ids=sample_list.get("txt_type_ids"),
            img_type_ids=sample_list.get("img_type_ids"),
            txt_delta=txt_delta,
            img_delta=img_delta,
        )
        pooled = self.uniter.pooler(sequence_output) if self.head.uses_pooler else None
        trunk = TrunkOutput(sequence_output, pooled, uniter_layout(sample_list), UniterEncoder(self.uniter))
        output = {"scores": self.head(trunk, sample_list)}
        if txt_delta is not None or img_delta is not None:
            output["perturbed_input_norms"] = {
                "text": self.uniter.embeddings.perturbed_input_norm if txt_delta is not None else None,
                "image": sample_list["img_feat"].detach().float().flatten(1).norm(dim=1) if img_delta is not None else None,
            }
        return output

    def perturbation_shapes(self, sample_list) -> Dict[str, tuple]:
        """``{"text": (B, Lt, H), "image": (B, Nb, img_dim)}`` for this batch."""
        input_ids, img_feat = sample_list["input_ids"], sample_list["img_feat"]
        return {
            "text": (int(input_ids.size(0)), int(input_ids.size(1)), self.uniter_config.hidden_size),
            "image": (int(img_feat.size(0)), int(img_feat.size(1)), int(img_feat.size(2))),
        }

    def perturbation_masks(self, sample_list) -> Dict[str, Optional[torch.Tensor]]:
        """Real text tokens / image regions (``[B, L]`` bool) for VILLA's random start."""
        return uniter_perturbation_masks(sample_list)

    # -- optimizer ------------------------------------------------------------------------
    def get_optimizer_parameters(self, optimizer_config) -> list:
        """The reference's groups: [head decay, head no-decay, rest decay, rest no-decay] when
        ``optimizer.lr_multipliers`` names the head (e.g. ``{vqa_output: 10}``); see ``villa_plugin.optim``."""
        full_config = hasattr(optimizer_config, "get") and optimizer_config.get("params") is None
        if full_config and optimizer_config.get("optimizer"):
            optimizer_config = optimizer_config.get("optimizer")  # the full config was passed
        return build_param_groups(self, optimizer_config)


def uniter_layout(batch: Mapping[str, Any]) -> TokenLayout:
    """Where text and regions sit in UNITER's sequence output for ``batch`` (UNITER field names)."""
    return TokenLayout(
        attn_masks=batch["attn_masks"], text_width=int(batch["input_ids"].size(1)),
        image_width=int(batch["img_feat"].size(1)), packed=batch.get("gather_index") is not None,
        txt_lens=batch.get("txt_lens"), num_bbs=batch.get("num_bbs"),
    )


class UniterEncoder:
    """The :class:`~villa_plugin.models.trunk.TrunkEncoder` of a UNITER trunk (for heads that score
    rows of their own, e.g. retrieval's hard negatives)."""

    def __init__(self, uniter: UniterModel):
        self._uniter = uniter

    def encode(self, rows: Mapping[str, torch.Tensor]) -> TrunkOutput:
        sequence = self._uniter(rows["input_ids"], rows["position_ids"], rows["img_feat"], rows["img_pos_feat"],
                                rows["attn_masks"], rows.get("gather_index"), output_all_encoded_layers=False)
        return TrunkOutput(sequence, self._uniter.pooler(sequence), uniter_layout(rows), self)

    def evaluating(self):
        return eval_mode(self._uniter)

    def version(self) -> int:
        return int(self._uniter.pooler.dense.weight._version)


@registry.register_model("villa")
class VILLA(UNITER):
    """UNITER with VILLA's adversarial defaults (``configs/models/villa/defaults.yaml``)."""

    model_name = "villa"


__all__ = ["UNITER", "VILLA", "EmbeddingGrowth", "UniterEncoder", "apply_embedding_growth", "uniter_layout"]
