"""``caption_pretrain``: the alignment (pre-training) stage of the Data-Driven family
(2311.07594 §3.4): each media-caption pair becomes a one-turn conversation, the instruction
drawn per sample from several templates per modality (LLaVA's brief-description prompts,
2304.08485, §4.2), the caption the answer.

Compared with ``caption``: templates per modality (a mapping), the caption read from any meta
key, and ``meta["task"] = "caption"`` recorded for mixes and reports.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from mmbridge.contracts.recipe import DataRecipe
from mmbridge.contracts.types import ROLES, Sample, media_paths, placeholder
from mmbridge.data.llava import MEDIA_KEYS
from mmbridge.errors import ConfigError
from mmbridge.plugins.recipes.caption import INSTRUCTIONS


def check_templates(value: Any, key: str) -> list[str]:
    """A non-empty list of non-empty strings without media placeholders (errors name ``key``)."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ConfigError(f"{key}: expected a non-empty list of strings, got {value!r}")
    out = [str(v).strip() for v in value]
    if not all(out):
        raise ConfigError(f"{key}: empty template in {value!r}")
    if any(placeholder(m) in t for t in out for m in MEDIA_KEYS):
        raise ConfigError(f"{key}: leave out the media placeholders; the recipe puts them in front")
    return out


def caption_text(sample: Sample, caption_key: str) -> str | None:
    """``meta[caption_key]`` when set, else the sample's first answer, else ``None``."""
    text = sample.meta.get(caption_key)
    if isinstance(text, str) and text.strip():
        return text.strip()
    for turn in sample.conversations:
        if ROLES.get(turn.get("from", "")) == "assistant" and turn.get("value", "").strip():
            return turn["value"].strip()
    return None


def media_prefix(sample: Sample) -> str:
    """One placeholder line per media item of the sample (two images: two ``<image>`` lines),
    modalities in a fixed order."""
    return "".join(
        f"{placeholder(k)}\n" * len(media_paths(sample.media[k]))
        for k in MEDIA_KEYS
        if k in sample.media
    )


class CaptionPretrainRecipe(DataRecipe):
    """``<media>\\n<instruction>`` -> caption, the instruction drawn with the sample's ``rng``.

    Samples without media or caption are left as they are (the stage then trains on their own
    conversation).

    Args:
        instructions: The templates: a list (every modality) or a mapping modality -> list;
            ``null``: about ten brief-description prompts per modality.
        caption_key: The ``Sample.meta`` key holding the caption (else the first answer).
    """

    def __init__(
        self,
        instructions: list[str] | Mapping[str, list[str]] | None = None,
        caption_key: str = "caption",
    ) -> None:
        self.instructions: dict[str, list[str]] = {m: list(v) for m, v in INSTRUCTIONS.items()}
        if isinstance(instructions, Mapping):
            for m, v in instructions.items():
                if m not in MEDIA_KEYS:
                    raise ConfigError(
                        f"recipe.instructions.{m}: not a modality; valid: {', '.join(MEDIA_KEYS)}"
                    )
                self.instructions[m] = check_templates(v, f"recipe.instructions.{m}")
        elif instructions is not None:
            common = check_templates(instructions, "recipe.instructions")
            self.instructions = {m: common for m in MEDIA_KEYS}
        self.caption_key = caption_key

    def caption_sample(self, sample: Sample, rng: random.Random) -> Sample | None:
        """The one-turn caption conversation of ``sample`` (``None`` without media/caption)."""
        modalities = [k for k in MEDIA_KEYS if k in sample.media]
        text = caption_text(sample, self.caption_key)
        if not modalities or text is None:
            return None
        instruction = rng.choice(self.instructions[modalities[0]])
        turns = [
            {"from": "human", "value": media_prefix(sample) + instruction},
            {"from": "gpt", "value": text},
        ]
        return sample.replace(
            conversations=turns, meta={**sample.meta, "qtypes": ["caption"], "task": "caption"}
        )

    def __call__(self, sample: Sample, rng: random.Random) -> Sample | None:
        return self.caption_sample(sample, rng)


COMPONENTS = {"recipe": {"caption_pretrain": CaptionPretrainRecipe}}
