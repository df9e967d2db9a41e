"""Loading the pre-training heads from official ``uniter-*.pt`` / ``villa-*.pt`` (continue pre-training).

Every key variant of :func:`villa_plugin.backbones.uniter.checkpoint_keys.load_uniter_checkpoint` is accepted
(wrappers, ``module.``, ``bert.`` names, ``gamma``/``beta``, fp16). On top of it:

- the tied tensors are checked: a file holding both names of a tie (``cls.predictions.decoder.weight``
  and ``uniter.embeddings.word_embeddings.weight``; ``feat_regress.weight`` and
  ``uniter.img_embeddings.img_linear.weight``) must hold equal values, else it is a CheckpointError
  naming both keys; a file with only the head's name loads it into the shared tensor;
- the heads the file lacks (e.g. ``uniter-base-init.pt`` = converted BERT has no MRFR/MRC/ITM head)
  are named in the report and logged: they keep their random initialisation.

The other direction needs no code: our pre-training model's keys are the official ones, so its
checkpoint loads as ``model_config.<model>.pretrained_checkpoint`` of any fine-tuning model (the
heads are reported as unexpected, exactly like the released files).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional, Union

import torch

from villa_plugin.common.errors import CheckpointError
from villa_plugin.backbones.uniter.checkpoint_keys import (
    LoadReport,
    load_uniter_checkpoint,
    normalize_state_dict,
    read_checkpoint_file,
    unwrap_state_dict,
)

logger = logging.getLogger(__name__)

# head name of a tied tensor -> the trunk name that owns it
TIED_KEYS = {
    "cls.predictions.decoder.weight": "uniter.embeddings.word_embeddings.weight",
    "feat_regress.weight": "uniter.img_embeddings.img_linear.weight",
}
PRETRAINING_HEADS = ("cls", "feat_regress", "region_classifier", "itm_output")


def _resolve_ties(state: dict, source: str, report_notes: list) -> dict:
    for head_key, trunk_key in TIED_KEYS.items():
        if head_key in state and trunk_key in state:
            if not torch.equal(state[head_key].float(), state[trunk_key].float()):
                raise CheckpointError(
                    f"Checkpoint {source}: '{head_key}' and '{trunk_key}' differ, but the model ties them (one "
                    f"tensor). The file does not come from a UNITER pre-training model; remove '{head_key}' from "
                    f"it to keep the trunk's value."
                )
        elif head_key in state:
            state[trunk_key] = state[head_key]
            report_notes.append(f"'{trunk_key}' taken from its tied copy '{head_key}'")
    return state


def load_pretraining_checkpoint(
    model: torch.nn.Module,
    path_or_state: Union[str, os.PathLike, Mapping[str, Any]],
    source: Optional[str] = None,
) -> LoadReport:
    """Load an official / our UNITER pre-training checkpoint into ``UniterForPretraining`` (non-strict).

    Returns the :class:`LoadReport`; ``report.notes`` names the pre-training heads the file lacks.
    Raises :class:`CheckpointError` on shape mismatches, broken ties, or a file with no usable key.
    """
    is_path = isinstance(path_or_state, (str, os.PathLike))
    source = source or (str(path_or_state) if is_path else "<state dict>")
    raw = read_checkpoint_file(str(path_or_state)) if is_path else path_or_state
    renamed, first = normalize_state_dict(unwrap_state_dict(raw, source), model.state_dict().keys())
    notes = list(first.notes)
    state = _resolve_ties(renamed, source, notes)
    report = load_uniter_checkpoint(model, state, source=source)
    report.renamed, report.notes = first.renamed, notes + report.notes
    absent = [head for head in PRETRAINING_HEADS
              if not any(k.startswith(head + ".") and k not in TIED_KEYS for k in report.loaded)]
    if absent:
        note = f"pre-training head(s) {absent} not in {source}: they keep their random initialisation"
        report.notes.append(note)
        logger.warning(note)
    return report


__all__ = ["TIED_KEYS", "PRETRAINING_HEADS", "load_pretraining_checkpoint"]
