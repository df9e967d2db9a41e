"""A split of one dataset trained as several tasks (UNITER pre-training): one dataset per task.

A builder may return a :class:`TaskMixture` instead of a dataset. The trainer then makes one train
stream per task, named :func:`stream_name` (``<task>_<dataset>``, the official pre-training loader
names), with the mixture's ``mix_ratio`` as its weight when ``multitasking.type=mix_ratio``; it
evaluates every task view and reports ``<split>/<dataset>/<metric>`` for the metrics of that task.
"""
from __future__ import annotations

from typing import Dict, Mapping

from villa_plugin.datasets.base import BaseDataset


def stream_name(task: str, dataset: str) -> str:
    """The train stream of ``task`` on ``dataset`` (UNITER's ``f'{task}_{dataset}'``)."""
    return f"{task}_{dataset}"


class TaskMixture:
    """``views``: ``{task: dataset}``; ``mix_ratio``: ``{task: weight}`` (per-update sampling weights)."""

    def __init__(self, dataset_name: str, dataset_type: str, views: Mapping[str, BaseDataset],
                 mix_ratio: Mapping[str, float]):
        if not views or set(views) != set(mix_ratio):
            raise ValueError(f"TaskMixture {dataset_name}: views {sorted(views)} and mix_ratio {sorted(mix_ratio)} "
                             f"must name the same tasks")
        self.dataset_name, self.dataset_type = dataset_name, dataset_type
        self.views: Dict[str, BaseDataset] = dict(views)
        self.mix_ratio: Dict[str, float] = {task: float(mix_ratio[task]) for task in views}

    def __len__(self) -> int:
        return len(next(iter(self.views.values())))

    def streams(self) -> Dict[str, BaseDataset]:
        """``{stream name: task dataset}`` in config order."""
        return {stream_name(task, self.dataset_name): view for task, view in self.views.items()}


def expand_train_datasets(datasets: Mapping[str, object]) -> Dict[str, tuple]:
    """``{stream name: (dataset, declared weight or None, dataset name, task or None)}``: a plain
    dataset is one stream under its own name, a :class:`TaskMixture` one stream per task."""
    out: Dict[str, tuple] = {}
    for name, dataset in datasets.items():
        if isinstance(dataset, TaskMixture):
            for task, view in dataset.views.items():
                out[stream_name(task, name)] = (view, dataset.mix_ratio[task], name, task)
        else:
            out[name] = (dataset, None, name, None)
    return out


__all__ = ["TaskMixture", "stream_name", "expand_train_datasets"]
