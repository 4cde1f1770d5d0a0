"""GAN step throughput, measured in one run against baselines from the same run, in interleaved rounds.

(a) Ray Train + DeepSpeed (1 worker, CPU, gloo, fp32) vs a plain PyTorch loop on the same model, batch and in-memory
    data: images/s of each and their ratio (target ≥ 0.85×).
(b) The share of a guided step (weighted mode, λ2 > 0: the detector runs on every generated batch) spent in Δ, at
    128×64 (width 32, batch 16) with the person-crop detector (``FaceDetector.for_person_crops``, detection in threads
    overlapping D's forward passes through ``submit``): (t_guided − t_unguided) / t_guided (target ≤ 25%).

Each round times the plain loop, then the Ray run (and, for (b), the unguided loop, then the guided ones); the
figures are medians over the rounds, written to bench/results.json with their verdicts.

    .venv/bin/python bench/gan_step.py [--quick] [--steps N] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import Report, median_of_rounds  # noqa: E402

Z_DIM, WIDTH, SIZE, BATCH = 100, 32, (64, 32), 16
SIZE_B = (128, 64)  # (b): the size the issue sets for Δ's share


def make_models(seed: int = 0, size: tuple[int, int] = SIZE):
    from reid_core.models import build_model

    torch.manual_seed(seed)
    gen = build_model("dcgan_generator", z_dim=Z_DIM, width=WIDTH, image_size=size)
    disc = build_model("dcgan_discriminator", width=WIDTH, image_size=size)
    return gen, disc


def data(n_batches: int, size: tuple[int, int] = SIZE) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(BATCH, 3, *size, generator=g) * 2 - 1 for _ in range(n_batches)]


def timed_loop(gen_u, disc_u, batches, warmup: int, **step_kwargs) -> float:
    """images/s over ``batches`` after ``warmup`` untimed steps."""
    from reid_core.train.steps import gan_step

    for real in batches[:warmup]:
        gan_step(gen_u, disc_u, real, z_dim=Z_DIM, **step_kwargs)
    t0 = time.perf_counter()
    for real in batches[warmup:]:
        gan_step(gen_u, disc_u, real, z_dim=Z_DIM, **step_kwargs)
    return (len(batches) - warmup) * BATCH / (time.perf_counter() - t0)


def plain_updaters(size: tuple[int, int] = SIZE):
    from reid_core.train.steps import TorchUpdater

    gen, disc = make_models(size=size)
    adam = dict(lr=2e-4, betas=(0.5, 0.999))
    return (TorchUpdater(gen, torch.optim.Adam(gen.parameters(), **adam)),
            TorchUpdater(disc, torch.optim.Adam(disc.parameters(), **adam)))  # fmt: skip


def ray_deepspeed_worker(config: dict) -> None:
    import deepspeed
    import ray.train

    from reid_core.train.deepspeed import deepspeed_config

    torch.set_num_threads(config["threads"])
    deepspeed.init_distributed(dist_backend="gloo")
    engines = []
    for model in make_models():
        cfg = deepspeed_config(micro_batch_size=BATCH, world_size=1, use_gpu=False)
        opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.5, 0.999))
        engines.append(deepspeed.initialize(model=model, optimizer=opt, config=cfg)[0])
    ips = timed_loop(*engines, data(config["steps"] + config["warmup"]), config["warmup"])
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # Train V2 returns metrics only with a checkpoint
        Path(tmp, "ips.txt").write_text(str(ips))
        ray.train.report({"images_per_second": ips}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def bench_ray_vs_plain(steps: int, warmup: int, threads: int, rounds: int) -> list[tuple[float, float]]:
    """(plain images/s, Ray Train + DeepSpeed images/s) per round; each round runs the plain loop, then the Ray run."""
    import tempfile

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    torch.set_num_threads(threads)
    ray.init(num_cpus=max(2, threads), include_dashboard=True, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})  # fmt: skip
    out = []
    try:
        for round_ in range(rounds):
            plain = timed_loop(*plain_updaters(), data(steps + warmup), warmup)
            with tempfile.TemporaryDirectory() as tmp:
                trainer = TorchTrainer(
                    ray_deepspeed_worker,
                    train_loop_config={"steps": steps, "warmup": warmup, "threads": threads},
                    torch_config=TorchConfig(backend="gloo"),
                    scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
                    run_config=RunConfig(name=f"bench-gan-step-{round_}", storage_path=tmp),
                )
                result = trainer.fit()
            ray_ips = (result.metrics or {}).get("images_per_second")
            if ray_ips is None:
                raise RuntimeError(f"round {round_}: no images_per_second came back from the Ray Train worker")
            print(f"  round {round_ + 1}: plain {plain:7.1f} images/s, Ray Train + DeepSpeed {ray_ips:7.1f} images/s",
                  flush=True)  # fmt: skip
            out.append((plain, ray_ips))
    finally:
        ray.shutdown()
    return out


def bench_detection_share(steps: int, warmup: int, threads: int) -> dict[str, float]:
    from reid_core.guidance.faces import FaceDetector
    from reid_core.train.steps import Guidance

    torch.set_num_threads(threads)
    batches = data(steps + warmup, SIZE_B)
    guidance = Guidance("weighted", 0.05, 0.05)
    unguided = timed_loop(*plain_updaters(SIZE_B), batches, warmup, guidance=guidance, detect_faces=None)
    out = {"unguided_ips": unguided}
    for workers in (0, 2):
        with FaceDetector.for_person_crops(workers=workers) as det:
            guided = timed_loop(*plain_updaters(SIZE_B), batches, warmup, guidance=guidance,
                                detect_faces=lambda fake, det=det: det.submit(fake))  # fmt: skip
        out[f"guided_ips_workers{workers}"] = guided
        out[f"delta_share_workers{workers}"] = 1.0 - guided / unguided
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in both loops (default 1)")
    args = parser.parse_args()
    steps = args.steps or (10 if args.quick else 60)
    warmup = 3

    report = Report("bench/gan_step.py", quick=args.quick)
    print(f"GAN step benchmark: DC-GAN {SIZE[0]}x{SIZE[1]}, width {WIDTH}, batch {BATCH}, {steps} timed steps, "
          f"{args.threads} torch thread(s), {args.rounds} interleaved rounds (medians)")  # fmt: skip
    pairs = bench_ray_vs_plain(steps, warmup, args.threads, args.rounds)
    config = f"{SIZE[0]}×{SIZE[1]}, width {WIDTH}, batch {BATCH}"
    report.figure(f"(a) plain PyTorch loop, {config}", median_of_rounds([p for p, _ in pairs]), "images/s")
    report.figure(f"(a) Ray Train + DeepSpeed, 1 worker, {config}", median_of_rounds([r for _, r in pairs]), "images/s")
    report.figure(f"(a) Ray Train + DeepSpeed / plain PyTorch loop, {config}",
                  median_of_rounds([r / p for p, r in pairs]), "x", target=(">=", 0.85))  # fmt: skip
    config_b = f"{SIZE_B[0]}×{SIZE_B[1]}, width {WIDTH}, batch {BATCH}, person-crop detector"
    shares = []
    for round_ in range(args.rounds):
        share = bench_detection_share(steps, warmup, args.threads)
        print(f"  round {round_ + 1}: unguided {share['unguided_ips']:.1f} images/s; guided " + ", ".join(
            f"{share[f'guided_ips_workers{w}']:.1f} images/s with {w} detector threads" for w in (0, 2)), flush=True)  # fmt: skip
        shares.append(share)
    for workers in (0, 2):
        where = "in the calling thread" if workers == 0 else f"{workers} detector threads"
        report.figure(f"(b) share of a guided step (λ2 > 0) spent in Δ, {config_b}, {where}",
                      100 * median_of_rounds([sh[f"delta_share_workers{workers}"] for sh in shares]), "%",
                      target=("<=", 25))  # fmt: skip
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
