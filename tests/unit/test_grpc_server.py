"""GrpcServer end to end on 127.0.0.1: health, reflection, metrics, auth, TLS, shutdown."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from fedhpc.api.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from fedhpc.common.auth import Role, principal_from_context
from fedhpc.common.config import ServerConfig
from fedhpc.common.grpc_client import make_channel, wait_for_ready
from fedhpc.common.grpc_server import GrpcServer, ServiceBinding
from fedhpc.common.metrics import GRPC_HANDLED, GRPC_SECONDS, start_metrics_server, stop_metrics_servers

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = "fedhpc.v1.Registry"
ADMIN_TOKEN = "admin-token-1"
SITE_TOKEN = "site-token-polaris"
SITE_METHODS = ("GetModel", "Download", "Upload")  # ListAliases stays admin-only (the default)
METHOD_ROLES = {f"/{REGISTRY}/{m}": Role.SITE for m in SITE_METHODS} | {"/test.Echo/Chat": Role.SITE}


class FakeRegistry(registry_pb2_grpc.RegistryServicer):
    """One handler per RPC kind; each reports the caller it saw."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def GetModel(
        self, request: registry_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> registry_pb2.Model:
        principal = principal_from_context(context)
        if request.name == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no model named 'missing'")
        if request.name == "boom":
            raise RuntimeError("handler bug")
        if request.name == "slow":
            self.entered.set()
            self.release.wait(5)
        return registry_pb2.Model(
            name=request.name, labels={"role": principal.role.name, "site": principal.site or ""}
        )

    def ListAliases(
        self, request: registry_pb2.ListAliasesRequest, context: grpc.ServicerContext
    ) -> registry_pb2.ListAliasesResponse:
        return registry_pb2.ListAliasesResponse(
            aliases=[registry_pb2.Alias(model=request.model, name="latest", version="v1")]
        )

    def Download(
        self, request: registry_pb2.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[registry_pb2.DownloadChunk]:
        producer = principal_from_context(context).site or "admin"
        yield registry_pb2.DownloadChunk(
            manifest=common_pb2.Manifest(model=request.ref.model, producer=producer), data=b"ab"
        )
        if request.ref.model == "endless":
            while context.is_active():
                time.sleep(0.01)
                yield registry_pb2.DownloadChunk(data=b".")
        if request.ref.model == "broken":
            raise OSError("disk gone mid-stream")
        yield registry_pb2.DownloadChunk(data=b"cd")
        yield registry_pb2.DownloadChunk(data=b"e")

    def Upload(
        self, request_iterator: Iterator[registry_pb2.UploadChunk], context: grpc.ServicerContext
    ) -> registry_pb2.UploadResponse:
        upload_id, size = "", 0
        for chunk in request_iterator:
            if chunk.HasField("header"):
                upload_id = chunk.header.upload_id
            else:
                size += len(chunk.data)
        site = principal_from_context(context).site or "admin"
        return registry_pb2.UploadResponse(upload_id=upload_id, size_bytes=size, object_key=f"updates/{site}")


def _echo_binding() -> ServiceBinding:
    """A stream-stream method (Registry has none) on raw bytes."""

    def chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        who = (principal_from_context(context).site or "admin").encode()
        for request in requests:
            yield who + b":" + request

    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Chat": grpc.stream_stream_rpc_method_handler(chat)}
    )

    def add(servicer: Any, server: grpc.Server) -> None:
        server.add_generic_rpc_handlers((handler,))

    return ServiceBinding("test.Echo", add, None)


def _registry_binding(servicer: FakeRegistry | None = None) -> ServiceBinding:
    return ServiceBinding(
        REGISTRY, registry_pb2_grpc.add_RegistryServicer_to_server, servicer or FakeRegistry()
    )


def _config(**fields: Any) -> ServerConfig:
    return ServerConfig.model_validate({"host": "127.0.0.1", "port": 0, "grace_seconds": 2, **fields})


AUTH = {
    "enabled": True,
    "admin_tokens": [ADMIN_TOKEN],
    "site_tokens": [{"token": SITE_TOKEN, "site": "polaris", "experiment": "exp-1"}],
}


class Served:
    def __init__(self, server: GrpcServer, servicer: FakeRegistry, component: str) -> None:
        self.server, self.servicer, self.component = server, servicer, component
        self.channels: dict[str | None, grpc.Channel] = {}

    def channel(self, token: str | None = None) -> grpc.Channel:
        if token not in self.channels:
            self.channels[token] = make_channel(self.server.address, token=token)
        return self.channels[token]

    def registry(self, token: str | None = None) -> registry_pb2_grpc.RegistryStub:
        return registry_pb2_grpc.RegistryStub(self.channel(token))

    def handled(self, method: str, code: str, service: str = REGISTRY) -> float:
        labels = {"component": self.component, "service": service, "method": method, "code": code}
        return _sample("fedhpc_grpc_server_handled_total", labels)

    def observed(self, method: str, service: str = REGISTRY) -> float:
        labels = {"component": self.component, "service": service, "method": method}
        return _sample("fedhpc_grpc_server_handling_seconds_count", labels)


def _sample(name: str, labels: dict[str, str]) -> float:
    from prometheus_client import REGISTRY as PROM

    return PROM.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    component = f"test-{uuid.uuid4().hex[:8]}"  # own label values: other tests share the registry
    servicer = FakeRegistry()
    server = GrpcServer(
        _config(metrics_port=0, auth=AUTH),
        [_registry_binding(servicer), _echo_binding()],
        component=component,
        method_roles=METHOD_ROLES,
    )
    server.start()
    s = Served(server, servicer, component)
    yield s
    for channel in s.channels.values():
        channel.close()
    server.stop(0)


def _wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def _code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


# -- health and reflection ----------------------------------------------------------------------
def test_health_serving_without_token(served: Served) -> None:
    health = health_pb2_grpc.HealthStub(served.channel())
    for service in (REGISTRY, "", "test.Echo"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    # A stale token does not break probes.
    stale = health_pb2_grpc.HealthStub(served.channel("stale-token"))
    assert stale.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == 1
    code = _code_of(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope.Svc"), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services_without_token(served: Served) -> None:
    services = ProtoReflectionDescriptorDatabase(served.channel()).get_services()
    assert {REGISTRY, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(services)
    descriptor = ProtoReflectionDescriptorDatabase(served.channel()).FindFileContainingSymbol(REGISTRY)
    assert descriptor.name == "fedhpc/v1/registry.proto"


# -- auth through the full stack ---------------------------------------------------------------
def test_no_or_wrong_token_is_unauthenticated(served: Served) -> None:
    request = registry_pb2.GetModelRequest(name="m")
    for token in (None, "wrong"):
        with pytest.raises(grpc.RpcError) as err:
            served.registry(token).GetModel(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "token" in (err.value.details() or "")


def test_site_token_on_admin_method_is_permission_denied(served: Served) -> None:
    with pytest.raises(grpc.RpcError) as err:
        served.registry(SITE_TOKEN).ListAliases(registry_pb2.ListAliasesRequest(model="m"), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == (
        f"method /{REGISTRY}/ListAliases needs an admin token; this token is scoped to site polaris"
    )


def test_site_token_on_site_method_sees_its_principal(served: Served) -> None:
    model = served.registry(SITE_TOKEN).GetModel(registry_pb2.GetModelRequest(name="m"), timeout=5)
    assert dict(model.labels) == {"role": "SITE", "site": "polaris"}


def test_admin_token_works_for_every_method(served: Served) -> None:
    stub = served.registry(ADMIN_TOKEN)
    assert stub.GetModel(registry_pb2.GetModelRequest(name="m"), timeout=5).labels["role"] == "ADMIN"
    assert stub.ListAliases(registry_pb2.ListAliasesRequest(model="m"), timeout=5).aliases[0].name == "latest"
    chunks = list(stub.Download(registry_pb2.DownloadRequest(ref=common_pb2.ModelRef(model="m")), timeout=5))
    assert chunks[0].manifest.producer == "admin"
    assert b"".join(c.data for c in chunks) == b"abcde"
    assert stub.Upload(iter(_upload_chunks()), timeout=5).object_key == "updates/admin"
    chat = served.channel(ADMIN_TOKEN).stream_stream("/test.Echo/Chat")
    assert list(chat(iter([b"hi"]), timeout=5)) == [b"admin:hi"]


def _upload_chunks() -> list[registry_pb2.UploadChunk]:
    return [
        registry_pb2.UploadChunk(header=registry_pb2.UploadHeader(upload_id="u1", size_bytes=5)),
        registry_pb2.UploadChunk(data=b"abc"),
        registry_pb2.UploadChunk(data=b"de"),
    ]


def test_streaming_calls_are_authenticated(served: Served) -> None:
    download = registry_pb2.DownloadRequest(ref=common_pb2.ModelRef(model="m"))
    chat = "/test.Echo/Chat"
    refused: list[Callable[[], Any]] = [
        lambda: list(served.registry().Download(download, timeout=5)),
        lambda: served.registry().Upload(iter(_upload_chunks()), timeout=5),
        lambda: list(served.channel().stream_stream(chat)(iter([b"x"]), timeout=5)),
        lambda: list(served.registry("wrong").Download(download, timeout=5)),
    ]
    for call in refused:
        assert _code_of(call) == grpc.StatusCode.UNAUTHENTICATED

    site = served.registry(SITE_TOKEN)
    assert next(iter(site.Download(download, timeout=5))).manifest.producer == "polaris"
    uploaded = site.Upload(iter(_upload_chunks()), timeout=5)
    assert (uploaded.upload_id, uploaded.size_bytes, uploaded.object_key) == ("u1", 5, "updates/polaris")
    assert list(served.channel(SITE_TOKEN).stream_stream(chat)(iter([b"a", b"b"]), timeout=5)) == [
        b"polaris:a",
        b"polaris:b",
    ]


# -- metrics -----------------------------------------------------------------------------------
def test_metrics_count_by_code_and_time_every_call(served: Served) -> None:
    stub = served.registry(ADMIN_TOKEN)
    before = {
        code: served.handled("GetModel", code) for code in ("OK", "NOT_FOUND", "UNKNOWN", "UNAUTHENTICATED")
    }
    timed = served.observed("GetModel")

    stub.GetModel(registry_pb2.GetModelRequest(name="m"), timeout=5)
    assert _code_of(lambda: stub.GetModel(registry_pb2.GetModelRequest(name="missing"), timeout=5)) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert _code_of(lambda: stub.GetModel(registry_pb2.GetModelRequest(name="boom"), timeout=5)) == (
        grpc.StatusCode.UNKNOWN
    )
    assert _code_of(
        lambda: served.registry().GetModel(registry_pb2.GetModelRequest(name="m"), timeout=5)
    ) == (grpc.StatusCode.UNAUTHENTICATED)
    for code in before:
        assert served.handled("GetModel", code) == before[code] + 1, code
    assert served.observed("GetModel") == timed + 4


def test_metrics_for_streams(served: Served) -> None:
    stub = served.registry(ADMIN_TOKEN)
    ok, unknown = served.handled("Download", "OK"), served.handled("Download", "UNKNOWN")
    up = served.handled("Upload", "OK")
    chat = served.handled("Chat", "OK", service="test.Echo")
    list(stub.Download(registry_pb2.DownloadRequest(ref=common_pb2.ModelRef(model="m")), timeout=5))
    broken = registry_pb2.DownloadRequest(ref=common_pb2.ModelRef(model="broken"))
    assert _code_of(lambda: list(stub.Download(broken, timeout=5))) == grpc.StatusCode.UNKNOWN
    stub.Upload(iter(_upload_chunks()), timeout=5)
    list(served.channel(ADMIN_TOKEN).stream_stream("/test.Echo/Chat")(iter([b"x"]), timeout=5))
    assert served.handled("Download", "OK") == ok + 1
    assert served.handled("Download", "UNKNOWN") == unknown + 1
    assert served.handled("Upload", "OK") == up + 1
    assert served.handled("Chat", "OK", service="test.Echo") == chat + 1


def test_abandoned_stream_is_counted_as_cancelled(served: Served) -> None:
    cancelled = served.handled("Download", "CANCELLED")
    stream = served.registry(ADMIN_TOKEN).Download(
        registry_pb2.DownloadRequest(ref=common_pb2.ModelRef(model="endless")), timeout=10
    )
    next(stream)
    stream.cancel()
    assert _wait_until(lambda: served.handled("Download", "CANCELLED") == cancelled + 1)


def test_unknown_method_is_unimplemented_and_counted(served: Served) -> None:
    before = served.handled("unknown", "UNIMPLEMENTED", service="unknown")
    code = _code_of(lambda: served.channel(ADMIN_TOKEN).unary_unary("/nope.Svc/Nope")(b"", timeout=5))
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert served.handled("unknown", "UNIMPLEMENTED", service="unknown") == before + 1


def test_metrics_http_endpoint(served: Served) -> None:
    served.registry(ADMIN_TOKEN).GetModel(registry_pb2.GetModelRequest(name="m"), timeout=5)
    assert served.server.metrics_port
    url = f"http://127.0.0.1:{served.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("component") == served.component
    }
    ok = {"component": served.component, "service": REGISTRY, "method": "GetModel", "code": "OK"}
    assert samples[("fedhpc_grpc_server_handled_total", tuple(sorted(ok.items())))] >= 1
    timed = {"component": served.component, "service": REGISTRY, "method": "GetModel"}
    assert samples[("fedhpc_grpc_server_handling_seconds_count", tuple(sorted(timed.items())))] >= 1
    assert any(name == "fedhpc_grpc_server_handling_seconds_bucket" for name, _ in samples)
    assert GRPC_HANDLED._name == "fedhpc_grpc_server_handled"  # exposed with the _total suffix
    assert GRPC_SECONDS._name == "fedhpc_grpc_server_handling_seconds"


def test_start_metrics_server_picks_a_free_port() -> None:
    port = start_metrics_server("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
    finally:
        stop_metrics_servers()
    assert _port_is_free(port)


# -- lifecycle -----------------------------------------------------------------------------------
def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # As servers bind: closed connections in TIME_WAIT do not hold the port, a listener does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_stop_turns_health_not_serving_then_frees_ports() -> None:
    server = GrpcServer(_config(metrics_port=0), [_registry_binding()], component="test-stop")
    server.start()
    port, metrics_port = server.port, server.metrics_port
    assert metrics_port is not None
    with make_channel(server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=REGISTRY), timeout=10
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopper = threading.Thread(target=server.stop, args=(2.0,))
        stopper.start()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # the open watch is a call in flight: let stop finish before its grace
        stopper.join(5)
    assert not stopper.is_alive()
    assert _port_is_free(port) and _port_is_free(metrics_port)
    server.stop()  # a second stop is harmless
    server.wait_for_termination()


def test_stop_lets_calls_in_flight_finish() -> None:
    servicer = FakeRegistry()
    server = GrpcServer(_config(), [_registry_binding(servicer)], component="test-grace")
    server.start()
    with make_channel(server.address) as channel:
        future = registry_pb2_grpc.RegistryStub(channel).GetModel.future(
            registry_pb2.GetModelRequest(name="slow"), timeout=10
        )
        assert servicer.entered.wait(5)
        stopper = threading.Thread(target=server.stop, args=(5.0,))
        stopper.start()
        time.sleep(0.1)
        # New calls are refused once stopping began...
        assert (
            _code_of(
                lambda: registry_pb2_grpc.RegistryStub(channel).GetModel(
                    registry_pb2.GetModelRequest(name="m"), timeout=2
                )
            )
            == grpc.StatusCode.UNAVAILABLE
        )
        servicer.release.set()
        # ...but the one in flight completes.
        assert future.result(timeout=5).name == "slow"
        stopper.join(5)
    assert not stopper.is_alive()


def test_taken_port_is_an_error() -> None:
    first = GrpcServer(_config(), [_registry_binding()], component="test-bind")
    first.start()
    try:
        second = GrpcServer(_config(port=first.port), [_registry_binding()], component="test-bind")
        with pytest.raises(OSError, match="cannot bind"):
            second.start()
    finally:
        first.stop(0)


def test_auth_disabled_message_limit_and_context_manager() -> None:
    server = GrpcServer(_config(max_message_mb=1), [_registry_binding()], component="test-open")
    with server, make_channel(server.address, max_message_mb=4) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        model = stub.GetModel(registry_pb2.GetModelRequest(name="m"), timeout=5)
        assert dict(model.labels) == {"role": "ADMIN", "site": ""}  # local mode: everyone is admin
        big = registry_pb2.GetModelRequest(name="x" * (2 << 20))
        assert _code_of(lambda: stub.GetModel(big, timeout=5)) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_wait_for_ready() -> None:
    with GrpcServer(_config(), [_registry_binding()], component="test-ready") as server:
        with make_channel(server.address) as channel:
            wait_for_ready(channel, 5)
        port = server.port
    with make_channel(f"127.0.0.1:{port}") as channel, pytest.raises(TimeoutError, match=f"127.0.0.1:{port}"):
        wait_for_ready(channel, 0.2)


# -- TLS -----------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _issue(name: str, usage: str, cwd: Path) -> None:
    (cwd / f"{name}.ext").write_text(f"subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=cwd,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial",
        str(uuid.uuid4().int >> 64), "-days", "1", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
        cwd=cwd,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate.

    The `cryptography` package is not in the venv, so the openssl CLI makes them.
    """
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    cwd = tmp_path_factory.mktemp("pki")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=fedhpc-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=cwd,
    )  # fmt: skip
    _issue("server", "serverAuth", cwd)
    _issue("client", "clientAuth", cwd)
    return cwd


def test_tls_call_through_make_channel(pki: Path) -> None:
    tls = {"cert_file": str(pki / "server.pem"), "key_file": str(pki / "server.key")}
    config = _config(tls=tls, auth=AUTH)
    with GrpcServer(config, [_registry_binding()], component="test-tls", method_roles=METHOD_ROLES) as server:
        with make_channel(server.address, token=SITE_TOKEN, tls_ca_file=pki / "ca.pem") as channel:
            model = registry_pb2_grpc.RegistryStub(channel).GetModel(
                registry_pb2.GetModelRequest(name="m"), timeout=5
            )
            assert model.labels["site"] == "polaris"
        with make_channel(server.address) as plaintext:
            code = _code_of(
                lambda: health_pb2_grpc.HealthStub(plaintext).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            )
            assert code == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_certificate(pki: Path) -> None:
    tls = {
        "cert_file": str(pki / "server.pem"),
        "key_file": str(pki / "server.key"),
        "client_ca_file": str(pki / "ca.pem"),
    }
    with GrpcServer(_config(tls=tls), [_registry_binding()], component="test-mtls") as server:
        request = health_pb2.HealthCheckRequest(service=REGISTRY)
        with make_channel(
            server.address,
            tls_ca_file=pki / "ca.pem",
            client_cert_file=pki / "client.pem",
            client_key_file=pki / "client.key",
        ) as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status == 1
        with make_channel(server.address, tls_ca_file=pki / "ca.pem") as no_cert:
            code = _code_of(lambda: health_pb2_grpc.HealthStub(no_cert).Check(request, timeout=2))
            assert code == grpc.StatusCode.UNAVAILABLE


def test_missing_tls_file_names_the_key(tmp_path: Path) -> None:
    tls = {"cert_file": str(tmp_path / "absent.pem"), "key_file": str(tmp_path / "absent.key")}
    server = GrpcServer(_config(tls=tls), [_registry_binding()], component="test-tls-missing")
    with pytest.raises(ValueError, match=r"tls\.(key|cert)_file"):
        server.start()


def test_make_channel_argument_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both"):
        make_channel("127.0.0.1:1", tls_ca_file=tmp_path / "ca.pem", client_cert_file=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="needs TLS"):
        make_channel("127.0.0.1:1", client_cert_file=tmp_path / "c.pem", client_key_file=tmp_path / "c.key")
    with pytest.raises(ValueError, match="cannot read TLS CA file"):
        make_channel("127.0.0.1:1", tls_ca_file=tmp_path / "absent.pem")
    with pytest.raises(ValueError, match="whitespace"):
        make_channel("127.0.0.1:1", token="two words")


# -- serve_forever + SIGTERM ---------------------------------------------------------------------
SERVE_SCRIPT = """
import sys
from fedhpc.api.v1 import registry_pb2_grpc
from fedhpc.common.config import ServerConfig
from fedhpc.common.grpc_server import GrpcServer, ServiceBinding
from fedhpc.common.logging import configure_logging

configure_logging("INFO", stream=sys.stdout)
binding = ServiceBinding("fedhpc.v1.Registry", registry_pb2_grpc.add_RegistryServicer_to_server,
                         registry_pb2_grpc.RegistryServicer())
config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, grace_seconds=3)
GrpcServer(config, [binding], component="sigterm-test").serve_forever()
print("exited", flush=True)
"""


def test_serve_forever_exits_cleanly_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "services")}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        serving: dict[str, Any] = {}
        for line in proc.stdout:
            entry = json.loads(line)
            if entry["msg"] == "serving":
                serving = entry
                break
        assert serving, proc.stderr.read() if proc.stderr else ""
        assert serving["component"] == "sigterm-test" and isinstance(serving["metrics_port"], int)
        with make_channel(serving["address"]) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 3  # nothing in flight: well within the grace
        rest = proc.stdout.read()
        messages = [json.loads(line)["msg"] for line in rest.splitlines() if line.startswith("{")]
        assert messages[:3] == ["signal received", "stopping", "stopped"]
        assert rest.rstrip().endswith("exited")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_serve_forever_in_a_thread_until_stop() -> None:
    server = GrpcServer(_config(), [_registry_binding()], component="test-thread")
    runner = threading.Thread(target=server.serve_forever)
    runner.start()
    try:
        assert _wait_until(lambda: server.started)
        with make_channel(server.address) as channel:
            wait_for_ready(channel, 5)
    finally:
        server.stop(0)
        runner.join(5)
    assert not runner.is_alive()
