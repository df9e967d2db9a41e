"""A batch container in the spirit of MMF's ``SampleList``: a dict with attribute access."""
from __future__ import annotations

from typing import Any

import torch


class SampleList(dict):
    """Dict of batch fields (tensors, lists, nested SampleLists) readable as attributes.

    ``batch.input_ids`` and ``batch["input_ids"]`` are the same. ``to(device)`` moves every tensor
    (recursively) and returns a new SampleList; non-tensors are kept as they are.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            known = ", ".join(sorted(self.keys()))
            raise AttributeError(f'SampleList has no field "{name}"; fields: {known}') from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]

    def to(self, device, non_blocking: bool = False) -> "SampleList":
        return SampleList({k: _move(v, device, non_blocking) for k, v in self.items()})

    def get_batch_size(self) -> int:
        """Number of examples: the first dimension of the first tensor field, else list length."""
        for value in self.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.size(0))
        for value in self.values():
            if isinstance(value, (list, tuple)):
                return len(value)
        raise ValueError("SampleList holds no tensor or list field to take a batch size from")


def _move(value: Any, device, non_blocking: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, SampleList):
        return value.to(device, non_blocking)
    if isinstance(value, dict):
        return {k: _move(v, device, non_blocking) for k, v in value.items()}
    return value
