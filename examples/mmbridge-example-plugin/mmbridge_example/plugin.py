"""The plugin's one hook: what mmbridge calls once per run, after the built-ins.

``pyproject.toml`` points the entry point ``mmbridge-example`` (group ``mmbridge``) at this
module. Keep this module light: mmbridge imports every installed plugin each time it builds its
registry (``mmbridge plugins``, ``train``, ``config``), so heavy imports belong inside the
components' methods.
"""

from __future__ import annotations

from pathlib import Path

import mmbridge

from mmbridge_example.token_merge import TokenMergeMLP
from mmbridge_example.unit_convert import UnitConvertTool

#: conf/connector/tome_mlp.yaml -> `connector=tome_mlp`; conf/tools/unit_convert.yaml -> tools group
CONF_DIR = Path(__file__).parent / "conf"


@mmbridge.hookimpl
def register_components(registry) -> None:
    """Register the connector, the tool and the config options."""
    registry.add_connector("tome_mlp", TokenMergeMLP)
    registry.add_tool("unit_convert", UnitConvertTool)
    registry.add_config_dir(CONF_DIR)
