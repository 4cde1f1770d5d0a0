"""The GPU node check behind `make gpu-check` (``jobs/gpu_check.py``): is this node ready for a long job?

It runs one Ray Train worker (1 GPU, every CPU of the node) with DeepSpeed engines built exactly as the jobs build
them (``reid_core.train.deepspeed.deepspeed_config``, ``reid_core.train.steps.gan_step``, the re-ID step of
``train_reid_loop``, the loops' ``loader_kwargs``), on data it synthesises itself (no S3, no MLflow), and reports the
environment, the GAN and CondenseNet-74 training rates, the loader, Δ's share of a guided step, the deploy model's
inference rate and the evaluation at MSMT17 scale (``run_check``; the sections are listed in the job's docstring).
Without a GPU (or ``dry=True``) the same code paths run at tiny sizes on the CPU, in fp32 over gloo.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Sizes:
    """What each section measures; ``GPU`` is the paper's recipes, ``DRY`` the same code paths at tiny sizes."""

    gan_size: tuple[int, int]
    gan_width: int
    gan_batch: int
    reid_model: str
    reid_size: tuple[int, int]
    reid_batch: int  # real identities × images + distractors
    reid_classes: int
    infer_batch: int
    eval_queries: int
    eval_gallery: int
    eval_dim: int
    loader_ids: int
    steps: int  # timed steps of each training section (after 2 warm-up steps)


GPU = Sizes(
    (128, 128), 64, 8, "condensenet74", (256, 128), 16 * 4 + 32, 1041, 256, 11659, 82161, 512, 200, 20
)  # gan_batch: configs/gan.yaml, 8 per GPU x 8 = 64
DRY = Sizes((64, 32), 8, 4, "condensenet_tiny", (64, 32), 8, 10, 8, 200, 1000, 32, 8, 2)


# ------------------------------------------------------------------------------------------------ environment
def environment() -> dict:
    """torch / CUDA / NCCL / bf16 / GPU / DeepSpeed facts of this process (no GPU needed)."""
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_runtime": torch.version.cuda,
        "cpus": len(os.sched_getaffinity(0)),
        "nccl": None,
        "bf16_supported": None,
        "gpus": [],
    }
    if torch.cuda.is_available():
        nccl = torch.cuda.nccl.version()  # a tuple in current torch, an int in older ones
        env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        env["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["gpus"].append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                "capability": f"{p.major}.{p.minor}"})  # fmt: skip
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
        env["deepspeed_accelerator"] = deepspeed.get_accelerator().device_name()
        env["deepspeed_ops"] = deepspeed_ops()
    except Exception as err:  # a broken DeepSpeed install is exactly what this check is for
        env["deepspeed"] = f"error: {type(err).__name__}: {err}"
    return env


def deepspeed_ops() -> dict[str, bool]:
    """DeepSpeed's ops the recipes use (FusedAdam, CPU Adam) and whether each can be built/loaded here."""
    from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder

    out = {}
    for name, builder in (("fused_adam", FusedAdamBuilder), ("cpu_adam", CPUAdamBuilder)):
        try:
            out[name] = bool(builder().is_compatible(verbose=False))
        except Exception:
            out[name] = False
    return out


# ------------------------------------------------------------------------------------------------ helpers
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(fn, images: int, *, steps: int, warmup: int = 2, device: torch.device) -> float:
    """images/s of ``fn()`` (one step of ``images`` images) over ``steps`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return steps * images / (time.perf_counter() - t0)


def engine_for(model, *, batch: int, use_gpu: bool, precision: str, zero_stage: int, optimizer=None, lr=2e-4):
    """A DeepSpeed engine configured as the jobs configure theirs."""
    import deepspeed

    from reid_core.train.deepspeed import deepspeed_config, needs_torch_optimizer

    cfg = deepspeed_config(micro_batch_size=batch, world_size=1, use_gpu=use_gpu, precision=precision,
                           zero_stage=zero_stage, lr=lr)  # fmt: skip
    if optimizer is not None:  # the re-ID recipe's SGD, as train_reid_loop passes it
        cfg.pop("optimizer", None)
        cfg["zero_allow_untested_optimizer"] = True
    elif needs_torch_optimizer(cfg):
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.999))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    return engine


# ------------------------------------------------------------------------------------------------ sections
def gan_section(s: Sizes, device, *, use_gpu: bool, precision: str, cpus: int) -> dict:
    """images/s of the GAN step (ZeRO-2) unguided and guided (Δ on every generated batch), and Δ's share."""
    from reid_core.guidance.faces import FaceDetector
    from reid_core.models import build_model
    from reid_core.train.steps import Guidance, gan_step, prepare_fakes

    torch.manual_seed(0)
    gen = engine_for(build_model("dcgan_generator", z_dim=100, width=s.gan_width, image_size=s.gan_size),
                     batch=s.gan_batch, use_gpu=use_gpu, precision=precision, zero_stage=2)  # fmt: skip
    disc = engine_for(build_model("dcgan_discriminator", width=s.gan_width, image_size=s.gan_size),
                      batch=s.gan_batch, use_gpu=use_gpu, precision=precision, zero_stage=2)  # fmt: skip
    real = (torch.rand(s.gan_batch, 3, *s.gan_size) * 2 - 1).pin_memory() if use_gpu else None
    real = real if real is not None else torch.rand(s.gan_batch, 3, *s.gan_size) * 2 - 1
    rng = torch.Generator(device=device).manual_seed(0)
    guidance = Guidance("weighted", 0.05, 0.05)  # λ2 > 0: Δ(G(z)) every step

    ahead: dict = {}

    def step(detect=None):
        batch = real.to(device, non_blocking=True)  # pinned host memory: an asynchronous copy, as the loaders do
        kwargs = dict(z_dim=100, generator=rng, guidance=guidance, detect_faces=detect)
        if detect is None:
            gan_step(gen, disc, batch, g_steps=2, **kwargs)
            return
        # as train_gan_loop: the next step's G(z) and its Δ are started right after each step
        prepared = ahead.pop("next", None) or prepare_fakes(gen, s.gan_batch, device=device, **kwargs)
        gan_step(gen, disc, batch, g_steps=2, prepared=prepared, **kwargs)
        ahead["next"] = prepare_fakes(gen, s.gan_batch, device=device, **kwargs)

    unguided = images_per_second(step, s.gan_batch, steps=s.steps, device=device)
    with FaceDetector.for_person_crops(workers=cpus) as detector:  # the one Δ setting, as train_gan_loop
        guided = images_per_second(lambda: step(detector.submit), s.gan_batch, steps=s.steps, device=device)
    return {"zero_stage": 2, "precision": precision, "image_size": list(s.gan_size), "batch": s.gan_batch,
            "width": s.gan_width, "unguided_images_per_s": unguided, "guided_images_per_s": guided,
            "delta_share": max(0.0, 1.0 - guided / unguided), "detector_threads": cpus}  # fmt: skip


def reid_section(s: Sizes, device, *, use_gpu: bool, precision: str) -> tuple[dict, torch.nn.Module]:
    """images/s of the CondenseNet training step (forward, distractor-class loss + group lasso, backward, SGD)."""
    from reid_core.losses import reid_loss
    from reid_core.models import build_model
    from reid_core.models.condense import group_lasso_loss

    torch.manual_seed(0)
    model = build_model(s.reid_model, num_classes=s.reid_classes + 1, feature_dim=512 if use_gpu else 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    engine = engine_for(model, batch=s.reid_batch, use_gpu=use_gpu, precision=precision, zero_stage=1,
                        optimizer=optimizer)  # fmt: skip
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    images = torch.randn(s.reid_batch, 3, *s.reid_size)
    images = images.pin_memory() if use_gpu else images
    labels = torch.randint(0, s.reid_classes, (s.reid_batch,), device=device)
    generated = torch.zeros(s.reid_batch, dtype=torch.bool, device=device)
    generated[-max(1, s.reid_batch // 4) :] = True

    def step():
        engine.module.apply_condensation(0.1)
        logits = engine(images.to(device, dtype, non_blocking=True)).float()
        loss = reid_loss(logits, labels, generated, mode="distractor_class") + 1e-5 * group_lasso_loss(engine.module)
        engine.backward(loss)
        engine.step()

    ips = images_per_second(step, s.reid_batch, steps=s.steps, device=device)
    return {"model": s.reid_model, "zero_stage": 1, "precision": precision, "image_size": list(s.reid_size),
            "batch": s.reid_batch, "images_per_s": ips}, engine.module  # fmt: skip


def inference_section(s: Sizes, model: torch.nn.Module, device, *, use_gpu: bool) -> dict:
    """images/s of the converted (deploy) model's features, contiguous and channels_last (bf16 autocast on GPU)."""
    import copy

    from reid_core.models.condense import convert, finish_condensation

    model = copy.deepcopy(model).float().cpu()
    finish_condensation(model)
    deploy = convert(model).eval().to(device)
    x = torch.randn(s.infer_batch, 3, *s.reid_size, device=device)
    out = {"batch": s.infer_batch, "image_size": list(s.reid_size)}
    for layout, memory_format in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        m = deploy.to(memory_format=memory_format)
        xi = x.contiguous(memory_format=memory_format)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_gpu):
            out[f"{layout}_images_per_s"] = images_per_second(
                lambda m=m, xi=xi: m.forward_features(xi), s.infer_batch, steps=max(3, s.steps), device=device
            )
    out["best_layout"] = max(("contiguous", "channels_last"), key=lambda k: out[f"{k}_images_per_s"])
    return out


def loader_section(s: Sizes, *, cpus: int, workers: int, dry: bool) -> dict:
    """images/s of the training loader (read, decode at reduced size, augment, collate) on synthetic JPEGs at
    256×128 and 128×128, from a local folder, with ``workers`` loader processes; and per-core decode rates."""
    from torch.utils.data import DataLoader

    from reid_core import storage
    from reid_core.data import ReIDDataset, build_transforms, read_layout
    from reid_core.data.synthetic import SyntheticSpec, write_layout
    from reid_core.train.loops import loader_kwargs

    out = {"workers": workers, "cpus": cpus}
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "msmt17")
        files: dict[str, bytes] = {}
        write_layout(SyntheticSpec(ids=s.loader_ids, cameras=4, images_per_id=12, test_share=0.25, seed=0), "msmt17",
                     files.__setitem__)  # fmt: skip
        storage.write_many({os.path.join(root, rel): data for rel, data in files.items()})
        records = read_layout(root, "msmt17").train
        for h, w in ((256, 128), (128, 128)):
            dataset = ReIDDataset(records, build_transforms(h, w, train=True), decode_size=(h, w))
            # per core: decode + augment in this process on one thread (as in a loader worker, which torch limits
            # to one intra-op thread); torch's other threads would otherwise spin and blur the figure
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                t0, c0 = time.perf_counter(), time.process_time()
                n = min(len(records), 64 if dry else 400)
                for i in range(n):
                    dataset[i]
                out[f"decode_augment_{h}x{w}_images_per_s_per_core"] = n / max(time.process_time() - c0, 1e-9)
                out[f"decode_augment_{h}x{w}_wall_images_per_s"] = n / (time.perf_counter() - t0)
            finally:
                torch.set_num_threads(threads)
            # the training loops' loader settings (forkserver workers kept across epochs, 4 batches ahead, pinned
            # memory on GPUs); the first epoch starts the workers and is not timed
            loader = DataLoader(dataset, batch_size=8 if dry else 32, shuffle=True, drop_last=True,
                                **loader_kwargs(workers, use_gpu=torch.cuda.is_available()))  # fmt: skip
            for _batch in loader:
                pass
            seen, t0 = 0, time.perf_counter()
            for _epoch in range(1 if dry else 3):
                for batch in loader:
                    seen += len(batch["pid"])
            out[f"loader_{h}x{w}_images_per_s"] = seen / (time.perf_counter() - t0)
            del loader
    return out


def eval_section(s: Sizes, device) -> dict:
    """``evaluate_rank`` at MSMT17 scale on random features, on ``device``, against the bare product there."""
    import numpy as np

    from reid_core.metrics.rank import evaluate_rank

    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    q = torch.randn(s.eval_queries, s.eval_dim, generator=gen)
    g = torch.randn(s.eval_gallery, s.eval_dim, generator=gen)
    ids = (rng.integers(0, 3060, s.eval_queries), rng.integers(0, 3060, s.eval_gallery),
           rng.integers(0, 15, s.eval_queries), rng.integers(0, 15, s.eval_gallery))  # fmt: skip
    qd, gd = q.to(device), g.to(device)
    synchronize(device)
    t0 = time.perf_counter()
    qd @ gd.T
    synchronize(device)
    t_product = time.perf_counter() - t0
    del qd, gd
    t0 = time.perf_counter()
    result = evaluate_rank(q, g, *ids, device=device)
    t_eval = time.perf_counter() - t0
    return {"queries": s.eval_queries, "gallery": s.eval_gallery, "dim": s.eval_dim, "device": str(device),
            "seconds": t_eval, "bare_product_seconds": t_product, "mAP": result.mAP}  # fmt: skip


# ------------------------------------------------------------------------------------------------ the Ray worker
def trained_model(results: dict) -> torch.nn.Module:
    """The model that the reid_train section trained (the inference section converts it)."""
    if "_model" not in results:
        raise RuntimeError("no trained CondenseNet to convert: the reid_train section failed")
    return results.pop("_model")


def check_loop(config: dict) -> None:
    """The Ray Train worker: every section in turn; the results go to ``config["out"]`` as JSON."""
    import ray.train

    from reid_core.train.deepspeed import init_distributed

    use_gpu, dry = config["use_gpu"], config["dry"]
    s = Sizes(**config["sizes"])
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    init_distributed(use_gpu)
    cpus = config["cpus"]
    precision = "bf16" if use_gpu else "fp32"
    results: dict = {"environment": environment(), "device": str(device), "dry": dry}
    timings: dict[str, float] = {}
    for name, fn in (
        ("gan", lambda: gan_section(s, device, use_gpu=use_gpu, precision=precision, cpus=cpus)),
        ("reid_train", lambda: reid_section(s, device, use_gpu=use_gpu, precision=precision)),
        ("inference", lambda: inference_section(s, trained_model(results), device, use_gpu=use_gpu)),
        ("loader", lambda: loader_section(s, cpus=cpus, workers=config["loader_workers"], dry=dry)),
        ("evaluation", lambda: eval_section(s, device)),
    ):
        t0 = time.perf_counter()
        try:
            value = fn()
            if name == "reid_train":
                value, results["_model"] = value
            results[name] = value
        except Exception as err:  # one failing section must not hide the others' figures
            where = traceback.extract_tb(err.__traceback__)[-3:]
            results[name] = {"error": f"{type(err).__name__}: {err}",
                             "where": " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(where))}  # fmt: skip
        timings[name] = time.perf_counter() - t0
        print(f"gpu-check: section {name} done in {timings[name]:.1f} s", flush=True)
        # written after every section, so that a node that hangs or is stopped mid-check still leaves its figures
        partial = {k: v for k, v in results.items() if k != "_model"}
        Path(config["out"]).write_text(json.dumps({**partial, "section_seconds": timings}, indent=2))
    results.pop("_model", None)
    results["section_seconds"] = timings
    Path(config["out"]).write_text(json.dumps(results, indent=2))


def run_check(*, out_dir: Path, dry: bool, steps: int | None = None, loader_workers: int | None = None) -> dict:
    """Start a local Ray, run ``check_loop`` in one Ray Train worker, write gpu_check.json / .md; the results."""
    import ray
    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from reid_core.config import ScalingConfig
    from reid_core.train.deepspeed import dist_backend
    from reid_core.train.loops import ray_scaling_config

    use_gpu = torch.cuda.is_available() and not dry
    s = GPU if use_gpu else DRY
    if steps:
        s = Sizes(**{**asdict(s), "steps": steps})
    cpus = len(os.sched_getaffinity(0))
    workers = loader_workers if loader_workers is not None else (max(1, min(cpus - 2, 12)) if use_gpu else 0)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "gpu_check.json"
    raw.unlink(missing_ok=True)
    t0 = time.perf_counter()
    env_vars = {} if use_gpu else {"DS_ACCELERATOR": "cpu"}
    ray.init(num_cpus=cpus, num_gpus=1 if use_gpu else 0, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": env_vars})  # fmt: skip
    try:
        with tempfile.TemporaryDirectory() as tmp:
            scaling = ScalingConfig(num_workers=1, use_gpu=use_gpu, cpus_per_worker=cpus)
            trainer = TorchTrainer(
                check_loop,
                train_loop_config={
                    "use_gpu": use_gpu,
                    "dry": not use_gpu,
                    "sizes": asdict(s),
                    "cpus": cpus,
                    "loader_workers": workers,
                    "out": str(raw.resolve()),
                },  # fmt: skip
                torch_config=TorchConfig(backend=dist_backend(use_gpu)),
                scaling_config=ray_scaling_config(scaling),
                run_config=RunConfig(name="gpu-check", storage_path=tmp),
            )
            trainer.fit()
    finally:
        ray.shutdown()
    if not raw.exists():
        raise RuntimeError("gpu-check: the Ray Train worker wrote no results; see its log above")
    results = json.loads(raw.read_text())
    results["total_seconds"] = time.perf_counter() - t0
    results["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    raw.write_text(json.dumps(results, indent=2))
    (out_dir / "gpu_check.md").write_text(markdown(results))
    return results


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


def markdown(r: dict) -> str:
    """The report a person reads: one table per section; a failing section shows its error."""
    mode = "DRY RUN on the CPU (tiny sizes, fp32, gloo): these figures say nothing about a GPU" if r["dry"] else "GPU"
    lines = [f"# gpu-check {r['date']}", "", f"Mode: {mode}. Device: {r['device']}. "
             f"Total {r['total_seconds']:.0f} s.", ""]  # fmt: skip
    for section in ("environment", "gan", "reid_train", "inference", "loader", "evaluation", "section_seconds"):
        lines += [f"## {section}", "", "| key | value |", "|---|---|"]
        for key, value in r.get(section, {"error": "missing"}).items():
            lines.append(f"| {key} | {_fmt(value)} |")
        lines.append("")
    return "\n".join(lines)


def failures(r: dict) -> list[str]:
    """One line per section that failed or is missing."""
    return [
        f"{name}: {r.get(name, {}).get('error', 'missing')}"
        for name in ("gan", "reid_train", "inference", "loader", "evaluation")
        if name not in r or "error" in r[name]
    ]
