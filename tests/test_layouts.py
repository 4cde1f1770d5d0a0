"""Layouts: exact records from tiny MSMT17 (V1, V2), Market-1501 and FLIMA trees, and every bad-input error."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from reid_core import storage
from reid_core.data.layouts import LAYOUTS, UNKNOWN_PID, LayoutError, Record, read_layout


def jpeg_bytes(color=(200, 40, 40), size=(8, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


JPEG = jpeg_bytes()


def write(root: Path, rel: str, data: bytes | str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


# ---------------------------------------------------------------------------------------------------------------
# Tree builders


def msmt_name(pid: int, k: int, cam: int) -> str:
    return f"{pid:04d}/{pid:04d}_{k:03d}_{cam:02d}_0303morning_{k:04d}_0.jpg"


# list name -> [(pid, k, camera 1-based)]
MSMT_LISTS = {
    "list_train.txt": [(3, 0, 1), (3, 1, 2), (7, 0, 1), (7, 1, 3), (12, 0, 2), (12, 1, 2)],
    "list_val.txt": [(3, 2, 3), (12, 2, 1)],
    "list_query.txt": [(0, 0, 1), (1, 0, 1)],
    "list_gallery.txt": [(0, 1, 2), (0, 2, 15), (1, 1, 2), (1, 2, 4)],
}


def make_msmt17(root: Path, version: str = "v1", lists: dict | None = None) -> Path:
    train_dir, test_dir = {"v1": ("train", "test"), "v2": ("mask_train_v2", "mask_test_v2")}[version]
    lists = MSMT_LISTS if lists is None else lists
    for name, entries in lists.items():
        folder = train_dir if name in ("list_train.txt", "list_val.txt") else test_dir
        lines = []
        for pid, k, cam in entries:
            write(root, f"{folder}/{msmt_name(pid, k, cam)}", JPEG)
            lines.append(f"{msmt_name(pid, k, cam)} {pid}\n")
        write(root, name, "".join(lines))
    return root


MARKET_FILES = {
    "bounding_box_train": [
        "0002_c1s1_000451_01.jpg",
        "0002_c2s1_000551_01.jpg",
        "0007_c3s2_001001_02.jpg",
        "0007_c6s3_002000_01.jpg",
        "-1_c1s1_000001_00.jpg",
    ],
    "query": ["0005_c1s1_001051_00.jpg", "0009_c2s1_000301_00.jpg"],
    "bounding_box_test": [
        "0005_c2s1_000976_01.jpg",
        "0005_c1s1_001101_02.jpg",
        "0009_c3s1_000001_01.jpg",
        "0000_c1s1_000000_01.jpg",
        "-1_c4s1_000002_01.jpg",
    ],
}


def make_market(root: Path, files: dict | None = None) -> Path:
    for folder, names in (MARKET_FILES if files is None else files).items():
        for name in names:
            write(root, f"{folder}/{name}", JPEG)
        write(root, f"{folder}/Thumbs.db", b"not an image")
    return root


FLIMA_HEADER = "session,frame,camera,person,path,face\n"
# session, frame, camera, person, face
FLIMA_ROWS = [
    ("s1", 0, "1", "1", 1),
    ("s1", 1, "1", "1", 0),
    ("s1", 0, "2", "2", 1),
    ("s1", 2, "1", "unknown", 0),
    ("s2", 0, "1", "3", 1),
    ("s2", 5, "2", "1", 0),
    ("s10", 0, "1", "1", 1),
    ("s10", 1, "1", "1", 1),
    ("s10", 2, "1", "1", 0),
    ("s10", 3, "2", "1", 1),
    ("s10", 4, "1", "2", 0),
    ("s10", 1, "2", "unknown", 0),
]


def flima_path(session, frame, camera, person) -> str:
    return f"{session}/cam{camera}/{frame:06d}_{person}.jpg"


def make_flima(root: Path, rows=FLIMA_ROWS, header: str = FLIMA_HEADER) -> Path:
    lines = [header]
    for session, frame, camera, person, face in rows:
        rel = flima_path(session, frame, camera, person)
        write(root, rel, JPEG)
        lines.append(f"{session},{frame},{camera},{person},{rel},{face}\n")
    write(root, "manifest.csv", "".join(lines))
    return root


def basename(record: Record) -> str:
    return record.path.rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------------------------
# MSMT17


def test_msmt17_v1_records_relabelling_and_cameras(tmp_path):
    splits = read_layout(str(make_msmt17(tmp_path)), "msmt17")
    assert (len(splits.train), len(splits.val), len(splits.query), len(splits.gallery)) == (6, 2, 2, 4)
    assert splits.pid_map == {3: 0, 7: 1, 12: 2}
    assert [(r.pid, r.orig_pid) for r in splits.train] == [(0, 3), (0, 3), (1, 7), (1, 7), (2, 12), (2, 12)]
    assert [r.camid for r in splits.train] == [0, 1, 0, 2, 1, 1]
    assert splits.num_train_pids == 3
    assert splits.num_cameras == 15  # camera 15 in the gallery -> camid 14
    assert [(r.pid, r.orig_pid) for r in splits.val] == [(3, 3), (12, 12)]  # val keeps original ids
    assert {r.pid for r in splits.query} == {0, 1}
    assert sorted(r.camid for r in splits.gallery) == [1, 1, 3, 14]
    assert all(r.face is None for r in splits.train)
    assert splits.train[0].path == os.path.join(str(tmp_path), "train", msmt_name(3, 0, 1))
    assert all(os.path.isfile(r.path) for s in (splits.train, splits.val, splits.query, splits.gallery) for r in s)
    assert splits.details["version"] == "v1"
    table = splits.summary()
    assert "msmt17" in table and "num_train_pids=3" in table and "num_cameras=15" in table


def test_msmt17_merge_val_relabels_train_and_val_together(tmp_path):
    lists = dict(MSMT_LISTS, **{"list_val.txt": [(3, 2, 3), (20, 0, 1)]})  # val brings a new identity
    splits = read_layout(str(make_msmt17(tmp_path, lists=lists)), "msmt17", merge_val=True)
    assert splits.val is None
    assert len(splits.train) == 8
    assert splits.pid_map == {3: 0, 7: 1, 12: 2, 20: 3}
    assert splits.num_train_pids == 4
    assert sorted({r.pid for r in splits.train}) == [0, 1, 2, 3]


def test_msmt17_v2_is_detected_and_warns_about_blurred_faces(tmp_path):
    make_msmt17(tmp_path, version="v2")
    with pytest.warns(UserWarning, match="blurred"):
        splits = read_layout(str(tmp_path), "msmt17")
    assert splits.details["version"] == "v2"
    assert "/mask_train_v2/" in splits.train[0].path and "/mask_test_v2/" in splits.query[0].path
    assert len(splits.train) == 6


def test_msmt17_found_one_folder_down_and_without_val_list(tmp_path):
    lists = {k: v for k, v in MSMT_LISTS.items() if k != "list_val.txt"}
    make_msmt17(tmp_path / "MSMT17_V1", lists=lists)
    splits = read_layout(str(tmp_path), "msmt17")
    assert splits.val is None
    assert splits.root.endswith("MSMT17_V1")
    assert len(splits.train) == 6


def test_msmt17_both_versions_need_explicit_version(tmp_path):
    make_msmt17(tmp_path, version="v1")
    make_msmt17(tmp_path, version="v2")
    with pytest.raises(LayoutError, match="version='v1' or 'v2'"):
        read_layout(str(tmp_path), "msmt17")
    with pytest.warns(UserWarning, match="blurred"):
        assert read_layout(str(tmp_path), "msmt17", version="v2").details["version"] == "v2"


def test_msmt17_several_trees_below_root_is_an_error(tmp_path):
    make_msmt17(tmp_path / "MSMT17_V1")
    make_msmt17(tmp_path / "copy")
    with pytest.raises(LayoutError, match="several msmt17 trees"):
        read_layout(str(tmp_path), "msmt17")


# ---------------------------------------------------------------------------------------------------------------
# Market-1501


def test_market1501_junk_distractors_relabelling_and_cameras(tmp_path):
    splits = read_layout(str(make_market(tmp_path)), "market1501")
    assert (len(splits.train), len(splits.query), len(splits.gallery)) == (4, 2, 4)
    assert splits.pid_map == {2: 0, 7: 1}
    assert sorted((r.orig_pid, r.pid, r.camid) for r in splits.train) == [(2, 0, 0), (2, 0, 1), (7, 1, 2), (7, 1, 5)]
    assert all(r.pid != -1 for s in (splits.train, splits.query, splits.gallery) for r in s)
    assert sorted(r.pid for r in splits.gallery) == [0, 5, 5, 9]  # the pid-0 distractor stays
    distractor = next(r for r in splits.gallery if r.pid == 0)
    assert (distractor.camid, distractor.session, distractor.frame) == (0, "1", 0)
    assert splits.num_cameras == 6
    assert splits.details == {"excluded_gallery_junk": 1, "excluded_train_junk": 1}
    assert all(basename(r).endswith(".jpg") for r in splits.train)  # Thumbs.db ignored


def test_market1501_style_names_without_sequence_or_frame(tmp_path):
    files = {
        "bounding_box_train": ["0001_c2_f0046182.jpg", "0001_c5_f0051000.jpg", "0004_c1_f0000100.jpg"],
        "query": ["0010_c8_f0100000.jpg"],
        "bounding_box_test": ["0010_c1_f0000001.jpg"],
    }
    splits = read_layout(str(make_market(tmp_path, files)), "market1501")
    assert [(r.pid, r.camid, r.session, r.frame) for r in splits.train] == [
        (0, 1, None, None),
        (0, 4, None, None),
        (1, 0, None, None),
    ]
    assert splits.num_cameras == 8


def test_market1501_found_one_folder_down(tmp_path):
    make_market(tmp_path / "Market-1501-v15.09.15")
    assert len(read_layout(str(tmp_path), "market1501").train) == 4


# ---------------------------------------------------------------------------------------------------------------
# FLIMA


def test_flima_leave_one_session_out_with_unknown_class(tmp_path):
    splits = read_layout(str(make_flima(tmp_path)), "flima")
    assert splits.details["test_session"] == "s10"  # natural order: s1 < s2 < s10
    assert len(splits.train) == 6
    assert {r.session for r in splits.train} == {"s1", "s2"}
    assert splits.pid_map == {1: 0, 2: 1, 3: 2, "unknown": 3}
    assert splits.num_train_pids == 4
    assert [r.face for r in splits.train] == [True, False, True, False, True, False]
    assert {r.camid for r in splits.train} == {0, 1}
    query = sorted((r.pid, r.camid, r.frame) for r in splits.query)
    assert query == [(1, 0, 0), (1, 1, 3), (2, 0, 4)]  # first frame per (person, camera)
    gallery = sorted((r.pid, r.camid, r.frame) for r in splits.gallery)
    assert gallery == [(UNKNOWN_PID, 1, 1), (1, 0, 1), (1, 0, 2)]
    unknown = next(r for r in splits.gallery if r.pid == UNKNOWN_PID)
    assert unknown.orig_pid == "unknown" and unknown.face is False
    assert all(os.path.isfile(r.path) for r in splits.train + splits.query + splits.gallery)


def test_flima_unknown_drop_test_session_and_queries_per_camera(tmp_path):
    make_flima(tmp_path)
    dropped = read_layout(str(tmp_path), "flima", unknown="drop")
    assert len(dropped.train) == 5 and dropped.pid_map == {1: 0, 2: 1, 3: 2}
    s1 = read_layout(str(tmp_path), "flima", test_session="s1")
    assert {r.session for r in s1.train} == {"s2", "s10"}
    assert sorted((r.pid, r.camid, r.frame) for r in s1.query) == [(1, 0, 0), (2, 1, 0)]
    two = read_layout(str(tmp_path), "flima", queries_per_camera=2)
    assert sorted((r.pid, r.camid, r.frame) for r in two.query) == [(1, 0, 0), (1, 0, 2), (1, 1, 3), (2, 0, 4)]


def test_flima_boxes_in_shared_frames(tmp_path):
    write(tmp_path, "frames/s1_0.jpg", JPEG)
    write(tmp_path, "frames/s2_0.jpg", JPEG)
    manifest = (
        "session,frame,camera,person,path,face,x,y,w,h\n"
        "s1,0,1,1,frames/s1_0.jpg,1,0,0,4,8\n"
        "s1,0,1,2,frames/s1_0.jpg,0,4,0,4,8\n"
        "s2,0,1,1,frames/s2_0.jpg,1,0,0,4,8\n"
        "s2,0,2,1,frames/s2_0.jpg,1,4,8,4,8\n"
        "s2,1,2,1,frames/s2_0.jpg,0,0,8,4,8\n"
    )
    write(tmp_path, "manifest.csv", manifest)
    splits = read_layout(str(tmp_path), "flima")
    assert [r.box for r in splits.train] == [(0, 0, 4, 8), (4, 0, 4, 8)]
    assert {r.box for r in splits.query} == {(0, 0, 4, 8), (4, 8, 4, 8)}
    assert [(r.box, r.frame) for r in splits.gallery] == [((0, 8, 4, 8), 1)]


# ---------------------------------------------------------------------------------------------------------------
# Registry and options


def test_unknown_layout_lists_valid_ones(tmp_path):
    with pytest.raises(LayoutError, match="flima, market1501, msmt17"):
        read_layout(str(tmp_path), "dukemtmc")
    assert set(LAYOUTS) == {"msmt17", "market1501", "flima"}


def test_unknown_option_lists_valid_ones(tmp_path):
    make_msmt17(tmp_path)
    with pytest.raises(LayoutError, match="combineall.*merge_val, version"):
        read_layout(str(tmp_path), "msmt17", combineall=True)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_missing_list_file_names_layout_and_what_was_found(tmp_path):
    make_msmt17(tmp_path)
    (tmp_path / "list_query.txt").unlink()
    with pytest.raises(LayoutError, match="msmt17") as err:
        read_layout(str(tmp_path), "msmt17")
    assert "missing list_query.txt" in str(err.value)
    assert "found list_gallery.txt, list_train.txt, list_val.txt, test/, train/" in str(err.value)


def test_missing_image_folder(tmp_path):
    make_market(tmp_path)
    for f in (tmp_path / "query").iterdir():
        f.unlink()
    (tmp_path / "query").rmdir()
    with pytest.raises(LayoutError, match=r"not a complete market1501 tree: missing query/.*found bounding_box_test/"):
        read_layout(str(tmp_path), "market1501")


def test_msmt17_image_folders_missing(tmp_path):
    write(tmp_path, "list_train.txt", "")
    with pytest.raises(LayoutError, match=r"not a complete msmt17 tree.*train/ \+ test/.*found list_train.txt"):
        read_layout(str(tmp_path), "msmt17")


@pytest.mark.parametrize("layout", ["msmt17", "market1501", "flima"])
def test_empty_or_missing_root(tmp_path, layout):
    with pytest.raises(LayoutError, match=f"not a {layout} tree.*found nothing"):
        read_layout(str(tmp_path / "nowhere"), layout)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("0003/0003_000_01_0303morning_0000_0.jpg 3 extra", "expected 'relative/path.jpg pid'"),
        ("0003/0003_000_01_0303morning_0000_0.jpg three", "person id 'three' is not an integer"),
        ("0003/0003-000-01.jpg 3", "cannot read the camera"),
        ("0003/0003_000_00_0303morning_0000_0.jpg 3", "camera number .* must be >= 1"),
        ("../0003_000_01_0303morning_0000_0.jpg 3", ".* must be a path relative"),
    ],
)
def test_malformed_list_line_names_file_and_line(tmp_path, bad_line, message):
    make_msmt17(tmp_path)
    text = (tmp_path / "list_train.txt").read_text().splitlines()
    text.insert(2, bad_line)
    (tmp_path / "list_train.txt").write_text("\n".join(text) + "\n")
    with pytest.raises(LayoutError, match=f"list_train.txt line 3: {message}"):
        read_layout(str(tmp_path), "msmt17")


def test_listed_image_missing_names_it_and_counts_others(tmp_path):
    make_msmt17(tmp_path)
    extra = [msmt_name(40 + i, 0, 1) for i in range(7)]
    with open(tmp_path / "list_gallery.txt", "a") as f:
        f.writelines(f"{rel} {40 + i}\n" for i, rel in enumerate(extra))
    with pytest.raises(LayoutError) as err:
        read_layout(str(tmp_path), "msmt17")
    message = str(err.value)
    assert message.startswith("7 listed images are missing")
    assert f"test/{extra[0]}" in message and "and 2 others" in message and "list_gallery.txt" in message


def test_zero_training_identities(tmp_path):
    make_msmt17(tmp_path)
    (tmp_path / "list_train.txt").write_text("\n")
    with pytest.raises(LayoutError, match="zero training identities"):
        read_layout(str(tmp_path), "msmt17")


def test_market_only_junk_in_training_is_zero_identities(tmp_path):
    files = dict(MARKET_FILES, bounding_box_train=["-1_c1s1_000001_00.jpg"])
    make_market(tmp_path, files)
    with pytest.raises(LayoutError, match="zero training identities"):
        read_layout(str(tmp_path), "market1501")


def test_market_malformed_file_name(tmp_path):
    make_market(tmp_path)
    write(tmp_path, "query/person_5.jpg", JPEG)
    with pytest.raises(LayoutError, match=r"1 file names .* do not match PPPP_cCsS_FFFFFF_BB.jpg.*query/person_5.jpg"):
        read_layout(str(tmp_path), "market1501")


def test_duplicate_path_within_a_list(tmp_path):
    make_msmt17(tmp_path)
    with open(tmp_path / "list_train.txt", "a") as f:
        f.write(f"{msmt_name(3, 0, 1)} 3\n")
    with pytest.raises(LayoutError, match=r"duplicate image .*list_train.txt line 1 and .*list_train.txt line 7"):
        read_layout(str(tmp_path), "msmt17")


def test_duplicate_path_across_train_and_val(tmp_path):
    make_msmt17(tmp_path)
    with open(tmp_path / "list_val.txt", "a") as f:
        f.write(f"{msmt_name(7, 1, 3)} 7\n")
    with pytest.raises(LayoutError, match=r"duplicate image 'train/0007/.*list_train.txt line 4 and .*list_val.txt"):
        read_layout(str(tmp_path), "msmt17")


def test_flima_duplicate_rows(tmp_path):
    make_flima(tmp_path, rows=FLIMA_ROWS + [FLIMA_ROWS[1]])
    with pytest.raises(LayoutError, match="duplicate image 's1/cam1/000001_1.jpg' on lines 3 and 14"):
        read_layout(str(tmp_path), "flima")


@pytest.mark.parametrize(
    "row, message",
    [
        ("s1,7,1,bob,s1/cam1/000000_1.jpg,1", "line 15: person 'bob' is neither an integer nor 'unknown'"),
        ("s1,7,1,1,s1/cam1/000000_1.jpg,yes", "line 15: face tag 'yes' must be 0 or 1"),
        ("s1,seven,1,1,s1/cam1/000000_1.jpg,1", "line 15: frame 'seven' is not an integer"),
        ("s1,7,1,1,s1/cam1/000000_1.jpg", "line 15: expected 6 fields"),
        ("s1,7,1,-3,s1/cam1/000000_1.jpg,1", "line 15: person id -3 must be >= 0"),
    ],
)
def test_flima_malformed_row_names_file_and_line(tmp_path, row, message):
    make_flima(tmp_path)
    with open(tmp_path / "manifest.csv", "a") as f:
        f.write("\n" + row + "\n")  # line 14 is blank (skipped), the bad row is line 15
    with pytest.raises(LayoutError, match=f"manifest.csv {message}"):
        read_layout(str(tmp_path), "flima")


def test_flima_header_required(tmp_path):
    make_flima(tmp_path, header="")
    with pytest.raises(LayoutError, match="line 1: the header must name the columns .*missing session"):
        read_layout(str(tmp_path), "flima")


def test_flima_missing_image(tmp_path):
    make_flima(tmp_path)
    os.remove(tmp_path / flima_path("s2", 0, "1", "3"))
    with pytest.raises(LayoutError, match="1 images named in .*manifest.csv are missing .*s2/cam1/000000_3.jpg"):
        read_layout(str(tmp_path), "flima")


def test_flima_sessions(tmp_path):
    make_flima(tmp_path)
    with pytest.raises(LayoutError, match="test_session 's3' is not in .*sessions: s1, s2, s10"):
        read_layout(str(tmp_path), "flima", test_session="s3")
    single = tmp_path / "single"
    make_flima(single, rows=[r for r in FLIMA_ROWS if r[0] == "s1"])
    with pytest.raises(LayoutError, match="at least two sessions"):
        read_layout(str(single), "flima")


def test_flima_zero_identities(tmp_path):
    make_flima(tmp_path, rows=[])
    with pytest.raises(LayoutError, match="no rows"):
        read_layout(str(tmp_path), "flima")
    only_unknown = tmp_path / "unknown"
    rows = [(s, f, c, "unknown", t) for s, f, c, _, t in FLIMA_ROWS[:6]] + FLIMA_ROWS[6:]
    make_flima(only_unknown, rows=rows)
    with pytest.raises(LayoutError, match="zero known training identities"):
        read_layout(str(only_unknown), "flima")


# ---------------------------------------------------------------------------------------------------------------
# S3 (the loopback moto server of tests/conftest.py)


def upload_tree(local: Path, url: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(url, path.relative_to(local).as_posix()), path.read_bytes())


@pytest.mark.parametrize("layout", ["msmt17", "market1501", "flima"])
def test_layouts_on_s3_match_local(tmp_path, s3_url, layout):
    builders = {"msmt17": make_msmt17, "market1501": make_market, "flima": make_flima}
    local = builders[layout](tmp_path / layout)
    url = storage.join(s3_url, f"layouts-{layout}")
    upload_tree(local, url)
    remote, here = read_layout(url, layout), read_layout(str(local), layout)
    for name in ("train", "query", "gallery"):
        got = [(r.path[len(url) :], r.pid, r.camid, r.face, r.orig_pid) for r in getattr(remote, name)]
        want = [(r.path[len(str(local)) :], r.pid, r.camid, r.face, r.orig_pid) for r in getattr(here, name)]
        assert got == want
    assert all(r.path.startswith(url + "/") for r in remote.train)
    assert storage.read_bytes(remote.train[0].path) == JPEG
