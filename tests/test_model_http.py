"""The model client's HTTP side, against raw servers: proxies, TLS, Retry-After, oversized replies.

The HTTP protocol itself is aiohttp's; these tests check what the service asks of it.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rlm_service.llm import ChatClient, ModelCallError, parse_completion
from tests.conftest import self_signed_certificate, tunnel

REPLY = json.dumps(
    {
        "choices": [{"message": {"role": "assistant", "content": "hello"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }
).encode()


@dataclass
class RawServer:
    port: int
    requests: list[bytes] = field(default_factory=list)


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


def reply(status: str, body: bytes, *headers: str) -> bytes:
    head = "\r\n".join([f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers])
    return head.encode() + b"\r\n\r\n" + body


@asynccontextmanager
async def raw_server(answer: Callable[[int], bytes]) -> AsyncIterator[RawServer]:
    """A server that answers its n-th request (from 0) with `answer(n)`."""
    server = RawServer(0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                server.requests.append(await _read_request(reader))
                writer.write(answer(len(server.requests) - 1))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield server


async def test_http_endpoint_through_a_proxy_sends_the_absolute_form_and_credentials() -> None:
    async with raw_server(lambda n: reply("200 OK", REPLY)) as proxy:
        client = ChatClient("http://models.example:8080/v1", "k", proxy=f"http://user:p%40ss@127.0.0.1:{proxy.port}")
        completion = await client.post({"model": "m", "messages": []}, parse_completion)
        await client.aclose()
    assert completion.text == "hello"
    request = proxy.requests[0]
    assert request.startswith(b"POST http://models.example:8080/v1/chat/completions HTTP/1.1\r\n")
    assert b"Proxy-Authorization: Basic dXNlcjpwQHNz\r\n" in request  # user:p@ss


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path)


async def test_https_endpoint_through_a_connect_tunnel(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    origin_requests: list[bytes] = []

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        origin_requests.append(await _read_request(reader))
        writer.write(reply("200 OK", REPLY, "Connection: close"))
        await writer.drain()
        writer.close()

    tunnels: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tunnels.append(await reader.readuntil(b"\r\n\r\n"))
        await tunnel(reader, writer, origin_port)

    origin_server = await asyncio.start_server(origin, "127.0.0.1", 0, ssl=server_tls)
    origin_port = origin_server.sockets[0].getsockname()[1]
    proxy_server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    proxy_port = proxy_server.sockets[0].getsockname()[1]
    async with origin_server, proxy_server:
        client = ChatClient(
            f"https://localhost:{origin_port}/v1",
            "k",
            proxy=f"http://u:pw@127.0.0.1:{proxy_port}",
            tls=ssl.create_default_context(cafile=str(cert)),
        )
        completion = await client.post({"model": "m", "messages": []}, parse_completion)
        await client.aclose()
    assert completion.text == "hello"
    assert tunnels[0].startswith(f"CONNECT localhost:{origin_port} HTTP/1.1\r\n".encode())
    assert b"Proxy-Authorization: Basic dTpwdw==" in tunnels[0]
    assert origin_requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"Bearer k" in origin_requests[0] and b"Proxy-Authorization" not in origin_requests[0]


async def test_an_untrusted_certificate_is_refused(certificate: tuple[Path, Path]) -> None:
    """Mutant caught: a client that skips certificate verification (ssl=False) gets the reply."""
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(reply("200 OK", REPLY))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(origin, "127.0.0.1", 0, ssl=server_tls)
    async with server:
        client = ChatClient(f"https://localhost:{server.sockets[0].getsockname()[1]}/v1", "k", retries=0)
        with pytest.raises(ModelCallError, match="could not reach the model server"):
            await client.post({"model": "m", "messages": []}, parse_completion)
        await client.aclose()


@pytest.mark.parametrize("header", ["retry-after-ms: 1200", "Retry-After: 1.2"])
async def test_a_429_waits_as_long_as_the_server_asks(header: str) -> None:
    """Mutant caught: ignoring `retry-after-ms` retries after the 50 ms backoff."""
    answers = [reply("429 Too Many Requests", b"{}", header), reply("200 OK", REPLY)]
    async with raw_server(lambda n: answers[min(n, 1)]) as server:
        client = ChatClient(f"http://127.0.0.1:{server.port}/v1", "k", backoff=0.05)
        started = time.monotonic()
        completion = await client.post({"model": "m", "messages": []}, parse_completion)
        waited = time.monotonic() - started
        await client.aclose()
    assert completion.text == "hello" and len(server.requests) == 2
    assert waited >= 1.2


async def test_a_reply_larger_than_the_cap_is_refused_not_held(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rlm_service.llm.MAX_REPLY_BYTES", 1000)
    big = json.dumps({"choices": [{"message": {"content": "x" * 5000}}]}).encode()
    async with raw_server(lambda n: reply("200 OK", big)) as server:
        client = ChatClient(f"http://127.0.0.1:{server.port}/v1", "k", retries=1, backoff=0.01)
        with pytest.raises(ModelCallError, match="larger than 1,000 bytes"):
            await client.post({"model": "m", "messages": []}, parse_completion)
        await client.aclose()
    assert len(server.requests) == 2
