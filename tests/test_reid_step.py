"""reid_step on a plain PyTorch updater (CPU, fake data): its loss is the loop's formula, it updates the model, and a
check that stops it leaves the model as it was."""

from __future__ import annotations

import copy

import torch

from reid_core.losses import batch_hard_triplet, reid_loss
from reid_core.models import build_model
from reid_core.models.condense import group_lasso_loss
from reid_core.train.steps import ReidLoss, TorchUpdater, reid_step

NUM_CLASSES = 3  # real identities 0..2; label 3 is the distractor class
LOSS = ReidLoss(mode="distractor_class", label_smoothing=0.1, triplet=0.5, triplet_margin=0.3, group_lasso=1e-3)


def tiny():
    torch.manual_seed(0)
    model = build_model("condensenet_tiny", num_classes=NUM_CLASSES, feature_dim=8).train()
    return model, TorchUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1))


def batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 64, 32, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, NUM_CLASSES, NUM_CLASSES])
    generated = labels == NUM_CLASSES
    return images, labels, generated


def test_reid_step_loss_is_the_id_loss_plus_the_weighted_terms():
    model, updater = tiny()
    reference = copy.deepcopy(model)
    images, labels, generated = batch()
    torch.manual_seed(2)
    logs, stop = reid_step(updater, images, labels, generated, num_classes=NUM_CLASSES, loss=LOSS)
    torch.manual_seed(2)  # the same dropout draws
    features, logits = reference.forward_train(images)
    logits = logits.float()
    id_loss = reid_loss(logits, labels, generated, mode=LOSS.mode, label_smoothing=LOSS.label_smoothing)
    triplet = batch_hard_triplet(features, labels, generated, margin=LOSS.triplet_margin)
    lasso = group_lasso_loss(reference)
    total = id_loss + LOSS.triplet * triplet + LOSS.group_lasso * lasso
    assert stop is None
    assert abs(logs["loss"] - id_loss.item()) < 1e-5
    assert abs(logs["triplet"] - triplet.item()) < 1e-5 and abs(logs["group_lasso"] - lasso.item()) < 1e-6
    assert abs(logs["total_loss"] - total.item()) < 1e-5
    assert logs["real"] == 6 and logs["generated"] == 2
    assert 0 <= logs["correct"] <= 6 and 0 <= logs["distractor_correct"] <= 2


def test_reid_step_updates_the_model_and_a_stopping_check_leaves_it_as_it_was():
    model, updater = tiny()
    images, labels, generated = batch()
    before = [p.detach().clone() for p in model.parameters()]
    seen = []

    def stop(losses):
        seen.append(losses)
        return "non-finite loss (test)"

    logs, reason = reid_step(updater, images, labels, generated, num_classes=NUM_CLASSES, loss=LOSS, check=stop)
    assert reason == "non-finite loss (test)" and set(seen[0]) == {"loss", "total_loss"}
    assert "correct" not in logs
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    logs, reason = reid_step(updater, images, labels, generated, num_classes=NUM_CLASSES, loss=ReidLoss(),
                             check=lambda losses: None)  # fmt: skip
    assert reason is None and "triplet" not in logs and "group_lasso" not in logs
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
