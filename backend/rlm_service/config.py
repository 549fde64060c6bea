"""Service configuration: one typed settings model, read from the environment and `.env`.

Nothing else in the service reads `os.environ`; the settings object is built once at start
(or by a test) and handed to whatever needs it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from dotenv import dotenv_values
from pydantic import (
    AliasChoices,
    BeforeValidator,
    ByteSize,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


Size = Annotated[ByteSize, Field(ge=1)]
"""A size in bytes, also written with a unit: `1GiB`, `500 MB`, `64MiB`."""


class ConfigError(Exception):
    """Bad configuration; the message is one line that names the variable."""


ENV_FILES = ("backend/.env", ".env")
"""The `.env` files read at start, relative to the working directory; a later one wins over an earlier one,
and the environment wins over both. `.env` is the repository root's when started from there; `backend/.env`
is where the project this service grew from kept it (and what `.env` means when started from `backend/`)."""


def env_files_found() -> list[Path]:
    """The files of ENV_FILES that exist here, in the order they are read."""
    return [Path(name) for name in ENV_FILES if Path(name).is_file()]


class Settings(BaseSettings):
    """Every knob of the service. Environment variable names are the field names, upper-cased."""

    model_config = SettingsConfigDict(
        env_file=ENV_FILES,
        env_file_encoding="utf-8",
        extra="ignore",
        env_ignore_empty=True,
        populate_by_name=True,
        # `inf` is a float to Python: RLM_EXEC_TIMEOUT_S=inf started a server whose every run failed with an
        # `internal` OverflowError; no time or cost here has a meaning as infinity (unset: no limit)
        allow_inf_nan=False,
    )

    openai_api_base: str = Field(
        "https://api.openai.com/v1",
        validation_alias=AliasChoices("OPENAI_API_BASE", "OPENAI_BASE_URL", "openai_api_base"),
    )
    openai_api_key: SecretStr | None = None
    openai_model_name: str | None = None
    openai_sub_model_name: str | None = None

    rlm_max_iterations: int = Field(20, ge=1, le=1000)
    rlm_max_subcalls: int = Field(1000, ge=1)
    rlm_subcall_concurrency: int = Field(16, ge=1, le=1024)
    rlm_exec_timeout_s: float = Field(300.0, gt=0)
    rlm_max_output_chars: int = Field(8192, ge=200)
    rlm_context_preview_chars: int = Field(500, ge=0)
    rlm_max_input_bytes: Size = ByteSize(1024**3)
    rlm_max_json_bytes: Size = ByteSize(64 * 1024**2)
    """Largest JSON body of `POST /process`; larger inputs go as a multipart upload."""
    rlm_max_prompt_chars: int = Field(100_000, ge=1)
    """Longest prompt: the root model reads it every turn, so long text belongs in the input."""
    rlm_max_concurrent_runs: int = Field(32, ge=1)
    rlm_worker_memory_mb: int = Field(4096, ge=64)
    rlm_worker_processes: int = Field(8, ge=0, le=4096)
    """Processes and threads one run's code may start besides its worker: with RLM_WORKER_MEMORY_MB per
    process, a run's code holds at most (this + 1) × RLM_WORKER_MEMORY_MB."""
    rlm_worker_disk_mb: int = Field(1024, ge=1)
    """Disk one run's files may take in its working directory; past it the worker is stopped and they go."""
    rlm_worker_landlock: Literal["on", "off"] = "on"
    """`off` skips Landlock even where the kernel offers it: what workers get on kernels without it."""
    rlm_worker_network: Literal["off", "on"] = "off"
    rlm_api_token: SecretStr | None = None
    rlm_root_protocol: Literal["tools", "text"] = "tools"
    rlm_repl: str = "subprocess"
    """The REPL kind that runs generated code: `subprocess`, `inprocess`, or one an installed module adds."""

    rlm_session_idle_s: float = Field(1800.0, gt=0)
    """A session (a REPL kept for follow-up questions) ends after this long without a run."""
    rlm_max_sessions: int = Field(16, ge=0)
    """Sessions kept at once; past it, the longest idle one ends. Each holds a worker (RLM_WORKER_MEMORY_MB)."""

    rlm_max_depth: int = Field(1, ge=1, le=8)
    """Depth of recursion: a run at depth d may start child RLMs only if d + 1 < RLM_MAX_DEPTH."""
    rlm_run_timeout_s: float | None = Field(None, gt=0)
    """Wall time of a whole run, its children included."""
    rlm_max_cost_usd: float | None = Field(None, gt=0)
    """Cost of a whole run, its children included, where the endpoint reports it or RLM_PRICES knows it."""
    rlm_prices: dict[str, tuple[float, float]] = {}
    """USD per million input and output tokens, by model: {"gpt-4.1": [2.0, 8.0]} (JSON)."""
    rlm_subcall_timeout_s: float = Field(120.0, gt=0)
    """Wall time of one sub-LLM request (each attempt)."""
    rlm_root_timeout_s: float = Field(300.0, gt=0)
    """Wall time of one root-model request (each attempt)."""
    rlm_model_retries: int = Field(3, ge=0, le=10)
    """Retries of a failed model request (429, 5xx, timeouts) before giving up."""
    rlm_worker_preload: Annotated[list[str], NoDecode, BeforeValidator(_split_csv)] = ["numpy", "matplotlib.pyplot"]
    """Modules imported once by the worker zygote, so that every run's code gets them at no cost."""
    rlm_history_db: str = "~/.local/share/rlm-service/history.sqlite3"
    """Where run history is kept (SQLite); `off` keeps none. Unused when RLM_DATABASE_URL is set."""
    rlm_database_url: SecretStr | None = None
    """A PostgreSQL database (`postgresql://user:password@host:5432/name`) that keeps the run history for every
    process and replica of the service; unset: SQLite at RLM_HISTORY_DB."""
    rlm_body_timeout_s: float = Field(30.0, gt=0)
    """A request body that sends nothing for this long, or arrives slower than RLM_BODY_MIN_RATE after it,
    is refused with 408; a connection whose request head (request line and headers) has not all come this long
    after it opened, or after the response before it, is closed."""
    rlm_body_min_rate: Size = ByteSize(64 * 1024)
    """Bytes per second a request body must average once RLM_BODY_TIMEOUT_S has passed."""
    rlm_send_timeout_s: float = Field(30.0, gt=0)
    """A client that takes longer than this to accept one event of a stream is dropped (its run is
    cancelled unless it was started detached); on Linux, any connection whose client accepts none of the data
    sent to it for this long is closed."""
    rlm_mcp_heartbeat_s: float = Field(10.0, gt=0)
    """An MCP tool call whose run reported nothing for this long sends a progress notification anyway:
    MCP hosts give up on a silent call after tens of seconds."""
    rlm_cors_origins: Annotated[list[str], NoDecode, BeforeValidator(_split_csv)] = []
    """Origins whose pages may call the API from a browser; unset: the service's own page only."""
    rlm_allowed_hosts: Annotated[list[str] | None, NoDecode, BeforeValidator(_split_csv)] = None
    """Host names requests may be addressed to (`Host` header; `*.example.com` allowed). Unset: only
    loopback names when HOST is a loopback address (so DNS rebinding cannot reach a local server),
    any otherwise."""
    rlm_log_level: Literal["debug", "info", "warning", "error"] = "info"

    https_proxy: str | None = None
    http_proxy: str | None = None

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    web_concurrency: int = Field(1, ge=1, le=64)
    """Server processes on HOST:PORT (`python backend/main.py`, `rlm-service serve`); the instance's limits
    hold over all of them."""
    rlm_replica_timeout_s: float = Field(15.0, ge=1)
    """With several processes or replicas: a process that has not been heard from for this long is taken for
    dead, and its live runs end for their followers with `error` code `lost`."""

    @field_validator("web_concurrency")
    @classmethod
    def _processes_need_history(cls, value: int, info: ValidationInfo) -> int:
        history = str(info.data.get("rlm_history_db", "")).strip().lower()
        if value > 1 and info.data.get("rlm_database_url") is None and history in ("", "off", "none", "false"):
            raise ValueError(
                "more than one process needs the run history, where the processes find each other's "
                "runs and sessions: set RLM_HISTORY_DB to a file (or RLM_DATABASE_URL), or "
                "WEB_CONCURRENCY=1"
            )
        return value

    @field_validator("rlm_repl")
    @classmethod
    def _known_repl(cls, value: str) -> str:
        from .repl.base import kinds  # the kinds register themselves as their modules load

        if value not in kinds():
            raise ValueError(f"unknown REPL kind {value!r}; known: {', '.join(kinds())}")
        return value

    @field_validator("openai_api_base")
    @classmethod
    def _check_base(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http(s) URL such as https://api.openai.com/v1")
        if "@" in parts.netloc:  # every request would fail (the key goes in a header), and /api/config shows the base
            raise ValueError("must not hold a user or password: the model server's key goes in OPENAI_API_KEY")
        return value.rstrip("/")

    @field_validator("https_proxy", "http_proxy")
    @classmethod
    def _check_proxy(cls, value: str | None) -> str | None:
        if not value or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("must be an http:// proxy URL such as http://user:password@proxy.example:3128")
        try:
            parts.port  # noqa: B018 (raises on a malformed port)
        except ValueError as exc:
            raise ValueError("has a malformed port") from exc
        return value.strip()

    @field_validator("rlm_database_url")
    @classmethod
    def _check_database(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        url = value.get_secret_value().strip()
        if urlsplit(url).scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a PostgreSQL URL such as postgresql://user:password@host:5432/rlm")
        return SecretStr(url)

    @field_validator("rlm_api_token")
    @classmethod
    def _check_token(cls, value: SecretStr | None) -> SecretStr | None:
        # An HTTP header cannot carry a token's leading or trailing spaces, so no client could send one that
        # has them; a token of spaces only would lock every client out without saying why.
        if value is None:
            return None
        token = value.get_secret_value().strip()
        if not token:
            raise ValueError("is blank: set a token, or leave it unset for a server open to all")
        return SecretStr(token)

    @field_validator("openai_model_name", "openai_sub_model_name")
    @classmethod
    def _strip(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @property
    def allowed_hosts(self) -> list[str]:
        if self.rlm_allowed_hosts is not None:
            return self.rlm_allowed_hosts
        try:
            loopback = ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            loopback = self.host == "localhost"
        return ["localhost", "127.0.0.1", "[::1]", "::1"] if loopback else ["*"]

    @property
    def root_model(self) -> str | None:
        return self.openai_model_name

    @property
    def sub_model(self) -> str | None:
        return self.openai_sub_model_name or self.openai_model_name

    @property
    def endpoint_is_local(self) -> bool:
        """Whether the endpoint is on this machine or a private network (no key needed there)."""
        host = urlsplit(self.openai_api_base).hostname or ""
        if host == "localhost" or host.endswith(".local") or host.endswith(".internal") or "." not in host:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return address.is_private or address.is_loopback or address.is_link_local

    @property
    def api_key_configured(self) -> bool:
        return self.openai_api_key is not None and bool(self.openai_api_key.get_secret_value())

    def api_key_value(self) -> str:
        """The key to send, or a placeholder for local servers that take none."""
        if self.api_key_configured:
            assert self.openai_api_key is not None
            return self.openai_api_key.get_secret_value()
        return "not-needed"

    @property
    def history_path(self) -> Path | None:
        """The SQLite file of the run history; None when history is off or kept in PostgreSQL."""
        value = self.rlm_history_db.strip()
        if self.rlm_database_url is not None or value.lower() in ("", "off", "none", "false"):
            return None
        return Path(value).expanduser()

    @property
    def history_kept(self) -> bool:
        return self.rlm_database_url is not None or self.history_path is not None

    @property
    def coordinated(self) -> bool:
        """Whether other processes may serve this instance's runs and sessions: several processes on one port,
        or a PostgreSQL database that replicas share. They find each other through the history's database."""
        return self.rlm_database_url is not None or self.web_concurrency > 1

    def proxy_for_endpoint(self) -> str | None:
        """The HTTP(S)_PROXY to reach the endpoint through; never for local endpoints."""
        if self.endpoint_is_local:
            return None
        return self.https_proxy if self.openai_api_base.startswith("https:") else self.http_proxy

    def setup_problem(self) -> str | None:
        """Why runs cannot start with this configuration, or None when they can."""
        if not self.openai_model_name:
            return "No model configured: set OPENAI_MODEL_NAME (and OPENAI_API_BASE for a non-OpenAI endpoint)."
        if not self.api_key_configured and not self.endpoint_is_local:
            return (
                f"No API key for {self.openai_api_base}: set OPENAI_API_KEY, "
                "or point OPENAI_API_BASE at a local server."
            )
        return None


def _field_env_name(settings_cls: type[Settings], loc: tuple[object, ...], env_file: object) -> str:
    """The variable a bad value came from: of a field's names, the first one that is set (the one the
    settings read), in the environment or in the `.env` files."""
    name = str(loc[0]) if loc else "?"
    choices = next(
        (
            list(field.validation_alias.choices)
            for field_name, field in settings_cls.model_fields.items()
            if isinstance(field.validation_alias, AliasChoices)
            and name in (field_name, *field.validation_alias.choices)
        ),
        None,
    )
    if choices is None:
        return name.upper()
    names = [str(choice) for choice in choices if str(choice).isupper()]
    given = {key.upper() for key in os.environ}
    files = [env_file] if isinstance(env_file, (str, Path)) else env_file if isinstance(env_file, tuple) else []
    for file in files:
        if isinstance(file, (str, Path)) and Path(file).is_file():
            given |= {key.upper() for key in dotenv_values(file)}
    return next((candidate for candidate in names if candidate in given), names[0])


_UNPARSED_FIELD = re.compile(r'field "(\w+)"')


def load_settings(**overrides: object) -> Settings:
    """Build the settings, turning a validation failure into one line that names the variable."""
    env_file = overrides.get("_env_file", Settings.model_config.get("env_file"))
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except SettingsError as exc:  # a value that had to be JSON (RLM_PRICES) and is not
        field = _UNPARSED_FIELD.search(str(exc))
        name = _field_env_name(Settings, (field.group(1),) if field else (), env_file)
        reason = f"must be JSON ({exc.__cause__})" if exc.__cause__ else str(exc)
        raise ConfigError(f"{name}: {reason}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        name = _field_env_name(Settings, tuple(first["loc"]), env_file)
        given = first.get("input")
        # proxies and database URLs carry passwords, as may any URL with an @
        secret = name in ("OPENAI_API_KEY", "RLM_API_TOKEN", "HTTPS_PROXY", "HTTP_PROXY", "RLM_DATABASE_URL")
        secret = secret or (isinstance(given, str) and "@" in given)
        shown = f" (got {given!r})" if isinstance(given, (str, int, float)) and not secret else ""
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{name}: {message}{shown}") from None
