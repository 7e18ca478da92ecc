"""``spoken``: synthesised speech of templated sentences whose content is known exactly.

No spoken-language data set ships offline, so speech is generated: each clip says one sentence
such as "The red ball is under the table." or "Anna has three green apples.", spoken by piper
(or espeak-ng) with a voice, speed and pitch drawn per clip. Two tasks use the clips, as in
speech-LLM instruction data (SALMONN, arXiv 2310.13289):

- transcription: ``<audio>\\nTranscribe the audio.`` -> the sentence;
- spoken question answering: one-word questions about the sentence (colour, object, place,
  relation, count, name), several per clip.

``meta`` holds ``text`` (also ``caption``, for the alignment recipe), ``qtypes`` (one per
answer), ``facts`` and ``voice``. Text, voices and questions are deterministic per
(seed, split, index); the audio is too, except with ``piper_noise > 0``. The files are written
once into ``cache_dir/spoken/<key>``, atomically (temp dir + rename, under a file lock).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

from mmbridge.contracts.dataset import DatasetFiles, DatasetSource
from mmbridge.contracts.types import Sample, placeholder
from mmbridge.data.generated import publish_once
from mmbridge.data.llava import write_llava
from mmbridge.errors import ConfigError
from mmbridge.plugins.datasets._tts import Synthesizer, frame_speech, resolve_engine
from mmbridge.utils.media_io import resample, write_wav

log = logging.getLogger(__name__)

#: Bump when templates, questions or synthesis change: it is part of the cache key.
GENERATOR_VERSION = 1
COLOURS = ("red", "green", "blue", "yellow", "black", "white", "brown", "orange")
OBJECTS = ("ball", "cup", "book", "hat", "bag", "shoe", "key", "lamp", "clock", "phone")
RELATIONS = ("under", "on", "behind", "next to", "in front of", "near")
PLACES = ("table", "bed", "sofa", "door", "window", "desk", "chair", "shelf", "tree", "car")
NAMES = ("Anna", "Tom", "Maria", "David", "Sarah", "Peter", "Lucy", "James", "Emma", "Paul")
ITEMS = ("apples", "books", "pencils", "cups", "balloons", "flowers", "candles", "stones")
COUNTS = ("two", "three", "four", "five", "six", "seven", "eight", "nine")
TRANSCRIBE = (
    "Transcribe the audio.",
    "What is said in the recording?",
    "Write down what the speaker says.",
    "Transcribe this speech.",
)
QTYPES = ("transcribe", "colour", "object", "place", "relation", "count", "name")
_PROGRESS_MIN = 20


def _placement(rng: random.Random) -> tuple[str, dict[str, str], list[tuple[str, str, str]]]:
    f = {
        "colour": rng.choice(COLOURS),
        "object": rng.choice(OBJECTS),
        "relation": rng.choice(RELATIONS),
        "place": rng.choice(PLACES),
    }
    text = f"The {f['colour']} {f['object']} is {f['relation']} the {f['place']}."
    qa = [
        (
            "colour",
            rng.choice(
                [f"What colour is the {f['object']}?", f"Which colour does the {f['object']} have?"]
            ),
            f["colour"],
        ),
        (
            "object",
            rng.choice(
                [f"Which object is {f['colour']}?", f"What is {f['relation']} the {f['place']}?"]
            ),
            f["object"],
        ),
        ("place", f"What is the {f['object']} {f['relation']}?", f["place"]),
        (
            "relation",
            f"Where is the {f['object']} relative to the {f['place']}? Answer with "
            f"the preposition.",
            f["relation"],
        ),
    ]
    return text, f, qa


def _possession(rng: random.Random) -> tuple[str, dict[str, str], list[tuple[str, str, str]]]:
    f = {
        "name": rng.choice(NAMES),
        "count": rng.choice(COUNTS),
        "colour": rng.choice(COLOURS),
        "object": rng.choice(ITEMS),
    }
    text = f"{f['name']} has {f['count']} {f['colour']} {f['object']}."
    qa = [
        ("count", f"How many {f['object']} does {f['name']} have?", f["count"]),
        (
            "name",
            rng.choice(
                [f"Who has {f['count']} {f['object']}?", f"Whose {f['object']} are {f['colour']}?"]
            ),
            f["name"],
        ),
        ("colour", f"What colour are {f['name']}'s {f['object']}?", f["colour"]),
        ("object", f"What does {f['name']} have {f['count']} of?", f["object"]),
    ]
    return text, f, qa


def make_sample(
    args: dict[str, Any], split: str, index: int, synth: Synthesizer
) -> tuple[str, dict[str, Any], Sample]:
    """Sentence, voice and sample ``index`` of ``split`` (media filled in by the caller).

    Each clip has its own RNG seeded by (seed, split, index), so the first k clips do not
    depend on how many are generated and the splits never share a stream.
    """
    rng = random.Random(f"spoken:{args['seed']}:{split}:{index}")
    text, facts, qa = (_placement if rng.random() < 0.5 else _possession)(rng)
    # the voice has its own stream, so the text and questions do not depend on the engine
    voice = synth.draw_voice(random.Random(f"spoken-voice:{args['seed']}:{split}:{index}"))
    audio_tag = f"{placeholder('audio')}\n"
    if rng.random() < args["transcribe_fraction"]:
        turns = [
            {"from": "human", "value": audio_tag + rng.choice(TRANSCRIBE)},
            {"from": "gpt", "value": text},
        ]
        qtypes = ["transcribe"]
    else:
        rng.shuffle(qa)
        chosen = qa[: rng.randint(1, args["max_questions"])]
        turns, qtypes = [], []
        for k, (qtype, question, answer) in enumerate(chosen):
            turns += [
                {"from": "human", "value": (audio_tag if k == 0 else "") + question},
                {"from": "gpt", "value": answer},
            ]
            qtypes.append(qtype)
    meta = {"text": text, "caption": text, "qtypes": qtypes, "facts": facts, "voice": voice}
    return text, voice, Sample(id=f"{split}-{index:06d}", conversations=turns, meta=meta)


class SpokenDataset(DatasetSource):
    """Synthesised speech of templated sentences: transcription and spoken one-word QA.

    Args:
        n_train: Training clips.
        n_val: Validation clips (a split with 0 clips is left out).
        n_test: Test clips.
        seed: Base seed; each split derives its own stream from it.
        sample_rate: Sample rate of the written 16-bit wav files.
        engine: ``auto`` (piper if installed, else espeak-ng), ``piper`` or ``espeak``.
        transcribe_fraction: Share of clips whose conversation is a transcription (the others
            get spoken questions).
        max_questions: At most this many questions per QA clip (at least one).
        piper_noise: piper's generator noise (0: deterministic audio; > 0: more natural speech
            that differs between runs).
    """

    def __init__(
        self,
        n_train: int = 1000,
        n_val: int = 64,
        n_test: int = 200,
        seed: int = 0,
        sample_rate: int = 16000,
        engine: str = "auto",
        transcribe_fraction: float = 0.5,
        max_questions: int = 2,
        piper_noise: float = 0.0,
    ) -> None:
        for key, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if n < 0:
                raise ConfigError(f"data.{key}: {n} must be >= 0")
        if not 0.0 <= transcribe_fraction <= 1.0:
            raise ConfigError(f"data.transcribe_fraction: {transcribe_fraction} must be in [0, 1]")
        if not 1 <= max_questions <= 4:
            raise ConfigError(f"data.max_questions: {max_questions} must be in 1..4")
        if sample_rate < 8000:
            raise ConfigError(f"data.sample_rate: {sample_rate} Hz is too low (minimum 8000)")
        self.counts = {"train": n_train, "val": n_val, "test": n_test}
        self.engine = engine
        self.args: dict[str, Any] = {
            **{f"n_{s}": n for s, n in self.counts.items()},
            "seed": seed,
            "sample_rate": int(sample_rate),
            "engine": engine,
            "transcribe_fraction": float(transcribe_fraction),
            "max_questions": int(max_questions),
            "piper_noise": float(piper_noise),
            "version": GENERATOR_VERSION,
        }
        self._synth: Synthesizer | None = None

    @property
    def synth(self) -> Synthesizer:
        """The synthesiser (resolving ``auto`` raises a DataError when none is installed)."""
        if self._synth is None:
            self._synth = Synthesizer(resolve_engine(self.engine), self.args["piper_noise"])
        return self._synth

    def samples(self, split: str) -> list[Sample]:
        """The split's samples without synthesising audio (text, voices, questions, meta)."""
        return [make_sample(self.args, split, i, self.synth)[2] for i in range(self.counts[split])]

    @property
    def key(self) -> str:
        """The cache folder name: a digest of the arguments and the synthesiser used."""
        payload = {**self.args, "synth": self.synth.describe()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def identity(self) -> dict[str, Any]:
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "args": dict(self.args),
            "synth": self.synth.describe(),
        }

    def prepare(self, cache_dir: Path) -> DatasetFiles:
        """Synthesise the data set once into ``cache_dir/spoken/<key>`` and say where it is."""
        final = publish_once(Path(cache_dir) / "spoken", self.key, self._generate)
        splits = {s: final / f"{s}.json" for s, n in self.counts.items() if n > 0 or s == "train"}
        return DatasetFiles(splits=splits, media_root=final)

    def _generate(self, out: Path) -> None:
        from rich.progress import Progress

        total = sum(self.counts.values())
        sr = self.args["sample_rate"]
        log.info("synthesising %d spoken clips with %s into %s", total, self.synth.engine, out)
        with Progress(transient=True, disable=total < _PROGRESS_MIN) as progress:
            task = progress.add_task(f"synthesising speech ({self.synth.engine})", total=total)
            for split, n in self.counts.items():
                if n == 0 and split != "train":
                    continue
                folder = out / "audio" / split
                folder.mkdir(parents=True)
                samples = []
                for i in range(n):
                    text, voice, sample = make_sample(self.args, split, i, self.synth)
                    audio, sr_in = self.synth.speak(text, voice)
                    audio = frame_speech(resample(audio, sr_in, sr), sr)
                    path = write_wav(folder / f"{i:06d}.wav", audio, sr)
                    sample.media["audio"] = str(path)
                    sample.meta["duration_s"] = round(len(audio) / sr, 3)
                    samples.append(sample)
                    progress.advance(task)
                write_llava(samples, out / f"{split}.json", media_root=out)
        info = {"generator": "spoken", **self.args, "synth": self.synth.describe()}
        (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")


COMPONENTS = {"dataset": {"spoken": SpokenDataset}}
