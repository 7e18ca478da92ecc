"""Reading media files, shared by the encoders, the data sets and the tools (one decoder and
one size limit for all of them).

Images: :func:`open_image` refuses a file from its header alone when it claims more pixels than
``$MMBRIDGE_MAX_IMAGE_PIXELS`` (default 64 megapixels), before any pixel is decoded;
:func:`load_rgb` decodes it as RGB. :func:`check_image_size` is that limit's one check, also
applied to the media a caller hands over (:mod:`mmbridge.data.inputs`).

Audio, without ffmpeg or torchaudio: decode wav/flac, mix down to mono, resample.
``soundfile`` (libsndfile: wav, flac, ogg) is used when installed; otherwise the standard
library's :mod:`wave` reads PCM wav. Resampling is polyphase filtering
(:func:`scipy.signal.resample_poly`: an anti-aliasing FIR low-pass between up- and
down-sampling), which is what Whisper's 16 kHz front end needs from 22.05/44.1/48 kHz sources.
"""

from __future__ import annotations

import os
import re
import struct
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from mmbridge.errors import ConfigError, DataError

# -- images ----------------------------------------------------------------------------------
#: Environment variable holding the largest image (in pixels) that is decoded.
MAX_PIXELS_ENV = "MMBRIDGE_MAX_IMAGE_PIXELS"
#: Default pixel limit: 64 megapixels (an 8000 x 8000 photo), about 192 MB decoded as RGB.
DEFAULT_MAX_PIXELS = 64_000_000
#: What PIL raises while reading a damaged or non-image file (a truncated PNG raises
#: ``OSError``, a truncated GIF ``EOFError``, some plugins ``SyntaxError`` or ``struct.error``).
_DECODE_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    SyntaxError,
    struct.error,
    Image.DecompressionBombError,
)


def max_image_pixels() -> int:
    """The pixel limit: ``$MMBRIDGE_MAX_IMAGE_PIXELS`` when set, else :data:`DEFAULT_MAX_PIXELS`.

    Raises:
        ConfigError: the variable is not a positive integer.
    """
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(
            f"{MAX_PIXELS_ENV}={os.environ[MAX_PIXELS_ENV]!r} must be a positive "
            f"integer (pixels; default {DEFAULT_MAX_PIXELS})"
        )
    return value


def image_limit(max_pixels: int | None = None) -> int:
    """The pixel limit to apply (``max_pixels``, default :func:`max_image_pixels`), with PIL's
    own guard (``PIL.Image.MAX_IMAGE_PIXELS``) raised to match where the limit is above it, so
    that the limit asked for is the one applied."""
    limit = max_image_pixels() if max_pixels is None else int(max_pixels)
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit
    return limit


def _too_large(what: str, size: str, limit: int) -> str:
    return (
        f"{what} is too large: {size}, over the limit of {limit} pixels (a decompression "
        f"bomb, or set {MAX_PIXELS_ENV} to allow larger images)"
    )


def check_image_size(
    width: int,
    height: int,
    what: str,
    max_pixels: int | None = None,
    error: type[Exception] = DataError,
) -> None:
    """The one pixel-limit check of every image mmbridge reads: the files of a run and its tools
    (:func:`open_image`, from the header) and the media a caller hands over
    (:class:`mmbridge.data.inputs.MediaFiles`: encoded bytes from their header, PIL images and
    arrays from their size), all with one message.

    Args:
        width: The image's width in pixels.
        height: Its height.
        what: The image as the message names it (``image 'PATH'``, ``messages[0].content[1]``).
        max_pixels: Largest ``width * height`` accepted (default: :func:`max_image_pixels`).
        error: The exception to raise: :class:`~mmbridge.errors.DataError` for a run's files;
            the caller's media raise ``MediaTooLarge`` (the server answers 413).
    """
    limit = max_image_pixels() if max_pixels is None else int(max_pixels)
    if width * height > limit:
        raise error(_too_large(what, f"{width}x{height} = {width * height} pixels", limit))


def pil_guard_error(
    exc: Image.DecompressionBombError,
    what: str,
    max_pixels: int | None = None,
    error: type[Exception] = DataError,
) -> Exception:
    """:func:`check_image_size`'s error for an image PIL's own guard refused in ``Image.open``
    (a header claiming more than twice ``PIL.Image.MAX_IMAGE_PIXELS``), with the pixel count
    PIL reports."""
    limit = max_image_pixels() if max_pixels is None else int(max_pixels)
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return error(_too_large(what, f"{found[1]} pixels" if found else str(exc), limit))


def open_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Open an image lazily and refuse it, from its header alone, when it is too large.

    ``Image.open`` reads only the header, so the size is known before any pixel is decoded: a
    decompression bomb (a small file whose header claims 40000 x 40000 pixels) is refused
    without allocating its pixels. The caller decodes (``convert``/``load``) and closes.

    Args:
        path: The image file.
        max_pixels: Largest ``width * height`` accepted (default: :func:`max_image_pixels`).
            A limit above PIL's own guard (``PIL.Image.MAX_IMAGE_PIXELS``) raises that guard
            to match, so that the limit asked for is the one applied.

    Raises:
        DataError: the file is missing, not an image, or larger than the limit; the message
            names the file, its size and the limit.
    """
    limit = image_limit(max_pixels)
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise DataError(f"cannot read image '{path}': no such file") from None
    except UnidentifiedImageError:
        raise DataError(
            f"cannot read image '{path}': not an image file PIL can identify "
            f"(unknown format, or the file is empty or damaged)"
        ) from None
    except Image.DecompressionBombError as exc:  # PIL's guard, for sizes past twice its limit
        raise pil_guard_error(exc, f"image '{path}'", limit) from None
    except _DECODE_ERRORS as exc:
        raise DataError(f"cannot read image '{path}': {type(exc).__name__}: {exc}") from None
    try:
        check_image_size(*img.size, f"image '{path}'", limit)  # the header's size
    except DataError:
        img.close()
        raise
    return img


def load_rgb(path: str, max_pixels: int | None = None) -> Image.Image:
    """Read an image file as RGB, refusing absurd sizes before decoding (see :func:`open_image`).

    Raises:
        DataError: naming the file when it is missing, too large, truncated or not an image.
    """
    img = open_image(path, max_pixels)
    # Another library in the process may have switched PIL's LOAD_TRUNCATED_IMAGES on globally
    # (some do at import); a truncated file must still be an error here, not grey pixels.
    tolerant = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with img:
            return img.convert("RGB")
    except _DECODE_ERRORS as exc:
        raise DataError(
            f"cannot read image '{path}' (truncated or damaged?): {type(exc).__name__}: {exc}"
        ) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = tolerant


# -- audio -----------------------------------------------------------------------------------
#: Whisper's (and most speech models') sample rate.
SAMPLE_RATE = 16000


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode an audio file.

    Returns:
        ``(audio [T] float32 in [-1, 1], sample_rate)``; multi-channel audio is averaged to mono.

    Raises:
        DataError: the file is missing or cannot be decoded (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"audio file not found: {path}")
    try:
        import soundfile
    except ImportError:
        soundfile = None
    if soundfile is not None:
        try:
            data, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
        except Exception as exc:  # libsndfile raises its own error type (or RuntimeError)
            raise DataError(f"cannot decode audio file {path}: {exc}") from None
        return data.mean(axis=1).astype(np.float32), int(sr)
    if path.suffix.lower() != ".wav":
        raise DataError(
            f"cannot decode {path}: only PCM .wav is readable without the "
            f"'soundfile' package (pip install soundfile, or 'mmbridge[data]')"
        )
    return _read_wav(path)


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    try:
        with wave.open(str(path), "rb") as f:
            sr, width, channels = f.getframerate(), f.getsampwidth(), f.getnchannels()
            raw = f.readframes(f.getnframes())
    except (wave.Error, EOFError) as exc:
        raise DataError(f"cannot decode wav file {path}: {exc}") from None
    if width == 1:  # 8-bit PCM is unsigned
        audio = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        audio = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8  # sign-extend 24 bit
        audio = ints.astype(np.float32) / float(1 << 23)
    elif width == 4:
        audio = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    else:
        raise DataError(f"cannot decode wav file {path}: {8 * width}-bit samples")
    return audio.reshape(-1, channels).mean(axis=1).astype(np.float32), sr


def resample(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample ``audio [T]`` from ``sr_in`` to ``sr_out`` Hz (polyphase, anti-aliased).

    Returns:
        ``[round(T * sr_out / sr_in)]`` float32 (up to one sample of rounding).
    """
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    if sr_in == sr_out or audio.size == 0:
        return np.asarray(audio, dtype=np.float32)
    from scipy.signal import resample_poly

    ratio = Fraction(sr_out, sr_in)  # 22050 -> 16000 is 320/441
    out = resample_poly(np.asarray(audio, dtype=np.float64), ratio.numerator, ratio.denominator)
    return out.astype(np.float32)


def load_audio(path: str | Path, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decode ``path`` to mono float32 ``[T]`` at ``sr`` Hz (Whisper's ``load_audio`` without
    its ffmpeg dependency)."""
    audio, sr_in = read_audio(path)
    return resample(audio, sr_in, sr)


def write_wav(path: str | Path, audio: np.ndarray, sr: int) -> Path:
    """Write mono ``audio [T]`` (float in [-1, 1]) as 16-bit PCM wav; returns the path."""
    path = Path(path)
    pcm = np.clip(np.asarray(audio, dtype=np.float64), -1.0, 1.0)
    ints = np.round(pcm * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sr))
        f.writeframes(ints.tobytes())
    return path


def chirp(
    duration_s: float,
    sr: int = SAMPLE_RATE,
    f0: float = 200.0,
    f1: float = 2000.0,
    amplitude: float = 0.5,
) -> np.ndarray:
    """A linear frequency sweep ``[round(duration_s * sr)]`` float32, for tests and examples."""
    t = np.arange(int(round(duration_s * sr)), dtype=np.float64) / sr
    k = (f1 - f0) / max(duration_s, 1e-9)
    return (amplitude * np.sin(2 * np.pi * (f0 * t + 0.5 * k * t * t))).astype(np.float32)
