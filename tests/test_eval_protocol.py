"""The evaluation protocol, one definition each (issue #17): flip averaging, test-time face presence, MSMT17's
training split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from reid_core.data import Record, read_layout
from reid_core.data.training_set import MSMT17_PAPER_TRAIN_IMAGES, describe_training_split, face_boxes, head_region
from reid_core.evaluation.features import FeatureModel, RegisteredFeatureModel, extract_features
from reid_core.guidance.faces import FaceDetector

ROOT = Path(__file__).resolve().parents[1]


class Lopsided(nn.Module):
    """A feature model that weighs the left half of the image 100 times the right half: an image and its mirror give
    features of different norms and directions (what separates 'sum of raw' from 'sum of normalised' features)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        return torch.cat([100.0 * x[..., : w // 2].mean((2, 3)), x[..., w // 2 :].mean((2, 3))], 1)


def write_images(tmp_path: Path, n: int) -> list[Record]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        array = np.zeros((32, 16, 3), np.uint8)
        array[:, :8] = rng.integers(0, 255, 3)  # a left half unlike the right half
        array[:, 8:] = rng.integers(0, 40, 3)
        path = tmp_path / f"{i}.png"
        Image.fromarray(array).save(path)
        records.append(Record(path=str(path), pid=i, camid=0, face=True))
    return records


def test_flip_is_the_normalised_sum_of_normalised_features_for_training_form_and_registered_models(tmp_path):
    records = write_images(tmp_path, 4)
    model = Lopsided().eval()
    common = dict(image_size=(32, 16), batch_size=4)
    plain, _, _ = extract_features(model, records, **common)
    flipped, _, _ = extract_features(model, records, flip=True, **common)
    registered, _, _ = extract_features(RegisteredFeatureModel(FeatureModel(model)), records, flip=True, **common)
    # the one definition: normalize(normalize(f(x)) + normalize(f(mirror x))), on both paths
    from reid_core.data import ReIDDataset, build_transforms

    images = torch.stack([s["image"] for s in ReIDDataset(records, build_transforms(32, 16, train=False))])
    with torch.no_grad():
        a, b = model.forward_features(images), model.forward_features(images.flip(-1))
    expected = F.normalize(F.normalize(a, dim=1) + F.normalize(b, dim=1), dim=1)
    assert torch.allclose(flipped, expected, atol=1e-5)
    assert torch.allclose(registered, flipped, atol=1e-5)
    # the test separates the definitions: the raw sum is another feature here
    assert not torch.allclose(F.normalize(a + b, dim=1), expected, atol=1e-2)
    assert not torch.allclose(plain, flipped, atol=1e-2)


def test_test_time_face_presence_comes_from_the_detector_only(tmp_path):
    records = write_images(tmp_path, 3)  # flat colours: no face for dlib, yet every record is tagged "face"
    assert all(r.face for r in records)
    detector = FaceDetector(workers=0)
    found = face_boxes(records, detector)
    assert found == {0: None, 1: None, 2: None}  # the tags never reach evaluation
    oracle = face_boxes(records, detector, oracle_face_tags=True)  # the named analysis / training setting
    assert oracle == {i: head_region(16, 32) for i in range(3)}


def test_msmt17_recipe_trains_on_train_plus_val_and_says_so(tmp_path):
    from tests.test_layouts import MSMT_LISTS, make_msmt17

    cfg = yaml.safe_load((ROOT / "configs/reid_msmt17.yaml").read_text())
    assert cfg["data"]["layout"] == "msmt17" and cfg["data"]["options"] == {"merge_val": True}
    root = str(make_msmt17(tmp_path))
    merged = read_layout(root, "msmt17", **cfg["data"]["options"])
    n_train, n_val = len(MSMT_LISTS["list_train.txt"]), len(MSMT_LISTS["list_val.txt"])
    assert len(merged.train) == n_train + n_val
    line = describe_training_split(merged)
    assert line == (
        f"training split: {n_train + n_val} images of 3 identities (msmt17: list_train.txt {n_train} + "
        f"list_val.txt {n_val}; merge_val=true, the paper's train + val (32,621 on MSMT17 V1))"
    )
    assert MSMT17_PAPER_TRAIN_IMAGES == 30_248 + 2_373
    alone = describe_training_split(read_layout(root, "msmt17"))
    assert f"list_train.txt {n_train}; merge_val=false" in alone and "set data.options.merge_val=true" in alone
