"""The one hook of mmbridge's plugin API.

A plugin is a module (or object) with a function marked ``@mmbridge.hookimpl``::

    import mmbridge

    @mmbridge.hookimpl
    def register_components(registry):
        registry.add_connector("my_connector", MyConnector)
        registry.add_config_dir(Path(__file__).parent / "conf")

and an entry point in the ``mmbridge`` group of its ``pyproject.toml``::

    [project.entry-points.mmbridge]
    my_plugin = "my_package.plugin"

mmbridge's built-in packages implement the same hook with one line,
``register_package(registry, __name__)`` (:mod:`mmbridge.registry`), which registers the
``COMPONENTS = {kind: {name: class}}`` table each of their modules declares.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from mmbridge.registry import Registrar

PROJECT = "mmbridge"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_components(registry: Registrar) -> None:
    """Register components with the typed ``registry.add_*`` methods; return nothing."""
