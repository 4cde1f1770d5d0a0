"""gan_step on plain PyTorch updaters and on real DeepSpeed engines (one process, gloo, CPU)."""

from __future__ import annotations

import math
import os

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
    assert set(out) == {"loss_d", "loss_g", "d_real", "d_fake", "step_seconds"}
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


@pytest.fixture(scope="module")
def single_process_group():
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    yield
    dist.destroy_process_group()


def _free_port() -> int:
    from reid_core.stack import free_port

    return free_port()


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
