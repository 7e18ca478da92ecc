"""mmbridge: bridge modalities into large language models.

The four alignment families of "How to Bridge the Gap between Modalities" (2311.07594) are the
contracts here — :class:`Converter` and :class:`Perceiver` (both :class:`Connector`),
:class:`Tool`/:class:`ToolCaller`, and :class:`DataRecipe` — next to :class:`ModalityEncoder` and
:class:`LanguageModel`. Implementations are plugins (see :mod:`mmbridge.hookspecs`).
"""

from __future__ import annotations

from mmbridge.api import Model, TrainResult, load, train
from mmbridge.connector import Connector, Converter, Perceiver
from mmbridge.dataset import DatasetFiles, DatasetSource
from mmbridge.encoder import ModalityEncoder
from mmbridge.errors import MMBridgeError
from mmbridge.hookspecs import hookimpl
from mmbridge.inspection import inspect
from mmbridge.llm import LanguageModel
from mmbridge.recipe import DataRecipe
from mmbridge.scorer import Scorer
from mmbridge.tools import Tool, ToolCaller
from mmbridge.types import Sample, ToolCall, ToolRun

__version__ = "0.1.0"

__all__ = [
    "Connector", "Converter", "DataRecipe", "DatasetFiles", "DatasetSource", "LanguageModel",
    "MMBridgeError", "ModalityEncoder", "Perceiver", "Sample", "Scorer", "Tool", "ToolCall",
    "ToolCaller", "ToolRun", "hookimpl", "__version__",
    # the Python API (mmbridge.api)
    "Model", "TrainResult", "load", "train",
    # what the model is fed (mmbridge.inspection)
    "inspect",
]
