"""The re-ID job's pure parts: distractor set reading, training records, mixed batches, config validation,
feature extraction and evaluation (tiny images on the local disk; no Ray, no services)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from reid_core.config import ConfigError, ReidJobConfig, load_config
from reid_core.data import Record
from reid_core.data.training_set import (
    DISTRACTOR_PID,
    DistractorSetError,
    FaceStreamDataset,
    MixedBatchSampler,
    distractors_per_batch,
    limit_training,
    read_distractor_set,
    training_records,
)
from reid_core.evaluation.features import (
    DualStreamFeatureModel,
    FeatureModel,
    classify_identities,
    evaluate_splits,
    extract_features,
)
from reid_core.train.loops import cosine_lr

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ fixtures
def write_image(path: Path, colour, size=(32, 16), seed: int = 0) -> str:
    """A (H, W) = size image of one colour with a little noise; returns its path."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour, dtype=float) + rng.normal(0, 4, (*size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return str(path)


def write_distractor_set(folder: Path, n: int, *, complete: bool = True, listed: int | None = None) -> str:
    """A set in jobs/synthesize.py's format: images/, manifest.csv, and (if complete) distractors.json last."""
    rows = []
    for i in range(n):
        write_image(folder / "images" / f"{i:06d}.jpg", (128, 128, 128), seed=i)
        rows.append((f"images/{i:06d}.jpg", i, 0, i % 2))
    with open(folder / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("path", "index", "seed", "face_absent"))
        writer.writerows(rows)
    if complete:
        meta = {"format": "reid-distractors/1", "num_images": n if listed is None else listed, "manifest": "manifest.csv",
                "images": "images/", "image_size": [32, 16], "generator": {"pinned_uri": "models:/g/1"}}  # fmt: skip
        (folder / "distractors.json").write_text(json.dumps(meta))
    return str(folder)


def real_records(num_ids: int = 4, per_id: int = 6) -> list[Record]:
    return [Record(path=f"/x/{p}_{i}.jpg", pid=p, camid=i % 2) for p in range(num_ids) for i in range(per_id)]


# ------------------------------------------------------------------------------------------------ records
def test_training_records_put_the_distractors_last_as_class_n(tmp_path):
    distractors = read_distractor_set(write_distractor_set(tmp_path / "set", 5))
    assert len(distractors) == 5 and distractors.paths[0] == str(tmp_path / "set" / "images" / "000000.jpg")
    real = real_records(num_ids=3, per_id=4)
    training = training_records(real, distractors)
    assert (training.num_classes, training.num_real, training.num_generated) == (3, 12, 5)
    assert training.distractor_class == 3 and training.distractors_uri == str(tmp_path / "set")
    assert training.records[:12] == real
    generated = training.records[12:]
    assert [r.pid for r in generated] == [3] * 5 and {r.orig_pid for r in generated} == {DISTRACTOR_PID}
    assert [r.face for r in generated] == [True, False, True, False, True]  # face = not Δ
    assert training.is_generated.tolist() == [False] * 12 + [True] * 5
    assert training_records(real).num_generated == 0 and training_records(real).is_generated.sum() == 0


def test_an_incomplete_distractor_set_is_refused(tmp_path):
    folder = write_distractor_set(tmp_path / "set", 3, complete=False)
    with pytest.raises(DistractorSetError, match=r"incomplete: no distractors.json .*--overwrite"):
        read_distractor_set(folder)


def test_a_set_whose_manifest_disagrees_with_its_metadata_is_refused(tmp_path):
    with pytest.raises(DistractorSetError, match="says 4 images, .* lists 3"):
        read_distractor_set(write_distractor_set(tmp_path / "a", 3, listed=4))
    folder = Path(write_distractor_set(tmp_path / "b", 3))
    (folder / "manifest.csv").write_text("path,index,seed,face_absent\nimages/000000.jpg,1,0,0\n")
    with pytest.raises(DistractorSetError, match="line 2: expected index 0"):
        read_distractor_set(str(folder))


def test_max_images_takes_the_first_images_of_the_set(tmp_path):
    folder = write_distractor_set(tmp_path / "set", 6)
    assert [Path(p).name for p in read_distractor_set(folder, max_images=2).paths] == ["000000.jpg", "000001.jpg"]
    with pytest.raises(DistractorSetError, match="max_images=0"):
        read_distractor_set(folder, max_images=0)


def test_training_labels_must_be_zero_to_n_minus_one_and_limiting_relabels():
    records = [Record(path=f"/x/{i}.jpg", pid=p, camid=0, orig_pid=100 + p) for i, p in enumerate([2, 2, 5, 5])]
    with pytest.raises(ValueError, match="labels must be 0..N-1"):
        training_records(records)
    relabelled, pid_map = limit_training(records, None)
    assert [r.pid for r in relabelled] == [0, 0, 1, 1] and pid_map == {102: 0, 105: 1}
    first, first_map = limit_training(records, 3)
    assert [r.pid for r in first] == [0, 0, 1] and first_map == {102: 0, 105: 1}
    assert training_records(relabelled).num_classes == 2


# ------------------------------------------------------------------------------------------------ batches
def test_distractors_per_batch_defaults_to_the_share_of_the_set():
    assert distractors_per_batch(batch_size=32, num_real=100, num_generated=150, per_batch=None) == 48
    assert distractors_per_batch(batch_size=32, num_real=1000, num_generated=1, per_batch=None) == 1
    assert distractors_per_batch(batch_size=32, num_real=100, num_generated=150, per_batch=5) == 5
    assert distractors_per_batch(batch_size=32, num_real=100, num_generated=0, per_batch=5) == 0


def test_mixed_batches_hold_p_identities_of_k_images_then_distinct_distractors(tmp_path):
    distractors = read_distractor_set(write_distractor_set(tmp_path / "set", 10))
    training = training_records(real_records(num_ids=6, per_id=8), distractors)

    def batches(rank: int, epoch: int) -> list[list[int]]:
        sampler = MixedBatchSampler(training, identities_per_batch=3, images_per_identity=2, distractors_per_batch=2,
                                    seed=1, rank=rank, world_size=2)  # fmt: skip
        sampler.set_epoch(epoch)
        assert sampler.batch_size == 8
        out = list(sampler)
        assert len(out) == len(sampler) > 0
        return out

    ranks = [batches(0, 0), batches(1, 0)]
    assert len(ranks[0]) == len(ranks[1])  # equal step counts on every rank
    used = []
    for batch in ranks[0] + ranks[1]:
        real, generated = batch[:6], batch[6:]
        pids = [training.records[i].pid for i in real]
        assert len(set(pids)) == 3 and all(pids.count(p) == 2 for p in set(pids))  # P × K
        assert all(training.is_generated[i] for i in generated) and not any(training.is_generated[i] for i in real)
        used += generated
    assert len(set(used)) == min(len(used), 10)  # no distractor repeats before the set is used up
    assert batches(0, 0) == ranks[0] and batches(0, 1) != ranks[0]  # deterministic per (seed, epoch)
    with pytest.raises(ValueError, match="has no distractors"):
        MixedBatchSampler(training_records(real_records()), identities_per_batch=2, images_per_identity=2,
                          distractors_per_batch=1)  # fmt: skip


def test_cosine_schedule_runs_from_the_base_rate_to_zero():
    assert cosine_lr(0.1, 0.0) == pytest.approx(0.1) and cosine_lr(0.1, 0.5) == pytest.approx(0.05)
    assert cosine_lr(0.1, 1.0) == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("name", ["reid_demo", "reid_msmt17", "reid_flima"])
def test_shipped_configs_load(name):
    cfg = load_config(ReidJobConfig, ROOT / "configs" / f"{name}.yaml")
    assert cfg.batch_size == cfg.optim.identities_per_batch * cfg.optim.images_per_identity


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.mode=soft"], "loss.mode: 'soft' is not one of distractor_class, lsro"),
        (["model.name=resnet18"], "model.name: 'resnet18' is not one of"),
        (["model.name=dual_stream", "data.image_size=[128,64]"], "square person images"),
        (["model.name=dual_stream", "data.image_size=[64,64]", "model.face_size=32"], "model.face_size: 32 must equal"),
        (["data.image_size=[16,8]"], "condensenet74 needs sides of at least 32 px"),
        (["distractors.per_batch=-1"], "distractors.per_batch: expected ≥ 0"),
        (["optim.images_per_identity=0"], "optim.images_per_identity: expected a positive value"),
        (["optim.momentum=1.5"], "optim.momentum"),
        (["eval.metric=manhattan"], "eval.metric"),
        (["loss.group_lasso=-1e-5"], "loss.group_lasso: expected ≥ 0"),
        (["optim.batch_size=64"], "unknown key 'optim.batch_size'"),
    ],
)
def test_invalid_configs_fail_with_the_key_to_fix(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(ReidJobConfig, None, overrides)


def test_defaults_are_the_authors_recipe():
    cfg = load_config(ReidJobConfig)
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov) == ("sgd", 0.1, 0.9, True)
    assert (cfg.optim.weight_decay, cfg.optim.schedule, cfg.loss.group_lasso) == (1e-4, "cosine", 1e-5)
    assert cfg.tracking.registered_model == "reid-condensenet" and cfg.tracking.alias == "candidate"
    assert cfg.model.name == "condensenet74" and cfg.data.image_size == (256, 128)


# ------------------------------------------------------------------------------------------------ evaluation
COLOURS = {0: (220, 30, 30), 1: (30, 220, 30), 2: (30, 30, 220)}


class MeanColour(nn.Module):
    """Feature = the image's mean per channel (3-d): images of one colour match. Head: channel scores, and a huge
    distractor logit that classification must ignore."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return torch.cat([f, torch.full_like(f[:, :1], 1e3)], 1)


def coloured_records(tmp_path: Path, pids: list[int], camid: int, tag: str) -> list[Record]:
    return [
        Record(path=write_image(tmp_path / f"{tag}_{i}.png", COLOURS[p % 3], seed=i), pid=p, camid=camid)
        for i, p in enumerate(pids)
    ]


def test_features_are_normalised_and_identities_rank_first(tmp_path):
    query = coloured_records(tmp_path, [0, 1, 2], camid=0, tag="q")
    gallery = coloured_records(tmp_path, [0, 1, 2, 0, 1, 2], camid=1, tag="g")
    feats, pids, camids = extract_features(MeanColour(), query, image_size=(32, 16), batch_size=2)
    assert feats.shape == (3, 3) and torch.allclose(feats.norm(dim=1), torch.ones(3))
    assert pids.tolist() == [0, 1, 2] and camids.tolist() == [0, 0, 0]
    flipped, _, _ = extract_features(MeanColour(), query, image_size=(32, 16), batch_size=2, flip=True)
    assert torch.allclose(flipped, feats, atol=1e-6)  # the mean colour does not change under a mirror
    metrics, result = evaluate_splits(MeanColour(), query, gallery, image_size=(32, 16), batch_size=4, max_rank=5)
    assert metrics["rank1"] == 1.0 and metrics["mAP"] == 1.0 and result.num_valid_queries == 3


def test_the_distractor_class_never_enters_evaluation(tmp_path):
    query = coloured_records(tmp_path, [0, 1], camid=0, tag="q")
    distractor = Record(path=query[0].path, pid=2, camid=-1, orig_pid=DISTRACTOR_PID)
    with pytest.raises(ValueError, match="gallery: 1 generated .* never appears in query, gallery"):
        evaluate_splits(MeanColour(), query, [*query, distractor], image_size=(32, 16))
    with pytest.raises(ValueError, match="test set: 1 generated"):
        classify_identities(MeanColour(), [distractor], pid_map={0: 0}, image_size=(32, 16))


def test_identity_classification_ignores_the_distractor_logit_and_maps_unknown(tmp_path):
    # Training labels 0, 1, 2 are the original ids 11, 12 and FLIMA's "unknown"; test boxes carry original ids.
    records = [
        Record(path=write_image(tmp_path / f"t{i}.png", COLOURS[c], seed=i), pid=pid, camid=0)
        for i, (c, pid) in enumerate([(0, 11), (1, 12), (2, -1), (0, 11), (0, 12)])
    ]
    result = classify_identities(MeanColour(), records, pid_map={11: 0, 12: 1, "unknown": 2}, image_size=(32, 16))
    assert result.labels.tolist() == [11, 12]
    assert result.accuracy == pytest.approx(4 / 5)  # the last box (a 12 dressed like 11) is misclassified
    assert result.recall.tolist() == [1.0, 0.5] and result.unknown_recall == 1.0


def test_face_stream_samples_and_the_registered_dual_stream_input(tmp_path):
    records = coloured_records(tmp_path, [0, 1], camid=0, tag="f")
    boxes = {0: (2.0, 2.0, 14.0, 10.0), 1: None}
    data = FaceStreamDataset(records, boxes, image_size=16, face_size=8, train=False)
    with_face, without = data.__getitems__([0, 1])
    assert with_face["image"].shape == (3, 16, 16) and with_face["face_crop"].shape == (3, 8, 8)
    assert with_face["has_face"] == 1 and with_face["face_crop"].abs().sum() > 0
    assert without["has_face"] == 0 and without["face_crop"].abs().sum() == 0
    torch.manual_seed(0)
    flipping = FaceStreamDataset(records, boxes, image_size=16, face_size=8, train=True, flip_p=1.0)[0]
    assert torch.allclose(flipping["image"], with_face["image"].flip(-1))
    assert torch.allclose(flipping["face_crop"], with_face["face_crop"].flip(-1))

    from reid_core.models import build_model

    torch.manual_seed(0)
    model = build_model("dual_stream_tiny", num_classes=3).eval()
    x = torch.cat([torch.stack([with_face["image"], without["image"]]), torch.zeros(2, 3, 16, 16)], 1)
    x[0, 3:] = torch.nn.functional.interpolate(with_face["face_crop"][None], size=16)[0]
    feats = DualStreamFeatureModel(model)(x)
    expected = model.forward_features(x[:, :3], x[:, 3:], torch.tensor([1, 0]))
    assert feats.shape == (2, 16) and torch.allclose(feats, torch.nn.functional.normalize(expected, dim=1))


def test_feature_model_of_a_converted_condensenet_matches_the_trained_one():
    from reid_core.models import build_model
    from reid_core.models.condense import convert, finish_condensation

    torch.manual_seed(0)
    model = build_model("condensenet_tiny", num_classes=4)
    model.train()
    model(torch.randn(8, 3, 32, 16))  # non-trivial batch-norm statistics
    finish_condensation(model)
    model.eval()
    x = torch.randn(3, 3, 32, 16)
    trained, deployed = FeatureModel(model)(x), FeatureModel(convert(model))(x)
    assert trained.shape == (3, 16) and torch.allclose(trained.norm(dim=1), torch.ones(3))
    assert torch.allclose(trained, deployed, atol=1e-5)


# ------------------------------------------------------------------------------------------------ the one training set
def test_the_preflight_and_every_worker_build_the_same_training_set(tmp_path):
    """``build_training_set`` is what the preflight checks and what each Ray Train worker trains on: the ranks'
    samplers cover the same set with the same step count, and too small a set is refused once, naming the key."""
    from reid_core.train.loops import build_training_set
    from tests.test_evaluate_job import make_dataset

    data = str(tmp_path / "msmt17")
    make_dataset(data)
    sets = write_distractor_set(tmp_path / "distractors", 10)
    cfg = load_config(ReidJobConfig, None, [f"data.uri={data}", "data.layout=msmt17", f"distractors.uri={sets}",
                                            "optim.identities_per_batch=2", "optim.images_per_identity=2"])  # fmt: skip
    driver = build_training_set(cfg, world_size=2)
    workers = [build_training_set(cfg, world_size=2, rank=r) for r in range(2)]
    assert driver.training.num_generated == 10 and driver.per_batch > 0
    for worker in workers:
        assert worker.training.records == driver.training.records and worker.pid_map == driver.pid_map
        assert worker.steps_per_epoch == driver.steps_per_epoch == len(worker.sampler) > 0
    assert [b for b in workers[0].sampler] != [b for b in workers[1].sampler]  # each rank its own batches
    big = load_config(ReidJobConfig, None, [f"data.uri={data}", "data.layout=msmt17", "optim.identities_per_batch=4",
                                            "optim.images_per_identity=4"])  # fmt: skip
    with pytest.raises(ConfigError, match="optim.identities_per_batch: .* give no full batch of 4×4 per worker on 8"):
        build_training_set(big, world_size=8)


def test_evaluation_face_boxes_come_from_the_detector_only_once_per_distinct_record(tmp_path):
    """Query + gallery may share records: each is detected once; a record the dataset tags as showing a face gets no
    box unless the detector finds one (test-time face presence never comes from the tags)."""
    from reid_core.evaluation.features import evaluation_face_boxes

    class Found:
        def __init__(self, n):
            self.n = n

        def best_boxes(self):
            return [(1.0, 2.0, 3.0, 4.0)] + [None] * (self.n - 1)

    class Detector:
        calls: list[int] = []

        def detect(self, arrays):
            self.calls.append(len(arrays))
            return Found(len(arrays))

    a = Record(path=write_image(tmp_path / "a.jpg", (10, 20, 30)), pid=0, camid=0, face=False)
    b = Record(path=write_image(tmp_path / "b.jpg", (30, 20, 10)), pid=1, camid=1, face=True)
    detector = Detector()
    boxes = evaluation_face_boxes([a, b, a], detector=detector)
    assert boxes == {a: (1.0, 2.0, 3.0, 4.0), b: None} and detector.calls == [2]


def test_the_gan_preflight_and_its_workers_read_the_same_images_and_check_the_batch_once(tmp_path):
    from reid_core.config import GanJobConfig
    from reid_core.train.loops import gan_records
    from tests.test_evaluate_job import make_dataset

    data = str(tmp_path / "msmt17")
    make_dataset(data)
    cfg = load_config(GanJobConfig, None, [f"data.uri={data}", "data.layout=msmt17", "data.split=train",
                                           "data.max_images=20", "optim.batch_size=4"])  # fmt: skip
    records = gan_records(cfg, world_size=2)
    assert len(records) == 20 and records == gan_records(cfg, world_size=5)
    with pytest.raises(ConfigError, match="optim.batch_size: 20 images on 6 workers give no full batch of 4"):
        gan_records(cfg, world_size=6)
