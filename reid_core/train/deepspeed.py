"""DeepSpeed configuration builder: one dict per engine, selected by the run's scaling settings.

CPU (the embedded default): fp32 (or bf16, or bf16 autocast), the gloo backend, a torch optimizer passed to ``deepspeed.initialize``
(DeepSpeed's fused optimizers need CUDA). GPU: bf16 by default, NCCL, ZeRO stage from config, and DeepSpeed's own
Adam from the config's ``optimizer`` section, which selects the fused CUDA kernel where it is available.
This module only builds dicts (unit-tested on both paths); it never touches CUDA itself.
"""

from __future__ import annotations

from typing import Any


def deepspeed_config(
    *,
    micro_batch_size: int,
    world_size: int,
    use_gpu: bool,
    precision: str = "fp32",
    zero_stage: int = 0,
    lr: float = 2e-4,
    betas: tuple[float, float] = (0.5, 0.999),
    weight_decay: float = 0.0,
    gradient_accumulation_steps: int = 1,
    gradient_clipping: float | None = None,
) -> dict[str, Any]:
    """A fresh DeepSpeed config dict for one engine (never share one dict between engines: DeepSpeed #1975).

    ``micro_batch_size`` is per worker; DeepSpeed checks train_batch_size = micro × accumulation × world_size.
    """
    if precision not in ("fp32", "bf16", "bf16_autocast"):
        raise ValueError(
            f"precision {precision!r} is not supported; use fp32, bf16 or bf16_autocast (fp16 does not run on the CPU)"
        )
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"ZeRO stage {zero_stage} is not supported here; use 0, 1 or 2")
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # progress goes to MLflow, not to DeepSpeed's stdout
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        # DeepSpeed (0.19) casts only the parameters to bf16 and keeps buffers at their loaded dtype; BatchNorm's
        # running statistics must match its bf16 input on CUDA ("Expected running_mean to have type BFloat16"; found by
        # `make gpu-check` on an H200), so the buffers are cast too, as module.bfloat16() did.
        cfg["data_types"] = {"buffer_dtype": "bf16"}
    if precision == "bf16_autocast":
        # fp32 weights, gradients and optimizer; the engine's forward runs under torch.autocast(bfloat16), which
        # computes DeepSpeed's default "lower-precision-safe" modules (Linear, Conv) in bf16.
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if gradient_clipping:
        cfg["gradient_clipping"] = gradient_clipping
    if use_gpu:
        cfg["communication_data_type"] = "bf16" if precision == "bf16" else "fp32"
        # DeepSpeed builds the optimizer: its "Adam" is FusedAdam on CUDA (falls back to torch's where unavailable).
        cfg["optimizer"] = {
            "type": "AdamW" if weight_decay else "Adam",
            "params": {"lr": lr, "betas": list(betas), "weight_decay": weight_decay, "torch_adam": False},
        }
        if zero_stage >= 1:
            cfg["zero_optimization"].update(overlap_comm=True, contiguous_gradients=True, reduce_scatter=True)
    return cfg


def dist_backend(use_gpu: bool) -> str:
    return "nccl" if use_gpu else "gloo"


# DeepSpeed's name for its shared-memory all-reduce kernel on the CPU accelerator (deepspeed/ops/op_builder/cpu/comm.py).
SHM_COMM_OP = "deepspeed_shm_comm"


def init_distributed(use_gpu: bool) -> None:
    """``deepspeed.init_distributed`` on the backend of ``use_gpu`` (NCCL or gloo), for every engine of this process.

    On the CPU, DeepSpeed's torch backend JIT-compiles its shared-memory all-reduce kernel when it starts: 25-40 s of
    C++ on a 2-core node, again for every new environment (a fresh container, a new venv) since the build lives in
    ``~/.cache/torch_extensions``. Only ``inference_all_reduce`` (tensor-parallel inference) calls that kernel; training
    reduces through ``torch.distributed`` (gloo). So on the CPU it is marked unavailable, in the table DeepSpeed keeps
    for that (``deepspeed.ops.__compatible_ops__``, probed once per process and kept), and nothing is compiled.
    """
    import deepspeed
    import deepspeed.ops

    if not use_gpu:
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    deepspeed.init_distributed(dist_backend=dist_backend(use_gpu))


def needs_torch_optimizer(ds_config: dict[str, Any]) -> bool:
    """True when the caller must pass a torch optimizer to ``deepspeed.initialize`` (no ``optimizer`` section)."""
    return "optimizer" not in ds_config
