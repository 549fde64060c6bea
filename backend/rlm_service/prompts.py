"""Everything the root model reads: the system prompt, the task message, cell results, reminders."""

from __future__ import annotations

from .events import RunLimits
from .repl.base import CellOutcome

_COMMON = """\
You are the controller of a Recursive Language Model. The user's input is NOT in this conversation: it
sits in a persistent Python REPL as the string variable `context` (also called `input_data`). You only
see its size, its shape and a short preview. It may be far larger than anything you could read, so you
work on it with code and delegate the reading of pieces to a sub-model.

In the REPL you have:
- `context`: the whole input, a str.
- `llm_query(prompt: str) -> str`: ask the sub-model one question and get its reply.
- `llm_batch(prompts: list[str]) -> list[str]`: ask many questions in parallel; replies come back in the
  same order. A reply that starts with "Error:" failed; the others are fine.
- `answer`: a dict {{"content": str, "ready": bool}}. The run ends after the first cell that leaves
  answer["ready"] True, and answer["content"] is what the user gets.
Variables survive from cell to cell, also after an error. The standard library, numpy and matplotlib
are available; {network}. Figures a cell leaves open (matplotlib.pyplot) are shown to the user
under that cell. A cell may run for {exec_timeout_s:g} s at most. You have {max_iterations} turns and
{max_subcalls} sub-model calls in all. Only the first {max_output_chars} characters or so of a cell's
output come back to you, so print summaries and samples, never the whole input.

How to work:
1. Look first: print len(context), a few slices, the line structure, separators, formats. Never guess
   what the data holds when you can check it.
2. Compute what code can compute: counting, searching, parsing, arithmetic, statistics. Code is exact
   and free; sub-model calls cost time and money.
3. When the content must be read or understood, split it into chunks that each fit comfortably in the
   sub-model's window (about 50,000 to 100,000 characters each is a good default), build one precise
   prompt per chunk that includes the chunk and says exactly what to return, and send them all in
   one `llm_batch` call. Keep the results in variables.
4. Aggregate with code. If the partial results still need to be combined by a model, pass them to
   `llm_query` (or another `llm_batch` when they are too long for one prompt).
5. Verify: print the answer or a check of it (counts add up, no "Error:" slot was used as data).
6. Write the answer into answer["content"] and set answer["ready"] = True only once output you have seen
   confirms it is complete and correct. The user reads answer["content"] rendered as Markdown and
   on its own: it must answer the task fully, without referring to your cells or variables.

For example, to summarize a long transcript (one cell per step, each after reading the last output):
    print(len(context)); print(context[:500])                      # look
    size = 60_000
    chunks = [context[i:i + size] for i in range(0, len(context), size)]
    notes = llm_batch([f"List the main points of this part of a transcript:\\n{{c}}" for c in chunks])
    print(len(chunks), sum(n.startswith("Error:") for n in notes))  # check before using them
    summary = llm_query("Write a summary in Markdown from these notes:\\n" + "\\n".join(notes))
    answer["content"] = summary; print(summary[:2000])              # verify
    answer["ready"] = True                                           # only after seeing it is right
"""

TOOLS_SYSTEM_PROMPT = (
    _COMMON
    + """
Run code by calling the `run_python` tool with the code as its argument. You may make several calls in
one reply; they run one after another, in order. Keep prose short: the user sees your final answer
through answer["content"], not through your messages."""
)

TEXT_SYSTEM_PROMPT = (
    _COMMON
    + """
You run code by writing it in a fenced block that starts with ```repl (or ```python) and ends with ```.
Every block in your reply runs, in order, and their outputs come back to you in the next message: do
not guess at output in the same reply. Keep prose short: the user sees your final answer through
answer["content"], not through your messages."""
)


RECURSION = """

You may also start child RLMs, each with its own REPL and its own turns:
- `rlm_query(prompt: str, context: str | None = None) -> str`: a child whose `context` is the given
  string runs the task in `prompt` the way you do, with code, and returns its final answer.
- `rlm_batch(prompts: list[str], contexts: list[str | None] | None = None) -> list[str]`: many children
  in parallel, answers in the same order ("Error: …" for a child that failed).
Children share your budgets (turns, sub-calls, time), so use them only when a sub-task itself needs
code over a large piece: a section of megabytes that must be searched, counted or parsed before it can
be answered. To read or summarize a piece that fits in the sub-model's window, llm_batch is far cheaper
and faster."""


def system_prompt(protocol: str, limits: RunLimits, *, can_recurse: bool = False, network: bool = False) -> str:
    """`network`: whether the cells can open connections (RLM_WORKER_NETWORK=on, or the in-process REPL)."""
    template = TEXT_SYSTEM_PROMPT if protocol == "text" else TOOLS_SYSTEM_PROMPT
    text = template.format(
        network="so is the network" if network else "the network is not",
        max_iterations=limits.max_iterations,
        max_subcalls=limits.max_subcalls,
        exec_timeout_s=limits.exec_timeout_s,
        max_output_chars=limits.max_output_chars,
    )
    return text + RECURSION if can_recurse else text


def task_message(prompt: str, *, chars: int, lines: int, kind: str, preview: str) -> str:
    """The first user message: the task, and what the input looks like (never the input itself)."""
    shown = len(preview)
    more = "" if shown >= chars else f" (the first {shown:,} of {chars:,} characters)"
    return (
        f"Task: {prompt}\n\n"
        f"The input is in `context`: {chars:,} characters, {lines:,} lines, {kind}.\n"
        f"Preview{more}:\n<<<\n{preview}\n>>>\n\n"
        "Start by exploring `context` with code."
    )


def follow_up_message(
    prompt: str,
    *,
    earlier: list[tuple[str, str, bool, int]],
    variables: list[str],
    chars: int,
    lines: int,
    kind: str,
    preview: str,
    restarted: str | None = None,
    not_shown: int = 0,
) -> str:
    """A follow-up's first message: the new task, the latest earlier questions and their answers (`earlier`:
    question, the answer's first characters, whether it was ready, the answer's length; `not_shown` earlier
    ones before them), and the REPL's variables (one line each), never the input itself nor the earlier
    transcripts."""
    parts = [
        f"Task: {prompt}",
        "",
        "This is a follow-up question in the same REPL. Earlier questions and their final answers:",
    ]
    if not_shown:
        parts.append(f"({not_shown:,} earlier question{'s' if not_shown != 1 else ''} not shown)")
    for number, (question, answer, ready, length) in enumerate(earlier, not_shown + 1):
        cut = answer if length <= len(answer) else f"{answer} … [{length - len(answer):,} more characters]"
        state = "" if ready else " (not marked ready)"
        parts += [f"{number}. Q: {question}", f"   A{state}: {cut or '(no answer)'}"]
    parts.append("")
    if restarted:
        parts += [
            f"The REPL was restarted since the last question ({restarted}): every variable of the "
            "earlier runs is lost; `context` is back.",
            "",
        ]
    elif variables:
        parts += [
            "Variables in the REPL from earlier runs (name: type, size = short repr):",
            *(f"- {line}" for line in variables),
            "",
        ]
    shown = len(preview)
    more = "" if shown >= chars else f" (the first {shown:,} of {chars:,} characters)"
    parts += [
        f"The input is still in `context`: {chars:,} characters, {lines:,} lines, {kind}.",
        f"Preview{more}:",
        "<<<",
        preview,
        ">>>",
        "",
        "`answer` starts empty for this question. Reuse what the variables hold instead of redoing work.",
    ]
    return "\n".join(parts)


def cell_report(outcome: CellOutcome, *, turns_left: int | None = None) -> str:
    """What the root model reads after one cell ran."""
    parts = []
    if outcome.stdout:
        cut = " (cut: print less, or print slices)" if outcome.truncated else ""
        parts.append(f"Output{cut}:\n{outcome.stdout}")
    if outcome.error:
        parts.append(f"Error:\n{outcome.error.rstrip()}")
    if not parts:
        parts.append("(no output)")
    parts.extend(f"Note: {note}" for note in outcome.notes)
    state = "ready" if outcome.answer_ready else "not ready"
    parts.append(f"[answer: {len(outcome.answer_content):,} characters, {state}]")
    if turns_left is not None and turns_left <= 2:
        parts.append(
            f"[{turns_left} turn{'s' if turns_left != 1 else ''} left: finish the answer and mark it ready]"
            if turns_left
            else "[no turns left]"
        )
    return "\n".join(parts)


def answer_schema_note(schema: str) -> str:
    """What the task message adds when the answer must satisfy a JSON Schema."""
    return (
        "\n\nThe answer must be JSON valid against this JSON Schema: put the JSON text in answer['content'] "
        "(build it with json.dumps(value)). It is checked when you set answer['ready'] = True, and not "
        f"accepted until it is valid.\nSchema:\n<<<\n{schema}\n>>>"
    )


def answer_refused(problem: str) -> str:
    """What the root model reads after a cell marked an answer ready that does not satisfy the schema."""
    return (
        f"[answer not accepted: {problem}\nanswer['ready'] was set back to False. Fix answer['content'], "
        "then set answer['ready'] = True again.]"
    )


RESET_READY_CODE = 'answer["ready"] = False'
"""Run in the REPL (not shown to anyone) when an answer marked ready is not accepted."""

SKIPPED_AFTER_READY = "Not run: the answer was already marked ready by an earlier cell."


def skipped_past_the_cap(cap: int) -> str:
    return f"Not run: one reply may run at most {cap} cells. Send the rest in your next reply, or join them."


REMINDER_TOOLS = (
    "The answer is not marked ready yet, and the run only ends with answer['ready'] = True. Keep working "
    "by calling run_python: build the answer in answer['content'], check it, then set answer['ready'] = True."
)
REMINDER_TEXT = (
    "The answer is not marked ready yet, and the run only ends with answer['ready'] = True. Keep working "
    "by writing code in a ```repl block: build the answer in answer['content'], check it, then set "
    "answer['ready'] = True."
)


def no_code_note(replies: int, protocol: str) -> str:
    """What the user reads when the root model never ran a cell: nothing was computed."""
    fix = (
        "a root model that calls tools reliably, or RLM_ROOT_PROTOCOL=text for models without tool calling"
        if protocol == "tools"
        else "a stronger root model"
    )
    return (
        f"The root model wrote no code in {replies} {'reply' if replies == 1 else 'replies'}, so nothing "
        f"was computed and there is no answer. Its text is shown as its thoughts. Try {fix}."
    )


def describe_kind(head: str) -> str:
    """A guess at the input's format from its first characters, for the task message."""
    stripped = head.lstrip()
    if not stripped:
        return "empty" if not head else "whitespace only"
    if stripped[0] in "[{":
        return "looks like JSON"
    first_lines = [line for line in head.splitlines()[:5] if line.strip()]
    if len(first_lines) >= 2:
        for sep, name in ((",", "CSV"), ("\t", "TSV")):
            counts = {line.count(sep) for line in first_lines[:-1]}
            if len(counts) == 1 and counts != {0}:
                return f"looks like {name}"
    return "plain text"
