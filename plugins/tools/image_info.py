"""``image_info``: plain facts about an image as text: size, mode and dominant colours.

Dominant colours come from median-cut palette quantisation (PIL) of a thumbnail; each palette
entry is named by the nearest colour of a small table, in the "redmean" weighted RGB distance
(a cheap approximation of perceived difference), and entries with the same name are merged.
"""

from __future__ import annotations

from typing import Any, ClassVar

from mmbridge.contracts.tools import Tool
from mmbridge.errors import ConfigError, DataError, ToolError
from mmbridge.utils.media_io import load_rgb, open_image

#: Colour name -> a typical RGB; far enough apart that the nearest name is the one people use.
NAMED_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "grey": (128, 128, 128),
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 80, 235),
    "yellow": (245, 225, 30),
    "orange": (250, 140, 20),
    "purple": (150, 50, 200),
    "pink": (250, 130, 200),
    "cyan": (30, 210, 220),
    "brown": (140, 85, 40),
    "dark blue": (20, 30, 110),
    "dark green": (20, 80, 30),
    "light grey": (200, 200, 200),
    "dark grey": (64, 64, 64),
}


def colour_name(rgb: tuple[int, int, int]) -> str:
    """The name in :data:`NAMED_COLOURS` nearest to ``rgb`` (redmean distance)."""
    r, g, b = rgb

    def distance(ref: tuple[int, int, int]) -> float:
        rm = (r + ref[0]) / 2
        dr, dg, db = r - ref[0], g - ref[1], b - ref[2]
        return (2 + rm / 256) * dr * dr + 4 * dg * dg + (2 + (255 - rm) / 256) * db * db

    return min(NAMED_COLOURS, key=lambda name: distance(NAMED_COLOURS[name]))


def dominant_colours(image: Any, k: int = 4, min_share: float = 0.05) -> list[tuple[str, float]]:
    """``(name, share of pixels)`` of the dominant colours, largest first.

    Args:
        image: A PIL image (any mode).
        k: Palette size of the quantisation.
        min_share: Colours covering less than this fraction are left out.
    """
    from PIL import Image

    thumb = image.convert("RGB")
    thumb.thumbnail((96, 96))
    quantised = thumb.quantize(colors=k, method=Image.Quantize.MEDIANCUT)
    palette = quantised.getpalette() or []
    total = thumb.width * thumb.height
    shares: dict[str, float] = {}
    for count, index in quantised.getcolors(maxcolors=256) or []:
        rgb = tuple(palette[3 * index : 3 * index + 3])
        name = colour_name(rgb)  # type: ignore[arg-type]
        shares[name] = shares.get(name, 0.0) + count / total
    ranked = sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))
    return [(n, s) for n, s in ranked if s >= min_share] or ranked[:1]


class ImageInfoTool(Tool):
    """Size, colour mode and dominant colours of an image, as one line of text.

    Args:
        n_colours: Palette size used to find the dominant colours.
        min_share: Colours covering less of the image are not listed.
        timeout_s: Seconds a call may take.
    """

    name: ClassVar[str] = "image_info"  # the registry sets it to the registered name
    description: ClassVar[str] = (
        "Describe basic facts of an image: width and height in pixels, colour mode and the "
        "dominant colours with their share of the image."
    )
    parameters: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "image": {"type": "string", "description": 'the image: "image" for the user\'s image'}
        },
        "required": ["image"],
    }
    media_args: ClassVar[dict[str, str]] = {"image": "image"}

    def __init__(
        self, n_colours: int = 4, min_share: float = 0.05, timeout_s: float = 10.0
    ) -> None:
        if not 1 <= n_colours <= 64:
            raise ConfigError(f"tools.image_info.n_colours: {n_colours} must be in 1..64")
        self.n_colours = n_colours
        self.min_share = min_share
        self.timeout_s = timeout_s

    def __call__(self, image: str, **_: Any) -> str:
        try:
            with open_image(image) as img:  # the header: size and mode, no pixels decoded
                size, mode = img.size, img.mode
            colours = dominant_colours(load_rgb(image), self.n_colours, self.min_share)
        except DataError as exc:  # missing, too large, truncated or not an image
            raise ToolError(str(exc)) from None
        listed = ", ".join(f"{name} ({share:.0%})" for name, share in colours)
        return f"size: {size[0]}x{size[1]} pixels; mode: {mode}; dominant colours: {listed}"


COMPONENTS = {"tool": {"image_info": ImageInfoTool}}
