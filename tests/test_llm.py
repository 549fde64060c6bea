"""`llm_batch` as the server runs it, against a real local OpenAI-compatible HTTP server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from rlm_service import llm
from rlm_service.llm import ChatClient, Completion, SubcallSession, retry_after_seconds
from tests.conftest import SUB_MODEL
from tests.fake_openai import FakeOpenAI, HTTPFault


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[ChatClient]:
    chat = ChatClient(fake.url, "sk-test", timeout=5, retries=2, backoff=0.05)
    yield chat
    await chat.aclose()


def session(client: ChatClient, *, max_calls: int = 1000, concurrency: int = 16) -> SubcallSession:
    return SubcallSession(client, SUB_MODEL, max_calls=max_calls, concurrency=concurrency)


async def test_batch_keeps_order(fake: FakeOpenAI, client: ChatClient) -> None:
    fake.sub = lambda prompt: f"answer to {prompt}"
    fake.sub_latency = 0.0
    prompts = [f"q{i}" for i in range(50)]
    assert await session(client).batch(prompts) == [f"answer to q{i}" for i in range(50)]


async def test_one_failed_call_keeps_the_rest(fake: FakeOpenAI, client: ChatClient) -> None:
    def sub(prompt: str) -> str:
        if prompt == "q3":
            raise HTTPFault(400, "this prompt is refused")
        return f"ok {prompt}"

    fake.sub = sub
    calls = session(client)
    results = await calls.batch([f"q{i}" for i in range(8)])
    assert results[3].startswith("Error: HTTP 400") and "this prompt is refused" in results[3]
    assert results[:3] + results[4:] == [f"ok q{i}" for i in (0, 1, 2, 4, 5, 6, 7)]
    assert calls.failed == 1


async def test_peak_concurrency_never_above_the_limit(fake: FakeOpenAI, client: ChatClient) -> None:
    fake.sub_latency = 0.05
    results = await session(client, concurrency=5).batch([f"p{i}" for i in range(40)])
    assert len(results) == 40 and not any(r.startswith("Error") for r in results)
    assert fake.stats.peak_sub_in_flight == 5


async def test_429_with_retry_after_is_retried(fake: FakeOpenAI, client: ChatClient) -> None:
    fake.inject("status", role="sub", status=429, retry_after="1")
    started = time.monotonic()
    assert await session(client).query("hello") == fake.sub("hello")
    assert time.monotonic() - started >= 1.0
    assert fake.stats.sub_requests == 2


async def test_5xx_and_dropped_connections_are_retried(fake: FakeOpenAI, client: ChatClient) -> None:
    fake.inject("status", role="sub", status=503)
    fake.inject("disconnect", role="sub")
    assert not (await session(client).query("x")).startswith("Error")
    assert fake.stats.sub_requests == 3


async def test_call_that_keeps_failing_yields_error_slot(fake: FakeOpenAI, client: ChatClient) -> None:
    fake.inject("status", role="sub", status=500, count=3)
    result = await session(client).query("x")
    assert result.startswith("Error: HTTP 500") and "after 3 attempts" in result


async def test_budget_enforced(fake: FakeOpenAI, client: ChatClient) -> None:
    calls = session(client, max_calls=5)
    first = await calls.batch(["a", "b", "c"])
    second = await calls.batch(["d", "e", "f", "g"])
    assert not any(r.startswith("Error") for r in first + second[:2])
    assert all(r.startswith("Error: sub-call budget exhausted") for r in second[2:])
    assert fake.stats.sub_requests == 5


async def test_null_content_and_garbage_are_retried_then_reported(fake: FakeOpenAI, client: ChatClient) -> None:
    fake.inject("null_content", role="sub")
    fake.inject("malformed", role="sub")
    assert not (await session(client).query("x")).startswith("Error")
    fake.inject("empty_choices", role="sub", count=3)
    assert "without choices" in await session(client).query("x")


async def test_usage_is_summed_and_progress_reported(fake: FakeOpenAI, client: ChatClient) -> None:
    calls = session(client)
    seen: list[tuple[int, int, int]] = []
    await calls.batch(["one", "two", "three"], lambda *p: seen.append(p))
    assert calls.usage.requests == 3 and calls.usage.input_tokens > 0 and calls.usage.output_tokens > 0
    assert seen[0] == (0, 0, 3) and seen[-1] == (3, 0, 3)


async def test_auth_failure_is_not_retried(fake: FakeOpenAI, client: ChatClient) -> None:
    """A refused key is reported at once: the fake counts every request, refused ones too. Mutant caught:
    401 retried like a 5xx (three requests)."""
    fake.api_key = "sk-other"
    result = await session(client).query("x")
    assert result.startswith("Error: the model server refused the key (HTTP 401)")
    assert fake.stats.requests == fake.stats.sub_requests == 1


async def test_forbidden_is_not_retried(fake: FakeOpenAI, client: ChatClient) -> None:
    """Mutant caught: 403 retried like a 5xx (three requests)."""
    fake.inject("status", role="sub", status=403, count=10)
    result = await session(client).query("x")
    assert result.startswith("Error: the model server refused the key (HTTP 403)")
    assert fake.stats.requests == fake.stats.sub_requests == 1


def test_retry_after_parses_seconds_and_dates() -> None:
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after_seconds("soon") is None


async def test_replies_held_by_a_run_s_batches_in_flight_are_bounded_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound on held replies (lowered here to 1,000 bytes; it is 64 MiB) is the run's, over all its batches in
    flight (a cell's threads may have 64): while one batch holds a reply of 600, another's reply of 600 is dropped,
    and once the first batch ends the bound is free again. Old behaviour caught (the review): the bound was each
    batch's, so 64 batches could hold 64 times as much."""
    monkeypatch.setattr(llm, "MAX_BATCH_REPLY_BYTES", 1000)
    gates: dict[str, asyncio.Event] = {}

    class Gated:
        async def complete(self, model: str, prompt: str) -> Completion:
            await gates.setdefault(prompt, asyncio.Event()).wait()
            return Completion(text="y" * 600)

    calls = SubcallSession(Gated(), SUB_MODEL)  # type: ignore[arg-type]
    first = asyncio.ensure_future(calls.batch(["a1", "a2"]))
    second = asyncio.ensure_future(calls.batch(["b1"]))
    await asyncio.sleep(0.01)
    gates["a1"].set()
    await asyncio.sleep(0.01)
    gates["b1"].set()
    (dropped,) = await second
    gates["a2"].set()
    held, also_dropped = await first
    third = asyncio.ensure_future(calls.batch(["c1"]))
    await asyncio.sleep(0.01)
    gates["c1"].set()
    assert held == "y" * 600 and await third == ["y" * 600]
    assert dropped.startswith("Error: the replies this run's batches hold passed 1,000 bytes")
    assert also_dropped == dropped
    assert calls.replies.held == 0
