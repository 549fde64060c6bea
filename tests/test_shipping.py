"""What can be proved about the image and the blueprints without a Docker engine."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import pytest
import yaml

from rlm_service.config import load_settings
from tests.conftest import start_on_free_port

ROOT = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT_S = 900


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
    """The CMD is the service's own start (`backend/main.py`: HOST, PORT and WEB_CONCURRENCY from the
    environment), listening on every interface of the container. Mutant: uvicorn started directly, which
    serves one process whatever WEB_CONCURRENCY says."""
    assert json.loads(instructions("CMD")[-1]) == ["python", "backend/main.py"]
    env = " ".join(instructions("ENV"))
    assert "PYTHONUNBUFFERED=1" in env and "HOST=0.0.0.0" in env


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
    """Two instances on one managed PostgreSQL database that only the account's services reach."""
    blueprint = yaml.safe_load((ROOT / "render.yaml").read_text())
    service = blueprint["services"][0]
    assert service["type"] == "web" and service["runtime"] == "docker"
    assert service["healthCheckPath"] == "/health" and service["numInstances"] == 2
    env = {item["key"]: item for item in service["envVars"]}
    assert env["OPENAI_API_KEY"].get("sync") is False and "value" not in env["OPENAI_API_KEY"]
    assert env["PORT"]["value"] == "8000"
    database = {item["name"]: item for item in blueprint["databases"]}
    assert env["RLM_DATABASE_URL"]["fromDatabase"]["property"] == "connectionString"
    assert database[env["RLM_DATABASE_URL"]["fromDatabase"]["name"]]["ipAllowList"] == []


def test_compose_file_wires_two_replicas_to_postgresql_behind_a_streaming_proxy() -> None:
    """docker-compose.yml (no Docker engine runs here: its wiring is read, not run): the database's user,
    password and name are the ones in the replicas' RLM_DATABASE_URL, which the settings accept; the replicas
    wait for the database; the proxy sends to their port and streams (no buffering, long reads)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    db, app, proxy = (compose["services"][name] for name in ("db", "app", "proxy"))
    assert app["build"] == "." and app["deploy"]["replicas"] == 2
    assert app["depends_on"]["db"]["condition"] == "service_healthy" and "healthcheck" in db

    def substituted(value: str) -> str:  # compose's ${NAME:-default}, with nothing set
        return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)

    url = urlsplit(substituted(app["environment"]["RLM_DATABASE_URL"]))
    db_env = {key: substituted(value) for key, value in db["environment"].items()}
    assert (url.hostname, url.port, url.username, url.password, url.path) == (
        "db",
        5432,
        db_env["POSTGRES_USER"],
        db_env["POSTGRES_PASSWORD"],
        "/" + db_env["POSTGRES_DB"],
    )
    # set in the compose file, HOST wins over a .env made from .env.example (127.0.0.1: out of nginx's reach)
    assert app["environment"]["HOST"] == "0.0.0.0"
    settings = load_settings(_env_file=None, rlm_database_url=url.geturl(), port=app["environment"]["PORT"])
    assert settings.rlm_database_url is not None and settings.history_path is None

    mounts = dict(volume.split(":")[:2] for volume in proxy["volumes"])
    source = next(local for local, target in mounts.items() if target == "/etc/nginx/conf.d/default.conf")
    conf = (ROOT / source).read_text()
    directives = dict(re.findall(r"^\s*(\w+)\s+([^;{]+);", conf, re.MULTILINE))
    assert re.search(rf"server\s+app:{settings.port}\s*;", conf)
    assert directives["proxy_buffering"] == "off" and directives["proxy_request_buffering"] == "off"
    assert int(directives["proxy_read_timeout"].rstrip("s")) >= 3600
    assert directives["proxy_http_version"] == "1.1"


def test_railway_blueprint() -> None:
    config = json.loads((ROOT / "railway.json").read_text())
    assert config["build"]["builder"] == "DOCKERFILE"
    assert config["deploy"]["healthcheckPath"] == "/health"
    assert config["deploy"]["restartPolicyType"] == "ON_FAILURE"


@pytest.mark.timeout(INSTALL_TIMEOUT_S + 300)
def test_image_install_and_start_steps_work_in_a_clean_venv(tmp_path: Path) -> None:
    """Replays the image: a fresh venv, its exact pip install, its files, then its exact CMD with PORT set.
    The install downloads and builds the requirements: it gets a pytest timeout of its own, longer than
    its own deadline."""
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
            subprocess.run(
                ["sh", "-c", rest], cwd=app, env=env, check=True, capture_output=True, timeout=INSTALL_TIMEOUT_S
            )
    command = json.loads(instructions("CMD")[-1])
    env.update(OPENAI_MODEL_NAME="m", OPENAI_API_BASE="http://127.0.0.1:9/v1")

    log = tmp_path / "server.log"

    def start(port: int) -> subprocess.Popen[bytes]:
        with open(log, "wb") as output:
            return subprocess.Popen(
                command, cwd=app, env={**env, "PORT": str(port)}, stdout=output, stderr=subprocess.STDOUT
            )

    def healthy(port: int) -> bool:
        try:
            return httpx2.get(f"http://127.0.0.1:{port}/health", timeout=2).json() == {"status": "ok"}
        except httpx2.TransportError:
            return False

    try:
        server, port = start_on_free_port(start, healthy)
    except RuntimeError as exc:
        pytest.fail(f"the image's CMD did not serve /health ({exc}):\n{log.read_text()}")
    try:
        assert httpx2.get(f"http://127.0.0.1:{port}/").status_code == 200
    finally:
        server.terminate()
        server.wait(10)
    assert os.path.exists(venv / "bin" / "uvicorn")
