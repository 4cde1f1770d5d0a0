"""Re-ID losses: (N+1)-way cross-entropy with the distractor class, and LSRO."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from reid_core.losses import distractor_labels, lsro_targets, reid_loss

N = 4  # real identities; the distractor class is index 4


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    logits = torch.randn(5, N + 1, requires_grad=True)
    labels = torch.tensor([0, 3, 1, -1, 2])  # generated images may carry any label
    is_generated = torch.tensor([False, False, False, True, True])
    return logits, labels, is_generated


def test_distractor_mode_is_cross_entropy_with_generated_images_in_the_last_class():
    logits, labels, is_generated = batch()
    expected = F.cross_entropy(logits, torch.tensor([0, 3, 1, N, N]))
    assert torch.allclose(reid_loss(logits, labels, is_generated, mode="distractor_class"), expected)
    assert distractor_labels(labels, is_generated, num_classes=N).tolist() == [0, 3, 1, N, N]
    # without is_generated, label N marks a generated image
    assert torch.allclose(reid_loss(logits, torch.tensor([0, 3, 1, N, N])), expected)


def test_lsro_targets_are_one_hot_for_real_and_uniform_over_real_classes_for_generated():
    _, labels, is_generated = batch()
    targets = lsro_targets(labels, is_generated, num_classes=N)
    assert targets.shape == (5, N + 1)
    assert torch.equal(targets[:3], F.one_hot(torch.tensor([0, 3, 1]), N + 1).float())
    assert torch.allclose(targets[3:, :N], torch.full((2, N), 1 / N))
    assert torch.all(targets[:, N] == 0)


@settings(max_examples=30, deadline=None)
@given(num_classes=st.integers(1, 50), flags=st.lists(st.booleans(), min_size=1, max_size=20), seed=st.integers(0, 99))
def test_lsro_targets_sum_to_one(num_classes, flags, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (len(flags),), generator=g)
    targets = lsro_targets(labels, torch.tensor(flags), num_classes=num_classes)
    assert torch.allclose(targets.sum(1), torch.ones(len(flags)))
    assert torch.all(targets >= 0) and torch.all(targets[:, num_classes] == 0)


def test_lsro_loss_is_soft_cross_entropy_over_the_real_logits_only():
    logits, labels, is_generated = batch()
    loss = reid_loss(logits, labels, is_generated, mode="lsro")
    log_p = F.log_softmax(logits[:, :N], dim=1)
    real = -log_p[[0, 1, 2], [0, 3, 1]]
    generated = -log_p[3:].mean(1)  # uniform target over the N real classes
    assert torch.allclose(loss, torch.cat([real, generated]).mean())
    loss.backward()
    assert torch.all(logits.grad[:, N] == 0)  # the distractor logit is outside the softmax in LSRO mode
    assert torch.all(logits.grad[:, :N] != 0)
    with torch.no_grad():
        shifted = logits.clone()
        shifted[:, N] += 10.0
    assert torch.allclose(reid_loss(shifted, labels, is_generated, mode="lsro"), loss)


def test_lsro_on_a_generated_image_is_minimal_when_real_logits_are_equal():
    labels, generated = torch.tensor([0]), torch.tensor([True])
    flat = reid_loss(torch.zeros(1, N + 1), labels, generated, mode="lsro")
    peaked = reid_loss(torch.tensor([[3.0, 0, 0, 0, 0]]), labels, generated, mode="lsro")
    assert math.isclose(flat.item(), math.log(N), rel_tol=1e-6) and peaked.item() > flat.item()


def test_both_modes_give_finite_gradients_and_agree_without_generated_images():
    logits, labels, _ = batch()
    labels = torch.tensor([0, 3, 1, 2, 2])
    real = torch.zeros(5, dtype=torch.bool)
    ce = reid_loss(logits, labels, real, mode="distractor_class")
    ce.backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[:, N] != 0)
    # with only real images LSRO is plain cross-entropy over the N real logits
    assert torch.allclose(reid_loss(logits, labels, real, mode="lsro"), F.cross_entropy(logits[:, :N], labels))


def test_invalid_inputs_are_rejected_with_the_reason():
    logits, labels, is_generated = batch()
    with pytest.raises(ValueError, match="unknown re-ID loss mode"):
        reid_loss(logits, labels, is_generated, mode="soft")
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        reid_loss(logits, torch.tensor([0, 7, 1, 0, 0]), is_generated)
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        reid_loss(logits, torch.tensor([0, -1, 1, 0, 0]), is_generated)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        reid_loss(logits, labels.float(), is_generated)
    with pytest.raises(ValueError, match="is_generated must have shape"):
        reid_loss(logits, labels, is_generated[:3])
    with pytest.raises(ValueError, match="logits must have shape"):
        reid_loss(logits[:, 0], labels, is_generated)
