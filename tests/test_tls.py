"""HTTPS model endpoints, directly and through an `HTTPS_PROXY` tunnel, with the real server process.

The fake OpenAI server speaks TLS with a certificate made for the test by `openssl`; the server trusts it
through `SSL_CERT_FILE`, as any OpenSSL-based client does. Without `openssl` these tests skip, except
under CI (which installs it) where they fail.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import script, self_signed_certificate, spawn_server, stream_run, tunnel
from tests.fake_openai import FakeOpenAI

HOST = "models.test"  # not local, so the server goes through HTTPS_PROXY; only the proxy resolves it
PROMPT = script({"code": ["r = llm_query('over tls')\nanswer.update(content=r, ready=True)"]})


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, 127.0.0.1 and `HOST`, and its key."""
    return self_signed_certificate(tmp_path_factory.mktemp("tls"), f"DNS:localhost,DNS:{HOST},IP:127.0.0.1")


@pytest.fixture
def tls_fake(certificate: tuple[Path, Path]) -> Iterator[FakeOpenAI]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    server = FakeOpenAI(tls=context).start()
    server.sub = lambda prompt: f"secure reply to {prompt}"
    yield server
    server.stop()


@dataclass
class TunnelProxy:
    """An HTTP proxy that only tunnels (`CONNECT`), sending every tunnel to one local port."""

    target_port: int
    requests: list[bytes] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> TunnelProxy:
        self._thread.start()
        assert self._started.wait(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._tunnel, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()
        server.close()

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        if not head.startswith(b"CONNECT "):
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            writer.close()
            return
        await tunnel(reader, writer, self.target_port)


def test_an_https_endpoint_is_reached_and_its_certificate_checked(
    tmp_path: Path, tls_fake: FakeOpenAI, certificate: tuple[Path, Path]
) -> None:
    """Root and sub-calls go to an https:// endpoint whose certificate the server checks: trusted through
    SSL_CERT_FILE the run succeeds, untrusted it fails with `model_unavailable` before any request. Mutant
    caught: certificates not verified (the untrusted run succeeds)."""
    cert, _ = certificate
    (tmp_path / "trusted").mkdir()
    (tmp_path / "untrusted").mkdir()
    with spawn_server(tmp_path / "trusted", model_url=tls_fake.url, SSL_CERT_FILE=str(cert)) as server:
        _, events = stream_run(server.url, json_body={"prompt": PROMPT})
    assert events[-1].event == "final" and events[-1].data["answer"] == "secure reply to over tls"
    assert tls_fake.stats.root_requests == 1 and tls_fake.stats.sub_requests == 1
    with spawn_server(tmp_path / "untrusted", model_url=tls_fake.url, RLM_MODEL_RETRIES="0") as server:
        _, events = stream_run(server.url, json_body={"prompt": PROMPT})
    assert events[-1].event == "error" and events[-1].data["code"] == "model_unavailable"
    assert tls_fake.stats.root_requests == 1  # the handshake failed: no request reached the model server


def test_an_https_endpoint_is_reached_through_the_proxy_tunnel(
    tmp_path: Path, tls_fake: FakeOpenAI, certificate: tuple[Path, Path]
) -> None:
    """With HTTPS_PROXY set, a remote https:// endpoint is reached through a CONNECT tunnel that carries the
    proxy's credentials; the model server sees the key, the proxy never does. Mutant caught: the proxy
    ignored (the server cannot resolve the endpoint's name)."""
    cert, _ = certificate
    with TunnelProxy(tls_fake.port) as proxy:
        url = f"https://{HOST}:{tls_fake.port}/v1"
        env = {"SSL_CERT_FILE": str(cert), "HTTPS_PROXY": f"http://user:p%40ss@127.0.0.1:{proxy.port}"}
        with spawn_server(tmp_path, key="sk-tunnelled-key", model_url=url, **env) as server:
            _, events = stream_run(server.url, json_body={"prompt": PROMPT})
    assert events[-1].event == "final" and events[-1].data["answer"] == "secure reply to over tls"
    assert tls_fake.stats.root_requests == 1 and tls_fake.stats.sub_requests == 1
    assert proxy.requests and all(
        r.startswith(f"CONNECT {HOST}:{tls_fake.port} HTTP/1.1\r\n".encode()) for r in proxy.requests
    )
    credentials = base64.b64encode(b"user:p@ss").decode()
    assert all(f"Proxy-Authorization: Basic {credentials}".lower().encode() in r.lower() for r in proxy.requests)
    assert not any(b"sk-tunnelled-key" in r for r in proxy.requests)
