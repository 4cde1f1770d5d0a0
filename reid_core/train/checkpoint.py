"""DeepSpeed engines <-> one checkpoint directory that ``ray.train.report`` uploads (every rank writes its shards).

Layout of a checkpoint directory:
    <engine name>/<tag>/...      DeepSpeed's own files per engine (model, optimizer and ZeRO shards), loaded with an
                                 explicit tag because both engines would otherwise fight over one ``latest`` file
    meta.json                    epoch, tag, world size, ZeRO stages (rank 0)
    <engine name>.pt             rank 0: the plain ``state_dict`` of the module, readable without DeepSpeed
                                 (``weights_file``, ``save_weights`` / ``load_weights``)
                                 (the driver registers the final model from it; it does not depend on world size)
    manifest/rank-NNNNN.json     every rank, written last: size and SHA-256 of each file that rank wrote

Before anything is loaded, ``restore_engines`` checks every rank's manifest (a truncated or altered file, a missing
rank): a checkpoint that fails is skipped, with a warning naming the file, for the run's previous checkpoint.

This module is the one place that knows the names: the engines' keys (``GENERATOR``, ``DISCRIMINATOR``, ``CRITIC``
of the GAN loop; ``REID_MODEL`` of the re-ID loop), their weights files (``weights_file``), and the one way back from a
reported checkpoint to a model (``load_model``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from pathlib import Path
from typing import Any

import torch

from reid_core import storage

log = logging.getLogger(__name__)

META = "meta.json"
MANIFEST_DIR = "manifest"

# The engines' names in a checkpoint: each is a DeepSpeed folder and the ``<name>.pt`` plain weights beside it.
GENERATOR = "generator"
DISCRIMINATOR = "discriminator"
CRITIC = "critic"
REID_MODEL = "model"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's files do not match its manifests (truncated, altered or missing); the message names the file."""


def epoch_tag(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def weights_file(name: str) -> str:
    """The file of engine ``name``'s plain ``state_dict`` in a checkpoint directory (written by rank 0)."""
    return f"{name}.pt"


def save_weights(directory: str | Path, name: str, module: torch.nn.Module) -> None:
    """Write ``module``'s plain ``state_dict`` as engine ``name``'s weights file in ``directory``."""
    torch.save(module.state_dict(), Path(directory) / weights_file(name))


def load_weights(directory: str | Path, name: str, module: torch.nn.Module) -> torch.nn.Module:
    """Load engine ``name``'s plain weights from ``directory`` into ``module`` (strict; tensors only); returns it."""
    path = Path(directory) / weights_file(name)
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return module


def load_model(checkpoint, name: str, build) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, meta) of engine ``name`` in a reported checkpoint (a ``ray.train.Checkpoint``), from its
    plain weights (world-size free): ``build(meta)`` makes the empty model the weights go into."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        directory = checkpoint.to_directory(tmp)
        meta = read_meta(directory)
        model = load_weights(directory, name, build(meta))
    return model.eval(), meta


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
            save_weights(directory, name, engine.module)
        meta = {
            "epoch": epoch,
            "tag": tag,
            "world_size": world_size,
            "zero_stages": {name: int(engine.zero_optimization_stage()) for name, engine in engines.items()},
            **(extra or {}),
        }
        (directory / META).write_text(json.dumps(meta, indent=2))
    write_manifest(directory, rank=rank)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | Path, *, rank: int) -> Path:
    """Record size and SHA-256 of every file this rank wrote into ``directory`` (each rank saves into its own local
    folder, which Ray merges on upload), as ``manifest/rank-NNNNN.json``. Call after the rank's last file."""
    directory = Path(directory)
    files = {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.relative_to(directory).parts[0] != MANIFEST_DIR
    }
    path = directory / MANIFEST_DIR / f"rank-{rank:05d}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"rank": rank, "files": files}, indent=1))
    return path


def verify_checkpoint(directory: str | Path) -> dict:
    """Check ``directory`` against the manifests of all ``world_size`` ranks; returns its meta.

    Raises:
        CorruptCheckpointError: naming the first file that is missing, of the wrong size or the wrong checksum, or
            the rank whose manifest is missing. A checkpoint written before manifests existed passes with a warning.
    """
    directory = Path(directory)
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"{META} is unreadable: {exc}") from None
    manifests = directory / MANIFEST_DIR
    if not manifests.is_dir():
        log.warning("checkpoint %s has no manifests (written before they existed): integrity not checked", directory)
        return meta
    for rank in range(int(meta.get("world_size", 1))):
        path = manifests / f"rank-{rank:05d}.json"
        try:
            files = json.loads(path.read_text())["files"]
        except (OSError, ValueError, KeyError) as exc:
            raise CorruptCheckpointError(f"the manifest of rank {rank} is missing or unreadable ({exc})") from None
        for name, want in files.items():
            f = directory / name
            if not f.is_file():
                raise CorruptCheckpointError(f"{name} (rank {rank}) is missing")
            size = f.stat().st_size
            if size != want["size"]:
                raise CorruptCheckpointError(f"{name} (rank {rank}) has {size} bytes, its manifest says {want['size']}")
            if _sha256(f) != want["sha256"]:
                raise CorruptCheckpointError(f"{name} (rank {rank}) does not match the SHA-256 of its manifest")
    return meta


def earlier_checkpoints(checkpoint) -> list:
    """The run's checkpoints older than ``checkpoint`` (a ``ray.train.Checkpoint``), newest first: the sibling
    ``checkpoint_<timestamp>`` folders in the same storage folder, which Ray names in time order."""
    parent, name = posixpath.split(checkpoint.path.rstrip("/"))
    folders = storage.list_subfolders(checkpoint.filesystem, parent, prefix="checkpoint_")
    older = sorted((p for p in folders if posixpath.basename(p) < name), reverse=True)
    return [type(checkpoint)(path=p, filesystem=checkpoint.filesystem) for p in older]


def checkpoint_to_resume(registered, run_folder: str, filesystem=None):
    """The checkpoint a (re)started run resumes from: ``registered`` (``ray.train.get_checkpoint()``, may be None) or
    the newest ``checkpoint_<timestamp>`` folder in ``run_folder`` on ``filesystem`` (a ``pyarrow.fs`` filesystem;
    None: local), whichever is newer (Ray names them in time order).

    Ray Train registers a reported checkpoint asynchronously, in its controller, and records it in the run's
    snapshot on storage: a worker lost right after uploading, a controller that failed to write its snapshot (S3
    down) or a job stopped in between leave a newer checkpoint on storage than Ray knows. Its integrity is checked by
    ``restore_engines`` like any other's (a partial upload fails its manifests and the one before it is used).
    """
    from ray.train import Checkpoint

    filesystem = filesystem or storage.local_pyarrow_filesystem()
    folders = storage.list_subfolders(filesystem, run_folder, prefix="checkpoint_")
    if not folders:
        return registered
    newest = folders[-1]
    if registered is not None and posixpath.basename(registered.path.rstrip("/")) >= posixpath.basename(newest):
        return registered
    if registered is not None:
        log.info("resuming from %s, newer than Ray's last registered checkpoint %s", newest, registered.path)
    return Checkpoint(path=newest, filesystem=filesystem)


def restore_engines(checkpoint, engines: dict[str, Any], *, world_size: int) -> tuple[dict, Any]:
    """Restore ``engines`` from the newest intact checkpoint: ``checkpoint`` (from ``ray.train.get_checkpoint()``)
    or, when its files fail their manifests, the run's previous ones in turn. Returns (meta, the checkpoint used).

    Raises:
        CorruptCheckpointError: when no checkpoint of the run is intact (each failure is named in the message).
    """
    failures = []
    for candidate in [checkpoint, *earlier_checkpoints(checkpoint)]:
        with candidate.as_directory() as directory:
            try:
                verify_checkpoint(directory)
            except CorruptCheckpointError as exc:
                log.warning("checkpoint %s is corrupt: %s; trying the run's previous checkpoint", candidate.path, exc)
                failures.append(f"{candidate.path}: {exc}")
                continue
            meta = load_engines(directory, engines, world_size=world_size)
        if failures:
            log.warning("resumed from %s (epoch %d) instead of the latest checkpoint %s, which is corrupt",
                        candidate.path, meta["epoch"], checkpoint.path)  # fmt: skip
        return {**meta, "skipped_corrupt_checkpoints": len(failures)}, candidate
    raise CorruptCheckpointError("no intact checkpoint to resume from: " + "; ".join(failures))


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {directory} has no {META}: not a checkpoint written by this project")
    return json.loads(path.read_text())


def load_engines(directory: str | Path, engines: dict[str, Any], *, world_size: int) -> dict:
    """Restore every engine (weights, optimizer, schedulers) from ``directory``; returns its meta.

    ZeRO ≥ 1 partitions the optimizer state by data-parallel rank: such a checkpoint cannot be loaded at another
    world size. Then the engines restart from the plain weights (``weights_file``, world-size independent) with a fresh
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
            load_weights(directory, name, engine.module)
        return {**meta, "optimizer_restored": False}
    for name, engine in engines.items():
        path, _ = engine.load_checkpoint(str(directory / name), tag=meta["tag"])
        if path is None:
            raise FileNotFoundError(f"checkpoint {directory / name} has no tag {meta['tag']!r} for engine {name!r}")
    return {**meta, "optimizer_restored": True}
