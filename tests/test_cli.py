"""The command line (`python -m rlm_service`, installed as `rlm-service`), run as its own process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx2
import pytest

from rlm_service import client as client_module
from rlm_service.demos import DEMOS, Book, book_records
from rlm_service.ssereader import EventTooLarge, SseDecoder, StreamedEvent
from tests.conftest import REPO, LiveServer, free_port, make_settings, parse_sse, script, stream_run
from tests.fake_openai import FakeOpenAI, HTTPFault

HOSTILE = r"\x1b]0;pwned\x07\x1b[2J\x1b]52;c;ZXZpbA==\x07\x9b31m\r\x08 x\u2028y"
"""Python source of a string that sets the window title, clears the screen, writes the clipboard (OSC 52),
colours by an 8-bit CSI, returns the carriage and backspaces over it, and holds a Unicode line separator."""

TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _cli(
    *args: str, env: dict[str, str], stdin: bytes | None = b"", cwd: Path = REPO, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "rlm_service", *args],
        env=env,
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=cwd,
    )


def _cli_env(fake: FakeOpenAI | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "RLM_"))}
    env.update(
        {
            "PYTHONPATH": str(REPO / "backend"),
            "OPENAI_MODEL_NAME": "root-model",
            "OPENAI_SUB_MODEL_NAME": "sub-model",
            "RLM_WORKER_PRELOAD": "numpy",
            "RLM_HISTORY_DB": "off",
            **extra,
        }
    )
    if fake is not None:
        env["OPENAI_API_BASE"] = fake.url
    return env


@contextmanager
def canned_server(answers: dict[str, tuple[int, str, bytes]], *, pause_s: float = 0.0) -> Iterator[str]:
    """A plain HTTP server that answers each method it is given (POST, GET, DELETE) with that status, content
    type and body as they are (any line endings), then closes the connection. With `pause_s`, the body's
    first 20 bytes are sent, then the rest that long after, as a network may deliver a body in pieces."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            self._answer("POST")

        def do_GET(self) -> None:
            self._answer("GET")

        def do_DELETE(self) -> None:
            self._answer("DELETE")

        def _answer(self, method: str) -> None:
            if method not in answers:
                self.send_error(501)  # as BaseHTTPRequestHandler answers a method it has no `do_` for
                return
            status, content_type, body = answers[method]
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if pause_s:
                self.wfile.write(body[:20])
                self.wfile.flush()
                time.sleep(pause_s)
                body = body[20:]
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def sse_server(status: int, content_type: str, body: bytes) -> AbstractContextManager[str]:
    """`canned_server` answering every POST with `body`."""
    return canned_server({"POST": (status, content_type, body)})


def test_cli_against_the_engine(fake: FakeOpenAI, tmp_path: Path) -> None:
    data = tmp_path / "notes.txt"
    data.write_text("alpha\nbeta\n")
    result = _cli("run", "Summarize", "--input", str(data), env=_cli_env(fake))
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().startswith("## Summary")
    progress = result.stderr.decode()
    assert "[1] >>> print(len(context)" in progress and "sub-calls [" in progress and "done: ready" in progress


def test_cli_json_and_stdin(fake: FakeOpenAI) -> None:
    prompt = script({"code": ["answer.update(content=context.upper(), ready=True)"]})
    result = _cli("run", prompt, "--json", env=_cli_env(fake), stdin=b"from stdin")
    assert result.returncode == 0, result.stderr.decode()
    lines = [json.loads(line) for line in result.stdout.decode().split("\n") if line]
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "final"
    assert lines[-1]["answer"] == "FROM STDIN"


def test_cli_exit_codes(fake: FakeOpenAI) -> None:
    def refuse(messages: list[object], body: dict[str, object]) -> dict[str, object]:
        raise HTTPFault(401, "bad key")

    fake.root = refuse
    failed = _cli("run", "anything", "--input", "-", env=_cli_env(fake), stdin=b"x")
    assert failed.returncode == 1 and "error (auth)" in failed.stderr.decode()
    unconfigured = _cli("run", "anything", env={**_cli_env(fake), "OPENAI_MODEL_NAME": ""})
    assert unconfigured.returncode == 2 and "OPENAI_MODEL_NAME" in unconfigured.stderr.decode()
    missing = _cli("run", "anything", "--input", "/no/such/file", env=_cli_env(fake))
    assert missing.returncode == 2 and "no such file: /no/such/file" in missing.stderr.decode()


def test_cli_against_a_server(fake: FakeOpenAI, tmp_path: Path) -> None:
    """An input file goes up as an upload; a refusal says why and, for a token, what to pass."""
    data = tmp_path / "in.txt"
    data.write_text("x" * 1234)
    prompt = script({"code": ["answer.update(content=str(len(context)), ready=True)"]})
    with LiveServer(make_settings(fake, rlm_api_token="tok")) as server:
        env = _cli_env(fake)
        ok = _cli("run", prompt, "--input", str(data), "--server", server.url, "--token", "tok", env=env)
        assert ok.returncode == 0 and ok.stdout.decode().strip() == "1234", ok.stderr.decode()
        no_token = _cli("run", prompt, "--server", server.url, env=env)
        assert no_token.returncode == 2 and "pass --token" in no_token.stderr.decode()
        wrong = _cli("run", prompt, "--server", server.url, "--token", "nope", env=env)
        assert wrong.returncode == 2 and "did not accept the token" in wrong.stderr.decode()
        too_many = _cli("run", prompt, "--server", server.url, "--token", "tok", "--max-iterations", "999", env=env)
        assert too_many.returncode == 2 and "422" in too_many.stderr.decode()
        assert "max_iterations" in too_many.stderr.decode()


def test_an_uploaded_file_keeps_its_name(fake: FakeOpenAI, tmp_path: Path) -> None:
    """`run --input FILE --server` sent the file's name percent-encoded, and the service lists what it was sent
    (`my notes.txt` as `my%20notes.txt`, `café.txt` as `caf%C3%A9.txt`); a name that is not UTF-8 (`bad\\xff`,
    bytes a Linux file name may hold) ended the command with a traceback. Names go as browsers send them, the
    undecodable byte as U+FFFD and a line break as `%0A`. Mutants: the form's default quoting; the form given
    `file.name` as it is."""
    names = {
        b"my notes.txt": "my notes.txt",
        "café.txt".encode(): "café.txt",
        b"bad\xff.txt": "bad\ufffd.txt",
        b"two\nContent-Type: lines.txt": "two%0AContent-Type: lines.txt",  # a line break cannot end the header
    }
    prompt = script({"code": ["answer.update(content=str(len(context)), ready=True)"]})
    with LiveServer(make_settings(fake, rlm_history_db=str(tmp_path / "h.sqlite3"))) as server:
        for name in names:
            path = os.fsencode(tmp_path) + b"/" + name
            with open(path, "wb") as handle:
                handle.write(b"x" * 1234)
            ok = _cli("run", prompt, "--input", os.fsdecode(path), "--server", server.url, env=_cli_env(fake))
            assert ok.returncode == 0 and ok.stdout.decode().strip() == "1234", ok.stderr.decode()
        listed = httpx2.get(f"{server.url}/api/runs").json()["runs"]
    assert [run["input_name"] for run in reversed(listed)] == list(names.values())


def test_an_input_that_is_not_a_regular_file_is_said_to_be_one(tmp_path: Path) -> None:
    """`--input` naming a directory or a pipe (as `--input <(zcat data.gz)` gives): the command said "no such
    file" of a path that exists; it now says what the path is and how to give such input."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    missing = tmp_path / "missing.txt"
    for path, said in (
        (tmp_path, "is not a regular file (a directory, a pipe or a device)"),
        (fifo, "is not a regular file (a directory, a pipe or a device)"),
        (missing, "no such file"),
    ):
        result = _cli("run", "task", "--input", str(path), env=_cli_env())
        stderr = result.stderr.decode()
        assert result.returncode == 2 and said in stderr and str(path) in stderr, stderr


@pytest.mark.parametrize("mode", ["engine", "server"])
def test_an_input_file_that_cannot_be_read_is_said_in_a_line(fake: FakeOpenAI, mode: str) -> None:
    """An input file the command may not read (`--input /var/log/syslog` without the permission): it ended with
    a PermissionError's traceback, or, with --server, "no answer from <server>", blaming the server. It is one
    line and exit 2 now. /proc/self/mem stands for such a file (it opens, and reading its start fails with
    EIO), as the tests may run as root, who reads any file. Mutant: `_read_input` without its read."""
    with contextlib.ExitStack() as stack:
        server = ["--server", stack.enter_context(LiveServer(make_settings(fake))).url] if mode == "server" else []
        result = _cli("run", "task", "--input", "/proc/self/mem", *server, env=_cli_env(fake))
    stderr = result.stderr.decode()
    assert result.returncode == 2 and stderr == "error: cannot read /proc/self/mem: Input/output error\n", stderr


@pytest.mark.parametrize("mode", ["engine", "server"])
def test_hostile_output_cannot_drive_the_terminal(fake: FakeOpenAI, mode: str) -> None:
    """A cell prints escape sequences (window title, clear screen, clipboard write, 8-bit CSI, carriage
    return, backspace) and a U+2028 line separator, and makes them the answer. Neither the progress, the
    answer nor `--json` lines carry a control character to the terminal: each shows as a visible escape;
    and U+2028 inside an event's data does not break the stream apart.
    Mutants: `printable` returning its text unchanged; `json_line` without its escapes; the decoder
    splitting lines with `str.splitlines` (which splits at U+2028)."""
    prompt = script(
        {"code": [f'evil = "{HOSTILE}"\nprint(evil)']},
        {"code": ["raise ValueError(evil)"]},
        {"code": ["answer.update(content='A' + evil, ready=True)"]},
    )
    with LiveServer(make_settings(fake)) as server:
        where = ["--server", server.url] if mode == "server" else []
        shown = _cli("run", prompt, *where, env=_cli_env(fake))
        as_json = _cli("run", prompt, "--json", *where, env=_cli_env(fake))
    assert shown.returncode == 0 and as_json.returncode == 0, (shown.stderr, as_json.stderr)
    for result in (shown, as_json):
        for stream in (result.stdout.decode(), result.stderr.decode()):
            assert not TERMINAL_CONTROLS.search(stream), stream
    visible = r"\x1b]0;pwned\x07\x1b[2J\x1b]52;c;ZXZpbA==\x07\x9b31m\x0d\x08 x" + "\u2028y"
    assert shown.stdout.decode() == "A" + visible + "\n"
    progress = shown.stderr.decode()
    assert "    " + visible in progress and "error: ValueError: " + r"\x1b]0;pwned" in progress
    final = json.loads(as_json.stdout.decode().split("\n")[-2])
    assert final["event"] == "final", as_json.stdout.decode()[-4000:]
    assert final["answer"] == "A" + HOSTILE.encode().decode("unicode_escape"), as_json.stdout.decode()[-4000:]


def test_a_wrong_server_says_what_is_wrong(fake: FakeOpenAI) -> None:
    """Pointed at the wrong place, the command says what is wrong and exits 2, never with a traceback or a
    bare "(404): None". Mutant: `refusal` without its 404/405 case."""
    env = _cli_env(fake)
    with LiveServer(make_settings(fake)) as server, sse_server(200, "text/html", b"<html></html>") as page:
        cases = {
            # the service's own /v1 answers in OpenAI's shape: the path is what is wrong (old: "looks like a
            # model server" once /v1 answered so, when the address was the service's)
            f"{server.url}/v1": "base address, without the path '/v1'",
            fake.url: "a model server belongs in OPENAI_API_BASE",
            fake.url.removesuffix("/v1"): "looks like a model server, which belongs in OPENAI_API_BASE",
            f"http://127.0.0.1:{free_port()}": "could not connect to",
            "localhost:8000": "is not an http(s) URL",
            page: "answered with text/html, not an event stream",
        }
        for url, expected in cases.items():
            result = _cli("run", "task", "--server", url, env=env)
            stderr = result.stderr.decode()
            assert result.returncode == 2 and expected in stderr, (url, stderr)
            assert "Traceback" not in stderr and "None" not in stderr and len(stderr.strip().split("\n")) == 1


def test_a_wrong_server_is_named_with_the_address_each_command_asked(fake: FakeOpenAI) -> None:
    """A refusal by the wrong server names the address that was asked: `cancel` and `session` named
    `<server>/process`, which they never ask, and a `--server` with a path had it twice
    (`http://host/v1/v1/process`). Mutant: `refusal` naming `base + "/process"` again."""
    env = _cli_env(fake)
    with LiveServer(make_settings(fake)) as server:
        base = f"{server.url}/v1"
        cases = {
            ("run", "task"): f"{base}/process answered 404",
            ("attach", "r1"): f"{base}/api/runs/r1/events answered 404",
            ("cancel", "r1"): f"{base}/api/runs/r1/cancel answered 404",
            ("session", "s1"): f"{base}/api/sessions/s1 answered 404",
            ("session", "s1", "--end"): f"{base}/api/sessions/s1 answered 404",
        }
        for command, expected in cases.items():
            result = _cli(*command, "--server", base, env=env)
            stderr = result.stderr.decode()
            assert result.returncode == 2 and stderr.startswith(f"error: {expected}"), (command, stderr)
        cancelled = _cli("cancel", "r1", "--server", fake.url, env=env).stderr.decode()
        assert cancelled.startswith(f"error: {fake.url}/api/runs/r1/cancel answered 404 with an OpenAI-style error")


def test_words_of_the_command_line_that_are_not_utf8_go_with_u_fffd(fake: FakeOpenAI, tmp_path: Path) -> None:
    """A prompt typed in Latin-1 (`caf\\xe9`) or an id with such a byte comes from the command line with its byte
    as a lone surrogate: `run PROMPT --input FILE --server` (a form) and `cancel`, `attach`, `session ID` (a
    path) ended with a traceback (UnicodeEncodeError). The byte goes as U+FFFD. Mutant: `main` without
    `_as_text`."""
    data = tmp_path / "in.txt"
    data.write_text("x" * 10)
    prompt = script({"code": ["answer.update(content=str(len(context)), ready=True)"]}) + " caf\udce9"
    with LiveServer(make_settings(fake, rlm_history_db=str(tmp_path / "h.sqlite3"))) as server:
        env = _cli_env(fake)
        ran = _cli("run", prompt, "--input", str(data), "--server", server.url, env=env)
        assert ran.returncode == 0 and ran.stdout.decode() == "10\n", ran.stderr.decode()
        (run,) = httpx2.get(f"{server.url}/api/runs").json()["runs"]
        assert run["prompt_preview"].endswith(" caf\ufffd")
        for command in (["cancel", "r\udcff"], ["attach", "r\udcff"], ["session", "s\udcff"]):
            result = _cli(*command, "--server", server.url, env=env)
            stderr = result.stderr.decode()
            assert result.returncode == 2 and "Traceback" not in stderr and "\ufffd" in stderr, (command, stderr)


def test_a_stream_cut_short_is_reported() -> None:
    """A stream that ends without `final` or `error` exits 1 saying after which event of which run."""
    body = b'id: 1\nevent: start\ndata: {"run_id": "r1", "seq": 1}\n\n'
    with sse_server(200, "text/event-stream", body) as url:
        result = _cli("run", "task", "--server", url, env=_cli_env())
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "ended before the run finished (after event 1 of run r1" in stderr, stderr


def test_the_stream_is_read_as_the_event_stream_format_says() -> None:
    """Lines end at CRLF, LF or a lone CR; `data:` lines join with a newline; comments, `id:` and unknown
    events and fields pass by; a final `note` (the root model wrote no code) is printed plainly.
    Mutant: the printer without `_note`."""
    note = "The root model wrote no code in 2 replies: use a stronger root model, or RLM_ROOT_PROTOCOL=text."
    final = {
        "run_id": "r1",
        "seq": 4,
        "answer": "prose",
        "ready": False,
        "iterations": 2,
        "elapsed_ms": 5,
        "usage": {"root": {"requests": 2}, "sub": {"requests": 0}},
        "note": note,
        "new_field": [1],
    }
    body = (
        b": keep-alive\r\n\r\n"
        b'id: 1\r\nevent: start\r\ndata: {"run_id": "r1", "seq": 1,\r\ndata:  "model": "m"}\r\n\r\n'
        b'id: 2\revent: novelty\rdata: {"run_id": "r1", "seq": 2}\r\r'
        b'id: 3\nevent: thought\ndata: {"run_id": "r1", "seq": 3, "iteration": 1, "text": "I will not code"}\n\n'
        b"id: 4\nevent: final\ndata: " + json.dumps(final).encode() + b"\n\n"
    )
    with sse_server(200, "text/event-stream; charset=utf-8", body) as url:
        shown = _cli("run", "task", "--server", url, env=_cli_env())
        as_json = _cli("run", "task", "--server", url, "--json", env=_cli_env())
    assert shown.returncode == 0, shown.stderr.decode()
    assert shown.stdout.decode() == "prose\n"
    progress = shown.stderr.decode().split("\n")
    assert progress[0].startswith("run r1: m ") and progress[1] == "[1] I will not code"
    assert f"note: {note}" in progress and "NOT ready" in progress[2]
    events = [json.loads(line) for line in as_json.stdout.decode().split("\n") if line]
    assert [event["event"] for event in events] == ["start", "novelty", "thought", "final"]
    assert events[-1]["note"] == note and events[-1]["seq"] == 4


def test_the_decoder_gives_the_same_events_however_the_stream_is_cut() -> None:
    """Fed whole, byte by byte, or in random pieces, a stream gives the same events: a CRLF cut between two
    pieces is one line end, a UTF-8 character cut between two pieces is whole, and U+2028, U+0085 and a
    form feed stay inside their data line. Mutants: lines split with `str.splitlines`; the decoder without
    `_skip_lf`."""
    stream = (
        'id: 1\r\nevent: output\r\ndata: {"text": "a\u2028b\u0085c\x0cd é"}\r\n\r\n'
        ": comment\r\rdata: first\rdata: second\r\rid: 7\ndata: {}\n\n"
    ).encode()
    expected = [
        StreamedEvent("output", '{"text": "a\u2028b\u0085c\x0cd é"}', "1"),
        StreamedEvent("message", "first\nsecond", "1"),
        StreamedEvent("message", "{}", "7"),
    ]
    rng = random.Random(0)
    cuts = [[stream], [stream[i : i + 1] for i in range(len(stream))]]
    for _ in range(50):
        points = sorted(rng.sample(range(1, len(stream)), 8))
        cuts.append([stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)])
    for pieces in cuts:
        decoder = SseDecoder()
        assert [event for piece in pieces for event in decoder.feed(piece)] == expected


def test_an_event_id_of_more_digits_than_python_converts_is_read() -> None:
    """A server whose event ids have 5,000 digits (`int()` refuses more than 4,300): the command ended with a
    traceback at the first event; such an id is now taken as no number and the run is printed."""
    events = [("start", {"run_id": "r1", "model": "m"}), ("final", {"run_id": "r1", "answer": "ok", "ready": True})]
    stream = "".join(
        f"id: {'1' * 5000}{seq}\nevent: {name}\ndata: {json.dumps(data)}\n\n" for seq, (name, data) in enumerate(events)
    ).encode()
    with sse_server(200, "text/event-stream", stream) as url:
        ran = _cli("run", "task", "--server", url, env=_cli_env())
    stderr = ran.stderr.decode()
    assert ran.returncode == 0 and ran.stdout.decode() == "ok\n" and "Traceback" not in stderr, stderr


def test_an_event_of_endless_empty_data_lines_stops_at_the_limit() -> None:
    """An event's size counts its `data:` lines' ends: a server sending empty `data:` lines without end had the
    decoder keep one more line each time, past any limit, until the command ran out of memory. Mutant: the
    size counting only what follows `data:`."""
    decoder = SseDecoder(max_event_bytes=10_000)
    with pytest.raises(EventTooLarge, match="larger than 10,000 bytes"):
        for _ in range(100_000):
            decoder.feed(b"data:\n" * 10)


def test_figures_are_saved_when_asked(fake: FakeOpenAI, tmp_path: Path) -> None:
    plot = "import matplotlib.pyplot as plt\nplt.hist([1, 2, 2, 3])\nplt.show()"
    prompt = script({"code": [plot]}, {"code": ["answer.update(content='plotted', ready=True)"]})
    result = _cli("run", prompt, "--save-figures", str(tmp_path / "figs"), env=_cli_env(fake))
    assert result.returncode == 0, result.stderr.decode()
    saved = tmp_path / "figs" / "figure-1.png"
    assert saved.read_bytes().startswith(b"\x89PNG") and f"saved {saved}" in result.stderr.decode()


def test_a_figure_that_cannot_be_saved_is_said_and_the_run_goes_on(fake: FakeOpenAI, tmp_path: Path) -> None:
    """`--save-figures DIR` where DIR is a file (or cannot be written): the first figure ended the command with
    FileExistsError's traceback, before the answer. Now a line says the figure was not saved, and the run ends
    as it would. Mutant: `save_figure` without its `except OSError`."""
    plot = "import matplotlib.pyplot as plt\nplt.hist([1, 2, 2, 3])\nplt.show()"
    prompt = script({"code": [plot]}, {"code": ["answer.update(content='plotted', ready=True)"]})
    taken = tmp_path / "figs"
    taken.write_text("a file")
    result = _cli("run", prompt, "--save-figures", str(taken), env=_cli_env(fake))
    stderr = result.stderr.decode()
    assert result.returncode == 0 and result.stdout.decode() == "plotted\n", stderr
    assert f"figure 1 was not saved in {taken}: File exists" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("mode", ["engine", "server"])
def test_an_empty_prompt_is_refused_in_a_line(fake: FakeOpenAI, mode: str) -> None:
    """`run "" --input FILE` (an empty shell variable): the service refuses it (422), but the engine in the
    command ran the root model on no task, turn after turn, and exited 0. Both refuse it now, before anything
    starts. Mutant: `_check_run` without its prompt check (the engine runs)."""
    with contextlib.ExitStack() as stack:
        server = ["--server", stack.enter_context(LiveServer(make_settings(fake))).url] if mode == "server" else []
        result = _cli("run", "  ", *server, env=_cli_env(fake))
    stderr = result.stderr.decode()
    assert result.returncode == 2 and stderr.startswith("error: the prompt is empty"), stderr
    assert fake.stats.requests == 0


def test_json_lines_name_a_child_event_child(fake: FakeOpenAI) -> None:
    """With recursion, a `child` event carries a field `event` (its inner event's type), which replaced the
    line's own `event` in `--json`: the child's start and final came out as `"event": "start"` and
    `"event": "final"`, so a script taking the first final line (`jq 'select(.event == "final")'`) took the
    child's answer. Mutant: `Output.event` writing `{"event": name, **data}` again."""
    child = script({"code": ["answer.update(content='from the child', ready=True)"]})
    code = f"answer.update(content='root: ' + rlm_query({child!r}, 'ctx'), ready=True)"
    result = _cli("run", script({"code": [code]}), "--json", env=_cli_env(fake, RLM_MAX_DEPTH="2"))
    lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert result.returncode == 0, result.stderr.decode()
    assert [line["event"] for line in lines if line["event"] in ("start", "final")] == ["start", "final"]
    assert lines[-1]["answer"] == "root: from the child"
    children = [line for line in lines if line["type"] == "child"]
    assert children and all(line["event"] == "child" for line in children)
    kinds = [line["data"]["type"] for line in children]  # the inner event's type is its data's
    assert kinds[0] == "start" and kinds[-1] == "final", kinds


@pytest.mark.parametrize("limit", [["--max-iterations", "0"], ["--max-subcalls", "-3"], ["--exec-timeout", "nan"]])
def test_a_limit_below_one_is_refused_before_anything_starts(fake: FakeOpenAI, limit: list[str]) -> None:
    """`run --max-iterations 0` without --server ended with pydantic's ValidationError traceback (the service
    answers 422 for it). The command refuses such limits as a usage error. Mutant: `--max-iterations` read as
    a plain int."""
    result = _cli("run", "task", *limit, env=_cli_env(fake))
    stderr = result.stderr.decode()
    assert result.returncode == 2 and f"argument {limit[0]}: '{limit[1]}' is not a" in stderr, stderr
    assert "Traceback" not in stderr and fake.stats.requests == 0


def test_output_whose_reader_goes_away_ends_the_command_quietly(fake: FakeOpenAI) -> None:
    """`run ... --json | head -1`: once `head` had its line and left, the next write ended the command with
    BrokenPipeError's traceback. It exits 1 without a word. The answer (300,000 characters, twice in the JSON
    lines) is more than a pipe holds, so the command is still writing when the reader goes. Mutant: `main`
    without its `except BrokenPipeError`."""
    prompt = script({"code": ["answer.update(content='x' * 300_000, ready=True)"]})
    command = [sys.executable, "-m", "rlm_service", "run", prompt, "--json"]
    with subprocess.Popen(
        command, env=_cli_env(fake), cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        assert json.loads(process.stdout.readline())["event"] == "start"
        process.stdout.close()
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=120) == 1, stderr
    assert stderr == "", stderr


@pytest.mark.parametrize("command", [["run", "task"], ["serve"]])
def test_a_bad_setting_is_one_line(command: list[str]) -> None:
    """`RLM_PRICES='{bad json'` stops the command with one line naming the variable, not a traceback.
    Mutant: `load_settings` without its `SettingsError` case."""
    result = _cli(*command, env=_cli_env(RLM_PRICES="{bad json"), timeout=60)
    lines = result.stderr.decode().strip().split("\n")
    assert result.returncode == 2 and len(lines) == 1, result.stderr.decode()
    assert re.search(r"[Cc]onfiguration error: RLM_PRICES: must be JSON \(Expecting property name", lines[0])


def _parse_books(text: str) -> list[Book]:
    """A parser of the `records` demo's format, written from its description in `make_records`."""
    books = []
    for block in re.findall(r"^=== BOOK #(\d+) ===\n(.*?)^=== END ===$", text, re.M | re.S):
        fields: dict[str, str] = {}
        last = ""
        for line in block[1].split("\n"):
            if line.startswith("    "):
                fields[last] += "\n" + line[4:]
            elif line:
                last, value = line.split(":: ", 1)
                last = last.lower()
                fields[last] = value
        year = re.fullmatch(r"(\d+)(?: \((\d+)\. ed\.\))?", fields["year"])
        assert year is not None
        price = fields.get("price")
        books.append(
            Book(
                int(block[0]),
                fields["title"],
                tuple(fields["by"].split("; ")),
                int(year.group(1)),
                int(year.group(2)) if year.group(2) else None,
                float(price[1:].replace(",", ".")) if price else None,
                fields["shelf"],
                fields.get("notes", ""),
            )
        )
    return books


def test_sample_data_is_made_the_same_way_each_time() -> None:
    """`sample` lists the three demos with their tasks; each demo's data comes out the same for a seed,
    and the records parse back exactly into what was generated (the parser demo can reach 100%)."""
    env = _cli_env()
    listing = _cli("sample", env=env).stdout.decode()
    assert [line.split(":")[0] for line in listing.strip().split("\n")] == ["log", "numbers", "records"]
    log = _cli("sample", "log", env=env).stdout.decode()
    assert log == _cli("sample", "log", env=env).stdout.decode() and log.count("\n") >= 20_000
    assert "connection pool exhausted" in log and "rolled back" in log
    numbers = _cli("sample", "numbers", "--count", "50", "--seed", "7", env=env).stdout.decode()
    assert len(re.findall(r"\d+\.\d ms\b", numbers)) == 50
    records = _cli("sample", "records", "--count", "60", "--seed", "3", env=env).stdout.decode()
    assert _parse_books(records) == book_records(random.Random(3), 60)
    refused = _cli("sample", "records", "--count", "0", env=env)
    assert refused.returncode == 2 and "1 or more" in refused.stderr.decode()


def _readme_demo_commands() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("### The three demos", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def test_the_readme_demos_run_as_written(fake: FakeOpenAI, tmp_path: Path) -> None:
    """The README's three demos, run word for word (its `.venv/bin/rlm-service` is this checkout's CLI), each
    make their sample data and run to an answer; their tasks are the ones `rlm-service sample` lists."""
    commands = _readme_demo_commands()
    for demo in DEMOS.values():
        assert demo.prompt in commands
    launcher = tmp_path / ".venv" / "bin" / "rlm-service"
    launcher.parent.mkdir(parents=True)
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m rlm_service "$@"\n')
    launcher.chmod(0o755)
    env = _cli_env(fake, RLM_MAX_ITERATIONS="4", RLM_WORKER_PRELOAD="numpy,matplotlib.pyplot")
    result = subprocess.run(["bash", "-e", "-c", commands], cwd=tmp_path, env=env, capture_output=True, timeout=180)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert result.stderr.decode().count("done: ") == 3
    assert (tmp_path / "app.log").stat().st_size > 1_000_000


# --- runs on a service: re-attaching, Ctrl-C, attach, cancel, sessions ---------------------------------------

SLOW = script(
    {"code": ["import time\nfor i in range(3):\n    time.sleep(0.2)\n    print(i)"]},
    {"code": ["replies = llm_batch([f'q{i}' for i in range(6)])\nprint(len(replies))"]},
    {"code": ["answer.update(content='done: ' + str(len(replies)), ready=True)"]},
)
"""Three iterations with a few pauses: connections can drop while it is live."""


class CuttingProxy:
    """A TCP proxy in front of a server that drops connections the way a network does: the first response
    that carries `cuts[0]` is cut just after those bytes (mid-event: the event's `data:` never comes), the
    next response carrying `cuts[1]` likewise, and so on. With `gone_after_cut`, the proxy also stops taking
    connections at the cut, as if the server had vanished."""

    def __init__(self, upstream: int, cuts: list[bytes], *, gone_after_cut: bool = False) -> None:
        self.upstream = upstream
        self.cuts = list(cuts)
        self.gone_after_cut = gone_after_cut
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self._responses, args=(server, client), daemon=True).start()

    @staticmethod
    def _close(*sockets: socket.socket) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _requests(self, client: socket.socket, server: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                server.sendall(data)
        self._close(client, server)

    def _responses(self, server: socket.socket, client: socket.socket) -> None:
        seen = b""
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                seen += data
                with self.lock:
                    at = seen.find(self.cuts[0]) if self.cuts else -1
                    marker = self.cuts.pop(0) if at >= 0 else b""
                if at < 0:
                    client.sendall(data)
                    continue
                client.sendall(data[: len(data) - (len(seen) - at - len(marker))])
                if self.gone_after_cut:  # shut down first: a close alone leaves a blocked accept() listening
                    self._close(self.listener)
                break
        self._close(server, client)


def _json_events(stdout: bytes) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.decode().split("\n") if line]


def _server_events(url: str, run_id: str) -> list[dict[str, object]]:
    """The run's events as the service keeps them, shaped as the CLI's --json lines."""
    with httpx2.Client(timeout=60) as client, client.stream("GET", f"{url}/api/runs/{run_id}/events") as response:
        return [
            {"event": event.event, **{key: value for key, value in event.data.items() if key != "event"}}
            for event in parse_sse(response.iter_lines())
        ]


@pytest.mark.parametrize(
    "cuts",
    [
        [b"event: code\n"],
        [b"event: output\n", b"event: usage\n"],
        [b"event: subcalls\n", b"id: 9\n", b"event: final\n"],
    ],
    ids=["mid-cell", "twice", "three-times-and-at-the-terminal-event"],
)
def test_a_dropped_connection_is_reattached_without_a_gap_or_a_repeat(fake: FakeOpenAI, cuts: list[bytes]) -> None:
    """The connection drops mid-event (once, twice, three times, the last at the terminal event); the command
    re-attaches by itself and prints every event of the run exactly once, in order, as the service has it.
    Mutants: re-attaching with `Last-Event-ID` one above the last event received (a gap); re-attaching
    without `Last-Event-ID` and without the check against events already received (repeats); no re-attach."""
    fake.sub_latency = 0.05
    with LiveServer(make_settings(fake)) as server:
        proxy = CuttingProxy(server.port, cuts)
        result = _cli("run", SLOW, "--server", proxy.url, "--json", env=_cli_env(fake))
        events = _json_events(result.stdout)
        kept = _server_events(server.url, str(events[0]["run_id"]))
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    assert events == kept and events[-1]["event"] == "final" and events[-1]["answer"] == "done: 6"
    assert stderr.count("; re-attaching") == len(cuts) and stderr.count("re-attached to run") == len(cuts), stderr
    assert not proxy.cuts  # every cut happened


def test_a_dropped_connection_reads_the_same_to_a_person(fake: FakeOpenAI) -> None:
    """The progress shows each cell once and the answer once, with one line about the drop and one about
    re-attaching."""
    with LiveServer(make_settings(fake)) as server:
        proxy = CuttingProxy(server.port, [b"event: output\n"])
        result = _cli("run", SLOW, "--server", proxy.url, env=_cli_env(fake))
    stderr = result.stderr.decode()
    assert result.returncode == 0 and result.stdout.decode() == "done: 6\n", stderr
    assert [stderr.count(f"[{i}] >>> ") for i in (1, 2, 3)] == [1, 1, 1], stderr
    assert stderr.count("    0\n    1\n    2") == 1 and stderr.count("done: ready") == 1, stderr
    assert re.search(
        r"the connection to \S+ broke \(.+\) \(after event 2 of run \w+; .+\); re-attaching\n"
        r"re-attached to run \w+ after event 2\n",
        stderr,
    ), stderr


def test_when_the_server_stays_gone_the_command_says_how_to_go_on(fake: FakeOpenAI) -> None:
    """The service becomes unreachable mid-run: the command keeps re-attaching for --reconnect-for seconds,
    then exits 1 with the `attach` command that goes on from the last event it printed; that command,
    against the service, prints the rest: together every event once. Mutant: the hint's `--after` one
    below the last event printed (a repeat)."""
    with LiveServer(make_settings(fake)) as server:
        proxy = CuttingProxy(server.port, [b"event: output\n"], gone_after_cut=True)
        first = _cli("run", SLOW, "--server", proxy.url, "--json", "--reconnect-for", "1", env=_cli_env(fake))
        stderr = first.stderr.decode()
        hint = re.search(r"`rlm-service attach (\w+) --server (\S+) --after (\d+)` goes on from there", stderr)
        assert first.returncode == 1 and hint is not None and "gave up re-attaching after 1 s" in stderr, stderr
        assert hint.group(2) == proxy.url
        rest = _cli(
            "attach", hint.group(1), "--server", server.url, "--after", hint.group(3), "--json", env=_cli_env(fake)
        )
        kept = _server_events(server.url, hint.group(1))
    assert rest.returncode == 0, rest.stderr.decode()
    assert _json_events(first.stdout) + _json_events(rest.stdout) == kept and kept[-1]["event"] == "final"


def test_a_drop_before_the_first_event_is_reported_as_such(fake: FakeOpenAI) -> None:
    """Cut inside the `start` event the command cannot know which run to re-attach to: it says so (exit 1)."""
    with LiveServer(make_settings(fake)) as server:
        proxy = CuttingProxy(server.port, [b"event: start\n"])
        result = _cli("run", SLOW, "--server", proxy.url, env=_cli_env(fake))
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "before the run's first event: a detached run may go on there" in stderr


class CliProcess:
    """The CLI as a process whose stderr is read line by line as it comes; `coding` is set at `[1] >>> `."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rlm_service", *args],
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self.coding = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.decode())
            if "[1] >>> " in self.lines[-1]:
                self.coding.set()

    def finish(self, timeout: float = 60) -> tuple[int, bytes, str]:
        """Its exit status, stdout and stderr once it has ended."""
        assert self.process.stdout is not None
        stdout = self.process.stdout.read()
        status = self.process.wait(timeout)
        self.reader.join(timeout)
        return status, stdout, "".join(self.lines)


@pytest.mark.parametrize("command", ["run", "attach"])
def test_ctrl_c_cancels_the_run_on_the_service(fake: FakeOpenAI, command: str) -> None:
    """Ctrl-C while a cell runs: the command asks the service to cancel the run (which is detached, so
    nothing else would stop it), shows its `error` event, says so and exits 130; the run ended `cancelled`.
    Mutant: the first Ctrl-C stopping the command without `POST /api/runs/{id}/cancel` (the run then goes
    on to its answer)."""
    sleepy = script({"code": ["import time\ntime.sleep(8)"]}, {"code": ["answer.update(content='late', ready=True)"]})
    with LiveServer(make_settings(fake)) as server:
        if command == "run":
            cli = CliProcess("run", sleepy, "--server", server.url, env=_cli_env(fake))
        else:
            with (
                httpx2.Client(timeout=60) as client,
                client.stream(
                    "POST", f"{server.url}/process", json={"prompt": sleepy, "settings": {"detach": True}}
                ) as response,
            ):
                run_id = next(parse_sse(response.iter_lines())).data["run_id"]
            cli = CliProcess("attach", run_id, "--server", server.url, env=_cli_env(fake))
        assert cli.coding.wait(60), "".join(cli.lines)
        cli.process.send_signal(signal.SIGINT)
        status, stdout, stderr = cli.finish()
        run_id = re.search(r"^run (\w+)", stderr, re.M).group(1)  # type: ignore[union-attr]
        kept = _server_events(server.url, run_id)
    assert status == 130 and stdout == b"", stderr
    assert f"cancelling run {run_id} (Ctrl-C again to stop waiting for it)" in stderr
    assert "error (cancelled): The run was cancelled: cancelled through the API." in stderr
    assert stderr.rstrip().endswith(f"run {run_id} cancelled (Ctrl-C)"), stderr
    assert kept[-1]["event"] == "error" and kept[-1]["code"] == "cancelled"


def test_attach_and_cancel(fake: FakeOpenAI) -> None:
    """`attach` prints a run from its start or after `--after N`, re-attached to the end; `cancel` ends a
    live run; unknown and ended runs are refused in words (exit 2)."""
    env = _cli_env(fake)
    sleepy = script({"code": ["import time\ntime.sleep(30)"]})
    with LiveServer(make_settings(fake)) as server:
        with (
            httpx2.Client(timeout=60) as client,
            client.stream(
                "POST", f"{server.url}/process", json={"prompt": SLOW, "settings": {"detach": True}}
            ) as response,
        ):
            run_id = next(parse_sse(response.iter_lines())).data["run_id"]
        whole = _cli("attach", run_id, "--server", server.url, "--json", env=env)
        tail = _cli("attach", run_id, "--server", server.url, "--after", "3", "--json", env=env)
        shown = _cli("attach", run_id, "--server", server.url, env=env)
        unknown = _cli("attach", "0123456789abcdef", "--server", server.url, env=env)
        ended = _cli("cancel", run_id, "--server", server.url, env=env)
        with (
            httpx2.Client(timeout=60) as client,
            client.stream(
                "POST", f"{server.url}/process", json={"prompt": sleepy, "settings": {"detach": True}}
            ) as response,
        ):
            live_id = next(parse_sse(response.iter_lines())).data["run_id"]
        cancelled = _cli("cancel", live_id, "--server", server.url, env=env)
        after = _cli("attach", live_id, "--server", server.url, "--json", env=env)
    events = _json_events(whole.stdout)
    assert whole.returncode == 0 and [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["event"] == "final" and _json_events(tail.stdout) == events[3:]
    assert shown.returncode == 0 and shown.stdout.decode() == "done: 6\n"
    assert unknown.returncode == 2 and "has no run 0123456789abcdef" in unknown.stderr.decode()
    assert ended.returncode == 2 and f"run {run_id} has already ended" in ended.stderr.decode()
    assert cancelled.returncode == 0 and f"run {live_id} is being cancelled" in cancelled.stderr.decode()
    assert after.returncode == 1 and _json_events(after.stdout)[-1]["code"] == "cancelled"


@pytest.mark.parametrize("history", ["on", "off"])
def test_attach_after_the_last_event_of_an_ended_run_says_how_it_ended(
    fake: FakeOpenAI, tmp_path: Path, history: str
) -> None:
    """`attach --after N` with N at or past the last event of a run that has ended (an answer, an error): no
    event is left to print, and the command says that the run has ended, how (its status in the history), and
    how to see its events, then exits as the run's own end does (0 for an answer, 1 for an error). With the
    history off, the service still has an ended run's events for a while: N the last event says the same.
    Mutant (the old behaviour): re-attaching in vain, then "the server has no more of it, so it will not
    finish" (with the history off, still so after the history's answer was fixed)."""

    def refuse(messages: list[object], body: dict[str, object]) -> dict[str, object]:
        raise HTTPFault(401, "bad key")

    env = _cli_env(fake)
    shown = []
    database = str(tmp_path / "h.sqlite3") if history == "on" else "off"
    with LiveServer(make_settings(fake, rlm_history_db=database)) as server:
        _, answered = stream_run(
            server.url, json_body={"prompt": script({"code": ["answer.update(content='done', ready=True)"]})}
        )
        fake.root = refuse
        _, failed = stream_run(server.url, json_body={"prompt": "anything"})
        for events, status, how in ((answered, 0, "finished with an answer"), (failed, 1, "failed: auth")):
            run_id, last = str(events[0].data["run_id"]), int(events[-1].data["seq"])
            # past the last event, only the history can say how many the run has
            for after in (last, last + 5) if history == "on" else (last,):
                result = _cli("attach", run_id, "--server", server.url, "--after", str(after), env=env)
                shown.append((run_id, last, after, status, how, result))
    assert [answered[-1].event, failed[-1].event] == ["final", "error"]
    for run_id, last, after, status, how, result in shown:
        stderr = result.stderr.decode()
        assert result.returncode == status and result.stdout == b"", stderr
        assert f"run {run_id} has ended ({how}) and has no events after {after}" in stderr, stderr
        assert f"its events are numbered 1 to {last}" in stderr, stderr
        assert f"`rlm-service attach {run_id} --server {server.url} --after {last - 1}` shows the last" in stderr
        assert "re-attaching" not in stderr and "will not finish" not in stderr, stderr


def test_attach_after_the_last_event_of_an_ended_run_with_a_long_history_says_how_it_ended(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """Past the last event, the run as the history has it (`GET /api/runs/{id}`, every event) is read whole to
    learn how the run ended, however many reads of the connection it takes. Mutant: one `read(n)`, which
    returns what has arrived so far (a run of a long answer was then "a run the service cannot say about":
    re-attaching in vain, then "will not finish")."""
    env = _cli_env(fake)
    code = "answer.update(content='x' * 400_000, ready=True)"
    with LiveServer(make_settings(fake, rlm_history_db=str(tmp_path / "h.sqlite3"))) as server:
        _, events = stream_run(server.url, json_body={"prompt": script({"code": [code]})})
        run_id, last = str(events[0].data["run_id"]), int(events[-1].data["seq"])
        result = _cli("attach", run_id, "--server", server.url, "--after", str(last + 1), env=env)
    stderr = result.stderr.decode()
    assert result.returncode == 0 and result.stdout == b"", stderr
    assert f"run {run_id} has ended (finished with an answer) and has no events after {last + 1}" in stderr, stderr
    assert f"its events are numbered 1 to {last}" in stderr, stderr


def test_a_session_on_a_service_answers_follow_ups(fake: FakeOpenAI, tmp_path: Path) -> None:
    """`run --session` prints the session id (in `start` with --json, and on stderr with the command that
    asks more); `run --follow-up ID` asks it, twice, reading what the first run made; `session ID` lists
    the runs; `session ID --end` ends it, after which a follow-up is refused in words.
    Mutant: `run --follow-up` posting without `session_id` (its cell then finds no variables)."""
    data = tmp_path / "in.txt"
    data.write_text("".join(f"record {i}: value={i * 7}\n" for i in range(200)))
    first = script(
        {"code": ["records = context.splitlines()\ntotal = sum(int(l.split('=')[1]) for l in records)"]},
        {"code": ["answer.update(content=str(total), ready=True)"]},
    )
    second = script({"code": ["answer.update(content=str(len(records)), ready=True)"]})
    third = script({"code": ["answer.update(content=f'{total // len(records)} on average', ready=True)"]})
    env = _cli_env(fake)
    with LiveServer(make_settings(fake)) as server:
        one = _cli("run", first, "--input", str(data), "--server", server.url, "--session", "--json", env=env)
        start = _json_events(one.stdout)[0]
        session_id = str(start["session_id"])
        two = _cli("run", second, "--follow-up", session_id, "--server", server.url, env=env)
        three = _cli("run", third, "--follow-up", session_id, "--server", server.url, env=env)
        shown = _cli("session", session_id, "--server", server.url, env=env)
        ended = _cli("session", session_id, "--end", "--server", server.url, env=env)
        gone = _cli("run", second, "--follow-up", session_id, "--server", server.url, env=env)
        gone_show = _cli("session", session_id, "--server", server.url, env=env)
    assert one.returncode == 0 and _json_events(one.stdout)[-1]["answer"] == str(sum(i * 7 for i in range(200)))
    assert (
        f"session {session_id}: ask more with `rlm-service run QUESTION --follow-up {session_id} --server {server.url}`"
    ) in one.stderr.decode()
    assert two.returncode == 0 and two.stdout.decode() == "200\n", two.stderr.decode()
    assert f"in session {session_id}: " in two.stderr.decode()
    assert f"session {session_id}: ask more" in two.stderr.decode()
    assert three.returncode == 0 and three.stdout.decode() == "696 on average\n", three.stderr.decode()
    listing = shown.stdout.decode()
    assert shown.returncode == 0 and listing.startswith(f"session {session_id}\nruns: {start['run_id']}, ")
    assert listing.split("\n")[1].count(", ") == 2 and "\ninput: 4,330 characters, 200 lines\n" in listing
    assert "ends if left idle until " in listing
    assert ended.returncode == 0 and f"session {session_id} ended" in ended.stderr.decode()
    for refused in (gone, gone_show):
        stderr = refused.stderr.decode()
        assert refused.returncode == 2 and f"session {session_id} is not on {server.url}: it never existed " in stderr
        assert len(stderr.strip().split("\n")) == 1, stderr


def test_follow_ups_are_refused_in_words(fake: FakeOpenAI, tmp_path: Path) -> None:
    """An input with a follow-up, a follow-up without a service, a session given twice, and a session busy
    with another question: each is refused with what to do instead (exit 2).
    Mutant: the client without its 409 case for sessions (the bare server message, no run named)."""
    env = _cli_env(fake)
    data = tmp_path / "in.txt"
    data.write_text("x")
    # held at its sub-call until both refusals are in: a run that sleeps a while ended first on a busy machine
    slow = script({"code": ["llm_query('held')"]}, {"code": ["answer.update(content='1', ready=True)"]})
    done = script({"code": ["answer.update(content='1', ready=True)"]})
    with LiveServer(make_settings(fake)) as server:
        with_input = _cli("run", "q", "--follow-up", "s1", "--input", str(data), "--server", server.url, env=env)
        local = _cli("run", "q", "--follow-up", "s1", env=env)
        both = _cli("run", "q", "--follow-up", "s1", "--session", "--server", server.url, env=env)
        one = _cli("run", done, "--server", server.url, "--session", "--json", env=env)
        session_id = str(_json_events(one.stdout)[0]["session_id"])
        fake.inject("hold", role="sub")
        with (
            httpx2.Client(timeout=60) as client,
            client.stream("POST", f"{server.url}/process", json={"prompt": slow, "session_id": session_id}) as response,
        ):
            events = parse_sse(response.iter_lines())
            live_id = next(events).data["run_id"]
            busy = _cli("run", "q", "--follow-up", session_id, "--server", server.url, env=env)
            busy_end = _cli("session", session_id, "--end", "--server", server.url, env=env)
            fake.release()
            list(events)
    assert with_input.returncode == 2 and "give no --input" in with_input.stderr.decode()
    assert local.returncode == 2 and "--follow-up needs --server" in local.stderr.decode()
    assert both.returncode == 2 and "not allowed with argument" in both.stderr.decode()
    for refused, consequence in (
        (busy, "a session answers one question at a time"),
        (busy_end, "it cannot end while a run of it is going"),
    ):
        stderr = refused.stderr.decode()
        assert refused.returncode == 2, stderr
        assert (
            f"run {live_id} of session {session_id} is still going: {consequence}; follow it with "
            f"`rlm-service attach {live_id} --server {server.url}`"
        ) in stderr


def test_a_session_without_a_service_reads_follow_ups_from_stdin(fake: FakeOpenAI, tmp_path: Path) -> None:
    """Without --server, `--session` keeps the REPL for the command's life: each line of stdin is a follow-up
    that reads what earlier questions made; each answer goes to stdout. With the input on stdin too it is
    refused in words. Mutant: follow-ups launched without the session (NameError in their cells)."""
    data = tmp_path / "in.txt"
    data.write_text("a\nb\nc\n")
    first = script({"code": ["lines = context.splitlines()"]}, {"code": ["answer.update(content='kept', ready=True)"]})
    second = script({"code": ["answer.update(content=str(len(lines)), ready=True)"]})
    third = script({"code": ["lines.append('d')\nanswer.update(content=','.join(lines), ready=True)"]})
    env = _cli_env(fake)
    result = _cli("run", first, "--input", str(data), "--session", env=env, stdin=f"{second}\n\n{third}\n".encode())
    piped = _cli("run", first, "--session", env=env, stdin=b"the input")
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert result.stdout.decode() == "kept\n3\na,b,c,d\n"
    session_id = re.search(r"^session (\w+): ask follow-up questions, one a line", stderr, re.M)
    assert session_id is not None and stderr.count(f" in session {session_id.group(1)}: ") == 3, stderr
    assert piped.returncode == 2 and "the input must come from --input FILE" in piped.stderr.decode()


HOSTILE_ID = "s\x1b]0;pwned\x07\x9b2J"


def test_what_a_service_says_is_printed_inertly(tmp_path: Path) -> None:
    """A service whose run and session ids, and refusals, carry terminal escapes: the session line, the
    session listing and the refusals show them as visible escapes. Mutants: `printable` returning its text
    unchanged; the session listing writing `live_run` without it."""
    start = {"run_id": HOSTILE_ID, "seq": 1, "session_id": HOSTILE_ID, "model": "m"}
    final = {"run_id": HOSTILE_ID, "seq": 2, "answer": "ok", "ready": True, "iterations": 1, "elapsed_ms": 1}
    stream = (
        f"id: 1\nevent: start\ndata: {json.dumps(start)}\n\nid: 2\nevent: final\ndata: {json.dumps(final)}\n\n"
    ).encode()
    described = {
        "id": HOSTILE_ID,
        "runs": [HOSTILE_ID],
        "live_run": HOSTILE_ID,
        "expires_at": 2e9,
        "input": {"chars": 1, "lines": 1},
    }

    answers = {
        "POST": (200, "text/event-stream", stream),
        "GET": (200, "application/json", json.dumps(described).encode()),
        "DELETE": (409, "application/json", json.dumps({"detail": HOSTILE_ID}).encode()),
    }
    with canned_server(answers) as url:
        results = [
            _cli("run", "task", "--server", url, "--session", env=_cli_env()),
            _cli("session", HOSTILE_ID, "--server", url, env=_cli_env()),
            _cli("session", HOSTILE_ID, "--end", "--server", url, env=_cli_env()),
        ]
    assert [result.returncode for result in results] == [0, 0, 2]
    shown = r"s\x1b]0;pwned\x07\x9b2J"
    for result in results:
        for text in (result.stdout.decode(), result.stderr.decode()):
            assert not TERMINAL_CONTROLS.search(text), text
    assert f"session {shown}: ask more" in results[0].stderr.decode()
    assert f"live run: {shown}" in results[1].stdout.decode()
    assert f"run {shown} of session {shown} is still going" in results[2].stderr.decode()


def test_answers_that_arrive_in_pieces_are_read_whole() -> None:
    """A session's description, or a refusal, whose body the network delivers in two pieces: the command read
    only what had arrived (one `read(n)`), found no JSON in it, and said the server refused the session with
    a 200, or refused the run giving no reason. Mutant: one `read` of the body."""
    described = {"id": "s1", "runs": ["r1", "r2"], "expires_at": 2e9, "input": {"chars": 3, "lines": 1}}
    answers = {
        "GET": (200, "application/json", json.dumps(described).encode()),
        "POST": (422, "application/json", json.dumps({"detail": "prompt: must not be empty"}).encode()),
    }
    with canned_server(answers, pause_s=0.5) as url:
        shown = _cli("session", "s1", "--server", url, env=_cli_env())
        ran = _cli("run", "task", "--server", url, env=_cli_env())
    assert shown.returncode == 0 and shown.stdout.decode().startswith("session s1\nruns: r1, r2\n"), shown
    assert ran.returncode == 2 and "(422 Unprocessable Entity): prompt: must not be empty" in ran.stderr.decode(), ran


@contextlib.asynccontextmanager
async def trickling_server() -> AsyncIterator[str]:
    """A server that answers every request with a JSON body of a byte every 50 ms, for over an hour."""

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n")
        with contextlib.suppress(OSError):
            while True:
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.05)

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def test_an_answer_trickled_without_end_is_given_up_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that answers a session's description with a byte every 50 ms, without end: reading it whole
    (up to its 64 KiB) would hold the command for about an hour, each byte resetting the read timeout; the
    answer's reading is bounded as a whole (ANSWER_S), and the command says there was no answer."""
    monkeypatch.setattr(client_module, "ANSWER_S", 1.0)
    async with trickling_server() as url, asyncio.timeout(30), client_module.ServiceClient(url, None) as client:
        with pytest.raises(client_module.Refused, match=r"no answer from .*TimeoutError"):
            await client.session("s1")


async def test_a_run_record_trickled_without_end_is_given_up_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """How a run ended, asked of the history (`GET /api/runs/{id}`) when its stream ends with nothing new: a
    server trickling that answer held `attach` for as long as it liked; the reading is bounded as a whole
    (ANSWER_S), after which the service is taken as unable to say (None), as for any answer it cannot give."""
    monkeypatch.setattr(client_module, "ANSWER_S", 1.0)
    async with trickling_server() as url, asyncio.timeout(30), client_module.ServiceClient(url, None) as client:
        assert await client.ended("r1", "0") is None


def test_fields_of_other_types_than_the_service_sends_are_said_in_a_line() -> None:
    """A server that is not the service, or a broken one, whose events and session carry fields of other types
    than the service sends: the command ended with a traceback (`ValueError: Cannot specify ',' with 's'` for
    `"chars": "many"`, `AttributeError` for `"usage": [1]`, `ValueError` for an `expires_at` of NaN), and a
    `done` of 10**12 sub-calls out of 1, or a child's depth of 10**12, made it build a string of that many
    characters (a MemoryError; a smaller number printed it). Each such event is now one line, the rest of the
    run is printed, and the session is listed without what it cannot show. Mutants: `ProgressPrinter.event`
    without its `except`; `_bar` without its clamp; `_clock` without its `except`."""
    events = [
        ("start", {"run_id": "r1", "input": {"chars": "many", "lines": 1}}),
        ("subcalls", {"run_id": "r1", "done": 10**12, "failed": 0, "total": 1}),
        ("subcalls", {"run_id": "r1", "done": "x", "total": 3}),
        ("child", {"run_id": "r1", "depth": 10**12, "event": "code", "data": {"iteration": 1, "code": "x = 1"}}),
        ("child", {"run_id": "r1", "depth": 1, "event": "start", "data": [1]}),
        ("final", {"run_id": "r1", "answer": "the answer", "ready": True, "usage": [1], "elapsed_ms": "5"}),
    ]
    stream = "".join(
        f"id: {seq}\nevent: {name}\ndata: {json.dumps(data)}\n\n" for seq, (name, data) in enumerate(events, 1)
    ).encode()
    described = {"id": "s1", "runs": 5, "input": {"chars": "x"}, "expires_at": float("nan")}

    # NaN in the session, as Python's json writes it
    answers = {
        "POST": (200, "text/event-stream", stream),
        "GET": (200, "application/json", json.dumps(described).encode()),
    }
    with canned_server(answers) as url:
        ran = _cli("run", "task", "--server", url, env=_cli_env())
        shown = _cli("session", "s1", "--server", url, env=_cli_env())
    progress = ran.stderr.decode()
    assert ran.returncode == 0 and ran.stdout.decode() == "the answer\n", progress
    assert "Traceback" not in progress and len(progress) < 2000, progress
    for name in ("start", "subcalls", "child", "final"):
        assert f"(a {name} event with a field this command cannot read)" in progress, progress
    assert "↳ child (depth 1000000000000) [1] >>> x = 1" in progress, progress
    assert shown.returncode == 0 and shown.stdout.decode() == "session s1\nruns: none yet\n", shown.stderr.decode()


def test_json_nested_deeper_than_python_parses_is_said_in_a_line() -> None:
    """A server whose event, or whose refusal, is JSON nested deeper than Python's parser goes (`json.loads`
    raises RecursionError, not ValueError): the command ended with a traceback; it now says in a line what
    it got, as for any event that is not a JSON object or a refusal without a reason."""
    deep = b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    answers = {
        "POST": (200, "text/event-stream", b"id: 1\nevent: start\ndata: " + deep + b"\n\n"),
        "GET": (400, "application/json", deep),
        "DELETE": (400, "application/json", deep),
    }
    with canned_server(answers) as url:
        ran = _cli("run", "task", "--server", url, env=_cli_env())
        shown = _cli("session", "s1", "--server", url, env=_cli_env())
        ended = _cli("session", "s1", "--end", "--server", url, env=_cli_env())
    stderr = ran.stderr.decode()
    assert ran.returncode == 1 and "Traceback" not in stderr, stderr
    assert "sent an event whose data is not a JSON object" in stderr, stderr
    for result in (shown, ended):
        stderr = result.stderr.decode()
        assert result.returncode == 2 and "Traceback" not in stderr, stderr
        assert "the server refused the session (400): no reason given" in stderr, stderr
