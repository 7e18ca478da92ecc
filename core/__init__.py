"""mmbridge: bridge modalities into large language models.

The four alignment families of "How to Bridge the Gap between Modalities" (2311.07594) are the
contracts here — :class:`Converter` and :class:`Perceiver` (both :class:`Connector`),
:class:`Tool`/:class:`ToolCaller`, and :class:`DataRecipe` — next to :class:`ModalityEncoder` and
:class:`LanguageModel`. Implementations are plugins (see :mod:`mmbridge.registry.hookspecs`).
"""

from __future__ import annotations

from mmbridge.api import Model, TrainResult, load, train
from mmbridge.contracts.connector import Connector, Converter, Perceiver
from mmbridge.contracts.dataset import DatasetFiles, DatasetSource
from mmbridge.contracts.encoder import ModalityEncoder
from mmbridge.contracts.llm import LanguageModel
from mmbridge.contracts.recipe import DataRecipe
from mmbridge.contracts.scorer import Scorer
from mmbridge.contracts.tools import Tool, ToolCaller
from mmbridge.contracts.types import Sample, ToolCall, ToolRun
from mmbridge.errors import MMBridgeError
from mmbridge.registry.hookspecs import hookimpl
from mmbridge.runtime.inspection import inspect

__version__ = "0.1.0"

__all__ = [
    "Connector",
    "Converter",
    "DataRecipe",
    "DatasetFiles",
    "DatasetSource",
    "LanguageModel",
    "MMBridgeError",
    "ModalityEncoder",
    "Perceiver",
    "Sample",
    "Scorer",
    "Tool",
    "ToolCall",
    "ToolCaller",
    "ToolRun",
    "hookimpl",
    "__version__",
    # the Python API (mmbridge.api)
    "Model",
    "TrainResult",
    "load",
    "train",
    # what the model is fed (mmbridge.runtime.inspection)
    "inspect",
]
