"""Media as callers hold them -> files the model's encoders read.

The Python API (:mod:`mmbridge.api`) and the server (:mod:`mmbridge.serving`) accept media as a
file path, a ``PIL.Image``, a numpy array, raw encoded bytes, a ``data:`` URL, or (audio) an
array with its sampling rate; chat messages may hold OpenAI / Hugging Face content parts.
Everything that is not already a file is written losslessly (PNG, float WAV) into a temporary
directory, so an object gives exactly the answer its file would: the encoders keep one loading
path. No URL is ever fetched from the network.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import tempfile
import wave
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmbridge.contracts.types import placeholder
from mmbridge.errors import ConfigError
from mmbridge.utils.media_io import check_image_size, image_limit, pil_guard_error

_DATA_URL = re.compile(
    r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?),(?P<data>.*)", re.S
)


class MediaError(ConfigError):
    """A media item that cannot be used: malformed, of a kind the model lacks, or not allowed."""


class MediaTooLarge(MediaError):
    """An image over ``MMBRIDGE_MAX_IMAGE_PIXELS`` (the server answers 413); the check and its
    message are :func:`mmbridge.utils.media_io.check_image_size`, as for a run's files."""


def decode_data_url(url: str) -> tuple[str, bytes]:
    """``data:[mime][;base64],payload`` -> ``(mime, bytes)``."""
    match = _DATA_URL.fullmatch(url.strip())
    if match is None:
        raise MediaError(f"malformed data: URL '{url[:40]}...': expected data:<mime>;base64,<data>")
    mime = match["mime"] or "text/plain"
    data = match["data"]
    if ";base64" in (match["params"] or ""):
        try:
            return mime, base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(
                f"data: URL ({mime}): the base64 payload does not decode: {exc}"
            ) from None
    return mime, data.encode()


def _image_bytes(raw: bytes, what: str) -> tuple[bytes, str]:
    """Check encoded image bytes (header size first, then a full decode); -> (bytes, suffix)."""
    limit = image_limit()
    try:
        with Image.open(io.BytesIO(raw)) as img:
            # from the header, before any pixel is decoded
            check_image_size(*img.size, what, limit, error=MediaTooLarge)
            fmt = (img.format or "png").lower()
            img.load()
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own guard (past twice its limit)
        raise pil_guard_error(exc, what, limit, error=MediaTooLarge) from None
    except (UnidentifiedImageError, OSError, ValueError, EOFError, SyntaxError) as exc:
        raise MediaError(f"{what}: not a readable image ({type(exc).__name__}: {exc})") from None
    return raw, {"jpeg": ".jpg"}.get(fmt, f".{fmt}")


def _array_image(arr: np.ndarray, what: str) -> Image.Image:
    """``[H, W]``, ``[H, W, 3|4]`` uint8, or float in [0, 1] -> a PIL image."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels first (a tensor's layout)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise MediaError(
            f"{what}: an image array must be [H, W], [H, W, 3] or [H, W, 4], "
            f"got shape {list(np.asarray(arr).shape)}"
        )
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating):
            raise MediaError(
                f"{what}: an image array must be uint8 (0..255) or float (0..1), got {a.dtype}"
            )
        a = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(a)


def write_float_wav(path: Path, audio: np.ndarray, sr: int) -> Path:
    """Mono float32 ``audio`` as an IEEE-float WAV (lossless), read back bit-exactly."""
    data = np.asarray(audio, dtype="<f4").reshape(-1)
    try:
        import soundfile  # libsndfile writes and reads float WAV
    except ImportError:  # the encoders' reader then reads 16-bit PCM only
        pcm = np.round(np.clip(data, -1.0, 1.0) * 32767.0).astype("<i2")
        with wave.open(str(path), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(int(sr))
            f.writeframes(pcm.tobytes())
        return path
    soundfile.write(str(path), data, int(sr), subtype="FLOAT")
    return path


class MediaFiles:
    """A temporary directory that turns media objects into files (a context manager).

    Args:
        allow_local_files: Whether a plain path (or a ``file://`` URL) may name a local file.
            The API allows it; the server only when started with ``allow_local_files=true``.
    """

    def __init__(self, allow_local_files: bool = True) -> None:
        self.allow_local_files = allow_local_files
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._n = 0

    def __enter__(self) -> MediaFiles:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def _new(self, suffix: str) -> Path:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="mmbridge-media-")
        self._n += 1
        return Path(self._dir.name) / f"item{self._n}{suffix}"

    def _local(self, value: str | Path, what: str) -> str:
        text = str(value)
        if text.startswith(("http://", "https://")):
            raise MediaError(
                f"{what}: '{text[:60]}': URLs are never fetched; send the media "
                f"inline as a data: URL (base64)"
            )
        if not self.allow_local_files:
            raise MediaError(
                f"{what}: local file paths are not allowed here; send a data: URL "
                f"(the server allows paths with allow_local_files=true)"
            )
        path = Path(text.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise MediaError(f"{what}: {text}: no such file")
        return str(path.resolve())

    def image(self, value: Any, what: str = "image") -> str:
        """A file path for an image given as a path, ``data:`` URL, PIL image, array or bytes."""
        if isinstance(value, str) and value.startswith("data:"):
            mime, raw = decode_data_url(value)
            if not mime.startswith("image/"):
                raise MediaError(f"{what}: a data: URL of type {mime}, not an image")
            value = raw
        if isinstance(value, bytes | bytearray | memoryview):
            raw, suffix = _image_bytes(bytes(value), what)
            path = self._new(suffix)
            path.write_bytes(raw)
            return str(path)
        if isinstance(value, str | Path):
            path_s = self._local(value, what)
            _image_bytes(Path(path_s).read_bytes(), f"{what} {path_s}")
            return path_s
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, np.ndarray) or hasattr(value, "__array__"):
            img = _array_image(np.asarray(value), what)
        else:
            raise MediaError(
                f"{what}: {type(value).__name__} is not an image; give a path, a "
                f"data: URL, a PIL.Image, a numpy array or encoded bytes"
            )
        check_image_size(*img.size, what, error=MediaTooLarge)
        if img.mode not in ("RGB", "RGBA", "L", "LA", "P", "I;16", "1"):
            img = img.convert("RGB")
        path = self._new(".png")
        img.save(path, format="PNG")  # lossless: the same pixels as the object
        return str(path)

    def audio(self, value: Any, what: str = "audio") -> str:
        """A file path for audio given as a path, ``data:`` URL, encoded bytes, ``(array, sr)``
        or ``{"array", "sampling_rate"}`` (a datasets ``Audio`` row)."""
        if isinstance(value, str) and value.startswith("data:"):
            mime, raw = decode_data_url(value)
            if not mime.startswith("audio/"):
                raise MediaError(f"{what}: a data: URL of type {mime}, not audio")
            value = raw
        if isinstance(value, bytes | bytearray | memoryview):
            path = self._new(".wav" if bytes(value[:4]) == b"RIFF" else ".audio")
            path.write_bytes(bytes(value))
            return str(path)
        if isinstance(value, str | Path):
            return self._local(value, what)
        if isinstance(value, Mapping) and "array" in value:
            value = (value["array"], value.get("sampling_rate"))
        if isinstance(value, tuple) and len(value) == 2:
            arr, sr = value
            if not isinstance(sr, int | np.integer) or sr <= 0:
                raise MediaError(
                    f"{what}: the sampling rate must be a positive integer, got {sr!r}"
                )
            a = np.asarray(arr, dtype=np.float32)
            if a.ndim == 2:  # [T, channels] -> mono, as the decoder does
                a = a.mean(axis=1)
            if a.ndim != 1 or a.size == 0:
                raise MediaError(
                    f"{what}: audio must be a non-empty [T] or [T, C] array, got "
                    f"shape {list(np.asarray(arr).shape)}"
                )
            return str(write_float_wav(self._new(".wav"), a, int(sr)))
        raise MediaError(
            f"{what}: {type(value).__name__} is not audio; give a path, a data: URL, "
            f"encoded bytes, or (array, sampling_rate)"
        )

    def media(self, modality: str, value: Any, what: str | None = None) -> str:
        """A file path for one media item of ``modality``."""
        what = what or modality
        if modality == "image":
            return self.image(value, what)
        if modality == "audio":
            return self.audio(value, what)
        if isinstance(value, str | Path):
            return self._local(value, what)
        raise MediaError(f"{what}: give {modality} as a file path")

    # -- content parts --------------------------------------------------------------------------
    def part(self, part: Mapping[str, Any], what: str) -> tuple[str | None, str]:
        """One OpenAI / Hugging Face content part -> ``(modality, path)``, or ``(None, text)``."""
        kind = part.get("type")
        if kind in ("text", "input_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise MediaError(f"{what}: a text part needs a string 'text'")
            return None, text
        if kind in ("image_url", "input_image"):
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, Mapping) else ref
            if not isinstance(url, str):
                raise MediaError(f"{what}: an image_url part needs image_url.url (a data: URL)")
            return "image", self.image(url, what)
        if kind == "input_audio":
            ref = part.get("input_audio")
            if not isinstance(ref, Mapping) or not isinstance(ref.get("data"), str):
                raise MediaError(f"{what}: an input_audio part needs input_audio.data (base64)")
            try:
                raw = base64.b64decode(ref["data"], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise MediaError(f"{what}: input_audio.data is not base64: {exc}") from None
            return "audio", self.audio(raw, what)
        if kind in ("image", "audio", "video"):  # Hugging Face: the object, a path or a url
            for key in (kind, "url", "path", "base64"):
                if part.get(key) is not None:
                    value = part[key]
                    if key == "base64":
                        value = f"data:{kind}/*;base64,{value}"
                    return kind, self.media(kind, value, what)
            raise MediaError(
                f"{what}: a '{kind}' part carries no {kind} (give '{kind}', 'url' "
                f"or 'path'); a bare {{'type': '{kind}'}} is a template marker only"
            )
        raise MediaError(
            f"{what}: unknown content part type {kind!r}; known: text, image_url, "
            f"input_audio, image, audio"
        )

    def content(self, content: Any, what: str) -> tuple[str, dict[str, list[str]]]:
        """A message's content (a string, or a list of parts) -> text with a placeholder where
        each media part stands (parts joined by newlines) and the media files in order."""
        if isinstance(content, str):
            return content, {}
        if not isinstance(content, Sequence) or isinstance(content, bytes):
            raise MediaError(f"{what}: content must be a string or a list of content parts")
        pieces: list[str] = []
        media: dict[str, list[str]] = {}
        for k, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise MediaError(f"{what}.content[{k}]: a content part must be an object")
            modality, value = self.part(part, f"{what}.content[{k}]")
            if modality is None:
                pieces.append(value)
            else:
                pieces.append(placeholder(modality))
                media.setdefault(modality, []).append(value)
        return "\n".join(pieces), media
