"""Contracts of the Tool Learning family: tools and the callers that run them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from mmbridge.contracts.types import ToolRun


class Tool(ABC):
    """An external tool that turns media or text into text (OCR, ASR, a calculator, ...).

    Class attributes describe it to the LLM the way function-calling APIs do: ``name`` (a built
    instance carries its registered name, see ``Entry.create``), ``description`` and
    ``parameters`` (a JSON schema of the arguments). ``media_args`` maps an argument name to a
    modality, so a caller can fill that argument with the sample's media path.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    parameters: ClassVar[dict[str, Any]] = {"type": "object", "properties": {}, "required": []}
    media_args: ClassVar[dict[str, str]] = {}
    #: Seconds a call may take before the caller gives the model a timeout error instead.
    timeout_s: float = 30.0

    @abstractmethod
    def __call__(self, **arguments: Any) -> str:
        """Run the tool; return its result as text. Raise to signal a failure."""

    def spec(self) -> dict[str, Any]:
        """The function-calling description of this tool (OpenAI / HF chat-template style):
        :func:`spec_of` this instance."""
        return spec_of(self)


def spec_of(tool: Tool | type[Tool], name: str | None = None) -> dict[str, Any]:
    """The function-calling spec of a tool instance or class (class attributes only).

    ``name``: the name the tool is registered as (a class knows it only if it sets ``name``
    itself; an instance made by the registry carries it). Default: ``tool.name``.
    """
    return {
        "type": "function",
        "function": {
            "name": name if name is not None else tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        },
    }


#: ``generate(messages) -> assistant text``: how a caller asks the LLM for a reply.
GenerateFn = Callable[[list[dict[str, str]]], str]


class ToolCaller(ABC):
    """Runs tools around generation.

    ``mode`` is ``"pipeline"`` (tools run on the media before the LLM, their results go into
    the prompt) or ``"llm"`` (the LLM asks for tools while it generates).

    Args:
        tools: The tool instances this caller may use, keyed by name.
    """

    mode: ClassVar[str] = ""

    def __init__(self, tools: Mapping[str, Tool] | Sequence[Tool]) -> None:
        if not isinstance(tools, Mapping):
            tools = {t.name: t for t in tools}
        self.tools = dict(tools)

    @abstractmethod
    def run(self, question: str, media: Mapping[str, str], generate: GenerateFn) -> ToolRun:
        """Answer ``question`` about ``media`` (modality -> path) using the tools and
        ``generate``."""
