"""CondenseNet-74 at 256×128 on CPU: converted (deploy) vs training-form inference, and size against ResNet-50.

Measured in one run, so the ratios are meaningful even on a shared, noisy CPU:
- inference time of ``forward_features`` in eval mode, training form (dense 1×1 convolutions times their masks, after
  ``finish_condensation``) vs ``convert(model)``; the two are timed alternately and the medians compared
  (target: converted >= 1.5× faster), and their features compared (must be equal at atol 1e-5);
- backbone parameters (everything before the feature layer) against torchvision's ResNet-50 without its fc
  (target: <= 0.25×);
- FLOPs of one 256×128 image, counted by ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts as 2
  FLOPs; papers usually quote multiply-adds, i.e. half these figures).

Load average at start and end, figures and verdicts are printed and written to bench/results.json.

Run: ``.venv/bin/python bench/condensenet.py`` (``--quick``: fewer repeats).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from torchvision.models import resnet50  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import Report  # noqa: E402

from reid_core.models import build_model  # noqa: E402
from reid_core.models.condense import CondensedGroupConv, LearnedGroupConv, convert, finish_condensation  # noqa: E402

HEIGHT, WIDTH = 256, 128


def randomise_batch_norm(model: nn.Module, *, generator: torch.Generator) -> None:
    """Give every batch norm non-trivial statistics and affine parameters, as after training."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.1)


def backbone_parameters(model: nn.Module, *, exclude: tuple[str, ...]) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(exclude))


def count_flops(fn, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops()


def time_alternately(
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, *, repeats: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Median wall-clock and CPU seconds per call of each function.

    Calls are interleaved so that load changes from other processes hit all functions alike. CPU time
    (``time.thread_time``, valid because torch runs on the calling thread with one intra-op thread) is much less
    sensitive to other processes on a shared machine than wall-clock time.
    """
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn(x)
        for _ in range(repeats):
            for name, fn in fns.items():
                start_wall, start_cpu = time.perf_counter(), time.thread_time()
                fn(x)
                cpu[name].append(time.thread_time() - start_cpu)
                wall[name].append(time.perf_counter() - start_wall)
    return {name: {"wall": statistics.median(wall[name]), "cpu": statistics.median(cpu[name])} for name in fns}


def time_in_layers(model: nn.Module, layer_type: type[nn.Module], x: torch.Tensor, *, repeats: int) -> float:
    """Median CPU seconds per forward pass spent inside modules of ``layer_type`` (measured with hooks)."""
    spent: list[float] = []
    start: dict[int, float] = {}

    def before(module: nn.Module, inputs: tuple) -> None:
        start[id(module)] = time.thread_time()

    def after(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        spent[-1] += time.thread_time() - start[id(module)]

    with torch.inference_mode():
        model.forward_features(x)  # warm-up, not timed
    handles = []
    for m in model.modules():
        if isinstance(m, layer_type):
            handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    try:
        with torch.inference_mode():
            for _ in range(repeats):
                spent.append(0.0)
                model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    return statistics.median(spent)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 timed repeats instead of 10")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="images per forward pass")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward passes per model and batch size")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a CPU shared with other processes, more threads make timings "
        "erratic and CPU time no longer measures one call)",
    )
    args = parser.parse_args()
    batches, repeats, warmup = (args.batches, 5, 1) if args.quick else (args.batches, args.repeats, 2)
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    trained = build_model("condensenet74", num_classes=1041)
    randomise_batch_norm(trained, generator=generator)
    finish_condensation(trained)
    trained.eval()
    deploy = convert(trained)
    reference = resnet50(weights=None)
    reference.fc = nn.Identity()
    reference.eval()

    report = Report("bench/condensenet.py", quick=args.quick)
    print(f"CondenseNet-74 vs its converted form at {HEIGHT}x{WIDTH}, CPU, {torch.get_num_threads()} thread(s)")
    setting = f"{HEIGHT}×{WIDTH}, {torch.get_num_threads()} thread(s)"
    all_equal = True
    for batch in batches:
        x = torch.randn(batch, 3, HEIGHT, WIDTH, generator=generator)
        with torch.inference_mode():
            f_trained = trained.forward_features(x)
            f_deploy = deploy.forward_features(x)
        max_diff = (f_trained - f_deploy).abs().max().item()
        equal = torch.allclose(f_deploy, f_trained, atol=1e-5, rtol=0)
        all_equal &= equal
        times = time_alternately(
            {
                "training form": trained.forward_features,
                "converted": deploy.forward_features,
                "ResNet-50 (no fc)": reference,
            },
            x,
            repeats=repeats,
            warmup=warmup,
        )
        print(f"inference, batch {batch}, median of {repeats} alternating runs:")
        for name, t in times.items():
            print(f"  {name:18s} {t['cpu'] * 1e3:9.1f} ms CPU/batch  {t['wall'] * 1e3:9.1f} ms wall/batch")
        cpu_speedup = times["training form"]["cpu"] / times["converted"]["cpu"]
        wall_speedup = times["training form"]["wall"] / times["converted"]["wall"]
        vs_resnet = times["ResNet-50 (no fc)"]["cpu"] / times["converted"]["cpu"]
        print(f"  features: max |feature| {f_trained.abs().max().item():.2e}")
        where = f"{setting}, batch {batch}, median of {repeats} alternating runs"
        report.figure(f"converted vs training-form CondenseNet-74 inference speed-up, CPU time, {where}", cpu_speedup,
                      "x", target=(">=", 1.5))  # fmt: skip
        report.figure(f"converted vs training-form CondenseNet-74 inference speed-up, wall clock, {where}",
                      wall_speedup, "x", target=(">=", 1.5))  # fmt: skip
        report.figure(f"converted CondenseNet-74 vs ResNet-50 (no fc) inference speed-up, CPU time, {where}",
                      vs_resnet, "x")  # fmt: skip
        report.figure(f"largest absolute difference of the features, converted vs training form, batch {batch}", max_diff, "",
                      target=("<=", 1e-5))  # fmt: skip
        t_learned = time_in_layers(trained, LearnedGroupConv, x, repeats=max(3, repeats // 2))
        t_condensed = time_in_layers(deploy, CondensedGroupConv, x, repeats=max(3, repeats // 2))
        share = t_learned / times["training form"]["cpu"]
        print(
            f"  inside the 1x1 learned group convolutions only: {t_learned * 1e3:.1f} -> {t_condensed * 1e3:.1f} ms "
            f"CPU ({t_learned / t_condensed:.2f}x); they are {share:.0%} of the training form's time; of the rest, the "
            "3x3 group convolutions and pooling are the same in both forms (the conversion also folds the 3x3 branch's "
            "BN-ReLU into the 1x1 and writes each block into one buffer instead of concatenating per layer)"
        )

    head = ("feature", "classifier")
    params = {
        "training form": backbone_parameters(trained, exclude=head),
        "converted": backbone_parameters(deploy, exclude=head),
        "ResNet-50 (no fc)": backbone_parameters(reference, exclude=()),
    }
    with_feature = backbone_parameters(deploy, exclude=("classifier",))
    one = torch.randn(1, 3, HEIGHT, WIDTH, generator=generator)
    flops = {
        "training form": count_flops(trained.forward_features, one),
        "converted": count_flops(deploy.forward_features, one),
        "ResNet-50 (no fc)": count_flops(reference, one),
    }

    base = "ResNet-50 (no fc)"
    print("backbone parameters (up to the pooled output; ratio to ResNet-50 without fc):")
    for name, n in params.items():
        print(f"  {name:18s} {n / 1e6:7.3f} M  {n / params[base]:.3f}x")
    report.figure("converted CondenseNet-74 backbone parameters", params["converted"] / 1e6, "M")
    report.figure("converted CondenseNet-74 backbone parameters / ResNet-50 (fc removed)",
                  params["converted"] / params[base], "x", target=("<=", 0.25))  # fmt: skip
    print(f"  converted backbone + feature layer: {with_feature / 1e6:.3f} M ({with_feature / params[base]:.3f}x)")
    print(f"FLOPs per {HEIGHT}x{WIDTH} image (FlopCounterMode, multiply-add = 2 FLOPs; ratio to ResNet-50):")
    for name, n in flops.items():
        print(f"  {name:18s} {n / 1e9:7.3f} GFLOPs  {n / flops[base]:.3f}x")
    print(f"  converted vs training form: {flops['converted'] / flops['training form']:.3f}x")
    report.figure(f"converted CondenseNet-74 FLOPs per {HEIGHT}×{WIDTH} image / ResNet-50 (fc removed)",
                  flops["converted"] / flops[base], "x")  # fmt: skip
    report.write()
    return 0 if all_equal else 1


if __name__ == "__main__":
    sys.exit(main())
