"""mmbridge's built-in components, registered exactly like third-party plugins.

Each module listed in :data:`BUILTIN_PLUGINS` has a ``register_components(registry)`` hook
implementation; :mod:`mmbridge.registry.plugin_manager` registers them, in this order, before any
installed entry point.
"""

from __future__ import annotations

BUILTIN_PLUGINS: tuple[str, ...] = (
    "mmbridge.plugins.converters",
    "mmbridge.plugins.perceivers",
    "mmbridge.plugins.encoders",
    "mmbridge.plugins.llms",
    "mmbridge.plugins.datasets",
    "mmbridge.plugins.recipes",
    "mmbridge.plugins.tools",
    "mmbridge.plugins.scorers",
    "mmbridge.plugins.alignment",
    "mmbridge.plugins.assets",
)
