"""Structured output: a caller's JSON Schema is checked (400 when it is not a valid schema), passed to Ollama as
``format``, and the model's answer is parsed and validated against it. References are resolved only inside the
schema itself: nothing is ever fetched from a URL."""

from __future__ import annotations

from typing import Any

import orjson
import referencing
from jsonschema import Draft202012Validator, ValidationError
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from core.errors import ServiceError

ANY_JSON = "json"
"""``schema: "json"`` asks for any JSON value (Ollama's ``format: "json"``), validated only for being JSON."""
REF_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")
MAX_ERROR_CHARS = 300
MAX_SCHEMA_DEPTH = 64
"""Deepest nesting of objects and arrays in a schema (a property level is two: ``properties`` and the property);
deeper schemas are a 400 before the schema checker, which recurses per level, sees them."""
MAX_SCHEMA_NODES = 10_000
"""Most objects, arrays and values in a schema."""


def _schemaError(message: str) -> ServiceError:
    return ServiceError(400, f"schema: {message}", code="invalid_schema", param="schema")


def _remoteRefs(schema: dict[str, Any]) -> list[str]:
    """Every reference in the schema that points outside it (anything not starting with '#'); 400 when the schema
    is nested deeper than MAX_SCHEMA_DEPTH or has more than MAX_SCHEMA_NODES parts (walked without recursion)."""
    found: list[str] = []
    pending: list[tuple[Any, int]] = [(schema, 1)]
    nodes = 0
    while pending:
        node, depth = pending.pop()
        nodes += 1
        if depth > MAX_SCHEMA_DEPTH:
            raise _schemaError(f"nested deeper than {MAX_SCHEMA_DEPTH} levels; flatten it (e.g. with $defs)")
        if nodes > MAX_SCHEMA_NODES:
            raise _schemaError(f"has more than {MAX_SCHEMA_NODES:,} parts; send a smaller schema")
        if isinstance(node, dict):
            for key, value in node.items():
                if key in REF_KEYWORDS and isinstance(value, str) and not value.startswith("#"):
                    found.append(value)
                else:
                    pending.append((value, depth + 1))
        elif isinstance(node, list):
            pending.extend((item, depth + 1) for item in node)
    return found


def parseSchema(raw: Any) -> dict[str, Any] | str | None:
    """The schema of a request (a JSON object, its text from a form field, or "json"), checked; None when absent."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        if raw.strip() == ANY_JSON:
            return ANY_JSON
        try:
            raw = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _schemaError(f"not valid JSON ({exc}); send a JSON Schema object or \"json\"") from None
    if not isinstance(raw, dict):
        raise _schemaError("must be a JSON Schema object (e.g. {\"type\": \"object\", \"properties\": {...}}) "
                           "or \"json\"")
    checkSchema(raw)
    return raw


def checkSchema(schema: dict[str, Any]) -> None:
    """400 unless the schema is valid for its draft (2020-12 by default) and refers only to itself."""
    remote = _remoteRefs(schema)
    if remote:
        raise _schemaError(f"reference '{remote[0][:80]}' points outside the schema; only local references "
                           "(#/$defs/...) are allowed, nothing is fetched")
    dialect = schema.get("$schema")
    if dialect is not None and not isinstance(dialect, str):
        raise _schemaError("$schema must be a string naming a draft, e.g. "
                           "\"https://json-schema.org/draft/2020-12/schema\"")
    try:
        validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(part) for part in exc.path) or "(top level)"
        raise _schemaError(f"not a valid JSON Schema at {where}: {exc.message[:MAX_ERROR_CHARS]}") from None


def _stripFences(text: str) -> str:
    """Models without a grammar sometimes wrap JSON in a Markdown code fence; take what is inside."""
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```") and len(stripped) > 6:
        return stripped[3:-3].removeprefix("json").strip()
    return stripped


def validateAnswer(text: str, schema: dict[str, Any] | str) -> tuple[Any, str | None]:
    """The parsed answer and None, or (None, a short description of what is wrong) for a repair prompt."""
    try:
        value = orjson.loads(_stripFences(text))
    except orjson.JSONDecodeError as exc:
        return None, f"the answer is not valid JSON ({exc})"
    if schema == ANY_JSON:
        return value, None
    validatorClass = validator_for(schema, default=Draft202012Validator)
    validator = validatorClass(schema, registry=referencing.Registry(),
                               format_checker=validatorClass.FORMAT_CHECKER)
    try:
        error = _firstError(validator, value)
    except RecursionError:  # an answer nested deeper than the checker can follow (a recursive $ref)
        return None, "the answer is nested too deeply"
    return (value, None) if error is None else (None, error)


def _firstError(validator: Any, value: Any) -> str | None:
    try:
        error = next(iter(sorted(validator.iter_errors(value), key=lambda e: list(e.path))), None)
    except referencing.exceptions.Unresolvable as exc:
        return f"the schema has a reference that cannot be resolved ({exc})"
    if error is None:
        return None
    return _describe(error)


def _describe(error: ValidationError) -> str:
    where = "/".join(str(part) for part in error.absolute_path) or "(top level)"
    return f"at {where}: {error.message[:MAX_ERROR_CHARS]}"


def repairPrompt(problem: str, schema: dict[str, Any] | str) -> str:
    """The follow-up message asking the model to correct its answer."""
    target = "valid JSON" if schema == ANY_JSON else "JSON that matches the given JSON Schema"
    return (f"Your answer is not {target}: {problem}. Answer again with only the corrected JSON, "
            "no explanations and no code fences.")
