"""Recursive runs: children and grandchildren, budgets shared by the tree, events a client can fold."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx2
import pytest

from rlm_service import llm
from rlm_service.engine import Engine, RunSettings
from rlm_service.events import EventBase
from rlm_service.inputs import RunInput
from rlm_service.repl.workspace import Workspace
from rlm_service.runner import RunDriver, RunPlan
from rlm_service.runs import LiveRun
from tests.conftest import LiveServer, make_settings, parse_sse, script, wait_until, worker_processes
from tests.fake_openai import FakeOpenAI


def nested(prompt: str, *turns: dict[str, Any]) -> str:
    """A prompt for a child run that the fake server plays with `turns`."""
    return f"{prompt} <<<SCRIPT {json.dumps(list(turns))} SCRIPT>>>"


async def run(fake: FakeOpenAI, prompt: str, input_data: str = "root input", **overrides: Any) -> list[EventBase]:
    async with Engine(make_settings(fake, **overrides)) as engine:
        return [event async for event in engine.run(prompt, input_data)]


def children(events: list[EventBase]) -> list[Any]:
    return [event for event in events if event.type == "child"]


async def test_at_depth_one_rlm_query_is_a_sub_call(fake: FakeOpenAI) -> None:
    prompt = script(
        {"code": ["r = rlm_query('what is this?', 'a small context')\nanswer.update(content=r, ready=True)"]}
    )
    events = await run(fake, prompt)
    assert not children(events)
    assert events[-1].type == "final" and events[-1].answer.startswith("sub-model reply")
    assert fake.stats.sub_prompts == ["what is this?\n\n---\na small context"]


async def test_depth_two_child_chunks_its_context_and_batches(fake: FakeOpenAI) -> None:
    fake.sub = lambda prompt: f"<{prompt.split(':', 1)[1].strip()}>"
    child_prompt = nested(
        "Describe each piece.",
        {
            "text": "Chunking my context.",
            "code": [
                "pieces = [context[i:i + 4] for i in range(0, len(context), 4)]\n"
                "notes = llm_batch([f'piece: {p}' for p in pieces])\nprint(notes)"
            ],
        },
        {"code": ["answer.update(content=''.join(notes), ready=True)"]},
    )
    prompt = script(
        {"code": [f"r = rlm_query({child_prompt!r}, context='abcdefghij')\nprint(r)"]},
        {"code": ["answer.update(content='child said ' + r, ready=True)"]},
    )
    events = await run(fake, prompt, rlm_max_depth=2)
    root_id = events[0].run_id
    final = events[-1]
    assert final.type == "final" and final.ready and final.answer == "child said <abcd><efgh><ij>"
    assert [e.type for e in events].count("final") == 1
    kids = children(events)
    assert {k.depth for k in kids} == {1}
    assert all(k.parent.run_id == root_id and k.parent.iteration == 1 and k.run_id == root_id for k in kids)
    child_sequence = [k.event for k in kids]
    assert child_sequence[0] == "start" and child_sequence[-1] == "final"
    assert {"code", "subcalls", "output", "answer", "usage"} <= set(child_sequence)
    assert kids[0].data["input"]["chars"] == 10 and kids[0].data["model"] == "sub-model"
    assert kids[-1].data["answer"] == "<abcd><efgh><ij>"
    # the child's events sit between the root cell's code and output events
    types = [e.type for e in events]
    first_child, last_child = types.index("child"), len(types) - 1 - types[::-1].index("child")
    assert types[first_child - 1] == "code" and types[last_child + 1] == "output"
    assert final.by_depth["0"].root.requests == 2 and final.by_depth["1"].root.requests == 2
    assert final.by_depth["1"].sub.requests == 3 and final.usage.sub.requests == 3
    assert final.usage.root.requests == 4


async def test_depth_three_stops_at_the_limit_and_shares_budgets(fake: FakeOpenAI) -> None:
    grandchild = nested(
        "Go deeper.",
        {"code": ["deeper = rlm_query('too deep?', 'x')\nburst = llm_batch([f'q{i}' for i in range(10)])"]},
        *[{"code": [f"step_{i} = {i}"]} for i in range(20)],
    )
    child = nested(
        "Delegate.",
        {"code": [f"g = rlm_query({grandchild!r}, context='grand input')"]},
        {"code": ["answer.update(content='child: ' + g, ready=True)"]},
    )
    prompt = script(
        {"code": [f"c = rlm_query({child!r}, context='child input')"]},
        {"code": ["answer.update(content='root: ' + c, ready=True)"]},
    )
    events = await run(fake, prompt, rlm_max_depth=3, rlm_max_iterations=6, rlm_max_subcalls=4)
    kids = children(events)
    assert max(k.depth for k in kids) == 2
    grand_outputs = [k for k in kids if k.depth == 2 and k.event == "output"]
    assert grand_outputs and grand_outputs[0].data["error"] is None
    assert events[-1].iterations <= 6
    assert fake.stats.root_requests <= 6  # every root turn of the tree, counted together
    assert fake.stats.sub_requests <= 4  # 'too deep?' went out as a sub-call, then 3 of the burst
    assert "too deep?\n\n---\nx" in fake.stats.sub_prompts
    budget_told = [k for k in kids if k.event == "final" and k.depth == 2]
    assert budget_told and not budget_told[0].data["ready"]
    # the grandchild spent the tree's turns: the root ends at the iteration limit, its answer not ready
    assert [e.type for e in events if e.type in ("final", "error")] == ["final"] and not events[-1].ready


async def test_more_children_than_slots_each_with_a_child_of_its_own_all_finish(fake: FakeOpenAI) -> None:
    """Four children at once (twice RLM_SUBCALL_CONCURRENCY), each asking one grandchild: a child holds its slot
    while its grandchild runs. Mutant caught: one set of slots for every depth (both slots held by children
    waiting for grandchildren that wait for a slot: the cell hangs until RLM_EXEC_TIMEOUT_S)."""
    grandchild = nested("Leaf.", {"code": ["answer.update(content='leaf', ready=True)"]})
    child = nested("Branch.", {"code": [f"answer.update(content='got ' + rlm_query({grandchild!r}), ready=True)"]})
    prompt = script({"code": [f"answer.update(content=repr(rlm_batch([{child!r}] * 4)), ready=True)"]})
    events = await run(fake, prompt, rlm_max_depth=3, rlm_subcall_concurrency=2, rlm_exec_timeout_s=60)
    assert events[-1].type == "final" and events[-1].answer == repr(["got leaf"] * 4)


async def test_usage_and_cost_are_summed_over_the_tree(fake: FakeOpenAI) -> None:
    child = nested("Answer.", {"code": ["n = llm_query('count')\nanswer.update(content=n, ready=True)"]})
    prompt = script(
        {"code": [f"c = rlm_batch([{child!r}, {child!r}], ['one', 'two'])"]},
        {"code": ["answer.update(content=' / '.join(c), ready=True)"]},
    )
    prices = {"root-model": [1.0, 2.0], "sub-model": [3.0, 4.0]}
    events = await run(fake, prompt, rlm_max_depth=2, rlm_prices=prices)
    final = events[-1]
    depth0, depth1 = final.by_depth["0"], final.by_depth["1"]
    assert depth1.root.requests == 2 and depth1.sub.requests == 2 and depth0.sub.requests == 0
    expected = (
        depth0.root.input_tokens * 1.0
        + depth0.root.output_tokens * 2.0
        + (depth1.root.input_tokens + depth1.sub.input_tokens) * 3.0
        + (depth1.root.output_tokens + depth1.sub.output_tokens) * 4.0
    ) / 1e6
    assert abs(final.cost_usd - expected) < 1e-6
    assert final.usage.root.input_tokens == depth0.root.input_tokens + depth1.root.input_tokens
    usage_events = [e for e in events if e.type == "usage"]
    assert usage_events[-1].by_depth is not None and set(usage_events[-1].by_depth) == {"0", "1"}


async def test_costs_the_endpoint_reports_are_summed_root_and_sub(fake: FakeOpenAI) -> None:
    """Without RLM_PRICES, the cost is what the endpoint reports (OpenRouter's `usage.cost`) for every
    request: the root model's as well as the sub-calls'."""
    fake.cost_per_token = 1e-6
    prompt = script({"code": ["r = llm_batch(['a', 'b'])"]}, {"code": ["answer.update(content='done', ready=True)"]})
    final = (await run(fake, prompt))[-1]
    assert final.type == "final" and final.usage.root.requests == 2 and final.usage.sub.requests == 2
    tokens = sum(part.input_tokens + part.output_tokens for part in (final.usage.root, final.usage.sub))
    assert final.cost_usd is not None and abs(final.cost_usd - tokens * 1e-6) < 1e-9


async def test_a_cost_budget_spent_by_a_root_reply_holds_for_the_cell_it_asks_for(fake: FakeOpenAI) -> None:
    prompt = script({"code": ["print(llm_batch(['a', 'b']))"]}, {"code": ["answer.update(content='x', ready=True)"]})
    events = await run(fake, prompt, rlm_max_cost_usd=0.001, rlm_prices={"root-model": [1000.0, 1000.0]})
    output = next(e for e in events if e.type == "output")
    assert output.stdout.count("cost budget is spent") == 2 and fake.stats.sub_requests == 0
    assert events[-1].type == "final" and events[-1].cost_usd > 0.001


@pytest.mark.parametrize(
    "reported", [float("nan"), float("inf"), -1.0, 10**400], ids=["nan", "inf", "negative", "past-a-float"]
)
async def test_a_reported_cost_that_cannot_be_one_is_not_counted(fake: FakeOpenAI, reported: float) -> None:
    """An endpoint whose replies report a cost that is not a finite amount of 0 or more (NaN, which Python's
    JSON parser reads, infinity, a negative amount, an integer past what a float holds): the run's cost became
    NaN or negative, never at the budget, so RLM_MAX_COST_USD stopped nothing (the sub-calls were made), or
    infinite, or the run ended with error internal (OverflowError). Such a cost is now taken as not reported,
    and RLM_PRICES price the reply."""
    fake.cost_per_token = reported
    prompt = script({"code": ["print(llm_batch(['a', 'b']))"]}, {"code": ["answer.update(content='x', ready=True)"]})
    events = await run(fake, prompt, rlm_max_cost_usd=0.001, rlm_prices={"root-model": [1000.0, 1000.0]})
    output = next(e for e in events if e.type == "output")
    assert output.stdout.count("cost budget is spent") == 2 and fake.stats.sub_requests == 0
    assert events[-1].type == "final" and 0.001 < events[-1].cost_usd < 1e9


async def test_spent_cost_stops_the_children_and_tells_the_root(fake: FakeOpenAI) -> None:
    child = nested("Work.", *[{"code": [f"x_{i} = llm_query('more {i}')"]} for i in range(10)])
    prompt = script(
        {"code": [f"c = rlm_query({child!r}, 'ctx')"]}, {"code": ["answer.update(content='stopped: ' + c, ready=True)"]}
    )
    seen: list[Any] = []
    original = fake.root

    def root(messages: list[dict[str, Any]], body: dict[str, Any]) -> dict[str, Any]:
        seen.append(messages)
        return original(messages, body)

    fake.root = root
    events = await run(
        fake, prompt, rlm_max_depth=2, rlm_prices={"sub-model": [100000.0, 100000.0]}, rlm_max_cost_usd=0.5
    )
    final = events[-1]
    assert final.type == "final" and final.cost_usd >= 0.5
    child_turns = [k for k in children(events) if k.event == "code"]
    assert len(child_turns) < 10
    assert any("cost budget is spent" in json.dumps(messages) for messages in seen)


async def test_run_timeout_ends_the_tree_with_its_answer_so_far(fake: FakeOpenAI) -> None:
    """Past RLM_RUN_TIMEOUT_S the run gets one last turn, then ends with its answer not ready. Mutant
    caught: no run timeout (the third turn runs)."""
    prompt = script(
        {"code": ["answer['content'] = 'partial'\nimport time\ntime.sleep(2.5)"]},
        {"code": ["x = 1"]},
        {"code": ["y = 2"]},
    )
    events = await run(fake, prompt, rlm_run_timeout_s=1.5)
    assert [e.code for e in events if e.type == "code"][1:] == ["x = 1"]
    final = events[-1]
    assert final.type == "final" and not final.ready and final.iterations == 2 and final.answer == "partial"


async def test_a_run_out_of_time_without_an_answer_ends_with_the_timeout_code(fake: FakeOpenAI) -> None:
    """Mutant caught: ending such a run with an empty `final` (the `timeout` code is then never sent)."""
    prompt = script({"code": ["import time\ntime.sleep(2.5)"]}, {"code": ["x = 1"]}, {"code": ["y = 2"]})
    events = await run(fake, prompt, rlm_run_timeout_s=1.5)
    assert events[-1].type == "error" and events[-1].code == "timeout"
    assert "RLM_RUN_TIMEOUT_S" in events[-1].message


async def test_a_cost_budget_spent_without_an_answer_ends_with_the_budget_code(fake: FakeOpenAI) -> None:
    """Mutant caught: ending such a run with an empty `final` (the `budget` code is then never sent)."""
    prompt = script({"code": ["x = 1"]}, {"code": ["y = 2"]})
    events = await run(fake, prompt, rlm_max_cost_usd=0.001, rlm_prices={"root-model": [1000.0, 1000.0]})
    assert events[-1].type == "error" and events[-1].code == "budget"
    assert "RLM_MAX_COST_USD" in events[-1].message


def test_cancelling_the_root_reaches_grandchildren(fake: FakeOpenAI) -> None:
    grandchild = nested("Sleep.", {"code": ["import time\ntime.sleep(60)"]})
    child = nested("Delegate.", {"code": [f"g = rlm_query({grandchild!r}, 'x')"]})
    prompt = script({"code": [f"c = rlm_query({child!r}, 'y')"]})
    with LiveServer(make_settings(fake, rlm_max_depth=3)) as server:
        with (
            httpx2.Client(timeout=30) as client,
            client.stream("POST", f"{server.url}/process", json={"prompt": prompt}) as response,
        ):
            for event in parse_sse(response.iter_lines()):
                if event.event == "child" and event.data["depth"] == 2 and event.data["event"] == "code":
                    assert len(worker_processes()) == 3
                    break
        assert wait_until(lambda: worker_processes() == [], timeout=30)
        assert wait_until(lambda: server.app.state.slots.active == 0, timeout=30)


async def test_the_answers_of_one_rlm_batch_are_bounded_together(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The children's answers are held until the last child ends, then sent to the cell at once: like the replies
    of an llm_batch they are bounded together (here the bound is lowered to 1,000 bytes; it is 64 MiB). Three
    children answer 600 characters each: one answer comes whole, the others are `Error:` strings that say why.
    Old behaviour: nothing bounded them (a child's answer may be 4 Mi characters, and a batch has many)."""
    monkeypatch.setattr(llm, "MAX_BATCH_REPLY_BYTES", 1000)
    child = nested("Answer at length.", {"code": ["answer.update(content='y' * 600, ready=True)"]})
    prompt = script(
        {"code": [f"r = rlm_batch([{child!r}] * 3)\nprint([len(x) if x == 'y' * 600 else x[:60] for x in r])"]},
        {"code": ["answer.update(content='done', ready=True)"]},
    )
    events = await run(fake, prompt, rlm_max_depth=2)
    printed = next(event for event in events if event.type == "output").stdout
    assert printed.count("600") == 1
    assert printed.count("Error: the replies this run's batches hold passed 1,000 byte") == 2
    assert events[-1].type == "final" and events[-1].ready


async def test_a_child_without_code_says_why_it_has_no_answer(fake: FakeOpenAI) -> None:
    """A child whose root model writes no code (a small model on a local server, often): its final carried no
    note and rlm_query gave "Error: the child run ended without an answer." with no word of why; the note (no code
    was written) is now in both, as it is in a root run's final."""
    child_prompt = nested("Look.", {"text": "I will not write code."}, {"text": "Still no code."})
    prompt = script(
        {"code": [f"r = rlm_query({child_prompt!r}, context='abc')\nprint(r)"]},
        {"code": ["answer.update(content=r, ready=True)"]},
    )
    events = await run(fake, prompt, rlm_max_depth=2)
    child_final = [k for k in children(events) if k.event == "final"]
    assert len(child_final) == 1 and child_final[0].data["note"].startswith("The root model wrote no code")
    answer = events[-1].answer
    assert answer.startswith("Error: the child run ended without an answer: The root model wrote no code"), answer


@pytest.mark.parametrize("repl", ["subprocess", "inprocess"])
async def test_a_run_cancelled_while_a_child_run_starts_ends_once_the_child_has_cleaned_up(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, repl: str
) -> None:
    """A run cancelled (its client left, the server stops) while a child run's workspace is being made: the child is
    cancelled with the cell, and its clean-up waits for the workspace to remove it. Old behaviour caught: the cell
    cancelled the child without waiting for it, so the run ended (its slot given back; at a stop, the server went on
    to stop its zygote and remove the run files) while the child's workspace was still being made, its uid taken."""
    made: list[Workspace] = []
    making: list[RunPlan] = []
    at_end: list[tuple[int, list[bool]]] = []
    launched: list[LiveRun] = []
    make_workspace = RunDriver._workspace
    loop = asyncio.get_running_loop()

    def workspace(self: RunDriver, plan: RunPlan) -> Workspace:
        if plan.run_input.text != "the child's context":
            made.append(make_workspace(self, plan))
            return made[-1]
        making.append(plan)
        try:
            loop.call_soon_threadsafe(launched[0].cancel, "the client disconnected")
            time.sleep(2)  # a slow disk, say: the child's workspace is still being made when the run is cancelled
            made.append(make_workspace(self, plan))
            return made[-1]
        finally:
            making.remove(plan)

    monkeypatch.setattr(RunDriver, "_workspace", workspace)
    child = nested("Count.", {"code": ["answer.update(content=str(len(context)), ready=True)"]})
    prompt = script({"code": [f'r = rlm_query({child!r}, "the child\'s context")']})
    async with Engine(make_settings(fake, rlm_max_depth=2, rlm_repl=repl)) as engine:
        launched.append(run := engine.launch(prompt, RunInput.from_text("root input"), RunSettings()))
        run.on_end(lambda _: at_end.append((len(making), [workspace.root.exists() for workspace in made])))
        async with asyncio.timeout(30):
            await run.wait()
    assert run.events[-1].type == "error" and run.events[-1].code == "cancelled"  # type: ignore[attr-defined]
    child_events = [event.event for event in children(run.events)]
    assert child_events[:1] == ["start"] and not {"final", "error"} & set(child_events)  # cancelled as it started
    assert at_end == [(0, [False, False])], "the run ended before its child's workspace was made and removed"
