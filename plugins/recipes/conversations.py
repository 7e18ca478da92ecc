"""``conversations``: LLaVA conversations as they are (the instruction-tuning stage)."""

from __future__ import annotations

import random

from mmbridge.contracts.recipe import DataRecipe
from mmbridge.contracts.types import ROLES, Sample, placeholder
from mmbridge.data.llava import MEDIA_KEYS
from mmbridge.errors import ConfigError


class ConversationsRecipe(DataRecipe):
    """Pass the sample's conversation through, optionally cut to its first rounds.

    Args:
        max_turns: Keep at most this many assistant answers (with the turns before each);
            ``None`` keeps everything. Placeholders of cut turns move to the first kept human
            turn, so every media item keeps its one placeholder; ``meta["qtypes"]`` is cut alike.
    """

    def __init__(self, max_turns: int | None = None) -> None:
        if max_turns is not None and (isinstance(max_turns, bool) or max_turns < 1):
            raise ConfigError(f"recipe.max_turns: {max_turns!r} must be a positive integer or null")
        self.max_turns = max_turns

    def __call__(self, sample: Sample, rng: random.Random) -> Sample | None:
        if self.max_turns is None:
            return sample
        answers, end = 0, len(sample.conversations)
        for i, turn in enumerate(sample.conversations):
            if ROLES.get(turn["from"]) == "assistant":
                answers += 1
                if answers == self.max_turns:
                    end = i + 1
                    break
        if end == len(sample.conversations):
            return sample
        kept = [dict(t) for t in sample.conversations[:end]]
        dropped = "".join(
            t["value"] for t in sample.conversations[end:] if ROLES.get(t["from"]) == "user"
        )
        moved = "".join(f"{placeholder(k)}\n" * dropped.count(placeholder(k)) for k in MEDIA_KEYS)
        if moved:
            first = next((t for t in kept if ROLES.get(t["from"]) == "user"), None)
            if first is None:
                kept.insert(0, {"from": "human", "value": moved.rstrip("\n")})
            else:
                first["value"] = moved + first["value"]
        meta = dict(sample.meta)
        if isinstance(meta.get("qtypes"), list):
            meta["qtypes"] = meta["qtypes"][: self.max_turns]
        return sample.replace(conversations=kept, meta=meta)


COMPONENTS = {"recipe": {"conversations": ConversationsRecipe}}
