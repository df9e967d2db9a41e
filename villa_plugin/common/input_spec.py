"""What a dataset feeds a model and what a model accepts, compared once at set-up.

A model declares the sizes it was built with (``BaseModel.input_spec()``: word-embedding rows,
scores width, region-feature width), a dataset the sizes of what it produces (the builder sets
``dataset.input_spec``: its token vocabulary, its targets' width, its features' width). Each size
carries where it is set (a config key or a file), so a mismatch is a :class:`ConfigError` naming
both settings and the fix, at set-up, instead of an ``IndexError`` or a shape error at the first
forward (or mid-run, at the first evaluation). Sizes either side does not know are ``None`` and
not checked.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from villa_plugin.common.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Size:
    """A size, where it is set (``model_config.villa.num_labels``, a vocab file, an img_db) and
    how it was obtained, if that needs saying (``null: the answers of ans2label.json``)."""

    value: int
    where: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.where} ({self.detail})" if self.detail else self.where


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """``vocab_size``: token ids are below it (a model: its word-embedding rows; a dataset: the
    highest id it holds + 1, or its vocabulary's size when it cannot tell); ``label_width``: the width of scores / targets;
    ``feature_dim``: the region-feature width."""

    vocab_size: Optional[Size] = None
    label_width: Optional[Size] = None
    feature_dim: Optional[Size] = None


def check_model_fits_data(model: InputSpec, data: InputSpec, dataset: str) -> None:
    """A :class:`ConfigError` when ``dataset``'s inputs do not fit the model (see the module docstring)."""
    if model.vocab_size and data.vocab_size and data.vocab_size.value > model.vocab_size.value:
        m, d = model.vocab_size, data.vocab_size
        raise ConfigError(
            f"{dataset}: the token ids reach {d.value - 1} ({d}) but the model has {m.value} word-embedding "
            f"rows ({m} = {m.value}), so ids >= {m.value} cannot be looked up. Use the vocabulary the model "
            f"was trained with (bert-base-cased's vocab.txt, 28996 tokens, for the UNITER / VILLA "
            f"checkpoints), or set {m.where} to your vocabulary's size (at least {d.value}); its new rows "
            f"train from scratch and a pretrained checkpoint's word embeddings no longer fit."
        )
    if model.label_width and data.label_width and data.label_width.value != model.label_width.value:
        m, d = model.label_width, data.label_width
        raise ConfigError(
            f"{dataset}: the model scores {m.value} labels ({m}) but the targets have {d.value} ({d}); "
            f"the loss needs both equal. Set {m.where}={d.value}, or {d.where}={m.value}."
        )
    if model.feature_dim and data.feature_dim and data.feature_dim.value != model.feature_dim.value:
        m, d = model.feature_dim, data.feature_dim
        raise ConfigError(
            f"{dataset}: the region features are {d.value}-d ({d}) but the model takes {m.value}-d "
            f"features ({m}). Set {m.where}={d.value} (its img_linear is then trained from "
            f"scratch: a checkpoint trained on {m.value}-d features no longer fits), or use {m.value}-d features."
        )


__all__ = ["Size", "InputSpec", "check_model_fits_data"]
