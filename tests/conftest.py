"""Shared fixtures: the fake OpenAI server, settings pointing at it, the app under uvicorn, SSE reading.

The suite leaves the machine alone and is left alone by it: a session gets a fresh TMPDIR and HOME
(nothing is read from or written to the real ones), it counts only processes it started itself (it is
the subreaper of everything below it, so even orphans stay countable), and servers listen on sockets
bound before they start, never on a port picked and then hoped free.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import pytest
import uvicorn

from rlm_service.api import create_app
from rlm_service.config import Settings
from rlm_service.repl import workspace as workspace_module
from rlm_service.store import RunRecord
from tests.fake_openai import FakeOpenAI
from tests.pgserver import own_pg_server, pg_server, pg_url, store_factory  # noqa: F401 (fixtures of every test module)

REPO = Path(__file__).resolve().parents[1]
ROOT_MODEL = "root-model"
SUB_MODEL = "sub-model"
PR_SET_CHILD_SUBREAPER = 36
T = TypeVar("T")
_session: dict[str, Path] = {}


def pytest_configure(config: pytest.Config) -> None:
    """A fresh TMPDIR and HOME for the session, and this process the subreaper of all it starts."""
    root = Path(tempfile.mkdtemp(prefix="test-session-"))
    root.chmod(0o711)  # workers run under uids of their own and must reach their directories below it
    home = root / "home"
    home.mkdir()
    os.environ.update(TMPDIR=str(root), HOME=str(home))
    for name in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        os.environ.pop(name, None)
    tempfile.tempdir = str(root)
    _session["root"] = root
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def pytest_unconfigure(config: pytest.Config) -> None:
    root = _session.pop("root", None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


def private_tempdir() -> Path:
    """A new directory in the session's TMPDIR that workers of any uid can traverse."""
    path = Path(tempfile.mkdtemp(prefix="tmp-"))
    path.chmod(0o711)
    return path


def run_leftovers(tmp: Path) -> list[str]:
    """What runs left in a server's TMPDIR, relative to it: everything but the zygote's matplotlib cache
    (kept for the next zygote) and the server processes' instance directories themselves (their contents,
    run directories and spooled uploads, do count). A directory the server removes while it is walked is walked
    again."""
    for _ in range(20):
        with contextlib.suppress(FileNotFoundError):
            return _leftovers(tmp)
    return _leftovers(tmp)


def _leftovers(tmp: Path) -> list[str]:
    found = []
    for path in sorted(tmp.rglob("*")):
        relative = path.relative_to(tmp)
        if relative.parts[0].startswith("rlm-matplotlib-"):
            continue
        if len(relative.parts) == 1 and path.is_dir() and relative.name.startswith("rlm-instance-"):
            continue
        found.append(str(relative))
    return found


async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
    """Answer a proxy's `CONNECT` (already read from `reader`) and relay bytes both ways to 127.0.0.1:`port`."""
    upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
        sink.close()

    await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer), return_exceptions=True)


def self_signed_certificate(folder: Path, alt_names: str = "DNS:localhost") -> tuple[Path, Path]:
    """A one-day self-signed certificate for `localhost` (and `alt_names`) and its key, made by openssl."""
    openssl = require_tool("openssl", "to make a certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
    subprocess.run(
        [openssl, *request, "-keyout", str(key), "-out", str(cert), "-addext", f"subjectAltName={alt_names}"],
        check=True,
        capture_output=True,
    )
    return cert, key


def require_tool(name: str, why: str) -> str:
    """The path of a command the test needs: missing, it fails under CI (which installs it) and skips elsewhere."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")  # (servers, off a user's PATH)
    if found is None:
        message = f"needs the `{name}` command {why} (apt-get install {name})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(root_model=ROOT_MODEL).start()
    yield server
    server.stop()


def make_settings(fake: FakeOpenAI | None = None, **overrides: Any) -> Settings:
    """Settings for tests: never read from the environment's .env, pointed at the fake server."""
    values: dict[str, Any] = {
        "openai_api_base": fake.url if fake else "http://127.0.0.1:9/v1",
        "openai_model_name": ROOT_MODEL,
        "openai_sub_model_name": SUB_MODEL,
        "openai_api_key": "sk-test-key",
        "rlm_model_retries": 2,
        "rlm_exec_timeout_s": 30,
        "rlm_worker_preload": ["numpy"],  # matplotlib costs a second per zygote; tests that plot import it
        "rlm_history_db": "off",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def free_port() -> int:
    """A port free a moment ago: for a process that cannot be handed a socket (see `start_on_free_port`),
    or as an address where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_on_free_port(
    start: Callable[[int], subprocess.Popen[bytes]],
    ready: Callable[[int], bool],
    timeout: float = 60,
    *,
    stderr: Path | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server process on a free port and wait until `ready(port)`. Another process on the machine
    may take the port between our check and the server's bind: the server then exits, and we try another.
    `stderr`: the file the server writes its stderr to, whose end a server that never gets ready is failed with."""
    for _ in range(3):
        port = free_port()
        process = start(port)
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            if ready(port):
                return process, port
            time.sleep(0.1)
        if process.poll() is None:
            process.kill()
            process.wait(10)
            said = stderr.read_text(errors="replace")[-3000:] if stderr is not None and stderr.exists() else ""
            raise RuntimeError(
                f"the server did not become ready within {timeout:g} s" + (f"; its stderr:\n{said}" if said else "")
            )
    raise RuntimeError("the server exited at start three times (is the port taken each time?)")


class LiveServer:
    """The real app under uvicorn in a thread, on a socket bound to a free port before it starts."""

    def __init__(self, settings: Settings, **app_kwargs: Any) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.app = create_app(settings, **app_kwargs)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()


@pytest.fixture
def live(fake: FakeOpenAI) -> Iterator[LiveServer]:
    with LiveServer(make_settings(fake)) as server:
        yield server


@dataclass
class SseEvent:
    event: str
    data: dict[str, Any]


class SseFrames:
    """Server-Sent Events fed one line at a time: `event:` names, `data:` lines joined (one space after
    the colon dropped, as the format says), comments skipped, a blank line completing an event."""

    def __init__(self) -> None:
        self.name, self.data = "message", []

    def feed(self, line: str) -> tuple[str, Any] | None:
        """The (name, parsed JSON data) this line completes, or None."""
        if line == "":
            event = (self.name, json.loads("\n".join(self.data))) if self.data else None
            self.name, self.data = "message", []
            return event
        if line.startswith("event:"):
            self.name = line[6:].strip()
        elif line.startswith("data:"):
            value = line[5:]
            self.data.append(value[1:] if value.startswith(" ") else value)
        return None


def parse_sse(lines: Iterator[str]) -> Iterator[SseEvent]:
    """The events of an SSE response, read line by line."""
    frames = SseFrames()
    for line in lines:
        if (event := frames.feed(line)) is not None:
            yield SseEvent(*event)


@contextmanager
def held_until_health_answers(
    monkeypatch: pytest.MonkeyPatch, url: str, owner: object, name: str, holds: Callable[..., bool], what: str
) -> Iterator[None]:
    """Inside the block, the calls of `owner.name` that `holds(*args)` picks wait until the server at `url` has
    answered `/health` once one of them began. Made on the event loop, such a call holds the loop, and `/health`
    with it: the block then fails on the health check's timeout. `what` names the call for the failure when
    none came."""
    entered, release = threading.Event(), threading.Event()
    failures: list[BaseException] = []
    real = getattr(owner, name)

    def held(*args: Any, **kwargs: Any) -> Any:
        if holds(*args):
            entered.set()
            release.wait(30)
        return real(*args, **kwargs)

    def check() -> None:
        try:
            assert entered.wait(30), f"no {what}"
            assert httpx2.get(f"{url}/health", timeout=5).status_code == 200
        except BaseException as exc:  # handed to the test's thread below
            failures.append(exc)
        finally:
            release.set()

    monkeypatch.setattr(owner, name, held)
    checker = threading.Thread(target=check, daemon=True)
    checker.start()
    try:
        yield
    finally:
        checker.join(40)
        release.set()
    if failures:
        raise failures[0]


def every_call(*args: object) -> bool:
    """For `held_until_health_answers`: hold every call."""
    return True


@contextmanager
def removal_held_until_health_answers(monkeypatch: pytest.MonkeyPatch, url: str) -> Iterator[None]:
    """Inside the block, deleting a run's directory (a run can fill it with 100,000 files, about a second's
    work) waits until the server at `url` has answered `/health`. Deleted on the event loop, it would hold
    the loop, and `/health` with it: the block then fails on the health check's timeout."""
    with held_until_health_answers(
        monkeypatch,
        url,
        workspace_module,
        "remove_tree",
        lambda path: path.name.startswith("run-"),
        "run directory was deleted",
    ):
        yield


async def ticks_while_read(stream: AsyncIterator[T]) -> list[tuple[T, int]]:
    """Each item of `stream` with how many turns another task of the event loop had had when it was read: a
    stream that never lets the loop serve others reads all its items at the same count."""
    ticks = 0

    async def other() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    task = asyncio.create_task(other())
    await asyncio.sleep(0)  # the other task starts, and waits for its next turn
    seen = []
    try:
        async for item in stream:
            seen.append((item, ticks))
    finally:
        task.cancel()
    return seen


def stream_run(
    base_url: str,
    *,
    json_body: dict[str, Any] | None = None,
    files: Any = None,
    data: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> tuple[httpx2.Response, list[SseEvent]]:
    """POST /process and read the whole event stream."""
    with (
        httpx2.Client(timeout=timeout) as client,
        client.stream(
            "POST", f"{base_url}/process", json=json_body, files=files, data=data, headers=headers
        ) as response,
    ):
        if response.status_code != 200:
            response.read()
            return response, []
        return response, list(parse_sse(response.iter_lines()))


def names(events: list[SseEvent]) -> list[str]:
    return [event.event for event in events]


def folded(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The event names with each run of consecutive `subcalls` events folded into one name, after checking
    that the run keeps the contract's promise whatever the throttling made of it: it starts at `done` 0
    and ends with `done == total`, `done` and `failed` never go down, `total` never changes."""
    sequence: list[str] = []
    run: list[dict[str, Any]] = []
    for name, data in [*events, ("", {})]:
        if name == "subcalls":
            run.append(data)
            continue
        if run:
            assert run[0]["done"] == 0 and run[-1]["done"] == run[-1]["total"], run
            assert len({item["total"] for item in run}) == 1, run
            for key in ("done", "failed"):
                assert [item[key] for item in run] == sorted(item[key] for item in run), run
            sequence.append("subcalls")
            run = []
        if name:
            sequence.append(name)
    return sequence


def script(*turns: dict[str, Any]) -> str:
    """A prompt that makes the fake root model play these turns ({"text", "code": [...]})."""
    return f"scripted task <<<SCRIPT {json.dumps(list(turns))} SCRIPT>>>"


@dataclass
class Process:
    pid: int
    ppid: int
    name: bytes
    state: bytes


def _processes() -> dict[int, Process]:
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat.rsplit(b")", 1)[1].split()
        table[int(entry)] = Process(
            int(entry), int(fields[1]), stat[stat.index(b"(") + 1 : stat.rindex(b")")], fields[0]
        )
    return table


def descendants(root: int | None = None) -> list[Process]:
    """The live processes below `root` (by default this test process: every server it started, in a thread
    or as a process of its own, with their zygotes and workers). Processes of other test sessions or
    servers on the machine are not below it. Workers orphaned below us are adopted by us (we are a
    subreaper) and reaped here once they have ended."""
    table = _processes()
    me = os.getpid()
    for process in table.values():
        if process.ppid == me and process.state == b"Z" and process.name == b"rlm-worker":
            try:
                os.waitpid(process.pid, os.WNOHANG)
            except ChildProcessError:
                pass
    children: dict[int, list[Process]] = {}
    for process in table.values():
        children.setdefault(process.ppid, []).append(process)
    found, frontier = [], [me if root is None else root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child.pid)
    return [process for process in found if process.state != b"Z"]


def worker_processes(root: int | None = None) -> list[int]:
    """Pids of live REPL workers (the zygote names them `rlm-worker`) below `root` (see `descendants`)."""
    return [process.pid for process in descendants(root) if process.name == b"rlm-worker"]


def descendant_commands(root: int | None = None) -> list[bytes]:
    """The command lines of the live processes below `root` (see `descendants`)."""
    return [command for _, command in descendant_command_lines(root)]


def descendant_command_lines(root: int | None = None) -> list[tuple[int, bytes]]:
    """The pids and command lines of the live processes below `root` (see `descendants`)."""
    found = []
    for process in descendants(root):
        try:
            with open(f"/proc/{process.pid}/cmdline", "rb") as handle:
                found.append((process.pid, handle.read()))
        except OSError:
            continue
    return found


def peak_rss(pid: int) -> int:
    """The peak resident memory of process `pid` so far, in bytes (VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def process_alive(pid: int) -> bool:
    """Whether the process runs (a zombie, ended but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def post_process(url: str, **kwargs: Any) -> httpx2.Response:
    """POST /process and return the whole response (for refusals)."""
    return httpx2.post(f"{url}/process", timeout=30, **kwargs)


def raw_post(port: int, headers: dict[str, str], chunks: Any) -> tuple[int, bytes]:
    """Send a request body piece by piece; stop as soon as the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = "POST /process HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(head.encode() + b"\r\n")
        sock.setblocking(False)
        received = b""
        for chunk in chunks:
            try:
                received += sock.recv(65536)
            except BlockingIOError:
                pass
            if received:
                break
            try:
                sock.setblocking(True)
                sock.sendall(chunk)
                sock.setblocking(False)
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.setblocking(True)

        def complete() -> bool:
            head, sep, body = received.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length:\s*(\d+)", head)
            return bool(sep) and (length is None or len(body) >= int(length.group(1)))

        while not complete():
            more = sock.recv(65536)
            if not more:
                break
            received += more
    status = int(received.split(b" ", 2)[1])
    return status, received.split(b"\r\n\r\n", 1)[1]


@dataclass
class RealServer:
    """The service as users run it: `python backend/main.py` in its own process (`tmp`: its TMPDIR, where
    `spawn_server` gives it one of its own)."""

    url: str
    process: subprocess.Popen[bytes]
    fake: FakeOpenAI
    cwd: Path
    tmp: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

    def open_fds(self) -> int:
        """Open file descriptors, not counting pooled keep-alive connections to the model server."""
        pooled = _sockets_to_port(self.pid, int(self.fake.url.rsplit(":", 1)[1].split("/")[0]))
        return len(os.listdir(f"/proc/{self.pid}/fd")) - pooled

    def run(self, *cells: str, **settings: Any) -> list[SseEvent]:
        """One run whose first turn runs `cells`, then a turn that marks the answer ready."""
        turns = [{"code": list(cells)}, {"code": ["answer.update(content=answer['content'] or 'done', ready=True)"]}]
        body: dict[str, Any] = {"prompt": script(*turns), "input_data": "the input"}
        if settings:
            body["settings"] = settings
        response, events = stream_run(self.url, json_body=body, timeout=120)
        assert response.status_code == 200, response.text
        return events

    def assert_healthy(self) -> None:
        assert self.process.poll() is None, "the server died"
        assert httpx2.get(f"{self.url}/health", timeout=5).json() == {"status": "ok"}
        events = self.run("print(len(context))")
        assert events[-1].event == "final" and events[-1].data["ready"]
        assert next(e for e in events if e.event == "output").data["stdout"] == "9\n"


def _sockets_to_port(pid: int, port: int) -> int:
    """How many of a process's sockets are TCP connections to `port` on this machine."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                for line in list(handle)[1:]:
                    fields = line.split()
                    if int(fields[2].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:
            continue
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            count += 1
    return count


def answers_health(url: str) -> bool:
    try:
        return httpx2.get(f"{url}/health", timeout=1).status_code == 200
    except httpx2.TransportError:
        return False


@contextmanager
def spawn_server(
    cwd: Path, key: str = "sk-test-key", *, model_url: str | None = None, **env_overrides: str
) -> Iterator[RealServer]:
    """Start `python backend/main.py` in `cwd` against a fresh fake OpenAI server (or `model_url`), with a
    TMPDIR of its own (`RealServer.tmp`, kept after the server ends so that tests can look at what is left)."""
    fake = FakeOpenAI().start()
    (cwd / ".env").write_text(f"OPENAI_API_KEY={key}\n")
    tmp = private_tempdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "RLM_"))}
    env.update(
        {
            "OPENAI_API_KEY": key,
            "OPENAI_API_BASE": model_url or fake.url,
            "OPENAI_MODEL_NAME": ROOT_MODEL,
            "OPENAI_SUB_MODEL_NAME": SUB_MODEL,
            "HOST": "127.0.0.1",
            "TMPDIR": str(tmp),
            "RLM_LOG_LEVEL": "warning",
            "RLM_WORKER_PRELOAD": "numpy",
            "RLM_HISTORY_DB": str(cwd / "history.sqlite3"),
            **env_overrides,
        }
    )

    stderr = cwd / "server-stderr.txt"  # (quiet at RLM_LOG_LEVEL=warning: what a failed start says)

    def start(port: int) -> subprocess.Popen[bytes]:
        with stderr.open("ab") as errors:
            return subprocess.Popen(
                [sys.executable, str(REPO / "backend" / "main.py")],
                cwd=cwd,
                env={**env, "PORT": str(port)},
                stdout=subprocess.DEVNULL,
                stderr=errors if env["RLM_LOG_LEVEL"] == "warning" else None,
            )

    try:
        process, port = start_on_free_port(
            start, lambda port: answers_health(f"http://127.0.0.1:{port}"), stderr=stderr
        )
    except BaseException:
        fake.stop()
        raise
    try:
        yield RealServer(f"http://127.0.0.1:{port}", process, fake, cwd, tmp)
    finally:
        process.terminate()
        try:
            # a clean stop: at most uvicorn's 8 s for open connections, then the last history writes and the
            # registry's rows, each bounded by 10 s when the database is slow (a machine busy with other suites)
            process.wait(30)
        finally:
            process.kill()
            fake.stop()


def run_record(run_id: str, created: float, *, prompt: str | None = None, status: str = "running") -> RunRecord:
    """A run as the history's store takes it (`store.begin`), for tests that write runs without running them:
    a 3-character input, prompt `task <id>` unless given."""
    return RunRecord(
        id=run_id,
        created=created,
        status=status,
        prompt=prompt or f"task {run_id}",
        settings={},
        input_chars=3,
        input_lines=1,
        input_bytes=3,
        input_sha256="abc",
    )
