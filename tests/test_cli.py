"""The command line (`python -m rlm_service`, installed as `rlm-service`), run as its own process."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rlm_service.client import SseDecoder, StreamedEvent
from rlm_service.demos import DEMOS, Book, book_records
from tests.conftest import REPO, LiveServer, free_port, make_settings, script
from tests.fake_openai import FakeOpenAI, HTTPFault

HOSTILE = r"\x1b]0;pwned\x07\x1b[2J\x1b]52;c;ZXZpbA==\x07\x9b31m\r\x08 x\u2028y"
"""Python source of a string that sets the window title, clears the screen, writes the clipboard (OSC 52),
colours by an 8-bit CSI, returns the carriage and backspaces over it, and holds a Unicode line separator."""

TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _cli(*args: str, env: dict[str, str], stdin: bytes | None = b"", cwd: Path = REPO,
         timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "rlm_service", *args], env=env, input=stdin,
                          capture_output=True, timeout=timeout, cwd=cwd)


def _cli_env(fake: FakeOpenAI | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "RLM_"))}
    env.update({"PYTHONPATH": str(REPO / "backend"), "OPENAI_MODEL_NAME": "root-model",
                "OPENAI_SUB_MODEL_NAME": "sub-model", "RLM_WORKER_PRELOAD": "numpy", "RLM_HISTORY_DB": "off", **extra})
    if fake is not None:
        env["OPENAI_API_BASE"] = fake.url
    return env


@contextmanager
def sse_server(status: int, content_type: str, body: bytes) -> Iterator[str]:
    """A plain HTTP server that answers every POST with `body` as it is (any line endings), then closes."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.end_headers()
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


@pytest.mark.parametrize("mode", ["engine", "server"])
def test_hostile_output_cannot_drive_the_terminal(fake: FakeOpenAI, mode: str) -> None:
    """A cell prints escape sequences (window title, clear screen, clipboard write, 8-bit CSI, carriage
    return, backspace) and a U+2028 line separator, and makes them the answer. Neither the progress, the
    answer nor `--json` lines carry a control character to the terminal: each shows as a visible escape;
    and U+2028 inside an event's data does not break the stream apart.
    Mutants: `printable` returning its text unchanged; `json_line` without its escapes; the decoder
    splitting lines with `str.splitlines` (which splits at U+2028)."""
    prompt = script({"code": [f'evil = "{HOSTILE}"\nprint(evil)']}, {"code": ["raise ValueError(evil)"]},
                    {"code": ["answer.update(content='A' + evil, ready=True)"]})
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
            f"{server.url}/v1": "answered 404 Not Found: is ",
            fake.url: "looks like a model server, which belongs in OPENAI_API_BASE",
            f"http://127.0.0.1:{free_port()}": "could not connect to",
            "localhost:8000": "is not an http(s) URL",
            page: "answered with text/html, not an event stream",
        }
        for url, expected in cases.items():
            result = _cli("run", "task", "--server", url, env=env)
            stderr = result.stderr.decode()
            assert result.returncode == 2 and expected in stderr, (url, stderr)
            assert "Traceback" not in stderr and "None" not in stderr and len(stderr.strip().split("\n")) == 1


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
    final = {"run_id": "r1", "seq": 4, "answer": "prose", "ready": False, "iterations": 2, "elapsed_ms": 5,
             "usage": {"root": {"requests": 2}, "sub": {"requests": 0}}, "note": note, "new_field": [1]}
    body = (b': keep-alive\r\n\r\n'
            b'id: 1\r\nevent: start\r\ndata: {"run_id": "r1", "seq": 1,\r\ndata:  "model": "m"}\r\n\r\n'
            b'id: 2\revent: novelty\rdata: {"run_id": "r1", "seq": 2}\r\r'
            b'id: 3\nevent: thought\ndata: {"run_id": "r1", "seq": 3, "iteration": 1, "text": "I will not code"}\n\n'
            b"id: 4\nevent: final\ndata: " + json.dumps(final).encode() + b"\n\n")
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
    stream = ('id: 1\r\nevent: output\r\ndata: {"text": "a\u2028b\u0085c\x0cd é"}\r\n\r\n'
              ": comment\r\rdata: first\rdata: second\r\rid: 7\ndata: {}\n\n").encode()
    expected = [StreamedEvent("output", '{"text": "a\u2028b\u0085c\x0cd é"}', "1"),
                StreamedEvent("message", "first\nsecond", "1"), StreamedEvent("message", "{}", "7")]
    rng = random.Random(0)
    cuts = [[stream], [stream[i:i + 1] for i in range(len(stream))]]
    for _ in range(50):
        points = sorted(rng.sample(range(1, len(stream)), 8))
        cuts.append([stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)])
    for pieces in cuts:
        decoder = SseDecoder()
        assert [event for piece in pieces for event in decoder.feed(piece)] == expected


def test_figures_are_saved_when_asked(fake: FakeOpenAI, tmp_path: Path) -> None:
    plot = ("import matplotlib.pyplot as plt\nplt.hist([1, 2, 2, 3])\nplt.show()")
    prompt = script({"code": [plot]}, {"code": ["answer.update(content='plotted', ready=True)"]})
    result = _cli("run", prompt, "--save-figures", str(tmp_path / "figs"), env=_cli_env(fake))
    assert result.returncode == 0, result.stderr.decode()
    saved = tmp_path / "figs" / "figure-1.png"
    assert saved.read_bytes().startswith(b"\x89PNG") and f"saved {saved}" in result.stderr.decode()


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
        books.append(Book(int(block[0]), fields["title"], tuple(fields["by"].split("; ")), int(year.group(1)),
                          int(year.group(2)) if year.group(2) else None,
                          float(price[1:].replace(",", ".")) if price else None, fields["shelf"],
                          fields.get("notes", "")))
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
    result = subprocess.run(["bash", "-e", "-c", commands], cwd=tmp_path, env=env, capture_output=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert result.stderr.decode().count("done: ") == 3
    assert (tmp_path / "app.log").stat().st_size > 1_000_000
