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


def test_every_command_is_an_installed_script_on_an_existing_file() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    services = load()["services"]
    for name, service in services.items():
        if name == "redis":
            continue
        command = service["command"]
        assert command[0] in scripts, f"{name}: {command[0]} is not a console script"
        if command[:2] == ["titan-worker", "run"]:
            assert (ROOT / command[2]).is_file(), f"{name}: {command[2]} does not exist"
        assert service["environment"]["TITAN_REDIS_URL"].startswith("redis://redis:")
        assert "redis" in service["depends_on"] or set(service["depends_on"]) <= set(services)
    assert (ROOT / "Dockerfile").is_file()


def test_dockerfile_installs_the_project() -> None:
    text = Path(ROOT / "Dockerfile").read_text()
    assert "pip install" in text and "COPY . /app" in text
