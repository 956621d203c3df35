"""Bearer-token authentication and per-method authorization for gRPC servers.

Callers send ``authorization: Bearer <token>``. Admin tokens (operators) may call anything;
site tokens are scoped to one site and one experiment (or ``*``) and may only call methods
the service marks ``Role.SITE``. Health checking and reflection are always public, so probes
and grpcurl work without a token.

The interceptor authenticates once per call, before the handler runs, and records the
resulting `Principal` against that call's context; handlers read it back with
`principal_from_context` (from any thread, for every RPC kind).
"""

from __future__ import annotations

import enum
import hmac
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from fedhpc.common.config import AuthConfig

__all__ = [
    "ANONYMOUS_ADMIN",
    "PUBLIC_METHOD_PREFIXES",
    "UNAUTHENTICATED_PUBLIC",
    "AuthError",
    "AuthInterceptor",
    "Principal",
    "Role",
    "TokenAuthenticator",
    "handler_behavior",
    "principal_from_context",
    "rebuild_handler",
    "require_experiment",
]

AUTHORIZATION_HEADER = "authorization"

# Methods anyone may call: probes (kubelet, grpc_health_probe) and reflection (grpcurl).
PUBLIC_METHOD_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Role(enum.IntEnum):
    """Ordered: a principal may call a method when its role is at least the method's."""

    PUBLIC = 0
    SITE = 1
    ADMIN = 2


@dataclass(frozen=True)
class Principal:
    """Who is calling: an admin, a site (scoped to an experiment or '*'), or nobody (PUBLIC)."""

    role: Role
    site: str | None = None
    experiment: str = "*"

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN

    def may_act_on(self, experiment: str) -> bool:
        if self.role == Role.ADMIN:
            return True
        if self.role == Role.SITE:
            return self.experiment == "*" or self.experiment == experiment
        return False

    def describe(self) -> str:
        """For error messages and logs; never includes the token."""
        if self.role == Role.ADMIN:
            return "admin"
        if self.role == Role.SITE:
            return f"site {self.site!r} (experiment {self.experiment!r})"
        return "anonymous caller"


ANONYMOUS_ADMIN = Principal(role=Role.ADMIN)
UNAUTHENTICATED_PUBLIC = Principal(role=Role.PUBLIC)


class AuthError(Exception):
    """Authentication or authorization failed; `code` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _unauthenticated(message: str) -> AuthError:
    return AuthError(grpc.StatusCode.UNAUTHENTICATED, message)


class TokenAuthenticator:
    """Maps a call's metadata to a Principal using the configured tokens."""

    def __init__(self, config: AuthConfig) -> None:
        self._enabled = config.enabled
        entries: list[tuple[bytes, Principal]] = [
            (token.get_secret_value().encode(), ANONYMOUS_ADMIN) for token in config.admin_tokens
        ]
        entries += [
            (
                st.token.get_secret_value().encode(),
                Principal(Role.SITE, site=st.site, experiment=st.experiment),
            )
            for st in config.site_tokens
        ]
        self._entries = tuple(entries)

    @property
    def enabled(self) -> bool:
        return self._enabled

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal:
        if not self._enabled:
            return ANONYMOUS_ADMIN
        values = [value for key, value in metadata or () if key.lower() == AUTHORIZATION_HEADER]
        if not values:
            raise _unauthenticated("missing bearer token: send metadata 'authorization: Bearer <token>'")
        if len(values) > 1:
            raise _unauthenticated("more than one authorization header; send exactly one 'Bearer <token>'")
        raw = values[0]
        header = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthenticated("malformed authorization header: expected 'Bearer <token>'")
        return self._lookup(token.encode())

    def _lookup(self, presented: bytes) -> Principal:
        # Compare against every token, without stopping at a match, so the time taken
        # does not reveal which token (or how many) matched.
        found: Principal | None = None
        for candidate, principal in self._entries:
            if hmac.compare_digest(candidate, presented) and found is None:
                found = principal
        if found is None:
            raise _unauthenticated("unknown bearer token (not an admin or site token of this server)")
        return found


# -- the principal of the call in progress ------------------------------------------------
# Keyed by the grpc ServicerContext rather than a contextvar: a handler may hand the
# context to a worker thread, and a contextvar would not follow it there.
_principals: weakref.WeakKeyDictionary[Any, Principal] = weakref.WeakKeyDictionary()
_principals_lock = threading.Lock()


def _bind(context: grpc.ServicerContext, principal: Principal) -> None:
    with _principals_lock:
        _principals[context] = principal


def principal_from_context(context: grpc.ServicerContext) -> Principal:
    """The principal AuthInterceptor established for this call; ANONYMOUS_ADMIN when none ran."""
    try:
        with _principals_lock:
            return _principals.get(context, ANONYMOUS_ADMIN)
    except TypeError:  # a context that cannot be weakly referenced was never bound
        return ANONYMOUS_ADMIN


def require_experiment(context: grpc.ServicerContext, experiment: str) -> Principal:
    """The caller, after aborting with PERMISSION_DENIED unless it may act on `experiment`."""
    principal = principal_from_context(context)
    if not principal.may_act_on(experiment):
        context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{principal.describe()} may not act on experiment {experiment!r}",
        )
    return principal


# -- handler plumbing shared with metrics.py ------------------------------------------------
_HANDLER_FACTORIES: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
# grpc reads these off the behavior: non-blocking streaming (health Watch) and its pool.
_BEHAVIOR_ATTRS = ("experimental_non_blocking", "experimental_thread_pool")


def handler_behavior(handler: grpc.RpcMethodHandler[Any, Any]) -> Callable[..., Any]:
    """The one callable of a method handler, whichever of the four RPC kinds it is."""
    if handler.request_streaming:
        behavior = handler.stream_stream if handler.response_streaming else handler.stream_unary
    else:
        behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
    if behavior is None:
        raise ValueError("method handler has no behavior for its RPC kind")
    return behavior


def rebuild_handler(
    handler: grpc.RpcMethodHandler[Any, Any], behavior: Callable[..., Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler (kind, serializers, non-blocking flags) with another behavior."""
    original = handler_behavior(handler)
    for attr in _BEHAVIOR_ATTRS:
        if hasattr(original, attr):
            setattr(behavior, attr, getattr(original, attr))
    factory = _HANDLER_FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def is_public_method(method: str) -> bool:
    return method.startswith(PUBLIC_METHOD_PREFIXES)


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every call and checks the caller's role against the method's."""

    def __init__(
        self,
        authenticator: TokenAuthenticator,
        method_roles: Mapping[str, Role],
        default_role: Role = Role.ADMIN,
    ) -> None:
        for method in method_roles:
            if not (method.startswith("/") and method.count("/") == 2):
                raise ValueError(
                    f"method_roles key {method!r} is not a full method name like '/pkg.Service/Method'"
                )
        self._authenticator = authenticator
        self._method_roles = dict(method_roles)
        self._default_role = default_role

    def required_role(self, method: str) -> Role:
        if is_public_method(method):
            return Role.PUBLIC
        return self._method_roles.get(method, self._default_role)

    def authorize(self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal:
        """The caller of `method`, or AuthError (UNAUTHENTICATED / PERMISSION_DENIED)."""
        required = self.required_role(method)
        if required == Role.PUBLIC:
            # Public methods never fail on credentials (a probe with a stale token is
            # still a probe), but a valid token still tells the handler who is calling.
            try:
                return self._authenticator.authenticate(metadata)
            except AuthError:
                return UNAUTHENTICATED_PUBLIC
        principal = self._authenticator.authenticate(metadata)
        if principal.role >= required:
            return principal
        if required == Role.ADMIN and principal.role == Role.SITE:
            raise AuthError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"method {method} needs an admin token; this token is scoped to site {principal.site}",
            )
        raise AuthError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"method {method} needs a {required.name.lower()} token; caller is {principal.describe()}",
        )

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: let grpc answer UNIMPLEMENTED
            return None
        try:
            principal = self.authorize(handler_call_details.method, handler_call_details.invocation_metadata)
        except AuthError as err:
            return rebuild_handler(handler, _denying_behavior(err))
        return rebuild_handler(handler, _binding_behavior(handler_behavior(handler), principal))


def _denying_behavior(err: AuthError) -> Callable[..., Any]:
    def deny(request: Any, context: grpc.ServicerContext, *rest: Any) -> Any:
        context.abort(err.code, err.message)

    return deny


def _binding_behavior(behavior: Callable[..., Any], principal: Principal) -> Callable[..., Any]:
    # *rest carries send_response_callback for non-blocking streaming handlers.
    def bound(request: Any, context: grpc.ServicerContext, *rest: Any) -> Any:
        _bind(context, principal)
        return behavior(request, context, *rest)

    return bound
