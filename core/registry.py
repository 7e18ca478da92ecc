"""The component registry: name -> class, per kind, with the plugin that registered it."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmbridge.assets import Asset
from mmbridge.connector import Connector
from mmbridge.dataset import DatasetSource
from mmbridge.encoder import ModalityEncoder
from mmbridge.errors import RegistrationError, unknown
from mmbridge.llm import LanguageModel
from mmbridge.prefix import SequencePrefix
from mmbridge.recipe import DataRecipe
from mmbridge.scorer import Scorer
from mmbridge.tools import Tool, ToolCaller

log = logging.getLogger(__name__)

#: kind -> (base class, config group the kind is chosen in)
KINDS: dict[str, tuple[type, str]] = {
    "encoder": (ModalityEncoder, "encoder"),
    "connector": (Connector, "connector"),
    "llm": (LanguageModel, "llm"),
    "tool": (Tool, "tools"),
    "tool_caller": (ToolCaller, "tool_caller"),
    "recipe": (DataRecipe, "recipe"),
    "dataset": (DatasetSource, "data"),
    "scorer": (Scorer, "scorer"),
    "prefix": (SequencePrefix, "alignment"),
    "asset": (Asset, "(model path fields)"),
}


@dataclass(frozen=True)
class Origin:
    """Who registered something: plugin name, distribution and its version."""

    plugin: str
    package: str
    version: str


@dataclass(frozen=True)
class Entry:
    """One registered component."""

    kind: str
    name: str
    cls: type
    origin: Origin
    #: Registered with ``override=True``: a later plain registration of the name does not win.
    overrides: bool = False

    @property
    def summary(self) -> str:
        """First line of the class docstring."""
        doc = inspect.getdoc(self.cls) or ""
        return doc.splitlines()[0] if doc else ""


class Registry:
    """All components known to one run. Built by :func:`mmbridge.plugin_manager.load_registry`;
    plugins see it only through a :class:`Registrar` that records their name."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self.config_dirs: list[tuple[str, Origin]] = []

    # -- lookup -----------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Entry:
        """The entry ``name`` of ``kind``; an error listing the valid names otherwise."""
        self._check_kind(kind)
        try:
            return self._entries[kind][name]
        except KeyError:
            raise unknown(kind, name, self._entries[kind], KINDS[kind][1]) from None

    def names(self, kind: str) -> list[str]:
        self._check_kind(kind)
        return sorted(self._entries[kind])

    def entries(self, kind: str | None = None) -> Iterator[Entry]:
        for k in [kind] if kind else KINDS:
            yield from (self._entries[k][n] for n in sorted(self._entries[k]))

    def __contains__(self, item: tuple[str, str]) -> bool:
        kind, name = item
        return name in self._entries.get(kind, {})

    # -- registration (through a Registrar) --------------------------------------------------
    def _add(self, kind: str, name: str, cls: Any, origin: Origin, override: bool) -> None:
        self._check_kind(kind)
        base = KINDS[kind][0]
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise RegistrationError(f"plugin '{origin.plugin}' registered a {kind} with an invalid name {name!r}")
        if not (inspect.isclass(cls) and issubclass(cls, base)):
            what = f"class {cls.__module__}.{cls.__qualname__}" if inspect.isclass(cls) else f"{type(cls).__name__} object {cls!r}"
            raise RegistrationError(
                f"plugin '{origin.plugin}' registered {kind} '{name}' as {what}, which is not a "
                f"subclass of mmbridge.{base.__name__}; use the registry method of its kind")
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(cls.__abstractmethods__))
            raise RegistrationError(
                f"plugin '{origin.plugin}' registered {kind} '{name}' as abstract class "
                f"{cls.__qualname__} (not implemented: {missing})")
        old = self._entries[kind].get(name)
        if old is not None:
            if old.overrides and not override:
                # The override was loaded first (plugins load in name order); it still wins.
                log.warning("%s '%s' of plugin '%s' is overridden by plugin '%s'",
                            kind, name, origin.plugin, old.origin.plugin)
                return
            if not override:
                raise RegistrationError(
                    f"{kind} '{name}' is registered twice: by plugin '{old.origin.plugin}' "
                    f"({old.origin.package}) and by plugin '{origin.plugin}' ({origin.package}); "
                    f"rename one, or pass override=True to replace it on purpose")
            log.warning("%s '%s' of plugin '%s' is overridden by plugin '%s'",
                        kind, name, old.origin.plugin, origin.plugin)
        if kind in ("tool", "asset"):
            cls.name = name
        self._entries[kind][name] = Entry(kind, name, cls, origin, overrides=override)

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise unknown("component kind", kind, KINDS)


class Registrar:
    """What a plugin's ``register_components(registry)`` hook receives: typed ``add_*`` methods
    that record which plugin registered what. Set ``override=True`` to replace a component of
    another plugin on purpose (it is logged); without it a duplicate name is an error."""

    def __init__(self, registry: Registry, origin: Origin) -> None:
        self._registry = registry
        self.origin = origin

    def add_encoder(self, name: str, cls: type[ModalityEncoder], *, override: bool = False) -> None:
        self._registry._add("encoder", name, cls, self.origin, override)

    def add_connector(self, name: str, cls: type[Connector], *, override: bool = False) -> None:
        self._registry._add("connector", name, cls, self.origin, override)

    def add_llm(self, name: str, cls: type[LanguageModel], *, override: bool = False) -> None:
        self._registry._add("llm", name, cls, self.origin, override)

    def add_tool(self, name: str, cls: type[Tool], *, override: bool = False) -> None:
        self._registry._add("tool", name, cls, self.origin, override)

    def add_tool_caller(self, name: str, cls: type[ToolCaller], *, override: bool = False) -> None:
        self._registry._add("tool_caller", name, cls, self.origin, override)

    def add_recipe(self, name: str, cls: type[DataRecipe], *, override: bool = False) -> None:
        self._registry._add("recipe", name, cls, self.origin, override)

    def add_dataset(self, name: str, cls: type[DatasetSource], *, override: bool = False) -> None:
        self._registry._add("dataset", name, cls, self.origin, override)

    def add_scorer(self, name: str, cls: type[Scorer], *, override: bool = False) -> None:
        self._registry._add("scorer", name, cls, self.origin, override)

    def add_prefix(self, name: str, cls: type[SequencePrefix], *, override: bool = False) -> None:
        """Learned tokens at the start of the sequence (AlignGPT's indicators)."""
        self._registry._add("prefix", name, cls, self.origin, override)

    def add_asset(self, name: str, cls: type[Asset], *, override: bool = False) -> None:
        """An offline model name (``mmbridge assets``) usable in any model-path config field."""
        self._registry._add("asset", name, cls, self.origin, override)

    def add_config_dir(self, path: str | Path) -> None:
        """Add a Hydra config directory (a path, or ``pkg://package.conf``) to the search path:
        its ``connector/foo.yaml`` becomes option ``connector=foo``."""
        text = str(path)
        if not text.startswith("pkg://"):
            p = Path(text)
            if not p.is_dir():
                raise RegistrationError(f"plugin '{self.origin.plugin}' added config dir '{p}', which is not a directory")
            text = str(p.resolve())
        self._registry.config_dirs.append((text, self.origin))
