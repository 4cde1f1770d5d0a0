"""Packed datasets against the loopback S3: read back as the same splits, same images, few requests; a shard changed
between reads is detected and named; jobs/pack_dataset.py end to end with its one-line input errors. The GAN job
training from a pack through ``ray job submit`` is tests/test_train_gan_job.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from torch.utils.data import DataLoader

from reid_core import storage
from reid_core.data import BadImageError, ReIDDataset, build_transforms, read_layout
from reid_core.data.shards import (
    PACK_INDEX,
    PackError,
    ShardChangedError,
    pack_tree,
    read_members,
    read_pack,
    read_record_bytes,
)
from reid_core.data.synthetic import SyntheticSpec, write_layout
from reid_core.workflows import packing


def pack(*, src: str, out: str, layout: str = "msmt17", **options) -> dict:
    """What ``jobs/pack_dataset.py`` runs after parsing its options: the checks, the pack, its read-back. Returns the
    pack's index; the checks' one-line errors are ``ValueError`` / ``StorageError`` (the job prints them, exit 2)."""
    spec = packing.PackSpec(src=src, layout=layout, out=out, **options)
    splits, stale = packing.check_inputs(spec)
    index, _ = packing.write_pack(spec, splits, stale)
    packing.check_pack(spec, splits)
    return index


def refused(**arguments) -> str:
    """The one-line error of ``pack(**arguments)``, which must refuse before writing anything."""
    with pytest.raises((ValueError, storage.StorageError)) as error:
        pack(**arguments)
    assert len(str(error.value).splitlines()) == 1, str(error.value)
    return str(error.value)


SPEC = SyntheticSpec(ids=6, cameras=3, images_per_id=8, sessions=2, seed=5)
SHARD_BYTES = 64 * 1024  # tiny shards: several per dataset


def synthetic(url: str, layout: str) -> None:
    files: dict[str, bytes] = {}
    write_layout(SPEC, layout, lambda rel, data: files.__setitem__(storage.join(url, rel), data))
    storage.write_many(files)


def comparable(splits) -> dict:
    """Every split's records with paths relative to the dataset root and without shard locations."""
    cut = len(splits.root) + 1
    named = {"train": splits.train, "query": splits.query, "gallery": splits.gallery, "val": splits.val or []}
    return {
        name: [(r.path[cut:], r.pid, r.camid, r.face, r.orig_pid, r.session, r.frame) for r in records]
        for name, records in named.items()
    } | {"pid_map": splits.pid_map}


@pytest.fixture
def packed_msmt17(s3_url):
    src, out = f"{s3_url}/src", f"{s3_url}/packed"
    synthetic(src, "msmt17")
    index = pack_tree(src, out, shard_bytes=SHARD_BYTES, layout="msmt17")
    return src, out, index


def test_pack_reads_back_as_the_same_splits_with_any_option(packed_msmt17):
    src, out, index = packed_msmt17
    assert len(index["shards"]) >= 3 and len(index["files"]) == SPEC.ids * SPEC.images_per_id + 4
    assert set(storage.list_files(out)) == {f"{out}/{PACK_INDEX}"} | {f"{out}/{s['name']}" for s in index["shards"]}
    for options in ({}, {"merge_val": True}):
        plain, packed = read_layout(src, "msmt17", **options), read_layout(out, "msmt17", **options)
        assert comparable(packed) == comparable(plain)
        assert all(r.shard is not None and r.path.startswith(out + "/") for r in packed.train + packed.gallery)
        assert all(r.shard is None for r in plain.train)


def test_packed_and_plain_datasets_give_the_same_samples(packed_msmt17):
    src, out, _ = packed_msmt17
    plain, packed = read_layout(src, "msmt17").gallery, read_layout(out, "msmt17").gallery
    a, b = ReIDDataset(plain), ReIDDataset(packed)
    batch = list(range(len(plain)))
    for x, y in zip(a.__getitems__(batch), b.__getitems__(batch), strict=True):
        assert torch.equal(x["image"], y["image"]) and x["pid"] == y["pid"] and x["camid"] == y["camid"]
    assert torch.equal(a[3]["image"], b[3]["image"])  # single-index access reads its one range


def test_ranged_reads_are_merged_per_shard_and_checked(packed_msmt17, monkeypatch):
    _, out, index = packed_msmt17
    pack = read_pack(out)
    calls = []
    real = storage.read_ranges
    monkeypatch.setattr(
        storage, "read_ranges", lambda requests, *a, **k: calls.append(requests) or real(requests, *a, **k)
    )
    rels = sorted(pack.locations)
    data = read_members([pack.locations[r] for r in rels])  # every file: one request per shard
    assert len(calls) == 1 and len(calls[0]) == len(index["shards"])
    # the bytes are the tar members' bytes
    first_shard = storage.read_bytes(storage.join(out, index["shards"][0]["name"]))
    import io

    with tarfile.open(fileobj=io.BytesIO(first_shard)) as tar:
        for member in tar.getmembers():
            assert tar.extractfile(member).read() == data[rels.index(member.name)]
    # two distant members of one shard: two ranges, returned in the order asked
    far = [rel for rel in rels if pack.locations[rel].url == pack.locations[rels[-1]].url]
    got = read_members([pack.locations[far[-1]], pack.locations[far[0]]], max_gap=0)
    assert got == [data[rels.index(far[-1])], data[rels.index(far[0])]] and len(calls[-1]) == 2


def test_a_shard_overwritten_between_reads_is_detected_and_named(packed_msmt17):
    _, out, index = packed_msmt17
    splits = read_layout(out, "msmt17")
    records = splits.train
    shard_url = records[0].shard.url
    read_record_bytes(records[:4])  # fine before the change
    old = storage.read_bytes(shard_url)
    changed = bytearray(old)
    changed[records[1].shard.offset + 100] ^= 0xFF  # one byte inside an image, same size
    storage.write_bytes(shard_url, bytes(changed))
    with pytest.raises(ShardChangedError, match=rf"shard {shard_url} changed after it was packed \(ETag in the index "):
        read_record_bytes(records[:4])
    # the data loader does not skip it as a bad image: the data changed under the run
    with pytest.raises(ShardChangedError, match="jobs/pack_dataset.py --overwrite"):
        ReIDDataset(records, on_bad_image="skip").__getitems__([0, 1, 2])
    storage.write_bytes(shard_url, old[: records[1].shard.offset + 10])  # now cut short inside the image
    with pytest.raises(ShardChangedError, match=r"should be \d+ bytes at offset"):
        read_record_bytes(records[1:2])
    storage.write_bytes(shard_url, old[: records[1].shard.offset - 1])  # ... or before it
    with pytest.raises(ShardChangedError, match="shorter than the index says"):
        read_record_bytes(records[1:2])


def test_corrupt_image_inside_a_pack_is_a_bad_image(s3_url):
    src, out = f"{s3_url}/src", f"{s3_url}/packed"
    synthetic(src, "market1501")
    victim = read_layout(src, "market1501").train[2].path
    storage.write_bytes(victim, b"not a jpeg")
    pack_tree(src, out, shard_bytes=SHARD_BYTES)
    records = read_layout(out, "market1501").train
    with pytest.raises(BadImageError, match=rf"bad image {out}/bounding_box_train/\S+: cannot decode"):
        ReIDDataset(records).__getitems__([2])
    batch = ReIDDataset(records, on_bad_image="skip").__getitems__([0, 1, 2, 3])
    assert [s["skipped"] for s in batch] == [0, 0, 1, 0]


def test_flima_pack_keeps_face_tags_and_session_options(s3_url):
    src, out = f"{s3_url}/src", f"{s3_url}/packed"
    synthetic(src, "flima")
    pack_tree(src, out, shard_bytes=SHARD_BYTES, layout="flima")
    for options in ({}, {"test_session": "s01", "unknown": "drop"}):
        assert comparable(read_layout(out, "flima", **options)) == comparable(read_layout(src, "flima", **options))


def test_unfinished_or_foreign_pack_is_refused(packed_msmt17):
    _, out, _ = packed_msmt17
    storage.write_bytes(f"{out}/{PACK_INDEX}", b'{"format": "something-else/2"}')
    with pytest.raises(PackError, match=r"pack.json: format 'something-else/2', expected 'reid-pack/1'"):
        read_layout(out, "msmt17")
    storage.delete_files([f"{out}/{PACK_INDEX}"])
    with pytest.raises(PackError, match="is not a finished pack: no pack.json"):
        read_pack(out)


def test_loader_workers_read_packed_and_plain_data_from_s3(packed_msmt17):
    """forkserver workers (s3fs is not fork-safe) open their own filesystem and read the same batches."""
    src, out, _ = packed_msmt17
    records = read_layout(out, "msmt17").train + read_layout(src, "msmt17").gallery  # both forms in one dataset
    ds = ReIDDataset(records, build_transforms(32, 16, train=False), settings=storage.resolve_settings())
    serial = [b["image"] for b in DataLoader(ds, batch_size=8)]
    parallel = DataLoader(ds, batch_size=8, num_workers=2, multiprocessing_context="forkserver")
    got = [b["image"] for b in parallel]
    assert len(got) == len(serial) == 5 and all(torch.equal(x, y) for x, y in zip(got, serial, strict=True))


def test_pack_dataset_job_smoke_test(s3_url):
    src, out = f"{s3_url}/src", f"{s3_url}/packed"
    synthetic(src, "msmt17")
    done = subprocess.run([sys.executable, "jobs/pack_dataset.py", "--src", src, "--layout", "msmt17", "--out", out,
                           "--smoke-test"], env=dict(os.environ), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "read back as the same splits, every image's bytes verified" in done.stdout
    assert len(read_pack(out).index["shards"]) >= 3


def test_pack_dataset_job_input_errors_in_one_line(s3_url):
    src, out = f"{s3_url}/src", f"{s3_url}/packed"
    synthetic(src, "msmt17")
    pack(src=src, out=out, shard_mb=0.1)

    # The job: exit 2, exactly one error line.
    proc = subprocess.run([sys.executable, "jobs/pack_dataset.py", "--src", src, "--layout", "msmt17", "--out", out],
                          env=dict(os.environ), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is not empty; pass --overwrite" in lines[0], lines

    assert "is already a pack" in refused(src=out, out=f"{s3_url}/again")
    assert "lies inside --src" in refused(src=src, out=f"{src}/pack")
    assert "is not a flima tree" in refused(src=src, layout="flima", out=f"{s3_url}/f")
    assert "S3 bucket does not exist: 'no-such-bucket'" in refused(src=src, out="s3://no-such-bucket/p")
    assert "--shard-mb 0.0: expected a positive size" in refused(src=src, out=out, shard_mb=0.0)
    assert len(read_pack(out).index["shards"]) >= 3
    pack(src=src, out=out, overwrite=True, shard_mb=1.0)
    assert len(read_pack(out).index["shards"]) == 1
    assert [u for u in storage.list_files(out) if "shards/" in u] == [f"{out}/shards/shard-00000.tar"]


def test_gan_loop_face_table_reads_packed_records(packed_msmt17):
    """The GAN loop's Δ table reads through ``read_record_bytes`` too: the same Δ from the pack as from the tree."""
    from reid_core.train.loops import face_absent_table, gan_face_detector

    src, out, _ = packed_msmt17
    plain, packed = read_layout(src, "msmt17").query, read_layout(out, "msmt17").query
    with gan_face_detector(0) as detector:
        a = face_absent_table(plain, detector, rank=0, world=1)
        b = face_absent_table(packed, detector, rank=0, world=1)
    assert torch.equal(a, b) and 0 < float(a.mean()) < 1  # some with a face, some without


# ------------------------------------------------------------------------------------------------ --overwrite deletes
@pytest.fixture(params=["s3", "local"])
def base(request, tmp_path):
    """A fresh, empty location: on the loopback S3 server, or a local folder."""
    return request.getfixturevalue("s3_url") if request.param == "s3" else str(tmp_path / "base")


def test_overwrite_deletes_only_the_files_the_old_pack_index_lists(base, caplog):
    caplog.set_level("INFO", logger=packing.__name__)
    src, out = f"{base}/src", f"{base}/packed"
    synthetic(src, "msmt17")
    pack(src=src, out=out, shard_mb=0.05)
    old_shards = [storage.join(out, s["name"]) for s in read_pack(out).index["shards"]]
    assert len(old_shards) >= 3
    neighbours = [f"{out}/shards-backup/shard-00001.tar", f"{out}/shards_notes.md", f"{out}/shards/shard-notes.txt",
                  f"{out}/shards/shard-00099.tar", f"{out}-old/pack.json", f"{base}/packed.md"]  # fmt: skip
    storage.write_many({u: b"not the pack's" for u in neighbours})
    pack(src=src, out=out, overwrite=True, shard_mb=1.0)
    assert f"deleting the old pack at {out} ({len(old_shards) + 1} objects)" in caplog.text
    assert [s["name"] for s in read_pack(out).index["shards"]] == ["shards/shard-00000.tar"]
    assert all(storage.read_bytes(u) == b"not the pack's" for u in neighbours)  # every neighbour is still there
    assert not any(storage.exists(u) for u in old_shards[1:])  # the old pack's other shards are gone


def test_overwrite_refuses_a_target_that_holds_no_pack_and_deletes_nothing(base):
    src, out = f"{base}/src", f"{base}/dataset"
    synthetic(src, "msmt17")
    synthetic(out, "msmt17")  # a real dataset, not a pack
    before = storage.list_files(out)
    assert f"refusing to overwrite {out}: {out} is not a finished pack: no pack.json" in refused(src=src, out=out,
                                                                                              overwrite=True)  # fmt: skip
    assert storage.list_files(out) == before


def test_overwrite_refuses_an_index_that_names_files_a_pack_job_does_not_write(base):
    src, out = f"{base}/src", f"{base}/packed"
    synthetic(src, "msmt17")
    pack(src=src, out=out, shard_mb=1.0)
    index = read_pack(out).index
    index["shards"][0]["name"] = "../victim.txt"
    storage.write_bytes(f"{out}/pack.json", json.dumps(index).encode())
    storage.write_bytes(f"{base}/victim.txt", b"keep")
    err = refused(src=src, out=out, overwrite=True)
    assert "shard name '../victim.txt' is not one that jobs/pack_dataset.py writes" in err, err
    assert storage.read_bytes(f"{base}/victim.txt") == b"keep"


@pytest.mark.parametrize(
    ("src", "out", "expected"),
    [
        ("{base}/src", "{base}/src/./packed", "lies inside --src"),
        ("{base}/src", "{base}/src/a/../packed", "lies inside --src"),
        ("{base}/./src", "{base}/src/packed", "lies inside --src"),
        ("{base}/a/../src", "{base}/src/packed", "lies inside --src"),
        ("{base}/src", "{base}/./src//packed", "lies inside --src"),
        ("{base}/src", "{base}", "lies inside --out"),
        ("{base}/src", "{base}/a/..", "lies inside --out"),
    ],
)
def test_locations_are_normalised_before_the_containment_checks(base, src, out, expected):
    synthetic(f"{base}/src", "msmt17")
    src, out = src.format(base=base), out.format(base=base)
    started = time.monotonic()
    assert expected in refused(src=src, out=out)
    assert time.monotonic() - started < 5
    assert not any("pack.json" in u or "/shards/" in u for u in storage.list_files(base))


def test_a_local_out_linked_into_src_is_inside_src(tmp_path):
    src = tmp_path / "src"
    synthetic(str(src), "msmt17")
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    assert "lies inside --src" in refused(src=str(src), out=str(tmp_path / "link" / "p"))
    assert not (src / "p").exists()
