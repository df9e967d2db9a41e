"""LXMERT checkpoint key maps: official pre-trained, official fine-tuned and HF files -> our names.

Our names (``LxmertForTask``): ``lxmert.<suffix>`` for the trunk and ``logit_fc.{0,2,3}.*`` for the
head; a bare :class:`LxmertModel` has the suffixes alone. ``<suffix>`` is identical in every source
(lxmert.md §3):

| source | trunk keys | head keys |
|---|---|---|
| official pre-trained ``*_LXRT.pth`` | ``module.bert.<suffix>`` | ``module.answer_head.logit_fc.*`` (9,500 answers) + ``cls.*``, ``obj_predict_head.*`` |
| official fine-tuned ``BEST.pth`` | ``lxrt_encoder.model.[module.]bert.<suffix>`` | ``logit_fc.*`` |
| HF ``unc-nlp/lxmert-*`` | ``lxmert.<suffix>`` | ``answer_head.logit_fc.*`` (QA) / + ``cls.*``, ``obj_predict_head.*`` (pre-training) |

Every ``module`` path component (DataParallel) is dropped, as the official QA loader does. Files with
pre-training heads (``cls.*`` / ``obj_predict_head.*``) are *pre-trained*: those heads are ignored, and
their 9,500-answer ``answer_head`` is copied into the task head only when the task's and the
pre-training answer lists are given (``--loadLXMERTQA``'s surgery, answer_table.py), else ignored
(``--loadLXMERT``). Files are read safely (``torch.load(weights_only=True)`` or safetensors).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from villa_plugin.backbones.lxmert.answer_table import SOURCE_PREFIX as PRETRAIN_ANSWER_PREFIX
from villa_plugin.backbones.lxmert.answer_table import remap_answer_head
from villa_plugin.backbones.uniter.checkpoint_keys import LoadReport, _unwrap_model, load_mapped_checkpoint

TRUNK = "lxmert."
HEAD = "logit_fc."
TRUNK_PARTS = ("embeddings.", "encoder.", "pooler.")
TRUNK_PREFIXES = ("lxrt_encoder.model.bert.", "bert.", "lxmert.")  # official fine-tuned, official, HF
PRETRAIN_HEADS = ("cls.", "obj_predict_head.")
HF_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
LAYOUTS = ("plugin", "hf", "official_finetuned", "official_pretrained")
StateDict = Dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# File -> our names
# ----------------------------------------------------------------------------------------------
def drop_module(key: str) -> str:
    """``key`` without its ``module`` path components (``nn.DataParallel`` / DDP wrappers)."""
    return ".".join(part for part in key.split(".") if part != "module")


def detect_layout(keys: Iterable[str]) -> str:
    """``official_pretrained`` | ``official_finetuned`` | ``hf_pretrained`` | ``hf`` | ``plugin`` | ``bare``."""
    keys = [drop_module(k) for k in keys]
    pretraining = any(k.startswith(PRETRAIN_HEADS) for k in keys)
    if any(k.startswith("lxrt_encoder.model.bert.") for k in keys):
        return "official_finetuned"
    if any(k.startswith("bert.") for k in keys):
        return "official_pretrained" if pretraining else "official"
    if any(k.startswith("lxmert.") for k in keys):
        if pretraining:
            return "hf_pretrained"
        return "hf" if any(k.startswith(PRETRAIN_ANSWER_PREFIX) for k in keys) else "plugin"
    return "bare"


def canonical_key(key: str) -> Optional[str]:
    """Our name (``lxmert.*`` / ``logit_fc.*``) for a file key; None for a pre-training head key
    (``cls.*``, ``obj_predict_head.*``) or an HF buffer. Unknown keys come back unchanged."""
    key = drop_module(key)
    if key.startswith(PRETRAIN_HEADS):
        return None
    for prefix in TRUNK_PREFIXES:
        if key.startswith(prefix):
            key = TRUNK + key[len(prefix):]
            break
    else:
        if key.startswith(TRUNK_PARTS):
            key = TRUNK + key
    if key.startswith(PRETRAIN_ANSWER_PREFIX):
        return HEAD + key[len(PRETRAIN_ANSWER_PREFIX):]
    if key.startswith(TRUNK) and key[len(TRUNK):] in HF_BUFFERS:
        return None
    return key


def map_state_dict(
    state: Mapping[str, Any],
    model_keys: Iterable[str],
    *,
    label2ans: Optional[Sequence[str]] = None,
    pretrain_answers: Optional[Sequence[str]] = None,
    source: str = "checkpoint",
) -> Tuple[StateDict, LoadReport]:
    """Rename ``state``'s keys to the model's (see the module docstring); returns the renamed tensors
    and a report (``layout``, ``renamed``, ``ignored``, ``notes``)."""
    model_keys = set(model_keys)
    layout = detect_layout(state)
    report = LoadReport(source=source, layout=layout)
    pretrained = layout in ("official_pretrained", "hf_pretrained")
    bare_model = not any(k.startswith(TRUNK) for k in model_keys)
    out: StateDict = {}
    answer_head: StateDict = {}
    for original, value in state.items():
        new = canonical_key(original)
        if new is None:
            report.ignored.append(original)
            continue
        if pretrained and new.startswith(HEAD):
            answer_head[PRETRAIN_ANSWER_PREFIX + new[len(HEAD):]] = value
            continue
        out[_final_name(new, bare_model)] = value
        _record(report, original, _final_name(new, bare_model))
    if answer_head:
        _place_pretrain_answer_head(out, answer_head, label2ans, pretrain_answers, report, source)
    return out, report


def _final_name(key: str, bare_model: bool) -> str:
    if bare_model and key.startswith(TRUNK):
        return key[len(TRUNK):]
    return key


def _record(report: LoadReport, original: str, new: str) -> None:
    if original != new:
        report.renamed[original] = new


def _place_pretrain_answer_head(out, answer_head, label2ans, pretrain_answers, report, source) -> None:
    if label2ans is None or pretrain_answers is None:
        report.ignored.extend(sorted(answer_head))
        report.notes.append(
            "pre-training answer head ignored (as --loadLXMERT does); pass label2ans and pretrain_answers "
            "(all_ans.json) to copy it into the task head as --loadLXMERTQA does"
        )
        return
    head, counts = remap_answer_head(answer_head, label2ans, pretrain_answers, source)
    out.update(head)
    report.notes.append(
        f"pre-training answer head copied into logit_fc: {counts['copied']} of {len(label2ans)} answers found, "
        f"{counts['zeroed']} zero rows"
    )


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def load_lxmert_checkpoint(
    model: nn.Module,
    path_or_state: Union[str, os.PathLike, Mapping[str, Any]],
    *,
    label2ans: Optional[Sequence[str]] = None,
    pretrain_answers: Optional[Sequence[str]] = None,
    source: Optional[str] = None,
) -> LoadReport:
    """Load an official / HF / plugin LXMERT file (or state dict) into ``model``, non-strictly.

    Returns a :class:`LoadReport` (also logged): loaded, missing (left at their initial values),
    unexpected (file keys the model does not have, by their mapped name), ignored (pre-training heads,
    buffers), cast (dtype converted). A shape mismatch is a :class:`CheckpointError` naming both the
    file key and the model key with both shapes; so is a file none of whose keys fits the model.
    """
    def rename(state: StateDict, model_keys: Iterable[str], src: str) -> Tuple[StateDict, LoadReport]:
        return map_state_dict(state, model_keys, label2ans=label2ans, pretrain_answers=pretrain_answers, source=src)

    return load_mapped_checkpoint(
        model, path_or_state, rename, source=source, model_name="LXMERT model",
        fit_hint="Check the architecture (hidden size, layer counts, visual_feat_dim) and the head's num_labels.",
    )


# ----------------------------------------------------------------------------------------------
# Our names -> a file layout (export, and the round-trip tests)
# ----------------------------------------------------------------------------------------------
def export_state_dict(model_or_state: Union[nn.Module, Mapping[str, torch.Tensor]], layout: str,
                      multi_gpu: bool = False) -> StateDict:
    """Our state dict under another layout's names.

    ``hf``: ``lxmert.*`` + ``answer_head.logit_fc.*`` (``LxmertForQuestionAnswering``);
    ``official_finetuned``: ``lxrt_encoder.model.[module.]bert.*`` + ``logit_fc.*``;
    ``official_pretrained``: ``[module.]bert.*`` (trunk only; the task head has no place there);
    ``plugin``: unchanged. ``multi_gpu`` adds the DataParallel ``module.`` of the official files
    (the released pre-trained file was saved that way).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if multi_gpu and layout in ("plugin", "hf"):
        raise ValueError(f"multi_gpu applies to the official layouts only, not {layout!r}")
    module = "module." if multi_gpu else ""
    state = _unwrap_model(model_or_state).state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    out: StateDict = {}
    for key, value in state.items():
        key = key if key.startswith((TRUNK, HEAD)) else TRUNK + key
        trunk, rest = key.startswith(TRUNK), key.split(".", 1)[1]
        if layout == "plugin":
            new = key
        elif layout == "hf":
            new = key if trunk else PRETRAIN_ANSWER_PREFIX + rest
        elif layout == "official_finetuned":
            new = ("lxrt_encoder.model." + module + "bert." + rest) if trunk else key
        else:
            if not trunk:
                continue
            new = module + "bert." + rest
        out[new] = value
    return out


__all__ = [
    "LAYOUTS",
    "canonical_key",
    "detect_layout",
    "drop_module",
    "export_state_dict",
    "load_lxmert_checkpoint",
    "map_state_dict",
]
