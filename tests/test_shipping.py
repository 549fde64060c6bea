"""What can be proved about the image and the blueprints without a Docker engine."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            pairs.append((instruction.upper(), rest.strip()))
    return pairs


def instructions(name: str) -> list[str]:
    return [rest for instruction, rest in dockerfile() if instruction == name]


def test_image_runs_as_an_unprivileged_user() -> None:
    users = instructions("USER")
    assert users and users[-1] not in ("root", "0")
    order = [instruction for instruction, _ in dockerfile()]
    assert order.index("USER") > max(i for i, name in enumerate(order) if name == "RUN")


def test_image_serves_on_port_from_the_environment() -> None:
    command = json.loads(instructions("CMD")[-1])
    assert command[:2] == ["sh", "-c"] and command[2].startswith("exec ")
    assert "--host 0.0.0.0" in command[2] and "--port ${PORT:-8000}" in command[2]
    assert "--workers 1" in command[2]
    env = " ".join(instructions("ENV"))
    assert "PYTHONUNBUFFERED=1" in env


def test_image_has_a_health_check_and_copies_what_exists() -> None:
    health = instructions("HEALTHCHECK")[-1]
    assert "/health" in health and "${PORT:-8000}" in health
    copied = [shlex.split(rest)[0] for rest in instructions("COPY")]
    assert "requirements.txt" in copied and "backend/" in copied and "frontend/" in copied
    for path in copied:
        assert (ROOT / path).exists(), path
    order = [(instruction, rest) for instruction, rest in dockerfile()]
    install = next(i for i, (name, rest) in enumerate(order) if name == "RUN" and "pip install" in rest)
    code = next(i for i, (name, rest) in enumerate(order) if name == "COPY" and rest.startswith("backend"))
    assert install < code, "dependencies must be installed in their own layer, before the code"


def test_dockerignore_keeps_secrets_and_clutter_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".env", ".git", ".venv", "tests", "**/__pycache__"):
        assert entry in ignored


def test_render_blueprint() -> None:
    blueprint = yaml.safe_load((ROOT / "render.yaml").read_text())
    service = blueprint["services"][0]
    assert service["type"] == "web" and service["runtime"] == "docker"
    assert service["healthCheckPath"] == "/health"
    env = {item["key"]: item for item in service["envVars"]}
    assert env["OPENAI_API_KEY"].get("sync") is False and "value" not in env["OPENAI_API_KEY"]
    assert env["PORT"]["value"] == "8000"


def test_railway_blueprint() -> None:
    config = json.loads((ROOT / "railway.json").read_text())
    assert config["build"]["builder"] == "DOCKERFILE"
    assert config["deploy"]["healthcheckPath"] == "/health"
    assert config["deploy"]["restartPolicyType"] == "ON_FAILURE"


def test_image_install_and_start_steps_work_in_a_clean_venv(tmp_path: Path) -> None:
    """Replays the image: a fresh venv, its exact pip install, its files, then its exact CMD with PORT set."""
    app = tmp_path / "app"
    app.mkdir()
    for rest in instructions("COPY"):
        source, target = shlex.split(rest)
        destination = app / target if target != "." else app / Path(source).name
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, destination, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / source, destination)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    for rest in instructions("ENV"):
        env.update(dict(item.split("=", 1) for item in shlex.split(rest)))
    for rest in instructions("RUN"):
        if "pip install" in rest:
            subprocess.run(["sh", "-c", rest], cwd=app, env=env, check=True, capture_output=True, timeout=900)
    port = free_port()
    command = json.loads(instructions("CMD")[-1])
    env.update(PORT=str(port), OPENAI_MODEL_NAME="m", OPENAI_API_BASE="http://127.0.0.1:9/v1")
    server = subprocess.Popen(command, cwd=app, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx2.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx2.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the image's CMD did not serve /health:\n{server.communicate()[0].decode()}")
                time.sleep(0.3)
        assert response.status_code == 200 and response.json() == {"status": "ok"}
        assert httpx2.get(f"http://127.0.0.1:{port}/").status_code == 200
    finally:
        server.terminate()
        server.wait(10)
    assert os.path.exists(venv / "bin" / "uvicorn")
