"""The two tool callers of the Tool Learning family (2311.07594 §3.3).

``pipeline``: tools turn the media into text before the LLM runs, and the text goes into the
prompt (Visual ChatGPT / MM-REACT style expert pipelines, 2303.04671, 2303.11381).
``llm``: the LLM decides which tool to call while it answers, reads the result and goes on
(Toolformer 2302.04761, ReAct 2210.03629).

Both receive ``generate(messages) -> str``. The ``llm`` caller in template format calls
``generate(messages, tools=[spec, ...])`` so that the generate function can pass the specs to
``tokenizer.apply_chat_template(messages, tools=...)``; it reads ``generate.tokenizer`` (when
set) to pick the format and the role of tool results.
"""

from __future__ import annotations

import inspect
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from mmbridge.contracts.tools import GenerateFn, Tool, ToolCaller
from mmbridge.contracts.types import ToolCall, ToolRun
from mmbridge.errors import ConfigError
from mmbridge.tool_runtime import (
    CALL_CLOSE,
    MAX_RESULT_CHARS,
    ParsedCall,
    execute,
    format_result,
    media_ref,
    parse_calls,
    spec_of,
    system_prompt,
)

_LEADING_MEDIA = re.compile(r"^(?:\s*<(?:image|audio|video)>)+\s*")


def _named(tools: Mapping[str, Tool] | Sequence[Tool]) -> Mapping[str, Tool] | Sequence[Tool]:
    """Refuse nameless or same-named tools (a list is keyed by ``tool.name``)."""
    if isinstance(tools, Mapping):
        return tools
    names = [t.name for t in tools]
    if not all(names) or len(set(names)) != len(names):
        raise ConfigError(
            f"tool_caller.tools: every tool needs its own name, got {names} "
            f"(a tool class gets its name when registered)"
        )
    return tools


def _check_template(template: str, key: str) -> str:
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if "result" not in fields or fields - {"result", "tool"}:
        raise ConfigError(
            f"{key}: {template!r} must contain {{result}} and may contain {{tool}}; "
            f"found fields: {', '.join(sorted(fields)) or 'none'}"
        )
    return template


class PipelineToolCaller(ToolCaller):
    """Runs every tool that applies to the sample's media, puts the results into the user
    prompt, then calls ``generate`` once.

    A tool applies when all its required arguments are media arguments and the sample has those
    modalities (OCR for an image, ASR for audio; never the calculator). A failed tool is recorded
    in the run but leaves no text in the prompt.

    Args:
        tools: The tools, by name (injected by the assembly).
        template: How a result enters the prompt (``{result}``, optional ``{tool}``); a mapping
            gives one template per tool name, ``default`` for the others.
        timeout_s: Limit per tool call (default: each tool's own ``timeout_s``).
    """

    mode: ClassVar[str] = "pipeline"

    def __init__(
        self,
        tools: Mapping[str, Tool] | Sequence[Tool],
        template: str | Mapping[str, str] = "Output of {tool}: {result}\n",
        timeout_s: float | None = None,
    ) -> None:
        super().__init__(_named(tools))
        if isinstance(template, str):
            template = {"default": template}
        self.templates = {
            k: _check_template(str(v), f"tool_caller.template.{k}")
            for k, v in dict(template).items()
        }
        self.templates.setdefault("default", "Output of {tool}: {result}\n")
        self.timeout_s = timeout_s

    def applies(self, tool: Tool, media: Mapping[str, str]) -> bool:
        """Whether ``tool`` can run on ``media`` alone."""
        required = set(tool.parameters.get("required", []))
        return (
            bool(tool.media_args)
            and required <= set(tool.media_args)
            and all(m in media for m in tool.media_args.values())
        )

    def run(self, question: str, media: Mapping[str, str], generate: GenerateFn) -> ToolRun:
        calls: list[ToolCall] = []
        inserted = []
        for name, tool in self.tools.items():
            if not self.applies(tool, media):
                continue
            args = {arg: media_ref(m) for arg, m in tool.media_args.items()}
            call = execute(self.tools, name, args, media, self.timeout_s)
            calls.append(call)
            if call.ok:
                template = self.templates.get(name, self.templates["default"])
                inserted.append(template.format(tool=name, result=call.result))
        # The results go after the media placeholders that open the prompt, before the question.
        head = _LEADING_MEDIA.match(question)
        cut = head.end() if head else 0
        lead = question[:cut].rstrip() + "\n" if cut else ""
        prompt = lead + "".join(inserted) + question[cut:]
        answer = generate([{"role": "user", "content": prompt}])
        return ToolRun(answer=answer.strip(), calls=calls, prompt=prompt)


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a ``tools`` list (function calling)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = " ".join(str(t) for t in template.values())
    return isinstance(template, str) and "tools" in template


def template_has_tool_role(tokenizer: Any) -> bool:
    """Whether the chat template renders a ``tool`` message (some refuse unknown roles)."""
    marker = "mmbridge-tool-role-probe"
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "tool", "content": marker},
    ]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # jinja raises whatever the template's raise_exception says
        return False
    return marker in str(text)


def _accepts_tools(generate: GenerateFn) -> bool:
    try:
        params = inspect.signature(generate).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "tools" or p.kind is p.VAR_KEYWORD for p in params)


class LLMToolCaller(ToolCaller):
    """The model calls tools while it answers: generate, run the calls it makes, give it the
    results, generate again, until it answers without a call.

    Every failure (unknown tool, bad arguments, a tool that raises or hangs, too many calls) is
    given to the model as an ``error: ...`` result and recorded as ``ok=False``; the run itself
    never raises for them.

    Args:
        tools: The tools, by name (injected by the assembly).
        max_calls: Calls executed per answer; further calls get an error telling the model to
            answer, and after one more round its text is taken as the answer.
        call_format: ``tagged`` (``<tool_call>`` JSON, the tools listed in a system prompt),
            ``template`` (the tokenizer's chat template lists the tools: ``generate`` gets
            ``tools=``) or ``auto`` (``template`` when ``generate.tokenizer``'s template
            supports tools and ``generate`` takes ``tools``).
        result_role: Role of the message carrying a result in the tagged format: ``tool``,
            ``user``, or ``auto`` (``user`` when ``generate.tokenizer``'s template has no tool
            role).
        timeout_s: Limit per tool call (default: each tool's own ``timeout_s``).
        max_result_chars: Longer results (and error texts) are cut, with a ``[truncated N chars]``
            note.
    """

    mode: ClassVar[str] = "llm"
    FORMATS: ClassVar[tuple[str, ...]] = ("auto", "tagged", "template")
    ROLES: ClassVar[tuple[str, ...]] = ("auto", "tool", "user")

    def __init__(
        self,
        tools: Mapping[str, Tool] | Sequence[Tool],
        max_calls: int = 3,
        call_format: str = "auto",
        result_role: str = "auto",
        timeout_s: float | None = None,
        max_result_chars: int = MAX_RESULT_CHARS,
    ) -> None:
        super().__init__(_named(tools))
        if max_calls < 0:
            raise ConfigError(f"tool_caller.max_calls: {max_calls} must be >= 0")
        for key, value, valid in (
            ("call_format", call_format, self.FORMATS),
            ("result_role", result_role, self.ROLES),
        ):
            if value not in valid:
                raise ConfigError(
                    f"tool_caller.{key}: unknown value '{value}'; valid: {', '.join(valid)}"
                )
        self.max_calls = max_calls
        self.call_format = call_format
        self.result_role = result_role
        self.timeout_s = timeout_s
        self.max_result_chars = max_result_chars

    def resolve(self, generate: GenerateFn) -> tuple[str, str]:
        """``(call format, result role)`` used with this ``generate``."""
        tokenizer = getattr(generate, "tokenizer", None)
        fmt = self.call_format
        if fmt == "auto":
            fmt = (
                "template"
                if tokenizer is not None
                and template_supports_tools(tokenizer)
                and _accepts_tools(generate)
                else "tagged"
            )
        role = self.result_role
        if role == "auto":
            role = (
                "user"
                if tokenizer is not None and not template_has_tool_role(tokenizer)
                else "tool"
            )
        return fmt, "tool" if fmt == "template" else role

    def run(self, question: str, media: Mapping[str, str], generate: GenerateFn) -> ToolRun:
        fmt, role = self.resolve(generate)
        specs = [spec_of(t) for t in self.tools.values()]
        messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
        if fmt == "tagged":
            messages.insert(0, {"role": "system", "content": system_prompt(specs)})
        calls: list[ToolCall] = []
        for step in range(self.max_calls + 2):
            reply = generate(messages, tools=specs) if fmt == "template" else generate(messages)
            text, parsed = parse_calls(reply)
            if not parsed:
                return ToolRun(answer=reply.strip(), calls=calls, prompt=question)
            if step == self.max_calls + 1:  # told to answer and still calling: keep its text
                return ToolRun(answer=text, calls=calls, prompt=question)
            messages.append(self._assistant_message(reply, text, parsed, fmt))
            for p in parsed:
                call = self._call(p, len(calls), media)
                calls.append(call)
                messages.append(
                    {"role": "tool", "name": call.name, "content": call.result}
                    if fmt == "template"
                    else {"role": role, "content": format_result(call.name, call.result)}
                )
        raise AssertionError("unreachable: the loop returns on its last step")

    def _call(self, parsed: ParsedCall, made: int, media: Mapping[str, str]) -> ToolCall:
        if made >= self.max_calls:
            return ToolCall(
                parsed.name,
                parsed.arguments,
                ok=False,
                result=(
                    f"error: the limit of {self.max_calls} tool calls is reached; answer the "
                    f"question now, without calling a tool"
                ),
            )
        if parsed.error is not None:
            return ToolCall(parsed.name, parsed.arguments, f"error: {parsed.error}", ok=False)
        return execute(
            self.tools, parsed.name, parsed.arguments, media, self.timeout_s, self.max_result_chars
        )

    @staticmethod
    def _assistant_message(
        reply: str, text: str, parsed: list[ParsedCall], fmt: str
    ) -> dict[str, Any]:
        if fmt != "template":
            # Whatever follows the last call (a made-up result, say) is not what was run.
            end = reply.rfind(CALL_CLOSE)
            return {
                "role": "assistant",
                "content": (reply[: end + len(CALL_CLOSE)] if end >= 0 else reply).strip(),
            }
        tool_calls = [
            {"type": "function", "function": {"name": p.name, "arguments": p.arguments}}
            for p in parsed
            if p.error is None
        ]
        if not tool_calls:
            return {"role": "assistant", "content": reply.strip()}
        return {"role": "assistant", "content": text, "tool_calls": tool_calls}


COMPONENTS = {"tool_caller": {"pipeline": PipelineToolCaller, "llm": LLMToolCaller}}
