"""A real HTTP server that speaks the OpenAI chat-completions protocol, for tests and benchmarks.

It listens on a free loopback port (in a background thread, or as its own process with
`python tests/fake_openai.py --port 0`), answers `POST /v1/chat/completions` in JSON or as a stream,
and plays two roles:

- the **root** model (requests naming `root_model`, or carrying an RLM controller's system prompt, as
  child runs do with the sub model's name): a Python callable decides each reply, or else a
  script embedded in the task prompt between `<<<SCRIPT` and `SCRIPT>>>` (a JSON list of turns, each
  `{"text": str, "code": [str, ...]}`), or else a small built-in strategy that explores `context`,
  batches over chunks and marks an answer ready (or, when the task asks for a plot, plots the numbers
  found in the input). Code goes out as `run_python` tool calls when the
  request offers tools, otherwise as ```repl blocks in the text.
- the **sub** model (any other model name): a callable maps the prompt to the reply.

It counts every chat-completions request it receives (refused ones included) and the peak number in
flight, and injects faults on demand: HTTP errors (with or without `Retry-After`), dropped connections,
timeouts, malformed JSON, empty `choices`, `content: null`, a cut stream, a slow trickle, and `hold`
(the request waits until `release()`, then is answered normally: a run in flight for as long as a test
needs, whatever the machine's speed). With `tls`, it speaks HTTPS. With `loose` set, its replies take
the looser shape some compatible servers send: a `null` `created`, no `finish_reason`, an unknown
`service_tier`; with `call_id` set, every tool call of a reply carries that id (as a careless server might).
With `cost_per_token` set, each reply reports its cost in USD as OpenRouter does
(`usage.cost`); `usage_fields` replace fields of every reply's `usage` (counts of another type, say), and
`message_fields[role]` fields of every root or sub reply's message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

RootFn = Callable[[list[dict[str, Any]], dict[str, Any]], dict[str, Any]]
"""(messages, request body) -> {"text": str, "code": [str]} for the next root turn."""

SCRIPT_RE = re.compile(r"<<<SCRIPT\s*(.*)\s*SCRIPT>>>", re.DOTALL)  # greedy: scripts nest (child runs)

DEMO_TURNS = [
    {"text": "Let me look at the input first.", "code": ["print(len(context), 'characters')\nprint(context[:300])"]},
    {
        "text": "Now I split it into chunks and ask the sub-model about each.",
        "code": [
            "size = max(1, len(context) // 4 + 1)\n"
            "chunks = [context[i:i + size] for i in range(0, len(context), size)] or ['']\n"
            "notes = llm_batch([f'Summarize this part:\\n{c}' for c in chunks])\n"
            "for n in notes:\n    print('-', n[:120])"
        ],
    },
    {
        "text": "Combining the notes into the answer.",
        "code": [
            "answer['content'] = '## Summary\\n\\n' + '\\n'.join(f'- {n}' for n in notes)\n"
            "print(answer['content'][:500])\nanswer['ready'] = True"
        ],
    },
]


PLOT_TURNS = [
    {
        "text": "The input holds numbers. Let me pick them out and plot their distribution.",
        "code": [
            "import re\nimport numpy as np\nimport matplotlib.pyplot as plt\n"
            "values = np.array([float(x) for x in re.findall(r'-?\\d+(?:\\.\\d+)?', context)])\n"
            "fig, ax = plt.subplots(figsize=(6, 3.5))\nax.hist(values, bins=30, color='#7cc4ff')\n"
            "ax.set_title('Distribution of the input values')\nax.set_xlabel('value')\nax.set_ylabel('count')\n"
            "print(len(values), 'values; mean', round(values.mean(), 3), 'std', round(values.std(), 3))"
        ],
    },
    {
        "text": "The plot is shown; writing the answer.",
        "code": [
            "answer['content'] = (f'**{len(values)} values**, mean {values.mean():.3f}, standard deviation '\n"
            "    f'{values.std():.3f}, from {values.min():.3f} to {values.max():.3f}. The histogram is above.')\n"
            "answer['ready'] = True"
        ],
    },
]


def default_sub_reply(prompt: str) -> str:
    first = prompt.strip().splitlines()[0] if prompt.strip() else ""
    return f"sub-model reply to a {len(prompt)}-character prompt starting {first[:40]!r}"


class HTTPFault(Exception):
    """Raise from a `sub` or `root` callable to answer that request with an HTTP error."""

    def __init__(self, status: int, message: str = "injected failure") -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Fault:
    kind: str
    role: str = "any"  # "root", "sub" or "any"
    count: int = 1
    status: int = 500
    retry_after: str | None = None


@dataclass
class Stats:
    requests: int = 0
    root_requests: int = 0
    sub_requests: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    sub_in_flight: int = 0
    peak_sub_in_flight: int = 0
    faults_served: int = 0
    held: int = 0
    root_bodies: list[dict[str, Any]] = field(default_factory=list)
    sub_prompts: list[str] = field(default_factory=list)
    request_times: list[float] = field(default_factory=list)


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _is_controller(request: dict[str, Any]) -> bool:
    """A request from an RLM controller (a child run's root uses the sub model's name)."""
    return any(
        message.get("role") in ("system", "developer") and "Recursive Language Model" in str(message.get("content"))
        for message in request.get("messages", [])
    )


def _first_user_text(messages: list[dict[str, Any]]) -> str:
    for message in messages:
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return "".join(part.get("text", "") for part in content if isinstance(part, dict))
            return str(content or "")
    return ""


def scripted_root(messages: list[dict[str, Any]], body: dict[str, Any]) -> dict[str, Any]:
    """The prompt's embedded script, or the built-in demo, turn by turn."""
    turn = sum(1 for message in messages if message.get("role") == "assistant")
    # A session's follow-up message quotes the earlier questions (and their scripts) after its own task.
    task = _first_user_text(messages).split("\n\nThis is a follow-up question in the same REPL")[0]
    match = SCRIPT_RE.search(task)
    plot = "plot" in task.split("The input is in `context`")[0].lower()
    turns = json.loads(match.group(1)) if match else PLOT_TURNS if plot else DEMO_TURNS
    if turn < len(turns):
        return turns[turn]
    return {"text": "I have nothing more to add.", "code": []}


class FakeOpenAI:
    """The server; `start()` runs it in a thread, `url` is the base URL to configure."""

    def __init__(
        self,
        *,
        root_model: str = "root-model",
        root: RootFn | None = None,
        sub: Callable[[str], str] | None = None,
        latency: float = 0.0,
        sub_latency: float | None = None,
        api_key: str | None = None,
        record: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.root_model = root_model
        self.root = root or scripted_root
        self.sub = sub or default_sub_reply
        self.latency = latency
        self.sub_latency = latency if sub_latency is None else sub_latency
        self.api_key = api_key
        self.record = record
        self.host = host
        self.port = port
        self.tls = tls
        self.stats = Stats()
        self.faults: list[Fault] = []
        self.loose = False
        self.call_id: str | None = None
        self.cost_per_token: float | None = None
        self.usage_fields: dict[str, Any] = {}
        self.message_fields: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._released: asyncio.Event | None = None  # made in the server's loop
        self._writers: set[asyncio.StreamWriter] = set()

    # --- control -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}/v1"

    def release(self) -> None:
        """Let every request held by a `hold` fault, now or later, go on."""
        assert self._loop is not None and self._released is not None, "the server is not running"
        self._loop.call_soon_threadsafe(self._released.set)

    def inject(
        self, kind: str, *, role: str = "any", count: int = 1, status: int = 500, retry_after: str | None = None
    ) -> None:
        """Make the next `count` matching requests fail with `kind` (see the module docstring)."""
        with self._lock:
            self.faults.append(Fault(kind=kind, role=role, count=count, status=status, retry_after=retry_after))

    def _take_fault(self, role: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.role in ("any", role) and fault.count > 0:
                    fault.count -= 1
                    if fault.count == 0:
                        self.faults.remove(fault)
                    self.stats.faults_served += 1
                    return fault
        return None

    def start(self) -> FakeOpenAI:
        self._thread = threading.Thread(target=self._serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake OpenAI server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._shutdown)
        if self._thread is not None:
            self._thread.join(5)

    def _shutdown(self) -> None:
        assert self._server is not None and self._loop is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        self._loop.stop()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve_forever(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._released = asyncio.Event()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, self.host, self.port, backlog=1024, ssl=self.tls)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    async def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Run in the current event loop (for the standalone process)."""
        self._loop = asyncio.get_running_loop()
        self._released = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=1024, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        if on_ready:
            on_ready()
        async with self._server:
            await self._server.serve_forever()

    # --- HTTP ----------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, path, _ = request_line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                keep_open = await self._route(method, path, headers, body, writer)
                if not keep_open or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, ssl.SSLError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        payload: bytes,
        content_type: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> None:
        headers = {"content-type": content_type, "content-length": str(len(payload)), **(extra or {})}
        head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.write(head.encode("latin-1") + payload)
        await writer.drain()

    async def _route(
        self, method: str, path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        if method == "GET" and path.rstrip("/").endswith("/models"):
            await self._respond(
                writer,
                200,
                json.dumps({"object": "list", "data": [{"id": self.root_model, "object": "model"}]}).encode(),
            )
            return True
        if method != "POST" or not path.rstrip("/").endswith("/chat/completions"):
            await self._respond(writer, 404, b'{"error": {"message": "not found"}}')
            return True
        request = json.loads(body)
        role = "root" if request.get("model") == self.root_model or _is_controller(request) else "sub"
        self._count_start(role, request)
        try:
            if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
                await self._respond(writer, 401, b'{"error": {"message": "invalid api key"}}')
                return True
            return await self._complete(role, request, writer)
        finally:
            self._count_end(role)

    def _count_start(self, role: str, request: dict[str, Any]) -> None:
        with self._lock:
            stats = self.stats
            stats.requests += 1
            stats.in_flight += 1
            stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
            stats.request_times.append(time.monotonic())
            if role == "root":
                stats.root_requests += 1
                if self.record:
                    stats.root_bodies.append(request)
            else:
                stats.sub_requests += 1
                stats.sub_in_flight += 1
                stats.peak_sub_in_flight = max(stats.peak_sub_in_flight, stats.sub_in_flight)
                if self.record:
                    stats.sub_prompts.append(_first_user_text(request.get("messages", [])))

    def _count_end(self, role: str) -> None:
        with self._lock:
            self.stats.in_flight -= 1
            if role == "sub":
                self.stats.sub_in_flight -= 1

    async def _complete(self, role: str, request: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        latency = self.latency if role == "root" else self.sub_latency
        if latency:
            await asyncio.sleep(latency)
        fault = self._take_fault(role)
        if fault is not None and fault.kind == "hold":
            with self._lock:
                self.stats.held += 1
            assert self._released is not None
            await self._released.wait()
        elif fault is not None:
            return await self._serve_fault(fault, writer)
        messages = request.get("messages", [])
        try:
            if role == "root":
                turn = self.root(messages, request)
                text, code = turn.get("text", ""), list(turn.get("code", []))
            else:
                text, code = self.sub(_first_user_text(messages)), []
        except HTTPFault as fault:
            await self._respond(writer, fault.status, json.dumps({"error": {"message": str(fault)}}).encode())
            return True
        message = self._message(text, code, tools=bool(request.get("tools")))
        message.update(self.message_fields.get(role, {}))
        for call in message.get("tool_calls", []) if self.call_id is not None else []:
            call["id"] = self.call_id
        prompt_tokens = sum(_tokens(json.dumps(m.get("content") or "")) for m in messages)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": _tokens(json.dumps(message)), "total_tokens": 0}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if self.cost_per_token is not None:
            usage["cost"] = usage["total_tokens"] * self.cost_per_token
        usage.update(self.usage_fields)
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        if request.get("stream"):
            await self._stream(writer, request, message, usage, finish)
            return True
        payload = {
            "id": f"chatcmpl-{self.stats.requests}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model"),
            "usage": usage,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        }
        if self.loose:
            payload.update(created=None, service_tier="on_demand", choices=[{"index": 0, "message": message}])
        await self._respond(writer, 200, json.dumps(payload).encode())
        return True

    @staticmethod
    def _message(text: str, code: list[str], *, tools: bool) -> dict[str, Any]:
        if tools:
            calls = [
                {
                    "id": f"call_{i}_{abs(hash(c)) % 10**8}",
                    "type": "function",
                    "function": {"name": "run_python", "arguments": json.dumps({"code": c})},
                }
                for i, c in enumerate(code)
            ]
            message: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                message["tool_calls"] = calls
            return message
        blocks = "".join(f"\n```repl\n{c}\n```\n" for c in code)
        return {"role": "assistant", "content": (text + blocks).strip()}

    async def _stream(
        self,
        writer: asyncio.StreamWriter,
        request: dict[str, Any],
        message: dict[str, Any],
        usage: dict[str, int],
        finish: str,
        cut: bool = False,
        trickle: float = 0.0,
    ) -> None:
        head = (
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
            "cache-control: no-cache\r\n\r\n"
        )
        writer.write(head.encode())
        base = {
            "id": "chatcmpl-stream",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": request.get("model"),
        }
        chunks: list[dict[str, Any]] = [{"index": 0, "delta": {"role": "assistant", "content": ""}}]
        content = message.get("content") or ""
        for start in range(0, len(content), 16):
            chunks.append({"index": 0, "delta": {"content": content[start : start + 16]}})
        for i, call in enumerate(message.get("tool_calls", [])):
            chunks.append({"index": 0, "delta": {"tool_calls": [{"index": i, **call}]}})
        chunks.append({"index": 0, "delta": {}, "finish_reason": finish})
        events = [json.dumps({**base, "choices": [c]}) for c in chunks]
        if (request.get("stream_options") or {}).get("include_usage"):
            events.append(json.dumps({**base, "choices": [], "usage": usage}))
        events.append("[DONE]")
        for index, data in enumerate(events):
            if cut and index == len(events) // 2:
                writer.transport.abort()
                return
            frame = f"data: {data}\n\n".encode()
            writer.write(f"{len(frame):x}\r\n".encode() + frame + b"\r\n")
            await writer.drain()
            if trickle:
                await asyncio.sleep(trickle)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _serve_fault(self, fault: Fault, writer: asyncio.StreamWriter) -> bool:
        kind = fault.kind
        if kind == "status":
            extra = {"retry-after": fault.retry_after} if fault.retry_after is not None else None
            body = json.dumps({"error": {"message": f"injected HTTP {fault.status}"}}).encode()
            await self._respond(writer, fault.status, body, extra=extra)
            return True
        if kind == "disconnect":
            writer.transport.abort()
            return False
        if kind == "timeout":
            await asyncio.sleep(3600)
            return False
        if kind == "malformed":
            await self._respond(writer, 200, b'{"choices": [ this is not json')
            return True
        if kind == "string_error":  # the error as a string, as Hugging Face's TGI and Ollama's own API send it
            body = json.dumps({"error": f"injected HTTP {fault.status}", "error_type": "injected"}).encode()
            await self._respond(writer, fault.status, body)
            return True
        if kind == "deep":  # JSON nested deeper than Python's parser goes (a reply, or an error's body)
            await self._respond(writer, fault.status, b'{"choices": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
            return True
        if kind == "empty_choices":
            payload = {"id": "x", "object": "chat.completion", "choices": []}
            await self._respond(writer, 200, json.dumps(payload).encode())
            return True
        if kind == "null_content":
            payload = {
                "id": "x",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": "any",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "length"}],
            }
            await self._respond(writer, 200, json.dumps(payload).encode())
            return True
        if kind == "trickle":
            payload = json.dumps(
                {
                    "id": "x",
                    "object": "chat.completion",
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "slow"}, "finish_reason": "stop"}
                    ],
                }
            ).encode()
            writer.write(
                f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
            )
            for byte in payload:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(1.0)
            return True
        if kind == "cut_stream":
            message = {"role": "assistant", "content": "this stream is cut off halfway through"}
            await self._stream(writer, {"model": "x"}, message, {}, "stop", cut=True)
            return False
        raise ValueError(f"unknown fault {kind!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each reply")
    parser.add_argument("--sub-latency", type=float, default=None)
    parser.add_argument("--root-model", default="root-model")
    args = parser.parse_args()
    server = FakeOpenAI(
        root_model=args.root_model,
        latency=args.latency,
        sub_latency=args.sub_latency,
        record=False,
        host=args.host,
        port=args.port,
    )

    asyncio.run(server.serve(lambda: print(f"listening on {server.url}", flush=True)))


if __name__ == "__main__":
    main()
