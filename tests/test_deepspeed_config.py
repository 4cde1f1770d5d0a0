"""The DeepSpeed config builder: CPU and GPU dicts (the GPU path is config only; nothing here touches CUDA)."""

from __future__ import annotations

import pytest

from reid_core.train.deepspeed import deepspeed_config, dist_backend, needs_torch_optimizer


def test_cpu_config_is_fp32_with_a_torch_optimizer():
    cfg = deepspeed_config(micro_batch_size=16, world_size=2, use_gpu=False)
    assert cfg["train_batch_size"] == 32
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == 0
    assert needs_torch_optimizer(cfg)
    assert dist_backend(False) == "gloo"


def test_gpu_config_is_bf16_zero2_with_deepspeeds_fused_adam():
    cfg = deepspeed_config(micro_batch_size=64, world_size=8, use_gpu=True, precision="bf16", zero_stage=2, lr=1e-3)
    assert cfg["train_batch_size"] == 512
    assert cfg["bf16"]["enabled"] is True
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                        "reduce_scatter": True}  # fmt: skip
    assert cfg["optimizer"]["type"] == "Adam" and cfg["optimizer"]["params"]["torch_adam"] is False
    assert cfg["optimizer"]["params"]["lr"] == 1e-3
    assert not needs_torch_optimizer(cfg)
    assert dist_backend(True) == "nccl"


def test_each_call_returns_a_fresh_dict():
    a = deepspeed_config(micro_batch_size=4, world_size=1, use_gpu=False)
    b = deepspeed_config(micro_batch_size=4, world_size=1, use_gpu=False)
    a["zero_optimization"]["stage"] = 2
    assert b["zero_optimization"]["stage"] == 0


@pytest.mark.parametrize(("kwargs", "match"), [({"precision": "fp16"}, "fp16"), ({"zero_stage": 3}, "ZeRO stage 3")])
def test_unsupported_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        deepspeed_config(micro_batch_size=4, world_size=1, use_gpu=False, **kwargs)


def test_bf16_autocast_keeps_fp32_weights_and_runs_the_forward_in_bf16(single_process_group):
    """precision bf16_autocast: DeepSpeed's torch_autocast section; on this CPU the engine's Linear runs in bf16 while
    its weights and their update stay fp32 (the same config enables CUDA autocast on GPUs)."""
    import deepspeed
    import torch

    cfg = deepspeed_config(micro_batch_size=4, world_size=1, use_gpu=False, precision="bf16_autocast")
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and cfg["bf16"]["enabled"] is False
    assert "torch_autocast" not in deepspeed_config(micro_batch_size=4, world_size=1, use_gpu=False, precision="bf16")
    gpu = deepspeed_config(micro_batch_size=4, world_size=8, use_gpu=True, precision="bf16_autocast", zero_stage=2)
    assert gpu["communication_data_type"] == "fp32"  # fp32 gradients
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=cfg)
    before = engine.module.weight.detach().clone()
    out = engine(torch.randn(4, 8))
    assert out.dtype == torch.bfloat16
    engine.backward(out.float().pow(2).mean())
    engine.step()
    assert engine.module.weight.dtype == torch.float32
    assert not torch.equal(engine.module.weight, before)


@pytest.mark.parametrize(
    ("name", "kwargs", "zero_stage", "shape"),
    [
        ("dcgan_generator", {"z_dim": 100, "width": 8, "image_size": (64, 32)}, 2, (4, 100)),
        ("dcgan_discriminator", {"width": 8, "image_size": (64, 32)}, 2, (4, 3, 64, 32)),
        ("condensenet_tiny", {"num_classes": 5, "feature_dim": 16}, 1, (4, 3, 64, 32)),
    ],
)
def test_bf16_engines_cast_batchnorm_buffers_with_the_parameters(single_process_group, name, kwargs, zero_stage, shape):
    """precision bf16 (the GPU recipes): DeepSpeed casts only parameters unless told otherwise, and CUDA's batch norm
    refuses fp32 running statistics beside a bf16 input. That failed both training steps of `make gpu-check` on an
    H200; this CPU test pins the contract that broke: every floating buffer is bf16 with the parameters, and a
    training step runs in bf16."""
    import deepspeed
    import torch

    from reid_core.models import build_model

    cfg = deepspeed_config(micro_batch_size=4, world_size=1, use_gpu=False, precision="bf16", zero_stage=zero_stage)
    assert cfg["data_types"] == {"buffer_dtype": "bf16"}
    assert "data_types" not in deepspeed_config(
        micro_batch_size=4, world_size=1, use_gpu=False, precision="bf16_autocast"
    )
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # a ZeRO-supported torch optimizer, as on the CPU
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    floating = [(n, b.dtype) for n, b in engine.module.named_buffers() if b.is_floating_point()]
    assert floating and all(d == torch.bfloat16 for _, d in floating), floating
    assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
    out = engine(torch.randn(*shape).bfloat16())
    out = out[0] if isinstance(out, tuple) else out
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    engine.backward(out.float().pow(2).mean())
    engine.step()


def test_the_cpu_backend_compiles_no_shared_memory_kernel(single_process_group):
    """On the CPU, DeepSpeed's torch backend would JIT-compile its shared-memory all-reduce (an inference-only kernel)
    at ``init_distributed``: ~25-40 s of C++ per fresh environment. ``init_distributed`` marks it unavailable, so the
    backend starts without it and training's all-reduce goes through gloo."""
    import deepspeed.ops
    import torch
    import torch.distributed as dist
    from deepspeed.comm import comm

    from reid_core.train.deepspeed import SHM_COMM_OP

    assert deepspeed.ops.__compatible_ops__[SHM_COMM_OP] is False
    assert comm.cdb is not None and comm.cdb.shm_comm_op is None
    assert dist.get_backend() == "gloo"
    t = torch.ones(3)
    comm.all_reduce(t)
    assert t.tolist() == [1.0, 1.0, 1.0]  # world size 1: the sum is the tensor itself
