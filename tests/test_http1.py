"""The HTTP/1.1 client of model requests, against servers that send every framing byte by byte."""

from __future__ import annotations

import asyncio
import gzip
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rlm_service.http1 import HttpClient, HttpError

Reply = Callable[[bytes], "bytes | None"]
"""The raw bytes to answer a request with (head and body as received); None hangs up without a word."""


@dataclass
class RawServer:
    port: int
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    closed_by_client: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


@asynccontextmanager
async def raw_server(reply: Reply, *, close_after_reply: bool = False, byte_by_byte: bool = False
                     ) -> AsyncIterator[RawServer]:
    server = RawServer(0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.connections += 1
        try:
            while True:
                request = await _read_request(reader)
                server.requests.append(request)
                answer = reply(request)
                if answer is None:
                    break
                for piece in ([answer[i:i + 1] for i in range(len(answer))] if byte_by_byte else [answer]):
                    writer.write(piece)
                    await writer.drain()
                if close_after_reply:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            server.closed_by_client += 1
        finally:
            writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield server


def ok(body: bytes, *extra: str) -> Callable[[bytes], bytes]:
    head = "\r\n".join(["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *extra])
    return lambda request: head.encode() + b"\r\n\r\n" + body


async def test_replies_by_length_reuse_one_connection() -> None:
    async with raw_server(ok(b'{"a": 1}', "X-Thing: Yes")) as server:
        client = HttpClient(server.url)
        first = await client.post("/v1/chat/completions", b'{"q": 1}', {"Authorization": "Bearer k"})
        second = await client.post("/v1/chat/completions", b'{"q": 2}', {})
        client.close()
    assert (first.status, first.body, first.headers["x-thing"]) == (200, b'{"a": 1}', "Yes")
    assert second.body == b'{"a": 1}'
    assert server.connections == 1
    assert server.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer k\r\n" in server.requests[0]
    assert server.requests[0].endswith(b'\r\n\r\n{"q": 1}')


async def test_chunked_reply_with_extensions_and_trailers_byte_by_byte() -> None:
    body = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nWiki\r\n6\r\npedia \r\n" \
           b"E\r\nin \r\n\r\nchunks.\r\n0\r\nX-Trailer: 1\r\n\r\n"
    async with raw_server(lambda request: body, byte_by_byte=True) as server:
        client = HttpClient(server.url)
        replies = [await client.post("/x", b"", {}) for _ in range(2)]
        client.close()
    assert [r.body for r in replies] == [b"Wikipedia in \r\n\r\nchunks."] * 2
    assert server.connections == 1


async def test_http10_reply_ends_with_the_connection_and_is_not_reused() -> None:
    async with raw_server(lambda request: b"HTTP/1.0 200 OK\r\n\r\nuntil the end", close_after_reply=True) as server:
        client = HttpClient(server.url)
        replies = [await client.post("/x", b"{}", {}) for _ in range(2)]
    assert [r.body for r in replies] == [b"until the end"] * 2
    assert server.connections == 2


async def test_gzip_body_and_interim_100_continue() -> None:
    packed = gzip.compress(b'{"choices": []}')
    answer = b"HTTP/1.1 100 Continue\r\n\r\n" + ok(packed, "Content-Encoding: gzip")(b"")
    async with raw_server(lambda request: answer) as server:
        reply = await HttpClient(server.url).post("/x", b"{}", {})
    assert (reply.status, reply.body) == (200, b'{"choices": []}')


async def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    async with raw_server(ok(b"fine"), close_after_reply=True) as server:
        client = HttpClient(server.url)
        await client.post("/x", b"", {})
        await asyncio.sleep(0.05)  # the server has hung up the kept connection by now
        reply = await client.post("/x", b"", {})
    assert reply.body == b"fine"
    assert server.connections == 2


async def test_a_request_that_races_the_server_closing_an_idle_connection_goes_again() -> None:
    """The server hangs up a kept connection just as the next request arrives on it."""
    answered: set[int] = set()
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = connections
        while True:
            try:
                await _read_request(reader)
            except asyncio.IncompleteReadError:
                break
            if number in answered:
                break  # a second request on this connection: hang up without a word
            answered.add(number)
            writer.write(ok(b"fine")(b""))
            await writer.drain()
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with listener:
        client = HttpClient(f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}")
        replies = [await client.post("/x", b"", {}) for _ in range(3)]
        client.close()
    assert [r.body for r in replies] == [b"fine"] * 3
    assert connections == 3


@pytest.mark.parametrize("answer", [
    None,  # hangs up without a word
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ncut short",
    b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"a" * 70_000,
], ids=["hang-up", "cut", "not-http", "bad-length", "bad-chunk", "bad-gzip", "huge-head"])
async def test_broken_replies_raise_http_error(answer: bytes | None) -> None:
    async with raw_server(lambda request: answer, close_after_reply=True) as server:
        with pytest.raises(HttpError):
            await HttpClient(server.url).post("/x", b"{}", {})


async def test_a_deadline_closes_the_connection() -> None:
    async with raw_server(lambda request: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nsl") as server:
        client = HttpClient(server.url)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await client.post("/x", b"{}", {})
        await asyncio.sleep(0.05)
    assert server.closed_by_client == 1


async def test_nothing_listening_is_an_http_error() -> None:
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    with pytest.raises(HttpError, match="could not connect"):
        await HttpClient(f"http://127.0.0.1:{port}").post("/x", b"", {})


def test_header_injection_is_refused() -> None:
    client = HttpClient("http://127.0.0.1:9")
    with pytest.raises(ValueError, match="forbidden"):
        asyncio.run(client.post("/x", b"", {"Authorization": "Bearer k\r\nX-Evil: 1"}))


async def test_http_endpoint_through_a_proxy_uses_the_absolute_form() -> None:
    async with raw_server(ok(b"via proxy")) as proxy:
        client = HttpClient("http://models.example:8080", proxy=f"http://user:p%40ss@127.0.0.1:{proxy.port}")
        reply = await client.post("/v1/chat/completions", b"{}", {})
    assert reply.body == b"via proxy"
    request = proxy.requests[0]
    assert request.startswith(b"POST http://models.example:8080/v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nHost: models.example:8080\r\n" in request
    assert b"\r\nProxy-Authorization: Basic dXNlcjpwQHNz\r\n" in request  # user:p@ss


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for `localhost` and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


async def test_https_endpoint_through_a_connect_tunnel(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    origin_requests: list[bytes] = []

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        origin_requests.append(await _read_request(reader))
        writer.write(ok(b"secret reply")(b""))
        await writer.drain()
        writer.close()

    tunnels: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tunnels.append(await reader.readuntil(b"\r\n\r\n"))
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", origin_port)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer), return_exceptions=True)

    origin_server = await asyncio.start_server(origin, "127.0.0.1", 0, ssl=server_tls)
    origin_port = origin_server.sockets[0].getsockname()[1]
    proxy_server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    proxy_port = proxy_server.sockets[0].getsockname()[1]
    async with origin_server, proxy_server:
        client = HttpClient(f"https://localhost:{origin_port}", proxy=f"http://u:pw@127.0.0.1:{proxy_port}",
                            tls_context=ssl.create_default_context(cafile=str(cert)))
        reply = await client.post("/v1/chat/completions", b"{}", {"Authorization": "Bearer k"})
        client.close()
    assert reply.body == b"secret reply"
    assert tunnels[0].startswith(f"CONNECT localhost:{origin_port} HTTP/1.1\r\n".encode())
    assert b"Proxy-Authorization: Basic dTpwdw==" in tunnels[0]
    assert origin_requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"Bearer k" in origin_requests[0] and b"Proxy-Authorization" not in origin_requests[0]


async def test_connections_idle_past_the_keep_alive_are_closed_while_a_busy_one_lives_on() -> None:
    async with raw_server(ok(b"fine")) as server:
        client = HttpClient(server.url, keepalive_s=0.3)
        await asyncio.gather(*(client.post("/x", b"", {}) for _ in range(5)))  # five connections at once
        for _ in range(3):  # then one request at a time: the most recent connection serves them all
            await asyncio.sleep(0.15)
            await client.post("/x", b"", {})
        await asyncio.sleep(0.05)
        assert server.connections == 5 and server.closed_by_client == 4  # the other four expired
        client.close()
