"""``llava``: existing LLaVA-format files (JSON list or JSONL), one per split."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from mmbridge.contracts.dataset import DatasetFiles, DatasetSource
from mmbridge.data.llava import ON_ERROR
from mmbridge.errors import ConfigError


class LlavaDataset(DatasetSource):
    """LLaVA-format files on disk: ``image``/``audio`` paths and ``conversations``.

    Args:
        train: The training split's JSON/JSONL file.
        val: The validation split's file, if any.
        test: The test split's file, if any.
        media_root: Folder that relative media paths start from (default: the train file's).
        on_error: ``raise`` (default): the first invalid record stops the run; ``skip``: invalid
            records are dropped, counted and listed (see :func:`mmbridge.data.llava.read_llava`).
    """

    def __init__(
        self,
        train: str,
        val: str | None = None,
        test: str | None = None,
        media_root: str | None = None,
        on_error: str = "raise",
    ) -> None:
        if on_error not in ON_ERROR:
            raise ConfigError(f"data.on_error: {on_error!r} is not one of {', '.join(ON_ERROR)}")
        self.on_error = on_error
        self.paths: dict[str, Path] = {}
        for split, value in (("train", train), ("val", val), ("test", test)):
            if value is None and split != "train":
                continue
            if not isinstance(value, str | os.PathLike) or str(value) in ("", "???"):
                raise ConfigError(
                    f"data.{split}: set the path of a LLaVA JSON/JSONL file, got {value!r}"
                )
            self.paths[split] = Path(os.path.abspath(os.path.expanduser(value)))
        root = media_root if media_root is not None else self.paths["train"].parent
        self.media_root = Path(os.path.abspath(os.path.expanduser(root)))

    def prepare(self, cache_dir: Path) -> DatasetFiles:
        """Check that every split's file exists; nothing is copied, so ``cache_dir`` is unused.
        The records are validated where they are read, once
        (:func:`mmbridge.data.llava.read_llava`)."""
        for split, path in self.paths.items():
            if not path.is_file():
                raise ConfigError(f"data.{split}: file not found: {path}")
        return DatasetFiles(splits=dict(self.paths), media_root=self.media_root)

    def identity(self) -> dict[str, Any]:
        """The arguments plus a digest of each split file, so that editing a file in place
        invalidates the features cached for it."""
        ident = super().identity()
        ident["files"] = {s: _digest(p) for s, p in self.paths.items()}
        return ident


def _digest(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


COMPONENTS = {"dataset": {"llava": LlavaDataset}}
