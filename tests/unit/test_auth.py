"""Bearer-token auth: the authenticator, roles, and the interceptor on all four RPC kinds."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from fedhpc.common.auth import (
    ANONYMOUS_ADMIN,
    UNAUTHENTICATED_PUBLIC,
    AuthError,
    AuthInterceptor,
    Principal,
    Role,
    TokenAuthenticator,
    principal_from_context,
    require_experiment,
)
from fedhpc.common.config import AuthConfig
from fedhpc.common.grpc_client import make_channel

ADMIN_TOKEN = "admin-0123456789"
SITE_TOKEN = "site-polaris-abcdef"
ANY_EXP_TOKEN = "site-aurora-any"


def _auth_config(enabled: bool = True) -> AuthConfig:
    return AuthConfig.model_validate(
        {
            "enabled": enabled,
            "admin_tokens": [ADMIN_TOKEN],
            "site_tokens": [
                {"token": SITE_TOKEN, "site": "polaris", "experiment": "exp-1"},
                {"token": ANY_EXP_TOKEN, "site": "aurora"},
            ],
        }
    )


def _bearer(token: str) -> tuple[tuple[str, str | bytes], ...]:
    return (("authorization", f"Bearer {token}"),)


# -- Principal ------------------------------------------------------------------------------
def test_principal_scopes() -> None:
    site = Principal(Role.SITE, site="polaris", experiment="exp-1")
    anywhere = Principal(Role.SITE, site="aurora")
    assert ANONYMOUS_ADMIN.is_admin and ANONYMOUS_ADMIN.may_act_on("anything")
    assert not site.is_admin
    assert site.may_act_on("exp-1") and not site.may_act_on("exp-2")
    assert anywhere.may_act_on("exp-2")
    assert not UNAUTHENTICATED_PUBLIC.may_act_on("exp-1")
    assert "polaris" in site.describe()


# -- TokenAuthenticator ---------------------------------------------------------------------
def test_tokens_map_to_principals() -> None:
    auth = TokenAuthenticator(_auth_config())
    assert auth.authenticate(_bearer(ADMIN_TOKEN)) == ANONYMOUS_ADMIN
    assert auth.authenticate(_bearer(SITE_TOKEN)) == Principal(Role.SITE, "polaris", "exp-1")
    assert auth.authenticate(_bearer(ANY_EXP_TOKEN)) == Principal(Role.SITE, "aurora", "*")
    # Header values may arrive as bytes; the scheme is case-insensitive.
    assert auth.authenticate((("Authorization", f"bearer {SITE_TOKEN}".encode()),)).site == "polaris"


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "missing bearer token"),
        ((("x-other", "1"),), "missing bearer token"),
        ((("authorization", SITE_TOKEN),), "malformed"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "malformed"),
        ((("authorization", "Bearer "),), "malformed"),
        ((("authorization", "Bearer nope"),), "unknown bearer token"),
        ((("authorization", f"Bearer {ADMIN_TOKEN}x"),), "unknown bearer token"),
        ((*_bearer(ADMIN_TOKEN), *_bearer(SITE_TOKEN)), "more than one"),
    ],
)
def test_bad_credentials_are_unauthenticated(metadata: tuple[tuple[str, str], ...], message: str) -> None:
    with pytest.raises(AuthError) as err:
        TokenAuthenticator(_auth_config()).authenticate(metadata)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert message in err.value.message
    assert SITE_TOKEN not in err.value.message and ADMIN_TOKEN not in err.value.message


def test_disabled_auth_makes_everyone_admin() -> None:
    auth = TokenAuthenticator(_auth_config(enabled=False))
    assert auth.authenticate(()) == ANONYMOUS_ADMIN
    assert auth.authenticate(_bearer("garbage")) == ANONYMOUS_ADMIN


# -- AuthInterceptor.authorize ----------------------------------------------------------------
SITE_METHOD = "/test.Svc/SiteCall"
ADMIN_METHOD = "/test.Svc/AdminCall"


def _interceptor(enabled: bool = True) -> AuthInterceptor:
    return AuthInterceptor(TokenAuthenticator(_auth_config(enabled)), {SITE_METHOD: Role.SITE})


def test_roles_per_method() -> None:
    interceptor = _interceptor()
    assert interceptor.required_role(SITE_METHOD) == Role.SITE
    assert interceptor.required_role(ADMIN_METHOD) == Role.ADMIN  # unlisted -> default
    assert interceptor.required_role("/grpc.health.v1.Health/Check") == Role.PUBLIC
    assert (
        interceptor.required_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        == Role.PUBLIC
    )

    assert interceptor.authorize(SITE_METHOD, _bearer(SITE_TOKEN)).site == "polaris"
    assert interceptor.authorize(SITE_METHOD, _bearer(ADMIN_TOKEN)).is_admin
    assert interceptor.authorize(ADMIN_METHOD, _bearer(ADMIN_TOKEN)).is_admin
    with pytest.raises(AuthError) as err:
        interceptor.authorize(ADMIN_METHOD, _bearer(SITE_TOKEN))
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert (
        err.value.message
        == f"method {ADMIN_METHOD} needs an admin token; this token is scoped to site polaris"
    )
    with pytest.raises(AuthError) as err:
        interceptor.authorize(SITE_METHOD, ())
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_public_methods_never_fail_on_credentials() -> None:
    interceptor = _interceptor()
    health = "/grpc.health.v1.Health/Check"
    assert interceptor.authorize(health, ()) == UNAUTHENTICATED_PUBLIC
    assert interceptor.authorize(health, _bearer("stale")) == UNAUTHENTICATED_PUBLIC
    assert interceptor.authorize(health, _bearer(SITE_TOKEN)).site == "polaris"


def test_method_roles_keys_must_be_full_method_names() -> None:
    with pytest.raises(ValueError, match="full method name"):
        AuthInterceptor(TokenAuthenticator(_auth_config()), {"GetModel": Role.SITE})


def test_principal_without_interceptor_is_anonymous_admin() -> None:
    class FakeContext:
        pass

    assert principal_from_context(FakeContext()) == ANONYMOUS_ADMIN  # type: ignore[arg-type]


# -- the interceptor on a real server, every RPC kind -----------------------------------------
def _who(context: grpc.ServicerContext) -> bytes:
    principal = principal_from_context(context)
    return f"{principal.role.name}:{principal.site or '-'}".encode()


def _who_from_worker_thread(context: grpc.ServicerContext) -> bytes:
    # Handlers may hand their context to another thread; the principal must follow.
    with futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_who, context).result()


def _unary_unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    return _who_from_worker_thread(context)


def _unary_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for _ in range(3):
        yield _who(context)


def _stream_unary(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    return _who(context) + b"|" + b"".join(requests)


def _stream_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for request in requests:
        yield _who(context) + b"|" + request


def _experiment_check(request: bytes, context: grpc.ServicerContext) -> bytes:
    require_experiment(context, request.decode())
    return b"ok"


KINDS: dict[str, Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    "UU": lambda: grpc.unary_unary_rpc_method_handler(_unary_unary),
    "US": lambda: grpc.unary_stream_rpc_method_handler(_unary_stream),
    "SU": lambda: grpc.stream_unary_rpc_method_handler(_stream_unary),
    "SS": lambda: grpc.stream_stream_rpc_method_handler(_stream_stream),
    "Exp": lambda: grpc.unary_unary_rpc_method_handler(_experiment_check),
    "AdminOnly": lambda: grpc.unary_unary_rpc_method_handler(_unary_unary),
}


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    roles = {f"/test.Kinds/{name}": Role.SITE for name in ("UU", "US", "SU", "SS", "Exp")}
    server = grpc.server(
        futures.ThreadPoolExecutor(4),
        interceptors=[AuthInterceptor(TokenAuthenticator(_auth_config()), roles)],
    )
    handlers = {name: make() for name, make in KINDS.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Kinds", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None).wait()


def _call(channel: grpc.Channel, kind: str) -> list[bytes]:
    method = f"/test.Kinds/{kind}"
    if kind == "US":
        return list(channel.unary_stream(method)(b"x", timeout=5))
    if kind == "SU":
        return [channel.stream_unary(method)(iter([b"a", b"b"]), timeout=5)]
    if kind == "SS":
        return list(channel.stream_stream(method)(iter([b"a", b"b"]), timeout=5))
    return [channel.unary_unary(method)(b"x", timeout=5)]


@pytest.mark.parametrize("kind", ["UU", "US", "SU", "SS"])
def test_every_rpc_kind_is_authenticated(address: str, kind: str) -> None:
    with make_channel(address) as anonymous, make_channel(address, token="wrong") as wrong:
        for channel in (anonymous, wrong):
            with pytest.raises(grpc.RpcError) as err:
                _call(channel, kind)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with make_channel(address, token=SITE_TOKEN) as site, make_channel(address, token=ADMIN_TOKEN) as admin:
        assert all(r.startswith(b"SITE:polaris") for r in _call(site, kind))
        assert all(r.startswith(b"ADMIN:-") for r in _call(admin, kind))
    expected = {
        "US": [b"SITE:polaris"] * 3,
        "SU": [b"SITE:polaris|ab"],
        "SS": [b"SITE:polaris|a", b"SITE:polaris|b"],
    }
    if kind in expected:
        with make_channel(address, token=SITE_TOKEN) as site:
            assert _call(site, kind) == expected[kind]


def test_site_token_on_admin_method_is_permission_denied(address: str) -> None:
    with make_channel(address, token=SITE_TOKEN) as site, pytest.raises(grpc.RpcError) as err:
        _call(site, "AdminOnly")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "needs an admin token; this token is scoped to site polaris" in (err.value.details() or "")


def test_require_experiment_in_a_handler(address: str) -> None:
    with (
        make_channel(address, token=SITE_TOKEN) as site,
        make_channel(address, token=ANY_EXP_TOKEN) as aurora,
    ):
        method = site.unary_unary("/test.Kinds/Exp")
        assert method(b"exp-1", timeout=5) == b"ok"
        with pytest.raises(grpc.RpcError) as err:
            method(b"exp-2", timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "exp-2" in (err.value.details() or "")
        assert aurora.unary_unary("/test.Kinds/Exp")(b"exp-2", timeout=5) == b"ok"


def test_per_call_metadata_overrides_the_channel_token(address: str) -> None:
    with make_channel(address, token=SITE_TOKEN) as site:
        method = site.unary_unary("/test.Kinds/AdminOnly")
        assert method(b"x", timeout=5, metadata=_bearer(ADMIN_TOKEN)) == b"ADMIN:-"


def test_concurrent_calls_keep_their_own_principals(address: str) -> None:
    results: dict[str, list[bytes]] = {}

    def run(token: str) -> None:
        with make_channel(address, token=token) as channel:
            results[token] = [r for _ in range(20) for r in _call(channel, "UU")]

    threads = [threading.Thread(target=run, args=(t,)) for t in (SITE_TOKEN, ADMIN_TOKEN, ANY_EXP_TOKEN)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results[SITE_TOKEN]) == {b"SITE:polaris"}
    assert set(results[ADMIN_TOKEN]) == {b"ADMIN:-"}
    assert set(results[ANY_EXP_TOKEN]) == {b"SITE:aurora"}
