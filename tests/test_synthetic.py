"""Synthetic datasets in the three real layouts: written to the loopback S3 and read back by ``read_layout``;
deterministic per seed; the face tag matches what dlib's detector finds; ``jobs/make_dataset.py`` end to end."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from reid_core import storage
from reid_core.data import load_image, read_layout
from reid_core.data.synthetic import SyntheticSpec, index_files, jpeg_bytes, plan, render, write_layout
from reid_core.guidance.faces import FaceDetector
from tests import job_runner

SPEC = SyntheticSpec(ids=6, cameras=3, images_per_id=8, sessions=2, extra_share=0.5, seed=3)


def write_to(url: str, spec: SyntheticSpec, layout: str) -> dict[str, int]:
    files: dict[str, bytes] = {}
    counts = write_layout(spec, layout, lambda rel, data: files.__setitem__(storage.join(url, rel), data))
    storage.write_many(files)
    return counts


def planned(spec: SyntheticSpec, layout: str, split: str):
    return [p for p in plan(spec, layout) if p.split == split]


def test_msmt17_on_s3_reads_back_as_planned(s3_url):
    write_to(s3_url, SPEC, "msmt17")
    splits = read_layout(s3_url, "msmt17")
    assert splits.details["version"] == "v1"
    for name in ("train", "val", "query", "gallery"):
        want = planned(SPEC, "msmt17", name)
        got = getattr(splits, name)
        assert sorted(r.path for r in got) == sorted(storage.join(s3_url, p.rel) for p in want)
        by_path = {storage.join(s3_url, p.rel): p for p in want}
        assert all(r.camid == by_path[r.path].camid and r.orig_pid == by_path[r.path].pid for r in got)
    # 3 train ids (8 images: 7 train + 1 val), 3 test ids numbered from 0 again; queries from 2 cameras per id.
    assert splits.num_train_pids == 3 and len(splits.train) == 21 and len(splits.val) == 3
    assert {r.orig_pid for r in splits.query} == {0, 1, 2} and len(splits.query) == 6
    assert len(splits.gallery) == 18 and splits.num_cameras == 3
    for q in splits.query:  # every query has a true match from another camera in the gallery
        assert any(g.pid == q.pid and g.camid != q.camid for g in splits.gallery)


def test_market1501_on_s3_reads_back_with_distractors_and_without_junk(s3_url):
    counts = write_to(s3_url, SPEC, "market1501")
    splits = read_layout(s3_url, "market1501")
    # 3 test ids × 0.5 -> 2 distractors (pid 0, kept in the gallery) and 2 junk images (pid -1, excluded)
    assert counts == {"gallery": 20, "junk": 2, "query": 6, "train": 24}
    assert splits.details == {"excluded_gallery_junk": 2}
    assert len(splits.train) == 24 and splits.num_train_pids == 3
    assert sorted(splits.pid_map) == [1, 2, 3] and sorted(splits.pid_map.values()) == [0, 1, 2]
    assert {r.pid for r in splits.query} == {4, 5, 6}
    assert Counter(r.pid for r in splits.gallery)[0] == 2 and len(splits.gallery) == 20
    want = {storage.join(s3_url, p.rel): p.camid for p in plan(SPEC, "market1501") if p.split != "junk"}
    assert all(want[r.path] == r.camid for r in splits.train + splits.query + splits.gallery)


def test_flima_on_s3_reads_back_with_face_tags_and_sessions(s3_url):
    write_to(s3_url, SPEC, "flima")
    splits = read_layout(s3_url, "flima")
    items = {storage.join(s3_url, p.rel): p for p in plan(SPEC, "flima")}
    assert splits.details["test_session"] == "s02" and splits.details["sessions"] == 2
    assert len(splits.train) + len(splits.query) + len(splits.gallery) == len(items) == 9 * 8
    for r in splits.train + splits.query + splits.gallery:
        p = items[r.path]
        assert (r.face, r.camid, r.orig_pid, r.session) == (p.face, p.camid, p.pid, p.split)
    # 6 known people + "unknown" as the last training class (3 unknown people share it)
    assert splits.num_train_pids == 7 and splits.pid_map["unknown"] == 6
    assert {r.orig_pid for r in splits.query} == set(range(6))
    for q in splits.query:
        assert any(g.pid == q.pid and g.camid != q.camid for g in splits.gallery)
    options = read_layout(s3_url, "flima", test_session="s01", unknown="drop")
    assert {r.session for r in options.train} == {"s02"} and options.num_train_pids == 6


def test_same_seed_same_bytes_other_seed_other_images():
    again = SyntheticSpec(**{**SPEC.__dict__})
    for layout in ("msmt17", "market1501", "flima"):
        a, b = plan(SPEC, layout), plan(again, layout)
        assert a == b
        assert index_files(layout, a) == index_files(layout, b)
        for item in a[:3]:
            assert jpeg_bytes(render(SPEC, item)) == jpeg_bytes(render(again, item))
    other = SyntheticSpec(**{**SPEC.__dict__, "seed": 4})
    first = plan(SPEC, "msmt17")[0]
    assert jpeg_bytes(render(SPEC, first)) != jpeg_bytes(render(other, plan(other, "msmt17")[0]))


def test_face_tag_matches_what_dlib_finds():
    """A tagged image shows the real face (found on most); an untagged one shows none (found on few or none)."""
    spec = SyntheticSpec(ids=6, cameras=3, images_per_id=8, sessions=2, face_share=0.5, seed=11)
    items = plan(spec, "flima")[:40]
    images = [load_image(jpeg_bytes(render(spec, item)), path=item.rel) for item in items]
    with FaceDetector.for_person_crops(workers=2) as detector:  # the setting the GAN loop uses on these images
        found = (1 - detector.detect(images).face_absent).bool().tolist()
    tagged = [f for f, item in zip(found, items, strict=True) if item.face]
    untagged = [f for f, item in zip(found, items, strict=True) if not item.face]
    assert len(tagged) >= 10 and len(untagged) >= 10
    assert sum(tagged) / len(tagged) >= 0.8, f"faces found on {sum(tagged)} of {len(tagged)} tagged images"
    assert sum(untagged) / len(untagged) <= 0.1, f"faces found on {sum(untagged)} of {len(untagged)} untagged images"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ids": 1}, "at least 2 identities"),
        ({"cameras": 1}, "at least 2 cameras"),
        ({"face_share": 1.5}, r"outside \[0, 1\]"),
        ({"head_share": float("nan")}, r"head_share nan is outside \[0.1, 0.5\]"),
        ({"head_share": 0.05}, r"head_share 0.05 is outside"),
        ({"sessions": 1}, "at least 2 sessions"),
    ],
)
def test_bad_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticSpec(**kwargs)


@pytest.mark.parametrize(("head_share", "low", "high"), [(0.25, 0.0, 0.3), (0.4, 0.8, 1.0)])
def test_head_share_decides_whether_faces_survive_resizing_to_128x64(head_share, low, high):
    """The default head (a quarter of the body) carries a face of ~16 px at 128×64, under what HOG finds; the face-rich
    set of the guidance experiment (head 0.4 of the body) keeps ~26 px faces that the person-crop detector finds."""
    spec = SyntheticSpec(ids=8, cameras=2, images_per_id=6, face_share=1.0, head_share=head_share, seed=2)
    images = [render(spec, item).resize((64, 128)) for item in plan(spec, "msmt17")[:24]]
    batch = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).float() / 127.5 - 1
    with FaceDetector.for_person_crops() as detector:
        rate = detector.detect(batch).face_rate
    assert low <= rate <= high, f"face rate {rate:.2f} at 128x64 with head_share {head_share}"


def test_flima_needs_enough_images_per_session():
    with pytest.raises(ValueError, match=r"images_per_id=6 must be >= 4 × sessions=2"):
        plan(SyntheticSpec(images_per_id=6, sessions=2), "flima")


def run_job(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "jobs/make_dataset.py", *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow  # the job end to end, writing a whole dataset into the loopback S3 (CI runs it)
@pytest.mark.parametrize("layout", ["market1501", "flima"])
def test_make_dataset_smoke_test_on_s3(s3_url, s3_env, layout):
    import os

    env = {**os.environ, **s3_env}
    done = run_job(["--layout", layout, "--out", s3_url, "--smoke-test"], env)
    assert done.returncode == 0, done.stderr
    assert "read back:" in done.stdout and f"{layout} at {s3_url}" in done.stdout
    assert len(storage.list_files(s3_url)) == len(plan(SyntheticSpec(ids=4, cameras=2, images_per_id=8, sessions=2),
                                                       layout)) + (1 if layout == "flima" else 0)  # fmt: skip


@pytest.mark.slow  # one job start (the refusals do not depend on the layout: checked once, not per layout)
def test_make_dataset_refuses_a_non_empty_target_and_bad_sizes_in_one_line(s3_url, s3_env):
    import os

    env = {**os.environ, **s3_env}
    storage.write_bytes(f"{s3_url}/someone-elses.txt", b"keep me")
    again = run_job(["--layout", "market1501", "--out", s3_url, "--smoke-test"], env)
    assert (
        again.returncode == 2
        and again.stderr.strip() == f"error: {s3_url} is not empty; pass --overwrite to write into it"
    )
    assert storage.list_files(s3_url) == [f"{s3_url}/someone-elses.txt"]  # nothing written, nothing removed
    bad = job_runner.here(
        "make_dataset.py",
        ["--layout", "flima", "--out", s3_url + "-x", "--ids", "3", "--images-per-id", "5"],
        env=s3_env,
    )  # in this process: no second start
    assert bad.returncode == 2 and bad.stderr.startswith("error: FLIMA: images_per_id=5 must be >= 4 × sessions=3")
