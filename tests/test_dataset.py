"""Images, the ReIDDataset (bad-image policies, batched reads), transforms and the P×K identity sampler."""

from __future__ import annotations

import io
import logging
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from reid_core import storage
from reid_core.data.dataset import (
    BadImageError,
    RandomIdentitySampler,
    ReIDDataset,
    build_transforms,
    load_image,
)
from reid_core.data.layouts import Record


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise_image(seed: int, size=(16, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def solid(color, size=(8, 16)) -> Image.Image:
    return Image.new("RGB", size, color)


def make_records(tmp_path, pids=(0, 0, 1, 1, 2, 2), faces=None) -> list[Record]:
    """One small JPEG per record; record i is a solid colour with red channel 10·i (so samples are traceable)."""
    records = []
    for i, pid in enumerate(pids):
        path = tmp_path / f"img_{i:03d}.jpg"
        path.write_bytes(encode(solid((10 * i, 100, 200))))
        face = None if faces is None else faces[i]
        records.append(Record(path=str(path), pid=pid, camid=i % 3, face=face))
    return records


# ---------------------------------------------------------------------------------------------------------------
# load_image


def test_load_image_from_path_and_bytes_gives_rgb(tmp_path):
    gray = Image.new("L", (6, 10), 128)
    (tmp_path / "gray.png").write_bytes(encode(gray, "PNG"))
    image = load_image(tmp_path / "gray.png")
    assert image.mode == "RGB" and image.size == (6, 10)
    assert image.getpixel((0, 0)) == (128, 128, 128)
    rgba = load_image(encode(Image.new("RGBA", (4, 4), (10, 20, 30, 0)), "PNG"), path="x.png")
    assert rgba.mode == "RGB" and rgba.getpixel((1, 1)) == (10, 20, 30)


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_raises_at_every_cut(progressive):
    data = encode(noise_image(0), quality=90, progressive=progressive)
    assert load_image(data, path="whole.jpg").size == (16, 32)
    for cut in range(1, len(data)):
        with pytest.raises(BadImageError, match=r"bad image s3://b/cut\.jpg: (cannot decode|truncated JPEG)"):
            load_image(data[:cut], path="s3://b/cut.jpg")
    # libjpeg alone accepts a baseline file that lacks only (part of) its end-of-image marker
    with pytest.raises(BadImageError, match="last-byte.jpg: (cannot decode|truncated JPEG)"):
        load_image(data[:-1], path="last-byte.jpg")
    assert load_image(data + b"trailing bytes after the end-of-image marker", path="t.jpg").size == (16, 32)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9, 0.999])
def test_truncated_jpeg_raises_even_with_pil_truncation_flag(monkeypatch, fraction):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(noise_image(1, size=(64, 128)))
    with pytest.raises(BadImageError, match="cut.jpg"):
        load_image(data[: int(len(data) * fraction)], path="cut.jpg")
    assert load_image(data, path="whole.jpg").mode == "RGB"


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty file"), (b"this is not an image at all", "cannot decode"), (b"\xff\xd8\xff\xe0garbage", "decode")],
)
def test_non_image_bytes_raise_naming_the_path(data, reason):
    with pytest.raises(BadImageError, match=f"bad image /data/x.jpg: .*{reason}") as err:
        load_image(data, path="/data/x.jpg")
    assert err.value.path == "/data/x.jpg"
    assert "BytesIO" not in str(err.value)  # the message names the file, not PIL's in-memory buffer


def test_missing_file_raises_bad_image(tmp_path):
    with pytest.raises(BadImageError, match="missing.jpg: file not found"):
        load_image(str(tmp_path / "missing.jpg"))


# ---------------------------------------------------------------------------------------------------------------
# transforms


def test_transforms_shape_normalisation_and_flip():
    image = Image.fromarray(np.tile(np.arange(16, dtype=np.uint8)[None, :, None] * 16, (32, 1, 3)))
    eval_t = build_transforms(32, 16, train=False)
    out = eval_t(image)
    assert out.shape == (3, 32, 16) and out.dtype == torch.float32
    expected = (16 * 15 / 255 - 0.485) / 0.229
    assert out[0, 0, -1].item() == pytest.approx(expected, abs=1e-5)
    flipped = build_transforms(32, 16, train=True, flip_p=1.0)(image)
    assert torch.allclose(flipped, out.flip(-1))
    padded = build_transforms(32, 16, train=True, flip_p=0.0, pad=4)(image)
    assert padded.shape == (3, 32, 16)
    plain = build_transforms(64, 32, train=False, mean=(0, 0, 0), std=(1, 1, 1))(image)
    assert plain.shape == (3, 64, 32) and 0 <= plain.min() and plain.max() <= 1


# ---------------------------------------------------------------------------------------------------------------
# ReIDDataset


def test_dataset_sample_fields(tmp_path):
    records = make_records(tmp_path, faces=[True, False, None, True, False, None])
    ds = ReIDDataset(records, build_transforms(16, 8, train=False, mean=(0, 0, 0), std=(1, 1, 1)))
    assert len(ds) == 6
    sample = ds[3]
    assert sample["image"].shape == (3, 16, 8)
    assert sample["image"][0].mean().item() == pytest.approx(30 / 255, abs=0.02)
    assert (sample["pid"], sample["camid"], sample["face"], sample["index"], sample["skipped"]) == (1, 0, 1, 3, 0)
    assert [ds[i]["face"] for i in range(6)] == [1, 0, -1, 1, 0, -1]
    assert ReIDDataset(records)[0]["image"].dtype == torch.uint8  # no transform: the decoded image as a tensor


def test_dataset_crops_boxes(tmp_path):
    left_right = Image.new("RGB", (8, 8), (255, 0, 0))
    left_right.paste((0, 0, 255), (4, 0, 8, 8))
    (tmp_path / "frame.png").write_bytes(encode(left_right, "PNG"))
    right = Record(path=str(tmp_path / "frame.png"), pid=0, camid=0, box=(4, 0, 4, 8))
    outside = Record(path=str(tmp_path / "frame.png"), pid=0, camid=0, box=(20, 20, 4, 4))
    ds = ReIDDataset([right, outside])
    image = ds[0]["image"]
    assert image.shape == (3, 8, 4) and image[2].min() == 255 and image[0].max() == 0
    with pytest.raises(BadImageError, match="lies outside the 8×8 image"):
        ds[1]


def test_draft_decoding_is_smaller_never_below_the_target_and_close_after_resize(tmp_path):
    from reid_core.data.synthetic import SyntheticSpec, jpeg_bytes, plan, render

    spec = SyntheticSpec(ids=2, cameras=2, images_per_id=2)
    item = next(p for p in plan(spec, "msmt17") if p.size == (256, 128))
    data = jpeg_bytes(render(spec, item))
    full = load_image(data, path="p.jpg")
    draft = load_image(data, path="p.jpg", draft_size=(100, 50))  # 1/2 scale is the smallest that stays >= 100×50
    assert full.size == (128, 256) and draft.size == (64, 128)
    resize = build_transforms(64, 32, train=False, mean=(0, 0, 0), std=(1, 1, 1))
    assert (resize(full) - resize(draft)).abs().mean() < 2 / 255  # the same picture after the training resize
    assert load_image(encode(noise_image(1, (64, 128)), "PNG"), path="n.png", draft_size=(32, 16)).size == (64, 128)
    with pytest.raises(BadImageError, match="cut.jpg"):
        load_image(data[: len(data) // 2], path="cut.jpg", draft_size=(100, 50))
    # The dataset drafts only records without a box (a box indexes the full-size image).
    path = tmp_path / "p.jpg"
    path.write_bytes(data)
    ds = ReIDDataset([Record(str(path), 0, 0), Record(str(path), 0, 0, box=(0, 0, 128, 256))], decode_size=(100, 50))
    assert ds[0]["image"].shape == (3, 128, 64) and ds[1]["image"].shape == (3, 256, 128)
    assert [s["image"].shape for s in ds.__getitems__([0, 1])] == [(3, 128, 64), (3, 256, 128)]


def test_bad_image_raises_by_default(tmp_path):
    records = make_records(tmp_path)
    (tmp_path / "img_002.jpg").write_bytes(b"\x00" * 50)
    ds = ReIDDataset(records, build_transforms(16, 8, train=False))
    with pytest.raises(BadImageError, match="img_002.jpg"):
        ds[2]
    with pytest.raises(BadImageError, match="img_002.jpg"):
        ds.__getitems__([0, 2])


def test_skip_replaces_with_same_identity_counts_and_logs(tmp_path, caplog):
    records = make_records(tmp_path)
    data = (tmp_path / "img_002.jpg").read_bytes()
    (tmp_path / "img_002.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG, identity 1
    ds = ReIDDataset(records, build_transforms(16, 8, train=False), on_bad_image="skip")
    with caplog.at_level(logging.WARNING, logger="reid_core.data.dataset"):
        sample = ds[2]
    assert (sample["index"], sample["pid"], sample["skipped"]) == (3, 1, 1)  # next image of the same identity
    assert "img_002.jpg" in caplog.text and "img_003.jpg" in caplog.text
    assert ds.stats() == {"skipped": 1, "bad_images": 1}
    assert ds[2]["index"] == 3  # deterministic, and the known-bad image is not read again
    assert ds.stats() == {"skipped": 2, "bad_images": 1}
    assert ds[1]["skipped"] == 0


def test_skip_falls_back_to_other_identities_then_gives_up(tmp_path):
    records = make_records(tmp_path)
    for i in (2, 3):
        (tmp_path / f"img_{i:03d}.jpg").write_bytes(b"garbage")
    ds = ReIDDataset(records, on_bad_image="skip")
    sample = ds[2]
    assert (sample["index"], sample["pid"]) == (4, 2)  # identity 1 has no good image: next record
    assert ds.stats() == {"skipped": 1, "bad_images": 2}
    (tmp_path / "img_003.jpg").unlink()  # a missing file counts as bad too
    all_bad = ReIDDataset(records[2:4], on_bad_image="skip")
    with pytest.raises(BadImageError, match="no good replacement"):
        all_bad[0]
    with pytest.raises(ValueError, match="on_bad_image='drop' must be one of raise, skip"):
        ReIDDataset(records, on_bad_image="drop")


def test_batch_fetch_reads_all_paths_at_once_and_matches_single_reads(tmp_path, monkeypatch):
    records = make_records(tmp_path, pids=(0, 0, 1, 1, 2, 2, 3, 3))
    calls = []
    read_many = storage.read_many

    def counting_read_many(urls, settings=None, batch_size=64):
        urls = list(urls)
        calls.append((len(urls), batch_size))
        return read_many(urls, settings, batch_size=batch_size)

    monkeypatch.setattr(storage, "read_many", counting_read_many)
    ds = ReIDDataset(records, build_transforms(16, 8, train=False), read_batch_size=8)
    loader = DataLoader(ds, batch_size=4, shuffle=False)
    batches = list(loader)
    assert calls == [(4, 8), (4, 8)]
    assert batches[1]["pid"].tolist() == [2, 2, 3, 3]
    assert batches[0]["image"].shape == (4, 3, 16, 8)
    assert torch.equal(batches[1]["image"][1], ds[5]["image"])
    assert batches[1]["path"] == [r.path for r in records[4:]]


def test_batch_fetch_with_missing_file_skips_and_reports_in_the_batch(tmp_path):
    records = make_records(tmp_path)
    (tmp_path / "img_004.jpg").unlink()
    ds = ReIDDataset(records, build_transforms(16, 8, train=False), on_bad_image="skip")
    batch = next(iter(DataLoader(ds, batch_size=6)))
    assert batch["skipped"].tolist() == [0, 0, 0, 0, 1, 0]
    assert batch["index"].tolist() == [0, 1, 2, 3, 5, 5]
    assert int(batch["skipped"].sum()) == ds.stats()["skipped"] == 1


@pytest.mark.slow
def test_skips_are_counted_through_worker_processes(tmp_path):
    records = make_records(tmp_path, pids=tuple(i // 2 for i in range(12)))
    (tmp_path / "img_007.jpg").write_bytes(b"broken")
    ds = ReIDDataset(records, build_transforms(16, 8, train=False), on_bad_image="skip")
    loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="forkserver")
    skipped = sum(int(b["skipped"].sum()) for b in loader)
    assert skipped == 1
    assert ds.stats()["skipped"] == 0  # the workers' copies counted it, not this process's


# ---------------------------------------------------------------------------------------------------------------
# RandomIdentitySampler


def sampler_records(counts) -> list[Record]:
    return [Record(path=f"p{pid}_{k}", pid=pid, camid=0) for pid, n in enumerate(counts) for k in range(n)]


def test_sampler_batches_are_p_identities_times_k():
    records = sampler_records([5, 8, 1, 4, 6, 3, 9, 2])
    sampler = RandomIdentitySampler(records, batch_size=8, num_instances=2, seed=3)
    order = list(sampler)
    assert len(order) == len(sampler) and len(order) % 8 == 0 and len(order) >= 8
    for start in range(0, len(order), 8):
        pids = Counter(records[i].pid for i in order[start : start + 8])
        assert len(pids) == 4 and set(pids.values()) == {2}
    singles = [i for i in order if records[i].pid == 2]
    assert len(singles) in (0, 2) and len(set(singles)) <= 1  # an identity with 1 image is drawn K times


def test_sampler_is_deterministic_per_epoch_and_changes_between_epochs():
    records = sampler_records([6] * 10)
    a = RandomIdentitySampler(records, batch_size=12, num_instances=3, seed=7)
    b = RandomIdentitySampler(records, batch_size=12, num_instances=3, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    epoch2 = list(a)
    a.set_epoch(3)
    assert list(a) != epoch2
    c = RandomIdentitySampler(records, batch_size=12, num_instances=3, seed=8)
    c.set_epoch(2)
    assert list(c) != epoch2
    assert sorted(epoch2) == list(range(60))  # 10 ids × 6 images, all groups used: each image exactly once


def test_sampler_ranks_share_the_epoch_without_overlap():
    records = sampler_records([4, 7, 5, 9, 3, 6, 8, 4, 5, 6])
    single = RandomIdentitySampler(records, batch_size=8, num_instances=4, seed=1)
    single.set_epoch(5)
    batches = np.array(list(single)).reshape(-1, 8)
    ranks = []
    for rank in range(3):
        s = RandomIdentitySampler(records, batch_size=8, num_instances=4, seed=1, rank=rank, world_size=3)
        s.set_epoch(5)
        ranks.append(np.array(list(s)).reshape(-1, 8))
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(batches) // 3
    for rank, got in enumerate(ranks):
        assert np.array_equal(got, batches[rank : len(ranks[0]) * 3 : 3])


def test_gan_loop_rank_shards_are_disjoint_equal_and_per_epoch():
    """The GAN loop's sharding (``DistributedSampler(seed=run.seed, shuffle=True, drop_last=True)`` + ``set_epoch``):
    every rank the same count (collectives need equal step counts), no record on two ranks, the same shards on every
    run for an epoch, other shards the next epoch."""
    from torch.utils.data import DistributedSampler

    def shards(epoch: int, world: int, n: int = 103) -> list[list[int]]:
        out = []
        for rank in range(world):
            sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=7, drop_last=True)
            sampler.set_epoch(epoch)
            out.append(list(sampler))
        return out

    for world in (1, 2, 3):
        epoch0 = shards(0, world)
        assert {len(s) for s in epoch0} == {103 // world}
        flat = [i for s in epoch0 for i in s]
        assert len(set(flat)) == len(flat)
        assert shards(0, world) == epoch0 and shards(1, world) != epoch0


def test_sampler_works_with_dataloader_batches(tmp_path):
    records = make_records(tmp_path, pids=(0, 0, 1, 1, 2, 2, 3, 3))
    sampler = RandomIdentitySampler(records, batch_size=4, num_instances=2, seed=0)
    loader = DataLoader(ReIDDataset(records, build_transforms(16, 8, train=True)), batch_size=4, sampler=sampler)
    batches = list(loader)
    assert len(batches) == len(sampler) // 4 == 2
    for batch in batches:
        assert sorted(Counter(batch["pid"].tolist()).values()) == [2, 2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=6, num_instances=4), "multiple of num_instances"),
        (dict(batch_size=4, num_instances=0), "multiple of num_instances"),
        (dict(batch_size=16, num_instances=2), "needs 8 identities per batch, but the records have only 3"),
        (dict(batch_size=4, num_instances=2, rank=2, world_size=2), r"rank=2 must be in \[0, world_size=2\)"),
    ],
)
def test_sampler_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RandomIdentitySampler(sampler_records([2, 2, 2]), **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# S3 (the loopback moto server of tests/conftest.py)


def test_dataset_reads_s3_batches(s3_url):
    records = []
    for i in range(6):
        url = storage.join(s3_url, f"dataset/img_{i}.jpg")
        storage.write_bytes(url, encode(solid((40 * i, 0, 0))) if i != 4 else b"corrupt")
        records.append(Record(path=url, pid=i // 2, camid=0))
    ds = ReIDDataset(records, build_transforms(16, 8, train=False), on_bad_image="skip")
    batch = next(iter(DataLoader(ds, batch_size=6)))
    assert batch["index"].tolist() == [0, 1, 2, 3, 5, 5]
    assert batch["skipped"].tolist() == [0, 0, 0, 0, 1, 0]
    with pytest.raises(BadImageError, match="img_4.jpg"):
        ReIDDataset(records).__getitems__([4])
    missing = Record(path=storage.join(s3_url, "dataset/missing.jpg"), pid=0, camid=0)
    with pytest.raises(BadImageError, match="missing.jpg: file not found"):
        ReIDDataset([missing])[0]


# ---------------------------------------------------------------------------------------------------------------
# read-ahead (issue 18): the next batches' bytes are read while the current one is decoded


def test_read_ahead_reads_the_next_batches_early_and_gives_the_same_batches(s3_url):
    from torch.utils.data import BatchSampler, SequentialSampler

    records = []
    for i in range(12):
        url = storage.join(s3_url, f"ahead/img_{i:02d}.jpg")
        storage.write_bytes(url, encode(solid((20 * i, 0, 0))) if i != 5 else b"corrupt")
        records.append(Record(path=url, pid=i // 2, camid=0))
    transform = build_transforms(16, 8, train=False)
    plain = list(DataLoader(ReIDDataset(records, transform, on_bad_image="skip"), batch_size=3))
    ds = ReIDDataset(records, transform, on_bad_image="skip")
    batches = ds.read_ahead(BatchSampler(SequentialSampler(records), 3, drop_last=False), depth=2)
    assert len(batches) == 4
    ahead_seen = []
    got = []
    for batch in DataLoader(ds, batch_sampler=batches):
        ahead_seen.append(sorted(ds._ahead))  # batches whose bytes are being read or already are
        got.append(batch)
    # While batch 0 is used, batches 1 and 2 are being read; then 2 and 3; then 3; then none.
    assert ahead_seen == [[(3, 4, 5), (6, 7, 8)], [(6, 7, 8), (9, 10, 11)], [(9, 10, 11)], []]
    assert len(got) == len(plain) == 4
    for a, b in zip(got, plain, strict=True):
        assert a["path"] == b["path"] and a["skipped"].tolist() == b["skipped"].tolist()
        assert torch.equal(a["image"], b["image"])
    assert sum(int(b["skipped"].sum()) for b in got) == 1  # the corrupt image, replaced as without read-ahead


def test_read_ahead_dataset_pickles_for_worker_processes(tmp_path):
    import pickle

    from torch.utils.data import BatchSampler, SequentialSampler

    records = make_records(tmp_path)
    ds = ReIDDataset(records, build_transforms(16, 8, train=False))
    list(DataLoader(ds, batch_sampler=ds.read_ahead(BatchSampler(SequentialSampler(records), 2, False))))
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._pool is None and copy._ahead == {}
    assert torch.equal(copy[3]["image"], ds[3]["image"])
    with pytest.raises(ValueError, match="depth=0 must be >= 1"):
        ds.read_ahead([[0, 1]], depth=0)


def test_training_loaders_pin_memory_only_on_gpus():
    from reid_core.train.loops import loader_kwargs

    assert loader_kwargs(0, use_gpu=True) == {"num_workers": 0, "pin_memory": True}
    assert loader_kwargs(0, use_gpu=False) == {"num_workers": 0, "pin_memory": False}
    with_workers = loader_kwargs(4, use_gpu=True)
    assert with_workers["pin_memory"] and with_workers["multiprocessing_context"] == "forkserver"
    assert with_workers["persistent_workers"] and with_workers["prefetch_factor"] >= 2
