"""Which submodules become their own FSDP unit: the transformer layers, found generically."""
from __future__ import annotations

from typing import List

from torch import nn

LAYER_LIST_NAMES = ("layer", "layers", "blocks")
LAYER_CLASS_SUFFIXES = ("Layer", "Block")


def transformer_layers(model: nn.Module) -> List[nn.Module]:
    """The children of ``nn.ModuleList`` attributes named ``layer``/``layers``/``blocks`` (e.g.
    UNITER's ``uniter.encoder.layer``) whose class name ends with ``Layer`` or ``Block``, in
    model order. Sharding each one separately lets FSDP gather one layer's weights at a time."""
    found: List[nn.Module] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or name.rsplit(".", 1)[-1] not in LAYER_LIST_NAMES:
            continue
        for child in module:
            if type(child).__name__.endswith(LAYER_CLASS_SUFFIXES) and child not in found:
                found.append(child)
    return found
