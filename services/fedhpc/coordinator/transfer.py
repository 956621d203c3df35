"""Globus Transfer transport: stage global models into a site's collection, bring updates back.

A site marked ``transport: globus`` has compute nodes that cannot reach the object store
(DESIGN.md, Storage and transport). For such a site the coordinator, around every task:

1. **before dispatch** calls :meth:`GlobusTransferStager.stage_model`: a Globus Transfer task
   copies the global model from the coordinator's collection (which exposes the object store:
   ``source_path/<object key>``) into the site's collection, and the call returns once the
   transfer SUCCEEDED. The returned :attr:`StagedFile.local_path` (the same file as the
   trainer sees it on the compute nodes) goes into the task's ``ModelSource.path``;
   :meth:`GlobusTransferStager.update_location` gives the ``UpdateTarget.path``;
2. **after a successful result** calls :meth:`GlobusTransferStager.fetch_update`: the reverse
   transfer puts the trainer's update at ``source_path/<object key>``, i.e. into the object
   store under the key the aggregator reads.

Every failure is a :class:`TransferFailed` with a stable :class:`TransferErrorCode` and a
message saying what to do; the coordinator turns it into a task failure.

The site directory mirrors the object store's layout (``models/<experiment>/<version>/...``,
``updates/...``), so a model version always lands at the same path: staging it again is a
no-op here (cached) and cheap at Globus (``sync_level="checksum"`` moves no bytes when the
destination already matches).

Only the Globus Transfer REST API is used (``globus_sdk.TransferClient``); ``globus_sdk`` is
imported on first use, so the coordinator needs it only for sites that use this transport.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedhpc.common.contracts import ErrorCode
from fedhpc.common.storage.base import InvalidKey, validate_key

if TYPE_CHECKING:
    import globus_sdk

__all__ = [
    "CONFIG_SECTION",
    "ENV_CLIENT_ID",
    "ENV_CLIENT_SECRET",
    "FetchedFile",
    "GlobusTransferConfig",
    "GlobusTransferStager",
    "PendingTransfer",
    "StagedFile",
    "TransferConfigError",
    "TransferErrorCode",
    "TransferFailed",
    "UpdateLocation",
    "build_transfer_client",
    "without_transfer_config",
]

log = logging.getLogger(__name__)

#: The key of a site's config that holds :class:`GlobusTransferConfig`.
CONFIG_SECTION = "globus_transfer"
ENV_CLIENT_ID = "GLOBUS_TRANSFER_CLIENT_ID"
ENV_CLIENT_SECRET = "GLOBUS_TRANSFER_CLIENT_SECRET"

# Globus task labels allow a restricted character set and at most 128 characters; anything else
# makes the submission fail, which would be a silly reason to fail a task.
_LABEL_BAD = re.compile(r"[^A-Za-z0-9 _-]+")
_LABEL_MAX = 128
_DETAILS_MAX = 300
# A single path segment (experiment id, version id) of the staged layout.
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+@,:-]{0,199}$")


# -- errors -------------------------------------------------------------------------------------


class TransferErrorCode(StrEnum):
    """Stable codes of :class:`TransferFailed` (shown to operators, usable as metric labels)."""

    #: Globus ran the task and it ended FAILED, a persistent fault (permission denied, file not
    #: found, quota) outlasted ``fault_grace_s``, or the Transfer API refused the request.
    TRANSFER_FAILED = "TRANSFER_FAILED"
    #: The client has not consented to a scope the collections need (``ConsentRequired``) or
    #: the collection demands a different authentication (``authorization_parameters``).
    CONSENT_REQUIRED = "CONSENT_REQUIRED"
    #: The task did not succeed within ``timeout_s``; it was cancelled at Globus.
    TRANSFER_TIMEOUT = "TRANSFER_TIMEOUT"
    #: GLOBUS_TRANSFER_CLIENT_ID / GLOBUS_TRANSFER_CLIENT_SECRET are not set.
    CREDENTIALS_MISSING = "CREDENTIALS_MISSING"
    #: Globus Auth refused the client id / secret.
    CREDENTIALS_INVALID = "CREDENTIALS_INVALID"
    #: The site's ``globus_transfer`` section is invalid.
    CONFIG_INVALID = "CONFIG_INVALID"


Direction = Literal["stage", "fetch"]


class TransferFailed(Exception):
    """A Globus transfer (or the setup for one) failed; ``str()`` is ``"CODE: message"``.

    ``direction`` is ``"stage"`` (the global model to the site, before dispatch), ``"fetch"``
    (the update back, after the task) or None (credentials, config). ``globus_task_id`` names
    the Globus task where there was one (``globus task show <id>`` tells more);
    ``required_scopes`` lists the scopes to consent to for ``CONSENT_REQUIRED``.
    """

    def __init__(
        self,
        code: TransferErrorCode,
        message: str,
        *,
        direction: Direction | None = None,
        globus_task_id: str | None = None,
        required_scopes: Iterable[str] = (),
    ) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.direction = direction
        self.globus_task_id = globus_task_id
        self.required_scopes = tuple(required_scopes)

    @property
    def task_error_code(self) -> ErrorCode:
        """The task contract's code for a task this failure ends: a model that never reached
        the site means the task was never dispatched; an update that never came back is a
        failed upload."""
        return ErrorCode.UPLOAD_FAILED if self.direction == "fetch" else ErrorCode.DISPATCH_FAILED


class TransferConfigError(TransferFailed, ValueError):
    """The site's ``globus_transfer`` section is invalid; the message names every bad key.
    A ``ValueError`` too, so site registration can reject it as a bad argument."""

    def __init__(self, message: str) -> None:
        super().__init__(TransferErrorCode.CONFIG_INVALID, message)


# -- configuration ------------------------------------------------------------------------------


def _globus_path(value: str) -> str:
    # Globus paths are POSIX paths on the collection, absolute or under the home directory.
    if not (value.startswith("/") or value == "~" or value.startswith("~/")):
        raise ValueError(f"must be an absolute path on the collection ('/...' or '~/...'), got {value!r}")
    if any(part == ".." for part in value.split("/")):
        raise ValueError(f"must not contain '..' segments, got {value!r}")
    return value.rstrip("/") or "/"


class GlobusTransferConfig(BaseModel):
    """A site's ``config["globus_transfer"]`` section (every key is documented in docs/transfer.md)."""

    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)

    source_collection: uuid.UUID = Field(
        description="Collection exposing the coordinator's object store (or staging area)."
    )
    source_path: str = Field(
        description="Path on the source collection that corresponds to the object store's root: "
        "object key K is the file source_path/K."
    )
    site_collection: uuid.UUID = Field(
        description="The site's collection (e.g. the facility's GCS mapped collection)."
    )
    site_path: str = Field(description="Staging directory on the site collection, as Globus sees it.")
    site_local_path: str = Field(
        description="The same directory as trainers see it on the compute nodes' filesystem."
    )
    timeout_s: float = Field(
        default=1800.0, gt=0, description="How long one transfer may take before it is cancelled."
    )
    poll_interval_s: float = Field(
        default=10.0, gt=0, le=600, description="How often the task status is polled."
    )
    verify_checksum: bool = Field(default=True, description="Globus verifies checksums after copying.")
    label_prefix: str = Field(default="fedhpc", max_length=40, description="Prefix of Globus task labels.")
    fault_grace_s: float = Field(
        default=300.0,
        ge=0,
        description="A fault Globus keeps retrying but that needs a human (PERMISSION_DENIED, "
        "FILE_NOT_FOUND, QUOTA_EXCEEDED, INACTIVE) fails the transfer once it lasted this long.",
    )
    data_access: bool = Field(
        default=False,
        description="Request the data_access scope of both collections with the Transfer token "
        "(GCS v5 mapped collections need it; guest collections must not have it).",
    )
    encrypt_data: bool = Field(default=False, description="Encrypt the data channel.")
    external_checksum: bool = Field(
        default=False,
        description="Also have Globus check the staged model against the registry's sha256 "
        "(both collections must support SHA256 checksums).",
    )

    @field_validator("source_path", "site_path")
    @classmethod
    def _collection_path(cls, value: str) -> str:
        return _globus_path(value)

    @field_validator("site_local_path")
    @classmethod
    def _local_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must be an absolute path on the compute nodes, got {value!r}")
        if any(part == ".." for part in value.split("/")):
            raise ValueError(f"must not contain '..' segments, got {value!r}")
        return value.rstrip("/") or "/"

    @field_validator("label_prefix")
    @classmethod
    def _label(cls, value: str) -> str:
        if _LABEL_BAD.search(value):
            raise ValueError("may only contain letters, digits, spaces, '_' and '-'")
        return value

    @classmethod
    def from_site_config(cls, site_config: Mapping[str, Any]) -> GlobusTransferConfig:
        """Read the section from a site's config.

        Accepts it as a mapping (``globus_transfer: {source_collection: ...}``), as flat dotted
        keys (``globus_transfer.source_collection: ...``, what ``fedhpc sites add --set
        globus_transfer.KEY=VALUE`` stores), or both (dotted keys win). Raises
        :class:`TransferConfigError` naming each bad key as ``globus_transfer.<key>``.
        """
        section = site_config.get(CONFIG_SECTION)
        if section is not None and not isinstance(section, Mapping):
            raise TransferConfigError(
                f"{CONFIG_SECTION}: must be a mapping of settings, got {type(section).__name__}"
            )
        data: dict[str, Any] = dict(section or {})
        prefix = CONFIG_SECTION + "."
        for key, value in site_config.items():
            if isinstance(key, str) and key.startswith(prefix):
                data[key[len(prefix) :]] = value
        if not data:
            raise TransferConfigError(
                f"{CONFIG_SECTION}: missing; a site with transport 'globus' needs source_collection, "
                "source_path, site_collection, site_path and site_local_path (see docs/transfer.md)"
            )
        return cls.from_mapping(data)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> GlobusTransferConfig:
        """Validate the section itself; errors name keys as ``globus_transfer.<key>``."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"])
                key = f"{CONFIG_SECTION}.{where}" if where else CONFIG_SECTION
                problems.append(f"{key}: {err['msg']}")
            raise TransferConfigError("; ".join(problems)) from None


def without_transfer_config(site_config: Mapping[str, Any]) -> dict[str, Any]:
    """The site config minus the ``globus_transfer`` section (both spellings): what a
    dispatcher backend whose config forbids unknown keys should be given."""
    prefix = CONFIG_SECTION + "."
    return {
        k: v
        for k, v in site_config.items()
        if k != CONFIG_SECTION and not (isinstance(k, str) and k.startswith(prefix))
    }


# -- credentials --------------------------------------------------------------------------------


def transfer_scope(collections: Iterable[str | uuid.UUID] = ()) -> str:
    """The Transfer scope, with the ``data_access`` scope of each collection as a dependency
    (what GCS v5 mapped collections require of a client)."""
    from globus_sdk.scopes import GCSCollectionScopes, TransferScopes

    ids = [str(c) for c in collections]
    if not ids:
        return str(TransferScopes.all)
    return str(TransferScopes.all.with_dependencies([GCSCollectionScopes(c).data_access for c in ids]))


def build_transfer_client(
    *,
    client_id: str | None = None,
    client_secret: str | None = None,
    env: Mapping[str, str] | None = None,
    data_access_collections: Iterable[str | uuid.UUID] = (),
) -> globus_sdk.TransferClient:
    """A ``TransferClient`` acting as a confidential client (client credentials grant).

    The id and secret come from the arguments, else from ``GLOBUS_TRANSFER_CLIENT_ID`` /
    ``GLOBUS_TRANSFER_CLIENT_SECRET`` in ``env`` (default: the process environment). Getting
    the first token talks to Globus Auth. Raises :class:`TransferFailed` with
    ``CREDENTIALS_MISSING`` (names the unset variables), ``CREDENTIALS_INVALID`` (Globus Auth
    refused them) or ``TRANSFER_FAILED`` (Globus Auth unreachable).
    """
    env = os.environ if env is None else env
    client_id = client_id or env.get(ENV_CLIENT_ID, "").strip() or None
    client_secret = client_secret or env.get(ENV_CLIENT_SECRET, "").strip() or None
    missing = [
        name for name, value in ((ENV_CLIENT_ID, client_id), (ENV_CLIENT_SECRET, client_secret)) if not value
    ]
    if missing or client_id is None or client_secret is None:
        raise TransferFailed(
            TransferErrorCode.CREDENTIALS_MISSING,
            f"Globus Transfer needs client credentials for the coordinator: {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set. Register a confidential client (service "
            "account) at https://app.globus.org/settings/developers, set "
            f"{ENV_CLIENT_ID} and {ENV_CLIENT_SECRET} in the coordinator's environment, and give "
            f"the client's identity ({'<client id>' if client_id is None else client_id}"
            "@clients.auth.globus.org) access to both collections",
        )

    import globus_sdk

    scope = transfer_scope(data_access_collections)
    confidential = globus_sdk.ConfidentialAppAuthClient(client_id, client_secret, app_name="fedhpc")
    try:
        # The authorizer fetches its first token right here (and renews it when it expires).
        authorizer = globus_sdk.ClientCredentialsAuthorizer(confidential, scope)
    except globus_sdk.GlobusAPIError as exc:
        raise TransferFailed(
            TransferErrorCode.CREDENTIALS_INVALID,
            f"Globus Auth refused the client credentials from {ENV_CLIENT_ID}/{ENV_CLIENT_SECRET} "
            f"(HTTP {exc.http_status} {exc.code}: {exc.message}); check the client id and secret "
            f"(client {client_id}, scope {scope})",
        ) from exc
    except globus_sdk.NetworkError as exc:
        raise TransferFailed(
            TransferErrorCode.TRANSFER_FAILED, f"cannot reach Globus Auth to get a Transfer token: {exc}"
        ) from exc
    return globus_sdk.TransferClient(authorizer=authorizer, app_name="fedhpc")


# -- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StagedFile:
    """A global model staged at the site. ``local_path`` goes into ``ModelSource.path``."""

    local_path: str  #: the file as trainers see it on the compute nodes
    globus_path: str  #: the file on the site collection
    relative_path: str  #: relative to ``site_path`` / ``site_local_path``
    sha256: str
    size_bytes: int
    globus_task_id: str  #: the Globus task that staged it
    reused: bool = False  #: served from this stager's record of earlier stages, no new transfer


@dataclass(frozen=True)
class UpdateLocation:
    """Where a trainer writes its update (``local_path`` goes into ``UpdateTarget.path``) and
    where :meth:`GlobusTransferStager.fetch_update` picks it up (``relative_path``)."""

    object_key: str
    relative_path: str
    local_path: str
    globus_path: str


@dataclass(frozen=True)
class FetchedFile:
    """An update brought back into the object store: it is now object ``object_key``."""

    object_key: str
    globus_path: str  #: the file on the source collection (``source_path/<object_key>``)
    globus_task_id: str


@dataclass
class PendingTransfer:
    """A submitted Globus task being waited for. Plain data (epoch seconds, ids, paths), so an
    engine may persist it and resume :meth:`GlobusTransferStager.poll` after a restart."""

    globus_task_id: str
    direction: Direction
    label: str
    source: str  #: ``<collection>:<path>``
    destination: str  #: ``<collection>:<path>``
    submitted_at: float
    deadline_at: float
    # The moment a fault that needs a human was first seen in the current run of faults.
    fault_since: float | None = None
    last_status: str = ""
    polls: int = 0


# -- nice_status ---------------------------------------------------------------------------------

# Faults Globus retries by itself but which do not go away without a human: after
# fault_grace_s they fail the transfer instead of waiting out the whole timeout.
_NEEDS_HUMAN = {
    "PERMISSION_DENIED": (
        "a collection refused access to the path: the client identity needs read access on the "
        "source collection and write access on the site collection (guest collection permissions, "
        "or the storage gateway's identity mapping for a mapped collection)"
    ),
    "FILE_NOT_FOUND": (
        "the source file does not exist: check globus_transfer.source_path / site_path and that "
        "the file is there"
    ),
    "NOT_FOUND": (
        "the source file or a collection path does not exist: check globus_transfer.source_path / "
        "site_path and that the file is there"
    ),
    "QUOTA_EXCEEDED": "the destination filesystem is over its quota: free space in the staging directory",
    "NO_SPACE_LEFT": "the destination filesystem is full: free space in the staging directory",
    "INACTIVE": (
        "the task is INACTIVE: its credentials expired or a collection needs (re)authentication "
        "or consent for the client"
    ),
}
# Faults that usually clear by themselves (Globus retries them); reported if the transfer times out.
_TRANSIENT = {
    "CONNECT_FAILED": "Globus cannot connect to a collection's server (server down, firewall, maintenance)",
    "CONNECTION_FAILED": "Globus cannot connect to a collection's server (server down, firewall, maintenance)",
    "CONNECTION_RESET": "a collection's server dropped the connection",
    "ENDPOINT_ERROR": "a collection's server reported an error",
    "ENDPOINT_TOO_BUSY": "a collection's server is too busy and refused new transfers",
    "SERVICE_UNAVAILABLE": "a collection's server is unavailable",
    "GC_NOT_CONNECTED": "the Globus Connect Personal endpoint is not connected",
    "GC_PAUSED": "the Globus Connect Personal endpoint is paused",
    "PAUSED_BY_ADMIN": "the task is paused by a collection administrator (pause rule)",
    "VERIFY_CHECKSUM": "the checksum after the copy did not match (Globus retries the file)",
    "TIMEOUT": "a collection's server timed out",
}
_QUIET = {"", "OK", "QUEUED"}


def explain_status(task: Mapping[str, Any]) -> str:
    """A one-line explanation of a Transfer task document's state for messages and logs."""
    status = str(task.get("status") or "")
    nice = str(task.get("nice_status") or "")
    key = nice.upper()
    parts = [f"status {status or '?'}"]
    if nice:
        parts.append(f"nice_status {nice}")
    help_text = _NEEDS_HUMAN.get(key) or _TRANSIENT.get(key)
    if help_text is None and status == "INACTIVE":
        help_text = _NEEDS_HUMAN["INACTIVE"]
    if help_text is None and task.get("is_paused"):
        help_text = _TRANSIENT["PAUSED_BY_ADMIN"]
    if help_text is None and key not in _QUIET:
        help_text = str(task.get("nice_status_short_description") or "")
    text = ", ".join(parts)
    if help_text:
        text += f" ({help_text})"
    details = task.get("nice_status_details")
    if details and key not in _QUIET:
        text += f"; details: {_clip(str(details))}"
    return text


def _clip(text: str, limit: int = _DETAILS_MAX) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _needs_human(task: Mapping[str, Any]) -> bool:
    return str(task.get("nice_status") or "").upper() in _NEEDS_HUMAN or task.get("status") == "INACTIVE"


def _label(*parts: str) -> str:
    text = _LABEL_BAD.sub("_", " ".join(p for p in parts if p)).strip()
    return text[:_LABEL_MAX]


def _join(base: str, relative: str) -> str:
    return posixpath.join(base, relative) if base != "/" else "/" + relative


def _check_relative(what: str, value: str) -> str:
    try:
        return validate_key(value)
    except InvalidKey as exc:
        raise ValueError(f"{what}: {exc}") from None


def _check_segment(what: str, value: str) -> str:
    if not _SEGMENT.match(value) or value in (".", ".."):
        raise ValueError(f"{what} {value!r} cannot be a path segment (letters, digits, '._=+@,:-')")
    return value


# -- the stager ---------------------------------------------------------------------------------


class GlobusTransferStager:
    """Moves models to one site and updates back through Globus Transfer. Thread-safe.

    ``client``: a ready ``globus_sdk.TransferClient`` (tests, or an app with its own auth);
    without one, a client-credentials client is built on first use from ``client_id`` /
    ``client_secret`` or the environment (:func:`build_transfer_client`). ``clock`` (epoch
    seconds) and ``sleep`` are injectable so tests never wait.
    """

    def __init__(
        self,
        config: GlobusTransferConfig,
        *,
        client: globus_sdk.TransferClient | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
        env: Mapping[str, str] | None = None,
        site: str = "",
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.site = site
        self._client = client
        self._client_id = client_id
        self._client_secret = client_secret
        self._env = env
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        # (experiment, version, sha256) -> the stage that succeeded, or the one in flight:
        # concurrent tasks of one site that need the same version share one Globus task.
        self._staged: dict[tuple[str, str, str], StagedFile] = {}
        self._staging: dict[tuple[str, str, str], Future[StagedFile]] = {}

    @classmethod
    def for_site(cls, site_config: Mapping[str, Any], **kwargs: Any) -> GlobusTransferStager:
        """A stager for a site's whole config (reads its ``globus_transfer`` section)."""
        return cls(GlobusTransferConfig.from_site_config(site_config), **kwargs)

    @property
    def client(self) -> globus_sdk.TransferClient:
        with self._lock:
            if self._client is None:
                collections: tuple[uuid.UUID, ...] = ()
                if self.config.data_access:
                    collections = (self.config.source_collection, self.config.site_collection)
                self._client = build_transfer_client(
                    client_id=self._client_id,
                    client_secret=self._client_secret,
                    env=self._env,
                    data_access_collections=collections,
                )
            return self._client

    # -- paths ---------------------------------------------------------------------------------
    def model_location(self, experiment: str, version: str, relative_source_path: str) -> str:
        """Where a model version is staged, relative to ``site_path``: one path per version."""
        _check_segment("experiment", experiment)
        _check_segment("version", version)
        name = posixpath.basename(_check_relative("relative_source_path", relative_source_path))
        return f"models/{experiment}/{version}/{name}"

    def update_location(self, object_key: str) -> UpdateLocation:
        """Where the trainer writes the update that must end up as ``object_key``: the same
        relative path under the site's staging directory (so it is unique per task)."""
        relative = _check_relative("object_key", object_key)
        return UpdateLocation(
            object_key=relative,
            relative_path=relative,
            local_path=_join(self.config.site_local_path, relative),
            globus_path=_join(self.config.site_path, relative),
        )

    # -- the two directions --------------------------------------------------------------------
    def stage_model(
        self, experiment: str, version: str, relative_source_path: str, sha256: str, size: int
    ) -> StagedFile:
        """Copy ``source_path/<relative_source_path>`` (the model's object key) to the site and
        wait for it. Returns at once for a version this stager already staged; a stage already
        in flight for the same version is joined, not repeated. Raises :class:`TransferFailed`."""
        relative = self.model_location(experiment, version, relative_source_path)
        key = (experiment, version, sha256)
        with self._lock:
            done = self._staged.get(key)
            if done is not None:
                return _reused(done)
            running = self._staging.get(key)
            owner = running is None
            if running is None:
                running = Future()
                self._staging[key] = running
        if not owner:
            return _reused(running.result())
        try:
            pending = self.start_stage(experiment, version, relative_source_path, sha256)
            self.wait(pending)
            staged = StagedFile(
                local_path=_join(self.config.site_local_path, relative),
                globus_path=_join(self.config.site_path, relative),
                relative_path=relative,
                sha256=sha256,
                size_bytes=size,
                globus_task_id=pending.globus_task_id,
            )
        except BaseException as exc:
            with self._lock:
                self._staging.pop(key, None)
            # Callers that joined this stage get the same failure; the next call starts afresh.
            running.set_exception(exc)
            raise
        with self._lock:
            self._staged[key] = staged
            self._staging.pop(key, None)
        running.set_result(staged)
        log.info(
            "model staged through Globus Transfer",
            extra={
                "site": self.site,
                "experiment": experiment,
                "version": version,
                "path": staged.local_path,
            },
        )
        return staged

    def fetch_update(
        self, task_id: str, site_relative_path: str, object_key: str | None = None
    ) -> FetchedFile:
        """Copy the trainer's update at ``site_path/<site_relative_path>`` into the object store
        as ``object_key`` (default: the same relative path) and wait for it. Returns where it
        landed. Raises :class:`TransferFailed` (``direction="fetch"``)."""
        pending = self.start_fetch(task_id, site_relative_path, object_key)
        self.wait(pending)
        key = object_key or site_relative_path
        return FetchedFile(
            object_key=key,
            globus_path=_join(self.config.source_path, key),
            globus_task_id=pending.globus_task_id,
        )

    # -- non-blocking building blocks --------------------------------------------------------------
    def start_stage(
        self, experiment: str, version: str, relative_source_path: str, sha256: str
    ) -> PendingTransfer:
        """Submit the staging transfer and return without waiting (no caching, no joining):
        for an engine that polls instead of blocking. Poll it with :meth:`poll`."""
        relative = self.model_location(experiment, version, relative_source_path)
        return self._submit(
            "stage",
            source=_join(self.config.source_path, relative_source_path),
            destination=_join(self.config.site_path, relative),
            label=_label(self.config.label_prefix, "stage", self.site, experiment, version),
            external_checksum=sha256 if self.config.external_checksum else None,
        )

    def start_fetch(
        self, task_id: str, site_relative_path: str, object_key: str | None = None
    ) -> PendingTransfer:
        """Submit the update's transfer back to the object store and return without waiting."""
        relative = _check_relative("site_relative_path", site_relative_path)
        key = _check_relative("object_key", object_key or relative)
        return self._submit(
            "fetch",
            source=_join(self.config.site_path, relative),
            destination=_join(self.config.source_path, key),
            label=_label(self.config.label_prefix, "fetch", self.site, task_id),
            external_checksum=None,
        )

    def poll(self, pending: PendingTransfer) -> bool:
        """Look at the task once: True when it SUCCEEDED, False while it runs. Raises
        :class:`TransferFailed` when it FAILED, when a fault needing a human outlasted
        ``fault_grace_s`` or when ``timeout_s`` passed (both cancel the task)."""
        import globus_sdk

        now = self._clock()
        pending.polls += 1
        try:
            task = self.client.get_task(pending.globus_task_id).data
        except globus_sdk.GlobusAPIError as exc:
            if exc.http_status in (401, 403, 404):
                raise self._api_failure(exc, pending.direction, "look up", pending.globus_task_id) from exc
            # 5xx after the SDK's own retries: the service is having a bad moment; keep waiting.
            log.warning("polling Globus task %s failed: %s", pending.globus_task_id, exc)
            task = None
        except globus_sdk.NetworkError as exc:
            log.warning("polling Globus task %s failed: %s", pending.globus_task_id, exc)
            task = None
        if task is not None:
            status = str(task.get("status") or "")
            if status == "SUCCEEDED":
                pending.last_status = "SUCCEEDED"
                return True
            pending.last_status = explain_status(task)
            if status == "FAILED":
                raise TransferFailed(
                    TransferErrorCode.TRANSFER_FAILED,
                    f"Globus transfer {pending.globus_task_id} ({pending.label}: {pending.source} -> "
                    f"{pending.destination}) FAILED: {_fatal(task)}; {pending.last_status}",
                    direction=pending.direction,
                    globus_task_id=pending.globus_task_id,
                )
            if _needs_human(task):
                if pending.fault_since is None:
                    pending.fault_since = now
                    log.warning(
                        "Globus task %s: %s",
                        pending.globus_task_id,
                        pending.last_status,
                        extra={"site": self.site},
                    )
                if now - pending.fault_since >= self.config.fault_grace_s:
                    cancelled = self._cancel(pending)
                    raise TransferFailed(
                        TransferErrorCode.TRANSFER_FAILED,
                        f"Globus transfer {pending.globus_task_id} ({pending.source} -> {pending.destination}) "
                        f"stuck for {now - pending.fault_since:.0f} s: {pending.last_status}; {cancelled}",
                        direction=pending.direction,
                        globus_task_id=pending.globus_task_id,
                    )
            else:
                pending.fault_since = None
        if now >= pending.deadline_at:
            cancelled = self._cancel(pending)
            raise TransferFailed(
                TransferErrorCode.TRANSFER_TIMEOUT,
                f"Globus transfer {pending.globus_task_id} ({pending.source} -> {pending.destination}) did "
                f"not finish within {self.config.timeout_s:.0f} s (globus_transfer.timeout_s); last seen: "
                f"{pending.last_status or 'no status'}; {cancelled}",
                direction=pending.direction,
                globus_task_id=pending.globus_task_id,
            )
        return False

    def wait(self, pending: PendingTransfer) -> None:
        """Poll every ``poll_interval_s`` until the task SUCCEEDED; raises like :meth:`poll`."""
        while not self.poll(pending):
            remaining = pending.deadline_at - self._clock()
            # Never sleep past the deadline: the timeout is checked on the next poll.
            self._sleep(max(0.0, min(self.config.poll_interval_s, remaining)))

    def forget(self, experiment: str | None = None) -> None:
        """Drop the record of staged versions (of one experiment, or all), e.g. after a trainer
        reported the staged file missing (scratch purge): the next stage transfers again."""
        with self._lock:
            for key in [k for k in self._staged if experiment is None or k[0] == experiment]:
                del self._staged[key]

    # -- internals -------------------------------------------------------------------------------
    def _submit(
        self,
        direction: Direction,
        *,
        source: str,
        destination: str,
        label: str,
        external_checksum: str | None,
    ) -> PendingTransfer:
        import globus_sdk

        cfg = self.config
        if direction == "stage":
            src_coll, dst_coll = str(cfg.source_collection), str(cfg.site_collection)
        else:
            src_coll, dst_coll = str(cfg.site_collection), str(cfg.source_collection)
        now = self._clock()
        deadline_at = now + cfg.timeout_s
        data = globus_sdk.TransferData(
            source_endpoint=src_coll,
            destination_endpoint=dst_coll,
            label=label,
            # Checksum sync: an unchanged destination file (a re-staged version) moves no bytes.
            sync_level="checksum",
            verify_checksum=cfg.verify_checksum,
            encrypt_data=cfg.encrypt_data,
            # Globus gives up by itself a little after us, even if this coordinator is gone.
            deadline=datetime.fromtimestamp(deadline_at + 60, UTC).isoformat(timespec="seconds"),
            # A full quota must fail the task, not leave it retrying until the deadline.
            fail_on_quota_errors=True,
            # A service account has no mailbox; tasks end up in our logs and task results.
            notify_on_succeeded=False,
            notify_on_failed=False,
            notify_on_inactive=False,
        )
        if external_checksum is not None:
            data.add_item(
                source, destination, external_checksum=external_checksum, checksum_algorithm="SHA256"
            )
        else:
            data.add_item(source, destination)
        try:
            response = self.client.submit_transfer(data)
        except globus_sdk.GlobusAPIError as exc:
            raise self._api_failure(exc, direction, "submit", None) from exc
        except globus_sdk.NetworkError as exc:
            raise TransferFailed(
                TransferErrorCode.TRANSFER_FAILED,
                f"cannot reach Globus Transfer to submit {label!r}: {exc}",
                direction=direction,
            ) from exc
        task_id = str(response["task_id"])
        log.info(
            "Globus transfer submitted",
            extra={"site": self.site, "globus_task": task_id, "source": source, "destination": destination},
        )
        return PendingTransfer(
            globus_task_id=task_id,
            direction=direction,
            label=label,
            source=f"{src_coll}:{source}",
            destination=f"{dst_coll}:{destination}",
            submitted_at=now,
            deadline_at=deadline_at,
        )

    def _cancel(self, pending: PendingTransfer) -> str:
        import globus_sdk

        try:
            self.client.cancel_task(pending.globus_task_id)
        except (globus_sdk.GlobusAPIError, globus_sdk.NetworkError) as exc:
            log.warning("cancelling Globus task %s failed: %s", pending.globus_task_id, exc)
            return f"cancelling the task failed ({exc}); cancel it with `globus task cancel {pending.globus_task_id}`"
        return "the task was cancelled"

    def _api_failure(
        self, exc: globus_sdk.GlobusAPIError, direction: Direction, doing: str, task_id: str | None
    ) -> TransferFailed:
        consent = exc.info.consent_required
        authz = exc.info.authorization_parameters
        if consent or exc.code == "ConsentRequired" or authz:
            scopes = list(consent.required_scopes) if consent else []
            return TransferFailed(
                TransferErrorCode.CONSENT_REQUIRED,
                _consent_message(exc, scopes, self.config.data_access, doing),
                direction=direction,
                globus_task_id=task_id,
                required_scopes=scopes,
            )
        hint = ""
        if exc.http_status == 404 or "NotFound" in str(exc.code):
            hint = (
                "; check globus_transfer.source_collection and site_collection (collection ids, "
                "not endpoint ids) and the paths"
            )
        elif exc.http_status in (401, 403):
            hint = (
                "; the client identity (<client id>@clients.auth.globus.org) needs access to both collections"
            )
        return TransferFailed(
            TransferErrorCode.TRANSFER_FAILED,
            f"Globus Transfer refused to {doing} the {direction} transfer: HTTP {exc.http_status} "
            f"{exc.code}: {_clip(exc.message or exc.text)}{hint}",
            direction=direction,
            globus_task_id=task_id,
        )


def _reused(staged: StagedFile) -> StagedFile:
    return StagedFile(
        local_path=staged.local_path,
        globus_path=staged.globus_path,
        relative_path=staged.relative_path,
        sha256=staged.sha256,
        size_bytes=staged.size_bytes,
        globus_task_id=staged.globus_task_id,
        reused=True,
    )


def _fatal(task: Mapping[str, Any]) -> str:
    fatal = task.get("fatal_error")
    if isinstance(fatal, Mapping):
        code = str(fatal.get("code") or "")
        description = _clip(str(fatal.get("description") or ""))
        return f"{code}: {description}" if code and description else code or description or "no reason given"
    return "no reason given"


def _consent_message(exc: globus_sdk.GlobusAPIError, scopes: list[str], data_access: bool, doing: str) -> str:
    authz = exc.info.authorization_parameters
    parts = [f"Globus Transfer cannot {doing} the transfer without more authorization ({exc.code})"]
    if scopes:
        parts.append(f"consent is required for the scope(s): {', '.join(scopes)}")
        if not data_access and any("data_access" in s for s in scopes):
            parts.append(
                "set globus_transfer.data_access: true so that the coordinator's client requests "
                "the collections' data_access scope with its token (GCS v5 mapped collections)"
            )
        else:
            parts.append(
                "a client-credentials app gets consent by requesting these scopes with its token; for a "
                f"user login run: globus session consent '{scopes[0]}'"
            )
    if authz:
        wanted = []
        if authz.session_message:
            wanted.append(authz.session_message)
        if authz.session_required_identities:
            wanted.append(f"identities {', '.join(authz.session_required_identities)}")
        if authz.session_required_single_domain:
            wanted.append(f"an identity from {', '.join(authz.session_required_single_domain)}")
        if authz.session_required_policies:
            wanted.append(f"authentication policies {', '.join(authz.session_required_policies)}")
        if authz.session_required_mfa:
            wanted.append("multi-factor authentication")
        if wanted:
            parts.append(
                "the collection requires a session with " + "; ".join(wanted) + " (a high-assurance "
                "collection may not accept a client identity at all: use a guest collection)"
            )
    if len(parts) == 1:
        parts.append(_clip(exc.message or exc.text))
    return "; ".join(parts)
