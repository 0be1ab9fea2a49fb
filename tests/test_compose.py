"""compose.yaml is valid for users with Docker: services, commands and files all exist."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml

from .conftest import ROOT


def load() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_redis_service_keeps_an_append_only_file_and_exposes_6379() -> None:
    redis = load()["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert "6379" in [str(p).split(":")[-1] for p in redis["ports"]]


def test_every_command_exists_and_every_file_it_names_too() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    services = load()["services"]
    assert {"redis", "calculator", "database", "image-processor", "demo"} <= set(services)
    assert services["calculator"]["deploy"]["replicas"] == 2
    assert services["image-processor"]["deploy"]["replicas"] == 2
    for name, service in services.items():
        if name == "redis":
            continue
        command = service["command"]
        if command[0] == "python":
            assert command[1] == "-m" and (ROOT / (command[2].replace(".", "/") + ".py")).is_file(), name
        else:
            assert command[0] in scripts, f"{name}: {command[0]} is not a console script"
        if command[:2] == ["titan-worker", "run"]:
            assert (ROOT / command[2]).is_file(), f"{name}: {command[2]} does not exist"
        assert service["environment"]["TITAN_REDIS_URL"] == "redis://redis:6379/0"
        assert "redis" in service["depends_on"]
    assert (ROOT / "Dockerfile").is_file()


def test_every_worker_command_parses() -> None:
    """titan-worker accepts each command line in compose.yaml: options parse, the file loads."""
    from titan_worker.main import app
    from typer.testing import CliRunner

    for name, service in load()["services"].items():
        command = service["command"]
        if command[:2] != ["titan-worker", "run"]:
            continue
        # A Redis that is not there: the options parse, the file loads, then exit code 4.
        args = [*command[1:], "--redis", "redis://127.0.0.1:1/0"]
        args[1] = str(ROOT / args[1])
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 4, (name, result.output)


def test_dockerfile_installs_the_project() -> None:
    text = Path(ROOT / "Dockerfile").read_text()
    assert "pip install" in text and "COPY . /app" in text
