"""The train datasets of a run as streams of batches, and the per-update choice between them.

Each train dataset has its own loader and position (``epoch``, ``batch_in_epoch``); a
:class:`~villa_plugin.datasets.source_sampler.SourceSampler` picks the dataset of each update
(all micro-batches of an update come from it), following ``multitasking.type``
(``size_proportional`` | ``equal`` | ``ratios`` with ``multitasking.sampling_ratios`` | ``mix_ratio``:
the weights task mixtures declare, see datasets/task_mixture.py).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from omegaconf import OmegaConf

from villa_plugin.common.config_access import setting
from villa_plugin.common.sample_list import SampleList
from villa_plugin.datasets.loader import set_loader_epoch
from villa_plugin.datasets.source_sampler import SourceSampler, sampling_weights

SAMPLING_KEY = "multitasking"


class DatasetStream:
    """One train dataset's loader walked epoch after epoch; resumable from its position."""

    def __init__(self, name: str, dataset, loader, weight: Optional[float] = None):
        self.name, self.dataset, self.loader = name, dataset, loader
        self.weight = weight  # declared sampling weight (a task mixture's mix_ratio), else None
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of the current epoch already consumed
        self._iter = None

    @property
    def batches_per_epoch(self) -> int:
        return self.loader.batch_sampler.num_batches

    def next_batch(self, max_epochs: Optional[int]) -> Optional[SampleList]:
        """Next batch, moving through epochs; None once ``max_epochs`` are done."""
        while True:
            if self._iter is None:
                if max_epochs is not None and self.epoch >= max_epochs:
                    return None
                set_loader_epoch(self.loader, self.epoch, self.batch_in_epoch)
                self._iter = iter(self.loader)
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter = None
                self.epoch += 1
                self.batch_in_epoch = 0
                continue
            self.batch_in_epoch += 1
            return batch

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: Mapping[str, int], seed: int) -> None:
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self.loader.batch_sampler.seed = int(seed)
        self._iter = None


def build_source_sampler(config: Any, streams: Mapping[str, DatasetStream], seed: int) -> SourceSampler:
    """The sampler of ``multitasking.type`` over the train datasets (seeded like the data)."""
    ratios = setting(config, f"{SAMPLING_KEY}.sampling_ratios") or {}
    if OmegaConf.is_config(ratios):
        ratios = OmegaConf.to_container(ratios, resolve=True)
    sizes = {name: len(stream.dataset) for name, stream in streams.items()}
    declared = {name: stream.weight for name, stream in streams.items()}
    weights = sampling_weights(str(setting(config, f"{SAMPLING_KEY}.type")), sizes, ratios, SAMPLING_KEY, declared)
    return SourceSampler(weights, seed)
