"""The cell runner, as generated code experiences it (no worker process, no server)."""

from __future__ import annotations

import threading

from rlm_service.repl.capture import BoundedText
from rlm_service.repl.executor import CellRunner


def echo_batch(prompts: list[str]) -> list[str]:
    return [f"reply:{p}" for p in prompts]


def runner(context: str = "the input", **kwargs: object) -> CellRunner:
    return CellRunner(context, echo_batch, **kwargs)  # type: ignore[arg-type]


def test_variables_persist_after_error() -> None:
    repl = runner()
    result = repl.run("a = 1\nb = [a, 2]\nraise ValueError('boom')\nc = 3")
    assert "ValueError: boom" in (result.error or "")
    after = repl.run("print(a, b, 'c' in globals())")
    assert after.error is None
    assert after.stdout == "1 [1, 2] False\n"


def test_output_truncated_with_marker() -> None:
    repl = runner(max_output_chars=1000)
    result = repl.run("print('A' * 5000 + 'END')")
    assert result.truncated
    assert len(result.stdout) <= 1000
    assert result.stdout.startswith("AAAA")
    assert result.stdout.rstrip().endswith("END")
    assert "characters cut" in result.stdout
    assert "5,004 in all" in result.stdout


def test_last_expression_echoed_like_a_notebook() -> None:
    repl = runner()
    assert repl.run("x = 21\nx * 2").stdout == "42"
    assert repl.run("print('hi')\n{'k': 1}").stdout == "hi\n{'k': 1}"
    assert repl.run("None").stdout == ""
    assert repl.run("print('only')").stdout == "only\n"


def test_stderr_is_captured() -> None:
    result = runner().run("import sys\nsys.stderr.write('warned\\n')\nprint('out')")
    assert "warned" in result.stdout and "out" in result.stdout


def test_context_and_alias_hold_the_input() -> None:
    repl = runner("hello world")
    assert repl.run("len(context), input_data is context").stdout == "(11, True)"


def test_protected_names_restored() -> None:
    repl = runner("original")
    result = repl.run("context = 'changed'\nllm_batch = None\ndel llm_query")
    assert any("`context`" in note for note in result.notes)
    assert any("`llm_batch`" in note for note in result.notes)
    assert repl.run("context, llm_query('x'), llm_batch(['a'])").stdout == "('original', 'reply:x', ['reply:a'])"


def test_answer_stays_a_dict_with_str_and_bool() -> None:
    repl = runner()
    result = repl.run("answer = 'plain text'")
    assert (result.answer_content, result.answer_ready) == ("plain text", False)
    assert result.notes
    result = repl.run("answer['content'] = 42\nanswer['ready'] = 1")
    assert (result.answer_content, result.answer_ready) == ("42", True)
    assert repl.run("type(answer['content']).__name__, answer['ready']").stdout == "('str', True)"
    result = repl.run("answer = 7")
    assert (result.answer_content, result.answer_ready) == ("42", False)
    assert repl.run("answer").stdout == "{'content': '42', 'ready': False}"


def test_ready_with_empty_content_is_ready() -> None:
    """The contract: the run ends after the first cell that leaves `ready` true, content or not."""
    result = runner().run("answer['ready'] = True")
    assert (result.answer_content, result.answer_ready) == ("", True)


def test_traceback_shows_only_generated_frames() -> None:
    repl = runner()
    repl.run("def inner(x):\n    return 1 / x")
    result = repl.run("inner(0)")
    error = result.error or ""
    assert error.startswith("Traceback (most recent call last):")
    assert '<cell 2>", line 1' in error and '<cell 1>", line 2' in error and "return 1 / x" in error
    assert "executor.py" not in error and "ZeroDivisionError" in error


def test_syntax_error_reported_plainly() -> None:
    result = runner().run("def broken(:\n    pass")
    assert "SyntaxError" in (result.error or "")
    assert "Traceback" not in (result.error or "")


def test_system_exit_does_not_end_the_repl() -> None:
    repl = runner()
    result = repl.run("x = 5\nraise SystemExit(3)")
    assert "SystemExit" in (result.error or "")
    assert repl.run("x").stdout == "5"


def test_llm_functions_check_their_arguments() -> None:
    repl = runner()
    assert "llm_query()" in (repl.run("llm_batch('one string')").error or "")
    assert "prompt 1 is int" in (repl.run("llm_batch(['a', 2])").error or "")
    assert repl.run("llm_batch([])").stdout == "[]"
    assert repl.run("llm_batch(('a', 'b'))").stdout == "['reply:a', 'reply:b']"


def test_per_run_capture_with_two_runs_at_once() -> None:
    first, second = runner(max_output_chars=100_000), runner(max_output_chars=100_000)
    barrier = threading.Barrier(2)
    results = {}

    def go(name: str, repl: CellRunner) -> None:
        barrier.wait()
        results[name] = repl.run(f"for i in range(2000):\n    print('{name}', i)")

    threads = [threading.Thread(target=go, args=(n, r)) for n, r in (("first", first), ("second", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, other in (("first", "second"), ("second", "first")):
        assert results[name].stdout.count(name) == 2000
        assert other not in results[name].stdout


def test_bounded_text_keeps_head_and_tail_of_a_flood() -> None:
    sink = BoundedText(100)
    for _ in range(100_000):
        sink.write("x" * 10)
    sink.write("THE END")
    text = sink.getvalue()
    assert sink.total == 1_000_007
    assert len(text) <= 100 and text.endswith("THE END") and "cut" in text


def test_a_dict_or_list_answer_becomes_json_only_where_json_can_hold_it() -> None:
    """Old behaviour caught: NaN became `NaN`, which JSON has not (a typed answer's readers refuse it), under a
    note saying it was JSON; and a dict subclass whose `items` raised (the encoder calls it) made the cell runner
    itself raise, past "never raises for errors in the code itself"."""
    repl = runner()
    result = repl.run("answer['content'] = {'count': 3, 'names': ['é']}")
    assert result.answer_content == '{"count": 3, "names": ["é"]}'
    result = repl.run("answer['content'] = {'x': float('nan')}")
    assert result.answer_content == "{'x': nan}" and "answer['content'] was converted to str." in result.notes
    code = "class D(dict):\n    def items(self):\n        raise KeyError('boom')\nanswer['content'] = [D(a=1)]"
    result = repl.run(code)
    assert result.error is None and result.answer_content == "[{'a': 1}]"
