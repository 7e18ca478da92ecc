"""``librivox``: real read speech with transcripts from Debian's ``pocketsphinx-testdata``.

The package ships five LibriVox clips of *Sense and Sensibility* (16 kHz, 3-7 s, 71 words)
and five short clips of playing-card names ("ten of clubs"), each with a Sphinx-style
transcript (``<s> words </s> (file-id)``). They are a small held-out check that a speech model
handles human speech and not only synthetic voices: a ``test`` split of transcription samples.
Nothing is copied: the data file points at the package's wav files.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from mmbridge.contracts.dataset import DatasetFiles, DatasetSource
from mmbridge.contracts.types import Sample, placeholder
from mmbridge.data.llava import write_llava
from mmbridge.errors import ConfigError, DataError, did_you_mean

PACKAGE = "pocketsphinx-testdata"
DATA_DIR = Path("/usr/share/pocketsphinx/test/data")
#: subset -> (folder, transcript file) under :data:`DATA_DIR`.
SUBSETS: dict[str, tuple[str, str]] = {
    "librivox": ("librivox", "transcription"),
    "cards": ("cards", "cards.transcription"),
}
INSTRUCTION = "Transcribe the audio."
_LINE = re.compile(r"^\s*(?:<s>)?\s*(?P<text>.*?)\s*(?:</s>)?\s*\((?P<id>[^()]+)\)\s*$")


def read_transcripts(path: Path) -> dict[str, str]:
    """Sphinx transcript lines ``<s> text </s> (id)`` -> ``{id: text}``."""
    out: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None:
            raise DataError(f"{path}: line {lineno} is not '<s> text </s> (id)': {line!r}")
        out[m.group("id").strip()] = " ".join(m.group("text").split())
    return out


class LibrivoxDataset(DatasetSource):
    """Real speech with transcripts (``pocketsphinx-testdata``) as a ``test`` split.

    Args:
        subsets: Which recordings: ``librivox`` (read book sentences) and/or ``cards``
            (short card names).
        data_dir: Where the package put its data (Debian's location by default).
    """

    def __init__(self, subsets: list[str] | None = None, data_dir: str = str(DATA_DIR)) -> None:
        subsets = list(subsets or ["librivox"])
        for s in subsets:
            if s not in SUBSETS:
                raise ConfigError(
                    f"data.subsets: unknown subset '{s}'{did_you_mean(s, SUBSETS)}; "
                    f"valid: {', '.join(SUBSETS)}"
                )
        if not subsets or len(set(subsets)) != len(subsets):
            raise ConfigError(f"data.subsets: expected distinct subset names, got {subsets}")
        self.subsets = subsets
        self.data_dir = Path(data_dir)

    def samples(self) -> list[Sample]:
        """The transcription samples (absolute wav paths; ``meta.text`` is the transcript)."""
        samples = []
        for subset in self.subsets:
            folder, transcript = SUBSETS[subset]
            tfile = self.data_dir / folder / transcript
            if not tfile.is_file():
                raise DataError(
                    f"data (librivox): {tfile} not found; the real speech comes from "
                    f"Debian's '{PACKAGE}' package: apt-get install -y {PACKAGE}"
                )
            for clip_id, text in read_transcripts(tfile).items():
                wav = self.data_dir / folder / f"{clip_id}.wav"
                if not wav.is_file():
                    raise DataError(f"{tfile}: transcript of '{clip_id}' but {wav} is missing")
                samples.append(
                    Sample(
                        id=f"{subset}-{clip_id}",
                        media={"audio": str(wav)},
                        conversations=[
                            {"from": "human", "value": f"{placeholder('audio')}\n{INSTRUCTION}"},
                            {"from": "gpt", "value": text},
                        ],
                        meta={
                            "text": text,
                            "caption": text,
                            "qtypes": ["transcribe"],
                            "subset": subset,
                        },
                    )
                )
        return samples

    def identity(self) -> dict[str, Any]:
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "subsets": self.subsets,
            "data_dir": str(self.data_dir),
        }

    def prepare(self, cache_dir: Path) -> DatasetFiles:
        """Write ``test.json`` (pointing at the package's wav files) into
        ``cache_dir/librivox/<key>``; rewritten atomically on every call (it is tiny)."""
        key = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]
        out = Path(cache_dir) / "librivox" / key
        path = write_llava(self.samples(), out / "test.json")
        return DatasetFiles(splits={"test": path}, media_root=self.data_dir)


COMPONENTS = {"dataset": {"librivox": LibrivoxDataset}}
