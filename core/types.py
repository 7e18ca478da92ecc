"""Plain data records passed between recipes, data sets, collators and tools."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The roles of a LLaVA conversation turn, mapped to chat-template roles.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system", "tool": "tool"}


def placeholder(modality: str) -> str:
    """The text placeholder of a modality: ``"image"`` -> ``"<image>"``."""
    return f"<{modality}>"


@dataclass
class Sample:
    """One training or evaluation sample, LLaVA style.

    Attributes:
        id: Unique id within its data set.
        media: Modality -> absolute path of the media file (``{"image": "/data/0001.png"}``).
        conversations: Turns ``{"from": "human"|"gpt"|"system"|"tool", "value": str}``; a human
            turn holds one ``<image>`` / ``<audio>`` placeholder per media item.
        meta: Free-form annotations: ground truth, question type, alignment level, ...
    """

    id: str
    media: dict[str, str] = field(default_factory=dict)
    conversations: list[dict[str, str]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> Sample:
        """A copy with some fields replaced (media/meta dicts are copied, not shared)."""
        data = {"id": self.id, "media": dict(self.media),
                "conversations": [dict(t) for t in self.conversations], "meta": dict(self.meta)}
        data.update(changes)
        return Sample(**data)


@dataclass
class ToolCall:
    """One call of a tool, as executed by a :class:`~mmbridge.tools.ToolCaller`."""

    name: str
    arguments: dict[str, Any]
    result: str
    ok: bool = True


@dataclass
class ToolRun:
    """The outcome of one tool-augmented answer: the final text and the calls made."""

    answer: str
    calls: list[ToolCall] = field(default_factory=list)
    prompt: str = ""
