"""Config: YAML + FEDHPC_* environment, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedhpc.common.config import (
    ConfigError,
    FileStoreConfig,
    S3StoreConfig,
    env_overrides,
    load_config,
)

YAML = """
store:
  kind: s3
  endpoint: 127.0.0.1:9000
  access_key: fedhpc
  secret_key: s3cret
registry:
  server:
    host: 0.0.0.0
    port: 6000
    metrics_port: 9101
    auth:
      enabled: true
      admin_tokens: [admin-1]
      site_tokens:
        - {token: site-tok, site: polaris, experiment: exp-1}
log:
  level: DEBUG
  json: false
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fedhpc.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_environment() -> None:
    config = load_config(env={})
    assert isinstance(config.store, FileStoreConfig)
    assert config.registry.server.port == 50051
    assert config.registry.server.auth.enabled is False
    assert config.log.json_format is True


def test_yaml_file_is_loaded(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, YAML), env={})
    assert isinstance(config.store, S3StoreConfig)
    assert config.store.secret_key.get_secret_value() == "s3cret"
    server = config.registry.server
    assert (server.host, server.port, server.metrics_port) == ("0.0.0.0", 6000, 9101)
    assert [t.get_secret_value() for t in server.auth.admin_tokens] == ["admin-1"]
    (site,) = server.auth.site_tokens
    assert (site.site, site.experiment, site.token.get_secret_value()) == ("polaris", "exp-1", "site-tok")
    assert (config.log.level, config.log.json_format) == ("DEBUG", False)


def test_config_file_from_fedhpc_config_variable(tmp_path: Path) -> None:
    path = _write(tmp_path, "registry: {server: {port: 7000}}\n")
    assert load_config(env={"FEDHPC_CONFIG": str(path)}).registry.server.port == 7000


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    env = {"FEDHPC_REGISTRY__SERVER__PORT": "6500", "FEDHPC_STORE__BUCKET": "models"}
    config = load_config(_write(tmp_path, YAML), env=env)
    assert config.registry.server.port == 6500
    assert config.registry.server.host == "0.0.0.0"  # the rest of the section stays
    assert isinstance(config.store, S3StoreConfig) and config.store.bucket == "models"


def test_environment_lists_keep_scalars_as_strings() -> None:
    env = {
        "FEDHPC_REGISTRY__SERVER__AUTH__ENABLED": "true",
        "FEDHPC_REGISTRY__SERVER__AUTH__ADMIN_TOKENS": "[0042, tok-b]",
        "FEDHPC_REGISTRY__SERVER__AUTH__SITE_TOKENS": "[{token: '7', site: aurora}]",
    }
    auth = load_config(env=env).registry.server.auth
    assert auth.enabled is True
    assert [t.get_secret_value() for t in auth.admin_tokens] == ["0042", "tok-b"]
    assert auth.site_tokens[0].token.get_secret_value() == "7" and auth.site_tokens[0].experiment == "*"


def test_env_overrides_tree_and_non_config_variables() -> None:
    env = {
        "FEDHPC_STORE__KIND": "file",
        "FEDHPC_LOG__LEVEL": "ERROR",
        # Client/CLI settings share the prefix but have no "__": never config keys.
        "FEDHPC_TOKEN": "x",
        "FEDHPC_REGISTRY": "127.0.0.1:50051",
        "FEDHPC_CONFIG": "/nowhere.yaml",
        "PATH": "/bin",
    }
    assert env_overrides(env) == {"store": {"kind": "file"}, "log": {"level": "ERROR"}}
    assert load_config(env={k: v for k, v in env.items() if k != "FEDHPC_CONFIG"}).log.level == "ERROR"


def test_bad_yaml_list_in_environment() -> None:
    with pytest.raises(ConfigError, match="FEDHPC_REGISTRY__SERVER__AUTH__ADMIN_TOKENS"):
        load_config(env={"FEDHPC_REGISTRY__SERVER__AUTH__ADMIN_TOKENS": "[a, b"})


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "registry:\n  server:\n    prot: 5\n"), env={})
    assert "registry.server.prot" in str(err.value)
    assert str(tmp_path / "fedhpc.yaml") in str(err.value)


def test_wrong_type_is_named_with_its_variable() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={"FEDHPC_REGISTRY__SERVER__PORT": "fifty"})
    message = str(err.value)
    assert "registry.server.port" in message
    assert "valid integer" in message
    assert "FEDHPC_REGISTRY__SERVER__PORT" in message


def test_out_of_range_and_missing_keys_name_the_key_as_written(tmp_path: Path) -> None:
    text = "store: {kind: s3, access_key: a, secret_key: b}\nregistry: {server: {port: 70000}}\n"
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text), env={})
    message = str(err.value)
    assert "registry.server.port" in message
    # The union tag pydantic adds ("store.s3.endpoint") is not what the file says.
    assert "store.endpoint: Field required" in message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml", env={})


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml_is_a_config_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(_write(tmp_path, text), env={})


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "registry: {server: [\n"), env={})


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, ""), env={}).registry.server.port == 50051


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({"enabled": True}, "no admin_tokens or site_tokens"),
        ({"admin_tokens": ["a", "a"]}, "more than once"),
        ({"admin_tokens": ["a"], "site_tokens": [{"token": "a", "site": "s"}]}, "more than once"),
        ({"admin_tokens": [""]}, "registry.server.auth.admin_tokens"),
        ({"admin_tokens": ["has space"]}, "no whitespace"),
        ({"site_tokens": [{"token": "t", "site": ""}]}, "registry.server.auth.site_tokens.0.site"),
        ({"site_tokens": [{"token": "t"}]}, "registry.server.auth.site_tokens.0.site: Field required"),
    ],
)
def test_auth_config_mistakes_are_refused(auth: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=r"registry\.server\.auth") as err:
        load_config(env={}, overrides={"registry": {"server": {"auth": auth}}})
    assert expected in str(err.value)


def test_secrets_never_appear_in_errors(tmp_path: Path) -> None:
    text = "store: {kind: s3, endpoint: 'http://x:9000', access_key: a, secret_key: topsecret}\n"
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text), env={})
    assert "store.endpoint" in str(err.value)
    assert "topsecret" not in str(err.value)
    assert "topsecret" not in repr(
        load_config(env={}, overrides={"store": {**_s3(), "secret_key": "topsecret"}})
    )


def _s3() -> dict[str, str]:
    return {"kind": "s3", "endpoint": "127.0.0.1:9000", "access_key": "a", "secret_key": "b"}
