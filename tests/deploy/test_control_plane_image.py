"""containers/control-plane.Dockerfile without a Docker engine.

No image is built here (no engine): the Dockerfile is checked as text (pinned bases, non-root
user, entrypoint, health check, exposed ports, the torch CPU pin), and the health-check script
it embeds (`fedhpc-healthcheck`, a heredoc) is extracted and run against real gRPC servers:
plain, TLS with a server name other than the address, and mTLS, SERVING and NOT_SERVING.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from fedhpc.api.v1 import registry_pb2_grpc
from fedhpc.common.config import ServerConfig
from fedhpc.common.grpc_server import GrpcServer, ServiceBinding

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "containers" / "control-plane.Dockerfile"
SCRIPT_PATH = "/usr/local/bin/fedhpc-healthcheck"
SERVER_NAME = "demo-fedhpc-registry.fl.svc"


def _text(path: Path = DOCKERFILE) -> str:
    return path.read_text()


def _instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and heredoc bodies dropped."""
    out: list[tuple[str, str]] = []
    lines = iter(_text(path).splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        heredoc = re.search(r"<<-?['\"]?(\w+)['\"]?", rest)
        if heredoc:
            for body in lines:
                if body == heredoc.group(1):
                    break
    return out


def _args(path: Path = DOCKERFILE) -> dict[str, str]:
    """ARG defaults, with ${OTHER} references to earlier ARGs resolved."""
    args: dict[str, str] = {}
    for word, rest in _instructions(path):
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], value)
    return args


def _embedded_script() -> str:
    match = re.search(
        rf"^COPY [^\n]*<<'EOF' {re.escape(SCRIPT_PATH)}\n(.*?)^EOF$", _text(), re.MULTILINE | re.DOTALL
    )
    assert match, f"{DOCKERFILE.name} has no COPY <<'EOF' {SCRIPT_PATH} heredoc"
    return match.group(1)


# -- the Dockerfile ----------------------------------------------------------------------------
def test_base_images_are_pinned_and_multi_stage() -> None:
    args = _args()
    froms = [rest for word, rest in _instructions() if word == "FROM"]
    assert len(froms) >= 2, "expected a multi-stage build (build stage + runtime stage)"
    for line in froms:
        image = line.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"FROM {image}: pin a tag"
        assert name == "python" and re.fullmatch(r"3\.11\.\d+-slim(-\w+)?", tag), (
            f"FROM {image}: expected python:3.11.<patch>-slim[-<debian>]"
        )


def test_python_matches_the_trainer_image() -> None:
    # Globus Compute: the coordinator and the trainers must run one Python minor version.
    trainer = ROOT / "containers" / "trainer.Dockerfile"
    assert trainer.exists(), f"{trainer} is missing (containers/ ships both images)"
    ours, theirs = _args()["PYTHON_VERSION"], _args(trainer).get("PYTHON_VERSION")
    assert theirs is not None, f"{trainer.name} has no ARG PYTHON_VERSION=..."
    assert ours.rsplit(".", 1)[0] == theirs.rsplit(".", 1)[0], (ours, theirs)


def test_torch_cpu_wheel_is_pinned() -> None:
    args = _args()
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    runs = " ".join(rest for word, rest in _instructions() if word == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in runs
    assert 'pip install ".[hpc]"' in runs, "the control plane needs the HPC dispatchers (fedhpc[hpc])"


def test_runtime_user_entrypoint_healthcheck_ports() -> None:
    instructions = _instructions()
    runtime = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM") :]
    by_word: dict[str, list[str]] = {}
    for word, rest in runtime:
        by_word.setdefault(word, []).append(rest)
    assert by_word["USER"] == ["10001:10001"]
    assert by_word["ENTRYPOINT"] == ['["fedhpc"]']
    assert by_word["WORKDIR"][-1] == "/data"
    (healthcheck,) = by_word["HEALTHCHECK"]
    assert healthcheck.endswith('CMD ["fedhpc-healthcheck"]')
    exposed = {int(p) for rest in by_word["EXPOSE"] for p in rest.split()}
    assert exposed == {50051, 50052, 50053, 9101, 9102, 9103}
    labels = " ".join(by_word["LABEL"])
    for key in ("org.opencontainers.image.title", "org.opencontainers.image.version"):
        assert key in labels
    # The image must not carry fedhpc configuration: it would override a config file.
    env = " ".join(by_word["ENV"])
    assert not re.search(r"\bFEDHPC_\w+__", env)
    for writable in ("MPLCONFIGDIR=/tmp/", "XDG_CACHE_HOME=/tmp/", "TMPDIR=/tmp"):
        assert writable in env, f"{writable}: caches must go to /tmp under a read-only root"


def test_build_context_files_exist_and_are_not_ignored() -> None:
    ignore = ROOT / ".dockerignore"
    patterns = [
        line.strip() for line in (ignore.read_text().splitlines() if ignore.exists() else []) if line.strip()
    ]
    patterns = [p for p in patterns if not p.startswith("#")]
    for word, rest in _instructions():
        if word == "COPY" and "--from" not in rest and "<<" not in rest:
            for source in shlex.split(rest)[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the build context"
                hits = [p for p in patterns if not p.startswith("!") and fnmatch.fnmatch(source, p)]
                assert not hits, f"COPY {source}: excluded from the build context by .dockerignore {hits}"


def test_base_name_label_is_the_base_image() -> None:
    label = re.search(r'org\.opencontainers\.image\.base\.name="([^"]+)"', _text())
    assert label and label.group(1) == _args()["PYTHON_IMAGE"]


# -- the embedded health check -----------------------------------------------------------------
@pytest.fixture(scope="module")
def healthcheck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image") / "fedhpc-healthcheck"
    script = _embedded_script()
    assert script.startswith("#!/opt/venv/bin/python\n")
    path.write_text(script)
    return path


@pytest.fixture(scope="module")
def healthcheck_module(healthcheck: Path) -> ModuleType:
    spec = importlib.util.spec_from_loader("fedhpc_healthcheck", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    exec(compile(healthcheck.read_text(), str(healthcheck), "exec"), module.__dict__)
    return module


def _probe(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FEDHPC_")}
    return subprocess.run(
        [sys.executable, str(script), *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _server(**fields: object) -> GrpcServer:
    binding = ServiceBinding(
        "fedhpc.v1.Registry",
        registry_pb2_grpc.add_RegistryServicer_to_server,
        registry_pb2_grpc.RegistryServicer(),
    )
    config = ServerConfig.model_validate({"host": "127.0.0.1", "port": 0, **fields})
    return GrpcServer(config, [binding], component="registry-under-probe")


def test_parses_pid1_command_lines(healthcheck_module: ModuleType, tmp_path: Path) -> None:
    cases = {
        # docker-compose `init: true`: docker-init is PID 1.
        "/sbin/docker-init\0--\0fedhpc\0coordinator\0serve\0": ("coordinator", None),
        "/opt/venv/bin/python\0/opt/venv/bin/fedhpc\0registry\0serve\0--config\0/c.yaml\0": (
            "registry",
            "/c.yaml",
        ),
        "fedhpc\0aggregator\0serve\0--config=/a.yaml\0": ("aggregator", "/a.yaml"),
        "fedhpc\0sites\0add\0site-1\0": (None, None),
        "/pause\0": (None, None),
    }
    for cmdline, expected in cases.items():
        path = tmp_path / "cmdline"
        path.write_bytes(cmdline.encode())
        assert healthcheck_module.from_pid1(str(path)) == expected, cmdline
    assert healthcheck_module.from_pid1(str(tmp_path / "absent")) == (None, None)


def test_plain_serving_then_not_serving(healthcheck: Path) -> None:
    server = _server()
    server.start()
    try:
        env = {"FEDHPC_REGISTRY__SERVER__PORT": str(server.port)}
        ok = _probe(healthcheck, "registry", env=env)
        assert ok.returncode == 0, ok.stderr
        assert "fedhpc.v1.Registry SERVING" in ok.stdout
        server.set_serving("fedhpc.v1.Registry", False)
        down = _probe(healthcheck, "registry", env=env)
        assert down.returncode == 1
    finally:
        server.stop(0)
    gone = _probe(healthcheck, "registry", env=env)
    assert gone.returncode == 1
    assert "UNAVAILABLE" in gone.stderr


def test_no_service_and_pid1_not_fedhpc_is_healthy(healthcheck: Path) -> None:
    # PID 1 of the machine running the tests serves no fedhpc service (a one-shot job's case).
    result = _probe(healthcheck)
    assert result.returncode == 0, result.stderr
    assert "nothing to probe" in result.stdout


def test_bad_configuration_is_reported(healthcheck: Path) -> None:
    result = _probe(healthcheck, "registry", env={"FEDHPC_REGISTRY__SERVER__PORT": "not-a-port"})
    assert result.returncode == 1
    assert "registry.server.port" in result.stderr


# -- TLS: what the Helm chart's exec probes do ---------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a server certificate naming only the in-cluster Service name (not 127.0.0.1),
    usable for server and client authentication, as the chart's docs ask for."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make test certificates", pytrace=False)
    cwd = tmp_path_factory.mktemp("pki")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=fedhpc-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=cwd,
    )  # fmt: skip
    (cwd / "tls.ext").write_text(
        f"subjectAltName=DNS:{SERVER_NAME}\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "tls.key", "-out", "tls.csr", "-subj", f"/CN={SERVER_NAME}",
        cwd=cwd,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-set_serial",
        str(uuid.uuid4().int >> 64), "-days", "1", "-out", "tls.crt", "-extfile", "tls.ext",
        cwd=cwd,
    )  # fmt: skip
    return cwd


@pytest.fixture(params=["tls", "mtls"])
def tls_server(
    request: pytest.FixtureRequest, pki: Path, tmp_path: Path
) -> Iterator[tuple[GrpcServer, Path]]:
    tls = {"cert_file": str(pki / "tls.crt"), "key_file": str(pki / "tls.key")}
    if request.param == "mtls":
        tls["client_ca_file"] = str(pki / "ca.crt")
    server = _server(tls=tls)
    server.start()
    # The probe reads TLS from the same file the server would (FEDHPC_CONFIG, as in the chart).
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"registry": {"server": {"port": server.port, "tls": tls}}}))
    try:
        yield server, config
    finally:
        server.stop(0)


def test_tls_probe_as_the_chart_runs_it(
    healthcheck: Path, pki: Path, tls_server: tuple[GrpcServer, Path]
) -> None:
    _, config = tls_server
    env = {"FEDHPC_CONFIG": str(config)}
    chart_args = ("registry", f"--tls-ca={pki / 'ca.crt'}", f"--server-name={SERVER_NAME}")
    ok = _probe(healthcheck, *chart_args, env=env)
    assert ok.returncode == 0, ok.stderr
    # The certificate does not name 127.0.0.1: without --server-name the check must fail.
    wrong_name = _probe(healthcheck, "registry", f"--tls-ca={pki / 'ca.crt'}", env=env)
    assert wrong_name.returncode == 1
