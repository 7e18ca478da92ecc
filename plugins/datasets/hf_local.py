"""``hf_local``: a Hugging Face ``datasets`` data set saved on disk, in the LLaVA schema.

Each row has ``id``, ``conversations`` (``[{"from", "value"}, ...]``) and optionally an
``image`` (``audio``) column holding a path (relative to ``media_root``), a list of paths, or
the encoded file itself (the ``datasets.Image`` / ``Audio`` feature, or raw bytes). Other
columns that JSON can hold go to :attr:`Sample.meta`, as in a LLaVA file.

:meth:`HFLocalDataset.prepare` streams the rows once into one LLaVA JSONL file per split (under
``paths.data_dir/hf_local-<key>/``, written once per source; embedded media are written out as
files beside it, never decoded), and the run reads those files with the LLaVA reader: every rule
of a LLaVA file (roles, placeholders through
:func:`mmbridge.contracts.types.check_placeholders`, media present, unique ids, ``on_error``)
applies unchanged. Errors name the JSONL file and the record, whose index is the row's index in
the source split.

``datasets`` is optional (the ``data`` extra).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from mmbridge.contracts.dataset import DatasetFiles, DatasetSource
from mmbridge.data.llava import MEDIA_KEYS, ON_ERROR
from mmbridge.errors import ConfigError, reading
from mmbridge.utils.io import atomic_write_text

log = logging.getLogger(__name__)

#: A ``DatasetDict``'s split names -> mmbridge's.
SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "test": "test"}
#: Files a source may be: ``save_to_disk`` folders are recognised by their contents.
FILE_KINDS = (".parquet", ".arrow")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "data=hf_local needs the Hugging Face `datasets` package: "
            "pip install 'mmbridge[data]' (or pip install datasets)"
        ) from None
    return datasets


def _load(path: Path, key: str) -> Any:
    """A ``Dataset`` or ``DatasetDict`` from a ``save_to_disk`` folder, a parquet or an arrow
    file."""
    ds = _datasets()
    if path.is_dir():
        try:
            return ds.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise ConfigError(
                f"{key}: {path} is not a folder written by save_to_disk ({exc})"
            ) from None
    if path.suffix == ".parquet":
        return ds.Dataset.from_parquet(str(path))
    if path.suffix == ".arrow":
        return ds.Dataset.from_file(str(path))
    raise ConfigError(
        f"{key}: {path} is neither a save_to_disk folder nor a file of kind {', '.join(FILE_KINDS)}"
    )


def _library_errors() -> tuple[type[Exception], ...]:
    """``datasets``' and ``pyarrow``'s own error bases: a corrupt source raises them."""
    errors: list[type[Exception]] = [_datasets().exceptions.DatasetsError]
    try:
        import pyarrow
    except ImportError:  # pragma: no cover - datasets requires pyarrow
        return tuple(errors)
    return (*errors, pyarrow.ArrowException)


def _stamp(path: Path) -> list:
    """Names, sizes and modification times of the source's files (cheap at any size; an
    edit changes them)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [
        [
            str(p.relative_to(path) if path.is_dir() else p.name),
            p.stat().st_size,
            int(p.stat().st_mtime),
        ]
        for p in files
    ]


def _suffix(value: dict[str, Any] | bytes, key: str) -> str:
    """The file suffix of an embedded media file: its original name's, else sniffed."""
    name = value.get("path") if isinstance(value, dict) else None
    if name and Path(name).suffix:
        return Path(name).suffix.lower()
    data = value.get("bytes") if isinstance(value, dict) else value
    if key == "image" and data:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                return "." + (im.format or "png").lower().replace("jpeg", "jpg")
        except OSError:
            pass
    return {"image": ".png", "audio": ".wav"}.get(key, ".bin")


class _MediaWriter:
    """Writes embedded media files under ``root/<split>/`` and returns their relative paths."""

    def __init__(self, root: Path, split: str) -> None:
        self.root, self.split = root, split

    def __call__(self, value: Any, key: str, row: int, k: int) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list):
            return [self(v, key, row, j) for j, v in enumerate(value)]
        if isinstance(value, dict) and value.get("bytes") is None:
            return value.get("path")  # a media feature that only holds its path
        if isinstance(value, dict | bytes):
            data = value["bytes"] if isinstance(value, dict) else value
            rel = Path(self.split) / f"{row // 1000:05d}" / f"{row:08d}_{k}{_suffix(value, key)}"
        elif hasattr(value, "save"):  # a decoded PIL image
            buf = io.BytesIO()
            value.save(buf, format="PNG")
            data, rel = (
                buf.getvalue(),
                Path(self.split) / f"{row // 1000:05d}" / f"{row:08d}_{k}.png",
            )
        else:
            # the reader names the record
            return f"<{type(value).__name__} is not a {key} path or file>"
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.root / rel).write_bytes(data)
        return str(self.root / rel)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _undecoded(feature: Any, datasets: Any) -> Any:
    """The ``decode=False`` version of an ``Image`` / ``Audio`` feature (or a list of them);
    None for any other feature."""
    media = (datasets.Image, datasets.Audio)
    if isinstance(feature, media):
        return type(feature)(decode=False)
    inner = (
        (feature[0] if feature else None)
        if isinstance(feature, list)
        else getattr(feature, "feature", None)
    )
    if isinstance(inner, media):
        return getattr(datasets, "List", datasets.Sequence)(type(inner)(decode=False))
    return None


def write_split(dataset: Any, target: Path, media_dir: Path, split: str) -> int:
    """Stream ``dataset``'s rows into the LLaVA JSONL ``target`` (atomically); embedded media
    go to ``media_dir/<split>/``. Returns the number of rows."""
    datasets = _datasets()
    for key in MEDIA_KEYS:  # read the encoded bytes, never decode them
        undecoded = _undecoded(dataset.features.get(key), datasets)
        if undecoded is not None:
            dataset = dataset.cast_column(key, undecoded)
    media = _MediaWriter(media_dir, split)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for n, row in enumerate(dataset, start=1):
                record = {}
                for col, value in row.items():
                    if col in MEDIA_KEYS:
                        if value is not None:
                            record[col] = media(value, col, n - 1, 0)
                    elif _jsonable(value):
                        record[col] = value
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


class HFLocalDataset(DatasetSource):
    """A ``datasets`` data set on disk with LLaVA's columns (``id``, ``image``, ``conversations``).

    Args:
        train: A ``save_to_disk`` folder (of a ``Dataset``, or of a ``DatasetDict`` whose
            ``train`` / ``validation`` / ``test`` splits are then all used), a ``.parquet``
            or an ``.arrow`` file.
        val: The validation split's source (a ``Dataset`` folder or file), if any.
        test: The test split's source, if any.
        media_root: Folder that relative media paths start from (default: the folder that
            holds ``train``).
        on_error: ``raise``: the first invalid record stops the run; ``skip``: invalid records
            are dropped, counted and listed (:func:`mmbridge.data.llava.read_llava`).

    Raises:
        ConfigError: naming the key (``data.train`` ...) for a missing or unreadable source,
            a ``DatasetDict`` with ``val`` / ``test`` set too, or ``datasets`` not installed.
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
        self.sources: dict[str, Path] = {}
        for split, value in (("train", train), ("val", val), ("test", test)):
            if value is None and split != "train":
                continue
            if not isinstance(value, str | os.PathLike) or str(value) in ("", "???"):
                raise ConfigError(
                    f"data.{split}: set a save_to_disk folder or a .parquet / .arrow "
                    f"file, got {value!r}"
                )
            self.sources[split] = Path(os.path.abspath(os.path.expanduser(str(value))))
        root = media_root if media_root is not None else self.sources["train"].parent
        self.media_root = Path(os.path.abspath(os.path.expanduser(str(root))))

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident["files"] = {s: _stamp(p) if p.exists() else None for s, p in self.sources.items()}
        return ident

    def prepare(self, cache_dir: Path) -> DatasetFiles:
        """Convert each split once into ``cache_dir/hf_local-<key>/<split>.jsonl``."""
        for split, path in self.sources.items():
            if not path.exists():
                raise ConfigError(f"data.{split}: not found: {path}")
        key = hashlib.sha256(
            json.dumps(
                {**self.identity(), "root": str(self.media_root)}, sort_keys=True, default=str
            ).encode()
        ).hexdigest()[:16]
        out = Path(cache_dir) / f"hf_local-{key}"
        done = out / "splits.json"
        if done.is_file():
            with reading(
                done, expected="the split list this reader wrote (delete the folder to rebuild it)"
            ):
                splits = dict(json.loads(done.read_text()))
            return DatasetFiles(
                splits={s: out / f for s, f in splits.items()}, media_root=self.media_root
            )
        parts: dict[str, Any] = {}
        for split, path in self.sources.items():
            with reading(
                path,
                expected="a save_to_disk folder, a .parquet or an .arrow file",
                also=_library_errors(),
            ):
                data = _load(path, f"data.{split}")
            if hasattr(data, "keys"):  # a DatasetDict
                if split != "train" or len(self.sources) > 1:
                    raise ConfigError(
                        f"data.{split}: {path} holds a DatasetDict (splits "
                        f"{', '.join(data.keys())}); set only data.train to it, or point "
                        f"each of data.train/val/test at one split"
                    )
                unknown = [s for s in data if s not in SPLIT_NAMES]
                if unknown:
                    log.warning(
                        "data.train: splits %s of %s are not used (used: %s)",
                        ", ".join(unknown),
                        path,
                        ", ".join(s for s in data if s in SPLIT_NAMES),
                    )
                parts.update({SPLIT_NAMES[s]: data[s] for s in data if s in SPLIT_NAMES})
            else:
                parts[split] = data
        if "train" not in parts:
            raise ConfigError(f"data.train: {self.sources['train']} has no train split")
        names = {}
        for split, dataset in parts.items():
            with reading(
                self.sources.get(split, self.sources["train"]),
                f"split '{split}'",
                "rows with LLaVA's columns (id, conversations, image / audio)",
                also=_library_errors(),
            ):
                rows = write_split(dataset, out / f"{split}.jsonl", out / "media", split)
            names[split] = f"{split}.jsonl"
            log.info(
                "data (hf_local): %s split '%s': %d rows -> %s",
                self.sources.get(split, self.sources["train"]),
                split,
                rows,
                out / f"{split}.jsonl",
            )
        atomic_write_text(done, json.dumps(names))
        return DatasetFiles(
            splits={s: out / f for s, f in names.items()}, media_root=self.media_root
        )


COMPONENTS = {"dataset": {"hf_local": HFLocalDataset}}
