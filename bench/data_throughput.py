"""Data throughput from S3: images/s of each way of reading a dataset, all measured in one run against the loopback S3.

The loopback S3 server answers a small GET in about a millisecond, so on its own it cannot show what requests in
flight buy against real S3 (tens of ms per GET). A TCP pipe in front of it (``devstack.proxy --tcp``, its own process
on 127.0.0.1) delays every request by ``--latency-ms`` (default 20); every source is measured without and with it, on
the same synthetic MSMT17 images (person crops of 160×80 to 256×128, JPEG). The server is SeaweedFS's S3 gateway
(``--s3-server``, default seaweedfs): on a GPU node S3's CPU is not the node's, and here moto's 2.6-6 ms of CPU per GET
on the same 2 cores would measure the server rather than the loader (docs/experiments.md).

  sequential   one ``storage.read_bytes`` per image, one after the other (what a naive Dataset does; s3fs)
  concurrent   ``storage.read_many``: one GET per object, up to 64 in flight (obstore)
  shards       the same images packed (``jobs/pack_dataset.py``), read by ``read_record_bytes`` in pack order:
               merged ranged reads of the shards
  local disk   the same files from a local folder
  CPU per GET  ms of CPU per GET, 64 in flight with latency, in the client (obstore's ``read_many``, and s3fs's
               ``cat`` for comparison: what ``read_many`` used before 2026-12-07), the S3 server and the pipe
  loader       what training gets: ``ReIDDataset`` (decode + the demo's transforms) with the P×K sampler and the
               demo's DataLoader settings, plain and packed, against the training step's consumption: a forward/
               backward/SGD step of the demo's model at its batch and image size (configs/reid_demo.yaml), one
               thread each, as a 1-CPU Ray Train worker runs both

Targets, with latency: concurrent ≥ 4× sequential; shards ≥ 5× sequential; loader ≥ 2× the step's images/s.
Figures are medians over interleaved rounds (ratios: medians of per-round ratios), printed with their verdicts and
written to bench/results.json.

    .venv/bin/python bench/data_throughput.py [--quick] [--latency-ms 20] [--ids 100] [--s3-server seaweedfs]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import Report  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "reid_demo.yaml"


# ------------------------------------------------------------------------------------------------ latency proxy
def start_proxy(upstream: str, latency_ms: float) -> tuple[subprocess.Popen, str]:
    from devstack.stack import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "devstack.proxy", "--upstream", upstream, "--port", str(port),
         "--latency-ms", str(latency_ms), "--tcp"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"latency proxy exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(url + "/", timeout=2).read()
            return proc, url
        except urllib.error.HTTPError:
            return proc, url  # the server answered through the pipe
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("latency proxy did not answer within 60 s")


# ------------------------------------------------------------------------------------------------ measurements
def rate(fn, images: int) -> float:
    """images/s of ``fn()``, which handles ``images`` images."""
    t0 = time.perf_counter()
    fn()
    return images / (time.perf_counter() - t0)


def cpu_per_get(fn, gets: int, others: dict) -> dict[str, float]:
    """ms of CPU per GET while ``fn()`` makes ``gets`` GETs: in this process (every thread: obstore's runtime too) and
    in each of ``others`` ({name: psutil.Process}: the S3 server, the latency pipe)."""

    def cpu(process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    before = {name: cpu(p) for name, p in others.items()}
    c0 = time.process_time()
    fn()
    out = {"client": (time.process_time() - c0) * 1e3 / gets}
    out.update({name: (cpu(p) - before[name]) * 1e3 / gets for name, p in others.items()})
    return out


def chunks(items: list, size: int):
    return [items[i : i + size] for i in range(0, len(items), size)]


def step_rate(cfg, num_classes: int, steps: int) -> float:
    """images/s of the demo's training step: forward, loss (+ group lasso), backward, SGD; one thread."""
    import torch

    from reid_core.losses import reid_loss
    from reid_core.models import build_model
    from reid_core.models.condense import group_lasso_loss, learned_group_convs
    from reid_core.train.loops import reid_model_kwargs

    h, w = cfg.data.image_size
    kwargs = reid_model_kwargs(cfg.model.name, num_classes=num_classes, feature_dim=cfg.model.feature_dim,
                               dropout_rate=cfg.model.dropout_rate, image_size=(h, w), face_size=cfg.model.face_size)  # fmt: skip
    model = build_model(cfg.model.name, **kwargs).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                nesterov=cfg.optim.nesterov, weight_decay=cfg.optim.weight_decay)  # fmt: skip
    batch = cfg.batch_size + (cfg.distractors.per_batch if cfg.distractors.uri else 0)
    images = torch.randn(batch, 3, h, w)
    labels = torch.randint(0, num_classes, (batch,))
    condenses = bool(learned_group_convs(model))

    def step(progress: float) -> None:
        if condenses:
            model.apply_condensation(progress)
        loss = reid_loss(model(images).float(), labels, mode=cfg.loss.mode)
        if condenses and cfg.loss.group_lasso:
            loss = loss + cfg.loss.group_lasso * group_lasso_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step(0.0)
    return rate(lambda: [step(0.0) for _ in range(steps)], steps * batch)


def loader_rate(records, cfg, settings, max_batches: int, epoch: int = 0) -> float:
    """images/s of the training loader at the demo's settings (P×K sampler, transforms, loader_workers; without
    workers the bytes of the next batches are read ahead in a thread, as in the training loops)."""
    from torch.utils.data import BatchSampler, DataLoader

    from reid_core.data import RandomIdentitySampler, ReIDDataset, build_transforms
    from reid_core.train.loops import loader_kwargs

    h, w = cfg.data.image_size
    dataset = ReIDDataset(records, build_transforms(h, w, train=True, flip_p=cfg.data.flip, pad=cfg.data.pad),
                          settings=settings, decode_size=(h, w))  # as train_reid_loop builds it  # fmt: skip
    sampler = RandomIdentitySampler(records, batch_size=cfg.batch_size, num_instances=cfg.optim.images_per_identity)
    sampler.set_epoch(epoch)
    batches = BatchSampler(sampler, cfg.batch_size, drop_last=False)
    if not cfg.data.loader_workers:
        batches = dataset.read_ahead(batches)  # as the training loops: the next batches read while one is decoded
    loader = DataLoader(dataset, batch_sampler=batches, **loader_kwargs(cfg.data.loader_workers, use_gpu=False))
    t0 = time.perf_counter()
    seen = 0
    for i, batch in enumerate(loader):
        seen += len(batch["pid"])
        if i + 1 >= max_batches:
            break
    return seen / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and steps (make bench)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added to every S3 request by the proxy")
    parser.add_argument("--ids", type=int, default=None, help="identities of the synthetic set (12 images each)")
    parser.add_argument("--shard-mb", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    parser.add_argument("--s3-server", choices=("seaweedfs", "moto"), default="seaweedfs",
                        help="the loopback S3 server (default seaweedfs; moto is what the tests use)")  # fmt: skip
    args = parser.parse_args()
    if not math.isfinite(args.latency_ms) or args.latency_ms < 0:
        print(f"error: --latency-ms {args.latency_ms} must be a finite number >= 0", file=sys.stderr)
        return 2

    import logging

    import psutil
    import torch

    from devstack.stack import Ports, Stack
    from reid_core import storage
    from reid_core.config import ReidJobConfig, load_config
    from reid_core.data import read_layout
    from reid_core.data.shards import pack_tree, read_record_bytes
    from reid_core.data.synthetic import SyntheticSpec, write_layout

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # a 1-CPU Ray Train worker: the loader and the step share one core
    ids = args.ids or (24 if args.quick else 100)
    sequential_n = 80 if args.quick else 300
    steps = 4 if args.quick else 12
    repeats = args.repeats
    if repeats < 1:
        print(f"error: --repeats {repeats} must be >= 1", file=sys.stderr)
        return 2
    cfg = load_config(ReidJobConfig, CONFIG)
    if ids - max(1, round(ids * 0.25)) < cfg.optim.identities_per_batch:
        print(f"error: --ids {ids} leaves fewer training identities than the demo's batch needs "
              f"({cfg.optim.identities_per_batch}); use --ids {2 * cfg.optim.identities_per_batch} or more", file=sys.stderr)  # fmt: skip
        return 2

    report = Report("bench/data_throughput.py", quick=args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(root=Path(tmp) / "stack", ports=Ports.free(), services=("s3",), bucket="bench-data",
                      s3_server=args.s3_server)  # fmt: skip
        stack.up()
        proxy = None
        try:
            for key, value in stack.env().items():
                os.environ[key] = value
            direct = storage.resolve_settings(stack.s3_endpoint)
            src, packed_url, local = "s3://bench-data/msmt17", "s3://bench-data/packed", os.path.join(tmp, "local")
            files: dict[str, bytes] = {}
            write_layout(SyntheticSpec(ids=ids, cameras=4, images_per_id=12, test_share=0.25, seed=0), "msmt17",
                         lambda rel, data: files.__setitem__(rel, data))  # fmt: skip
            storage.write_many({storage.join(src, rel): data for rel, data in files.items()}, direct)
            storage.write_many({os.path.join(local, rel): data for rel, data in files.items()})
            index = pack_tree(src, packed_url, shard_bytes=int(args.shard_mb * 2**20), settings=direct)
            plain, packed = read_layout(src, "msmt17"), read_layout(packed_url, "msmt17")
            images = plain.train + plain.val + plain.query + plain.gallery
            urls = [r.path for r in images]
            packed_all = sorted(packed.train + packed.val + packed.query + packed.gallery, key=lambda r: r.path)
            local_paths = [os.path.join(local, r.path[len(src) + 1 :]) for r in images]
            mb = sum(len(v) for k, v in files.items() if k.endswith(".jpg")) / 1e6
            print(f"{len(urls)} images ({mb:.1f} MB, mean {mb * 1e3 / len(urls):.1f} KB) in {src}; "
                  f"{len(index['shards'])} shards of ≤ {args.shard_mb} MB; S3 server: {args.s3_server}; "
                  f"latency pipe: {args.latency_ms} ms/request")  # fmt: skip

            proxy, proxy_url = start_proxy(stack.s3_endpoint, args.latency_ms)
            slow = storage.resolve_settings(proxy_url)
            others = {"server": psutil.Process(stack.processes["s3"].pid), "pipe": psutil.Process(proxy.pid)}
            s3fs, s3fs_paths = storage.s3_filesystem(slow), [u[len("s3://") :] for u in urls]
            cpu_rounds: list[dict[str, dict[str, float]]] = []  # per round: {client: {client/server/pipe: ms}}
            rounds: list[dict[str, dict[str, float]]] = []  # per round: {latency label: {source: images/s}}
            step_rounds: list[float] = []
            max_batches = 6 if args.quick else 20
            # Every source once per round, the training step in the same round. The table shows each source's median
            # over rounds; the ratios are medians of per-round ratios, so that a load change between two measurements
            # moves them as little as possible.
            for round_ in range(repeats):
                rounds.append({})
                for label, settings in (("no latency", direct), (f"+{args.latency_ms:g} ms", slow)):
                    storage.read_bytes(urls[0], settings)  # warm the connection pool
                    rounds[-1][label] = {
                        "sequential": rate(lambda s=settings: [storage.read_bytes(u, s) for u in urls[:sequential_n]],
                                           sequential_n),
                        "concurrent": rate(lambda s=settings: [storage.read_many(c, s, batch_size=64)
                                                               for c in chunks(urls, 256)], len(urls)),
                        "shards": rate(lambda s=settings: [read_record_bytes(c, s) for c in chunks(packed_all, 256)],
                                       len(packed_all)),
                        "local disk": rate(lambda: [storage.read_many(c) for c in chunks(local_paths, 256)], len(urls)),
                        "loader (plain)": loader_rate(plain.train, cfg, settings, max_batches, epoch=round_),
                        "loader (packed)": loader_rate(packed.train, cfg, settings, max_batches, epoch=round_),
                    }  # fmt: skip
                step_rounds.append(step_rate(cfg, plain.num_train_pids, steps))
                cpu_rounds.append({
                    "obstore": cpu_per_get(lambda: [storage.read_many(c, slow, batch_size=64) for c in chunks(urls, 256)],
                                           len(urls), others),
                    "s3fs": cpu_per_get(lambda: [s3fs.cat(c, batch_size=64) for c in chunks(s3fs_paths, 256)],
                                        len(urls), others),
                })  # fmt: skip
        finally:
            if proxy is not None:
                proxy.terminate()
                proxy.wait(timeout=30)
            stack.down(kill=True)  # its objects are this run's: no graceful stop needed (SeaweedFS's takes ~15 s)

    labels = list(rounds[0])
    sources = list(rounds[0][labels[0]])
    med = statistics.median
    print(f"\n{'images/s':<18}" + "".join(f"{label:>14}" for label in labels) + f"   (median of {repeats} rounds)")
    for source in sources:
        print(f"{source:<18}" + "".join(f"{med(r[label][source] for r in rounds):>14.0f}" for label in labels))
    model = f"{cfg.model.name}, {cfg.data.image_size[0]}×{cfg.data.image_size[1]}, batch {cfg.batch_size}, 1 thread"
    print(f"{'training step':<18}{med(step_rounds):>14.0f}   ({model})")

    def ratio(label: str, num: str, den: str | None) -> float:
        """Median over rounds of num / den (den None: the round's training step)."""
        return med(
            r[label][num] / (r[label][den] if den else step) for r, step in zip(rounds, step_rounds, strict=True)
        )

    slow_label = labels[1]
    print(f"\n{'CPU per GET, ms':<18}{'client':>10}{'server':>10}{'pipe':>10}   ({slow_label} per request, 64 in flight, "
          f"{args.s3_server}; median of {repeats} rounds)")  # fmt: skip
    for client in ("obstore", "s3fs"):
        print(f"{client:<18}" + "".join(f"{med(r[client][part] for r in cpu_rounds):>10.2f}"
                                        for part in ("client", "server", "pipe")))  # fmt: skip

    for source in ("sequential", "concurrent", "shards", "loader (plain)", "loader (packed)"):
        report.figure(f"{source} reads, {slow_label} per request", med(r[slow_label][source] for r in rounds),
                      "images/s")  # fmt: skip
    report.figure(f"training step ({model})", med(step_rounds), "images/s")
    for client, how in (("obstore", "storage.read_many"), ("s3fs", "s3fs cat")):
        report.figure(f"client CPU per GET, {client} ({how}), {slow_label} per request",
                      med(r[client]["client"] for r in cpu_rounds), "ms")  # fmt: skip
    report.figure(f"{args.s3_server} server CPU per GET (obstore's GETs)", med(r["obstore"]["server"] for r in cpu_rounds),
                  "ms")  # fmt: skip
    report.figure("latency pipe CPU per GET (obstore's GETs)", med(r["obstore"]["pipe"] for r in cpu_rounds), "ms")
    checks = [
        ("concurrent per-object GETs (64 in flight) / sequential reads", "concurrent", "sequential", 4.0),
        ("packed shards (merged ranged reads) / sequential reads", "shards", "sequential", 5.0),
        ("training loader, plain per-object / training step", "loader (plain)", None, 2.0),
        ("training loader, packed shards / training step", "loader (packed)", None, 2.0),
    ]
    for name, num, den, target in checks:
        report.figure(f"{name}, {slow_label} per request", ratio(slow_label, num, den), "x", target=(">=", target))
        report.figure(f"{name}, no added latency", ratio(labels[0], num, den), "x")
    report.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
