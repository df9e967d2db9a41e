"""Dataset contracts: a builder makes one dataset per split; a dataset collates its own batches."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from torch.utils.data import Dataset

from villa_plugin.common.input_spec import InputSpec
from villa_plugin.common.sample_list import SampleList


class BaseDataset(Dataset):
    """One split of one dataset.

    ``__getitem__`` returns one example (a dict); ``collate(examples)`` turns a list of them into a
    :class:`SampleList` with UNITER field names and sets ``dataset_name`` / ``dataset_type``.
    ``lengths()`` gives each example's token length (text + regions) for token-bucket batching.
    ``input_spec`` says what it feeds a model (its builder sets it; the trainer checks it against
    the model's at set-up, see :mod:`villa_plugin.common.input_spec`).
    """

    input_spec: InputSpec = InputSpec()

    def __init__(self, dataset_name: str, dataset_type: str, config: Any):
        self.dataset_name = dataset_name
        self.dataset_type = dataset_type  # "train" | "val" | "test"
        self.config = config

    def lengths(self) -> List[int]:
        raise NotImplementedError

    def collate(self, examples: List[Dict[str, Any]]) -> SampleList:
        raise NotImplementedError

    def baselines(self, train: Optional["BaseDataset"] = None) -> Dict[str, float]:
        """Chance levels of this split's accuracy, e.g. ``{"majority_baseline": 0.17}``, computed from
        ``train`` (the same dataset's training split, when the run has one) and this split's targets.
        The trainer reports them beside the metrics as ``<split>/<dataset>/<name>``; {} = none known."""
        return {}

    def format_predictions(self, batch: SampleList, output: Dict[str, Any]) -> List[Dict[str, Any]]:
        """Prediction records for one batch (``run_type=predict``)."""
        raise NotImplementedError(f"{type(self).__name__} does not write predictions")

    def write_predictions(self, records: List[Dict[str, Any]], path: str) -> str:
        """Write all records in the task's submission format; returns the file written."""
        raise NotImplementedError(f"{type(self).__name__} does not write predictions")


class BaseDatasetBuilder:
    """Registered with ``@registry.register_builder(name)``; builds the dataset of each split."""

    def __init__(self, dataset_name: str, config: Any):
        self.dataset_name = dataset_name
        self.config = config  # dataset_config.<dataset_name>

    @classmethod
    def config_path(cls) -> Optional[str]:
        """Absolute path of this dataset's default YAML (merged under ``dataset_config.<name>``)."""
        return None

    def prepare(self) -> None:
        """Materialise or check data on disk (called once, on rank 0 first)."""

    def build_dataset(self, split: str) -> BaseDataset:
        raise NotImplementedError
