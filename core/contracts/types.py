"""Plain data records passed between recipes, data sets, collators and tools."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmbridge.errors import DataError

#: The roles of a LLaVA conversation turn, mapped to chat-template roles.
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}


def placeholder(modality: str) -> str:
    """The text placeholder of a modality: ``"image"`` -> ``"<image>"``."""
    return f"<{modality}>"


def check_placeholders(
    turns: Iterable[tuple[str, str]],
    media: Mapping[str, int],
    modalities: Iterable[str],
    where: str,
) -> None:
    """The one placeholder rule: each media item has exactly one placeholder, in a user turn.

    Every reader of samples (the LLaVA reader, the run's media check, the chat encoder) calls
    this function, so a broken sample gets the same message wherever it is caught.

    Args:
        turns: ``(chat role, text)`` per turn (roles as in :data:`ROLES`' values, or LLaVA's).
        media: Modality -> number of media items of that modality in the sample.
        modalities: Placeholders to count besides the media's own (e.g. the model's
            modalities, so that an ``<audio>`` without an audio file is caught).
        where: Prefix of the message (file and record, or sample id).

    Raises:
        DataError: naming ``where``, the placeholder, the counts and the rule.
    """
    keys = dict.fromkeys([*media, *modalities])
    user = dict.fromkeys(keys, 0)
    other = dict.fromkeys(keys, 0)
    for role, text in turns:
        is_user = ROLES.get(role, role) == "user"
        for key in keys:
            n = text.count(placeholder(key))
            if is_user:
                user[key] += n
            else:
                other[key] += n
    for key in keys:
        expected = int(media.get(key, 0))
        if user[key] != expected or other[key]:
            ph = placeholder(key)
            elsewhere = f" and {other[key]} in other turns" if other[key] else ""
            raise DataError(
                f"{where}: {user[key]} {ph} placeholder(s) in user turns{elsewhere} for "
                f"{expected} {key} item(s); each {key} item needs exactly one {ph}, "
                f"in a user turn"
            )


def media_paths(value: str | Sequence[str]) -> list[str]:
    """The files of one :attr:`Sample.media` value, in placeholder order (one path or a list)."""
    return [value] if isinstance(value, str) else list(value)


@dataclass
class Sample:
    """One training or evaluation sample, LLaVA style.

    Attributes:
        id: Unique id within its data set.
        media: Modality -> absolute path of the media file (``{"image": "/data/0001.png"}``), or
            the list of paths of a multi-image record (``{"image": ["/d/a.png", "/d/b.png"]}``:
            the k-th path fills the k-th ``<image>`` placeholder). One file stays a plain string.
        conversations: Turns ``{"from": "human"|"gpt"|"system"|"tool", "value": str}``; a human
            turn holds one ``<image>`` / ``<audio>`` placeholder per media item.
        meta: Free-form annotations: ground truth, question type, alignment level, ...
    """

    id: str
    # Mapping (covariant): a plain ``dict[str, str]`` is a valid value
    media: Mapping[str, str | list[str]] = field(default_factory=dict)
    conversations: list[dict[str, str]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def paths(self, modality: str) -> list[str]:
        """The files of ``modality`` in placeholder order (``[]`` when the sample has none)."""
        value = self.media.get(modality)
        return [] if value is None else media_paths(value)

    def media_counts(self) -> dict[str, int]:
        """Modality -> number of media items (what :func:`check_placeholders` expects)."""
        return {m: len(media_paths(v)) for m, v in self.media.items()}

    def single_media(self) -> dict[str, str]:
        """Modality -> its one file, for consumers that take one file per modality (tools,
        scorers).

        Raises:
            DataError: the sample has several files of a modality.
        """
        out = {}
        for m, v in self.media.items():
            paths = media_paths(v)
            if len(paths) != 1:
                raise DataError(
                    f"sample {self.id}: {len(paths)} {m} files where one {m} file is "
                    f"read (tools and scorers take one file per modality)"
                )
            out[m] = paths[0]
        return out

    def caption(self) -> str | None:
        """The sample's caption: ``meta["caption"]`` if set, else its first assistant turn,
        else ``None`` (what captioning recipes train on and scorers score)."""
        text = self.meta.get("caption")
        if isinstance(text, str) and text.strip():
            return text.strip()
        for turn in self.conversations:
            if ROLES.get(turn.get("from", "")) == "assistant" and turn.get("value", "").strip():
                return turn["value"].strip()
        return None

    def replace(self, **changes: Any) -> Sample:
        """A copy with some fields replaced (media/meta dicts are copied, not shared)."""
        media = {m: v if isinstance(v, str) else list(v) for m, v in self.media.items()}
        data: dict[str, Any] = {
            "id": self.id,
            "media": media,
            "conversations": [dict(t) for t in self.conversations],
            "meta": dict(self.meta),
        }
        data.update(changes)
        return Sample(**data)


@dataclass
class ToolCall:
    """One call of a tool, as executed by a :class:`~mmbridge.contracts.tools.ToolCaller`."""

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
