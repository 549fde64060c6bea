"""A small HTTP/1.1 client for model requests: POST a body, read the reply, keep the connection.

Model requests are the server's hot path: an `llm_batch` of thousands of prompts, or dozens of runs
at once, and each request's CPU cost on the one event loop decides how far they scale. aiohttp spent
about 0.25 ms of CPU per request here, spread over general machinery a chat-completions call does not
use (cookie jars, redirects, tracing hooks, multidict headers, a stream reader); this client spends
about 0.1 ms (BENCHMARKS.md, B1 and B7). It does what those requests need and no more:

- `POST` with a body; the reply's body by `Content-Length`, chunked, or up to the end of the
  connection; gzip or deflate bodies are inflated;
- keep-alive connections reused most-recent-first, closed once idle for `keepalive_s` (checked at
  each request); a request that finds its reused connection already closed by the server goes again
  on a fresh one;
- TLS with the system's trust store (`SSL_CERT_FILE` and `SSL_CERT_DIR` apply);
- a proxy (`http://[user:pass@]host:port`): requests in absolute form for an `http` endpoint, a
  `CONNECT` tunnel for an `https` one.

Deadlines are the caller's: wrap a request in `asyncio.timeout`. A cancelled or failed request
closes its connection, whose state is then unknown.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import zlib
from collections import deque
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 256 * 1024 * 1024
MAX_IDLE = 1024


class HttpError(Exception):
    """The server could not be reached, or the connection broke or spoke something else than HTTP/1."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    """Header names in lower case; a repeated header keeps its last value."""
    body: bytes


class _Connection(asyncio.Protocol):
    """One connection, one request at a time: the reply is parsed as its bytes arrive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.no_body = False
        """Set for a `CONNECT`, whose successful reply has a head and nothing else."""
        self._waiter: asyncio.Future[tuple[Response, bool]] | None = None
        self._await_reply()

    def _await_reply(self) -> None:
        """Forget the last reply: the next bytes start a new one."""
        self._buffer = bytearray()
        self._head: tuple[int, dict[str, str], bool] | None = None
        self._body_start = 0
        self._length: int | None = None
        self._chunked = False
        self._chunks: list[bytes] = []
        self._chunk_at = 0

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._waiter is None or self._waiter.done():
            self.close()  # bytes nobody asked for: the connection cannot be trusted any more
            return
        self._advance(eof=False)

    def eof_received(self) -> bool:
        if self._waiter is not None and not self._waiter.done():
            self._advance(eof=True)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            reason = f": {exc}" if exc else ""
            self._waiter.set_exception(HttpError(f"the connection closed before a complete reply{reason}"))

    # --- requests -----------------------------------------------------------------------------

    @property
    def answered(self) -> bool:
        """Whether any byte of the current reply arrived."""
        return bool(self._buffer)

    async def exchange(self, request: bytes) -> tuple[Response, bool]:
        """Send one request; the reply, and whether the connection can carry another."""
        assert self.transport is not None
        self._await_reply()
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        try:
            return await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _advance(self, *, eof: bool) -> None:
        assert self._waiter is not None
        try:
            done = self._parse(eof)
        except HttpError as exc:
            self._waiter.set_exception(exc)
            self.close()
            return
        if done is not None:
            self._waiter.set_result(done)
        elif eof:
            self._waiter.set_exception(HttpError("the connection closed before a complete reply"))

    def _parse(self, eof: bool) -> tuple[Response, bool] | None:
        buffer = self._buffer
        if self._head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise HttpError("the reply's head is too large")
                return None
            self._read_head(bytes(buffer[:end]).decode("latin-1"), end + 4)
            if self._head is None:  # an informational 1xx reply: the real one follows
                del buffer[:end + 4]
                return self._parse(eof)
        status, headers, keep_alive = self._head
        if self._chunked:
            body = self._chunked_body()
        elif self._length is not None:
            end = self._body_start + self._length
            body = bytes(buffer[self._body_start:end]) if len(buffer) >= end else None
            keep_alive = keep_alive and len(buffer) == end
        else:
            body = bytes(buffer[self._body_start:]) if eof else None
        if body is None:
            if len(buffer) > MAX_BODY_BYTES:
                raise HttpError("the reply is too large")
            return None
        encoding = headers.get("content-encoding", "").lower()
        if encoding in ("gzip", "deflate"):
            try:
                body = zlib.decompress(body, 47)  # 47: zlib or gzip header, detected
            except zlib.error as exc:
                raise HttpError(f"the reply's {encoding} body is corrupt") from exc
        return Response(status, headers, body), keep_alive

    def _read_head(self, head: str, body_start: int) -> None:
        status_line, *lines = head.split("\r\n")
        version, _, rest = status_line.partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise HttpError(f"the server did not answer in HTTP/1: {status_line[:80]!r}")
        status = int(code)
        if 100 <= status < 200:
            return
        headers: dict[str, str] = {}
        for line in lines:
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        self._body_start = body_start
        if self.no_body or status in (204, 304):
            self._length = 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._chunked = True
            self._chunk_at = body_start
        elif "content-length" in headers:
            try:
                self._length = int(headers["content-length"])
            except ValueError as exc:
                raise HttpError("the reply has a malformed Content-Length") from exc
            if self._length < 0:
                raise HttpError("the reply has a malformed Content-Length")
        else:
            keep_alive = False  # the body ends with the connection
        self._head = (status, headers, keep_alive)

    def _chunked_body(self) -> bytes | None:
        buffer = self._buffer
        while True:
            line_end = buffer.find(b"\r\n", self._chunk_at)
            if line_end < 0:
                return None
            try:
                size = int(bytes(buffer[self._chunk_at:line_end]).split(b";", 1)[0], 16)
            except ValueError as exc:
                raise HttpError("the reply has a malformed chunk") from exc
            if size == 0:  # the last chunk; trailers, if any, end with an empty line
                if buffer.find(b"\r\n\r\n", line_end) < 0:
                    return None
                return b"".join(self._chunks)
            data_end = line_end + 2 + size
            if len(buffer) < data_end + 2:
                return None
            self._chunks.append(bytes(buffer[line_end + 2:data_end]))
            self._chunk_at = data_end + 2


def _check_header(name: str, value: str) -> None:
    if any(c in name + value for c in "\r\n\0") or ":" in name:
        raise ValueError(f"header {name!r} has a forbidden character")


class HttpClient:
    """Keep-alive connections to one origin (`scheme://host:port`), for `post`."""

    def __init__(self, origin: str, *, proxy: str | None = None, keepalive_s: float = 30.0,
                 connect_timeout: float = 10.0, tls_context: ssl.SSLContext | None = None) -> None:
        url = urlsplit(origin)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {origin!r}")
        self.tls = url.scheme == "https"
        self.host = url.hostname
        self.port = url.port or (443 if self.tls else 80)
        self.authority = url.netloc.rpartition("@")[2]
        self.keepalive_s = keepalive_s
        self.connect_timeout = connect_timeout
        self._origin = f"{url.scheme}://{self.authority}"
        self._proxy = urlsplit(proxy) if proxy else None
        if self._proxy is not None and (self._proxy.scheme != "http" or not self._proxy.hostname):
            raise ValueError(f"only http:// proxies are supported, not {proxy!r}")
        self._proxy_auth = ""
        if self._proxy is not None and self._proxy.username is not None:
            credentials = f"{unquote(self._proxy.username)}:{unquote(self._proxy.password or '')}"
            self._proxy_auth = f"Basic {base64.b64encode(credentials.encode()).decode()}"
        self._ssl = tls_context
        self._idle: deque[_Connection] = deque()
        """Idle connections, the longest idle first."""
        self._heads: dict[tuple[object, ...], bytes] = {}

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Response:
        """POST `body` to `path` (starting with `/`); raises `HttpError` when no reply came."""
        key = (path, *headers.items())
        head = self._heads.get(key)
        if head is None:
            head = self._heads[key] = self._head(path, headers)
        request = head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        while True:
            connection = self._take_idle()
            reused = connection is not None
            if connection is None:
                connection = await self._connect()
            try:
                response, keep_alive = await connection.exchange(request)
            except HttpError:
                connection.close()
                if reused and not connection.answered:
                    continue  # the server had closed the idle connection: go again on a fresh one
                raise
            except BaseException:
                connection.close()
                raise
            if keep_alive and not connection.closed and len(self._idle) < MAX_IDLE:
                connection.idle_since = asyncio.get_running_loop().time()
                self._idle.append(connection)
            else:
                connection.close()
            return response

    def _head(self, path: str, headers: dict[str, str]) -> bytes:
        """The request's head up to its length: the same for every request with these headers."""
        target = self._origin + path if self._proxy is not None and not self.tls else path
        lines = [f"POST {target} HTTP/1.1", f"Host: {self.authority}"]
        for name, value in headers.items():
            _check_header(name, value)
            lines.append(f"{name}: {value}")
        if self._proxy_auth and not self.tls:
            lines.append(f"Proxy-Authorization: {self._proxy_auth}")
        if len(self._heads) > 64:  # callers use a handful of header sets; this only bounds a misuse
            self._heads.clear()
        return ("\r\n".join(lines) + "\r\n").encode("latin-1")

    def close(self) -> None:
        """Close the idle connections (requests in flight close theirs when they end)."""
        while self._idle:
            self._idle.pop().close()

    def _take_idle(self) -> _Connection | None:
        """The most recently used live connection; those idle for `keepalive_s` are closed on the way."""
        idle = self._idle
        now = asyncio.get_running_loop().time()
        while idle and now - idle[0].idle_since >= self.keepalive_s:
            idle.popleft().close()
        while idle:
            connection = idle.pop()
            if not connection.closed:
                return connection
        return None

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        host, port = (self._proxy.hostname, self._proxy.port or 80) if self._proxy else (self.host, self.port)
        direct_tls = self.tls and self._proxy is None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    _Connection, host, port, ssl=self._tls_context() if direct_tls else None,
                    server_hostname=self.host if direct_tls else None)
                if self.tls and self._proxy is not None:
                    await self._tunnel(loop, connection)
        except TimeoutError as exc:
            raise HttpError(f"could not connect to {host}:{port} within {self.connect_timeout:g} s") from exc
        except (OSError, ssl.SSLError) as exc:
            raise HttpError(f"could not connect to {host}:{port} ({type(exc).__name__}: {exc})") from exc
        return connection

    async def _tunnel(self, loop: asyncio.AbstractEventLoop, connection: _Connection) -> None:
        """Turn a connection to the proxy into a TLS connection to the endpoint, through `CONNECT`."""
        head = [f"CONNECT {self.host}:{self.port} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if self._proxy_auth:
            head.append(f"Proxy-Authorization: {self._proxy_auth}")
        connection.no_body = True
        try:
            reply, _ = await connection.exchange(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        except BaseException:
            connection.close()
            raise
        connection.no_body = False
        if reply.status != 200:
            connection.close()
            raise HttpError(f"the proxy refused the tunnel (HTTP {reply.status})")
        assert connection.transport is not None
        try:
            connection.transport = await loop.start_tls(  # type: ignore[assignment]
                connection.transport, connection, self._tls_context(), server_hostname=self.host)
        except BaseException:
            connection.close()
            raise
