"""Optional capability: a component that describes itself as a part of a ``transformers`` Llava.

``format=hf`` (:mod:`mmbridge.export.hf`) writes a ``LlavaForConditionalGeneration`` from three
descriptions: the vision tower (:class:`LlavaVision`, from the image encoder), the projector
(:class:`LlavaProjector`, from the connector) and the text model (:class:`LlavaText`, from the
LLM). A component offers its part with a ``llava_parts()`` method (:class:`LlavaExportable`);
one that Llava cannot compute exactly in its current settings raises
:class:`LlavaUnrepresentable` saying which setting and why. A component without the method is
not exportable as Llava. The export never looks at a component's class or private state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from torch import nn

from mmbridge.errors import ConfigError


class LlavaUnrepresentable(ConfigError):
    """Llava cannot compute this component exactly.

    Args:
        why: What Llava lacks (``"pools the patch grid"``).
        setting: The config key (below the component's own) and value responsible
            (``"pool_to=2"``), when one is.
        detail: Otherwise a short description of the component (``"depth=3, hidden_dim=64"``).
    """

    def __init__(self, why: str, setting: str | None = None, detail: str | None = None) -> None:
        super().__init__(f"{setting or detail or ''} {why}".strip())
        self.why, self.setting, self.detail = why, setting, detail


@dataclass(frozen=True)
class LlavaVision:
    """The image encoder as Llava's ``vision_tower``.

    Attributes:
        tower: The Hugging Face vision model as the encoder runs it (blocks after its last
            feature layer removed); its ``config`` describes it.
        num_hidden_layers: The blocks ``tower`` keeps (its config may still say more).
        feature_layer: ``vision_feature_layer``: a ``hidden_states`` index, or a list of them
            (concatenated along the feature axis).
        select_strategy: ``vision_feature_select_strategy``: ``default`` (the one CLS token
            dropped) or ``full``.
        image_processor: ``CLIPImageProcessor`` arguments reproducing the encoder's
            preprocessing (resize, centre crop, rescale, mean / std).
        patch_size: Pixels per patch side.
        prefix_tokens: Tokens before the patches (CLS).
        num_tokens: Image tokens the LLM sees per image.
    """

    tower: nn.Module
    num_hidden_layers: int
    feature_layer: int | list[int]
    select_strategy: Literal["default", "full"]
    image_processor: dict[str, Any]
    patch_size: int
    prefix_tokens: int
    num_tokens: int


@dataclass(frozen=True)
class LlavaProjector:
    """The connector as Llava's ``multi_modal_projector`` (``linear_1`` -> act -> ``linear_2``).

    Attributes:
        act: ``projector_hidden_act``: ``gelu``, or ``linear`` for one linear map.
        linear_1: The first linear layer.
        linear_2: The second, or ``None`` for an identity (a one-layer projector).
    """

    act: str
    linear_1: nn.Linear
    linear_2: nn.Linear | None = None


@dataclass(frozen=True)
class LlavaText:
    """The LLM as Llava's ``language_model`` + ``lm_head``.

    Attributes:
        model: The ``*ForCausalLM`` as the LLM runs it (any LoRA adapters still injected: the
            export merges them through PEFT from
            :attr:`mmbridge.contracts.llm.LanguageModel.lora_config`).
        tokenizer_path: The directory ``AutoTokenizer.from_pretrained`` reads its tokenizer from.
    """

    model: nn.Module
    tokenizer_path: str


@runtime_checkable
class LlavaExportable(Protocol):
    """A component that can describe itself as a Llava part (encoder, connector or LLM)."""

    def llava_parts(self) -> LlavaVision | LlavaProjector | LlavaText:
        """This component's Llava part; raises :class:`LlavaUnrepresentable` when its settings
        are not exactly representable."""
        ...
