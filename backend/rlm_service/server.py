"""Starting the service: `rlm-service serve`, `python -m rlm_service serve` and `python backend/main.py`.

Reads the configuration (environment and `.env` files), fails at once with one line naming a bad variable,
hardens the process, and serves the API and the web UI on HOST:PORT with uvicorn.

The event loop is asyncio's own, not uvloop: the REPL workers' channels and pipes are handed to it as
sockets and file descriptors whose ownership uvloop treats differently.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import sys
from asyncio.trsock import TransportSocket
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from .capacity import Capacity
from .config import ENV_FILES, ConfigError, Settings, env_files_found, load_settings
from .security import harden_server_process

log = logging.getLogger("rlm_service")


def configure(**overrides: object) -> Settings:
    """The settings, with logging set up and the process hardened; exits with status 2 and one line on
    stderr when the configuration is bad."""
    try:
        settings = load_settings(**overrides)
        if settings.history_path is not None:
            from .store_sqlite import location_problem

            if problem := location_problem(settings.history_path):
                raise ConfigError(f"RLM_HISTORY_DB: {problem}; set it to a file that can be written, or to off")
    except ConfigError as exc:
        bad_configuration(exc)
    logging.basicConfig(level=settings.rlm_log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "openai"):  # one line per request would drown the one line per run
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if settings.rlm_database_url is not None:  # after the logging's set-up: the wait for the database is logged
        from .store_postgres import reach_problem

        if problem := reach_problem(settings.rlm_database_url.get_secret_value()):
            bad_configuration(problem)
    read = env_files_found()
    if read:
        log.info(
            "Settings read from the environment, then %s: the first that sets a variable wins.",
            ", then ".join(str(path) for path in reversed(read)),
        )
    else:
        log.info(
            "Settings read from the environment; no .env file here (looked for %s in %s).",
            " and ".join(reversed(ENV_FILES)),
            Path.cwd(),
        )
    harden_server_process()
    raise_open_files_limit()
    problem = settings.setup_problem()
    if problem:
        log.warning("%s /health and the UI work; /process answers 503.", problem)
    return settings


def bad_configuration(problem: object) -> NoReturn:
    """End the start with status 2 and one line on stderr."""
    print(f"Configuration error: {problem}", file=sys.stderr)
    raise SystemExit(2) from None


def raise_open_files_limit() -> None:
    """Let the server open as many files as its hard limit allows: each stream, sub-call and worker holds
    descriptors (32 runs of 16 sub-calls each hold 512 connections to the model server alone), and the soft
    limit many systems start a process with, 1024, is below what the default limits let runs use. The
    workers get a limit of their own (`sandbox.set_limits`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError) as exc:  # (a hard limit past the kernel's nr_open)
            log.warning("could not raise the limit of open files from %d: %s", soft, exc)


def build_app(settings: Settings, *, runs: Capacity | None = None, sessions: Capacity | None = None) -> FastAPI:
    """The application, with the collector settled on what the imports left behind. `runs` and `sessions`
    count over every process of the instance when it has several (`supervisor`)."""
    from .api import create_app
    from .runtime import settle_heap

    app = create_app(settings, runs=runs, sessions=sessions)
    settle_heap()
    return app


def serve(settings: Settings, app: FastAPI) -> None:
    """Serve `app` on the configured host and port until stopped."""
    processes = settings.web_concurrency
    print(
        f"RLM service on http://{settings.host}:{settings.port} "
        f"(model: {settings.root_model or 'not set'}, REPL: {settings.rlm_repl}"
        + (f", {processes} processes" if processes > 1 else "")
        + ")",
        flush=True,
    )
    if processes > 1:
        from .supervisor import serve_processes

        serve_processes(settings, processes)
        return
    try:
        check_address(settings.host, settings.port)
    except OSError as exc:
        refuse_address(settings, exc)
    run_uvicorn(app, settings, host=settings.host, port=settings.port)


def refuse_address(settings: Settings, problem: OSError) -> NoReturn:
    """End the start when HOST:PORT cannot be listened on, with one line naming both variables (uvicorn's line, or
    the traceback of a bind, named neither); one process or several, the same words."""
    log.error("cannot listen on %s:%s (HOST, PORT): %s", settings.host, settings.port, problem)
    raise SystemExit(1) from None


def check_address(host: str, port: int) -> None:
    """Raise OSError when uvicorn could not listen on `host`:`port` (a port in use, a HOST that is no address of
    this machine): each address the host names is bound as asyncio binds it, then let go. A family the machine
    makes no socket of (IPv6 turned off, where `localhost` still names ::1) is skipped, as asyncio skips it,
    unless no address is left."""
    bound, unsupported = 0, None
    for family, kind, proto, _, address in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        try:
            probe = socket.socket(family, kind, proto)
        except OSError as exc:
            unsupported = exc
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(address)
        bound += 1
    if not bound and unsupported is not None:
        raise unsupported


def drop_stalled_clients(listener: socket.socket | TransportSocket, seconds: float) -> None:
    """Connections accepted on `listener` end, by the kernel, once data sent on them has gone unacknowledged
    (a client that reads nothing: its window stays closed) for `seconds`, RLM_SEND_TIMEOUT_S. A stream whose client
    does not accept an event in that time is dropped by sse-starlette, but uvicorn's close of such a connection
    waits for its unsent bytes (up to an event: a figure is megabytes) to go out, which they never do: the
    connection and its buffer stayed for as long as the client kept it open. Linux only (TCP_USER_TIMEOUT)."""
    if hasattr(socket, "TCP_USER_TIMEOUT") and listener.family in (socket.AF_INET, socket.AF_INET6):
        milliseconds = min(max(seconds * 1000, 1), 2**31 - 1)  # (the option is a C int)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(milliseconds))


class RequestHeadDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's head (request line and headers):
    `head_timeout_s` after the connection opened, or after the response before it, a connection still
    waiting for a whole head is closed. uvicorn has none: its keep-alive timer stops at the first byte
    received, and the app (which times bodies, `uploads`) sees a request only once its head is complete, so a
    client sending a head a byte at a time, or nothing at all, held its connection (a file descriptor) for as
    long as it liked, and enough such clients left the server none to accept anyone else with."""

    head_timeout_s = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_deadline: asyncio.TimerHandle | None = None
        self.await_head()

    def await_head(self) -> None:
        """Close the connection unless the head of a request after the current one (`scope`, which uvicorn
        makes anew for each head, upgrades too) has come whole within `head_timeout_s`. After a response the
        wait starts at once, whatever h11's state: a response sent before its request's body was read (404,
        413, 401) leaves the rest of that body to come before the next head, within the same time."""
        self.head_after = self.scope
        self.head_deadline = self.loop.call_later(self.head_timeout_s, self.head_late)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.head_deadline is not None and self.scope is not self.head_after:  # a whole head came
            self.head_deadline.cancel()
            self.head_deadline = None

    def on_response_complete(self) -> None:
        answered = self.scope
        super().on_response_complete()
        # unless a pipelined request's head had come whole already
        if self.head_deadline is None and self.scope is answered and not self.transport.is_closing():
            self.await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None
        super().connection_lost(exc)

    def head_late(self) -> None:
        self.head_deadline = None
        if self.scope is self.head_after and not self.transport.is_closing():
            self.transport.close()


def run_uvicorn(app: FastAPI, settings: Settings, sockets: list[socket.socket] | None = None, **config: Any) -> None:
    """Serve `app` with uvicorn until a signal stops it. The signal goes to the app at once (`stop_runs`), and
    sse-starlette ends the streams still open only after the app's runs have ended (by default it would end them
    at the signal, cutting an MCP call's stream before its answer); uvicorn itself tells an app only after its
    grace for open connections, too late for their runs' ends. The grace (8 s) covers STOP_RUNS_S, then a
    follower's SHUTDOWN_GRACE_S; the app's own shutdown comes after it (writing what is left of the history,
    leaving the database's registry of processes), which may take a stop past the 10 s `docker stop` waits
    when the database does not answer."""
    import uvicorn
    from sse_starlette.sse import AppStatus

    from .api import stop_runs

    def end_streams() -> None:
        AppStatus.should_exit = True

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            for server in self.servers:
                for listener in server.sockets:
                    drop_stalled_clients(listener, settings.rlm_send_timeout_s)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if first:
                stop_runs(app, then=end_streams)

    class Protocol(RequestHeadDeadline):
        head_timeout_s = settings.rlm_body_timeout_s

    options = uvicorn.Config(
        app, log_level=settings.rlm_log_level, loop="asyncio", http=Protocol, timeout_graceful_shutdown=8, **config
    )
    AppStatus.enable_automatic_graceful_drain = False  # `end_streams` ends them instead
    try:
        Server(options).run(sockets=sockets)
    except KeyboardInterrupt:
        pass  # uvicorn raises Ctrl-C's signal again once it has stopped: the stop was clean
    finally:
        AppStatus.enable_automatic_graceful_drain, AppStatus.should_exit = True, False
