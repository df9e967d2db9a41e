"""Where UNITER's real tokens and regions are, for VILLA's random start (``perturbation_masks``)."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch


def uniter_perturbation_masks(batch: Any) -> Dict[str, Optional[torch.Tensor]]:
    """``{"text": [B, Lt], "image": [B, Nb]}`` bool masks, True = real.

    Text: ``input_ids != 0`` (UNITER pads with 0). Image: ``num_bbs`` when it has one count per row,
    else the regions whose features are not all zero (padding regions are zero-filled).
    """
    input_ids, img_feat = batch["input_ids"], batch["img_feat"]
    bsz, n_regions = int(img_feat.size(0)), int(img_feat.size(1))
    num_bbs = batch.get("num_bbs", None) if hasattr(batch, "get") else None
    if num_bbs is not None and len(num_bbs) == bsz:
        counts = torch.as_tensor(num_bbs, device=img_feat.device).reshape(-1, 1)
        image = torch.arange(n_regions, device=img_feat.device).reshape(1, -1) < counts
    else:
        image = img_feat.detach().abs().sum(-1) != 0
    return {"text": input_ids != 0, "image": image}
