"""The Globus Compute endpoint templates (containers/endpoints/) and site_from_template.

Every template is rendered the way a multi-user endpoint renders it (the endpoint package's own
renderer, its schema check included; once through its `render-user-config` CLI), and the result
is loaded with the endpoint's own config loader into engine/provider objects. The network
interface is `lo` (RECIPES.md: an interface named in a config must exist where it loads).
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import globus_compute_endpoint  # noqa: F401  - the hpc extra: a missing package must fail, not skip
import jsonschema  # a dependency of globus-compute-endpoint
import pytest
from globus_compute_endpoint.endpoint.config import CoreEndpointConfig, UserEndpointConfig
from globus_compute_endpoint.endpoint.config.utils import (
    load_config_yaml,
    render_config_user_template,
)
from globus_compute_endpoint.endpoint.identity_mapper import MappedPosixIdentity
from globus_compute_endpoint.engines import GlobusComputeEngine
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment
from parsl.launchers import MpiExecLauncher, SrunLauncher
from parsl.providers import PBSProProvider, SlurmProvider

from fedhpc.coordinator import templates as tpl
from fedhpc.coordinator.templates import (
    TEMPLATES,
    TemplateError,
    parse_template_vars,
    render_template,
    site_from_template,
    validate_user_config,
)

ROOT = Path(__file__).resolve().parents[2]
ENDPOINTS = ROOT / "containers" / "endpoints"
SCHEMA_PATH = ENDPOINTS / "user_config_schema.json"
ENDPOINT_ID = "6f1c2a1e-8d4e-4b7a-9c3f-2d5e6f7a8b9c"

EXPECTED = {
    # template: (provider class, launcher class, GPU option, queue attribute)
    "polaris": (PBSProProvider, MpiExecLauncher, "--nv", "queue"),
    "aurora": (PBSProProvider, MpiExecLauncher, None, "queue"),
    "frontier": (SlurmProvider, SrunLauncher, "--rocm", "partition"),
    "perlmutter": (SlurmProvider, SrunLauncher, "--nv", "qos"),
}
PBS = ("polaris", "aurora")


@pytest.fixture(autouse=True)
def _templates_from_the_source_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tpl.TEMPLATES_DIR_ENV, raising=False)


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return loaded


def minimal_values() -> dict[str, Any]:
    return {
        "account": "MyProject",
        "image": "/lus/shared/fedhpc/trainer.sif",
        "data_dir": "/lus/shared/data",
        "interface": "lo",
    }


def full_values(template: str) -> dict[str, Any]:
    values: dict[str, Any] = {
        **minimal_values(),
        "queue": "debug",
        "walltime": "00:30:00",
        "nodes_per_block": 2,
        "init_blocks": 1,
        "min_blocks": 0,
        "max_blocks": 3,
        "max_workers_per_node": 2,
        "max_idletime": 600,
        "image": "docker://ghcr.io/example/fedhpc-trainer:0.1.0-cuda",
        "extra_binds": ["/lus/scratch/me:/scratch", "/lus/shared/ref:/ref:ro"],
        "apptainer_options": ["--cleanenv", "--env=OMP_NUM_THREADS=8"],
        # Free text: quotes, a colon-space and a hash must reach the shell verbatim.
        "worker_init": 'export FEDHPC_SITE=x\necho "a: b" # done',
    }
    if template in PBS:
        values["filesystems"] = "home:eagle:grand"
    if template == "perlmutter":
        values["constraint"] = "gpu&hbm80g"
    return values


def _render(template: str, values: dict[str, Any], schema: dict[str, Any] | None) -> str:
    """Render like the multi-user endpoint does (same function, same arguments)."""
    path = ENDPOINTS / TEMPLATES[template]
    identity = MappedPosixIdentity(
        local_user_record=pwd.getpwuid(os.getuid()),
        matched_identity=uuid.UUID(int=0),
        globus_identity_candidates=[],
    )
    rendered: str = render_config_user_template(
        parent_config=CoreEndpointConfig(),
        user_config_template=path.read_text(encoding="utf-8"),
        user_config_template_path=path,
        mapped_identity=identity,
        user_config_schema=schema,
        user_opts=values,
    )
    return rendered


@pytest.fixture
def loaded_engines() -> Iterator[list[GlobusComputeEngine]]:
    engines: list[GlobusComputeEngine] = []
    yield engines
    for engine in engines:
        engine.shutdown()


def _load(text: str, engines: list[GlobusComputeEngine]) -> tuple[UserEndpointConfig, GlobusComputeEngine]:
    config = load_config_yaml(text)
    assert isinstance(config, UserEndpointConfig)
    engine = config.engine
    assert isinstance(engine, GlobusComputeEngine)
    engines.append(engine)
    return config, engine


# -- the schema ----------------------------------------------------------------------------------


def test_schema_is_a_valid_json_schema(schema: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"account", "image", "data_dir"}
    for name, prop in schema["properties"].items():
        assert prop.get("description"), f"{name} needs a description (it is in every error message)"


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_sample_values_validate(schema: dict[str, Any], template: str) -> None:
    jsonschema.validate(minimal_values(), schema)
    jsonschema.validate(full_values(template), schema)


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("walltime", "1h"),
        ("walltime", "01:60:00"),
        ("walltime", "01:00"),
        ("walltime", 3600),
        ("account", "my project"),
        ("account", "x;rm -rf ~"),
        ("account", ""),
        ("queue", "prod\n#PBS -l select=100"),
        ("nodes_per_block", 0),
        ("nodes_per_block", "2"),
        ("nodes_per_block", 1.5),
        ("max_blocks", 0),
        ("max_idletime", -1),
        ("image", "trainer.sif"),
        ("image", "https://example.org/trainer.sif"),
        ("image", "/shared/my trainer.sif"),
        ("image", '/shared/t.sif" --bind /:/host "'),
        ("data_dir", "data"),
        ("data_dir", "/data;id"),
        ("extra_binds", "/scratch"),
        ("extra_binds", ["scratch"]),
        ("extra_binds", ["/a:/b:rx"]),
        ("extra_binds", ["/a", "/a"]),
        ("apptainer_options", ["--bind /:/host"]),
        ("apptainer_options", ["; id"]),
        ("interface", "bond0 eth0"),
        ("filesystems", "home eagle"),
        ("constraint", "gpu;id"),
        ("worker_init", 42),
    ],
)
def test_bad_values_are_rejected(schema: dict[str, Any], key: str, bad: Any) -> None:
    values = {**minimal_values(), key: bad}
    with pytest.raises(jsonschema.ValidationError) as info:
        jsonschema.validate(values, schema)
    assert list(info.value.absolute_path)[:1] == [key]


@pytest.mark.parametrize("missing", ["account", "image", "data_dir"])
def test_required_values(schema: dict[str, Any], missing: str) -> None:
    values = minimal_values()
    del values[missing]
    with pytest.raises(jsonschema.ValidationError, match=repr(missing)):
        jsonschema.validate(values, schema)


def test_unknown_values_are_rejected(schema: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError, match="acount"):
        jsonschema.validate({**minimal_values(), "acount": "x"}, schema)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_templates_use_exactly_the_schema_variables(schema: dict[str, Any], template: str) -> None:
    source = (ENDPOINTS / TEMPLATES[template]).read_text(encoding="utf-8")
    used = meta.find_undeclared_variables(SandboxedEnvironment().parse(source))
    declared = set(schema["properties"]) - tpl._UNUSED[template]
    assert used == declared


# -- rendering and loading -----------------------------------------------------------------------


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_minimal_values_render_and_load(
    schema: dict[str, Any], template: str, loaded_engines: list[GlobusComputeEngine]
) -> None:
    provider_cls, launcher_cls, gpu_option, queue_attr = EXPECTED[template]
    values = minimal_values()
    _, engine = _load(_render(template, values, schema), loaded_engines)

    assert engine.container_type == "apptainer"
    assert engine.container_uri == values["image"]
    options = shlex.split(engine.container_cmd_options)
    assert options[options.index("-B") + 1] == values["data_dir"]
    assert ("--nv" in options) == (gpu_option == "--nv")
    assert ("--rocm" in options) == (gpu_option == "--rocm")

    provider = engine.executor.provider
    assert type(provider) is provider_cls
    assert type(provider.launcher) is launcher_cls
    assert provider.account == "MyProject"
    assert provider.walltime == "01:00:00"
    assert (provider.nodes_per_block, provider.init_blocks, provider.min_blocks, provider.max_blocks) == (
        1,
        0,
        0,
        1,
    )
    assert (
        getattr(provider, queue_attr)
        == {
            "polaris": "prod",
            "aurora": "prod",
            "frontier": "batch",
            "perlmutter": "regular",
        }[template]
    )
    assert engine.executor.address == "127.0.0.1"
    assert engine.max_workers_per_node == 1
    assert engine._job_status_kwargs["max_idletime"] == 300
    if template in PBS:
        assert "#PBS -l filesystems=home:" in provider.scheduler_options
    if template == "perlmutter":
        assert provider.constraint == "gpu"
        assert "#SBATCH --gpus-per-node=4" in provider.scheduler_options
    if template == "frontier":
        assert "--gpus-per-node=8" in provider.launcher.overrides

    # The workers start inside the image: apptainer run OPTIONS IMAGE <the endpoint's worker>.
    launch = shlex.split(engine.containerized_launch_cmd())
    image_at = launch.index(values["image"])
    assert launch[:2] == ["apptainer", "run"]
    assert launch[2:image_at] == options
    assert launch[image_at + 1 : image_at + 4] == [
        "globus-compute-endpoint",
        "python-exec",
        "parsl.executors.high_throughput.process_worker_pool",
    ]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_full_values_render_and_load(
    schema: dict[str, Any], template: str, loaded_engines: list[GlobusComputeEngine]
) -> None:
    _, _, gpu_option, queue_attr = EXPECTED[template]
    values = full_values(template)
    config, engine = _load(_render(template, values, schema), loaded_engines)

    assert engine.container_uri == values["image"]
    expected_options = [gpu_option] if gpu_option else []
    expected_options += ["-B", values["data_dir"]]
    for bind in values["extra_binds"]:
        expected_options += ["-B", bind]
    expected_options += values["apptainer_options"]
    assert shlex.split(engine.container_cmd_options) == expected_options

    provider = engine.executor.provider
    assert getattr(provider, queue_attr) == "debug"
    assert provider.walltime == "00:30:00"
    assert (provider.nodes_per_block, provider.init_blocks, provider.min_blocks, provider.max_blocks) == (
        2,
        1,
        0,
        3,
    )
    assert engine.max_workers_per_node == 2
    assert engine._job_status_kwargs["max_idletime"] == 600
    # The site's setup first, then the user's worker_init, verbatim (quotes, ': ', '#').
    assert provider.worker_init.rstrip("\n").endswith("\n" + values["worker_init"])
    if template in PBS:
        assert "#PBS -l filesystems=home:eagle:grand" in provider.scheduler_options
    if template == "perlmutter":
        assert provider.constraint == "gpu&hbm80g"
    assert config.idle_heartbeats_soft == 10


def test_accelerators_per_node_pins_one_worker_per_gpu(
    schema: dict[str, Any], loaded_engines: list[GlobusComputeEngine]
) -> None:
    values = {**minimal_values(), "accelerators_per_node": 4}
    _, engine = _load(_render("polaris", values, schema), loaded_engines)
    assert engine.executor.available_accelerators == ["0", "1", "2", "3"]


def test_aurora_without_interface_leaves_the_address_to_parsl(schema: dict[str, Any]) -> None:
    # Not loaded here: parsl's default (every address of the login node) probes the network.
    values = minimal_values()
    del values["interface"]
    engine_section = _render("aurora", values, schema).split("engine:", 1)[1].split("container_type", 1)[0]
    assert "address" not in engine_section


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_missing_required_value_never_renders(schema: dict[str, Any], template: str) -> None:
    values = minimal_values()
    del values["account"]
    with pytest.raises(jsonschema.ValidationError):
        _render(template, values, schema)
    # Even an endpoint without the schema refuses (the renderer's undefined variables are strict).
    import jinja2

    with pytest.raises(jinja2.UndefinedError):
        _render(template, values, None)


@pytest.mark.parametrize("template", ["polaris", "frontier"])
def test_render_user_config_cli_matches(schema: dict[str, Any], template: str, tmp_path: Path) -> None:
    """The admin's check (docs/hpc.md): `globus-compute-endpoint render-user-config`."""
    options = tmp_path / "options.json"
    options.write_text(json.dumps(full_values(template)), encoding="utf-8")
    cli = Path(sys.executable).with_name("globus-compute-endpoint")
    if not cli.exists():
        found = shutil.which("globus-compute-endpoint")
        assert found, "globus-compute-endpoint is not installed"
        cli = Path(found)
    out = subprocess.run(
        [str(cli), "render-user-config", "-t", str(ENDPOINTS / TEMPLATES[template]),
         "-s", str(SCHEMA_PATH), "-o", str(options)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == _render(template, full_values(template), schema).strip()


# -- site_from_template --------------------------------------------------------------------------


def test_site_from_template_fields() -> None:
    values = parse_template_vars(
        [
            "account=MyProject",
            "image=/lus/shared/fedhpc/trainer.sif",
            "data_dir=/lus/shared/data",
            "walltime=1:30:00",
            "nodes_per_block=2",
            "max_idletime=90.5",
            "extra_binds=/lus/scratch:/scratch, /lus/ref:/ref:ro",
            'apptainer_options=["--cleanenv"]',
        ]
    )
    assert values["walltime"] == "1:30:00"  # text: a YAML parse would give the number 5400
    site = site_from_template("site-polaris", "polaris", ENDPOINT_ID.upper(), values)
    assert site == {
        "backend": "globus-compute",
        "config": {
            "endpoint_id": ENDPOINT_ID,
            "user_endpoint_config": {
                "account": "MyProject",
                "image": "/lus/shared/fedhpc/trainer.sif",
                "data_dir": "/lus/shared/data",
                "walltime": "1:30:00",
                "nodes_per_block": 2,
                "max_idletime": 90.5,
                "extra_binds": ["/lus/scratch:/scratch", "/lus/ref:/ref:ro"],
                "apptainer_options": ["--cleanenv"],
            },
        },
        "transport": "presigned",
        "labels": {"template": "polaris"},
    }
    # Typed values pass as they are; the caller's mapping is not changed.
    typed = {**minimal_values(), "nodes_per_block": 4, "extra_binds": ["/a"]}
    before = dict(typed)
    site = site_from_template("frontier-1", "frontier", uuid.UUID(ENDPOINT_ID), typed, transport="globus")
    assert site["config"]["user_endpoint_config"] == typed == before
    assert site["transport"] == "globus"
    assert site["labels"] == {"template": "frontier"}


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_site_values_render_on_the_endpoint(
    schema: dict[str, Any], template: str, loaded_engines: list[GlobusComputeEngine]
) -> None:
    """What the coordinator sends (user_endpoint_config) renders and loads at the endpoint."""
    site = site_from_template("s", template, ENDPOINT_ID, {k: str(v) for k, v in minimal_values().items()})
    user_config = site["config"]["user_endpoint_config"]
    _load(_render(template, user_config, schema), loaded_engines)
    # render_template is that same rendering.
    assert render_template(template, user_config) == _render(template, user_config, schema)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"walltime": "1h"}, r"walltime: '1h' does not match .*HH:MM:SS"),
        ({"acount": "x"}, r"acount: unknown variable \(did you mean 'account'\?\)"),
        ({"nodes_per_block": "two"}, r"nodes_per_block: 'two' is not an integer"),
        ({"nodes_per_block": "0"}, r"nodes_per_block: 0 is less than the minimum of 1"),
        ({"max_idletime": "soon"}, r"max_idletime: 'soon' is not a number"),
        ({"extra_binds": "relative/path"}, r"extra_binds\[0\]: 'relative/path' does not match"),
        ({"extra_binds": "[oops"}, r"extra_binds: '\[oops' is not a list"),
        ({"walltime": 5400}, r"walltime: got the number 5400 where text is expected"),
        ({"account": 83}, r"account: got the number 83 where text is expected"),
        ({"image": "x; id"}, r"image: 'x; id' does not match"),
        ({"constraint": "gpu"}, r"constraint: not used by the polaris template"),
        ({"worker_init": ["x"]}, r"worker_init: \['x'\] is not of type 'string'"),
    ],
)
def test_site_from_template_names_the_bad_variable(change: dict[str, Any], message: str) -> None:
    with pytest.raises(TemplateError, match=r"^site site-polaris: template 'polaris': .*" + message):
        site_from_template("site-polaris", "polaris", ENDPOINT_ID, {**minimal_values(), **change})


def test_site_from_template_reports_every_problem_and_missing_values() -> None:
    values = {"image": "/x.sif", "acount": "x", "filesystems": "home:flare"}
    with pytest.raises(TemplateError) as info:
        site_from_template("s", "frontier", ENDPOINT_ID, values)
    text = str(info.value)
    assert "acount: unknown variable" in text
    assert "filesystems: not used by the frontier template" in text
    assert "account: required variable missing" in text
    assert "data_dir: required variable missing" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("bad name", "polaris", ENDPOINT_ID), r"site name 'bad name'"),
        (("s", "summit", ENDPOINT_ID), r"unknown template 'summit'; known templates: polaris, aurora"),
        (("s", "polaris", "not-a-uuid"), r"site s: endpoint id 'not-a-uuid' is not a UUID"),
    ],
)
def test_site_from_template_rejects_bad_arguments(args: tuple[str, str, str], message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        site_from_template(*args, minimal_values())


def test_site_from_template_rejects_an_unknown_transport() -> None:
    with pytest.raises(TemplateError, match="transport 'ftp'"):
        site_from_template("s", "polaris", ENDPOINT_ID, minimal_values(), transport="ftp")


def test_parse_template_vars_errors() -> None:
    with pytest.raises(TemplateError, match="expected KEY=VALUE"):
        parse_template_vars(["account"])
    with pytest.raises(TemplateError, match="given twice"):
        parse_template_vars(["account=a", "account=b"])
    assert parse_template_vars(["worker_init=export A=1"]) == {"worker_init": "export A=1"}


def test_templates_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert tpl.templates_dir() == ENDPOINTS
    monkeypatch.setenv(tpl.TEMPLATES_DIR_ENV, str(tmp_path))
    with pytest.raises(TemplateError, match=tpl.TEMPLATES_DIR_ENV):
        site_from_template("s", "polaris", ENDPOINT_ID, minimal_values())
    shutil.copy(ENDPOINTS / "polaris.yaml.j2", tmp_path)
    with pytest.raises(TemplateError, match=r"user_config_schema\.json not found"):
        validate_user_config("polaris", minimal_values())
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    schema["properties"]["account"]["pattern"] = "^only-this$"
    (tmp_path / "user_config_schema.json").write_text(json.dumps(schema), encoding="utf-8")
    assert tpl.template_path("polaris") == tmp_path / "polaris.yaml.j2"
    with pytest.raises(TemplateError, match="account: 'MyProject' does not match '\\^only-this\\$'"):
        validate_user_config("polaris", minimal_values())
