"""Tool Learning family (2311.07594 §3.3): tools and the callers that run them."""

from __future__ import annotations

import mmbridge


@mmbridge.hookimpl
def register_components(registry) -> None:
    """Register the built-in tools."""
    from mmbridge.plugins.tools.asr import ASRTool
    from mmbridge.plugins.tools.calculator import CalculatorTool
    from mmbridge.plugins.tools.callers import LLMToolCaller, PipelineToolCaller
    from mmbridge.plugins.tools.image_info import ImageInfoTool
    from mmbridge.plugins.tools.ocr import OCRTool

    registry.add_tool("ocr", OCRTool)
    registry.add_tool("asr", ASRTool)
    registry.add_tool("image_info", ImageInfoTool)
    registry.add_tool("calculator", CalculatorTool)
    registry.add_tool_caller("pipeline", PipelineToolCaller)
    registry.add_tool_caller("llm", LLMToolCaller)
