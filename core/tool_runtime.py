"""What every tool caller shares: the tagged call format, argument validation against a tool's
JSON schema, media placeholders, and running a tool under a timeout.

The tagged format (the one the ``tool_use`` recipe teaches and the ``llm`` caller parses)::

    assistant: <tool_call>{"name": "ocr", "arguments": {"image": "image"}}</tool_call>
    tool:      <tool_result name="ocr">OPEN DAILY</tool_result>

A media argument names the sample's media by modality (``"image"``); ``"<image>"`` is accepted
too, but calls and results written into training conversations never contain a placeholder:
the collator would expand it into media slots.

It is the Hermes / Qwen convention that many chat templates with tool support also use; the
parser also accepts what other templates emit (a bare JSON object with ``parameters``, Mistral's
``[TOOL_CALLS] [...]``). Every failure becomes a result text that starts with ``error:`` and is
given to the model, never an exception out of the run (Toolformer, 2302.04761, and ReAct,
2210.03629, both let the model read the tool output and go on): that holds for replies nested
past the interpreter's recursion limit, for any exception a tool raises (``SystemExit``
included) and for tools that return huge texts, which are cut to ``max_chars`` with a
``[truncated N chars]`` note.
"""

from __future__ import annotations

import html
import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmbridge.contracts.tools import Tool
from mmbridge.contracts.tools import spec_of as spec_of  # the callers' and recipes' import
from mmbridge.contracts.types import ToolCall, placeholder
from mmbridge.errors import ToolError, did_you_mean

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.S)
_RESULT_RE = re.compile(r'<tool_result name="([^"]*)">(.*?)</tool_result>', re.S)
_MISTRAL = "[TOOL_CALLS]"
_PLACEHOLDER = re.compile(r"<(image|audio|video)>")
#: Longest result text handed to the model; longer output is cut (it would flood the context).
MAX_RESULT_CHARS = 2000
#: Longest tool name accepted from a reply (names are short identifiers; a longer one is noise).
MAX_NAME_CHARS = 100
#: Deepest nesting of call arguments accepted: deeper values would break whatever renders them
#: again (a chat template's ``tojson``, ``json.dumps``) on the interpreter's recursion limit.
MAX_ARGUMENT_DEPTH = 32


@dataclass
class ParsedCall:
    """A tool call found in model output; ``error`` is set when it could not be decoded."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# -- formatting ---------------------------------------------------------------------------------
def format_call(name: str, arguments: Mapping[str, Any]) -> str:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``."""
    body = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    return f"{CALL_OPEN}{body}{CALL_CLOSE}"


def media_ref(modality: str) -> str:
    """How a tool call names the sample's media of ``modality``: the bare name (``"image"``)."""
    return modality


def neutralise(text: str) -> str:
    """``<image>`` -> ``[image]``: tool output must not read as a media placeholder."""
    return _PLACEHOLDER.sub(r"[\1]", text)


def format_result(name: str, result: str) -> str:
    """``<tool_result name="ocr">text</tool_result>`` (the name is attribute-escaped)."""
    return f'<tool_result name="{html.escape(name, quote=True)}">{result}</tool_result>'


def parse_results(text: str) -> list[tuple[str, str]]:
    """``(name, result)`` of each ``<tool_result>`` block in ``text``."""
    return [(html.unescape(n), r) for n, r in _RESULT_RE.findall(text)]


def system_prompt(specs: Sequence[Mapping[str, Any]]) -> str:
    """The instructions for the tagged format, listing ``specs`` (one JSON object a line).

    The ``tool_use`` recipe trains with exactly this text and the ``llm`` caller prompts with it,
    so what the model learned and what it is asked match.
    """
    lines = [json.dumps(dict(s.get("function", s)), ensure_ascii=False) for s in specs]
    return (
        "You can call tools. To call one, reply with only "
        f'{CALL_OPEN}{{"name": <tool name>, "arguments": {{...}}}}{CALL_CLOSE}; the result '
        "comes back in a <tool_result> block. Name the user's media by its kind: "
        '"image" or "audio". When no tool is needed, answer directly.\n'
        "Tools:\n" + "\n".join(lines)
    )


# -- parsing ------------------------------------------------------------------------------------
def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with a ``[truncated N chars]`` note when cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]} [truncated {len(text) - limit} chars]"


def _json(payload: str) -> Any:
    """The first JSON value of ``payload``; :class:`ValueError` with a readable message if none.

    ``RecursionError`` (a reply nested deeper than the interpreter's limit, e.g. 1000 ``[``) is
    a malformed call like any other, not a crash of the run.
    """
    try:
        return json.JSONDecoder().raw_decode(payload.strip())[0]
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg} at char {exc.pos}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _decode(payload: str) -> ParsedCall:
    try:
        obj = _json(payload)
    except ValueError as exc:
        return ParsedCall(
            "?",
            error=f"the tool call is not valid JSON ({exc}); "
            f'write {CALL_OPEN}{{"name": ..., "arguments": {{...}}}}{CALL_CLOSE}',
        )
    return _call_of(obj)


def _call_of(obj: Any) -> ParsedCall:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ParsedCall("?", error='the tool call needs a JSON object with a string "name"')
    name = obj["name"]
    if len(name) > MAX_NAME_CHARS:
        return ParsedCall(
            shorten(name, 40),
            error=f"the tool name is {len(name)} characters long; "
            f"tool names are at most {MAX_NAME_CHARS}",
        )
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # OpenAI-style: the arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            return ParsedCall(name, error='"arguments" is a string that is not JSON')
    if not isinstance(args, dict):
        return ParsedCall(name, error=f'"arguments" must be an object, got {type(args).__name__}')
    if _deeper_than(args, MAX_ARGUMENT_DEPTH):
        return ParsedCall(
            name, error=f'"arguments" are nested deeper than {MAX_ARGUMENT_DEPTH} levels'
        )
    return ParsedCall(name, args)


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether lists/objects in ``value`` nest deeper than ``limit`` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, depth + 1) for c in children)
    return False


def parse_calls(text: str) -> tuple[str, list[ParsedCall]]:
    """Split model output into its plain text (before the first call) and the calls it makes.

    Accepts ``<tool_call>`` blocks (a missing closing tag at the very end is tolerated: generation
    may stop on it), ``[TOOL_CALLS] [...]`` and a reply that is one bare JSON object with a
    ``name`` and ``arguments``/``parameters``. Never raises: a call that cannot be decoded is a
    :class:`ParsedCall` with ``error`` set.
    """
    try:
        return _parse_calls(text)
    except Exception as exc:  # the contract: failures become results the model reads
        head = text.split(CALL_OPEN, 1)[0].split(_MISTRAL, 1)[0] if isinstance(text, str) else ""
        return head.strip(), [
            ParsedCall(
                "?",
                error=f"the tool call could not be read "
                f"({type(exc).__name__}: {shorten(str(exc), 200)})",
            )
        ]


def _parse_calls(text: str) -> tuple[str, list[ParsedCall]]:
    if CALL_OPEN in text:
        head = text[: text.index(CALL_OPEN)]
        return head.strip(), [_decode(m) for m in _CALL_RE.findall(text)]
    if _MISTRAL in text:
        head, _, rest = text.partition(_MISTRAL)
        try:
            items = _json(rest)
        except ValueError as exc:
            return head.strip(), [
                ParsedCall("?", error=f"[TOOL_CALLS] is not followed by a JSON list ({exc})")
            ]
        items = items if isinstance(items, list) else [items]
        return head.strip(), [_call_of(i) for i in items]
    stripped = text.strip()
    if stripped.startswith("{") and '"name"' in stripped:
        call = _decode(stripped)
        if call.error is None:
            return "", [call]
    return stripped, []


# -- validation ---------------------------------------------------------------------------------
_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}
_JSON_NAMES = {
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    dict: "object",
    list: "array",
    type(None): "null",
}


def _type_ok(value: Any, kind: str) -> bool:
    if kind not in _TYPES:
        return True  # a type this validator does not know: let the tool judge
    if isinstance(value, bool) and kind != "boolean":
        return False  # JSON true is not the number 1
    return isinstance(value, _TYPES[kind])


def _check(value: Any, schema: Mapping[str, Any], where: str, errors: list[str]) -> None:
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind else []
    if kinds and not any(_type_ok(value, k) for k in kinds):
        got = _JSON_NAMES.get(type(value), type(value).__name__)
        errors.append(f"{where} must be {' or '.join(kinds)}, got {got} {json.dumps(value)[:40]}")
        return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(
            f"{where} must be one of {json.dumps(schema['enum'])}, got {json.dumps(value)[:40]}"
        )
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where} must be >= {schema['minimum']}, got {value}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where} must be <= {schema['maximum']}, got {value}")
    if isinstance(value, str) and "maxLength" in schema and len(value) > schema["maxLength"]:
        errors.append(f"{where} is longer than {schema['maxLength']} characters")
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{where}[{i}]", errors)
    if isinstance(value, dict) and (schema.get("type") == "object" or "properties" in schema):
        props: Mapping[str, Any] = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"missing required argument '{name}'")
        extra = [k for k in value if k not in props]
        if extra and schema.get("additionalProperties", False) is False:
            errors.append(
                f"unexpected argument(s) {', '.join(repr(k) for k in extra)}; "
                f"valid: {', '.join(props) or '(none)'}"
            )
        for name, sub in props.items():
            if name in value:
                _check(value[name], sub, f"argument '{name}'", errors)


def validate_arguments(schema: Mapping[str, Any], arguments: Any) -> list[str]:
    """Problems of ``arguments`` against a JSON schema (empty list: valid).

    A small validator for the subset tool schemas use: ``type`` (object, string, number,
    integer, boolean, array, or a list of them), ``properties``, ``required``, ``enum``,
    ``minimum``/``maximum``, ``maxLength``, ``items``. Extra arguments are refused unless the
    schema sets ``additionalProperties`` (unlike JSON Schema's default: a model that invents
    arguments should be told).
    """
    errors: list[str] = []
    if not isinstance(arguments, dict):
        return [f"the arguments must be an object, got {_JSON_NAMES.get(type(arguments), '?')}"]
    _check(arguments, {"type": "object", **schema}, "arguments", errors)
    return errors


def _argument_hint(schema: Mapping[str, Any]) -> str:
    props = schema.get("properties", {})
    return "{" + ", ".join(f'"{k}": {v.get("type", "any")}' for k, v in props.items()) + "}"


def map_media(tool: Tool, arguments: dict[str, Any], media: Mapping[str, str]) -> dict[str, Any]:
    """Replace media references (``"image"``, or ``"<image>"``) by the sample's file paths.

    Only the sample's own media may be named: a tool never opens a path the model made up.

    Raises:
        ToolError: a media argument names something else, or the sample lacks that modality.
    """
    out = dict(arguments)
    for arg, modality in tool.media_args.items():
        if arg not in out:
            continue
        value, path = out[arg], media.get(modality)
        if path is None:
            have = ", ".join(media) or "none"
            raise ToolError(
                f"argument '{arg}': this conversation has no {modality} (media: {have})"
            )
        if value not in (placeholder(modality), modality, path):
            raise ToolError(
                f"argument '{arg}' must be \"{media_ref(modality)}\" (the user's "
                f"{modality}), got {json.dumps(value)[:60]}"
            )
        out[arg] = path
    return out


# -- execution ----------------------------------------------------------------------------------
def call_with_timeout(tool: Tool, arguments: Mapping[str, Any], timeout_s: float) -> str:
    """Run ``tool(**arguments)`` in a daemon thread and wait at most ``timeout_s`` seconds.

    A Python thread cannot be killed: a tool that hangs keeps its thread (a daemon, so it never
    blocks interpreter exit) while the run goes on. Tools whose hangs matter (a subprocess such
    as Tesseract) also bound themselves.

    Raises:
        TimeoutError: the tool did not return in time.
        Exception: whatever the tool raised.
    """
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = tool(**arguments)
        except BaseException as exc:  # reported to the caller's thread below (SystemExit too)
            box["error"] = exc

    worker = threading.Thread(target=work, name=f"mmbridge-tool-{tool.name}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"tool '{tool.name}' timed out after {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["result"]


def execute(
    tools: Mapping[str, Tool],
    name: str,
    arguments: Any,
    media: Mapping[str, str],
    timeout_s: float | None = None,
    max_chars: int = MAX_RESULT_CHARS,
) -> ToolCall:
    """Look up, validate and run one call; every failure becomes an ``ok=False`` result.

    Args:
        tools: The available tools by name.
        name: The requested tool.
        arguments: The requested arguments (media named by references such as "image").
        media: The sample's media, modality -> path.
        timeout_s: Limit in seconds (default: the tool's own ``timeout_s``).
        max_chars: Results (and error messages) are cut to this many characters, with a
            ``[truncated N chars]`` note.

    Returns:
        The :class:`~mmbridge.contracts.types.ToolCall` with the arguments as requested. Never
        raises (only ``KeyboardInterrupt`` passes through).
    """
    args = dict(arguments) if isinstance(arguments, dict) else {}

    def fail(message: str) -> ToolCall:
        return ToolCall(
            name=name, arguments=args, result=shorten(f"error: {message}", max_chars), ok=False
        )

    try:
        return _execute(tools, name, arguments, args, media, timeout_s, max_chars, fail)
    except (Exception, SystemExit) as exc:  # a bug in validation or in a tool's result
        return fail(
            f"tool '{shorten(str(name), 60)}' failed: {type(exc).__name__}: "
            f"{shorten(str(exc), 300)}"
        )


def _execute(
    tools: Mapping[str, Tool],
    name: str,
    arguments: Any,
    args: dict[str, Any],
    media: Mapping[str, str],
    timeout_s: float | None,
    max_chars: int,
    fail: Callable[[str], ToolCall],
) -> ToolCall:
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
        return fail(
            f"the tool name must be text of at most {MAX_NAME_CHARS} characters; "
            f"available tools: {', '.join(sorted(tools)) or '(none)'}"
        )
    tool = tools.get(name)
    if tool is None:
        return fail(
            f"unknown tool '{name}'{did_you_mean(name, tools)}; available tools: "
            f"{', '.join(sorted(tools)) or '(none)'}"
        )
    problems = validate_arguments(tool.parameters, arguments)
    if problems:
        return fail(
            f"invalid arguments for tool '{name}': {'; '.join(problems)}; expected "
            f"{_argument_hint(tool.parameters)}"
        )
    limit = tool.timeout_s if timeout_s is None else timeout_s
    try:
        result = call_with_timeout(tool, map_media(tool, args, media), limit)
    except ToolError as exc:  # written for the model to read
        return fail(str(exc))
    except TimeoutError as exc:
        return fail(str(exc))
    except (Exception, SystemExit) as exc:  # SystemExit: a library in the tool called exit()
        return fail(f"tool '{name}' failed: {type(exc).__name__}: {exc}")
    if not isinstance(result, str):
        return fail(f"tool '{name}' returned {type(result).__name__}, not text (a bug in the tool)")
    # Cut before neutralising: the placeholder substitution is linear, but on the kept part only.
    return ToolCall(
        name=name, arguments=args, result=neutralise(shorten(result, max_chars)), ok=True
    )
