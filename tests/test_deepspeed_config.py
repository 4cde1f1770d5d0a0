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
