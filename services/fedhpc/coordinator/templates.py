"""HPC sites from endpoint templates: the fields of ``fedhpc sites add --template NAME``.

The Globus Compute endpoint templates for Polaris, Aurora (PBS Pro), Frontier and Perlmutter
(Slurm) live in ``containers/endpoints/`` with the JSON Schema of their variables,
``user_config_schema.json`` (see docs/hpc.md). A site administrator installs one template and the
schema on a multi-user endpoint; an experiment owner registers the endpoint as a site, and the
coordinator sends the variables with every task as the Executor's ``user_endpoint_config``::

    from fedhpc.coordinator.templates import parse_template_vars, site_from_template

    fields = site_from_template(
        "site-polaris", "polaris", "6f1c...-uuid",
        parse_template_vars(["account=MyProject", "image=/eagle/MyProject/trainer.sif",
                             "data_dir=/eagle/MyProject/data", "nodes_per_block=2"]),
    )
    # {"backend": "globus-compute",
    #  "config": {"endpoint_id": "...", "user_endpoint_config": {"account": "MyProject", ...,
    #                                                          "nodes_per_block": 2}},
    #  "transport": "presigned", "labels": {"template": "polaris"}}

The values are checked here, before anything reaches the endpoint, against the same schema the
endpoint enforces, and every error names the variable. Values given as text (``--var KEY=VALUE``)
are converted to the schema's type: ``nodes_per_block=2`` becomes 2, ``extra_binds=/a,/b`` (or a
YAML/JSON list, ``[/a, /b]``) becomes a list. Pass such text through :func:`parse_template_vars`,
not a YAML parse, which reads ``walltime=1:30:00`` as the number 5400.

Where the templates are: ``containers/`` is not part of the Python package, so the directory is
``$FEDHPC_TEMPLATES_DIR`` when that is set, else ``containers/endpoints`` of the source tree this
module was loaded from (``Path(__file__).parents[3]``: an editable install or a checkout). An
installed wheel has no source tree: set ``FEDHPC_TEMPLATES_DIR`` to a copy of
``containers/endpoints``.

:func:`render_template` renders a template with the endpoint's own renderer (what the endpoint
does for each user), to look at the batch-job settings before registering a site; it needs the
``hpc`` extra (``globus-compute-endpoint``). :func:`site_from_template` needs ``jsonschema``,
which the ``hpc`` extra brings.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import yaml

__all__ = [
    "SCHEMA_FILE",
    "TEMPLATES",
    "TEMPLATES_DIR_ENV",
    "TRANSPORTS",
    "TemplateError",
    "load_user_config_schema",
    "parse_template_vars",
    "render_template",
    "site_from_template",
    "template_path",
    "templates_dir",
    "validate_user_config",
]

#: Environment variable naming the directory that holds the templates and the schema.
TEMPLATES_DIR_ENV: Final = "FEDHPC_TEMPLATES_DIR"

#: Template name -> its file in :func:`templates_dir`.
TEMPLATES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "polaris": "polaris.yaml.j2",
        "aurora": "aurora.yaml.j2",
        "frontier": "frontier.yaml.j2",
        "perlmutter": "perlmutter.yaml.j2",
    }
)

#: The JSON Schema of the templates' variables, in :func:`templates_dir`.
SCHEMA_FILE: Final = "user_config_schema.json"

#: Variables of the schema that a template does not use: passing one is a mistake (a Slurm
#: constraint for a PBS site, say), so it is refused rather than silently ignored.
_UNUSED: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        "polaris": frozenset({"constraint"}),
        "aurora": frozenset({"constraint"}),
        "frontier": frozenset({"constraint", "filesystems"}),
        "perlmutter": frozenset({"filesystems"}),
    }
)

#: Transports a site may use (``fedhpc sites add --transport``).
TRANSPORTS: Final = ("presigned", "registry-stream", "globus", "path")

# The same rule as SiteSpec.name (site names become directory names and metric labels).
_SITE_NAME: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class TemplateError(ValueError):
    """A template, its variables or the endpoint id are wrong; the message says which and why."""


# -- where the templates are ---------------------------------------------------------------------


def templates_dir() -> Path:
    """``$FEDHPC_TEMPLATES_DIR`` if set, else ``containers/endpoints`` of the source tree."""
    configured = os.environ.get(TEMPLATES_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(__file__).resolve().parents[3] / "containers" / "endpoints"


def _check_name(template: str) -> str:
    if template not in TEMPLATES:
        raise TemplateError(f"unknown template {template!r}; known templates: {', '.join(TEMPLATES)}")
    return template


def template_path(template: str) -> Path:
    """The file of ``template`` (TemplateError if the name is unknown or the file is missing)."""
    path = templates_dir() / TEMPLATES[_check_name(template)]
    if not path.is_file():
        raise TemplateError(
            f"template {template!r}: {path} not found; set {TEMPLATES_DIR_ENV} to the directory "
            "holding the endpoint templates (containers/endpoints in the fedhpc source tree)"
        )
    return path


def load_user_config_schema() -> dict[str, Any]:
    """The JSON Schema of the templates' variables (``user_config_schema.json``)."""
    path = templates_dir() / SCHEMA_FILE
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise TemplateError(
            f"{path} not found; set {TEMPLATES_DIR_ENV} to the directory holding the endpoint "
            "templates (containers/endpoints in the fedhpc source tree)"
        ) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TemplateError(f"cannot read the user config schema {path}: {exc}") from exc
    if not isinstance(schema, dict) or not isinstance(schema.get("properties"), dict):
        raise TemplateError(f"{path} is not a JSON Schema with properties")
    return schema


# -- values --------------------------------------------------------------------------------------


def parse_template_vars(pairs: Iterable[str]) -> dict[str, str]:
    """``["account=MyProject", "nodes_per_block=2"]`` -> ``{"account": "MyProject", ...}``.

    Values stay text (a YAML parse would turn ``walltime=1:30:00`` into the number 5400);
    :func:`site_from_template` converts them to the schema's types. A key given twice is an error.
    """
    parsed: dict[str, str] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TemplateError(f"expected KEY=VALUE, got {item!r} (e.g. account=MyProject)")
        if key in parsed:
            raise TemplateError(f"variable {key!r} given twice")
        parsed[key] = value
    return parsed


def _describe(prop: Mapping[str, Any]) -> str:
    description = prop.get("description")
    return f" ({description})" if isinstance(description, str) else ""


def _coerce(key: str, value: Any, prop: Mapping[str, Any]) -> Any:
    """Text from the command line -> the schema's type. Values of the right type pass through
    (the schema check judges them); a number where text is expected is refused with the likely
    cause, a YAML parse of KEY=VALUE (``1:30:00`` reads as 5400, ``0123`` as 83)."""
    kind = prop.get("type")
    if kind == "string" and isinstance(value, int | float) and not isinstance(value, bool):
        raise TemplateError(
            f"{key}: got the number {value!r} where text is expected{_describe(prop)}; pass "
            "KEY=VALUE text through parse_template_vars (a YAML parse reads 1:30:00 as 5400)"
        )
    if not isinstance(value, str):
        return value
    text = value.strip()
    if kind == "integer":
        try:
            return int(text)
        except ValueError:
            raise TemplateError(f"{key}: {value!r} is not an integer{_describe(prop)}") from None
    if kind == "number":
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            raise TemplateError(f"{key}: {value!r} is not a number{_describe(prop)}") from None
    if kind == "array":
        if text.startswith("["):
            # A YAML flow list, JSON included: [/a, /b] or ["/a", "/b"].
            try:
                items = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                problem = str(exc).splitlines()[0]
                raise TemplateError(f"{key}: {value!r} is not a list ({problem}){_describe(prop)}") from None
            return items
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def validate_user_config(template: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` converted to the schema's types and checked against the schema and the
    template: the ``user_endpoint_config`` to send. TemplateError names every bad variable."""
    _check_name(template)
    schema = load_user_config_schema()
    properties: dict[str, Any] = schema["properties"]
    unused = _UNUSED.get(template, frozenset())
    problems: list[str] = []
    converted: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            problems.append(f"variable names are text, got {key!r}")
        elif key not in properties:
            close = difflib.get_close_matches(key, list(properties), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                f"{key}: unknown variable{hint}; known variables: {', '.join(sorted(properties))}"
            )
        elif key in unused:
            problems.append(f"{key}: not used by the {template} template")
        else:
            try:
                converted[key] = _coerce(key, value, properties[key])
            except TemplateError as exc:
                problems.append(str(exc))
    for key in schema.get("required", []):
        if key not in values:
            problems.append(f"{key}: required variable missing{_describe(properties.get(key, {}))}")
    if problems:
        raise TemplateError(f"template {template!r}: " + "; ".join(problems))

    jsonschema: Any = _import("jsonschema", "jsonschema")
    validator = jsonschema.Draft202012Validator(schema)
    for error in sorted(validator.iter_errors(converted), key=lambda e: [str(p) for p in e.absolute_path]):
        path = [str(part) for part in error.absolute_path]
        key = path[0] if path else "(values)"
        where = key + "".join(f"[{part}]" for part in path[1:])
        problems.append(f"{where}: {error.message}{_describe(properties.get(key, {}))}")
    if problems:
        raise TemplateError(f"template {template!r}: " + "; ".join(problems))
    return converted


def _import(module: str, distribution: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TemplateError(
            f"{module} is not installed: install fedhpc with the hpc extra "
            f"(pip install 'fedhpc[hpc]', which brings {distribution})"
        ) from exc


def _endpoint_uuid(endpoint_id: str | uuid.UUID) -> str:
    if isinstance(endpoint_id, uuid.UUID):
        return str(endpoint_id)
    try:
        return str(uuid.UUID(str(endpoint_id).strip()))
    except ValueError:
        raise TemplateError(
            f"endpoint id {endpoint_id!r} is not a UUID (globus-compute-endpoint list shows the "
            "endpoint's id, e.g. 6f1c2a1e-8d4e-4b7a-9c3f-2d5e6f7a8b9c)"
        ) from None


# -- sites ---------------------------------------------------------------------------------------


def site_from_template(
    name: str,
    template: str,
    endpoint_id: str | uuid.UUID,
    values: Mapping[str, Any],
    *,
    transport: str = "presigned",
) -> dict[str, Any]:
    """The site fields for ``fedhpc sites add NAME --template TEMPLATE``: a ``globus-compute``
    site on the multi-user endpoint ``endpoint_id`` whose user config is ``values``, validated.

    Returns ``{"backend": "globus-compute", "config": {"endpoint_id": ..., "user_endpoint_config":
    {...}}, "transport": transport, "labels": {"template": template}}``. ``transport="globus"`` is
    for facilities whose compute nodes cannot reach the object store (the site's config then
    also needs a ``globus_transfer`` section). Raises TemplateError naming the bad site name,
    template, endpoint id or variable.
    """
    if not isinstance(name, str) or not re.fullmatch(_SITE_NAME, name):
        raise TemplateError(
            f"site name {name!r}: use 1-64 letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    if transport not in TRANSPORTS:
        raise TemplateError(f"site {name}: transport {transport!r} is not one of {', '.join(TRANSPORTS)}")
    template_path(template)  # the template (and the schema beside it) must be found
    try:
        endpoint = _endpoint_uuid(endpoint_id)
        user_config = validate_user_config(template, values)
    except TemplateError as exc:
        raise TemplateError(f"site {name}: {exc}") from None
    return {
        "backend": "globus-compute",
        "config": {"endpoint_id": endpoint, "user_endpoint_config": user_config},
        "transport": transport,
        "labels": {"template": template},
    }


def render_template(template: str, values: Mapping[str, Any]) -> str:
    """Render ``template`` with ``values`` exactly as the multi-user endpoint does (its own
    renderer, the schema check included), as the current user: the user endpoint's config.yaml.

    Needs the ``hpc`` extra. The text loads with
    ``globus_compute_endpoint.endpoint.config.utils.load_config_yaml`` on a machine where the
    template's network interface exists (pass ``interface="lo"`` elsewhere).
    """
    import pwd  # POSIX only, like the endpoint

    user_config = validate_user_config(template, values)
    path = template_path(template)
    utils: Any = _import("globus_compute_endpoint.endpoint.config.utils", "globus-compute-endpoint")
    config_module: Any = _import("globus_compute_endpoint.endpoint.config", "globus-compute-endpoint")
    identity_module: Any = _import(
        "globus_compute_endpoint.endpoint.identity_mapper", "globus-compute-endpoint"
    )
    identity = identity_module.MappedPosixIdentity(
        local_user_record=pwd.getpwuid(os.getuid()),
        matched_identity=uuid.UUID(int=0),
        globus_identity_candidates=[],
    )
    rendered = utils.render_config_user_template(
        parent_config=config_module.CoreEndpointConfig(),
        user_config_template=utils.load_user_config_template(path),
        user_config_template_path=path,
        mapped_identity=identity,
        user_config_schema=load_user_config_schema(),
        user_opts=user_config,
    )
    return str(rendered)
