"""Datasets: layouts on disk or S3 -> records (``layouts``), records -> tensors and batches (``dataset``), packed
tar shards read as the same records (``shards``), synthetic data in the real layouts (``synthetic``)."""

from reid_core.data.dataset import (
    BadImageError,
    RandomIdentitySampler,
    ReIDDataset,
    build_transforms,
    load_image,
)
from reid_core.data.layouts import (
    LAYOUTS,
    UNKNOWN_PID,
    LayoutError,
    Record,
    Splits,
    read_layout,
)

__all__ = [
    "LAYOUTS",
    "UNKNOWN_PID",
    "BadImageError",
    "LayoutError",
    "RandomIdentitySampler",
    "ReIDDataset",
    "Record",
    "Splits",
    "build_transforms",
    "load_image",
    "read_layout",
]
