"""The re-ID recipe options of issue #17 (BNNeck, batch-hard triplet, label smoothing, random erasing, warm-up with
cosine or step decay, last stride 1), each off by default: with everything off the recipe is today's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from reid_core.config import ConfigError, ReidJobConfig, load_config
from reid_core.data import build_transforms
from reid_core.losses import batch_hard_triplet, reid_loss
from reid_core.models import build_model
from reid_core.train.loops import reid_model_kwargs
from reid_core.train.schedule import cosine_lr, learning_rate

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ everything off
def test_with_every_option_off_the_recipe_is_todays():
    cfg = load_config(ReidJobConfig)
    assert cfg.model.pretrained is None and not cfg.model.bnneck and cfg.model.last_stride == 2
    assert (cfg.loss.label_smoothing, cfg.loss.triplet, cfg.data.random_erasing, cfg.optim.warmup_epochs) == (
        0,
        0,
        0,
        0,
    )
    # the checkpoint meta (model kwargs) is what it always was
    kwargs = reid_model_kwargs("condensenet74", num_classes=5, feature_dim=8, dropout_rate=0.0, image_size=(256, 128),
                               face_size=64, bnneck=cfg.model.bnneck, last_stride=cfg.model.last_stride)  # fmt: skip
    assert kwargs == {"num_classes": 5, "feature_dim": 8, "dropout_rate": 0.0}
    # the schedule: cosine from the base rate, per step
    for p in (0.0, 0.013, 0.25, 0.5, 0.9, 1.0):
        assert learning_rate(0.1, p, schedule="cosine", epochs=cfg.optim.epochs,
                             warmup_epochs=cfg.optim.warmup_epochs) == cosine_lr(0.1, p)  # fmt: skip
    # the loss: cross-entropy over N + 1 classes / LSRO, unsmoothed
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 3])
    assert torch.equal(reid_loss(logits, labels, label_smoothing=0.0), F.cross_entropy(logits, labels))
    # the augmentation: no erasing step
    assert "RandomErasing" not in repr(build_transforms(32, 16, train=True, pad=2))
    # the model: same parameters, a classifier bias, a trainable feature BN and the ImageNet stride
    model = build_model("condensenet_tiny", num_classes=3)
    assert model.classifier.bias is not None and model.feature[1].bias.requires_grad
    assert isinstance(model.blocks[2], torch.nn.AvgPool2d)


# ------------------------------------------------------------------------------------------------ schedule
def test_warm_up_then_cosine_or_step_decay():
    kw = dict(epochs=120, warmup_epochs=10, warmup_factor=0.01)
    assert learning_rate(0.1, 0.0, schedule="cosine", **kw) == pytest.approx(0.001)
    assert learning_rate(0.1, 5 / 120, schedule="cosine", **kw) == pytest.approx(0.1 * (0.01 + 0.99 * 0.5))
    assert learning_rate(0.1, 10 / 120, schedule="cosine", **kw) == pytest.approx(0.1)
    assert learning_rate(0.1, 65 / 120, schedule="cosine", **kw) == pytest.approx(0.05)
    assert learning_rate(0.1, 1.0, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    step = dict(kw, milestones=[40, 70], gamma=0.1)
    assert learning_rate(0.1, 20 / 120, schedule="step", **step) == pytest.approx(0.1)
    assert learning_rate(0.1, 40 / 120, schedule="step", **step) == pytest.approx(0.01)
    assert learning_rate(0.1, 100 / 120, schedule="step", **step) == pytest.approx(0.001)
    assert learning_rate(0.1, 0.5, schedule="constant", epochs=120) == 0.1


# ------------------------------------------------------------------------------------------------ losses
def test_label_smoothing_in_both_modes():
    torch.manual_seed(0)
    logits = torch.randn(4, 4)  # N = 3 real classes + the distractor class
    labels, generated = torch.tensor([0, 2, 1, 0]), torch.tensor([False, False, False, True])
    eps = 0.1
    hard = torch.tensor([0, 2, 1, 3])
    smooth = (1 - eps) * F.one_hot(hard, 4).float() + eps / 4
    expected = -(smooth * logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(reid_loss(logits, labels, generated, label_smoothing=eps), expected)
    real_targets = (1 - eps) * F.one_hot(labels[:3], 3).float() + eps / 3
    targets = torch.cat([real_targets, torch.full((1, 3), 1 / 3)])  # LSRO's uniform row stays uniform
    expected = -(targets * logits[:, :3].log_softmax(1)).sum(1).mean()
    assert torch.allclose(reid_loss(logits, labels, generated, mode="lsro", label_smoothing=eps), expected)
    with pytest.raises(ValueError, match="label_smoothing"):
        reid_loss(logits, labels, generated, label_smoothing=1.0)


def test_batch_hard_triplet_takes_distractors_only_as_negatives():
    # 1-d features: identity 0 at 0 and 1, identity 1 at 10 and 12, a distractor at 1.5 (labels say 0: ignored)
    f = torch.tensor([[0.0], [1.0], [10.0], [12.0], [1.5]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 0])
    generated = torch.tensor([False, False, False, False, True])
    loss = batch_hard_triplet(f, labels, generated, margin=0.3)
    # anchors 0-3 only. a0: p 1, n 1.5 (the distractor) -> 0; a1: p 1, n 0.5 -> 0.8; a2: p 2, n 8.5 -> 0;
    # a3: p 2, n 10.5 -> 0. Were the distractor no negative, a1 would give 0 too.
    assert loss.item() == pytest.approx(0.8 / 4, abs=1e-4)
    loss.backward()
    assert torch.isfinite(f.grad).all() and f.grad[4, 0] != 0  # the distractor is pushed away as a negative
    none = batch_hard_triplet(f, labels, torch.zeros(5, dtype=torch.bool), margin=0.3)
    assert none.item() == 0.0  # as a real image of identity 0 it is a positive: nothing violates the margin
    alone = batch_hard_triplet(f[:1], labels[:1], generated[:1])
    assert alone.item() == 0.0 and alone.requires_grad
    duplicate = torch.zeros(4, 2, requires_grad=True)  # identical features: a finite gradient at distance 0
    batch_hard_triplet(duplicate, torch.tensor([0, 0, 1, 1]), torch.zeros(4, dtype=torch.bool)).backward()
    assert torch.isfinite(duplicate.grad).all()


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("name", ["condensenet_tiny", "resnet50"])
def test_bnneck_puts_the_triplet_before_the_feature_norm_and_the_id_loss_after_it(name):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 32)
    model = build_model(name, num_classes=3, feature_dim=8, bnneck=True).train()
    assert model.classifier.bias is None and not model.feature[1].bias.requires_grad
    metric, logits = model.forward_train(x)
    pre = model.feature[0](model.forward_backbone(x))
    assert torch.allclose(metric, pre, atol=1e-5) and logits.shape == (4, 4)
    assert not torch.allclose(metric, model.feature[1](pre), atol=1e-3)
    plain = build_model(name, num_classes=3, feature_dim=8).eval()
    metric, logits = plain.forward_train(x)
    assert torch.allclose(metric, plain.forward_features(x), atol=1e-5)
    assert torch.allclose(logits, plain(x), atol=1e-5)


def test_last_stride_one_doubles_the_last_map():
    x = torch.randn(2, 3, 64, 32)
    two = build_model("condensenet_tiny", num_classes=3)
    one = build_model("condensenet_tiny", num_classes=3, last_stride=1)
    with torch.no_grad():
        assert two.blocks(two.stem(x)).shape[-2:] == (16, 8)
        assert one.blocks(one.stem(x)).shape[-2:] == (32, 16)
    assert sorted(one.state_dict()) == sorted(two.state_dict())  # the same parameters: a pretrained one loads


# ------------------------------------------------------------------------------------------------ augmentation
def test_random_erasing_erases_a_rectangle_to_the_mean(tmp_path):
    image = Image.new("RGB", (16, 32), (200, 60, 20))
    torch.manual_seed(0)
    erased = build_transforms(32, 16, train=True, flip_p=0.0, erase_p=1.0)(image)
    kept = build_transforms(32, 16, train=True, flip_p=0.0)(image)
    zero = (erased == 0).all(0)
    assert 0 < int(zero.sum()) < 32 * 16 and torch.equal(erased[:, ~zero], kept[:, ~zero])
    assert "RandomErasing" not in repr(build_transforms(32, 16, train=False))


# ------------------------------------------------------------------------------------------------ config
def test_msmt17_config_is_the_strong_recipe():
    cfg = load_config(ReidJobConfig, ROOT / "configs" / "reid_msmt17.yaml")
    assert cfg.model.pretrained and cfg.model.bnneck and cfg.model.last_stride == 1
    assert cfg.loss.triplet > 0 and cfg.loss.label_smoothing > 0 and cfg.data.random_erasing > 0
    assert cfg.optim.warmup_epochs > 0
    raw = yaml.safe_load((ROOT / "configs" / "reid_msmt17.yaml").read_text())
    assert raw["data"]["options"] == {"merge_val": True}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.label_smoothing=1.0"], "loss.label_smoothing: expected a value in [0, 1), got 1.0"),
        (["loss.triplet=-1"], "loss.triplet: expected ≥ 0, got -1"),
        (["data.random_erasing=1.5"], "data.random_erasing: 1.5 is outside [0, 1]"),
        (["optim.warmup_epochs=200"], "optim.warmup_epochs: 200.0 must be less than optim.epochs (120)"),
        (["optim.schedule=step", "optim.step_milestones=[]"], "optim.step_milestones: expected positive epochs"),
        (["model.last_stride=3"], "model.last_stride: expected 1 or 2, got 3"),
        (["model.pretrained=ftp://host/x.pth"], "model.pretrained: 'ftp://host/x.pth': expected s3://bucket/key"),
        (["model.name=dual_stream", "data.image_size=[64,64]", "model.bnneck=true"], "model.bnneck: not available"),
        (
            ["model.name=dual_stream", "data.image_size=[64,64]", "data.random_erasing=0.5"],
            "data.random_erasing: not available for the Dual-Stream CNN",
        ),  # fmt: skip
    ],
)
def test_invalid_recipe_options_fail_with_the_key_to_fix(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[").replace(")", r"\)")):
        load_config(ReidJobConfig, None, overrides)


def test_resnet50_is_registered_as_it_is_and_condensenet_converted():
    from reid_core.workflows.pipeline import deploy_form

    example = torch.randn(2, 3, 64, 32)
    resnet = build_model("resnet50", num_classes=3, feature_dim=8).eval()
    deploy, stages, diff, converted = deploy_form(resnet, example)
    assert deploy is resnet and (stages, diff, converted) == (0, 0.0, False)
    tiny = build_model("condensenet_tiny", num_classes=3).eval()
    deploy, stages, diff, converted = deploy_form(tiny, example)
    assert converted and stages > 0 and diff <= 1e-4 and deploy is not tiny
