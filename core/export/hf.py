"""``format=hf``: a ``transformers`` ``LlavaForConditionalGeneration`` and its processor.

Only for models Llava computes exactly. Each component describes its own part through the
optional ``llava_parts()`` capability (:mod:`mmbridge.contracts.llava_parts`): among the built-ins,
an ``hf_vision`` tower (CLIP, SigLIP, DINOv2) read from layers Llava can select
(``vision_feature_layer``, a list concatenates as mmbridge does), without pooling, the CLS token
dropped (``default``) or kept (``full``); a ``linear`` or two-layer ``mlp`` connector (Llava's
projector; a one-layer one gets an identity ``linear_2``); an ``hf_causal`` LM, its LoRA merged
by PEFT (``merge_and_unload``). Anything else is one :class:`ConfigError` naming the part,
pointing to ``format=bundle``: an export is exact or it is not written.

The tokenizer gains an ``<image>`` token (the embedding and LM head grow by one row; its
logit is suppressed in generation), the chat template is the one mmbridge trained with, and
the image processor reproduces the encoder's preprocessing (PIL resize, centre crop, mean/std).
The model is written in float32 (:func:`mmbridge.export.float32_overrides` rebuilds it so: a bf16
run's LoRA is merged without rounding); ``from_pretrained(DIR, dtype=torch.bfloat16)`` halves it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from mmbridge.config.model_spec import branch_at, node_at, nodes_of
from mmbridge.contracts.llava_parts import (
    LlavaProjector,
    LlavaText,
    LlavaUnrepresentable,
    LlavaVision,
)
from mmbridge.errors import ConfigError
from mmbridge.export.peft_format import peft_llm

IMAGE_TOKEN = "<image>"


#: Put before the trained chat template: a message whose content is a list of parts (as every
#: llava-hf model card and OpenAI-compatible server sends) becomes the string mmbridge trained on,
#: an ``<image>`` where each image part stands and the parts joined by newlines (as
#: :meth:`mmbridge.data.inputs.MediaFiles.content` renders them); string contents pass unchanged.
PARTS_PREAMBLE = (
    "{%- set ns = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string or message['content'] is none -%}"
    "{%- set ns.messages = ns.messages + [message] -%}"
    "{%- else -%}"
    "{%- set parts = namespace(text=[]) -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{%- set parts.text = parts.text + [part['text']] -%}"
    "{%- elif part['type'] in ['image', 'image_url'] -%}"
    "{%- set parts.text = parts.text + ['" + "<image>" + "'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set ns.messages = ns.messages + [dict(message, content=parts.text | join('\\n'))] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.messages -%}"
)


def parts_template(template: str) -> str:
    """``template`` taking content parts as well as strings (see :data:`PARTS_PREAMBLE`)."""
    return PARTS_PREAMBLE + template


def _refuse(part: str, why: str) -> ConfigError:
    return ConfigError(
        f"format=hf: {part} {why}; LlavaForConditionalGeneration cannot represent it "
        f"exactly. Use format=bundle (any model, loads with mmbridge.load)"
    )


@dataclass(frozen=True)
class LlavaPlan:
    """The three parts of the model as Llava holds them (:mod:`mmbridge.contracts.llava_parts`)."""

    vision: LlavaVision
    projector: LlavaProjector
    text: LlavaText
    lora: bool  # the LLM carries LoRA adapters (merged by PEFT on export)


def _part(component: Any, kind: type, where: str, name: str, role: str) -> Any:
    """A component's Llava part, or the error naming the component (and its setting)."""
    describe = getattr(component, "llava_parts", None)
    if describe is None:
        raise _refuse(
            f"{where} '{name}' ({type(component).__name__})",
            f"has no Llava {role} (its class offers no llava_parts())",
        )
    try:
        part = describe()
    except LlavaUnrepresentable as exc:
        what = f"{where}.{exc.setting}" if exc.setting else f"{where} '{name}' ({exc.detail})"
        raise _refuse(what, exc.why) from None
    if not isinstance(part, kind):
        raise _refuse(
            f"{where} '{name}' ({type(component).__name__})",
            f"describes itself as a {type(part).__name__}, not a Llava {role}",
        )
    return part


def check_representable(session: Any) -> LlavaPlan:
    """The model's Llava parts, or the error naming what Llava cannot represent."""
    model, cfg = session.model, session.run.model  # the model's nodes: model_spec.ModelConfig
    if model.prefix is not None:
        (prefix,) = nodes_of(cfg, "prefix")
        raise _refuse(
            f"{prefix.key} '{node_at(cfg, prefix.key)['name']}' (a learned sequence prefix)",
            "adds tokens Llava has no place for",
        )
    if set(model.branches) != {"image"}:
        extra = sorted(set(model.branches) - {"image"}) or ["(no image branch)"]
        raise _refuse(
            f"the {', '.join(extra)} branch", "is not an image branch (Llava has one image tower)"
        )
    branch = model.branches["image"]
    spec = branch_at(cfg, branch.key)  # its config keys: mmbridge.config.model_spec
    enc_key, con_key = spec.encoder.key, spec.connector.key
    vision = _part(
        branch.encoder,
        LlavaVision,
        enc_key,
        str(node_at(cfg, f"{enc_key}.name")),
        "vision tower",
    )
    projector = _part(
        branch.connector,
        LlavaProjector,
        con_key,
        str(node_at(cfg, f"{con_key}.name")),
        "projector",
    )
    (llm,) = nodes_of(cfg, "llm")
    text = _part(model.llm, LlavaText, llm.key, str(node_at(cfg, f"{llm.key}.name")), "text model")
    return LlavaPlan(vision, projector, text, lora=model.llm.lora_config is not None)


def merged_llm(llm: Any, text: LlavaText, lora: bool) -> Any:
    """The LLM as a plain ``*ForCausalLM``: LoRA merged by PEFT (``merge_and_unload``), or a
    copy of the fully trained / frozen model (``Any``: used through Hugging Face's duck-typed
    ``get_input_embeddings`` / ``config``, which its annotations type as a bare ``nn.Module``)."""
    if lora:
        return peft_llm(llm).merge_and_unload().eval()
    return copy.deepcopy(text.model).eval()


def _projector(part: LlavaProjector, proj: Any) -> None:
    """Copy the connector's layers into Llava's ``multi_modal_projector``; a one-layer
    projector gets an identity ``linear_2``."""
    with torch.no_grad():
        proj.linear_1.load_state_dict(part.linear_1.state_dict())
        if part.linear_2 is not None:
            proj.linear_2.load_state_dict(part.linear_2.state_dict())
        else:
            proj.linear_2.weight.copy_(torch.eye(proj.linear_2.weight.shape[0]))
            proj.linear_2.bias.zero_()


def write_hf(session: Any, meta: dict[str, str], out: Path) -> dict[str, Any]:
    """Write the Llava model, tokenizer, processor and generation config into ``out``."""
    plan = check_representable(session)
    vision, llm = plan.vision, session.model.llm
    text = merged_llm(llm, plan.text, plan.lora).to("cpu")
    tok = AutoTokenizer.from_pretrained(plan.text.tokenizer_path)
    template = parts_template(session.chat.template)  # what mmbridge trained with, + parts
    tok.chat_template = template
    if tok.pad_token is None:
        tok.pad_token = llm.tokenizer.pad_token
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = cast(int, tok.convert_tokens_to_ids(IMAGE_TOKEN))  # one token: one id
    vocab = text.get_input_embeddings().weight.shape[0]
    if image_id >= vocab:
        text.resize_token_embeddings(image_id + 1, mean_resizing=False)
        with torch.no_grad():
            text.get_input_embeddings().weight[vocab:] = 0
            head = text.get_output_embeddings()
            if head.weight.data_ptr() != text.get_input_embeddings().weight.data_ptr():
                head.weight[vocab:] = 0
    # the tower as mmbridge runs it: the blocks after its last feature layer are gone (and a
    # backbone's stage selection, which names them, with them)
    tower_config = cast(Any, vision.tower).config
    tower = {
        k: v for k, v in tower_config.to_dict().items() if k not in ("out_features", "out_indices")
    }
    vision_config = tower_config.__class__.from_dict(
        {**tower, "num_hidden_layers": vision.num_hidden_layers}
    )
    # image_token_id: an alias of image_token_index (LlavaConfig.attribute_map), not in the
    # signature
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text.config,
        image_token_id=image_id,  # type: ignore[call-arg]
        projector_hidden_act=plan.projector.act,
        vision_feature_layer=vision.feature_layer,
        vision_feature_select_strategy=vision.select_strategy,
        multimodal_projector_bias=True,
        image_seq_length=vision.num_tokens,
        tie_word_embeddings=bool(getattr(text.config, "tie_word_embeddings", False)),
    )
    dtype = next(text.parameters()).dtype
    with torch.device("cpu"):
        llava = LlavaForConditionalGeneration(config).to(dtype).eval()
    with torch.no_grad():
        llava.model.vision_tower.load_state_dict(
            {k: v.to("cpu") for k, v in vision.tower.state_dict().items()}
        )
        llava.model.language_model.load_state_dict(text.get_decoder().state_dict())
        llava.lm_head.load_state_dict(text.get_output_embeddings().state_dict())
        _projector(plan.projector, llava.model.multi_modal_projector)
    llava.generation_config = text.generation_config
    llava.generation_config.update(
        pad_token_id=tok.pad_token_id,
        eos_token_id=llm.tokenizer.eos_token_id,
        suppress_tokens=[image_id],
    )
    llava.save_pretrained(str(out))
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(**vision.image_processor),
        tokenizer=tok,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=vision.select_strategy,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=vision.prefix_tokens,
        chat_template=template,
    )
    processor.save_pretrained(str(out))
    return {
        "format": "hf",
        "architecture": "LlavaForConditionalGeneration",
        "image_token_id": image_id,
        "vision_feature_layer": vision.feature_layer,
        "vision_feature_select_strategy": vision.select_strategy,
        "projector_hidden_act": plan.projector.act,
        "lora_merged": plan.lora,
        "image_tokens": vision.num_tokens,
        "card": [
            "## Notes",
            "",
            f"`{IMAGE_TOKEN}` was added to the tokenizer (id {image_id}); its logit is "
            f"suppressed in generation. Prompts are the chat template mmbridge trained with, "
            f"`{IMAGE_TOKEN}` + newline first in the user turn; content parts "
            f'(`{{"type": "image"}}`, text) render the same way.',
            "",
            "The processor reproduces mmbridge's preprocessing exactly with "
            '`AutoProcessor.from_pretrained(DIR, backend="pil")`. The default backend '
            "(torchvision, whenever it is installed: transformers offers no saved setting "
            "to choose PIL) resizes with its own bicubic filter, up to one 8-bit level "
            "away; images already at the tower's input size get identical pixels.",
            "",
        ],
    }
