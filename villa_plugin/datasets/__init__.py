from villa_plugin.datasets.base import BaseDataset, BaseDatasetBuilder  # noqa: F401
