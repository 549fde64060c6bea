"""The package installs: `pip install .` gives `rlm-service`, and `cd backend && pip install -r requirements.txt`
works, as the project this service grew from told its users.

The package is built from a copy of the sources (a build writes `build/` beside them) and installed with
`--no-deps --no-build-isolation` into a new virtualenv, which reaches the test environment's packages
(its dependencies, pip and setuptools) through a `.pth` file: nothing is downloaded, and what is tested is
the wheel's contents, its metadata and its command, run from outside the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from tests.conftest import REPO, free_port, script
from tests.fake_openai import FakeOpenAI

pytestmark = pytest.mark.install


def _requirements() -> list[str]:
    lines = (REPO / "requirements.txt").read_text().split("\n")
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A new virtualenv with the package installed from a copy of the checkout."""
    base = tmp_path_factory.mktemp("install")
    source = base / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", ".env")
    for name in ("backend", "frontend"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(REPO / name, source / name)
    env_dir = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=60)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    parents = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "test-environment.pth").write_text("\n".join(sorted(parents)) + "\n")
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(source)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    yield env_dir


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "RLM_", "PYTHON"))}
    env.update({"RLM_HISTORY_DB": "off", "RLM_WORKER_PRELOAD": "numpy", **extra})
    return env


def _run(venv: Path, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_the_package_installs_with_its_command_and_dependencies(venv: Path, tmp_path: Path) -> None:
    """`rlm-service` and `python -m rlm_service` come from the installed package, not the checkout, and
    the package's dependencies are requirements.txt's, pin for pin."""
    where = _run(
        venv,
        "python",
        "-c",
        "import rlm_service, importlib.metadata as m; print(rlm_service.__file__); "
        "print('\\n'.join(m.requires('rlm-service')))",
        cwd=tmp_path,
    )
    location, *requires = where.stdout.strip().split("\n")
    assert location.startswith(str(venv)), location
    assert requires == _requirements()
    helped = _run(venv, "rlm-service", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "{serve,run,attach,cancel,session,mcp,sample}" in helped.stdout
    sample = _run(venv, "python", "-m", "rlm_service", "sample", "records", "--count", "2", cwd=tmp_path)
    assert sample.returncode == 0 and sample.stdout.startswith("=== BOOK #0001 ===")


def test_the_installed_command_serves_the_page_and_runs(venv: Path, tmp_path: Path) -> None:
    """`rlm-service serve` serves the page from the package's data and runs tasks in its REPL workers;
    `rlm-service run` runs them in the command, and against that server."""
    fake = FakeOpenAI().start()
    port = free_port()
    models = {"OPENAI_API_BASE": fake.url, "OPENAI_MODEL_NAME": "root-model", "OPENAI_SUB_MODEL_NAME": "sub"}
    server = subprocess.Popen(
        [str(venv / "bin" / "rlm-service"), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=_env(RLM_LOG_LEVEL="warning", **models),
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                page = httpx2.get(f"{url}/", timeout=2)
                break
            except httpx2.TransportError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.2)
        assert page.status_code == 200 and page.content == (REPO / "frontend" / "index.html").read_bytes()
        prompt = script({"code": ["answer.update(content=f'{len(context)} characters', ready=True)"]})
        here = _run(venv, "rlm-service", "run", prompt, "--input", str(REPO / "README.md"), cwd=tmp_path, **models)
        size = len((REPO / "README.md").read_text())
        assert here.returncode == 0 and here.stdout == f"{size} characters\n", here.stderr
        there = _run(
            venv, "rlm-service", "run", prompt, "--input", str(REPO / "README.md"), "--server", url, cwd=tmp_path
        )
        assert there.returncode == 0 and there.stdout == f"{size} characters\n", there.stderr
    finally:
        server.terminate()
        server.wait(10)
        fake.stop()


def test_backend_requirements_install_from_the_backend_directory() -> None:
    """`cd backend && pip install -r requirements.txt` finds the runtime requirements (checked without a
    download: every pin must already be satisfied here, as the test environment has them)."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-r", "requirements.txt"],
        cwd=REPO / "backend",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for requirement in _requirements():
        name = requirement.split("[")[0].split("=")[0]
        assert f"Requirement already satisfied: {name}" in result.stdout, name
    assert "Would install" not in result.stdout
