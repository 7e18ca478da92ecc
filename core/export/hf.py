"""``format=hf``: a ``transformers`` ``LlavaForConditionalGeneration`` and its processor.

Only for models Llava computes exactly: an ``hf_vision`` tower (CLIP, SigLIP, DINOv2) read
from layers Llava can select (``vision_feature_layer``, a list concatenates as mmbridge does),
without pooling, the CLS token dropped (``default``) or kept (``full``); a ``linear`` or
two-layer ``mlp`` connector (Llava's projector; ``linear`` is ``linear_1`` with an identity
``linear_2`` and the ``linear`` activation); a causal LM, its LoRA merged by PEFT
(``merge_and_unload``). Anything else is one :class:`ConfigError` naming the part, pointing to
``format=bundle``: an export is exact or it is not written.

The tokenizer gains an ``<image>`` token (the embedding and LM head grow by one row; its
logit is suppressed in generation), the chat template is the one mmbridge trained with, and
the image processor reproduces the encoder's preprocessing (PIL resize, centre crop, mean/std).
The model is written in float32 (:func:`mmbridge.export.float32_overrides` rebuilds it so: a bf16
run's LoRA is merged without rounding); ``from_pretrained(DIR, dtype=torch.bfloat16)`` halves it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import OmegaConf
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from mmbridge.errors import ConfigError
from mmbridge.export.peft_format import peft_llm

IMAGE_TOKEN = "<image>"


#: Put before the trained chat template: a message whose content is a list of parts (as every
#: llava-hf model card and OpenAI-compatible server sends) becomes the string mmbridge trained on,
#: an ``<image>`` where each image part stands and the parts joined by newlines (as
#: :meth:`mmbridge.inputs.MediaFiles.content` renders them); string contents pass unchanged.
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
    return ConfigError(f"format=hf: {part} {why}; LlavaForConditionalGeneration cannot represent it "
                       f"exactly. Use format=bundle (any model, loads with mmbridge.load)")


def _kept_layers(enc: Any) -> int:
    """How many blocks the encoder's tower still has (it drops those after its last feature layer)."""
    top = max(enc.layers)
    return max(top, 1) if top < enc.n_layers else enc.n_layers


def check_representable(session: Any) -> dict[str, Any]:
    """The Llava settings of the model, or the error naming what Llava cannot represent."""
    model, cfg = session.model, session.cfg
    if model.prefix is not None:
        raise _refuse(f"alignment '{cfg.alignment.name}' (a learned sequence prefix)", "adds tokens Llava has no place for")
    if set(model.branches) != {"image"}:
        extra = sorted(set(model.branches) - {"image"}) or ["(no image branch)"]
        raise _refuse(f"the {', '.join(extra)} branch", "is not an image branch (Llava has one image tower)")
    branch = model.branches["image"]
    enc, con = branch.encoder, branch.connector
    key = branch.key or ""
    enc_key, con_key = f"{key + '.' if key else ''}encoder", f"{key + '.' if key else ''}connector"
    enc_name = str(OmegaConf.select(cfg, f"{enc_key}.name"))
    con_name = str(OmegaConf.select(cfg, f"{con_key}.name"))
    if type(enc).__name__ != "HFVisionEncoder":
        raise _refuse(f"{enc_key} '{enc_name}' ({type(enc).__name__})", "is not an hf_vision (transformers) tower")
    if enc.pool_to:
        raise _refuse(f"{enc_key}.pool_to={enc.pool_to}", "pools the patch grid")
    if enc.normalize_layers:
        raise _refuse(f"{enc_key}.normalize_layers=true", "standardises each layer's features, which Llava's tower does not")
    if enc.drop_cls and enc.prefix != 1:
        raise _refuse(f"{enc_key}.drop_cls=true with {enc.prefix} prefix tokens (registers)",
                      "drops more than the one CLS token Llava's 'default' strategy drops")
    if getattr(enc, "_extra", {}):
        raise _refuse(f"{enc_key}.image_size={enc.args.get('image_size')}",
                      "interpolates the position embeddings, which Llava's tower call does not ask for")
    if enc.n_layers in enc.layers:
        probe = torch.zeros(1, 3, *enc.size, device=next(enc.model.parameters()).device,
                            dtype=next(enc.model.parameters()).dtype)
        with torch.no_grad():
            out = enc.model(pixel_values=probe, output_hidden_states=True)
        if not torch.equal(out.last_hidden_state, out.hidden_states[-1]):
            raise _refuse(f"{enc_key}.feature_layer=-1 of {type(enc.model).__name__}",
                          f"is the final layer norm's output, which no vision_feature_layer selects "
                          f"(a layer 0..{enc.n_layers - 1} is)")
    if type(con).__name__ == "LinearConverter" or (type(con).__name__ == "MLPConverter" and con.depth == 1):
        act = "linear"
    elif type(con).__name__ == "MLPConverter" and con.depth == 2 and con.hidden_dim == con.out_dim:
        act = "gelu"
    else:
        detail = f"depth={con.depth}, hidden_dim={con.hidden_dim}" if type(con).__name__ == "MLPConverter" else type(con).__name__
        raise _refuse(f"{con_key} '{con_name}' ({detail})",
                      "is not Llava's projector (linear, or a 2-layer GELU MLP as wide as the LLM)")
    llm = model.llm
    if not hasattr(llm, "local_path") or not hasattr(llm, "model"):
        raise _refuse(f"llm '{cfg.llm.name}' ({type(llm).__name__})", "is not an hf_causal model")
    if getattr(llm, "gguf_file", None):
        raise _refuse(f"llm.gguf_file={llm.gguf_file}", "is a dequantised GGUF checkpoint")
    layers = [int(a) for a in enc.layers]
    return {"act": act, "layers": layers[0] if len(layers) == 1 else layers,
            "strategy": "default" if enc.drop_cls else "full", "kept": _kept_layers(enc)}


def merged_llm(llm: Any) -> Any:
    """The LLM as a plain ``*ForCausalLM``: LoRA merged by PEFT (``merge_and_unload``), or a
    copy of the fully trained / frozen model (``Any``: used through Hugging Face's duck-typed
    ``get_input_embeddings`` / ``config``, which its annotations type as a bare ``nn.Module``)."""
    if getattr(llm, "_lora", None) is not None:
        return peft_llm(llm).merge_and_unload().eval()
    return copy.deepcopy(llm.model).eval()


def _projector(con: Any, act: str, proj: Any) -> None:
    """Copy the connector's weights (a plugin's ``net`` / ``proj`` layers) into Llava's
    ``multi_modal_projector`` (``linear_1``, ``linear_2``)."""
    with torch.no_grad():
        if act == "gelu":
            first, second = con.net[0], con.net[2]
            proj.linear_1.load_state_dict(first.state_dict())
            proj.linear_2.load_state_dict(second.state_dict())
        else:
            first = con.proj if hasattr(con, "proj") else con.net[0]
            proj.linear_1.load_state_dict(first.state_dict())
            proj.linear_2.weight.copy_(torch.eye(proj.linear_2.weight.shape[0]))
            proj.linear_2.bias.zero_()


def _image_processor(enc: Any) -> Any:
    h, w = enc.size
    common: dict[str, Any] = {"do_resize": True, "resample": int(enc.resample), "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "image_mean": list(enc.mean), "image_std": list(enc.std),
              "do_convert_rgb": True}
    if enc.resize_shortest:
        return CLIPImageProcessorPil(size={"shortest_edge": int(enc.resize_shortest)}, do_center_crop=True,
                                     crop_size={"height": h, "width": w}, **common)
    return CLIPImageProcessorPil(size={"height": h, "width": w}, do_center_crop=False, **common)


def write_hf(session: Any, meta: dict[str, str], out: Path) -> dict[str, Any]:
    """Write the Llava model, tokenizer, processor and generation config into ``out``."""
    plan = check_representable(session)
    model = session.model
    enc, con, llm = model.branches["image"].encoder, model.branches["image"].connector, model.llm
    text = merged_llm(llm).to("cpu")
    tok = AutoTokenizer.from_pretrained(llm.local_path)
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
    tower = {k: v for k, v in enc.model.config.to_dict().items() if k not in ("out_features", "out_indices")}
    vision_config = enc.model.config.__class__.from_dict({**tower, "num_hidden_layers": plan["kept"]})
    # image_token_id: an alias of image_token_index (LlavaConfig.attribute_map), not in the signature
    config = LlavaConfig(vision_config=vision_config, text_config=text.config, image_token_id=image_id,  # type: ignore[call-arg]
                         projector_hidden_act=plan["act"], vision_feature_layer=plan["layers"],
                         vision_feature_select_strategy=plan["strategy"], multimodal_projector_bias=True,
                         image_seq_length=enc.num_tokens(None),
                         tie_word_embeddings=bool(getattr(text.config, "tie_word_embeddings", False)))
    dtype = next(text.parameters()).dtype
    with torch.device("cpu"):
        llava = LlavaForConditionalGeneration(config).to(dtype).eval()
    with torch.no_grad():
        llava.model.vision_tower.load_state_dict({k: v.to("cpu") for k, v in enc.model.state_dict().items()})
        llava.model.language_model.load_state_dict(text.get_decoder().state_dict())
        llava.lm_head.load_state_dict(text.get_output_embeddings().state_dict())
        _projector(con, plan["act"], llava.model.multi_modal_projector)
    llava.generation_config = text.generation_config
    llava.generation_config.update(pad_token_id=tok.pad_token_id, eos_token_id=llm.tokenizer.eos_token_id,
                                   suppress_tokens=[image_id])
    llava.save_pretrained(str(out))
    processor = LlavaProcessor(image_processor=_image_processor(enc), tokenizer=tok, patch_size=enc.patch,
                               vision_feature_select_strategy=plan["strategy"], image_token=IMAGE_TOKEN,
                               num_additional_image_tokens=enc.prefix, chat_template=template)
    processor.save_pretrained(str(out))
    return {"format": "hf", "architecture": "LlavaForConditionalGeneration", "image_token_id": image_id,
            "vision_feature_layer": plan["layers"], "vision_feature_select_strategy": plan["strategy"],
            "projector_hidden_act": plan["act"], "lora_merged": getattr(llm, "_lora", None) is not None,
            "image_tokens": enc.num_tokens(None),
            "card": ["## Notes", "",
                     f"`{IMAGE_TOKEN}` was added to the tokenizer (id {image_id}); its logit is "
                     f"suppressed in generation. Prompts are the chat template mmbridge trained with, "
                     f"`{IMAGE_TOKEN}` + newline first in the user turn.", ""]}
