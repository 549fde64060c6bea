"""Configuration: environment and .env, one clear line for a bad value, secrets kept secret."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest

from rlm_service.config import ConfigError, Settings, load_settings
from tests.conftest import free_port, script, spawn_server, start_on_free_port, stream_run

MAIN = Path(__file__).resolve().parents[1] / "backend" / "main.py"


def clean_env(**values: str) -> dict[str, str]:
    """The environment without the service's variables; the history off unless asked for."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "RLM_", "HOST", "PORT"))}
    env.update({"RLM_HISTORY_DB": "off", **values})
    return env


def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLM_MAX_ITERATIONS", "many")
    with pytest.raises(ConfigError) as error:
        load_settings(_env_file=None)
    assert str(error.value).startswith("RLM_MAX_ITERATIONS:") and "'many'" in str(error.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RLM_REPL", "docker"),
        ("OPENAI_API_BASE", "ftp://x"),
        ("OPENAI_BASE_URL", "ftp://x"),
        ("RLM_WORKER_NETWORK", "maybe"),
        ("PORT", "99999"),
        ("HTTPS_PROXY", "socks5://proxy:1080"),
        ("HTTP_PROXY", "http://p:port"),
    ],
)
def test_each_bad_variable_is_named(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    for other in ("OPENAI_API_BASE", "OPENAI_BASE_URL"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"^{name}:"):
        load_settings(_env_file=None)


@pytest.mark.parametrize("name", ["RLM_EXEC_TIMEOUT_S", "RLM_RUN_TIMEOUT_S", "RLM_MAX_COST_USD"])
def test_an_infinite_time_or_cost_is_refused_at_start(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """`RLM_EXEC_TIMEOUT_S=inf` was taken: the server started, and every run failed at its first cell with
    `internal` "OverflowError: cannot convert float infinity to integer". Infinity is refused, in one line that
    names the variable, for every time and cost. Mutant: the settings without `allow_inf_nan=False`."""
    monkeypatch.setenv(name, "inf")
    with pytest.raises(ConfigError, match=f"^{name}: Input should be a finite number"):
        load_settings(_env_file=None)


def test_an_api_token_of_spaces_is_refused_and_one_with_spaces_around_it_is_the_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`RLM_API_TOKEN="  "` started a server that refused every client (a header cannot carry the spaces), with
    nothing said; spaces around a token kept clients out the same way (found by the attack pass)."""
    monkeypatch.setenv("RLM_API_TOKEN", "   ")
    with pytest.raises(ConfigError, match=r"^RLM_API_TOKEN: .*blank"):
        load_settings(_env_file=None)
    monkeypatch.setenv("RLM_API_TOKEN", " tok-secret \n")
    token = load_settings(_env_file=None).rlm_api_token
    assert token is not None and token.get_secret_value() == "tok-secret"


def test_a_bad_value_in_the_env_file_is_named_as_written_there(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for other in ("OPENAI_API_BASE", "OPENAI_BASE_URL"):
        monkeypatch.delenv(other, raising=False)
    (tmp_path / ".env").write_text("OPENAI_BASE_URL=ftp://x\n")
    with pytest.raises(ConfigError, match=r"^OPENAI_BASE_URL:"):
        load_settings(_env_file=tmp_path / ".env")


def test_a_bad_proxy_is_named_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "https://user:hunter2@proxy.example:3128")
    with pytest.raises(ConfigError, match=r"^HTTPS_PROXY: must be an http:// proxy URL") as error:
        load_settings(_env_file=None)
    assert "hunter2" not in str(error.value)
    monkeypatch.setenv("HTTPS_PROXY", " ")
    assert load_settings(_env_file=None).https_proxy is None


def test_a_model_server_url_holding_a_password_is_refused_without_showing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Old behaviour (the attack pass): accepted; every run then failed (`internal`), and /api/config showed the
    password."""
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("OPENAI_API_BASE", "https://user:hunter2@models.example/v1")
    with pytest.raises(ConfigError, match=r"^OPENAI_API_BASE: must not hold a user or password") as error:
        load_settings(_env_file=None)
    assert "hunter2" not in str(error.value) and "OPENAI_API_KEY" in str(error.value)


def test_a_database_url_picks_postgresql_and_a_bad_one_is_named_without_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RLM_DATABASE_URL", "mysql://rlm:hunter2@db:3306/rlm")
    with pytest.raises(ConfigError, match=r"^RLM_DATABASE_URL: must be a PostgreSQL URL") as error:
        load_settings(_env_file=None)
    assert "hunter2" not in str(error.value)
    monkeypatch.setenv("RLM_DATABASE_URL", "postgres://rlm:hunter2@db:5432/rlm")  # as Render and Heroku write it
    settings = load_settings(_env_file=None)
    assert settings.history_kept and settings.history_path is None and "hunter2" not in repr(settings)
    monkeypatch.setenv("RLM_DATABASE_URL", "")
    assert load_settings(_env_file=None).rlm_database_url is None


def test_env_file_and_aliases_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("OPENAI_", "RLM_")):
            monkeypatch.delenv(key)
    (tmp_path / ".env").write_text(
        "OPENAI_BASE_URL=http://localhost:11434/v1\nOPENAI_MODEL_NAME=llama3\n"
        "RLM_MAX_INPUT_BYTES=500MB\nRLM_CORS_ORIGINS=http://a.test, http://b.test\n"
        "OPENAI_SUB_MODEL_NAME=\n"
    )
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.openai_api_base == "http://localhost:11434/v1"
    assert settings.root_model == settings.sub_model == "llama3"
    assert settings.rlm_max_input_bytes == 500_000_000
    assert settings.rlm_cors_origins == ["http://a.test", "http://b.test"]
    assert settings.endpoint_is_local and settings.setup_problem() is None


def test_secrets_never_show_in_repr() -> None:
    settings = Settings(_env_file=None, openai_api_key="sk-very-secret", rlm_api_token="tok-secret")  # type: ignore[call-arg]
    assert "sk-very-secret" not in repr(settings) and "tok-secret" not in str(settings.model_dump())


def test_remote_endpoint_without_key_is_a_setup_problem() -> None:
    settings = Settings(_env_file=None, openai_model_name="gpt-x")  # type: ignore[call-arg]
    assert "OPENAI_API_KEY" in (settings.setup_problem() or "")
    assert "OPENAI_MODEL_NAME" in (Settings(_env_file=None).setup_problem() or "")  # type: ignore[call-arg]


def test_main_fails_at_start_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, str(MAIN)], env=clean_env(RLM_EXEC_TIMEOUT_S="-3"), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Configuration error: RLM_EXEC_TIMEOUT_S:")


@pytest.mark.parametrize("where", ["a folder", "a text file", "under a file"])
def test_a_history_file_that_cannot_be_one_fails_at_start_with_one_line(tmp_path: Path, where: str) -> None:
    """RLM_HISTORY_DB naming a folder, a file that is not SQLite, or a path under a file: the server printed
    its first line, then the store's error in a 46-line traceback out of the app's startup, and exited 3.
    Mutant: `configure` without `location_problem` (that traceback again)."""
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    path = {"a folder": tmp_path, "a text file": text, "under a file": text / "history.sqlite3"}[where]
    result = subprocess.run(
        [sys.executable, str(MAIN)],
        env=clean_env(RLM_HISTORY_DB=str(path), OPENAI_MODEL_NAME="m", PORT=str(free_port())),
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Configuration error: RLM_HISTORY_DB: {path} cannot hold the run history ("), lines
    assert text.read_text() == "not a database\n"


def test_a_database_that_cannot_be_reached_fails_at_start_with_one_line() -> None:
    """RLM_DATABASE_URL naming a port where no PostgreSQL listens: the app's startup waited for it (30 s), then
    ended the start with a 40-line traceback of its lifespan. Mutant: `configure` without `reach_problem`."""
    result = subprocess.run(
        [sys.executable, str(MAIN)],
        env=clean_env(
            RLM_DATABASE_URL=f"postgresql://rlm:hunter2@127.0.0.1:{free_port()}/rlm",
            OPENAI_MODEL_NAME="m",
            PORT=str(free_port()),
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Configuration error: RLM_DATABASE_URL: the database cannot be reached: "), result.stderr
    assert "hunter2" not in result.stderr


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_port_in_use_fails_with_one_line_naming_host_and_port(tmp_path: Path, processes: str) -> None:
    """A port another program holds (or a HOST that is no address): with WEB_CONCURRENCY=2 the supervisor ended
    with a 13-line traceback (OSError: Address already in use); one process started the app, then ended with
    uvicorn's line, which named neither HOST nor PORT. Mutants: `serve_processes` without its `except OSError`;
    `serve` without `check_address`."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(MAIN)],
            env=clean_env(
                WEB_CONCURRENCY=processes,
                RLM_HISTORY_DB=str(tmp_path / "h.sqlite3"),
                OPENAI_MODEL_NAME="m",
                PORT=str(port),
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot listen on 127.0.0.1:{port} (HOST, PORT): [Errno 98] Address already in use" in result.stderr


def test_the_address_check_skips_a_family_the_machine_has_no_sockets_of(monkeypatch: pytest.MonkeyPatch) -> None:
    """HOST=localhost where IPv6 is turned off: /etc/hosts still names ::1, whose socket cannot be made, and
    uvicorn (asyncio) skips it and listens on 127.0.0.1. Old behaviour caught: the check raised, so the server
    refused to start where it would have served; with no family left, it still says why."""
    from rlm_service.server import check_address

    port = free_port()
    both = [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
    ]
    make = socket.socket

    def without_ipv6(family: int = socket.AF_INET, *args: object) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return make(family, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "socket", without_ipv6)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: both)
    check_address("localhost", port)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: both[:1])
    with pytest.raises(OSError, match="Address family not supported"):
        check_address("::1", port)


def test_main_honours_host_and_port_and_hides_the_key(tmp_path: Path) -> None:
    env = clean_env(
        HOST="127.0.0.1",
        OPENAI_API_KEY="sk-hide-me-123",
        OPENAI_API_BASE="http://127.0.0.1:9/v1",
        OPENAI_MODEL_NAME="m",
        RLM_HISTORY_DB=str(tmp_path / "history.sqlite3"),
    )

    def start(port: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, str(MAIN)],
            env={**env, "PORT": str(port)},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def healthy(port: int) -> bool:
        try:
            return httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1).json() == {"status": "ok"}
        except httpx2.TransportError:
            return False

    process, port = start_on_free_port(start, healthy)
    try:
        with open(f"/proc/{process.pid}/environ", "rb") as handle:
            assert b"sk-hide-me-123" not in handle.read()
        config = httpx2.get(f"http://127.0.0.1:{port}/api/config").text
        assert "sk-hide-me-123" not in config and '"key_configured":true' in config
    finally:
        process.terminate()
        assert process.stdout is not None
        output = process.communicate(timeout=10)[0].decode()
    assert "sk-hide-me-123" not in output


def test_secrets_are_wiped_from_the_environment_whatever_the_case_of_their_names() -> None:
    """The settings read `openai_api_key=…` as the key, and RLM_DATABASE_URL holds the database's password: both
    leave the process's environment (`/proc/<pid>/environ` and `os.environ`). Old behaviour caught (the review):
    the names were compared exactly, and the database URL was not wiped (0 values wiped, both still there)."""
    code = (
        "import os\n"
        "from rlm_service.security import wipe_secrets_from_environment\n"
        "print(wipe_secrets_from_environment())\n"
        "print(open('/proc/self/environ', 'rb').read().count(b'hunter2'))\n"
        "print(sum('hunter2' in value for value in os.environ.values()))"
    )
    env = {
        **clean_env(),
        "PYTHONPATH": str(MAIN.parent),
        "openai_api_key": "sk-hunter2-lower",
        "RLM_DATABASE_URL": "postgresql://rlm:hunter2@db/rlm",
    }
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["2", "0", "0"], result.stdout + result.stderr


def test_env_example_is_a_valid_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("OPENAI_", "RLM_")):
            monkeypatch.delenv(key)
    (tmp_path / ".env").write_text((MAIN.parents[1] / ".env.example").read_text())
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.root_model == "gpt-4.1" and settings.rlm_max_depth == 1 and settings.rlm_prices == {}
    assert settings.rlm_run_timeout_s is None and settings.history_path is not None
    names = {
        line.split("=", 1)[0]
        for line in (MAIN.parents[1] / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    documented = {name.upper() for name in Settings.model_fields} | {"OPENAI_API_BASE"}
    assert names <= documented
    assert {name.upper() for name in Settings.model_fields} - {"OPENAI_API_BASE"} <= names | {"OPENAI_API_BASE"}


def test_the_readme_lists_every_variable_with_its_default() -> None:
    """README's configuration table names every setting the server reads (mutant: a new setting added to
    Settings and .env.example only), and the defaults it states for the guards are the code's."""
    readme = (MAIN.parents[1] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `")]
    listed = {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])}
    assert {name.upper() for name in Settings.model_fields} - listed == set()
    cors = next(row for row in rows if row.startswith("| `RLM_CORS_ORIGINS`"))
    assert Settings.model_fields["rlm_cors_origins"].default == [] and "unset: the service's own page only" in cors


def test_prices_are_read_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLM_PRICES", '{"gpt-4.1": [2, 8]}')
    assert load_settings(_env_file=None).rlm_prices == {"gpt-4.1": (2.0, 8.0)}


def test_main_keeps_the_collector_off_the_imported_modules() -> None:
    """The service's process leaves what it imported to the permanent generation, so that a full garbage
    collection during runs walks only what runs create (it used to stall the event loop for ~100 ms)."""
    probe = (
        "import gc, sys; sys.path.insert(0, sys.argv[1]); import main; "
        "from rlm_service.runtime import GC_YOUNG_THRESHOLD; "
        "print(gc.get_freeze_count(), len(gc.get_objects()), gc.get_threshold()[0], GC_YOUNG_THRESHOLD)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(MAIN.parent)], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    frozen, walked, threshold, configured = map(int, result.stdout.split())
    assert frozen > 50_000 and walked < frozen / 5
    assert threshold == configured > 700


def _start_main(cwd: Path, **env: str) -> tuple[dict[str, object], str]:
    """Start `python backend/main.py` in `cwd`; its `/api/config` and what it logged at start."""
    env = clean_env(RLM_LOG_LEVEL="info", RLM_HISTORY_DB="off", **env)

    def start(port: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, str(MAIN)],
            cwd=cwd,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env={**env, "PORT": str(port)},
        )

    def serving(port: int) -> bool:
        try:
            return httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx2.TransportError:
            return False

    process, port = start_on_free_port(start, serving)
    try:
        config = httpx2.get(f"http://127.0.0.1:{port}/api/config", timeout=10).json()
    finally:
        process.terminate()
        log = process.communicate(timeout=10)[1].decode()
    return config, log


def test_both_env_files_are_read_and_named_at_start(tmp_path: Path) -> None:
    """Started from the repository's root, the server reads `.env` and `backend/.env` (a variable set in
    both comes from `.env`) and its log says which files it read; started in `backend/`, that one is `.env`.
    Mutant: ENV_FILES without "backend/.env"."""
    (tmp_path / "backend").mkdir()
    (tmp_path / ".env").write_text("OPENAI_MODEL_NAME=from-root\n")
    (tmp_path / "backend" / ".env").write_text(
        "OPENAI_MODEL_NAME=from-backend\nOPENAI_API_BASE=http://127.0.0.1:9/v1\n"
        "OPENAI_SUB_MODEL_NAME=sub-from-backend\n"
    )
    config, log = _start_main(tmp_path)
    assert config["model"] == "from-root" and config["sub_model"] == "sub-from-backend"
    assert "Settings read from the environment, then .env, then backend/.env: the first that sets a variable" in log
    config, log = _start_main(tmp_path / "backend")
    assert config["model"] == "from-backend" and "Settings read from the environment, then .env:" in log
    config, log = _start_main(tmp_path / "backend", OPENAI_MODEL_NAME="from-environment")
    assert config["model"] == "from-environment"


def test_no_env_file_is_said_too(tmp_path: Path) -> None:
    _, log = _start_main(tmp_path, OPENAI_MODEL_NAME="m", OPENAI_API_BASE="http://127.0.0.1:9/v1")
    assert f"no .env file here (looked for .env and backend/.env in {tmp_path})" in log


def test_a_value_that_must_be_json_is_named_in_one_line(tmp_path: Path) -> None:
    """`RLM_PRICES='{bad json'` in the environment or a `.env` file: one line naming it, no traceback.
    Mutant: `load_settings` without its `SettingsError` case."""
    result = subprocess.run(
        [sys.executable, str(MAIN)],
        env=clean_env(RLM_PRICES="{bad json"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and result.stderr.strip().split("\n") == [
        "Configuration error: RLM_PRICES: must be JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1))"
    ]
    (tmp_path / "backend").mkdir()
    (tmp_path / "backend" / ".env").write_text("RLM_PRICES=[1, 2\n")
    with pytest.raises(ConfigError, match=r"^RLM_PRICES: must be JSON"):
        load_settings(_env_file=(tmp_path / "backend" / ".env",))


TAGGING_KIND = '''
"""A REPL kind of its own: the in-process REPL, whose every cell first sets `repl_kind`."""

from rlm_service.repl.base import register
from rlm_service.repl.inprocess_repl import InprocessBackend


class TaggingRepl:
    def __init__(self, inner):
        self.inner = inner

    async def start(self):
        await self.inner.start()

    async def execute(self, code, timeout, calls):
        return await self.inner.execute("repl_kind = 'tagging'\\n" + code, timeout, calls)

    async def begin_run(self, timeout):
        return await self.inner.begin_run(timeout)

    async def close(self):
        await self.inner.close()


@register("tagging")
class TaggingBackend(InprocessBackend):
    def make(self, workspace, options):
        return TaggingRepl(super().make(workspace, options))
'''


def test_a_new_repl_kind_is_one_module_that_an_installed_package_names(tmp_path: Path) -> None:
    """A module of another package, named under the `rlm_service.repl` entry-point group, adds a kind that
    RLM_REPL can choose; the server then runs cells through it. Mutants: RLM_REPL checked against a fixed list
    of kinds (the server refuses to start); kinds looked up without loading the entry points (likewise)."""
    site = tmp_path / "site"
    (site / "tagging_kind-1.0.dist-info").mkdir(parents=True)
    (site / "tagging_kind.py").write_text(TAGGING_KIND)
    (site / "tagging_kind-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: tagging-kind\n")
    (site / "tagging_kind-1.0.dist-info" / "entry_points.txt").write_text(
        "[rlm_service.repl]\ntagging = tagging_kind\n"
    )
    prompt = script({"code": ["answer.update(content=repl_kind, ready=True)"]})
    with spawn_server(tmp_path, RLM_REPL="tagging", PYTHONPATH=str(site)) as server:
        _, events = stream_run(server.url, json_body={"prompt": prompt, "input_data": "x"})
    assert events[0].data["repl"] == "tagging"
    assert events[-1].event == "final" and events[-1].data["answer"] == "tagging"
