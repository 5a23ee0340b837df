"""JSON schemas checked for what Ollama can turn into a grammar, before they are sent.

Ollama constrains ``format`` with llama.cpp's json-schema-to-grammar (``common/json-schema-to-grammar.cpp``
``visit``): through CGO ``SchemaToGrammar`` before v0.30 (a failure is a 500 ``invalid JSON schema in format``,
llm/server.go ~1418), through llama-server's ``json_schema`` from v0.30 (the same converter). A schema it cannot
convert is the caller's mistake, so it gets a 400 naming the keyword and where it is, instead of a 502 after the
fact. What the converter refuses (``_errors``):

- ``pattern`` that does not start with ``^`` and end with ``$`` (~342),
- a ``$ref`` that is not local (``#/...``),
- a non-empty schema it recognises no keyword in, e.g. a property schema with only a ``description`` and no
  ``type`` (``Unrecognized schema``, ~949), or a ``type`` that is not a JSON type.
"""

from __future__ import annotations

from typing import Any

from core.errors import ServiceError

PRIMITIVES = frozenset({"boolean", "number", "integer", "object", "array", "string", "null"})
STRUCTURAL = ("properties", "items", "prefixItems", "allOf", "pattern", "format", "additionalProperties")
MAX_DEPTH = 64


def grammarProblem(schema: Any, where: str = "#", depth: int = 0) -> tuple[str, str, str] | None:
    """(location, keyword, problem) of the first part the converter refuses; None when it converts."""
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return None
    definitions = _definitionsProblem(schema, where, depth)  # visited through references
    if definitions is not None:
        return definitions
    if "$ref" in schema:
        ref = str(schema["$ref"])
        return None if ref.startswith("#/") or ref == "#" else (where, "$ref", "only local references convert")
    for key in ("oneOf", "anyOf"):
        if isinstance(schema.get(key), list):
            return _firstProblem((item, f"{where}/{key}/{i}") for i, item in enumerate(schema[key]))
    kind = schema.get("type")
    if isinstance(kind, list):
        return _firstProblem(({**schema, "type": item}, where) for item in kind)
    if "const" in schema or "enum" in schema:
        return None
    return _patternProblem(schema, where) or _childProblem(schema, where, depth) or _typeProblem(schema, where)


def _firstProblem(items: Any) -> tuple[str, str, str] | None:
    for item, where in items:
        problem = grammarProblem(item, where)
        if problem is not None:
            return problem
    return None


def _patternProblem(schema: dict[str, Any], where: str) -> tuple[str, str, str] | None:
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and schema.get("type") in (None, "string"):
        if not (pattern.startswith("^") and pattern.endswith("$")):
            return where, "pattern", f"'{pattern[:60]}' must start with ^ and end with $ (anchor it)"
    return None


def _childProblem(schema: dict[str, Any], where: str, depth: int) -> tuple[str, str, str] | None:
    children: list[tuple[Any, str]] = []
    properties = schema.get("properties")
    if isinstance(properties, dict):
        children += [(value, f"{where}/properties/{name}") for name, value in properties.items()]
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            children.append((schema[key], f"{where}/{key}"))
    for key in ("prefixItems", "allOf"):
        if isinstance(schema.get(key), list):
            children += [(item, f"{where}/{key}/{i}") for i, item in enumerate(schema[key])]
    for child, childWhere in children:
        problem = grammarProblem(child, childWhere, depth + 1)
        if problem is not None:
            return problem
    return None


def _definitionsProblem(schema: dict[str, Any], where: str, depth: int) -> tuple[str, str, str] | None:
    for key in ("$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            for name, value in schema[key].items():
                problem = grammarProblem(value, f"{where}/{key}/{name}", depth + 1)
                if problem is not None:
                    return problem
    return None


def _typeProblem(schema: dict[str, Any], where: str) -> tuple[str, str, str] | None:
    kind = schema.get("type")
    if not schema or kind == "object" or any(key in schema for key in STRUCTURAL):
        return None
    if kind is None:
        return where, "type", "a schema without `type` (and without enum, const, $ref, anyOf or properties) " \
                              "cannot be constrained; add a type"
    if kind not in PRIMITIVES:
        return where, "type", f"'{kind}' is not a JSON type"
    return None


def checkGrammar(schema: Any, versionLabel: str, param: str = "schema") -> None:
    """400 naming the keyword when Ollama (version ``versionLabel``) could not constrain output to the schema."""
    if not isinstance(schema, dict):
        return
    problem = grammarProblem(schema)
    if problem is None:
        return
    where, keyword, text = problem
    raise ServiceError(400, f"{param}: `{keyword}` at {where}: {text}. Ollama {versionLabel} turns the schema into "
                       f"a grammar (llama.cpp json-schema-to-grammar), which cannot take this.",
                       code="unsupported_schema", param=param, extra={"keyword": keyword, "location": where})
