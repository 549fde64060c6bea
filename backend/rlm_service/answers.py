"""Typed answers: a JSON Schema the answer must satisfy (`settings.answer_schema`, OpenAI's `response_format`).

The root model is told the schema in its task message. When a cell marks the answer ready, the controller
asks `AnswerSchema.problem` whether `answer["content"]` is JSON valid against it; if not, the answer is
not accepted (ready goes back to False) and the root model reads what is wrong. `final.answer_json`
carries the parsed value of an answer that satisfies the schema.

Schemas are checked with the `jsonschema` package under the draft they declare (`$schema`; 2020-12 when
they declare none). References are resolved only inside the schema: nothing is fetched.
"""

from __future__ import annotations

import json
from itertools import islice
from typing import Any

from jsonschema import exceptions as schema_errors
from jsonschema import validators
from jsonschema.protocols import Validator
from referencing.exceptions import Unresolvable

MAX_REPORTED_ERRORS = 5
"""Violations listed to the root model for one answer (the most relevant first)."""
MAX_COLLECTED_ERRORS = 1000
"""Violations collected to pick those from: an answer of a few megabytes can break a schema in millions of
places, and collecting every one takes tens of seconds."""


class SchemaInvalid(ValueError):
    """The answer schema itself is not a valid JSON Schema."""


def _where(path: Any) -> str:
    """A JSON path like `$.items[2].price` (`$` is the whole value)."""
    return "$" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)


class AnswerSchema:
    """A checked JSON Schema, and the check of answers against it."""

    def __init__(self, schema: dict[str, Any]) -> None:
        """Raises `SchemaInvalid` (with the reason) when `schema` is not a valid JSON Schema."""
        validator_class = validators.validator_for(schema, default=validators.Draft202012Validator)
        try:
            validator_class.check_schema(schema)
        except schema_errors.SchemaError as exc:
            raise SchemaInvalid(f"not a valid JSON Schema: {exc.message} (at {_where(exc.absolute_path)})") from None
        self.schema = schema
        self._validator: Validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
        self._accepted: tuple[str, Any] | None = None
        """The last answer `problem` found valid, parsed: the run's `final` asks `value` for the same one."""

    def text(self) -> str:
        """The schema as the root model reads it."""
        return json.dumps(self.schema, ensure_ascii=False)

    def problem(self, content: str) -> str | None:
        """What is wrong with `content` as an answer (None when it is JSON valid against the schema). Checking an
        answer of megabytes takes a while: call it in a thread, off the event loop."""
        try:
            value = json.loads(content)
        except ValueError as exc:
            return f"answer['content'] is not valid JSON ({exc}); build it with json.dumps(value)."
        try:
            found = list(islice(self._validator.iter_errors(value), MAX_COLLECTED_ERRORS))
        except Unresolvable as exc:  # a `$ref` is resolved only when an answer reaches it
            return (
                f"the answer cannot be checked: the schema's reference {exc} cannot be resolved (only "
                "references inside the schema work); answer in the shape the schema describes as best you can."
            )
        if not found:
            self._accepted = (content, value)
            return None
        errors = sorted(found, key=schema_errors.relevance)
        lines = [f"- at {_where(error.absolute_path)}: {error.message}" for error in errors[:MAX_REPORTED_ERRORS]]
        if len(errors) > MAX_REPORTED_ERRORS:
            more = len(errors) - MAX_REPORTED_ERRORS
            lines.append(f"- and at least {more} more" if len(errors) == MAX_COLLECTED_ERRORS else f"- and {more} more")
        return "the JSON does not satisfy the schema:\n" + "\n".join(lines)

    def value(self, content: str) -> Any:
        """The parsed answer when it satisfies the schema, else None (in a thread, as `problem`). The answer
        `problem` last accepted is not checked again."""
        accepted = self._accepted is not None and self._accepted[0] == content
        if not accepted and self.problem(content) is not None:
            return None
        assert self._accepted is not None
        return self._accepted[1]
