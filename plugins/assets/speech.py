"""Speech with a known transcript, for checking a converted speech recogniser against a
reference that does not come from the conversion itself.

Sources, best first: real read speech from Debian's ``pocketsphinx-testdata`` (LibriVox clips,
16 kHz, with transcripts), then a sentence synthesised by ``espeak-ng``. Audio is decoded with
the standard ``wave`` module (no ffmpeg).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")
#: Used when only espeak-ng is available: everyday words that Whisper tiny.en reads correctly
#: from espeak-ng's formant voice at 130 words per minute (some pangrams it does not).
SYNTH_SENTENCE = (
    "I would like a cup of coffee with milk and sugar, please. "
    "Today is a sunny day, and the children are playing in the park."
)
#: Whisper hears one 30-second window at a time; the check decodes a single window.
MAX_SECONDS = 30.0


@dataclass
class SpeechClip:
    """Mono float32 audio in [-1, 1] at 16 kHz, shape ``(n_samples,)``, and its transcript."""

    audio: np.ndarray
    text: str
    origin: str


def read_wav(path: str | Path) -> np.ndarray:
    """A 16-bit PCM WAV file as mono float32 at 16 kHz, shape ``(n_samples,)``."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM is supported")
        rate, channels = w.getframerate(), w.getnchannels()
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0
    audio = pcm.reshape(-1, channels).mean(axis=1)
    return resample(audio, rate) if rate != SAMPLE_RATE else audio


def resample(audio: np.ndarray, rate: int) -> np.ndarray:
    """Linear-interpolation resampling to 16 kHz; enough for recognition checks (speech
    energy lies well below the 8 kHz Nyquist limit)."""
    n_out = round(len(audio) * SAMPLE_RATE / rate)
    t_out = np.arange(n_out) * (rate / SAMPLE_RATE)
    return np.interp(t_out, np.arange(len(audio)), audio).astype(np.float32)


def librivox_clip(
    directory: Path = LIBRIVOX_DIR, min_words: int = 30, gap_s: float = 0.4
) -> SpeechClip | None:
    """LibriVox test clips joined by short silences until they hold ``min_words`` words (the
    first two: 30 words, 10 s), never more than one 30-second Whisper window.

    Thirty words tell a working recogniser (a few per cent of errors) from a broken one (near
    100 %), and decoding time grows with every word.
    """
    transcripts = directory / "transcription"
    if not transcripts.is_file():
        return None
    pieces: list[np.ndarray] = []
    words: list[str] = []
    silence = np.zeros(int(gap_s * SAMPLE_RATE), np.float32)
    for line in transcripts.read_text().splitlines():
        # "<s> he was not an ill disposed young man </s> (clip-id)"
        if "(" not in line:
            continue
        text, clip_id = line.rsplit("(", 1)
        wav = directory / f"{clip_id.strip(' )')}.wav"
        if not wav.is_file():
            continue
        audio = read_wav(wav)
        if sum(map(len, pieces)) + len(audio) > MAX_SECONDS * SAMPLE_RATE:
            break
        pieces += [audio, silence]
        words += [w for w in text.split() if w not in ("<s>", "</s>")]
        if len(words) >= min_words:
            break
    if not pieces:
        return None
    return SpeechClip(
        np.concatenate(pieces),
        " ".join(words),
        f"{len(pieces) // 2} LibriVox clips of pocketsphinx-testdata",
    )


def espeak_clip(sentence: str = SYNTH_SENTENCE) -> SpeechClip | None:
    """``sentence`` spoken by espeak-ng, or ``None`` when espeak-ng is not installed."""
    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(
            [exe, "-v", "en-us", "-s", "130", "-w", str(wav), sentence],
            check=True,
            capture_output=True,
            timeout=60,
        )
        audio = read_wav(wav)
    return SpeechClip(audio, sentence, f"{Path(exe).name} synthesis")


def reference_clip() -> SpeechClip | None:
    """The best available speech clip with a known transcript, or ``None``."""
    return librivox_clip() or espeak_clip()


def word_error_rate(reference: list[str], hypothesis: list[str]) -> float:
    """Word-level Levenshtein distance divided by the reference length."""
    prev = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, 1):
        cur = [i] + [0] * len(hypothesis)
        for j, hyp_word in enumerate(hypothesis, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ref_word != hyp_word))
        prev = cur
    return prev[-1] / max(1, len(reference))
