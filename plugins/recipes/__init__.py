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
    from mmbridge.plugins.recipes.align_levels import AlignLevelsRecipe
    from mmbridge.plugins.recipes.caption_pretrain import CaptionPretrainRecipe
    from mmbridge.plugins.recipes.instruct_mix import InstructMixRecipe

    registry.add_recipe("caption_pretrain", CaptionPretrainRecipe)
    registry.add_recipe("instruct_mix", InstructMixRecipe)
    registry.add_recipe("align_levels", AlignLevelsRecipe)
