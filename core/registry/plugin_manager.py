"""Loading plugins: built-ins first, then every ``mmbridge`` entry point, all through one
pluggy manager that is built per run (there is no module-level global)."""

from __future__ import annotations

import importlib
import os
from importlib.metadata import EntryPoint, entry_points
from importlib.metadata import version as dist_version
from typing import Any

import pluggy

from mmbridge.errors import MMBridgeError, PluginError
from mmbridge.registry import Origin, Registrar, Registry, hookspecs

ENTRY_POINT_GROUP = hookspecs.PROJECT
#: ``1``/``all``/``*``: load no third-party plugin; ``a,b``: skip the plugins named a and b.
DISABLE_ENV = "MMBRIDGE_DISABLE_PLUGINS"


def _version() -> str:
    try:
        return dist_version("mmbridge")
    except Exception:  # running from a source tree without metadata
        return "0+unknown"


def disabled_plugins() -> tuple[bool, set[str]]:
    """``(all_disabled, names)`` read from the ``MMBRIDGE_DISABLE_PLUGINS`` variable."""
    raw = os.environ.get(DISABLE_ENV, "").strip()
    if raw.lower() in {"1", "all", "*", "true", "yes"}:
        return True, set()
    return False, {n.strip() for n in raw.split(",") if n.strip()}


def _validation_error(exc: pluggy.PluginValidationError, name: str) -> PluginError:
    return PluginError(
        f"plugin '{name}' is invalid: {exc}. The one hook is "
        f"`register_components(registry)` marked with @mmbridge.hookimpl"
    )


def build_plugin_manager(autoload: bool = True) -> tuple[pluggy.PluginManager, dict[str, Origin]]:
    """A fresh plugin manager with the built-ins and (unless switched off) the entry points.

    Returns the manager and each plugin's :class:`Origin`. Raises :class:`PluginError` naming
    the plugin when one fails to import or declares a hook that does not exist.
    """
    from mmbridge.plugins import BUILTIN_PLUGINS

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    origins: dict[str, Origin] = {}
    version = _version()

    for module_name in BUILTIN_PLUGINS:
        module = importlib.import_module(module_name)
        pm.register(module, name=module_name)
        origins[module_name] = Origin(module_name, "mmbridge", version)

    all_off, names_off = disabled_plugins()
    if autoload and not all_off:
        eps: list[EntryPoint] = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
        for ep in eps:
            if ep.name in names_off or pm.is_blocked(ep.name):
                continue
            package = ep.dist.name if ep.dist else "?"
            pversion = ep.dist.version if ep.dist else "?"
            if ep.name in origins:
                raise PluginError(
                    f"plugin name '{ep.name}' is declared by two packages: "
                    f"{origins[ep.name].package} and {package}; uninstall one, or set "
                    f"{DISABLE_ENV}={ep.name}"
                )
            try:
                plugin: Any = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin '{ep.name}' (package {package} {pversion}, entry point "
                    f"'{ep.value}') failed to import: {type(exc).__name__}: {exc}. "
                    f"Set {DISABLE_ENV}={ep.name} to run without it"
                ) from exc
            try:
                pm.register(plugin, name=ep.name)
            except pluggy.PluginValidationError as exc:
                raise _validation_error(exc, ep.name) from exc
            origins[ep.name] = Origin(ep.name, package, pversion)
            if not pm.get_hookcallers(plugin):
                raise PluginError(
                    f"plugin '{ep.name}' (package {package} {pversion}) implements no mmbridge "
                    f"hook; mark its register_components(registry) with @mmbridge.hookimpl"
                )
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        raise _validation_error(exc, name) from exc
    return pm, origins


def register_plugin(
    pm: pluggy.PluginManager,
    origins: dict[str, Origin],
    plugin: Any,
    name: str,
    package: str = "(in-process)",
    version: str = "",
) -> None:
    """Register an in-process plugin object (tests, notebooks) on an existing manager."""
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise _validation_error(exc, name) from exc
    origins[name] = Origin(name, package, version)


def fill_registry(pm: pluggy.PluginManager, origins: dict[str, Origin]) -> Registry:
    """Call every plugin's ``register_components`` with a registrar that records its name.

    Each implementation is called on its own (not through ``pm.hook``) so an error is
    attributed to the plugin that raised it.
    """
    registry = Registry()
    impls = pm.hook.register_components.get_hookimpls()
    builtin = [i for i in impls if i.plugin_name.startswith("mmbridge.plugins")]
    # Built-ins first, in their listed order; then third-party plugins by name.
    third = sorted((i for i in impls if i not in builtin), key=lambda i: i.plugin_name)
    order = {n: k for k, n in enumerate(origins)}
    for impl in sorted(builtin, key=lambda i: order.get(i.plugin_name, 0)) + third:
        origin = origins.get(impl.plugin_name, Origin(impl.plugin_name, "?", "?"))
        registrar = Registrar(registry, origin)
        try:
            impl.function(**{arg: registrar for arg in impl.argnames})
        except MMBridgeError:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin '{impl.plugin_name}' failed in register_components: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    return registry


def load_registry(autoload: bool = True, extra_plugins: dict[str, Any] | None = None) -> Registry:
    """The registry of one run: built-ins, installed plugins, and ``extra_plugins`` (name ->
    plugin object, for tests)."""
    pm, origins = build_plugin_manager(autoload=autoload)
    for name, plugin in (extra_plugins or {}).items():
        register_plugin(pm, origins, plugin, name)
    return fill_registry(pm, origins)
