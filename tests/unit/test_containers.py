"""The trainer image recipes: containers/trainer.Dockerfile and containers/trainer.def.

There is no docker or apptainer binary where the tests run, so the recipes are parsed: the
Dockerfile by a small instruction reader, the definition file by spython (which is lenient: a
missing colon or a misspelt section parses silently) and by reading its raw section headers.
The checks hold the pins together: Python (same minor as the control plane), the Globus Compute
endpoint (pyproject's `hpc` extra), torch, uv and the CUDA base, in both recipes.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS = ROOT / "containers"
DOCKERFILE = CONTAINERS / "trainer.Dockerfile"
DEFFILE = CONTAINERS / "trainer.def"


@cache
def _pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _hpc_pin(distribution: str) -> str:
    """The exact version pyproject's `hpc` extra pins ``distribution`` to."""
    for requirement in _pyproject()["project"]["optional-dependencies"]["hpc"]:
        match = re.fullmatch(
            rf"{re.escape(distribution)}==([0-9][0-9A-Za-z.]*)", requirement.replace(" ", "")
        )
        if match:
            return match.group(1)
    raise AssertionError(f"pyproject.toml's hpc extra does not pin {distribution}==X")


def _python_minor() -> str:
    """The project's Python minor version (mypy's python_version; ruff's target agrees)."""
    minor = str(_pyproject()["tool"]["mypy"]["python_version"])
    assert _pyproject()["tool"]["ruff"]["target-version"] == "py" + minor.replace(".", "")
    return minor


def _is_pinned_image(ref: str) -> bool:
    """``name:tag`` (or ``name@sha256:...``) with no variable and a tag other than latest."""
    if "${" in ref or "$" in ref:
        return False
    if "@sha256:" in ref:
        return True
    name, _, tag = ref.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


# -- Dockerfile ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: str | None  # the stage it belongs to (None: before the first FROM)


def _instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped (no heredocs:
    the trainer Dockerfile has none, and one would show up here as unknown keywords)."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    result: list[Instruction] = []
    stage: str | None = None
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(
                r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE
            )
            assert match, f"cannot read FROM {args!r}"
            stage = match.group(2) or match.group(1)
        result.append(Instruction(keyword, args.strip(), stage))
    return result


@cache
def _dockerfile() -> list[Instruction]:
    return _instructions(DOCKERFILE.read_text(encoding="utf-8"))


def _args(stage: str | None) -> dict[str, str]:
    """``ARG NAME=default`` of one stage (None: the global ones before the first FROM)."""
    found: dict[str, str] = {}
    for ins in _dockerfile():
        if ins.keyword == "ARG" and ins.stage == stage:
            name, _, default = ins.args.partition("=")
            found[name] = default
    return found


def _froms() -> list[tuple[str, str | None]]:
    """(image, stage name) of every FROM."""
    result = []
    for ins in _dockerfile():
        if ins.keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", ins.args, re.IGNORECASE)
            assert match is not None
            result.append((match.group(1), match.group(2)))
    return result


def _final_stage() -> str:
    stage = _froms()[-1][1]
    assert stage is not None, "name the final stage (FROM ... AS trainer)"
    return stage


def _stage_instructions(stage: str, keyword: str) -> list[str]:
    return [ins.args for ins in _dockerfile() if ins.stage == stage and ins.keyword == keyword]


def _label_pairs(stage: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for args in _stage_instructions(stage, "LABEL"):
        for key, value in re.findall(r'([\w.\-]+)=("(?:[^"\\]|\\.)*"|\S+)', args):
            labels[key] = value.strip('"')
    return labels


def test_dockerfile_keywords_are_known() -> None:
    known = {
        "FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "LABEL", "USER", "WORKDIR", "ENTRYPOINT",
        "CMD", "SHELL", "EXPOSE", "VOLUME", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD",
    }  # fmt: skip
    unknown = [ins for ins in _dockerfile() if ins.keyword not in known]
    assert not unknown, f"unknown Dockerfile instructions: {unknown}"
    assert DOCKERFILE.read_text(encoding="utf-8").startswith("# syntax=docker/dockerfile:")


def test_dockerfile_gpu_argument_selects_a_pinned_base() -> None:
    assert _args(None).get("GPU") == "cuda", "a global `ARG GPU=cuda` before the first FROM"
    stages = {stage for _, stage in _froms() if stage}
    for image, _ in _froms():
        if image in stages:
            continue
        if "${GPU}" in image:
            # FROM base-${GPU}: every documented value has its stage.
            assert image == "base-${GPU}"
            assert {"base-cuda", "base-rocm"} <= stages
            continue
        assert _is_pinned_image(image), f"FROM {image}: pin a tag (not latest) or a digest"
    bases = dict((stage, image) for image, stage in _froms())
    assert re.fullmatch(r"nvidia/cuda:[0-9.]+-(base|runtime|cudnn-runtime)-ubuntu22\.04", bases["base-cuda"])
    assert re.fullmatch(r"rocm/(dev-ubuntu-22\.04|pytorch):[0-9][\w.\-]*", bases["base-rocm"])
    # Each variant names its PyTorch wheel index.
    for stage, pattern in (("base-cuda", r"cu\d+"), ("base-rocm", r"rocm[\d.]+")):
        envs = " ".join(_stage_instructions(stage, "ENV"))
        assert re.search(rf"FEDHPC_TORCH_INDEX_URL=https://download\.pytorch\.org/whl/{pattern}\b", envs), (
            stage
        )


def test_dockerfile_pins_match_the_project() -> None:
    final = _final_stage()
    args = _args(final)
    assert args["GLOBUS_COMPUTE_ENDPOINT_VERSION"] == _hpc_pin("globus-compute-endpoint")
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"]), "pin torch to an exact version"
    python = args["PYTHON_VERSION"]
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", python)
    assert ".".join(python.split(".")[:2]) == _python_minor()
    runs = "\n".join(_stage_instructions(final, "RUN"))
    assert '"globus-compute-endpoint==${GLOBUS_COMPUTE_ENDPOINT_VERSION}"' in runs
    assert '"torch==${TORCH_VERSION}"' in runs
    assert '--index-url "${TORCH_INDEX_URL:-$FEDHPC_TORCH_INDEX_URL}"' in runs
    assert 'uv python install "${PYTHON_VERSION}"' in runs


def test_trainer_and_control_plane_share_the_python_minor() -> None:
    control_plane = CONTAINERS / "control-plane.Dockerfile"
    if not control_plane.exists():
        pytest.skip("no control-plane image in this checkout")
    found = re.findall(r"python:(\d+\.\d+)[.\d]*-", control_plane.read_text(encoding="utf-8"))
    assert found, "the control-plane image names no python:X.Y base"
    trainer = _args(_final_stage())["PYTHON_VERSION"]
    assert set(found) == {".".join(trainer.split(".")[:2])}


def test_dockerfile_installs_fedhpc_from_the_build_context() -> None:
    final = _final_stage()
    copies = _stage_instructions(final, "COPY")
    assert any(c.startswith("pyproject.toml README.md ") for c in copies), copies
    assert any(c.startswith("services ") for c in copies), copies
    runs = "\n".join(_stage_instructions(final, "RUN"))
    assert re.search(r'uv pip install "/opt/fedhpc/src\[hpc\]"', runs)
    # The readme the build needs is copied (pyproject declares it).
    assert _pyproject()["project"]["readme"] == "README.md"


def test_dockerfile_runs_non_root_with_a_plain_command() -> None:
    final = _final_stage()
    users = _stage_instructions(final, "USER")
    assert users, "set a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    entrypoints = _stage_instructions(final, "ENTRYPOINT")
    # Cleared (the CUDA base's entrypoint prints a banner on stdout, where results go).
    assert entrypoints and json.loads(entrypoints[-1]) == []
    cmd = json.loads(_stage_instructions(final, "CMD")[-1])
    assert cmd == ["fedhpc-trainer", "selftest"]
    # `docker run IMAGE fedhpc-trainer selftest` names a real console script and command.
    assert "fedhpc-trainer" in _pyproject()["project"]["scripts"]
    from fedhpc.trainer.cli import main

    assert {"selftest", "run"} <= set(main.commands)
    envs = " ".join(_stage_instructions(final, "ENV"))
    assert "PATH=/opt/fedhpc/venv/bin:$PATH" in envs


def test_dockerfile_labels() -> None:
    labels = _label_pairs(_final_stage())
    for key in ("title", "description", "version", "licenses", "authors"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["io.fedhpc.globus-compute-endpoint"] == "${GLOBUS_COMPUTE_ENDPOINT_VERSION}"
    assert labels["io.fedhpc.python"] == "${PYTHON_VERSION}"
    assert labels["io.fedhpc.torch"] == "${TORCH_VERSION}"
    assert labels["io.fedhpc.gpu"] == "${GPU}"
    assert labels["org.opencontainers.image.licenses"] == _pyproject()["project"]["license"]["text"]


def test_dockerignore_keeps_the_build_context_small_but_complete() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (".venv", ".git"):
        assert needed in patterns, needed
    for kept in ("pyproject.toml", "README.md", "services", "containers"):
        assert not any(p.strip("/") == kept for p in patterns), f"{kept} is needed by the images"


# -- Apptainer definition file -------------------------------------------------------------------

# Sections Apptainer knows (a misspelt one is ignored by spython and by apptainer alike).
_APPTAINER_SECTIONS = {
    "setup", "files", "environment", "post", "runscript", "startscript", "test", "labels",
    "help", "arguments", "apprun", "applabels", "appinstall", "appenv", "apphelp", "appfiles",
    "apptest",
}  # fmt: skip


@cache
def _def_text() -> str:
    return DEFFILE.read_text(encoding="utf-8")


def _def_header() -> dict[str, str]:
    """The ``Key: value`` lines before the first section."""
    header: dict[str, str] = {}
    for line in _def_text().splitlines():
        if line.startswith("%"):
            break
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z]+):[ \t]*(\S+)[ \t]*", line)
        assert match, f"header line {line!r} is not 'Key: value'"
        header[match.group(1)] = match.group(2)
    return header


def _def_sections() -> dict[str, list[str]]:
    """Section name -> its lines (stripped, blank lines dropped)."""
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in _def_text().splitlines():
        if line.startswith("%"):
            match = re.fullmatch(r"%([a-z]+)(\s+.*)?", line)
            assert match, f"bad section header {line!r}"
            current = match.group(1)
            assert current not in sections, f"section %{current} appears twice"
            sections[current] = []
        elif current is not None and line.strip():
            sections[current].append(line.strip())
    return sections


def _code(lines: list[str]) -> list[str]:
    return [line for line in lines if not line.startswith("#")]


@cache
def _spython_recipe() -> Any:
    from spython.main.parse.parsers import SingularityParser

    return SingularityParser(str(DEFFILE)).recipe["spython-base"]


def test_def_header_bootstraps_the_dockerfile_cuda_base() -> None:
    header = _def_header()
    assert header == {"Bootstrap": header.get("Bootstrap", ""), "From": header.get("From", "")}
    assert header["Bootstrap"] == "docker"
    assert _is_pinned_image(header["From"]), header["From"]
    cuda_base = dict((stage, image) for image, stage in _froms())["base-cuda"]
    assert header["From"] == cuda_base, "trainer.def and trainer.Dockerfile (GPU=cuda) share the base"
    assert _spython_recipe().fromHeader == header["From"].lower()


def test_def_sections_exist_and_are_known() -> None:
    sections = _def_sections()
    assert set(sections) <= _APPTAINER_SECTIONS, set(sections) - _APPTAINER_SECTIONS
    for name in ("help", "labels", "files", "environment", "post", "runscript", "test"):
        assert _code(sections.get(name, [])), f"%{name} is missing or empty"
    # %post runs under bash (set -o pipefail).
    assert re.search(r"^%post -c /bin/bash$", _def_text(), re.MULTILINE)
    recipe = _spython_recipe()
    assert recipe.labels and recipe.environ and recipe.install and recipe.cmd and recipe.test


def test_def_labels() -> None:
    labels = dict(line.split(None, 1) for line in _def_sections()["labels"])
    assert labels["io.fedhpc.globus-compute-endpoint"] == _hpc_pin("globus-compute-endpoint")
    assert labels["io.fedhpc.gpu"] == "cuda"
    assert labels["Maintainer"]
    for key in ("title", "version", "licenses"):
        assert labels[f"org.opencontainers.image.{key}"], key
    assert labels["org.opencontainers.image.version"] == _pyproject()["project"]["version"]
    # spython sees the same labels.
    assert set(_spython_recipe().labels) == set(_def_sections()["labels"])


def test_def_pins_match_the_dockerfile_and_pyproject() -> None:
    post = "\n".join(_code(_def_sections()["post"]))
    labels = dict(line.split(None, 1) for line in _def_sections()["labels"])
    docker_args = _args(_final_stage())
    endpoint = _hpc_pin("globus-compute-endpoint")
    assert re.search(rf"(?<![\w.-])globus-compute-endpoint=={re.escape(endpoint)}(?![\w.])", post)
    assert f"torch=={docker_args['TORCH_VERSION']}" in post
    assert labels["io.fedhpc.torch"] == docker_args["TORCH_VERSION"]
    python = docker_args["PYTHON_VERSION"]
    assert f"uv python install {python}" in post and f"--python {python}" in post
    assert labels["io.fedhpc.python"] == python
    cuda_index = re.search(r"FEDHPC_TORCH_INDEX_URL=(\S+)", " ".join(_stage_instructions("base-cuda", "ENV")))
    assert cuda_index and f"--index-url {cuda_index.group(1)} " in post
    assert labels["io.fedhpc.torch-index"] == cuda_index.group(1)
    uv_image = next(image for image, stage in _froms() if stage == "uv")
    assert f"uv=={uv_image.rpartition(':')[2]}" in post
    assert '"/opt/fedhpc/src[hpc]"' in post
    # spython's %post is the same text.
    assert f"globus-compute-endpoint=={endpoint}" in " ".join(_spython_recipe().install)


def test_def_files_come_from_the_repository_root() -> None:
    sources = [line.split()[0] for line in _code(_def_sections()["files"])]
    assert sources == ["pyproject.toml", "README.md", "services"]
    for source in sources:
        assert (ROOT / source).exists(), source
    assert _spython_recipe().files == _code(_def_sections()["files"])


def test_def_environment_puts_the_venv_first() -> None:
    environment = _code(_def_sections()["environment"])
    assert "export PATH=/opt/fedhpc/venv/bin:$PATH" in environment
    assert "export PYTHONNOUSERSITE=1" in environment
    assert any("PATH=/opt/fedhpc/venv/bin:$PATH" in e for e in _spython_recipe().environ)


def test_def_runscript_execs_its_arguments() -> None:
    runscript = _code(_def_sections()["runscript"])
    assert runscript[-1] == 'exec "$@"'
    script = "\n".join(runscript)
    # The endpoint's worker command line goes through unchanged (quoting included)...
    out = subprocess.run(
        ["/bin/sh", "-c", script, "runscript", "printf", "%s|", "a b", "--flag=1"],
        capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    assert out.stdout == "a b|--flag=1|"
    # ...and with no arguments the default is the self-test.
    assert "set -- fedhpc-trainer selftest" in runscript


def test_def_test_section_runs_the_selftest() -> None:
    test = _code(_def_sections()["test"])
    assert "fedhpc-trainer selftest" in test
    assert "globus-compute-endpoint version" in test
    assert _spython_recipe().test  # spython recognised the section
