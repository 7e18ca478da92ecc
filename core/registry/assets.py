"""Offline model catalogue: short names for real pretrained weights.

An :class:`Asset` knows where its source weights come from (a registry package installed
locally, never a hub) and how to convert them once into a standard format (an HF model
directory, an openai-whisper checkpoint) inside mmbridge's cache. The conversion is checked
against the source package's own runtime before it is published (atomically) in the cache.

Config fields that take a model (``llm.path``, ``encoder.path``, ...) accept an asset name, a
local path, or a hub id: :func:`resolve_model_path` decides which.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from filelock import FileLock

from mmbridge.errors import AssetError
from mmbridge.utils.cache_integrity import MANIFEST, manifest_problem, move_aside, write_manifest

if TYPE_CHECKING:
    from mmbridge.registry import Registry

CACHE_ENV = "MMBRIDGE_CACHE"


def cache_root() -> Path:
    """mmbridge's cache directory: ``$MMBRIDGE_CACHE`` or ``~/.cache/mmbridge``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mmbridge").expanduser()


def dir_size(path: Path) -> int:
    """Total bytes of the files under ``path`` (or of the file itself)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Asset(ABC):
    """One named offline model.

    Subclasses set ``format`` (``"hf"``, ``"whisper"``, ...), ``source`` (a human-readable
    origin, e.g. the package name) and implement :meth:`source_available` and :meth:`convert`.
    The converted result lives at ``cache_root()/assets/<name>`` (a directory, or for
    single-file formats a file inside it named by :attr:`filename`).
    """

    name: ClassVar[str] = ""
    format: ClassVar[str] = ""
    source: ClassVar[str] = ""
    #: Within the asset directory, the file to hand out (``None``: the directory itself).
    filename: ClassVar[str | None] = None
    #: Bump when the conversion changes: an entry converted by another version is redone.
    version: ClassVar[str] = "1"

    @abstractmethod
    def source_available(self) -> bool:
        """Whether the source weights are installed here (no network is touched)."""

    @abstractmethod
    def convert(self, out_dir: Path) -> str:
        """Convert the source into ``out_dir`` and check it against the source runtime.

        Returns a one-line description of the check (e.g. ``"max |diff| 3e-6 <= 1e-4"``);
        raises :class:`AssetError` when the check fails.
        """

    def location(self, root: Path | None = None) -> Path:
        if not self.name:  # made from the bare class: it would write into the assets dir itself
            raise AssetError(
                f"{type(self).__qualname__} has no name; make an asset with "
                f"registry.get('asset', NAME).create()"
            )
        return (root or cache_root()) / "assets" / self.name

    def target(self, root: Path | None = None) -> Path:
        loc = self.location(root)
        return loc / self.filename if self.filename else loc

    def is_converted(self, root: Path | None = None) -> bool:
        check = self.location(root) / "CHECK.txt"
        if not check.is_file():
            return False
        first = check.read_text().splitlines()[:1]
        return first == [f"version={self.version}"] and self._damage(root) is None

    def _damage(self, root: Path | None = None) -> str | None:
        """What is wrong with the converted files (their manifest), ``None`` when whole.
        Entries converted before manifests existed are trusted as they are."""
        loc = self.location(root)
        if not (loc / MANIFEST).is_file() and (loc / "CHECK.txt").is_file():
            return None
        return manifest_problem(loc)

    def ensure(self, root: Path | None = None) -> Path:
        """The converted asset, converting it first if needed. Safe when several processes
        ask at once (a file lock; the result is moved into place in one rename)."""
        loc = self.location(root)
        if self.is_converted(root):
            return self.target(root)
        if not self.source_available():
            raise AssetError(
                f"model asset '{self.name}' is not installed: it converts from {self.source}. "
                f"Run `bash scripts/setup.sh` (installs the offline model packages) or give a "
                f"local path / hub id instead"
            )
        loc.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(loc) + ".lock"):
            if self.is_converted(root):
                return self.target(root)
            damage = self._damage(root) if loc.exists() else None
            if damage is not None:
                move_aside(loc, damage, what="converted model asset")
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.name}-", dir=loc.parent))
            try:
                check = self.convert(tmp)
                (tmp / "CHECK.txt").write_text(f"version={self.version}\n{check}\n")
                write_manifest(tmp)
                if loc.exists():
                    shutil.rmtree(loc)
                os.replace(tmp, loc)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        return self.target(root)


def resolve_model_path(value: str, registry: Registry | None, key: str = "path") -> str:
    """Map a config value to something ``from_pretrained`` / ``load_model`` accepts.

    An asset name -> its converted local path (converted on first use); an existing local
    path -> itself; anything else is returned as is (a hub id, used only when online).

    Args:
        value: The config value (``llm.path``, ``encoder.checkpoint``, ...).
        registry: The run's registry, which names the offline models (a component receives it
            from :func:`mmbridge.config.build.build`). ``None`` for a component made on its own,
            outside a run: then only a local path or an ``org/name`` hub id is accepted, since
            nothing can say whether a bare name is an offline model.
        key: The config key, for error messages.

    Raises:
        AssetError: a local path that does not exist, or a bare name without a registry.
    """
    if registry is not None and ("asset", value) in registry:
        asset = registry.get("asset", value).create()
        return str(asset.ensure())
    p = Path(value).expanduser()
    if p.exists():
        return str(p)
    if value.startswith((".", "/", "~")):
        names = (
            ", ".join(registry.names("asset")) if registry is not None else "(no registry given)"
        )
        raise AssetError(
            f"{key}: '{value}' does not exist (a local path was meant); "
            f"offline model names: {names or '(none)'}"
        )
    if registry is None and "/" not in value:
        raise AssetError(
            f"{key}: '{value}' is not a local path, and an offline model name needs "
            f"the run's registry to resolve: build the component with "
            f"mmbridge.config.build.build(registry, ...) or pass registry=load_registry()"
        )
    return value
