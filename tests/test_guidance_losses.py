"""Face-guided DC-GAN losses (reid_core/guidance/losses.py): the three modes of docs/method.md §1 against a plain DC-GAN."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reid_core.guidance.losses import GUIDANCE_MODES, discriminator_loss, generator_loss, validate_guidance
from reid_core.models import build_model

IMAGE_SIZE = (64, 32)
BATCH = 6


# The plain DC-GAN, written independently of the module under test.
def plain_d_loss(real_logits, fake_logits):
    return F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))


def plain_g_loss(fake_logits):
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


class FacePresence(nn.Module):
    """A tiny differentiable face-presence score F(x) in [0, 1] (stands in for the Dual-Stream face head)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1)
        )

    def forward(self, x):
        return torch.sigmoid(self.net(x)).flatten()


@pytest.fixture
def gan():
    """Tiny real DC-GAN networks, a real batch, noise and Δ with both values for real and generated images."""
    torch.manual_seed(0)
    g = build_model("dcgan_generator", z_dim=16, width=8, image_size=IMAGE_SIZE)
    d = build_model("dcgan_discriminator", width=8, image_size=IMAGE_SIZE)
    face = FacePresence()
    real = torch.rand(BATCH, 3, *IMAGE_SIZE) * 2 - 1
    z = torch.randn(BATCH, 16)
    delta_real = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    delta_fake = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    return g, d, face, real, z, delta_real, delta_fake


def d_step_grads(g, d, real, z, loss_fn):
    """D's parameter gradients for one discriminator step (G detached), on copies of the networks."""
    g, d = copy.deepcopy(g), copy.deepcopy(d)
    fake = g(z).detach()
    loss = loss_fn(d(real), d(fake))
    loss.backward()
    return [p.grad.clone() for p in d.parameters()], loss


def g_step_grads(g, d, z, loss_fn, face=None):
    """G's parameter gradients for one generator step (D frozen), on copies of the networks."""
    g, d = copy.deepcopy(g), copy.deepcopy(d)
    d.requires_grad_(False)
    fake = g(z)
    loss = loss_fn(d(fake), None if face is None else face(fake))
    loss.backward()
    return [p.grad.clone() for p in g.parameters()]


def all_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def train_one_step(g, d, real, z, d_loss_fn, g_loss_fn):
    """One DC-GAN iteration (D step then G step, Adam as in the recipe); returns the updated copies."""
    g, d = copy.deepcopy(g), copy.deepcopy(d)
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    fake = g(z)
    opt_d.zero_grad()
    d_loss_fn(d(real), d(fake.detach())).backward()
    opt_d.step()
    opt_g.zero_grad()
    g_loss_fn(d(fake)).backward()
    opt_g.step()
    return g, d


# --- paper mode -----------------------------------------------------------------------------------------------------


def test_paper_mode_gradients_equal_plain_dcgan_but_logged_value_differs(gan):
    g, d, _, real, z, delta_real, delta_fake = gan
    lam1, lam2 = 0.05, 0.025
    plain_grads, plain_loss = d_step_grads(g, d, real, z, plain_d_loss)
    logs = {}

    def paper(r, f):
        loss, out = discriminator_loss(r, f, delta_real, delta_fake, mode="paper", lambda1=lam1, lambda2=lam2)
        logs.update(out)
        return loss

    paper_grads, paper_loss = d_step_grads(g, d, real, z, paper)
    assert all_equal(paper_grads, plain_grads)
    # ... while the value is the paper's penalised one: L_D − λ1 mean Δ(x) + λ2 mean Δ(G(z))
    expected = plain_loss.item() - lam1 * delta_real.mean().item() + lam2 * delta_fake.mean().item()
    assert paper_loss.item() != pytest.approx(plain_loss.item(), abs=1e-4)
    assert paper_loss.item() == pytest.approx(expected, abs=1e-6)
    assert logs["loss_d_penalised"] == pytest.approx(expected, abs=1e-5)
    assert logs["loss_d_plain"] == pytest.approx(plain_loss.item(), abs=1e-6)
    assert logs["loss_d_penalised"] != pytest.approx(logs["loss_d_plain"], abs=1e-4)

    g_plain = g_step_grads(g, d, z, lambda f, _: plain_g_loss(f))
    g_paper = g_step_grads(g, d, z, lambda f, _: generator_loss(f, mode="paper", lambda2=lam2)[0])
    assert all_equal(g_paper, g_plain)


def test_paper_mode_gives_identical_weights_after_an_optimizer_step(gan):
    g, d, _, real, z, delta_real, delta_fake = gan

    def paper_d(r, f):
        return discriminator_loss(r, f, delta_real, delta_fake, mode="paper", lambda1=0.05, lambda2=0.05)[0]

    def paper_g(f):
        return generator_loss(f, mode="paper", lambda2=0.05)[0]

    g_plain, d_plain = train_one_step(g, d, real, z, plain_d_loss, plain_g_loss)
    g_paper, d_paper = train_one_step(g, d, real, z, paper_d, paper_g)
    for a, b in ((g_plain, g_paper), (d_plain, d_paper)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # and the step did change the weights (the comparison is not vacuous)
    assert not torch.equal(d_plain.state_dict()["net.0.weight"], d.state_dict()["net.0.weight"])


def test_paper_logs_follow_the_paper_formula():
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.0])
    dr, df = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 1.0])
    _, logs = discriminator_loss(real, fake, dr, df, mode="weighted", lambda1=0.05, lambda2=0.025)
    l_dx = torch.log(torch.sigmoid(real)).mean().item() + 0.05 * 2 / 3
    l_dz = torch.log(1 - torch.sigmoid(fake)).mean().item() - 0.025 * 1.0
    assert logs["paper_l_dx"] == pytest.approx(l_dx, abs=1e-6)
    assert logs["paper_l_dz"] == pytest.approx(l_dz, abs=1e-6)
    assert logs["loss_d_penalised"] == pytest.approx(-(l_dx + l_dz), abs=1e-6)
    assert logs["face_absent_real"] == pytest.approx(2 / 3)
    assert logs["face_absent_fake"] == 1.0
    assert logs["d_real"] == pytest.approx(torch.sigmoid(real).mean().item())
    assert logs["d_fake"] == pytest.approx(torch.sigmoid(fake).mean().item())
    assert all(isinstance(v, float) and math.isfinite(v) for v in logs.values())


# --- weighted mode --------------------------------------------------------------------------------------------------


def test_weighted_mode_changes_gradients_only_through_faceless_samples():
    torch.manual_seed(1)
    real = torch.randn(8, requires_grad=True)
    fake = torch.randn(8, requires_grad=True)
    dr = torch.tensor([0, 1, 0, 1, 0, 0, 1, 0], dtype=torch.float32)
    df = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0], dtype=torch.float32)
    lam1, lam2 = 0.05, 0.5
    plain_real, plain_fake = torch.autograd.grad(plain_d_loss(real, fake), (real, fake))
    loss, _ = discriminator_loss(real, fake, dr, df, mode="weighted", lambda1=lam1, lambda2=lam2)
    w_real, w_fake = torch.autograd.grad(loss, (real, fake))

    # a sample's logit gets its gradient from its own term only: Δ = 0 samples are untouched, bit for bit
    assert torch.equal(w_real[dr == 0], plain_real[dr == 0])
    assert torch.equal(w_fake[df == 0], plain_fake[df == 0])
    # Δ = 1 samples: the soft target 1 − λ1 raises d/dℓ = (σ(ℓ) − t)/m by λ1/m ...
    assert torch.allclose(w_real[dr == 1], plain_real[dr == 1] + lam1 / 8, atol=1e-7)
    # ... and a faceless fake's term is weighted by 1 + λ2
    assert torch.allclose(w_fake[df == 1], (1 + lam2) * plain_fake[df == 1], atol=1e-7)


def test_weighted_mode_with_faces_everywhere_equals_plain_dcgan(gan):
    g, d, _, real, z, delta_real, delta_fake = gan
    none = torch.zeros(BATCH)
    plain_grads, plain_loss = d_step_grads(g, d, real, z, plain_d_loss)
    grads, loss = d_step_grads(
        g,
        d,
        real,
        z,
        lambda r, f: discriminator_loss(r, f, none, none, mode="weighted", lambda1=0.05, lambda2=0.05)[0],
    )
    assert all_equal(grads, plain_grads)
    assert loss.item() == plain_loss.item()
    # and with faceless samples in the batch, D's gradients do change
    faceless_grads, _ = d_step_grads(
        g,
        d,
        real,
        z,
        lambda r, f: discriminator_loss(r, f, delta_real, delta_fake, mode="weighted", lambda1=0.05, lambda2=0.05)[0],
    )
    assert not all_equal(faceless_grads, plain_grads)


def test_smoothing_is_weighted_with_delta_fixed_at_one():
    """The control: `smoothing` equals `weighted` fed Δ = 1 everywhere, whatever Δ the detector gave; only the
    logged Δ rates differ."""
    torch.manual_seed(2)
    real = torch.randn(8, requires_grad=True)
    fake = torch.randn(8, requires_grad=True)
    dr = torch.tensor([0, 1, 0, 1, 0, 0, 1, 0], dtype=torch.float32)
    df = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0], dtype=torch.float32)
    ones = torch.ones(8)
    smooth, logs = discriminator_loss(real, fake, dr, df, mode="smoothing", lambda1=0.05, lambda2=0.5)
    control, _ = discriminator_loss(real, fake, ones, ones, mode="weighted", lambda1=0.05, lambda2=0.5)
    guided, _ = discriminator_loss(real, fake, dr, df, mode="weighted", lambda1=0.05, lambda2=0.5)
    assert smooth.item() == control.item() != guided.item()
    g_smooth = torch.autograd.grad(smooth, (real, fake))
    g_control = torch.autograd.grad(control, (real, fake))
    assert all(torch.equal(a, b) for a, b in zip(g_smooth, g_control, strict=True))
    # one-sided label smoothing: every real target is 1 − λ1, so d/dℓ = (σ(ℓ) − 0.95)/m for every real logit
    assert torch.allclose(g_smooth[0], (torch.sigmoid(real.detach()) - 0.95) / 8, atol=1e-7)
    assert logs["face_absent_real"] == pytest.approx(3 / 8) and logs["face_absent_fake"] == pytest.approx(3 / 8)
    # the generator side is the plain DC-GAN's, as in `weighted`
    s_g, _ = generator_loss(fake, mode="smoothing", lambda2=0.5)
    assert s_g.item() == plain_g_loss(fake).item()


def test_weighted_is_the_default_mode():
    real, fake = torch.tensor([0.3, -0.2]), torch.tensor([0.1, 0.4])
    dr, df = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    default, _ = discriminator_loss(real, fake, dr, df, lambda1=0.05, lambda2=0.05)
    weighted, _ = discriminator_loss(real, fake, dr, df, mode="weighted", lambda1=0.05, lambda2=0.05)
    assert default.item() == weighted.item()


# --- λ = 0 in every mode --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", GUIDANCE_MODES)
def test_zero_lambdas_equal_plain_dcgan_in_every_mode(gan, mode):
    g, d, face, real, z, delta_real, delta_fake = gan
    if mode == "critic":  # Δ = 1 − F(x), soft
        delta_real = (1 - face(real)).detach()
        delta_fake = (1 - face(g(z))).detach()
    plain_d, plain_d_value = d_step_grads(g, d, real, z, plain_d_loss)
    guided_d, guided_d_value = d_step_grads(
        g, d, real, z, lambda r, f: discriminator_loss(r, f, delta_real, delta_fake, mode=mode, lambda1=0, lambda2=0)[0]
    )
    assert all_equal(guided_d, plain_d)
    assert guided_d_value.item() == plain_d_value.item()

    plain_g = g_step_grads(g, d, z, lambda f, _: plain_g_loss(f))
    guided_g = g_step_grads(
        g, d, z, lambda f, score: generator_loss(f, mode=mode, lambda2=0.0, face_score_fake=score)[0], face=face
    )
    assert all_equal(guided_g, plain_g)


# --- critic mode ----------------------------------------------------------------------------------------------------


def test_critic_sends_gradient_into_the_generator_through_the_face_score(gan):
    g, d, face, _, z, _, _ = gan
    lam2 = 0.05
    plain = g_step_grads(g, d, z, lambda f, _: plain_g_loss(f))
    critic = g_step_grads(
        g, d, z, lambda f, score: generator_loss(f, mode="critic", lambda2=lam2, face_score_fake=score)[0], face=face
    )
    face_only = g_step_grads(g, d, z, lambda f, score: lam2 * (1 - score).mean(), face=face)
    assert not all_equal(critic, plain)
    assert any(x.abs().sum() > 0 for x in face_only)
    # the critic's gradient is the plain one plus λ2 · ∇ mean(1 − F(G(z))) (up to float summation order)
    for c, p, f in zip(critic, plain, face_only, strict=True):
        torch.testing.assert_close(c, p + f, rtol=1e-4, atol=1e-5 * float(c.abs().max()))


def test_critic_generator_loss_value_and_logs():
    fake = torch.tensor([0.5, -0.5, 1.0])
    score = torch.tensor([0.9, 0.2, 0.4])
    loss, logs = generator_loss(fake, mode="critic", lambda2=0.05, face_score_fake=score)
    expected_face = 0.05 * (1 - score).mean().item()
    assert logs["loss_g_face"] == pytest.approx(expected_face)
    assert logs["loss_g_plain"] == pytest.approx(plain_g_loss(fake).item())
    assert loss.item() == pytest.approx(plain_g_loss(fake).item() + expected_face)
    assert logs["face_score_fake"] == pytest.approx(score.mean().item())
    # other modes only log the score
    loss_w, logs_w = generator_loss(fake, mode="weighted", lambda2=0.05, face_score_fake=score)
    assert loss_w.item() == pytest.approx(plain_g_loss(fake).item())
    assert logs_w["loss_g_face"] == 0.0 and logs_w["face_score_fake"] == pytest.approx(score.mean().item())


def test_critic_discriminator_loss_does_not_train_the_face_head(gan):
    g, d, face, real, z, _, _ = gan
    fake = g(z).detach()
    loss, _ = discriminator_loss(
        d(real), d(fake), 1 - face(real), 1 - face(fake), mode="critic", lambda1=0.05, lambda2=0.05
    )
    loss.backward()
    assert all(p.grad is None for p in face.parameters())
    assert all(p.grad is not None for p in d.parameters())


def test_critic_discriminator_equals_weighted_with_soft_delta():
    real, fake = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([0.1, 0.4, -0.7])
    dr, df = torch.tensor([0.25, 0.9, 0.0]), torch.tensor([0.5, 1.0, 0.1])
    critic, _ = discriminator_loss(real, fake, dr, df, mode="critic", lambda1=0.05, lambda2=0.025)
    t = 1 - 0.05 * dr
    w = 1 + 0.025 * df
    by_hand = -(t * F.logsigmoid(real) + (1 - t) * F.logsigmoid(-real)).mean() - (w * F.logsigmoid(-fake)).mean()
    assert critic.item() == pytest.approx(by_hand.item(), abs=1e-6)


# --- validation -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.01, 1.5, math.nan, True, "0.05", None])
def test_invalid_lambdas_raise(bad):
    r, f = torch.zeros(2), torch.zeros(2)
    with pytest.raises(ValueError, match="lambda1"):
        discriminator_loss(r, f, torch.zeros(2), torch.zeros(2), lambda1=bad, lambda2=0.0)
    with pytest.raises(ValueError, match="lambda2"):
        discriminator_loss(r, f, torch.zeros(2), torch.zeros(2), lambda1=0.0, lambda2=bad)
    with pytest.raises(ValueError, match="lambda2"):
        generator_loss(f, lambda2=bad)


def test_invalid_mode_raises_and_lists_the_valid_ones():
    r = torch.zeros(2)
    with pytest.raises(ValueError, match="paper, weighted, critic"):
        discriminator_loss(r, r, r, r, mode="papr", lambda1=0.0, lambda2=0.0)
    with pytest.raises(ValueError, match="paper, weighted, critic"):
        generator_loss(r, mode="Weighted", lambda2=0.0)
    with pytest.raises(ValueError, match="paper, weighted, critic"):
        validate_guidance(mode="", lambda1=0.0, lambda2=0.0)
    validate_guidance(mode="critic", lambda1=0.05, lambda2=1)  # valid: no error


def test_bad_shapes_and_ranges_raise():
    r = torch.zeros(3)
    with pytest.raises(ValueError, match="face_absent_real"):
        discriminator_loss(r, r, torch.zeros(2), r, lambda1=0.0, lambda2=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        discriminator_loss(r, r, torch.tensor([0.0, 2.0, 0.0]), r, lambda1=0.0, lambda2=0.0)
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        discriminator_loss(torch.zeros(3, 1), r, r, r, lambda1=0.0, lambda2=0.0)
    with pytest.raises(ValueError, match="N ≥ 1"):
        generator_loss(torch.zeros(0), lambda2=0.0)
    with pytest.raises(ValueError, match="critic mode needs face_score_fake"):
        generator_loss(r, mode="critic", lambda2=0.05)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        generator_loss(r, mode="critic", lambda2=0.05, face_score_fake=torch.tensor([0.5, -0.1, 0.2]))
    with pytest.raises(ValueError, match="one score per generated image"):
        generator_loss(r, mode="critic", lambda2=0.05, face_score_fake=torch.zeros(2))
