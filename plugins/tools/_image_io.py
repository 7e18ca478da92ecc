"""Image decoding for tools: the size-checked opener of the image encoders.

:func:`open_image` refuses a file from its header alone when it claims more pixels than
``$MMBRIDGE_MAX_IMAGE_PIXELS`` (default 64 megapixels), before any pixel is decoded; it lives
with the image encoders in :mod:`mmbridge.plugins.encoders._image` and this module is the name
the tools import it by, so that encoders and tools apply one limit.
"""

from __future__ import annotations

from mmbridge.plugins.encoders._image import (
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_ENV,
    load_rgb,
    max_image_pixels,
    open_image,
)

__all__ = ["DEFAULT_MAX_PIXELS", "MAX_PIXELS_ENV", "load_rgb", "max_image_pixels", "open_image"]
