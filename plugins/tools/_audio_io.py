"""Audio decoding for tools, without ffmpeg: ``load_audio(path, sr=16000) -> [T] float32``.

The decoder (``soundfile``, else the standard library's ``wave``; polyphase resampling with
scipy) lives with the audio encoders in :mod:`mmbridge.plugins.encoders._audio`; this module is
the name the tools import it by, so that the two never drift apart.
"""

from __future__ import annotations

from mmbridge.plugins.encoders._audio import SAMPLE_RATE, load_audio

__all__ = ["SAMPLE_RATE", "load_audio"]
