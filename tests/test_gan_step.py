"""gan_step on plain PyTorch updaters and on real DeepSpeed engines (one process, gloo, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from reid_core.models import build_model
from reid_core.train.steps import TorchUpdater, gan_step

SIZE = (64, 32)


def tiny_pair(seed: int = 0):
    torch.manual_seed(seed)
    gen = build_model("dcgan_generator", z_dim=16, width=8, image_size=SIZE)
    disc = build_model("dcgan_discriminator", width=8, image_size=SIZE)
    return gen, disc


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def changed(before, module) -> bool:
    return all(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_gan_step_updates_both_networks_and_restores_d():
    gen, disc = tiny_pair()
    g0, d0 = params(gen), params(disc)
    g = TorchUpdater(gen, torch.optim.Adam(gen.parameters(), 2e-4, betas=(0.5, 0.999)))
    d = TorchUpdater(disc, torch.optim.Adam(disc.parameters(), 2e-4, betas=(0.5, 0.999)))
    real = torch.rand(8, 3, *SIZE) * 2 - 1
    out = gan_step(g, d, real, z_dim=16, g_steps=2, generator=torch.Generator().manual_seed(0))
    assert {"loss_d", "loss_g", "loss_d_penalised", "d_real", "d_fake", "face_absent_real", "step_seconds"} <= set(out)
    assert all(math.isfinite(v) for v in out.values())
    assert 0 < out["d_real"] < 1 and 0 < out["d_fake"] < 1
    assert changed(g0, gen) and changed(d0, disc)
    assert all(p.requires_grad for p in disc.parameters())


def test_generator_steps_do_not_touch_the_discriminator():
    """With lr 0 for D, D's weights stay put while G moves: the G updates go through D's frozen raw module."""
    gen, disc = tiny_pair()
    d0 = params(disc)
    g = TorchUpdater(gen, torch.optim.SGD(gen.parameters(), lr=0.1))
    d = TorchUpdater(disc, torch.optim.SGD(disc.parameters(), lr=0.0))
    gan_step(g, d, torch.rand(4, 3, *SIZE) * 2 - 1, z_dim=16, g_steps=3)
    assert all(torch.equal(a, b) for a, b in zip(d0, disc.parameters(), strict=True))
    assert all(p.grad is None for p in disc.parameters())


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_gan_step_with_two_deepspeed_engines(single_process_group, zero_stage):
    import deepspeed

    from reid_core.train.deepspeed import deepspeed_config

    gen, disc = tiny_pair()
    engines = []
    for model in (gen, disc):
        cfg = deepspeed_config(micro_batch_size=4, world_size=1, use_gpu=False, zero_stage=zero_stage)
        opt = torch.optim.Adam(model.parameters(), 2e-4, betas=(0.5, 0.999))
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        engines.append(engine)
    g0, d0 = params(gen), params(disc)
    for _ in range(2):
        out = gan_step(*engines, torch.rand(4, 3, *SIZE) * 2 - 1, z_dim=16, g_steps=2)
        assert all(math.isfinite(v) for v in out.values())
    assert changed(g0, engines[0].module) and changed(d0, engines[1].module)


def run_step(guidance, *, delta_real, delta_fake, critic=False, seed=0):
    from reid_core.train.steps import Guidance  # noqa: F401 - imported for the callers' guidance objects

    gen, disc = tiny_pair(seed)
    g = TorchUpdater(gen, torch.optim.SGD(gen.parameters(), lr=0.05))
    d = TorchUpdater(disc, torch.optim.SGD(disc.parameters(), lr=0.05))
    c = None
    if critic is not False:  # True: a fresh scorer; a module: that scorer (the caller keeps its weights to compare)
        model = build_model("face_presence", channels=(4, 8), image_size=16) if critic is True else critic
        c = TorchUpdater(model, torch.optim.SGD(model.parameters(), lr=0.05))
    real = torch.rand(6, 3, *SIZE, generator=torch.Generator().manual_seed(7)) * 2 - 1
    out = gan_step(g, d, real, z_dim=16, g_steps=2, generator=torch.Generator().manual_seed(3), guidance=guidance,
                   face_absent_real=delta_real, detect_faces=lambda fake: delta_fake, critic=c)  # fmt: skip
    return out, gen, disc, c


def test_paper_mode_step_equals_plain_dcgan_but_logs_the_penalty():
    from reid_core.train.steps import Guidance

    delta_real, delta_fake = torch.tensor([1.0, 0, 1, 0, 1, 1]), torch.ones(6)
    plain, g0, d0, _ = run_step(Guidance("weighted", 0.0, 0.0), delta_real=delta_real, delta_fake=delta_fake)
    paper, g1, d1, _ = run_step(Guidance("paper", 0.05, 0.05), delta_real=delta_real, delta_fake=delta_fake)
    for a, b in zip(list(g0.parameters()) + list(d0.parameters()), list(g1.parameters()) + list(d1.parameters()),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)
    assert paper["loss_d"] == pytest.approx(plain["loss_d"] - 0.05 * 4 / 6 + 0.05 * 1.0, abs=1e-5)
    assert paper["face_absent_fake"] == 1.0 and paper["face_absent_real"] == pytest.approx(4 / 6)


def test_weighted_mode_changes_the_discriminator_only_through_faceless_samples():
    from reid_core.train.steps import Guidance

    no_face_anywhere = dict(delta_real=torch.zeros(6), delta_fake=torch.zeros(6))
    _, _, d_plain, _ = run_step(Guidance("weighted", 0.0, 0.0), **no_face_anywhere)
    _, _, d_guided, _ = run_step(Guidance("weighted", 0.05, 0.05), **no_face_anywhere)
    assert all(torch.equal(a, b) for a, b in zip(d_plain.parameters(), d_guided.parameters(), strict=True))
    _, _, d_faceless, _ = run_step(Guidance("weighted", 0.05, 0.05), delta_real=torch.ones(6), delta_fake=torch.ones(6))
    assert any(not torch.equal(a, b) for a, b in zip(d_plain.parameters(), d_faceless.parameters(), strict=True))


def test_critic_mode_trains_the_scorer_and_pushes_the_generator():
    from reid_core.train.steps import Guidance

    torch.manual_seed(1)
    scorer = build_model("face_presence", channels=(4, 8), image_size=16)
    scorer_before = params(scorer)
    args = dict(delta_real=torch.tensor([1.0, 0, 1, 0, 1, 0]), delta_fake=torch.ones(6))
    out, g_c, _, _ = run_step(Guidance("critic", 0.0, 0.5), critic=scorer, **args)
    assert math.isfinite(out["loss_critic"]) and 0 <= out["face_absent_fake"] <= 1
    # the scorer is trained: its weights moved (every parameter tensor, as for G and D above)
    assert changed(scorer_before, scorer)
    args["critic"] = True
    _, g_0, _, _ = run_step(Guidance("critic", 0.0, 0.0), **args)
    # λ2 > 0 adds the face term to G's loss: the generator ends elsewhere than without it
    assert any(not torch.equal(a, b) for a, b in zip(g_c.parameters(), g_0.parameters(), strict=True))
    with pytest.raises(ValueError, match="needs the face-presence scorer"):
        run_step(Guidance("critic", 0.0, 0.5), delta_real=torch.zeros(6), delta_fake=None, critic=False)
    with pytest.raises(ValueError, match="critic needs their labels"):
        run_step(Guidance("critic", 0.0, 0.5), delta_real=torch.zeros(6), delta_fake=None, critic=True)


def test_critic_is_trained_on_the_detectors_labels_of_the_fakes_too():
    """F learns from dlib's Δ of the generated batch as well as of the real one: with the same real batch, fakes
    labelled "face" and fakes labelled "no face" train F differently, and the detector is called on the fakes."""
    from reid_core.train.steps import Guidance

    delta_real = torch.tensor([1.0, 0, 1, 0, 1, 0])
    calls = []

    def detector(label):
        def detect(fake):
            calls.append(tuple(fake.shape))
            return torch.full((fake.shape[0],), label)

        return detect

    critics = []
    for label in (0.0, 1.0):
        gen, disc = tiny_pair(0)
        torch.manual_seed(5)
        model = build_model("face_presence", channels=(4, 8), image_size=16)
        c = TorchUpdater(model, torch.optim.SGD(model.parameters(), lr=0.5))
        real = torch.rand(6, 3, *SIZE, generator=torch.Generator().manual_seed(7)) * 2 - 1
        out = gan_step(TorchUpdater(gen, torch.optim.SGD(gen.parameters(), lr=0.0)),
                       TorchUpdater(disc, torch.optim.SGD(disc.parameters(), lr=0.0)), real, z_dim=16, g_steps=1,
                       generator=torch.Generator().manual_seed(3), guidance=Guidance("critic", 0.05, 0.05),
                       face_absent_real=delta_real, detect_faces=detector(label), critic=c)  # fmt: skip
        assert out["face_absent_fake"] == label  # the detector's rate on the fakes is logged
        assert 0 <= out["critic_face_absent_fake"] <= 1
        with torch.no_grad():
            fake = gen(torch.randn(6, 16, generator=torch.Generator().manual_seed(3)))
            critics.append(torch.sigmoid(model(fake)).mean().item())
    assert calls == [(6, 3, *SIZE)] * 2
    # fakes labelled "face" (Δ = 0) raise F on fakes above what fakes labelled "no face" leave
    assert critics[0] > critics[1] + 1e-3


def test_fakes_prepared_ahead_give_the_step_it_would_compute_itself():
    """prepare_fakes after the previous step (Δ detected while the next batch loads) = the step generating its own."""
    from reid_core.train.steps import Guidance, prepare_fakes

    guidance = Guidance("weighted", 0.05, 0.05)  # λ2 > 0: Δ of the fakes is needed every step
    real = torch.rand(6, 3, *SIZE, generator=torch.Generator().manual_seed(7)) * 2 - 1
    detected = []

    def detect(fake):
        detected.append(fake.clone())
        return (fake.mean(dim=(1, 2, 3)) > 0).float()  # a deterministic stand-in for Δ of these very images

    def updaters():
        gen, disc = tiny_pair(0)
        return (TorchUpdater(gen, torch.optim.SGD(gen.parameters(), lr=0.05)),
                TorchUpdater(disc, torch.optim.SGD(disc.parameters(), lr=0.05)))  # fmt: skip

    g1, d1 = updaters()
    own = gan_step(g1, d1, real, z_dim=16, generator=torch.Generator().manual_seed(3), guidance=guidance,
                   detect_faces=detect)  # fmt: skip
    g2, d2 = updaters()
    rng = torch.Generator().manual_seed(3)
    prepared = prepare_fakes(g2, 6, z_dim=16, device="cpu", generator=rng, guidance=guidance, detect_faces=detect)
    ahead = gan_step(g2, d2, real, z_dim=16, generator=rng, guidance=guidance, prepared=prepared,
                     detect_faces=lambda fake: pytest.fail("the prepared Δ is used, not a new detection"))  # fmt: skip
    assert len(detected) == 2 and torch.equal(detected[0], detected[1])
    assert {k: v for k, v in own.items() if k != "step_seconds"} == {
        k: v for k, v in ahead.items() if k != "step_seconds"
    }
    for a, b in zip(params(g1.module) + params(d1.module), params(g2.module) + params(d2.module), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="prepared fakes hold 6 images for a batch of 4"):
        gan_step(g2, d2, real[:4], z_dim=16, guidance=guidance, prepared=prepared)


def test_critic_mode_takes_the_prepared_fakes_as_the_training_loop_passes_them():
    """The loop hands gan_step prepared fakes (their Δ pending) and no detector: in critic mode that must run, and
    give the step that detects for itself (a run of the guidance experiment failed here at its first step)."""
    from reid_core.train.steps import Guidance, prepare_fakes

    guidance = Guidance("critic", 0.1, 0.1)
    real = torch.rand(6, 3, *SIZE, generator=torch.Generator().manual_seed(7)) * 2 - 1

    def detect(fake):
        return (fake.mean(dim=(1, 2, 3)) > 0).float()

    def updaters():
        gen, disc = tiny_pair(0)
        torch.manual_seed(5)
        scorer = build_model("face_presence", channels=(4, 8), image_size=16)
        return [TorchUpdater(m, torch.optim.SGD(m.parameters(), lr=0.05)) for m in (gen, disc, scorer)]

    g1, d1, c1 = updaters()
    own = gan_step(g1, d1, real, z_dim=16, generator=torch.Generator().manual_seed(3), guidance=guidance,
                   detect_faces=detect, critic=c1)  # fmt: skip
    g2, d2, c2 = updaters()
    rng = torch.Generator().manual_seed(3)
    prepared = prepare_fakes(g2, 6, z_dim=16, device="cpu", generator=rng, guidance=guidance, detect_faces=detect)
    assert prepared.pending is not None  # critic mode always labels the fakes
    ahead = gan_step(g2, d2, real, z_dim=16, generator=rng, guidance=guidance, critic=c2, prepared=prepared)
    assert "loss_critic" in ahead
    assert {k: v for k, v in own.items() if k != "step_seconds"} == {
        k: v for k, v in ahead.items() if k != "step_seconds"
    }
    for a, b in zip(params(c1.module), params(c2.module), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="pass detect_faces"):
        gan_step(g2, d2, real, z_dim=16, guidance=guidance, critic=c2)
