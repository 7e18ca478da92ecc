"""The component registry: name -> class, per kind, with the plugin that registered it.

Built-in components declare their registration in the module that defines them, as a
module-level table ``COMPONENTS = {kind: {name: class}}``; each built-in package's one hook
collects those tables with :func:`register_package`. Registration records the name on the
:class:`Entry` and never touches the class: an instance gets its name from
:meth:`Entry.create` (tools and assets carry it, see :data:`NAMED_KINDS`).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmbridge.contracts.connector import Connector
from mmbridge.contracts.dataset import DatasetSource
from mmbridge.contracts.encoder import ModalityEncoder
from mmbridge.contracts.llm import LanguageModel
from mmbridge.contracts.prefix import SequencePrefix
from mmbridge.contracts.recipe import DataRecipe
from mmbridge.contracts.scorer import Scorer
from mmbridge.contracts.tools import Tool, ToolCaller
from mmbridge.errors import RegistrationError, unknown
from mmbridge.registry.assets import Asset

log = logging.getLogger(__name__)

#: kind -> (base class, config group the kind is chosen in)
KINDS: dict[str, tuple[type[Any], str]] = {
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

#: Kinds whose instances carry their registered name as ``.name``: a tool's is the name the LLM
#: calls it by, an asset's names its cache directory. :meth:`Entry.create` sets it.
NAMED_KINDS: frozenset[str] = frozenset({"tool", "asset"})

#: The module-level table a built-in module declares its components in, ``{kind: {name: cls}}``.
DECLARATION = "COMPONENTS"


@dataclass(frozen=True)
class Origin:
    """Who registered something: plugin name, distribution and its version."""

    plugin: str
    package: str
    version: str


#: Abbreviations whose full stop does not end a sentence.
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "approx.")


def plain_first_sentence(doc: str | None) -> str:
    """The first sentence of a docstring (over several lines if need be) without reST markup:
    ``code`` -> code, :class:`~pkg.Name` -> Name, :func:`pkg.f` -> pkg.f."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    for abbr in _ABBREVIATIONS:
        text = text.replace(abbr, abbr.replace(".", "\0"))
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    text = (match.group(1) if match else text).replace("\0", ".")
    text = re.sub(
        r":\w+:`(~?)([^`]+)`",
        lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2),
        text,
    )
    return text.replace("``", "")


@dataclass(frozen=True)
class Entry:
    """One registered component."""

    kind: str
    name: str
    cls: type[Any]
    origin: Origin
    #: Registered with ``override=True``: a later plain registration of the name does not win.
    overrides: bool = False

    @property
    def summary(self) -> str:
        """The class docstring's first sentence, whole, as plain text (``mmbridge plugins``)."""
        return plain_first_sentence(inspect.getdoc(self.cls))

    def create(self, *args: Any, **kwargs: Any) -> Any:
        """An instance of the class; for :data:`NAMED_KINDS` its ``name`` is the registered
        name (an instance attribute: the class is shared by every name it is registered as)."""
        obj = self.cls(*args, **kwargs)
        if self.kind in NAMED_KINDS:
            obj.name = self.name
        return obj


class Registry:
    """All components known to one run. Built by
    :func:`mmbridge.registry.plugin_manager.load_registry`; plugins see it only through a
    :class:`Registrar` that records their name."""

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
            raise RegistrationError(
                f"plugin '{origin.plugin}' registered a {kind} with an invalid name {name!r}"
            )
        if not (inspect.isclass(cls) and issubclass(cls, base)):
            what = (
                f"class {cls.__module__}.{cls.__qualname__}"
                if inspect.isclass(cls)
                else f"{type(cls).__name__} object {cls!r}"
            )
            raise RegistrationError(
                f"plugin '{origin.plugin}' registered {kind} '{name}' as {what}, which is not a "
                f"subclass of mmbridge.{base.__name__}; use the registry method of its kind"
            )
        if inspect.isabstract(cls):
            # ABCMeta sets __abstractmethods__ (isabstract read it); typeshed's `type` lacks it
            missing = ", ".join(sorted(cls.__abstractmethods__))  # type: ignore[attr-defined]
            raise RegistrationError(
                f"plugin '{origin.plugin}' registered {kind} '{name}' as abstract class "
                f"{cls.__qualname__} (not implemented: {missing})"
            )
        old = self._entries[kind].get(name)
        if old is not None:
            if old.overrides and not override:
                # The override was loaded first (plugins load in name order); it still wins.
                log.warning(
                    "%s '%s' of plugin '%s' is overridden by plugin '%s'",
                    kind,
                    name,
                    origin.plugin,
                    old.origin.plugin,
                )
                return
            if not override:
                raise RegistrationError(
                    f"{kind} '{name}' is registered twice: by plugin '{old.origin.plugin}' "
                    f"({old.origin.package}) and by plugin '{origin.plugin}' ({origin.package}); "
                    f"rename one, or pass override=True to replace it on purpose"
                )
            log.warning(
                "%s '%s' of plugin '%s' is overridden by plugin '%s'",
                kind,
                name,
                old.origin.plugin,
                origin.plugin,
            )
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

    def add(self, kind: str, name: str, cls: type, *, override: bool = False) -> None:
        """Register ``cls`` as ``name`` of ``kind`` (one of :data:`KINDS`); the class must
        subclass that kind's contract. The typed ``add_<kind>`` methods below call this."""
        self._registry._add(kind, name, cls, self.origin, override)

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
                raise RegistrationError(
                    f"plugin '{self.origin.plugin}' added config dir '{p}', "
                    f"which is not a directory"
                )
            text = str(p.resolve())
        self._registry.config_dirs.append((text, self.origin))


@dataclass(frozen=True)
class Declaration:
    """One row of a module's ``COMPONENTS`` table."""

    module: str
    kind: str
    name: str
    cls: type


def declarations(package: str) -> list[Declaration]:
    """Every ``COMPONENTS`` row of the public modules of ``package`` (one level deep; modules
    named ``_*`` are private helpers and are not imported), in module-name order.

    Raises:
        RegistrationError: a table that is not ``{kind: {name: class}}`` or names an unknown
            kind, naming the module.
    """
    pkg = importlib.import_module(package)
    paths = getattr(pkg, "__path__", None)
    if paths is None:
        raise RegistrationError(
            f"'{package}' is a module, not a package; register_package "
            f"collects the {DECLARATION} tables of a package's modules"
        )
    found: list[Declaration] = []
    for info in sorted(pkgutil.iter_modules(paths), key=lambda m: m.name):
        if info.name.startswith("_") or info.ispkg:
            continue
        module_name = f"{package}.{info.name}"
        table = getattr(importlib.import_module(module_name), DECLARATION, None)
        if table is None:
            continue  # a helper module that declares no component
        if not isinstance(table, Mapping) or not all(
            isinstance(v, Mapping) for v in table.values()
        ):
            raise RegistrationError(
                f"{module_name}.{DECLARATION} must be {{kind: {{name: class}}}}, got {table!r}"
            )
        for kind, by_name in table.items():
            if kind not in KINDS:
                raise RegistrationError(
                    f"{module_name}.{DECLARATION}: unknown kind {kind!r}; valid: {', '.join(KINDS)}"
                )
            found.extend(Declaration(module_name, kind, name, cls) for name, cls in by_name.items())
    return found


def register_package(registrar: Registrar, package: str) -> None:
    """Register every component that the modules of ``package`` declare in ``COMPONENTS``.

    The one hook of a built-in package is ``register_package(registry, __name__)``: adding a
    component to the package is then its class file (with its ``COMPONENTS`` row) and its YAML.
    """
    for d in declarations(package):
        registrar.add(d.kind, d.name, d.cls)
