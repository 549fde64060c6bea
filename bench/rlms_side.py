"""The reference side of the benchmark: the `rlms` library (imports as `rlm`), driven through its public API.

Run with the rlms virtualenv's python (standard library + rlms only); prints exactly one JSON object on stdout,
logs go to stderr.

    bench/.venv-rlms/bin/python bench/rlms_side.py b1 --url URL --n 2000 --concurrency 64
    bench/.venv-rlms/bin/python bench/rlms_side.py b3 --url URL --iterations 20

b1 -- batched sub-LLM queries as REPL code makes them: `llm_query_batched(prompts)` executed in rlms's LocalREPL,
      served by rlms's LMHandler (batch concurrency = --concurrency) with rlms's OpenAI client ("sub-model" at URL).
b3 -- one full `RLM.completion()` (root "root-model", sub "sub-model", local environment). The root model is the
      fake server playing a script: `iterations` turns each running one trivial ```repl block, then a final turn
      that submits through rlms's `answer` dict (`answer["content"] = ...; answer["ready"] = True`), so
      `iterations` + 1 root turns in all; exits 1 (after printing) if the run did not go exactly that way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from typing import Any

import rlm.clients.openai  # noqa: F401 -- rlms imports the OpenAI SDK lazily (~1 s); do it before any timing
from rlm import RLM
from rlm.clients import get_client
from rlm.core.lm_handler import LMHandler
from rlm.environments import get_environment

API_KEY = "fake-key"  # the fake server accepts any key
log = logging.getLogger("rlms_side")


def openai_kwargs(url: str, model: str) -> dict[str, Any]:
    """backend_kwargs for rlms's "openai" backend pointed at `url`."""
    return {"model_name": model, "base_url": url, "api_key": API_KEY}


def looks_like_error(reply: object) -> bool:
    """rlms reports failed sub-calls in-band, as strings starting with "Error" (or an empty response)."""
    return not isinstance(reply, str) or not reply.strip() or reply.startswith("Error")


def bench_batched(url: str, n: int, concurrency: int) -> dict[str, Any]:
    """Time one `llm_query_batched` call over `n` distinct prompts, made from code run in rlms's LocalREPL."""
    # RLM() builds its LMHandler with the default batch_max_concurrent (16) and has no parameter for it,
    # so build the handler ourselves -- it is the same object RLM.completion() uses for REPL sub-calls.
    handler = LMHandler(get_client("openai", openai_kwargs(url, "sub-model")), batch_max_concurrent=concurrency)
    handler.start()
    prompts = [f"Prompt {i}: summarize item number {i}." for i in range(n)]
    env = get_environment("local", {"lm_handler_address": handler.address, "context_payload": prompts})
    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        result = env.execute_code("replies = llm_query_batched(context)")
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        replies = result.locals.get("replies") or []
    finally:
        env.cleanup()
        handler.stop()
    if result.stderr:
        log.error("REPL error: %s", result.stderr.strip())
    errors = sum(looks_like_error(r) for r in replies) + max(0, n - len(replies))
    return {
        "wall_s": round(wall, 4),
        "cpu_s": round(cpu, 4),
        "n": n,
        "concurrency": concurrency,
        "errors": errors,
        "note": "concurrency set via LMHandler(batch_max_concurrent=c); rlms's RLM class does not expose it "
        "(fixed at the default 16 inside RLM.completion)",
    }


def root_script(iterations: int) -> list[dict[str, Any]]:
    """The fake root model's turns: `iterations` trivial code turns, then a final turn submitting the answer.

    The final code names every x_k, so it fails with NameError (and the run does not finish) unless all
    `iterations` code turns really ran in the REPL.
    """
    turns = [{"text": f"Step {k}.", "code": [f"x_{k} = {k}"]} for k in range(iterations)]
    names = ", ".join(f"x_{k}" for k in range(iterations))
    final = f'answer["content"] = f"{{len([{names}])}} code turns done"\nanswer["ready"] = True'
    return [*turns, {"text": "Done.", "code": [final]}]


def bench_completion(url: str, iterations: int) -> dict[str, Any]:
    """Time one full RLM completion whose root model runs `iterations` code turns and then submits."""
    # rlms puts the user's `prompt` into the REPL as `context`; only `root_prompt` reaches the first user message
    # ("Answer the following: {root_prompt}..."), which is where the fake server reads its script.
    root_prompt = f"Run the benchmark script.\n<<<SCRIPT\n{json.dumps(root_script(iterations))}\nSCRIPT>>>"
    runner = RLM(
        backend="openai",
        backend_kwargs=openai_kwargs(url, "root-model"),
        environment="local",
        other_backends=["openai"],
        other_backend_kwargs=[openai_kwargs(url, "sub-model")],
        max_iterations=iterations + 5,
    )  # headroom: overrunning the script would show as extra root turns
    t0 = time.perf_counter()
    result = runner.completion("benchmark context", root_prompt=root_prompt)
    wall = time.perf_counter() - t0
    # Every root call goes through rlms's OpenAI client, which counts calls per model.
    usage = result.usage_summary.model_usage_summaries
    root_turns = usage["root-model"].total_calls if "root-model" in usage else 0
    # The expected answer can only come from the final block, which needs every x_k (see root_script).
    verified = result.response == f"{iterations} code turns done" and root_turns == iterations + 1
    if not verified:
        log.error(
            "run did not follow the script: answer=%r, root turns=%d (expected %d)",
            result.response,
            root_turns,
            iterations + 1,
        )
    return {
        "wall_s": round(wall, 4),
        "iterations": root_turns,
        "per_iteration_ms": round(wall * 1000 / max(root_turns, 1), 3),
        "answer": result.response,
        "verified": verified,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    b1 = sub.add_parser("b1", help="batched sub-LLM queries from REPL code")
    b1.add_argument("--url", required=True)
    b1.add_argument("--n", type=int, default=2000)
    b1.add_argument("--concurrency", type=int, default=64)
    b3 = sub.add_parser("b3", help="a full scripted RLM completion")
    b3.add_argument("--url", required=True)
    b3.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    # Only our own logger at INFO: library loggers (e.g. per-request HTTP logs) would add work to the timed path.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s: %(message)s")
    log.setLevel(logging.INFO)

    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the one JSON object
        if args.bench == "b1":
            out = bench_batched(args.url, args.n, args.concurrency)
        else:
            out = bench_completion(args.url, args.iterations)
    print(json.dumps(out))
    if out.get("verified") is False:
        sys.exit(1)  # the timing is not of the intended run


if __name__ == "__main__":
    main()
