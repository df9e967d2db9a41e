"""What a backbone hands to a task head: :class:`TrunkOutput`, and what a head may ask of a backbone.

A head never sees the trunk module. It is built from :class:`TrunkDims` (sizes and dropout rates),
its ``num_labels`` and its head config, and its forward receives a :class:`TrunkOutput`:

- ``sequence`` ``[B, S, H]``: the trunk's last hidden states at every position;
- ``pooled`` ``[B, H]``: the trunk's pooler on the first position, or None when the head declared
  ``uses_pooler = False`` (the model then freezes the pooler);
- ``layout``: where text and regions sit in ``sequence`` (:class:`TokenLayout`);
- ``encoder``: a :class:`TrunkEncoder` for heads that score rows of their own (retrieval's hard
  negatives), or None.

A head that grows the trunk's embeddings (NLVR2's third type row, VCR's tag tokens) declares an
:class:`EmbeddingGrowth` as its class attribute ``embedding_growth``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ContextManager, Mapping, Optional, Protocol

import torch


@dataclasses.dataclass(frozen=True)
class TrunkDims:
    """The trunk sizes a head is built from (any backbone config with these attributes fits)."""

    hidden_size: int
    num_attention_heads: int
    hidden_dropout_prob: float
    attention_probs_dropout_prob: float
    layer_norm_eps: float
    initializer_range: float

    @classmethod
    def of(cls, config: Any) -> "TrunkDims":
        """The dims of a backbone config object (e.g. ``UniterConfig``)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where the text and the regions of each row sit in ``TrunkOutput.sequence``.

    - ``attn_masks`` ``[B, S]``: 1 at real positions;
    - ``text_width`` / ``image_width``: the padded text length and region count of the batch;
    - ``packed``: True when each row's regions follow its own text (``gather_index`` layout:
      row i's regions start at ``txt_lens[i]``); False when they follow the padded text
      (start at ``text_width``);
    - ``txt_lens`` / ``num_bbs`` ``[B]``: per-row text length and region count, when the batch has them.
    """

    attn_masks: torch.Tensor
    text_width: int
    image_width: int
    packed: bool
    txt_lens: Optional[torch.Tensor] = None
    num_bbs: Optional[torch.Tensor] = None


class TrunkEncoder(Protocol):
    """Runs the trunk again on rows a head assembles itself (retrieval's candidate pairs)."""

    def encode(self, rows: Mapping[str, torch.Tensor]) -> "TrunkOutput":
        """``rows``: ``input_ids``, ``position_ids``, ``img_feat``, ``img_pos_feat``, ``attn_masks``,
        ``gather_index`` (the UNITER batch fields). Returns the rows' output with ``pooled``."""

    def evaluating(self) -> ContextManager[None]:
        """A context in which the trunk runs in eval mode (no dropout); the mode is restored after."""

    def version(self) -> Any:
        """A value that changes whenever the trunk's weights change (optimizer step, load)."""


@dataclasses.dataclass
class TrunkOutput:
    """The trunk's output for one batch (see the module docstring)."""

    sequence: torch.Tensor
    pooled: Optional[torch.Tensor]
    layout: TokenLayout
    encoder: Optional[TrunkEncoder] = None

    def require_pooled(self, head: str) -> torch.Tensor:
        if self.pooled is None:
            raise RuntimeError(f'Head "{head}" reads the pooled output but declares uses_pooler = False')
        return self.pooled


@dataclasses.dataclass(frozen=True)
class EmbeddingGrowth:
    """How a head grows the trunk's embeddings: ``type_rows`` rows in the type table (0: keep), new
    row r := old row ``type_copy_from[r]``; ``extra_words`` rows appended to the vocabulary."""

    type_rows: int = 0
    type_copy_from: Mapping[int, int] = dataclasses.field(default_factory=dict)
    extra_words: int = 0


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """``module`` in eval mode for the block, its previous mode restored after."""
    was_training = module.training
    try:
        module.eval()
        yield
    finally:
        module.train(was_training)


__all__ = ["TrunkDims", "TokenLayout", "TrunkEncoder", "TrunkOutput", "EmbeddingGrowth", "eval_mode"]
