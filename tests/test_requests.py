"""A catalogue of bad requests: each gets its contract status and a JSON body that says what to change."""

from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.conftest import (
    LiveServer,
    make_settings,
    parse_sse,
    peak_rss,
    post_process,
    script,
    spawn_server,
    stream_run,
    wait_until,
)
from tests.fake_openai import FakeOpenAI

LIMIT = 256 * 1024
JSON = {"content-type": "application/json"}


def _given_twice(name: str, part: tuple[str | None, str | bytes]) -> tuple[str, dict[str, Any], int, str]:
    """A form that gives the field `name` twice (beside a prompt, when it is not the prompt): a malformed body.
    Mutant (the old parser): two `prompt` parts run as one prompt, their texts joined; two `settings`,
    `session_id` or `input_data` parts likewise joined. (Two files, under either name, are two input files.)"""
    prompt = [] if name == "prompt" else [("prompt", (None, "x"))]
    return (
        f"multipart {name} given twice",
        {"files": [*prompt, (name, part), (name, part)]},
        400,
        f"the form field {name!r} is given twice",
    )


CATALOGUE: list[tuple[str, dict[str, Any], int, str]] = [
    ("invalid JSON", {"content": b"{not json", "headers": JSON}, 400, "not valid JSON"),
    ("truncated JSON", {"content": b'{"prompt": "x"', "headers": JSON}, 400, "not valid JSON"),
    ("JSON array", {"content": b"[1, 2]", "headers": JSON}, 400, "object"),
    ("JSON string", {"content": b'"prompt"', "headers": JSON}, 400, "object"),
    ("JSON null", {"content": b"null", "headers": JSON}, 400, "object"),
    ("empty JSON body", {"content": b"", "headers": JSON}, 400, "not valid JSON"),
    ("non-UTF-8 JSON", {"content": b'{"prompt": "\xff\xfe"}', "headers": JSON}, 400, "not valid JSON"),
    ("missing prompt", {"json": {"input_data": "x"}}, 422, "prompt: Field required"),
    ("empty prompt", {"json": {"prompt": ""}}, 422, "prompt"),
    ("blank prompt", {"json": {"prompt": " \n\t "}}, 422, "must not be empty"),
    ("null prompt", {"json": {"prompt": None}}, 422, "prompt"),
    ("number prompt", {"json": {"prompt": 5}}, 422, "prompt"),
    ("list prompt", {"json": {"prompt": ["a"]}}, 422, "prompt"),
    ("number input", {"json": {"prompt": "x", "input_data": 7}}, 422, "input_data"),
    ("object input", {"json": {"prompt": "x", "input_data": {"a": 1}}}, 422, "input_data"),
    ("settings not an object", {"json": {"prompt": "x", "settings": "fast"}}, 422, "settings"),
    ("zero iterations", {"json": {"prompt": "x", "settings": {"max_iterations": 0}}}, 422, "max_iterations"),
    ("negative sub-calls", {"json": {"prompt": "x", "settings": {"max_subcalls": -5}}}, 422, "max_subcalls"),
    ("fractional iterations", {"json": {"prompt": "x", "settings": {"max_iterations": 2.5}}}, 422, "max_iterations"),
    ("iterations as text", {"json": {"prompt": "x", "settings": {"max_iterations": "ten"}}}, 422, "max_iterations"),
    ("iterations as a numeral", {"json": {"prompt": "x", "settings": {"max_iterations": "3"}}}, 422, "max_iterations"),
    ("iterations as a boolean", {"json": {"prompt": "x", "settings": {"max_iterations": True}}}, 422, "max_iterations"),
    ("timeout as a boolean", {"json": {"prompt": "x", "settings": {"exec_timeout_s": True}}}, 422, "exec_timeout_s"),
    ("keep_input as text", {"json": {"prompt": "x", "settings": {"keep_input": "yes"}}}, 422, "keep_input"),
    (
        "iterations above server",
        {"json": {"prompt": "x", "settings": {"max_iterations": 999}}},
        422,
        "RLM_MAX_ITERATIONS",
    ),
    ("sub-calls above server", {"json": {"prompt": "x", "settings": {"max_subcalls": 10**9}}}, 422, "RLM_MAX_SUBCALLS"),
    (
        "timeout above server",
        {"json": {"prompt": "x", "settings": {"exec_timeout_s": 10_000}}},
        422,
        "RLM_EXEC_TIMEOUT_S",
    ),
    ("timeout below one", {"json": {"prompt": "x", "settings": {"exec_timeout_s": 0.5}}}, 422, "exec_timeout_s"),
    ("unknown setting", {"json": {"prompt": "x", "settings": {"colour": "blue"}}}, 422, "unknown field"),
    ("unknown field", {"json": {"prompt": "x", "input": "typo"}}, 422, "unknown field"),
    ("huge JSON body", {"json": {"prompt": "x", "input_data": "y" * (LIMIT * 6)}}, 413, "RLM_MAX_INPUT_BYTES"),
    (
        "input over the limit",
        {"json": {"prompt": "x", "input_data": "é" * (LIMIT // 2 + 10)}},
        413,
        "RLM_MAX_INPUT_BYTES",
    ),
    (
        "urlencoded form",
        {"content": b"prompt=x", "headers": {"content-type": "application/x-www-form-urlencoded"}},
        415,
        "Content-Type",
    ),
    ("plain text", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "Content-Type"),
    ("no content type", {"content": b'{"prompt": "x"}', "headers": {"content-type": ""}}, 415, "Content-Type"),
    ("XML", {"content": b"<prompt/>", "headers": {"content-type": "application/xml"}}, 415, "Content-Type"),
    (
        "multipart without boundary",
        {"content": b"--x--", "headers": {"content-type": "multipart/form-data"}},
        400,
        "boundary",
    ),
    (
        # mutant: read_multipart builds its MultipartParser outside its try block (python-multipart refuses a
        # boundary over 256 characters with FormParserError, which became a bare 500)
        "multipart boundary too long",
        {"content": b"--x--", "headers": {"content-type": "multipart/form-data; boundary=" + "b" * 300}},
        400,
        "boundary",
    ),
    (
        "multipart garbage",
        {"content": b"\x00\x01garbage", "headers": {"content-type": "multipart/form-data; boundary=zzz"}},
        400,
        "multipart",
    ),
    ("multipart settings not JSON", {"files": {"prompt": (None, "x"), "settings": (None, "{bad")}}, 422, "settings"),
    ("multipart settings a list", {"files": {"prompt": (None, "x"), "settings": (None, "[1]")}}, 422, "settings"),
    (
        "multipart settings nested too deeply",
        {"files": {"prompt": (None, "x"), "settings": (None, "[" * 50_000 + "]" * 50_000)}},
        422,
        "settings: must be a JSON object",
    ),
    ("multipart without prompt", {"files": {"settings": (None, "{}")}}, 422, "prompt"),
    ("multipart empty prompt", {"files": {"prompt": (None, "")}}, 422, "prompt"),
    (
        "two input files",
        {"files": {"prompt": (None, "x"), "input_file": ("a", b"1"), "file": ("b", b"2")}},
        422,
        "one input file",
    ),
    _given_twice("prompt", (None, "x")),
    _given_twice("settings", (None, "{}")),
    _given_twice("session_id", (None, "s1")),
    _given_twice("input_data", (None, "text")),
    (
        # a part with a file name, as some form clients send every field: old behaviour caught (the attack pass):
        # the session's id became the input file of a new run, and the follow-up was lost without a word
        "multipart session_id sent as a file part",
        {"files": {"prompt": (None, "x"), "session_id": ("id.txt", b"s0000000000000000")}},
        404,
        "no session 's0000000000000000'",
    ),
    (
        "multipart input_file given twice",
        {"files": [("prompt", (None, "x")), ("input_file", ("a", b"1")), ("input_file", ("a", b"1"))]},
        422,
        "one input file",
    ),
    (
        "upload over the limit",
        {"files": {"prompt": (None, "x"), "input_file": ("big.txt", b"z" * (LIMIT + 1))}},
        413,
        "RLM_MAX_INPUT_BYTES",
    ),
    (
        "bad token",
        {"json": {"prompt": "x"}, "headers": {"Authorization": "Bearer wrong"}, "token": True},
        401,
        "RLM_API_TOKEN",
    ),
    ("missing token", {"json": {"prompt": "x"}, "token": True}, 401, "RLM_API_TOKEN"),
    (
        "token without Bearer",
        {"json": {"prompt": "x"}, "headers": {"Authorization": "tok-123"}, "token": True},
        401,
        "RLM_API_TOKEN",
    ),
]


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, LiveServer]]:
    fake = FakeOpenAI().start()
    common = {"rlm_max_input_bytes": LIMIT, "rlm_body_timeout_s": 1.0, "rlm_max_iterations": 5}
    with (
        LiveServer(make_settings(fake, **common)) as open_server,
        LiveServer(make_settings(fake, rlm_api_token="tok-123", **common)) as guarded,
    ):
        yield {"open": open_server, "guarded": guarded}
    fake.stop()


@pytest.mark.parametrize(("case", "request_kwargs", "status", "fragment"), CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_request_is_refused(
    servers: dict[str, LiveServer], case: str, request_kwargs: dict[str, Any], status: int, fragment: str
) -> None:
    kwargs = dict(request_kwargs)
    server = servers["guarded" if kwargs.pop("token", False) else "open"]
    response = post_process(server.url, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert fragment in response.json()["detail"]


def test_stalled_body_is_refused(servers: dict[str, LiveServer]) -> None:
    port = servers["open"].port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /process HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt": '
        )
        started = time.monotonic()
        reply = b""
        while b"stalled" not in reply and (more := sock.recv(65536)):
            reply += more
    assert reply.startswith(b"HTTP/1.1 408") and b"stalled" in reply, reply
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("path", ["/process", "/v1/chat/completions", "/mcp"])
def test_a_client_gone_before_its_body_is_complete_is_refused_not_an_application_error(
    servers: dict[str, LiveServer], path: str
) -> None:
    """A client sends part of a JSON body and closes its connection (a phone losing its network mid-upload). The
    request ends as a refusal that says so, sent to no one. Old behaviour caught: starlette's ClientDisconnect went
    up to uvicorn, which logged each such client as "Exception in ASGI application" with 50 lines of traceback."""
    server = servers["open"]
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"prompt": "x", "input_data": "', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if len(messages) > 1 else messages[0]

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"content-length", b"1000")]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", server.port),
    }
    asyncio.run(server.app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400, sent
    assert b"closed the connection before the request body was complete" in b"".join(
        message.get("body", b"") for message in sent[1:]
    )
    assert server.app.state.slots.reading == 0


def test_runs_beyond_the_limit_are_refused(fake: FakeOpenAI) -> None:
    """Two runs held at a sub-call fill RLM_MAX_CONCURRENT_RUNS=2: a third is refused with 429 and
    Retry-After, and once they end a new run goes through. Mutant caught: no cap on runs (200)."""
    with LiveServer(make_settings(fake, rlm_max_concurrent_runs=2)) as server:
        held = script({"code": ["llm_query('held')\nanswer.update(content='ok', ready=True)"]})
        fake.inject("hold", role="sub", count=2)
        results: list[list[Any]] = []

        def one() -> None:
            results.append(stream_run(server.url, json_body={"prompt": held})[1])

        threads = [threading.Thread(target=one) for _ in range(2)]
        for thread in threads:
            thread.start()
        assert wait_until(lambda: fake.stats.held == 2, timeout=60)
        response = post_process(server.url, json={"prompt": "x"})
        assert response.status_code == 429 and response.headers["retry-after"] == "5"
        fake.release()
        for thread in threads:
            thread.join()
        assert [events[-1].data["answer"] for events in results] == ["ok", "ok"]
        assert stream_run(server.url, json_body={"prompt": "x"})[1][-1].event == "final"


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("../../{marker}", b"root:x:0:0"),
        ("..\\..\\{marker}", b"[boot]"),
        ("{tmp}/{marker}", b"secret"),
        ("", b"no name"),
    ],
)
def test_path_like_file_names_are_only_names(
    servers: dict[str, LiveServer], name: str, content: bytes, tmp_path: Path
) -> None:
    """An uploaded file's name is never a path the server writes to: the content reaches the REPL, and no
    file of that name appears where the name points, relative to the server's working directory or its
    temporary directory, or absolute. Mutant caught: the upload spooled to its own file name."""
    marker = f"upload-{uuid.uuid4().hex}"
    name = name.format(marker=marker, tmp=tmp_path)
    prompt = script({"code": ["answer.update(content=context, ready=True)"]})
    response, events = stream_run(servers["open"].url, files={"prompt": (None, prompt), "input_file": (name, content)})
    assert response.status_code == 200
    assert events[-1].data["answer"] == content.decode()
    if name:
        for base in (Path.cwd(), Path(tempfile.gettempdir()), Path(tempfile.gettempdir()) / "x" / "y"):
            assert not (base / name.replace("\\", "/")).resolve().exists()
        assert not list(Path(tempfile.gettempdir()).rglob(marker))


def test_empty_and_non_utf8_files_are_accepted(servers: dict[str, LiveServer]) -> None:
    prompt = script({"code": ["answer.update(content=repr(context) or 'x', ready=True)"]})
    _, events = stream_run(servers["open"].url, files={"prompt": (None, prompt), "input_file": ("e.txt", b"")})
    assert events[0].data["input"] == {"chars": 0, "lines": 0} and events[-1].data["answer"] == "''"
    _, events = stream_run(
        servers["open"].url, files={"prompt": (None, prompt), "input_file": ("latin1.txt", "café".encode("latin-1"))}
    )
    assert events[-1].data["answer"] == repr("caf\ufffd")


def test_a_file_input_left_empty_beside_input_data_leaves_the_text_the_input(servers: dict[str, LiveServer]) -> None:
    """An HTML form with a text area `input_data` and a file input `input_file` left empty: the browser sends
    the file part anyway, `filename=""` and no content, and that empty file was the run's input (the text was
    dropped: 0 characters). Mutant: `_FormReader.input` taking any file part over the text."""
    prompt = script({"code": ["answer.update(content=context, ready=True)"]})
    form = {"prompt": (None, prompt), "input_data": (None, "the text"), "input_file": ("", b"")}
    _, events = stream_run(servers["open"].url, files=form)
    assert events[0].data["input"] == {"chars": 8, "lines": 1} and events[-1].data["answer"] == "the text"
    form["input_file"] = ("f.txt", b"the file")  # a file that was chosen is the input, as before
    _, events = stream_run(servers["open"].url, files=form)
    assert events[-1].data["answer"] == "the file"


def test_other_methods_and_paths_answer_json(servers: dict[str, LiveServer]) -> None:
    url = servers["open"].url
    assert httpx2.get(f"{url}/process").status_code == 405
    assert httpx2.put(f"{url}/process").json()["detail"] == "Method Not Allowed"
    for path in ("/api/nothing-here", "/etc/passwd", "/../../etc/passwd", "/vendor/../../backend/main.py"):
        missing = httpx2.get(f"{url}{path}")
        assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}
    assert httpx2.get(f"{url}/vendor/marked.esm.js").status_code == 200


def test_server_still_serves_after_the_catalogue(servers: dict[str, LiveServer]) -> None:
    response, events = stream_run(servers["open"].url, json_body={"prompt": "x", "input_data": "fine"})
    assert response.status_code == 200 and events[-1].event == "final"


def test_a_multipart_body_of_many_large_fields_is_not_held_in_memory(fake: FakeOpenAI, tmp_path: Path) -> None:
    """A chunked multipart body (no Content-Length) with 40 unknown fields of 1 MiB and a 40 MB `input_data`
    field: the run gets its input, and the server's peak memory grows by far less than the body. Old behaviour
    caught: every field held in memory (the peak grew by about the body's size)."""
    boundary = "rlmtestboundary"

    def part(name: str, value: bytes) -> bytes:
        return f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"

    def body() -> Iterator[bytes]:
        prompt = script({"code": ["answer.update(content=str(len(context)), ready=True)"]})
        yield part("prompt", prompt.encode())
        for index in range(40):
            yield part(f"extra{index}", b"x" * 1024 * 1024)
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="input_data"\r\n\r\n'.encode()
        for _ in range(40):
            yield b"y" * 1_000_000
        yield f"\r\n--{boundary}--\r\n".encode()

    with spawn_server(tmp_path, model_url=fake.url) as server:
        warm = stream_run(
            server.url, json_body={"prompt": script({"code": ["answer.update(content='1', ready=True)"]})}
        )
        assert warm[1][-1].event == "final"
        before = peak_rss(server.process.pid)
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        with (
            httpx2.Client(timeout=120) as client,
            client.stream("POST", f"{server.url}/process", content=body(), headers=headers) as response,
        ):
            events = list(parse_sse(response.iter_lines()))
        after = peak_rss(server.process.pid)
    assert response.status_code == 200
    assert events[-1].event == "final" and events[-1].data["answer"] == "40000000"
    assert after - before < 30 * 1024 * 1024, f"the server's peak memory grew by {(after - before) >> 20} MiB"
