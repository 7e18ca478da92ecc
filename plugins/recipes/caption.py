"""``caption``: image (or audio) + caption -> one instruction turn answered by the caption.

The alignment (pre-training) stage of LLaVA (Liu et al., 2304.08485, §4.2) turns each
image-caption pair into a single-turn conversation whose instruction is drawn from a small set of
varied "describe the image" prompts, so the connector learns to ground, not one fixed prompt.
"""

from __future__ import annotations

import random

from mmbridge.contracts.recipe import DataRecipe
from mmbridge.contracts.types import Sample, placeholder
from mmbridge.data.llava import MEDIA_KEYS
from mmbridge.errors import ConfigError

#: Default instructions per modality (a sample's first media key picks the list).
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "image": (
        "Describe the image briefly.",
        "Give a short description of the image.",
        "What is in this picture?",
        "Write a brief caption for the image.",
        "Summarise what you see in the image.",
        "Describe the picture in one sentence.",
        "What does the image show?",
        "Provide a concise caption of this image.",
        "Tell me briefly what is shown here.",
        "Caption this image.",
    ),
    "audio": (
        "Describe the audio briefly.",
        "What can be heard in this recording?",
        "Write a short caption for the audio.",
        "Summarise the sound clip in one sentence.",
        "What does this audio contain?",
        "Transcribe or describe the audio.",
    ),
    "video": (
        "Describe the video briefly.",
        "What happens in this video?",
        "Write a short caption for the video.",
    ),
}


class CaptionRecipe(DataRecipe):
    """One turn ``<image>\\n<instruction>`` -> caption, the instruction drawn with ``rng``.

    Samples without media or without a caption are dropped (``None``).

    Args:
        instructions: The instructions to draw from, for every modality (default: about ten
            per modality, see :data:`INSTRUCTIONS`).
    """

    def __init__(self, instructions: list[str] | None = None) -> None:
        if instructions is not None:
            instructions = [str(i).strip() for i in instructions]
            if not instructions or not all(instructions):
                raise ConfigError(
                    "recipe.instructions: expected a non-empty list of non-empty "
                    f"strings, got {instructions!r}"
                )
            if any(placeholder(k) in i for i in instructions for k in MEDIA_KEYS):
                raise ConfigError(
                    "recipe.instructions: leave out the media placeholders; the "
                    "recipe puts them before the instruction"
                )
        self.instructions = instructions

    def __call__(self, sample: Sample, rng: random.Random) -> Sample | None:
        modalities = [k for k in MEDIA_KEYS if k in sample.media]
        text = sample.caption()
        if not modalities or text is None:
            return None
        options = self.instructions or INSTRUCTIONS.get(modalities[0], INSTRUCTIONS["image"])
        instruction = rng.choice(list(options))
        prompt = "".join(f"{placeholder(k)}\n" for k in modalities) + instruction
        turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": text}]
        return sample.replace(conversations=turns, meta={**sample.meta, "qtypes": ["caption"]})


COMPONENTS = {"recipe": {"caption": CaptionRecipe}}
