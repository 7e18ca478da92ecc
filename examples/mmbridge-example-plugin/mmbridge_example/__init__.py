"""An example third-party mmbridge plugin.

It adds a connector, ``tome_mlp`` (:class:`~mmbridge_example.token_merge.TokenMergeMLP`), and a
tool, ``unit_convert`` (:class:`~mmbridge_example.unit_convert.UnitConvertTool`), plus their
config options ``connector=tome_mlp`` and ``tools/unit_convert``. The hook that registers them
is in :mod:`mmbridge_example.plugin`; the entry point in ``pyproject.toml`` points at it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mmbridge-example-plugin")
except PackageNotFoundError:  # imported from a source tree that was not installed
    __version__ = "0+unknown"
