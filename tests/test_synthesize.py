"""jobs/synthesize.py and its workflow (reid_core/workflows/distractors.py): the distractor set (index ranges,
per-image noise, uint8 mapping, standing batch-norm statistics, writing and face detection), the job's one-line
preflight errors, and end to end against real S3, MLflow and Ray."""

from __future__ import annotations

import copy
import csv
import io
import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from reid_core import storage
from reid_core.guidance.faces import FaceDetector
from reid_core.models import build_model
from reid_core.workflows import distractors as workflow
from tests import job_runner

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ pure functions
@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), batch=st.integers(1, 64), batches_per_chunk=st.integers(1, 20))
def test_index_ranges_cover_every_index_once_on_batch_boundaries(n, batch, batches_per_chunk):
    chunk = batch * batches_per_chunk
    ranges = workflow.index_ranges(n, chunk)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a < b for a, b in ranges)
    assert all(prev[1] == nxt[0] for prev, nxt in zip(ranges, ranges[1:], strict=False))  # contiguous
    # Batches cut inside the chunks are the batches of one pass over 0..n-1: identical whatever the chunking.
    inside = [bb for a, b in ranges for bb in workflow.batch_ranges(a, b, batch)]
    assert inside == workflow.batch_ranges(0, n, batch)
    assert all(a % batch == 0 and b - a <= batch for a, b in inside)


def test_batch_ranges_cut_at_global_multiples():
    assert workflow.batch_ranges(5, 23, 8) == [(5, 8), (8, 16), (16, 23)]
    assert workflow.batch_ranges(8, 16, 8) == [(8, 16)]
    assert workflow.batch_ranges(3, 3, 8) == []
    with pytest.raises(ValueError, match="batch_size ≥ 1"):
        workflow.batch_ranges(0, 4, 0)
    with pytest.raises(ValueError, match="≥ 1"):
        workflow.index_ranges(0, 8)


def test_image_noise_depends_only_on_seed_and_index():
    whole = workflow.image_noise(7, range(10), 16)
    parts = torch.cat([workflow.image_noise(7, range(0, 3), 16), workflow.image_noise(7, range(3, 10), 16)])
    assert whole.shape == (10, 16) and whole.dtype == torch.float32
    assert torch.equal(whole, parts)
    assert torch.equal(workflow.image_noise(7, [9, 2], 16), whole[[9, 2]])  # order and neighbours do not matter
    assert not torch.equal(workflow.image_noise(8, range(10), 16), whole)  # another seed, other images
    assert len({tuple(row.tolist()) for row in whole}) == 10  # every index its own noise
    # the formula written in the set's metadata reproduces the noise
    rng = np.random.default_rng(np.random.SeedSequence(7, spawn_key=(0, 4)))
    assert np.array_equal(rng.standard_normal(16, dtype=np.float32), whole[4].numpy())
    big = workflow.image_noise(0, range(2000), 100)
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1) < 0.01  # N(0, 1)


def test_tanh_to_uint8_maps_the_whole_range_evenly():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = workflow.tanh_to_uint8(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 1, 7, 3)  # channels last
    assert out[0, 0, :, 0].tolist() == [0, 0, 0, 128, 191, 255, 255]
    fine = torch.linspace(-1, 1, 100_001).view(1, 1, 1, -1)
    counts = torch.bincount(workflow.tanh_to_uint8(fine).flatten().long(), minlength=256)
    assert counts.min() > 0  # every grey level used
    assert counts[1:255].max() - counts[1:255].min() <= 2  # inner bins equally wide (the end bins are half bins)
    with pytest.raises(ValueError, match="expects"):
        workflow.tanh_to_uint8(torch.zeros(3, 4, 4))


def test_standing_statistics_make_images_independent_of_their_batch():
    torch.manual_seed(0)
    gen = build_model("dcgan_generator", z_dim=16, width=8, image_size=(64, 32))
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    standing = workflow.with_standing_batch_norm(gen, seed=3, z_dim=16, samples=256, batch_size=64)
    assert all(torch.equal(v, gen.state_dict()[k]) for k, v in before.items())  # the original is untouched
    assert not standing.training
    norms = [m for m in standing.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.num_batches_tracked == 4 for m in norms)
    assert all(m.momentum == 0.1 for m in norms)
    assert not torch.allclose(norms[0].running_var, torch.ones_like(norms[0].running_var))
    again = workflow.with_standing_batch_norm(gen, seed=3, z_dim=16, samples=256, batch_size=64)
    a, b = standing.state_dict(), again.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)  # deterministic
    z = workflow.image_noise(0, range(64), 16)
    with torch.no_grad():
        alone, together = standing(z[:3]), standing(z)[:3]
        train_mode = copy.deepcopy(gen).train()(z)  # batch statistics, as in training
        registered = copy.deepcopy(gen).eval()(z)  # the untouched running statistics
        standing_images = standing(z)
    assert torch.allclose(alone, together, atol=1e-6)  # an image does not depend on its batch

    def error(x):
        return float((x - train_mode).abs().mean() / train_mode.abs().mean())

    # standing statistics reproduce train-mode images (here within 7 %); stale running statistics do not (here 100 %)
    assert error(standing_images) < 0.15 and error(registered) > 3 * error(standing_images)


def test_an_exported_generator_is_rebuilt_as_the_same_eager_generator():
    """MLflow 3 registers PyTorch models as torch.export programs: no attributes, no train mode."""
    torch.manual_seed(2)
    gen = build_model("dcgan_generator", z_dim=16, width=8, image_size=(64, 32)).eval()
    exported = torch.export.export(gen, (torch.randn(4, 16),)).module()
    with pytest.raises(NotImplementedError):
        exported.train()
    rebuilt = workflow.as_dcgan_generator(exported)
    assert type(rebuilt) is type(gen) and not rebuilt.training
    assert (rebuilt.z_dim, rebuilt.image_size) == (16, (64, 32))
    z = workflow.image_noise(0, range(4), 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(z), gen(z))
    assert workflow.as_dcgan_generator(nn.Sequential(nn.Linear(16, 3))) is None  # not a DC-GAN generator


def test_image_paths_sort_in_index_order():
    assert workflow.image_path(42, 100, "jpeg") == "images/000042.jpg"
    assert workflow.image_path(7, 12_345_678, "png") == "images/00000007.png"
    paths = [workflow.image_path(i, 1_000_001, "jpeg") for i in (9, 10, 999_999, 1_000_000)]
    assert paths == sorted(paths)


# ------------------------------------------------------------------------------------- writing a range, with faces
class FaceOrNot(nn.Module):
    """A stand-in generator: 128×64 person images, with the astronaut's face when z[0] > 0, faceless otherwise."""

    def __init__(self):
        super().__init__()
        self.z_dim = 8
        self.scale = nn.Parameter(torch.ones(()))
        head = skimage.data.astronaut()[40:210, 140:310]
        images = []
        for with_face in (False, True):
            img = np.empty((128, 64, 3), np.uint8)
            img[:] = np.linspace(150, 90, 128, dtype=np.uint8)[:, None, None]
            img[44:84, 13:51] = (40, 60, 150)
            img[84:, 18:46] = (35, 35, 40)
            face = np.asarray(Image.fromarray(head).resize((40, 40), Image.LANCZOS)) if with_face else (200, 160, 130)
            img[4:44, 12:52] = face  # a head of 40 px, its face (eyebrows to chin) about 21 px: found
            images.append(torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1)
        self.register_buffer("images", torch.stack(images))

    def forward(self, z):
        return self.images[(z[:, 0] > 0).long()] * self.scale


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "manifest.csv") as f:
        return list(csv.DictReader(f))


def test_synthesize_range_writes_images_and_face_flags(tmp_path):
    gen = FaceOrNot()
    params = dict(num_images=20, seed=5, z_dim=8, batch_size=8, image_format="jpeg")
    with FaceDetector.for_person_crops(workers=0) as detector:
        rows = workflow.synthesize_range(gen, start=0, stop=20, out=str(tmp_path), detector=detector, **params)
    z = workflow.image_noise(5, range(20), 8)
    assert [r[1] for r in rows] == list(range(20)) and {r[2] for r in rows} == {5}
    assert [r[3] for r in rows] == [0 if z[i, 0] > 0 else 1 for i in range(20)]  # Δ = 1 exactly where no face
    assert 0 < sum(r[3] for r in rows) < 20
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jpg"))
    assert files == [r[0] for r in rows]
    with Image.open(tmp_path / rows[0][0]) as im:
        assert im.format == "JPEG" and im.size == (64, 128) and im.mode == "RGB"
        stored = np.asarray(im).astype(int)
    expected = workflow.tanh_to_uint8(gen(z[:1]))[0].numpy().astype(int)
    assert np.abs(stored - expected).mean() < 3  # quality-95 JPEG of the mapped pixels


def test_same_images_whatever_the_chunking(tmp_path):
    torch.manual_seed(1)
    gen = workflow.with_standing_batch_norm(
        build_model("dcgan_generator", z_dim=16, width=8, image_size=(64, 32)), seed=0, z_dim=16, samples=128
    )
    params = dict(num_images=24, seed=11, z_dim=16, batch_size=4, image_format="png")
    with FaceDetector.for_person_crops(workers=0) as detector:
        one = workflow.synthesize_range(gen, start=0, stop=24, out=str(tmp_path / "one"), detector=detector, **params)
        three = [
            row
            for a, b in workflow.index_ranges(24, 8)
            for row in workflow.synthesize_range(
                gen, start=a, stop=b, out=str(tmp_path / "three"), detector=detector, **params
            )  # fmt: skip
        ]
    assert one == three
    for _, index, _, _ in one:
        name = workflow.image_path(index, 24, "png")
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes()
    with Image.open(tmp_path / "one" / one[3][0]) as im:  # PNG is lossless: exactly the mapped generator output
        stored = np.asarray(im)
    with torch.no_grad():
        expected = workflow.tanh_to_uint8(gen(workflow.image_noise(11, [3], 16)))[0].numpy()
    assert np.array_equal(stored, expected)


def test_overwrite_only_replaces_a_distractor_set(tmp_path):
    settings_ = storage.resolve_settings()
    assert workflow.check_output(str(tmp_path / "new"), False, settings_) == []
    (tmp_path / "set" / "images").mkdir(parents=True)
    (tmp_path / "set" / "images" / "000000.jpg").write_bytes(b"x")
    (tmp_path / "set" / "manifest.csv").write_text("path\n")
    with pytest.raises(storage.StorageError, match="not empty .*--overwrite"):
        workflow.check_output(str(tmp_path / "set"), False, settings_)
    assert len(workflow.check_output(str(tmp_path / "set"), True, settings_)) == 2
    (tmp_path / "set" / "notes.txt").write_text("mine")
    with pytest.raises(storage.StorageError, match="refusing to overwrite .* not part of a distractor set"):
        workflow.check_output(str(tmp_path / "set"), True, settings_)
    (tmp_path / "set" / "notes.txt").unlink()
    # Below images/ too, only the names this job writes are its own (a prefix is no proof of authorship).
    for foreign in ("images/notes.txt", "images/000001.jpg.bak", "images/1.jpg", "images/sub/000002.jpg"):
        (tmp_path / "set" / foreign).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "set" / foreign).write_text("mine")
        with pytest.raises(storage.StorageError, match=f"not part of a distractor set .*{foreign}"):
            workflow.check_output(str(tmp_path / "set"), True, settings_)
        (tmp_path / "set" / foreign).unlink()
    assert len(workflow.check_output(str(tmp_path / "set"), True, settings_)) == 2


# ------------------------------------------------------------------------------------ the job's one-line errors
def run_job(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs/synthesize.py"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=job_runner.job_env(env),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env", "expected", "own_process"),
    [
        (["--model", "reid-gen@candidate"], {}, "error: model URI 'reid-gen@candidate' is not a registry URI", True),
        (["--model", "models:/g@a", "--batch-size", "64", "--chunk-size", "100"], {}, "multiple of --batch-size",
         False),
        (["--model", "models:/g@a"], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
         "error: MLflow tracking server http://127.0.0.1:9 is unreachable", False),
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_line_before_any_work(tmp_path, args, env, expected, own_process):
    """One refusal in the job's own process (nothing else reaches stderr), the others in this one (job_runner)."""
    full = [*args, "--out", str(tmp_path / "set")]
    proc = run_job(full, env, timeout=120) if own_process else job_runner.here("synthesize.py", full, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # exactly one line
    assert expected in proc.stderr
    assert not (tmp_path / "set").exists()


# ---------------------------------------------------------------------------------------- end to end (slow)
@pytest.fixture(scope="module")
def registered_generator(services_stack):
    """A tiny DC-GAN generator registered in the stack's MLflow as ``tiny-gen-<tag>@candidate`` (version 1)."""
    from reid_core import tracking

    uri = services_stack.mlflow_uri
    torch.manual_seed(0)
    gen = build_model("dcgan_generator", z_dim=16, width=8, image_size=(64, 32)).eval()
    name = f"tiny-gen-{uuid.uuid4().hex[:6]}"
    run_id = tracking.start_run(uri, "synthesize-test", "register-tiny-generator", {"z_dim": 16})
    version = tracking.log_and_register_pytorch_model(
        uri, run_id, gen, name="generator", registered_model=name, input_example=torch.randn(2, 16).numpy()
    )
    tracking.set_terminated(uri, run_id)
    return {"name": name, "version": version, "run_id": run_id}


@pytest.mark.slow
def test_job_writes_the_distractor_set_on_ray_and_logs_it(services_stack, s3_server, registered_generator, monkeypatch):
    from mlflow.tracking import MlflowClient

    env = services_stack.full_env
    name = registered_generator["name"]
    out = f"s3://{s3_server.bucket}/distractors-{uuid.uuid4().hex[:6]}"
    n = 40
    proc = run_job(
        ["--model", f"models:/{name}@candidate", "--num-images", str(n), "--out", out, "--batch-size", "8",
         "--chunk-size", "16", "--workers", "2", "--seed", "3", "--experiment", "distractors-test"],
        env,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "=== synthesize summary ===" in proc.stdout
    assert "Ray, 2 workers" in proc.stdout  # 3 chunks: the Ray path, not in-process

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    s3 = storage.resolve_settings(env["AWS_ENDPOINT_URL"])
    files = storage.list_files(out, s3)
    images = [f for f in files if f.startswith(f"{out}/images/")]
    assert len(files) == n + 2 and len(images) == n
    meta = json.loads(storage.read_bytes(f"{out}/distractors.json", s3))
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(f"{out}/manifest.csv", s3).decode())))
    assert list(rows[0]) == ["path", "index", "seed", "face_absent"]
    assert [int(r["index"]) for r in rows] == list(range(n))
    assert [f"{out}/{r['path']}" for r in rows] == images  # every image listed, nothing else
    assert {r["seed"] for r in rows} == {"3"} and {r["face_absent"] for r in rows} <= {"0", "1"}
    faces = sum(r["face_absent"] == "0" for r in rows)
    assert meta["format"] == "reid-distractors/1" and meta["num_images"] == n and meta["image_size"] == [64, 32]
    assert meta["image_format"] == "jpeg" and meta["seed"] == 3 and meta["z_dim"] == 16
    assert meta["batch_norm"] == "standing" and meta["face_detector"]["scale"] == 3.3  # the person-crop setting
    assert meta["faces"] == faces and meta["face_rate"] == pytest.approx(faces / n)
    assert meta["generator"]["name"] == name and meta["generator"]["version"] == registered_generator["version"]
    assert meta["generator"]["run_id"] == registered_generator["run_id"]
    for url, data in storage.read_many(images[::13], s3).items():
        with Image.open(io.BytesIO(data)) as im:
            assert (im.format, im.size, im.mode) == ("JPEG", (32, 64), "RGB"), url

    # Same images as an in-process computation: standing statistics + noise of (seed, index).
    torch.manual_seed(0)
    gen = build_model("dcgan_generator", z_dim=16, width=8, image_size=(64, 32))
    standing = workflow.with_standing_batch_norm(gen, seed=3, z_dim=16)
    with torch.no_grad():
        expected = workflow.tanh_to_uint8(standing(workflow.image_noise(3, [39], 16)))[0].numpy()
    assert storage.read_bytes(images[39], s3) == workflow.encode_image(expected, "jpeg")  # byte for byte

    client = MlflowClient(tracking_uri=services_stack.mlflow_uri, registry_uri=services_stack.mlflow_uri)
    run_id = meta["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model_uri"] == f"models:/{name}@candidate" and run.data.params["num_images"] == str(n)
    assert run.data.params["model_version"] == registered_generator["version"] and run.data.params["seed"] == "3"
    assert run.data.metrics["face_rate"] == pytest.approx(faces / n) and run.data.metrics["num_images"] == n
    assert run.data.tags["input_model.uri"] == f"models:/{name}/{registered_generator['version']}"
    assert run.data.tags["input_model.run_id"] == registered_generator["run_id"]
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "samples")
    }
    assert {"distractors.json", "samples/distractors.png"} <= artifacts
    grid = Image.open(client.download_artifacts(run_id, "samples/distractors.png"))
    assert grid.size == (16 * 34 + 2, 3 * 66 + 2)  # 40 images of 32×64, 16 per row, 2 px padding
    version = client.get_model_version(name, registered_generator["version"])
    assert version.tags["distractors.uri"] == out and version.tags["distractors.run_id"] == run_id

    # A second run into the same place needs --overwrite.
    again = run_job(["--model", f"models:/{name}/1", "--num-images", "4", "--out", out], env)
    assert again.returncode == 2 and "is not empty" in again.stderr and "--overwrite" in again.stderr


@pytest.mark.slow
def test_missing_alias_fails_in_one_line_naming_the_aliases(services_stack, s3_server, registered_generator):
    name = registered_generator["name"]
    out = f"s3://{s3_server.bucket}/never-{uuid.uuid4().hex[:6]}"
    proc = run_job(["--model", f"models:/{name}@champion", "--num-images", "8", "--out", out], services_stack.full_env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0] == (
        f"error: registered model {name!r} has no alias 'champion' (its aliases: @candidate -> v1) in the MLflow "
        f"registry at {services_stack.mlflow_uri}"
    )
    missing = job_runner.here(
        "synthesize.py", ["--model", "models:/no-such-gen/1", "--out", out], env=services_stack.full_env
    )  # in this process: the same preflight, no job start
    assert missing.returncode == 2 and "registered model 'no-such-gen' does not exist" in missing.stderr
    assert name in missing.stderr  # lists the registered models
