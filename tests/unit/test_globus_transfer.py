"""The Globus Transfer transport (coordinator/transfer.py) against a MOCKED Globus Transfer service.

The Globus cloud cannot be reached from here. Every test serves the Transfer (and, for the
credential tests, the Auth) REST API from registered HTTP responses: the stock
``globus_sdk.testing`` fixtures where they exist (``get_submission_id``, ``submit_transfer``,
``oauth2_client_credentials_tokens``) and our own ``responses.add`` registrations for the rest
(``GET /task/<id>``, ``POST /task/<id>/cancel``, error bodies). What is tested is therefore the
requests we send and how we read the answers, not a live Globus service. Time is a fake clock:
no test sleeps for real.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import globus_sdk
import pytest
import responses
from globus_sdk.testing import load_response
from globus_sdk.transport import RetryConfig

from fedhpc.common.contracts import ErrorCode
from fedhpc.coordinator.transfer import (
    ENV_CLIENT_ID,
    ENV_CLIENT_SECRET,
    GlobusTransferConfig,
    GlobusTransferStager,
    TransferConfigError,
    TransferErrorCode,
    TransferFailed,
    build_transfer_client,
    explain_status,
    without_transfer_config,
)

TRANSFER = "https://transfer.api.globus.org/v0.10"
AUTH_TOKEN_URL = "https://auth.globus.org/v2/oauth2/token"
SOURCE = str(uuid.UUID(int=1))
SITE = str(uuid.UUID(int=2))
SHA = "ab" * 32
MODEL_KEY = "models/exp1/r0003/weights.safetensors"


class FakeClock:
    """Epoch seconds that only move when the code under test sleeps."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def mock_globus() -> Iterator[responses.RequestsMock]:
    # Its own mock: nothing registered here leaks into other tests, and an unregistered URL
    # fails the request instead of reaching the real Globus service.
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _config(**overrides: Any) -> GlobusTransferConfig:
    values: dict[str, Any] = {
        "source_collection": SOURCE,
        "source_path": "/fedhpc/store",
        "site_collection": SITE,
        "site_path": "/scratch/proj/fedhpc",
        "site_local_path": "/lus/scratch/proj/fedhpc",
        "timeout_s": 60,
        "poll_interval_s": 10,
        "fault_grace_s": 25,
    }
    values.update(overrides)
    return GlobusTransferConfig.from_mapping(values)


def _client() -> globus_sdk.TransferClient:
    # No SDK retries: an unexpected request fails at once rather than backing off for real.
    return globus_sdk.TransferClient(
        authorizer=globus_sdk.AccessTokenAuthorizer("test-token"), retry_config=RetryConfig(max_retries=0)
    )


def _stager(clock: FakeClock, **overrides: Any) -> GlobusTransferStager:
    return GlobusTransferStager(
        _config(**overrides), client=_client(), site="site-a", clock=clock, sleep=clock.sleep
    )


def _accept_transfers(rsps: responses.RequestsMock) -> str:
    """The stock fixtures for a submission: returns the Globus task id they hand out."""
    load_response("transfer.get_submission_id", requests_mock=rsps)
    submitted = load_response("transfer.submit_transfer", requests_mock=rsps)
    return str(submitted.metadata["task_id"])


def _task_doc(task_id: str, status: str, nice_status: str | None = "OK", **extra: Any) -> dict[str, Any]:
    # The fields of a Transfer task document that the transport reads (there is no stock fixture).
    return {
        "DATA_TYPE": "task",
        "task_id": task_id,
        "type": "TRANSFER",
        "status": status,
        "nice_status": nice_status,
        "nice_status_short_description": nice_status,
        "nice_status_details": None,
        "is_paused": False,
        "fatal_error": None,
        "files": 1,
        "bytes_transferred": 0,
        **extra,
    }


def _task_states(rsps: responses.RequestsMock, task_id: str, *docs: dict[str, Any]) -> None:
    """GET /task/<id> answers with these documents in order (the last one repeats)."""
    for doc in docs:
        rsps.add(responses.GET, f"{TRANSFER}/task/{task_id}", json=doc)


def _calls(rsps: responses.RequestsMock, method: str, path: str) -> list[Any]:
    return [
        c for c in rsps.calls if c.request.method == method and c.request.url.split("?")[0] == TRANSFER + path
    ]


def _submitted(rsps: responses.RequestsMock) -> list[dict[str, Any]]:
    return [json.loads(c.request.body) for c in _calls(rsps, "POST", "/transfer")]


# -- staging the global model --------------------------------------------------------------------


def test_stage_model_submits_a_checksum_transfer_to_the_mocked_globus_transfer_service(
    mock_globus: responses.RequestsMock, clock: FakeClock
) -> None:
    task_id = _accept_transfers(mock_globus)
    _task_states(mock_globus, task_id, _task_doc(task_id, "SUCCEEDED"))

    staged = _stager(clock).stage_model("exp1", "r0003", MODEL_KEY, SHA, 1234)

    assert staged.local_path == "/lus/scratch/proj/fedhpc/models/exp1/r0003/weights.safetensors"
    assert staged.globus_path == "/scratch/proj/fedhpc/models/exp1/r0003/weights.safetensors"
    assert (staged.sha256, staged.size_bytes, staged.globus_task_id, staged.reused) == (
        SHA,
        1234,
        task_id,
        False,
    )
    [doc] = _submitted(mock_globus)
    assert doc["DATA_TYPE"] == "transfer"
    assert doc["source_endpoint"] == SOURCE
    assert doc["destination_endpoint"] == SITE
    [item] = doc["DATA"]
    assert item["source_path"] == f"/fedhpc/store/{MODEL_KEY}"
    assert item["destination_path"] == staged.globus_path
    assert "external_checksum" not in item
    assert doc["sync_level"] == 3  # "checksum" on the wire
    assert doc["verify_checksum"] is True
    assert doc["label"] == "fedhpc stage site-a exp1 r0003"
    assert doc["fail_on_quota_errors"] is True
    assert doc["notify_on_succeeded"] is False
    # The submission id came from the service (stock fixture), and Globus gets a deadline of its own.
    assert doc["submission_id"] == load_response("transfer.get_submission_id").metadata["submission_id"]
    assert doc["deadline"].startswith("2023-11-14T22:")
    assert all(c.request.headers["Authorization"] == "Bearer test-token" for c in mock_globus.calls)


def test_stage_model_polls_the_mocked_globus_task_until_succeeded(
    mock_globus: responses.RequestsMock, clock: FakeClock
) -> None:
    task_id = _accept_transfers(mock_globus)
    _task_states(
        mock_globus,
        task_id,
        _task_doc(task_id, "ACTIVE", "Queued"),
        _task_doc(task_id, "ACTIVE", "OK", bytes_transferred=512),
        _task_doc(task_id, "SUCCEEDED", None, bytes_transferred=1234),
    )

    staged = _stager(clock).stage_model("exp1", "r0003", MODEL_KEY, SHA, 1234)

    assert staged.globus_task_id == task_id
    assert len(_calls(mock_globus, "GET", f"/task/{task_id}")) == 3
    assert clock.sleeps == [10, 10]  # poll_interval_s between polls, nothing after success
    assert not _calls(mock_globus, "POST", f"/task/{task_id}/cancel")


def test_external_checksum_asks_the_mocked_globus_service_to_check_the_registry_sha256(
    mock_globus: responses.RequestsMock, clock: FakeClock
) -> None:
    task_id = _accept_transfers(mock_globus)
    _task_states(mock_globus, task_id, _task_doc(task_id, "SUCCEEDED"))

    _stager(clock, external_checksum=True, verify_checksum=False, encrypt_data=True).stage_model(
        "exp1", "r0003", MODEL_KEY, SHA, 1234
    )

    [doc] = _submitted(mock_globus)
    assert doc["verify_checksum"] is False
    assert doc["encrypt_data"] is True
    assert doc["DATA"][0]["external_checksum"] == SHA
    assert doc["DATA"][0]["checksum_algorithm"] == "SHA256"


def test_failed_globus_task_is_transfer_failed_with_the_reason_from_the_mocked_service(
    mock_globus: responses.RequestsMock, clock: FakeClock
) -> None:
    task_id = _accept_transfers(mock_globus)
    _task_states(
        mock_globus,
        task_id,
        _task_doc(task_id, "ACTIVE"),
        _task_doc(
            task_id,
            "FAILED",
            "FILE_NOT_FOUND",
            fatal_error={
                "code": "FILE_NOT_FOUND",
                "description": "No such file or directory: weights.safetensors",
            },
        ),
    )
    stager = _stager(clock)

    with pytest.raises(TransferFailed) as caught:
        stager.stage_model("exp1", "r0003", MODEL_KEY, SHA, 1234)

    err = caught.value
    assert err.code is TransferErrorCode.TRANSFER_FAILED
    assert err.globus_task_id == task_id
    assert err.direction == "stage"
    assert err.task_error_code is ErrorCode.DISPATCH_FAILED
    assert str(err).startswith("TRANSFER_FAILED: Globus transfer")
    assert "FAILED: FILE_NOT_FOUND: No such file or directory: weights.safetensors" in err.message
    assert "the source file does not exist" in err.message
    assert f"{SOURCE}:/fedhpc/store/{MODEL_KEY}" in err.message
    # A failure is not remembered as staged: the next task of the site tries again.
    _task_states(mock_globus, task_id, _task_doc(task_id, "SUCCEEDED"))
    stager.stage_model("exp1", "r0003", MODEL_KEY, SHA, 1234)
    assert len(_submitted(mock_globus)) == 2


def test_consent_required_from_the_mocked_globus_service_names_the_scopes(
    mock_globus: responses.RequestsMock, clock: FakeClock
) -> None:
    load_response("transfer.get_submission_id", requests_mock=mock_globus)
    scope = f"urn:globus:auth:scope:transfer.api.globus.org:all[*https://auth.globus.org/scopes/{SITE}/data_access]"
    mock_globus.add(
        responses.POST,
        f"{TRANSFER}/transfer",
        status=403,
        json={
            "code": "ConsentRequired",
            "message": "Missing required data_access consent",
            "request_id": "abc123",
            "resource": "/v0.10/transfer",
            "required_scopes": [scope],
        },
    )

    with pytest.raises(TransferFailed) as caught:
        _stager(clock).stage_model("exp1", "r0003", MODEL_KEY, SHA, 1234)

    err = caught.value
    assert err.code is TransferErrorCode.CONSENT_REQUIRED
    assert err.required_scopes == (scope,)
    assert scope in err.message
    assert "globus_transfer.data_access: true" in err.message
    assert err.globus_task_id is None
    assert not _calls(mock_globus, "GET", "/task")  # nothing was submitted, nothing to poll


def test_authorization_parameters_from_the_mocked_globus_service_are_consent_required(
    mock_globus: responses.RequestsMock, clock: FakeClock
) -> None:
    load_response("transfer.get_submission_id", requests_mock=mock_globus)
    mock_globus.add(
        responses.POST,
        f"{TRANSFER}/transfer",
        status=403,
        json={
            "code": "AuthorizationRequired",
            "message": "The collection requires a recent login",
            "request_id": "abc124",
            "authorization_parameters": {
                "session_message": "This collection needs a login from the facility",
                "session_required_single_domain": ["facility.gov"],
            },
        },
    )

    with pytest.raises(TransferFailed) as caught:
        _stager(clock).stage_model("exp1", "r0003", MODEL_KEY, SHA, 1234)

    assert caught.value.code is TransferErrorCode.CONSENT_REQUIRED
    assert "an identity from facility.gov" in caught.value.message
    assert "This collection needs a login from the facility" in caught.value.message


def test_timeout_cancels_the_task_at_the_mocked_globus_service(
    mock_globus: responses.RequestsMock, clock: FakeClock
) -> None:
    task_id = _accept_transfers(mock_globus)
    _task_states(mock_globus, task_id, _task_doc(task_id, "ACTIVE", "CONNECT_FAILED"))
    mock_globus.add(
        responses.POST,
        f"{TRANSFER}/task/{task_id}/cancel",
        json={
            "DATA_TYPE": "result",
            "code": "Canceled",
            "message": "The task has been cancelled successfully.",
        },
    )
    start = clock.now

    with pytest.raises(TransferFailed) as caught:
        _stager(clock, timeout_s=25, poll_interval_s=10).stage_model("exp1", "r0003", MODEL_KEY, SHA, 1234)

    err = caught.value
    assert err.code is TransferErrorCode.TRANSFER_TIMEOUT
    assert err.globus_task_id == task_id
    assert len(_calls(mock_globus, "POST", f"/task/{task_id}/cancel")) == 1
    assert "within 25 s" in err.message and "the task was cancelled" in err.message
    # The last status seen explains why (a transient fault Globus kept retrying).
    assert "CONNECT_FAILED" in err.message and "cannot connect" in err.message
    # Sleeps never overshoot the deadline: 10 + 10 + 5, then the final poll.
    assert clock.sleeps == [10, 10, 5]
    assert clock.now - start == 25


def test_persistent_permission_denied_fails_before_the_timeout_and_cancels_at_the_mocked_service(
    mock_globus: responses.RequestsMock, clock: FakeClock
) -> None:
    task_id = _accept_transfers(mock_globus)
    _task_states(
        mock_globus,
        task_id,
        _task_doc(task_id, "ACTIVE", "Queued"),
        _task_doc(task_id, "ACTIVE", "PERMISSION_DENIED", nice_status_details="550 Permission denied"),
    )
    mock_globus.add(responses.POST, f"{TRANSFER}/task/{task_id}/cancel", json={"code": "Canceled"})

    with pytest.raises(TransferFailed) as caught:
        # Globus would retry PERMISSION_DENIED until its deadline; fault_grace_s=25 cuts it short.
        _stager(clock, timeout_s=600).stage_model("exp1", "r0003", MODEL_KEY, SHA, 1234)

    err = caught.value
    assert err.code is TransferErrorCode.TRANSFER_FAILED
    assert "PERMISSION_DENIED" in err.message and "needs read access" in err.message
    assert "550 Permission denied" in err.message
    assert len(_calls(mock_globus, "POST", f"/task/{task_id}/cancel")) == 1
    assert sum(clock.sleeps) == 40  # first seen after 10 s, failed 30 s later (> 25 s grace)


def test_collection_not_found_at_submit_is_a_clear_transfer_failure_from_the_mocked_service(
    mock_globus: responses.RequestsMock, clock: FakeClock
) -> None:
    load_response("transfer.get_submission_id", requests_mock=mock_globus)
    mock_globus.add(
        responses.POST,
        f"{TRANSFER}/transfer",
        status=404,
        json={"code": "EndpointNotFound", "message": f"No such endpoint '{SITE}'", "request_id": "x1"},
    )

    with pytest.raises(TransferFailed) as caught:
        _stager(clock).stage_model("exp1", "r0003", MODEL_KEY, SHA, 1234)

    assert caught.value.code is TransferErrorCode.TRANSFER_FAILED
    assert "HTTP 404 EndpointNotFound" in caught.value.message
    assert "check globus_transfer.source_collection and site_collection" in caught.value.message


# -- idempotency -----------------------------------------------------------------------------------


def test_staging_a_version_again_submits_nothing_to_the_mocked_globus_service(
    mock_globus: responses.RequestsMock, clock: FakeClock
) -> None:
    task_id = _accept_transfers(mock_globus)
    _task_states(mock_globus, task_id, _task_doc(task_id, "SUCCEEDED"))
    stager = _stager(clock)

    first = stager.stage_model("exp1", "r0003", MODEL_KEY, SHA, 1234)
    again = stager.stage_model("exp1", "r0003", MODEL_KEY, SHA, 1234)

    assert len(_submitted(mock_globus)) == 1
    assert again.reused and not first.reused
    assert again.local_path == first.local_path and again.globus_task_id == first.globus_task_id
    # Another version is another path and another transfer; forget() re-stages a version.
    other = stager.stage_model("exp1", "r0004", "models/exp1/r0004/weights.safetensors", SHA, 1234)
    assert other.local_path.endswith("/models/exp1/r0004/weights.safetensors")
    stager.forget("exp1")
    stager.stage_model("exp1", "r0003", MODEL_KEY, SHA, 1234)
    submitted = _submitted(mock_globus)
    assert len(submitted) == 3
    # Deterministic destination: the same version goes to the same path every time.
    assert submitted[0]["DATA"] == submitted[2]["DATA"]


def test_concurrent_stages_of_one_version_share_one_task_at_the_mocked_globus_service(
    mock_globus: responses.RequestsMock,
) -> None:
    task_id = _accept_transfers(mock_globus)
    _task_states(mock_globus, task_id, _task_doc(task_id, "ACTIVE"), _task_doc(task_id, "SUCCEEDED"))
    second_started = threading.Event()

    def sleep(_: float) -> None:
        # Hold the first stage in flight until the second caller has had time to join it.
        second_started.wait(5)
        time.sleep(0.05)

    stager = GlobusTransferStager(_config(), client=_client(), sleep=sleep)
    results: dict[str, Any] = {}

    def stage(name: str) -> None:
        results[name] = stager.stage_model("exp1", "r0003", MODEL_KEY, SHA, 1234)

    first = threading.Thread(target=stage, args=("first",))
    first.start()
    while not _submitted(mock_globus):
        time.sleep(0.005)
    second = threading.Thread(target=stage, args=("second",))
    second.start()
    second_started.set()
    first.join(5)
    second.join(5)

    assert len(_submitted(mock_globus)) == 1
    assert results["first"].local_path == results["second"].local_path
    assert results["second"].reused


# -- the update, back to the object store -----------------------------------------------------------


def test_fetch_update_transfers_from_the_site_to_the_store_at_the_mocked_globus_service(
    mock_globus: responses.RequestsMock, clock: FakeClock
) -> None:
    task_id = _accept_transfers(mock_globus)
    _task_states(mock_globus, task_id, _task_doc(task_id, "ACTIVE"), _task_doc(task_id, "SUCCEEDED"))
    stager = _stager(clock)
    key = "updates/exp1/r0004/exp1.r0004-site-a-a1.safetensors"

    where = stager.update_location(key)
    fetched = stager.fetch_update("exp1.r0004-site-a-a1", where.relative_path, object_key=key)

    assert where.local_path == f"/lus/scratch/proj/fedhpc/{key}"  # the trainer's UpdateTarget.path
    assert where.globus_path == f"/scratch/proj/fedhpc/{key}"
    assert fetched.object_key == key
    assert fetched.globus_path == f"/fedhpc/store/{key}"
    assert fetched.globus_task_id == task_id
    [doc] = _submitted(mock_globus)
    assert (doc["source_endpoint"], doc["destination_endpoint"]) == (SITE, SOURCE)
    assert doc["DATA"][0]["source_path"] == where.globus_path
    assert doc["DATA"][0]["destination_path"] == f"/fedhpc/store/{key}"
    assert doc["sync_level"] == 3 and doc["verify_checksum"] is True
    assert doc["label"] == "fedhpc fetch site-a exp1_r0004-site-a-a1"


def test_failed_update_fetch_maps_to_upload_failed_with_the_mocked_globus_service(
    mock_globus: responses.RequestsMock, clock: FakeClock
) -> None:
    task_id = _accept_transfers(mock_globus)
    _task_states(
        mock_globus,
        task_id,
        _task_doc(task_id, "FAILED", fatal_error={"code": "ENDPOINT_ERROR", "description": "disk failure"}),
    )

    with pytest.raises(TransferFailed) as caught:
        _stager(clock).fetch_update("t1", "updates/exp1/r0004/t1.safetensors")

    assert caught.value.direction == "fetch"
    assert caught.value.task_error_code is ErrorCode.UPLOAD_FAILED
    assert "ENDPOINT_ERROR: disk failure" in caught.value.message


# -- credentials ------------------------------------------------------------------------------------


def test_missing_credentials_are_a_clear_error_before_any_request_to_globus(
    mock_globus: responses.RequestsMock, clock: FakeClock
) -> None:
    stager = GlobusTransferStager(_config(), env={}, clock=clock, sleep=clock.sleep)

    with pytest.raises(TransferFailed) as caught:
        stager.stage_model("exp1", "r0003", MODEL_KEY, SHA, 1234)

    err = caught.value
    assert err.code is TransferErrorCode.CREDENTIALS_MISSING
    assert f"{ENV_CLIENT_ID} and {ENV_CLIENT_SECRET} are not set" in err.message
    assert not mock_globus.calls
    with pytest.raises(TransferFailed, match=f"{ENV_CLIENT_SECRET} is not set"):
        build_transfer_client(env={ENV_CLIENT_ID: "abc"})


def test_credentials_from_env_use_the_client_credentials_grant_with_mocked_globus_auth(
    mock_globus: responses.RequestsMock, clock: FakeClock
) -> None:
    token = load_response("auth.oauth2_client_credentials_tokens", requests_mock=mock_globus)
    task_id = _accept_transfers(mock_globus)
    _task_states(mock_globus, task_id, _task_doc(task_id, "SUCCEEDED"))
    env = {ENV_CLIENT_ID: str(uuid.UUID(int=9)), ENV_CLIENT_SECRET: "s3cret"}
    stager = GlobusTransferStager(_config(data_access=True), env=env, clock=clock, sleep=clock.sleep)

    stager.stage_model("exp1", "r0003", MODEL_KEY, SHA, 1234)

    [grant] = [c for c in mock_globus.calls if c.request.url == AUTH_TOKEN_URL]
    form = parse_qs(grant.request.body)
    assert form["grant_type"] == ["client_credentials"]
    [scope] = form["scope"]
    assert scope.startswith("urn:globus:auth:scope:transfer.api.globus.org:all[")
    assert f"https://auth.globus.org/scopes/{SOURCE}/data_access" in scope
    assert f"https://auth.globus.org/scopes/{SITE}/data_access" in scope
    assert grant.request.headers["Authorization"].startswith("Basic ")
    transfer_calls = [c for c in mock_globus.calls if c.request.url.startswith(TRANSFER)]
    assert transfer_calls
    assert all(
        c.request.headers["Authorization"] == f"Bearer {token.metadata['access_token']}"
        for c in transfer_calls
    )


def test_credentials_refused_by_mocked_globus_auth_are_credentials_invalid(
    mock_globus: responses.RequestsMock,
) -> None:
    mock_globus.add(responses.POST, AUTH_TOKEN_URL, status=401, json={"error": "invalid_client"})

    with pytest.raises(TransferFailed) as caught:
        build_transfer_client(client_id=str(uuid.UUID(int=9)), client_secret="wrong", env={})

    assert caught.value.code is TransferErrorCode.CREDENTIALS_INVALID
    assert "HTTP 401" in caught.value.message and "check the client id and secret" in caught.value.message


# -- configuration and paths (no Globus service involved) ----------------------------------------------


def test_site_config_section_as_mapping_or_dotted_keys() -> None:
    nested = {
        "globus_transfer": {
            "source_collection": SOURCE,
            "source_path": "/store/",
            "site_collection": SITE,
            "site_path": "~/fedhpc",
            "site_local_path": "/home/u/fedhpc",
        },
        "endpoint_id": "x",
    }
    cfg = GlobusTransferConfig.from_site_config(nested)
    assert (str(cfg.source_collection), cfg.source_path, cfg.site_path) == (SOURCE, "/store", "~/fedhpc")
    assert (cfg.timeout_s, cfg.verify_checksum, cfg.label_prefix) == (1800.0, True, "fedhpc")

    # What `fedhpc sites add --set globus_transfer.KEY=VALUE` stores (numbers come back as floats
    # from a protobuf Struct); dotted keys override the mapping.
    dotted = {f"globus_transfer.{k}": v for k, v in nested["globus_transfer"].items()}
    dotted["globus_transfer.timeout_s"] = 600.0
    assert GlobusTransferConfig.from_site_config({**nested, **dotted}).timeout_s == 600.0
    assert without_transfer_config({**nested, **dotted}) == {"endpoint_id": "x"}


def test_config_errors_name_the_key() -> None:
    with pytest.raises(TransferConfigError) as caught:
        GlobusTransferConfig.from_site_config(
            {
                "globus_transfer": {
                    "source_collection": "not-a-uuid",
                    "source_path": "relative/dir",
                    "bogus": 1,
                },
                "globus_transfer.timeout_s": -1,
            }
        )
    message = str(caught.value)
    assert message.startswith("CONFIG_INVALID: ")
    assert isinstance(caught.value, ValueError)
    for key in (
        "globus_transfer.source_collection:",
        "globus_transfer.source_path: Value error, must be an absolute path",
        "globus_transfer.site_collection: Field required",
        "globus_transfer.site_path: Field required",
        "globus_transfer.site_local_path: Field required",
        "globus_transfer.timeout_s:",
        "globus_transfer.bogus: Extra inputs are not permitted",
    ):
        assert key in message
    with pytest.raises(TransferConfigError, match="globus_transfer: missing"):
        GlobusTransferConfig.from_site_config({"endpoint_id": "x"})


def test_paths_refuse_traversal_and_bad_segments(clock: FakeClock) -> None:
    stager = _stager(clock)
    with pytest.raises(ValueError, match="object_key"):
        stager.update_location("updates/../../etc/passwd")
    with pytest.raises(ValueError, match="version"):
        stager.model_location("exp1", "../r1", MODEL_KEY)
    with pytest.raises(ValueError, match="relative_source_path"):
        stager.model_location("exp1", "r1", "/abs/weights.safetensors")
    assert _config(site_path="/").site_path == "/"
    assert (
        GlobusTransferStager(_config(site_path="/"), client=_client()).update_location("u/x").globus_path
        == "/u/x"
    )


def test_explain_status_describes_faults() -> None:
    assert explain_status({"status": "ACTIVE", "nice_status": "OK"}) == "status ACTIVE, nice_status OK"
    assert "needs read access" in explain_status({"status": "ACTIVE", "nice_status": "PERMISSION_DENIED"})
    assert "INACTIVE" in explain_status({"status": "INACTIVE", "nice_status": None})
    assert "paused" in explain_status({"status": "ACTIVE", "nice_status": "OK", "is_paused": True})
    odd = explain_status(
        {"status": "ACTIVE", "nice_status": "SOMETHING_NEW", "nice_status_short_description": "odd"}
    )
    assert odd == "status ACTIVE, nice_status SOMETHING_NEW (odd)"
