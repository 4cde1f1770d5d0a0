"""DeepSpeed engines <-> one checkpoint directory that ``ray.train.report`` uploads (every rank writes its shards).

Layout of a checkpoint directory:
    <engine name>/<tag>/...      DeepSpeed's own files per engine (model, optimizer and ZeRO shards), loaded with an
                                 explicit tag because both engines would otherwise fight over one ``latest`` file
    meta.json                    epoch, tag, world size, ZeRO stages (rank 0)
    <engine name>.pt             rank 0: the plain ``state_dict`` of the module, readable without DeepSpeed
                                 (the driver registers the final model from it; it does not depend on world size)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

META = "meta.json"


def epoch_tag(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def save_engines(
    directory: str | Path, engines: dict[str, Any], *, epoch: int, rank: int, world_size: int, extra: dict | None = None
) -> None:
    """Every rank: write each engine's DeepSpeed checkpoint; rank 0 also writes ``meta.json`` and plain weights."""
    directory = Path(directory)
    tag = epoch_tag(epoch)
    for name, engine in engines.items():
        engine.save_checkpoint(str(directory / name), tag=tag, save_latest=False)
    if rank == 0:
        for name, engine in engines.items():
            torch.save(engine.module.state_dict(), directory / f"{name}.pt")
        meta = {
            "epoch": epoch,
            "tag": tag,
            "world_size": world_size,
            "zero_stages": {name: int(engine.zero_optimization_stage()) for name, engine in engines.items()},
            **(extra or {}),
        }
        (directory / META).write_text(json.dumps(meta, indent=2))


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {directory} has no {META}: not a checkpoint written by this project")
    return json.loads(path.read_text())


def load_engines(directory: str | Path, engines: dict[str, Any], *, world_size: int) -> dict:
    """Restore every engine (weights, optimizer, schedulers) from ``directory``; returns its meta.

    ZeRO ≥ 1 partitions the optimizer state by data-parallel rank: such a checkpoint cannot be loaded at another
    world size. Then the engines restart from the plain weights (``<name>.pt``, world-size independent) with a fresh
    optimizer, and the log says so; with ZeRO 0 DeepSpeed reloads the full optimizer state at any world size.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    saved_world = int(meta.get("world_size", world_size))
    partitioned = any(stage >= 1 for stage in meta.get("zero_stages", {}).values())
    if saved_world != world_size and partitioned:
        log.warning(
            "checkpoint %s was written by %d workers with ZeRO-partitioned optimizer state; this run has %d. "
            "Resuming from its weights with a fresh optimizer state (the optimizer's moments are lost).",
            directory, saved_world, world_size,
        )  # fmt: skip
        for name, engine in engines.items():
            engine.module.load_state_dict(torch.load(directory / f"{name}.pt", map_location="cpu", weights_only=True))
        return {**meta, "optimizer_restored": False}
    for name, engine in engines.items():
        path, _ = engine.load_checkpoint(str(directory / name), tag=meta["tag"])
        if path is None:
            raise FileNotFoundError(f"checkpoint {directory / name} has no tag {meta['tag']!r} for engine {name!r}")
    return {**meta, "optimizer_restored": True}
