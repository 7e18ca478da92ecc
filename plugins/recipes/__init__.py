"""Data-Driven family (2311.07594 §3.4): recipes that turn data into training conversations."""

from __future__ import annotations

import mmbridge


@mmbridge.hookimpl
def register_components(registry) -> None:
    """Register the built-in recipes."""
    from mmbridge.plugins.recipes.caption import CaptionRecipe
    from mmbridge.plugins.recipes.conversations import ConversationsRecipe

    registry.add_recipe("caption", CaptionRecipe)
    registry.add_recipe("conversations", ConversationsRecipe)
    from mmbridge.plugins.recipes.tool_use import ToolUseRecipe

    registry.add_recipe("tool_use", ToolUseRecipe)
