"""Fetch an ImageNet checkpoint for ``model.pretrained`` (``reid_core.models.pretrained`` reads and loads it).

``s3://bucket/key`` and local paths go through ``reid_core.storage``; ``https://`` is read directly (a cluster with
internet access; tests never download).
"""

from __future__ import annotations

import torch

from reid_core import storage
from reid_core.models.pretrained import state_dict_from_bytes


def read_state_dict(uri: str, settings: storage.S3Settings | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint at ``uri`` as a flat ``{key: tensor}`` (``state_dict_from_bytes``)."""
    if uri.startswith(("https://", "http://")):
        import urllib.request

        with urllib.request.urlopen(uri, timeout=300) as response:  # noqa: S310 (a URL the user configured)
            data = response.read()
    else:
        data = storage.read_bytes(uri, settings)
    return state_dict_from_bytes(data, uri)
