"""Checkpoint integrity: every rank's manifest (size + SHA-256 of its files) is checked before anything is loaded, and a
corrupt latest checkpoint on the loopback S3 falls back to the run's previous one, with real DeepSpeed engines."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from reid_core.train.checkpoint import (
    MANIFEST_DIR,
    META,
    REID_MODEL,
    CorruptCheckpointError,
    load_model,
    restore_engines,
    save_weights,
    verify_checkpoint,
    weights_file,
    write_manifest,
)


def fake_checkpoint(directory, *, world_size: int = 2) -> None:
    """The files ``world_size`` ranks would write, merged as Ray merges the ranks' uploads: each rank writes its files
    and then its manifest in a private folder (as in save_engines), so a manifest lists only its own rank's files."""
    for rank in range(world_size):
        private = directory.parent / f"rank{rank}"
        shard = private / "model" / "epoch-0001" / f"zero_rank_{rank}.pt"
        shard.parent.mkdir(parents=True)
        shard.write_bytes(bytes(range(256)) * (rank + 1))
        if rank == 0:
            (private / "meta.json").write_text(json.dumps({"epoch": 1, "tag": "epoch-0001", "world_size": world_size}))
        write_manifest(private, rank=rank)
        shutil.copytree(private, directory, dirs_exist_ok=True)


def test_a_model_comes_back_from_its_checkpoint_weights_through_the_one_loader(tmp_path):
    """``save_weights`` writes ``weights_file(name)``; ``load_model`` builds the model from the meta and loads it."""

    class Folder:  # what load_model needs of a ray.train.Checkpoint
        def to_directory(self, path):
            shutil.copytree(tmp_path / "ckpt", path, dirs_exist_ok=True)
            return path

    torch.manual_seed(0)
    trained = torch.nn.Linear(3, 2)
    (tmp_path / "ckpt").mkdir()
    save_weights(tmp_path / "ckpt", REID_MODEL, trained)
    (tmp_path / "ckpt" / META).write_text(json.dumps({"epoch": 0, "model": {"in": 3, "out": 2}}))
    assert (tmp_path / "ckpt" / weights_file(REID_MODEL)).is_file()
    model, meta = load_model(Folder(), REID_MODEL, lambda m: torch.nn.Linear(m["model"]["in"], m["model"]["out"]))
    assert meta["epoch"] == 0 and not model.training
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), trained.parameters(), strict=True))


def test_an_intact_checkpoint_passes_and_each_kind_of_damage_is_named(tmp_path):
    ckpt = tmp_path / "ckpt"
    fake_checkpoint(ckpt)
    assert verify_checkpoint(ckpt)["epoch"] == 1

    shard = ckpt / "model" / "epoch-0001" / "zero_rank_1.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[:100])  # truncated upload
    with pytest.raises(CorruptCheckpointError, match=r"zero_rank_1.pt \(rank 1\) has 100 bytes, its manifest says 512"):
        verify_checkpoint(ckpt)
    shard.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, one bit flipped
    with pytest.raises(CorruptCheckpointError, match="does not match the SHA-256"):
        verify_checkpoint(ckpt)
    shard.unlink()
    with pytest.raises(CorruptCheckpointError, match="zero_rank_1.pt \\(rank 1\\) is missing"):
        verify_checkpoint(ckpt)
    shard.write_bytes(data)
    (ckpt / MANIFEST_DIR / "rank-00001.json").unlink()  # a rank's upload never arrived
    with pytest.raises(CorruptCheckpointError, match="manifest of rank 1 is missing"):
        verify_checkpoint(ckpt)
    (ckpt / "meta.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="meta.json is unreadable"):
        verify_checkpoint(ckpt)


def test_a_checkpoint_from_before_manifests_loads_with_a_warning(tmp_path, caplog):
    (tmp_path / "meta.json").write_text(json.dumps({"epoch": 3, "tag": "epoch-0003", "world_size": 1}))
    with caplog.at_level(logging.WARNING):
        assert verify_checkpoint(tmp_path)["epoch"] == 3
    assert "integrity not checked" in caplog.text


def test_a_truncated_latest_checkpoint_on_s3_falls_back_to_the_previous_one(
    single_process_group, s3_env, s3_url, tmp_path, caplog
):
    """Two epochs' checkpoints of a real DeepSpeed engine in the loopback S3, laid out as Ray Train stores a run; the
    latest's optimizer shard is truncated on S3. Resuming restores the earlier epoch's weights and says why."""
    import deepspeed
    from pyarrow.fs import FileSelector, LocalFileSystem, copy_files
    from ray.train import Checkpoint

    from reid_core import storage
    from reid_core.train.checkpoint import save_engines
    from reid_core.train.deepspeed import deepspeed_config

    def engine(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        cfg = deepspeed_config(micro_batch_size=2, world_size=1, use_gpu=False, zero_stage=1)
        e, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.Adam(model.parameters(), 1e-3), config=cfg)
        return e

    run_path, fs = storage.ray_storage(f"{s3_url}/run")
    saved = {}
    for epoch, name in ((0, "checkpoint_2026-11-25_10-00-00.000000"), (1, "checkpoint_2026-11-25_10-05-00.000000")):
        e = engine(seed=epoch)
        saved[epoch] = [p.detach().clone() for p in e.module.parameters()]
        local = tmp_path / name
        save_engines(local, {"model": e}, epoch=epoch, rank=0, world_size=1)
        copy_files(str(local), f"{run_path}/{name}", source_filesystem=LocalFileSystem(), destination_filesystem=fs)
    latest = Checkpoint(path=f"{run_path}/checkpoint_2026-11-25_10-05-00.000000", filesystem=fs)
    optim = [
        i.path
        for i in fs.get_file_info(FileSelector(latest.path, recursive=True))
        if i.path.endswith("optim_states.pt")
    ]
    assert optim, "DeepSpeed wrote no optimizer shard"
    with fs.open_input_stream(optim[0]) as f:
        data = f.read()
    with fs.open_output_stream(optim[0]) as f:  # a partial upload: the first half of the object
        f.write(data[: len(data) // 2])

    target = engine(seed=99)
    with caplog.at_level(logging.WARNING):
        meta, used = restore_engines(latest, {"model": target}, world_size=1)
    assert meta["epoch"] == 0 and meta["skipped_corrupt_checkpoints"] == 1
    assert used.path.endswith("checkpoint_2026-11-25_10-00-00.000000")
    assert all(torch.equal(a, b) for a, b in zip(saved[0], target.module.parameters(), strict=True))
    assert "optim_states.pt (rank 0) has" in caplog.text and "instead of the latest checkpoint" in caplog.text

    # with the only earlier checkpoint damaged too, the error names both
    first = Checkpoint(path=f"{run_path}/checkpoint_2026-11-25_10-00-00.000000", filesystem=fs)
    fs.delete_file(f"{first.path}/meta.json")
    with pytest.raises(CorruptCheckpointError, match="no intact checkpoint to resume from: .*10-05-00.*10-00-00"):
        restore_engines(latest, {"model": target}, world_size=1)


def test_resume_takes_the_newest_checkpoint_on_storage_when_ray_registered_an_older_one(s3_url, caplog):
    """Ray registers checkpoints asynchronously: after a lost worker, a stopped job or a failed snapshot write, the
    run's folder can hold a newer checkpoint than ``ray.train.get_checkpoint()`` returns."""
    from ray.train import Checkpoint

    from reid_core import storage
    from reid_core.train.checkpoint import checkpoint_to_resume

    run_path, fs = storage.ray_storage(f"{s3_url}/run")
    names = ["checkpoint_2026-11-25_10-00-00.000000", "checkpoint_2026-11-25_10-05-00.000000"]
    assert checkpoint_to_resume(None, run_path, fs) is None  # a fresh run: nothing to resume
    for name in names:
        with fs.open_output_stream(f"{run_path}/{name}/meta.json") as f:
            f.write(b"{}")
    with fs.open_output_stream(f"{run_path}/checkpoint_manager_snapshot.json") as f:  # Ray's own files: not checkpoints
        f.write(b"{}")
    registered = Checkpoint(path=f"{run_path}/{names[0]}", filesystem=fs)
    with caplog.at_level(logging.INFO, logger="reid_core.train.checkpoint"):
        chosen = checkpoint_to_resume(registered, run_path, fs)
    assert chosen.path.endswith(names[1])
    assert "newer than Ray's last registered checkpoint" in caplog.text
    assert checkpoint_to_resume(None, run_path, fs).path.endswith(names[1])  # Ray knows none (no snapshot written)
    newest = Checkpoint(path=f"{run_path}/{names[1]}", filesystem=fs)
    assert checkpoint_to_resume(newest, run_path, fs) is newest  # Ray's is the newest: used as it is
