"""Model calls: `llm_query`/`llm_batch` as seen from the server, and the HTTP client for root requests.

A `ChatClient` speaks the chat-completions protocol of any OpenAI-compatible endpoint over aiohttp's
keep-alive connection pool. It retries what is worth retrying (429, 5xx, timeouts, dropped
connections, garbled replies), honouring `Retry-After` and `retry-after-ms`; each attempt has one
deadline for the whole response, so a server that trickles bytes cannot hold a call. The root model's
requests go through the same client (see `rootmodel`), so both share one pool, one retry policy and
one redaction of the key.

A `SubcallSession` is one run's share: its budget of calls, its concurrency limit, its token usage.
A failed call becomes an `Error: …` string in its slot; the other slots are kept.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import aiohttp

from . import __version__
from .events import Usage
from .security import redact

T = TypeVar("T")
USER_AGENT = f"rlm-service/{__version__}"

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER_S = 60.0
MAX_REPLY_BYTES = 16 * 1024 * 1024
"""The largest reply body taken from the model server (a larger one is an error, retried). Parsing a reply holds
the event loop, and every run and `/health` with it, in a thread too (the JSON parser keeps the GIL): about 30 ms
at this size, seconds at a few hundred megabytes."""
MAX_BATCH_REPLY_BYTES = 64 * 1024 * 1024
"""The replies of one `llm_batch`, together (UTF-8): past it a reply becomes an `Error:` string. Each reply is
held until the batch ends and then sent to the worker in one message: 120 replies of 15 MiB took the server to
gigabytes and held the event loop for seconds while it wrote them."""
KEEPALIVE_S = 30.0


@dataclass
class Completion:
    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float | None = None
    """What the endpoint says the call cost in USD, when it says (OpenRouter does)."""


class ModelCallError(Exception):
    """A model request that failed for good; `kind` is `auth`, `timeout` or `unavailable`."""

    def __init__(self, message: str, *, kind: str = "unavailable", status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


class _Retry(Exception):
    def __init__(
        self, message: str, delay: float | None = None, kind: str = "unavailable", status: int | None = None
    ) -> None:
        super().__init__(message)
        self.delay = delay
        self.kind = kind
        self.status = status


def retry_after_seconds(value: str | None) -> float | None:
    """Parse a `Retry-After` header: seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError, IndexError):
        return None


def _error_detail(raw: bytes, secret: str) -> str:
    """The message of an error reply, short, and without the key should the server quote it back."""
    text = raw.decode("utf-8", "replace")
    try:
        body = json.loads(text)
        error = body.get("error") if isinstance(body, dict) else None
        # OpenAI's `{"error": {"message": ...}}`, or the message itself (Hugging Face's TGI, Ollama's own API)
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str):
            text = message
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python's parser goes: quoted as text
        pass
    return redact(text, secret).strip()[:300]


def first_choice(payload: Any) -> dict[str, Any]:
    """The first choice of a chat-completions response body; a reply without one is worth retrying."""
    if not isinstance(payload, dict):
        raise _Retry("the model server sent a reply that is not a JSON object")
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Retry("the model server sent a reply without choices")
    return choices[0]


def reported_cost(usage: Any) -> float | None:
    """The cost in USD a reply's `usage` object reports, when the endpoint reports one (OpenRouter does). Only a
    finite amount of 0 or more is one: NaN (which Python's JSON parser reads) or a negative amount would leave the
    run's cost below RLM_MAX_COST_USD for good, and infinity would end every run at once."""
    cost = usage.get("cost") if isinstance(usage, dict) else None
    if not isinstance(cost, (int, float)) or isinstance(cost, bool):
        return None
    try:
        amount = float(cost)
    except OverflowError:  # an integer past what a float holds (JSON numbers have no bound)
        return None
    return amount if math.isfinite(amount) and amount >= 0 else None


def token_count(value: object) -> int:
    """A reply's count of tokens when it is one (a whole number of 0 or more), else 0: the count is the endpoint's
    word, and one of another type must not cost the reply."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def content_text(content: Any) -> Any:
    """A message's content, its parts joined when it comes in parts (some servers send a list): only the parts'
    texts that are strings, since a part may carry none (an image) or a null."""
    if not isinstance(content, list):
        return content
    return "".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))


def parse_completion(payload: Any) -> Completion:
    """Pull the reply text and usage out of a chat-completions response body."""
    choice = first_choice(payload)
    message = choice.get("message") or {}
    content = content_text(message.get("content")) if isinstance(message, dict) else None
    if content is None:
        reason = choice.get("finish_reason")
        raise _Retry(f"the model returned no content (finish_reason: {reason})")
    usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
    return Completion(
        text=str(content),
        input_tokens=token_count(usage.get("prompt_tokens")),
        output_tokens=token_count(usage.get("completion_tokens")),
        cost=reported_cost(usage),
    )


class ChatClient:
    """Chat completions against one OpenAI-compatible endpoint, with retries, over aiohttp.

    The connection pool is made inside the running event loop at the first request; `aclose` closes it.
    `proxy` is an `http://` proxy URL (HTTPS endpoints are reached through a CONNECT tunnel); TLS uses
    the system's trust store (OpenSSL honours `SSL_CERT_FILE` and `SSL_CERT_DIR`).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.5,
        proxy: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`tls`: the context to verify the endpoint's certificate with (default: the system's trust store)."""
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key = api_key
        self.headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.proxy = proxy
        self._pool = _Pool(tls)

    def with_timeout(self, timeout: float) -> ChatClient:
        """The same client, connection pool included, with another deadline per attempt."""
        clone = copy.copy(self)
        clone.timeout = timeout
        return clone

    async def aclose(self) -> None:
        await self._pool.close()

    async def complete(self, model: str, prompt: str) -> Completion:
        """One user message in, the reply out; raises `ModelCallError` once retries are spent."""
        return await self.post({"model": model, "messages": [{"role": "user", "content": prompt}]}, parse_completion)

    async def post(self, request: dict[str, Any], parse: Callable[[Any], T]) -> T:
        """POST a chat-completions request and `parse` the JSON reply, retrying what is worth retrying
        (`parse` raises through `first_choice` on a reply without choices); raises `ModelCallError`."""
        body = json.dumps(request, ensure_ascii=False).encode("utf-8", "surrogatepass")
        last: _Retry | None = None
        for attempt in range(self.retries + 1):
            if last is not None:
                delay = last.delay if last.delay is not None else self.backoff * 2 ** (attempt - 1)
                await asyncio.sleep(min(delay, MAX_RETRY_AFTER_S) * (1 + 0.25 * random.random()))
            try:
                return await self._attempt(body, parse)
            except _Retry as retry:
                last = retry
        assert last is not None
        raise ModelCallError(f"{last} (after {self.retries + 1} attempts)", kind=last.kind, status=last.status)

    async def _attempt(self, body: bytes, parse: Callable[[Any], T]) -> T:
        session = self._pool.session()
        try:
            async with asyncio.timeout(self.timeout):
                async with session.post(self.url, data=body, headers=self.headers, proxy=self.proxy) as response:
                    status, retry_after = response.status, _retry_after(response.headers)
                    raw = await _read_limited(response)
        except TimeoutError as exc:
            raise _Retry(f"the model server did not answer within {self.timeout:g} s", kind="timeout") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise _Retry(f"could not reach the model server ({_describe(exc)})") from exc
        if status >= 400:
            detail = _error_detail(raw, self.api_key)
            if status in (401, 403):
                raise ModelCallError(
                    f"the model server refused the key (HTTP {status}): {detail}", kind="auth", status=status
                )
            if status in RETRYABLE_STATUS or status >= 500:
                raise _Retry(f"HTTP {status} from the model server: {detail}", delay=retry_after, status=status)
            raise ModelCallError(f"HTTP {status} from the model server: {detail}", status=status)
        try:
            payload = json.loads(raw)
        except ValueError as exc:
            raise _Retry("the model server sent malformed JSON") from exc
        except RecursionError as exc:  # raised by Python's parser, unlike the rest of what a reply can be
            raise _Retry("the model server sent JSON nested too deeply to read") from exc
        return parse(payload)


class _Pool:
    """One aiohttp session (its connection pool) shared by every clone of a `ChatClient`.

    Made at the first request, inside the running loop. Concurrency is limited by the callers'
    semaphores (`RLM_SUBCALL_CONCURRENCY` per run), so the pool itself sets no connection limit.
    """

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        self._tls = tls
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S, ssl=self._tls or True)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=True, timeout=aiohttp.ClientTimeout(total=None)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_limited(response: aiohttp.ClientResponse) -> bytes:
    """The reply's body, refusing one larger than `MAX_REPLY_BYTES` (a server cannot fill our memory)."""
    if response.content_length is not None and response.content_length > MAX_REPLY_BYTES:
        raise _Retry(f"the model server's reply is larger than {MAX_REPLY_BYTES:,} bytes")
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > MAX_REPLY_BYTES:
            raise _Retry(f"the model server's reply is larger than {MAX_REPLY_BYTES:,} bytes")
    return bytes(body)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """How long a 429 or 5xx asks us to wait: `retry-after-ms` (OpenAI's, milliseconds) or `Retry-After`."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(float(milliseconds) / 1000, 0.0)
        except ValueError:
            pass
    return retry_after_seconds(headers.get("retry-after"))


class HeldReplies:
    """The replies that a run's batches in flight (`llm_batch`, `rlm_batch`) hold until they end, bounded together
    by MAX_BATCH_REPLY_BYTES: a cell's threads may have 64 batches in flight at once."""

    def __init__(self) -> None:
        self.held = 0

    def keep(self, reply: str) -> tuple[str, int]:
        """`reply` and the bytes it holds if it fits, else the `Error:` string the cell gets instead and 0;
        what is kept is given back (`release`) when its batch ends."""
        size = len(reply) if reply.isascii() else len(reply.encode("utf-8", "surrogatepass"))
        if self.held + size > MAX_BATCH_REPLY_BYTES:
            dropped = (
                f"Error: the replies this run's batches hold passed {MAX_BATCH_REPLY_BYTES:,} bytes together, so "
                "this one was dropped: ask for shorter replies, or split the batch"
            )
            return dropped, 0
        self.held += size
        return reply, size

    def release(self, size: int) -> None:
        self.held -= size

    def batch(self) -> BatchHold:
        return BatchHold(self)


class BatchHold:
    """One batch's share of its run's `HeldReplies`: `keep` as theirs, and all it kept given back when the batch
    ends (`with hold:` around the batch)."""

    def __init__(self, replies: HeldReplies) -> None:
        self._replies = replies
        self._size = 0

    def keep(self, reply: str) -> tuple[str, int]:
        kept, size = self._replies.keep(reply)
        self._size += size
        return kept, size

    def __enter__(self) -> BatchHold:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._replies.release(self._size)
        self._size = 0


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


ProgressFn = Callable[[int, int, int], None]
"""Called with (done, failed, total) as the calls of one batch finish."""


CostFn = Callable[[str, Completion], None]
"""Told of every completed sub-call (model, completion), to account for its cost."""


class SubcallBudget:
    """Sub-calls shared by every run of a tree: how many may still go out, and how many at once."""

    def __init__(self, max_calls: int, concurrency: int) -> None:
        self.max_calls = max_calls
        self.concurrency = concurrency
        self.used = 0
        self.failed = 0
        self.semaphore = asyncio.Semaphore(concurrency)
        self.stopped: str | None = None
        """Set when another budget of the tree (time, cost) is spent: then no call goes out."""

    @property
    def remaining(self) -> int:
        return 0 if self.stopped else max(self.max_calls - self.used, 0)

    def take(self, wanted: int) -> int:
        allowed = min(wanted, self.remaining)
        self.used += allowed
        return allowed

    def refusal(self) -> str:
        if self.stopped:
            return f"Error: the run's {self.stopped} budget is spent; this prompt was not sent."
        return (
            f"Error: sub-call budget exhausted ({self.max_calls} calls per run, RLM_MAX_SUBCALLS); "
            "this prompt was not sent."
        )


class SubcallSession:
    """One run's sub-calls: drawn from a budget (its own, or its tree's), with the run's own usage."""

    def __init__(
        self,
        client: ChatClient,
        model: str,
        *,
        max_calls: int = 1000,
        concurrency: int = 16,
        usage: Usage | None = None,
        budget: SubcallBudget | None = None,
        on_cost: CostFn | None = None,
    ) -> None:
        self.client = client
        self.model = model
        self.budget = budget or SubcallBudget(max_calls, concurrency)
        self.usage = usage if usage is not None else Usage()
        self.on_cost = on_cost
        self.replies = HeldReplies()

    @property
    def failed(self) -> int:
        """Calls that failed or were refused, over everything sharing this session's budget."""
        return self.budget.failed

    async def query(self, prompt: str) -> str:
        return (await self.batch([prompt]))[0]

    async def batch(self, prompts: list[str], progress: ProgressFn | None = None) -> list[str]:
        """Results in input order; failures and calls past the budget become `Error: …` strings."""
        total = len(prompts)
        allowed = self.budget.take(total)
        results: list[str] = [self.budget.refusal()] * total
        done = failed = total - allowed
        self.budget.failed += failed
        if progress:
            progress(done, failed, total)
        pending = iter(range(allowed))
        hold = self.replies.batch()

        async def drain() -> None:
            nonlocal done, failed
            for index in pending:
                async with self.budget.semaphore:
                    try:
                        completion = await self.client.complete(self.model, prompts[index])
                    except Exception as exc:
                        text = str(exc) if isinstance(exc, ModelCallError) else f"{type(exc).__name__}: {exc}"
                        results[index] = f"Error: {text}"
                        failed += 1
                        self.budget.failed += 1
                    else:
                        self.usage.add(1, completion.input_tokens, completion.output_tokens)
                        if self.on_cost:
                            self.on_cost(self.model, completion)
                        results[index], size = hold.keep(completion.text)
                        if not size and completion.text:
                            failed += 1
                            self.budget.failed += 1
                done += 1
                if progress:
                    progress(done, failed, total)

        workers = min(allowed, self.budget.concurrency)
        with hold:  # the channel's budget counts them once the batch ends (`WorkerRepl._serve`)
            if workers:
                await asyncio.gather(*(drain() for _ in range(workers)))
        return results
