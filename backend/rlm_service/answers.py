"""Typed answers: a JSON Schema the answer must satisfy (`settings.answer_schema`, OpenAI's `response_format`).

The root model is told the schema in its task message. When a cell marks the answer ready, the controller
asks `AnswerSchema.problem` whether `answer["content"]` is JSON valid against it; if not, the answer is
not accepted (ready goes back to False) and the root model reads what is wrong. `final.answer_json`
carries the parsed value of an answer that satisfies the schema.

Schemas are checked with the `jsonschema` package under the draft they declare (`$schema`; 2020-12 when
they declare none). References are resolved only inside the schema and the drafts' own metaschemas: nothing is
fetched (jsonschema's default registry fetches any `http` reference, and the server's network is not the
client's to reach). A schema whose reference cannot be resolved, or loops back to where it started without
going into the value (`{"$ref": "#"}`: every answer's check would recurse until it fails), is refused.

The check of an answer runs in a short-lived child process (this file, run as a script), within
CHECK_TIMEOUT_S and CHECK_MEMORY_BYTES: the client writes the schema and the run's code writes the answer,
and some pairs take hours to check. A `pattern` that backtracks (`^(a|aa)+$` against forty `a`s and a `!`)
holds Python's interpreter lock for the whole match, which froze every request of the server when the check
ran in one of its threads; `uniqueItems` over a large array of objects compares every pair; an answer nested
a hundred thousand deep exhausts the parser's recursion. Starting the child takes about 0.2 s, once for each
answer a cell marks ready.

The schema itself is checked the same way, once, as the request that brings it is read (`check_schema`, within
SCHEMA_CHECK_TIMEOUT_S): the metaschema compiles every `pattern`, and a pattern of 5,000 characters can take
seconds to compile (the review). Schemas too large to be worth a process are refused before one starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import resource
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any, TypeVar
from urllib.parse import urldefrag

from jsonschema import exceptions as schema_errors
from jsonschema import validators
from jsonschema.protocols import Validator
from jsonschema_specifications import REGISTRY as DRAFTS
from referencing import Specification
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012, specification_with

MAX_REPORTED_ERRORS = 5
"""Violations listed to the root model for one answer (the most relevant first)."""
CHECK_TIMEOUT_S = 10.0
"""How long the check of one answer may take; past it, the answer is refused as unchecked."""
SCHEMA_CHECK_TIMEOUT_S = 5.0
"""How long the check of a schema may take; past it, the schema is refused. Valid schemas of the sizes allowed take
well under a second, but some shapes take far longer (a `pattern` of 5,000 characters, 2 s: the review)."""
CHECK_MEMORY_BYTES = 2 * 1024**3
"""The address space of the checking process."""
CHECK_NICE = 10
"""How much lower than the server's the checking process's CPU priority is: many checks at once, each up to its
time limit, leave the server the CPU it needs to serve every run."""
CHECKS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="rlm-answer-check")
"""The threads that wait for the checks of the answers of runs (`in_check_thread`): not asyncio's default ones,
which every run needs for its workspace, and which a few checks waiting their 10 s would otherwise all hold."""
READS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="rlm-request-read")
"""The threads that read the requests that may bring a schema, and wait for its check (`in_read_thread`): apart
from CHECKS, so that requests with schemas slow to check never delay the runs already going (the attack pass: 60
of them held a run's answer check from 3.6 s to 12.5 s when they shared the threads)."""
SCHEMA_CHECKS_AT_ONCE = 4
"""The most schema checks (processes) that run at once; more wait, up to SCHEMA_CHECKS_WAITING."""
SCHEMA_CHECKS_WAITING = 16
"""The most schema checks that wait for their turn; a request whose schema would be one more is refused at once
(429, `ChecksBusy`), so that schemas slow to check hold few READS threads and every other request is read."""
_ADMITTED = threading.BoundedSemaphore(SCHEMA_CHECKS_AT_ONCE + SCHEMA_CHECKS_WAITING)
_RUNNING = threading.BoundedSemaphore(SCHEMA_CHECKS_AT_ONCE)
MAX_COLLECTED_ERRORS = 1000
"""Violations collected to pick those from: an answer of a few megabytes can break a schema in millions of
places, and collecting every one takes tens of seconds."""
MAX_SCHEMA_OBJECTS = 1000
"""The most JSON objects an answer schema may hold. Checking a schema against its metaschema costs some 0.3 ms of
CPU per object: one of 48,000 (half a megabyte) took 16 s of it (the attack pass). A schema for an answer rarely
needs more than a few hundred."""
MAX_SCHEMA_VALUES = 10_000
"""The most JSON values (objects, arrays, strings, numbers...) an answer schema may hold."""
MAX_SCHEMA_DEPTH = 64
"""The deepest an answer schema may nest. The metaschema does not look inside `const` or `enum`: a value 260 deep
there was accepted, and then every listing of the history failed to serialize the run's settings (the attack pass)."""
MAX_SCHEMA_CHAIN = 100
"""The most references and keywords that apply to the value itself (`allOf`, `$ref`...) that may follow each other in an
answer schema: jsonschema follows each with a few calls of its own, and a chain of 250 links of `allOf` and `$ref`
ran out of Python's recursion limit in the check of every answer (the review)."""
MAX_SCHEMA_ARRAY = 1000
"""The most items of one array in an answer schema (OpenAI's structured outputs allow an `enum` of 1,000). The
metaschema asks some arrays for unique items (`type`, draft-04's `enum`), which are compared pair by pair when
their items are not all of one sortable kind: 4,000 took 3.6 s (the review), 1,000 about 0.2 s."""


log = logging.getLogger("rlm_service")
T = TypeVar("T")


def _too_large(schema: Any) -> str | None:
    """Why `schema` is too large to be checked, if it is (walked without recursion: it may nest deeply)."""
    objects, values, pending = 0, 0, [(schema, 1)]
    while pending:
        item, depth = pending.pop()
        values += 1
        if depth > MAX_SCHEMA_DEPTH:  # (a value nested deeper than this could not be shown in the history either)
            return f"a JSON Schema nested too deeply (more than {MAX_SCHEMA_DEPTH} levels)"
        if isinstance(item, dict):
            objects += 1
            pending.extend((value, depth + 1) for value in item.values())
        elif isinstance(item, list):
            if len(item) > MAX_SCHEMA_ARRAY:
                return f"a JSON Schema with an array of {len(item):,} items, more than the {MAX_SCHEMA_ARRAY:,} allowed"
            pending.extend((value, depth + 1) for value in item)
        if values > MAX_SCHEMA_VALUES:  # too many already: the rest need not be walked
            break
    if objects > MAX_SCHEMA_OBJECTS:
        return f"a JSON Schema of more than {MAX_SCHEMA_OBJECTS:,} objects"
    if values > MAX_SCHEMA_VALUES:
        return f"a JSON Schema of more than {MAX_SCHEMA_VALUES:,} values"
    return None


class SchemaInvalid(ValueError):
    """The answer schema itself is not a valid JSON Schema."""


class ChecksBusy(RuntimeError):
    """The schema was not checked: too many are being checked already (not a ValueError: pydantic lets it through
    to the request's reader, which answers 429)."""


def _where(path: Any) -> str:
    """A JSON path like `$.items[2].price` (`$` is the whole value)."""
    return "$" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)


def too_long(schema: dict[str, Any], max_chars: int) -> str | None:
    """Why `schema` is too long for the root model to read every turn (`RLM_MAX_PROMPT_CHARS`), if it is."""
    size = len(json.dumps(schema))
    if size <= max_chars:
        return None
    return (
        f"{size:,} characters of JSON, more than RLM_MAX_PROMPT_CHARS ({max_chars:,}): the root model reads it "
        "every turn"
    )


def check_schema(schema: dict[str, Any], max_chars: int | None = None) -> None:
    """Raises `SchemaInvalid` (with the reason) when `schema` is not a valid JSON Schema, is too large to be checked
    (or longer than `max_chars` characters of JSON), or cannot be checked within SCHEMA_CHECK_TIMEOUT_S. It waits
    for the checking process: call it off the event loop (`in_read_thread`)."""
    if (reason := _too_large(schema)) is not None:
        raise SchemaInvalid(reason)
    if max_chars is not None and (reason := too_long(schema, max_chars)) is not None:  # (nested 64 deep at most)
        raise SchemaInvalid(reason)
    if not _ADMITTED.acquire(blocking=False):
        raise ChecksBusy(
            f"{SCHEMA_CHECKS_AT_ONCE + SCHEMA_CHECKS_WAITING} answer schemas are being checked or waiting for their "
            "check; try again in a few seconds"
        )
    try:
        with _RUNNING:
            found = _in_child({"schema": schema}, SCHEMA_CHECK_TIMEOUT_S)
    except _Unchecked as exc:
        raise SchemaInvalid(f"the JSON Schema could not be checked {exc}: its patterns are the likely cause") from None
    finally:
        _ADMITTED.release()
    if found is not None:
        raise SchemaInvalid(found)


def _schema_problem(schema: dict[str, Any]) -> str | None:
    """What is wrong with `schema` against its draft's metaschema, or None (in the checking process)."""
    if not isinstance(schema.get("$schema", ""), str):  # (`validator_for` fails on anything else)
        return "not a valid JSON Schema: $schema must be a string, the URI of a draft (at $.$schema)"
    validator_class = validators.validator_for(schema, default=validators.Draft202012Validator)
    if validator_class is validators.Draft3Validator:  # (referencing fails to crawl some of its schemas)
        return "draft 3 of JSON Schema is not supported: declare draft-04 or later in $schema (at $.$schema)"
    try:
        validator_class.check_schema(schema)
    except schema_errors.SchemaError as exc:  # (the message quotes the value, which may be large)
        return f"not a valid JSON Schema: {_cut(exc.message)} (at {_where(exc.absolute_path)})"
    except RecursionError:  # (never seen within MAX_SCHEMA_DEPTH; a check that fails is reported, not crashed)
        return "a JSON Schema nested too deeply to be checked"
    try:
        return _reference_problem(schema, validator_class)
    except ValueError as exc:  # a pointer or an `$id` that is not one (`#/allOf/x`, `http://[::1`)
        return f"not a usable JSON Schema: a reference or an $id in it cannot be resolved ({_cut(str(exc), 200)})"


@dataclass(frozen=True)
class _Keywords:
    """A draft's keywords that hold subschemas, by whether they apply to the value itself or to its parts."""

    in_place: frozenset[str]
    into: frozenset[str]
    dynamic: str | None = None
    """The draft's reference resolved at run time: 2019-09's `$recursiveRef`, 2020-12's `$dynamicRef`."""
    ref_alone: bool = False
    """`$ref` replaces the other keywords of its object (drafts 4 to 7)."""


_INTO_4 = frozenset({"properties", "patternProperties", "additionalProperties", "items", "additionalItems"})
_INTO_6 = _INTO_4 | {"contains", "propertyNames"}
_APPLY_4 = frozenset({"allOf", "anyOf", "oneOf", "not", "dependencies"})
_APPLY_2019 = frozenset({"allOf", "anyOf", "oneOf", "not", "if", "then", "else", "dependentSchemas"})
_INTO_2019 = _INTO_6 | {"unevaluatedItems", "unevaluatedProperties"}
_KEYWORDS: dict[type[Validator], _Keywords] = {
    validators.Draft4Validator: _Keywords(_APPLY_4, _INTO_4, ref_alone=True),
    validators.Draft6Validator: _Keywords(_APPLY_4, _INTO_6, ref_alone=True),
    validators.Draft7Validator: _Keywords(_APPLY_4 | {"if", "then", "else"}, _INTO_6, ref_alone=True),
    validators.Draft201909Validator: _Keywords(_APPLY_2019, _INTO_2019, dynamic="$recursiveRef"),
    validators.Draft202012Validator: _Keywords(
        _APPLY_2019, _INTO_2019 - {"additionalItems"} | {"prefixItems"}, dynamic="$dynamicRef"
    ),
}
"""What the walk of a schema's references follows, for each draft jsonschema knows (others are checked as 2020-12)."""


def _subschemas(node: dict[str, Any], keyword: str) -> list[tuple[str, dict[str, Any]]]:
    """The subschemas under `node[keyword]` that are objects, each with its path (true and false hold none, and
    draft 4's `dependencies` may hold lists of names)."""
    value = node[keyword]
    if isinstance(value, list):
        found = [(f"{keyword}[{index}]", item) for index, item in enumerate(value)]
    elif isinstance(value, dict) and keyword in ("properties", "patternProperties", "dependentSchemas", "dependencies"):
        found = [(f"{keyword}.{name}", item) for name, item in value.items()]
    else:
        found = [(keyword, value)]
    return [(step, item) for step, item in found if isinstance(item, dict)]


def _reference_problem(schema: dict[str, Any], validator_class: type[Validator]) -> str | None:
    """A reference of `schema` that cannot be resolved, a pattern that is not a regular expression, a loop of
    references and keywords that apply to the value itself (the check of any answer that reaches it recurses until
    it fails), or a chain of them longer than MAX_SCHEMA_CHAIN; None when there is none of these.

    The schema's objects are walked from its root as the validator reaches them, resolving references as jsonschema
    does (`referencing`, each subschema a possible new base URI); the loops are the cycles of the graph of in-place
    edges. A reference that lands on a dynamic anchor (2020-12's `$dynamicAnchor`, 2019-09's `$recursiveAnchor`) is
    resolved at run time to one of that name, so it is given an edge to each the walk met: a loop through one that
    the validator would never take is refused too (no such schema is known to be of use)."""
    keywords = _KEYWORDS.get(validator_class, _KEYWORDS[validators.Draft202012Validator])
    specification = _specification(validator_class)
    registry, uri = _registry(schema, specification)
    pending = [(schema, registry.resolver(base_uri=uri), "$")]
    where: dict[int, str] = {}
    in_place: dict[int, list[int]] = {}
    anchors: dict[str, list[int]] = {}  # the dynamic anchors by name ("" for 2019-09's `$recursiveAnchor: true`)
    dynamic: list[tuple[int, str]] = []  # the objects whose reference lands on a dynamic anchor, and its name
    while pending:
        node, resolver, path = pending.pop()
        if id(node) in where:
            continue
        where[id(node)] = path
        edges = in_place.setdefault(id(node), [])
        if (problem := _bad_pattern(node, path)) is not None:
            return problem
        if (name := _dynamic_anchor(node)) is not None:
            anchors.setdefault(name, []).append(id(node))
        for keyword in ("$ref", keywords.dynamic):
            if keyword is None or keyword not in node:
                continue
            reference = node[keyword]
            if not isinstance(reference, str):
                return f"not a usable JSON Schema: a {keyword} must be a string (at {path}.{keyword})"
            try:  # (`$recursiveRef` is always "#", and lands elsewhere only on a `$recursiveAnchor`)
                resolved = resolver.lookup("#" if keyword == "$recursiveRef" else reference)
            except Unresolvable:
                return (
                    f"not a usable JSON Schema: its reference {_cut(reference, 100)!r} "
                    f"(at {_cut(path, 200)}.{keyword}) cannot be resolved: only references inside the schema work"
                )
            if isinstance(target := resolved.contents, dict):
                edges.append(id(target))
                pending.append((target, resolved.resolver, f"{path}.{keyword}"))
                if (name := _lands_on_dynamic_anchor(keyword, reference, target)) is not None:
                    dynamic.append((id(node), name))
        if keywords.ref_alone and "$ref" in node:
            continue
        for keyword in sorted(node.keys() & (keywords.in_place | keywords.into)):
            for step, child in _subschemas(node, keyword):
                if keyword in keywords.in_place:
                    edges.append(id(child))
                pending.append((child, resolver.in_subresource(specification.create_resource(child)), f"{path}.{step}"))
    for node_id, name in dynamic:
        in_place[node_id].extend(anchors.get(name, ()))
    length, start = _longest_chain(in_place)
    if length == math.inf:
        return (
            f"not a usable JSON Schema: it refers back to itself at {_cut(where[start], 200)} without going into the "
            "value's items or properties, so no value could ever be checked against it"
        )
    if length > MAX_SCHEMA_CHAIN:
        return (
            f"not a usable JSON Schema: from {_cut(where[start], 200)}, {length:.0f} references and keywords that "
            f"apply to the value itself follow each other, more than the {MAX_SCHEMA_CHAIN} its check can follow"
        )
    return None


def _dynamic_anchor(node: dict[str, Any]) -> str | None:
    """The name of the dynamic anchor `node` declares, if it declares one ("" for `$recursiveAnchor: true`)."""
    if node.get("$recursiveAnchor") is True:
        return ""
    anchor = node.get("$dynamicAnchor")
    return anchor if isinstance(anchor, str) else None


def _lands_on_dynamic_anchor(keyword: str, reference: str, target: dict[str, Any]) -> str | None:
    """The name of the dynamic anchor a reference found statically at `target`, if it is one: the validator then
    resolves it at run time, to the outermost anchor of that name in the value's path (referencing does so for a
    `$ref` too)."""
    if keyword == "$recursiveRef":
        return "" if target.get("$recursiveAnchor") is True else None
    fragment = urldefrag(reference).fragment
    return fragment if fragment and target.get("$dynamicAnchor") == fragment else None


def _registry(schema: dict[str, Any], specification: Specification[Any]) -> tuple[Any, str]:
    """The drafts' metaschemas and `schema`, with every subschema of it that has an `$id` or an anchor; and the
    schema's base URI. jsonschema's own (`Registry.resolver_with_root`) is not crawled ahead: it crawls the whole
    schema again for each reference to an `$id` or an anchor (1.5 s of CPU for 500 of them, the review)."""
    root = specification.create_resource(schema)
    uri = root.id() or ""
    return DRAFTS.with_resource(uri, root).crawl(), uri


def _specification(validator_class: type[Validator]) -> Specification[Any]:
    """How the validator's draft resolves references (the dialect of its metaschema)."""
    meta = validator_class.META_SCHEMA
    return specification_with(str(meta.get("$id") or meta.get("id") or ""), default=DRAFT202012)


def _bad_pattern(node: dict[str, Any], path: str) -> str | None:
    """A `pattern` or `patternProperties` name of `node` that Python's `re` cannot compile (draft 4's metaschema does
    not check them, and every check of an answer that met one failed)."""
    patterns = [("pattern", node.get("pattern"))]
    if isinstance(node.get("patternProperties"), dict):
        patterns += [(f"patternProperties[{name!r}]", name) for name in node["patternProperties"]]
    for where, pattern in patterns:
        if not isinstance(pattern, str):
            continue
        try:
            re.compile(pattern)
        except re.error as exc:
            return f"not a usable JSON Schema: {_cut(where, 100)} at {path} is not a regular expression ({exc})"
    return None


def _longest_chain(edges: dict[int, list[int]]) -> tuple[float, int]:
    """The most edges of a path of the directed graph `edges`, and the node it starts from; infinite, with a node
    on the cycle, where a cycle makes paths endless (depth first, without recursion)."""
    longest: dict[int, int] = {}
    for first in edges:
        if first in longest:
            continue
        on_path = {first}
        stack = [(first, iter(edges[first]))]
        while stack:
            node, children = stack[-1]
            for child in children:
                if child in on_path:
                    return math.inf, child
                if child not in longest:
                    on_path.add(child)
                    stack.append((child, iter(edges[child])))
                    break
            else:
                stack.pop()
                on_path.discard(node)
                longest[node] = max((1 + longest[child] for child in edges[node]), default=0)
    start = max(longest, key=longest.__getitem__)
    return longest[start], start


def _cut(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


class _Unchecked(Exception):
    """The checking process gave no verdict; the message says why, as the end of "could not be checked …"."""


def _in_child(request: dict[str, Any], timeout: float) -> str | None:
    """The problem that the checking process (`_main`) finds with `request`, or None; raises `_Unchecked`."""
    try:
        done = subprocess.run(
            [sys.executable, "-I", __file__],
            input=json.dumps(request, ensure_ascii=False).encode("utf-8", "surrogatepass"),
            capture_output=True,
            env={},  # nothing of the server's environment (its keys) reaches the child
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise _Unchecked(f"within {timeout:g} s") from None
    except OSError as exc:  # no process could be started (out of memory or of file descriptors)
        log.error("a JSON Schema check could not start: %s", exc)
        raise _Unchecked(f"now ({exc.strerror})") from None
    try:
        found: str | None = json.loads(done.stdout)["problem"]
    except (ValueError, KeyError, TypeError):
        log.warning(
            "a JSON Schema check ended with status %s: %s",
            done.returncode,
            done.stderr.decode("utf-8", "replace")[-2000:],
        )
        raise _Unchecked(f"(the check ended with status {done.returncode}, out of memory most likely)") from None
    return found


async def in_check_thread(call: Callable[..., T], *args: Any) -> T:
    """`call(*args)` in one of the CHECKS threads: `AnswerSchema.problem` or `.value`."""
    return await asyncio.get_running_loop().run_in_executor(CHECKS, call, *args)


async def in_read_thread(call: Callable[..., T], *args: Any) -> T:
    """`call(*args)` in one of the READS threads: the reading of a request that may bring a schema to check."""
    return await asyncio.get_running_loop().run_in_executor(READS, call, *args)


class AnswerSchema:
    """The check of answers against a JSON Schema that `check_schema` accepted."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self._accepted: tuple[str, Any] | None = None
        """The last answer `problem` found valid, parsed: the run's `final` asks `value` for the same one."""

    def text(self) -> str:
        """The schema as the root model reads it."""
        return json.dumps(self.schema, ensure_ascii=False)

    def problem(self, content: str) -> str | None:
        """What is wrong with `content` as an answer (None when it is JSON valid against the schema). It waits for
        the checking process (up to CHECK_TIMEOUT_S): call it in a thread, off the event loop."""
        try:
            found = _in_child({"schema": self.schema, "content": content}, CHECK_TIMEOUT_S)
        except _Unchecked as exc:
            return (
                f"the answer could not be checked against the schema {exc}: give an answer that is quicker to check "
                "(a `pattern` that backtracks on it is the likely cause) or smaller, or try again."
            )
        if found is None:
            self._accepted = (content, json.loads(content))
        return found

    def value(self, content: str) -> Any:
        """The parsed answer when it satisfies the schema, else None (in a thread, as `problem`). The answer
        `problem` last accepted is not checked again."""
        accepted = self._accepted is not None and self._accepted[0] == content
        if not accepted and self.problem(content) is not None:
            return None
        assert self._accepted is not None
        return self._accepted[1]


def _check(validator: Validator, content: str) -> str | None:
    """What is wrong with `content` against the validator's schema, or None (in the checking process)."""
    try:
        value = json.loads(content)
    except RecursionError:
        return "answer['content'] is nested too deeply to be read as JSON."
    except ValueError as exc:
        return f"answer['content'] is not valid JSON ({exc}); build it with json.dumps(value)."
    try:
        found = list(islice(validator.iter_errors(value), MAX_COLLECTED_ERRORS))
    except Unresolvable as exc:  # a `$ref` is resolved only when an answer reaches it
        return (
            f"the answer cannot be checked: the schema's reference {_cut(str(exc), 200)} cannot be resolved (only "
            "references inside the schema work); answer in the shape the schema describes as best you can."
        )
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # any failure of the checker is the verdict, not a crash
        # RecursionError (too deep for it), OverflowError (a number too large for a float), and what a schema the
        # walk let through can still raise: the recursion of a loop only jsonschema's `unevaluatedProperties` takes
        # surfaces from the `rpds` extension as pyo3's PanicException, which is not an Exception (the review).
        return f"the answer cannot be checked against the schema ({type(exc).__name__}: {_cut(str(exc), 200)})."
    if not found:
        return None
    errors = sorted(found, key=schema_errors.relevance)
    lines = [f"- at {_where(error.absolute_path)}: {error.message}" for error in errors[:MAX_REPORTED_ERRORS]]
    if len(errors) > MAX_REPORTED_ERRORS:
        more = len(errors) - MAX_REPORTED_ERRORS
        lines.append(f"- and at least {more} more" if len(errors) == MAX_COLLECTED_ERRORS else f"- and {more} more")
    return "the JSON does not satisfy the schema:\n" + "\n".join(lines)


def _main() -> None:
    """The checking process: `{"schema", "content"}` (an answer's check) or `{"schema"}` (the schema's) on stdin,
    `{"problem": str | None}` on stdout."""
    resource.setrlimit(resource.RLIMIT_AS, (CHECK_MEMORY_BYTES, CHECK_MEMORY_BYTES))
    os.nice(CHECK_NICE)
    request = json.loads(sys.stdin.buffer.read())  # (a schema nests at most MAX_SCHEMA_DEPTH deep)
    schema = request["schema"]
    if "content" not in request:
        sys.stdout.write(json.dumps({"problem": _schema_problem(schema)}))
        return
    validator_class = validators.validator_for(schema, default=validators.Draft202012Validator)
    registry, _ = _registry(schema, _specification(validator_class))
    validator = validator_class(schema, registry=registry, format_checker=validator_class.FORMAT_CHECKER)
    sys.stdout.write(json.dumps({"problem": _check(validator, request["content"])}))


if __name__ == "__main__":
    _main()
