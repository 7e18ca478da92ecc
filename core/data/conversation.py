"""Named conversation formats: how a conversation becomes one string, and which characters of it
are supervised.

``native`` (the default) is the tokenizer's own chat template (:class:`~mmbridge.data.chat.
ChatEncoder` renders it); the others reproduce the prompt formats of LLaVA
(haotian-liu/LLaVA, ``llava/conversation.py`` and the ``preprocess_*`` functions of
``llava/train/train.py``), written from their documented behaviour:

``plain``
    LLaVA's stage-1 format (``--version plain``): two turns, the first holding the media
    placeholder. The question is dropped: the text is the placeholder(s), the caption and
    ``"\\n"``; no system line, no roles and no end-of-sequence token. The caption and the
    ``"\\n"`` are supervised.
``vicuna_v1``
    LLaVA-1.5 (``--version v1``): ``SYSTEM USER: q ASSISTANT: a</s>USER: ...``; each answer and
    its ``</s>`` are supervised (the tokenizer's eos token stands for ``</s>``).
``llama_2``
    Llama-2-chat (LLaVA's ``llava_llama_2``): ``[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n q
    [/INST] a </s><s>[INST] ...``; answers and their ``</s>`` supervised.
``chatml``
    Standard ChatML (Qwen, SmolLM2, ...): ``<|im_start|>role\\n text<|im_end|>\\n`` per turn;
    answer + ``<|im_end|>`` supervised. LLaVA's ``mpt`` variant writes no ``"\\n"`` after
    ``<|im_end|>``; this one does, as the ChatML models were trained with.

Every format starts with what the tokenizer adds at the start of a text (Llama's BOS; nothing
for GPT-2-style tokenizers), as LLaVA's tokenization does. ``image_first`` (LLaVA's
``preprocess_multimodal``) moves the placeholders of a turn to its front, each followed by
``"\\n"``, the rest of the text stripped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmbridge.contracts.types import placeholder
from mmbridge.errors import ConfigError, DataError

#: LLaVA's ``conv_vicuna_v1`` system line.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The "
    "assistant gives helpful, detailed, and polite answers to the user's questions."
)
#: LLaVA's ``conv_llama_2`` system line (Meta's Llama-2-chat default).
LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, "
    "toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased "
    "and positive in nature.\n\nIf a question does not make any sense, or is not factually "
    "coherent, explain why instead of answering something not correct. If you don't know the "
    "answer to a question, please don't share false information."
)

#: The ``conversation.name`` options.
FORMATS = ("native", "plain", "vicuna_v1", "llama_2", "chatml")


@dataclass
class Rendered:
    """A rendered conversation: its text and the character spans ``[start, end)`` whose tokens
    are supervised (a token is supervised when it overlaps a span)."""

    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)


def move_media_first(
    messages: list[dict[str, str]], modalities: Sequence[str]
) -> list[dict[str, str]]:
    """LLaVA's ``preprocess_multimodal``: in each turn holding placeholders, remove them, strip
    the text and put them in front, each followed by ``"\\n"`` (order kept)."""
    if not modalities:
        return messages
    pattern = re.compile("|".join(re.escape(placeholder(m)) for m in modalities))
    out = []
    for m in messages:
        found = pattern.findall(m["content"])
        if found:
            rest = pattern.sub("", m["content"]).strip()
            m = {**m, "content": "".join(p + "\n" for p in found) + rest}
        out.append(m)
    return out


class ConversationFormat:
    """Base of the named formats: :meth:`render` a conversation to text and supervised spans.

    Args:
        system: The system line (``None``: the format's own default); a conversation's own
            ``system`` message replaces it.
        bos: The tokenizer's begin-of-sequence text (``llama_2`` puts it before every user
            turn after the first).
        eos: The tokenizer's end-of-sequence text (``</s>`` for Llama/Vicuna).
    """

    name = ""
    default_system: str | None = None

    def __init__(self, system: str | None = None, bos: str = "<s>", eos: str = "</s>") -> None:
        self.system = self.default_system if system is None else system
        self.bos, self.eos = bos, eos

    def _turns(
        self, messages: Sequence[Mapping[str, str]], where: str
    ) -> tuple[str | None, list[tuple[str, str]]]:
        """The system text and the (role, text) turns, LLaVA's rules applied: a first turn not
        from the user is skipped; user and assistant must alternate."""
        system = self.system
        turns = [(m["role"], m["content"]) for m in messages]
        if turns and turns[0][0] == "system":
            system, turns = turns[0][1], turns[1:]
        if turns and turns[0][0] != "user":
            turns = turns[1:]
        for k, (role, _) in enumerate(turns):
            want = "user" if k % 2 == 0 else "assistant"
            if role != want:
                raise DataError(
                    f"{where}: the {self.name} conversation format needs turns that "
                    f"alternate user / assistant (after an optional system turn); turn "
                    f"{k} is '{role}', expected '{want}'"
                )
        return system, turns

    def render(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = False,
        where: str = "sample ?",
    ) -> Rendered:
        raise NotImplementedError

    def jinja(self) -> str:
        """The same rendering as a Jinja chat template (``apply_chat_template``; an exported
        model's prompt format): string contents, the media placeholders where the text has
        them (``image_first`` is not applied)."""
        raise NotImplementedError

    def _system_jinja(self) -> str:
        """Jinja: ``fmt.system`` (the format's, or a first system turn's) and ``fmt.start``."""
        return (
            "{%- set fmt = namespace(system=" + json.dumps(self.system or "") + ", start=0) -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set fmt.system = messages[0]['content'] -%}{%- set fmt.start = 1 -%}{%- endif -%}"
            "{%- if messages | length > fmt.start and messages[fmt.start]['role'] != 'user' -%}"
            "{%- set fmt.start = fmt.start + 1 -%}{%- endif -%}"
        )


class VicunaV1(ConversationFormat):
    """LLaVA-1.5's ``vicuna_v1``: ``SYSTEM USER: q ASSISTANT: a</s>``, answers + ``</s>``
    supervised."""

    name = "vicuna_v1"
    default_system = VICUNA_SYSTEM

    def render(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = False,
        where: str = "sample ?",
    ) -> Rendered:
        system, turns = self._turns(messages, where)
        text = (system or "") + " "
        spans = []
        for k, (role, msg) in enumerate(turns):
            name = "USER" if role == "user" else "ASSISTANT"
            if not msg:  # LLaVA: an empty message renders as its role and ":" alone
                text += name + ":"
                continue
            text += name + ": "
            start = len(text)
            text += msg + (" " if k % 2 == 0 else self.eos)
            if role == "assistant":
                spans.append((start, len(text)))
        if add_generation_prompt and (not turns or turns[-1][0] == "user"):
            text += "ASSISTANT:"
        return Rendered(text, spans)

    def jinja(self) -> str:
        return (
            self._system_jinja() + "{{- fmt.system + ' ' -}}"
            "{%- for m in messages[fmt.start:] -%}"
            "{%- if m['role'] == 'user' -%}{{- 'USER: ' + m['content'] + ' ' -}}"
            "{%- else -%}{{- 'ASSISTANT: ' + m['content'] + "
            + json.dumps(self.eos)
            + " -}}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt and messages[-1]['role'] == 'user' -%}"
            "{{- 'ASSISTANT:' -}}{%- endif -%}"
        )


class Llama2(ConversationFormat):
    """Llama-2-chat (LLaVA's ``llama_2``): ``[INST] <<SYS>>...<</SYS>>\\n\\n q [/INST] a </s>``."""

    name = "llama_2"
    default_system = LLAMA_2_SYSTEM

    def render(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = False,
        where: str = "sample ?",
    ) -> Rendered:
        system, turns = self._turns(messages, where)
        text, spans = "", []
        for k, (role, msg) in enumerate(turns):
            if role == "user":
                if k == 0 and system:
                    msg = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + msg
                # LLaVA writes "<s>" before every user turn and strips the first one (the
                # tokenizer's BOS stands in for it)
                text += ("" if k == 0 else self.bos) + f"[INST] {msg} [/INST]"
            elif msg:
                text += " "
                start = len(text)
                text += f"{msg} {self.eos}"
                spans.append((start, len(text)))
        return Rendered(text, spans)  # the generation prompt ends with "[/INST]" already

    def jinja(self) -> str:
        return (
            self._system_jinja() + "{%- for m in messages[fmt.start:] -%}"
            "{%- if m['role'] == 'user' -%}"
            "{%- if loop.first -%}"
            "{%- set head = '<<SYS>>\\n' + fmt.system + '\\n<</SYS>>\\n\\n' "
            "if fmt.system else '' -%}"
            "{{- '[INST] ' + head + m['content'] + ' [/INST]' -}}"
            "{%- else -%}{{- "
            + json.dumps(self.bos)
            + " + '[INST] ' + m['content'] + ' [/INST]' -}}"
            "{%- endif -%}"
            "{%- elif m['content'] -%}{{- ' ' + m['content'] + ' ' + "
            + json.dumps(self.eos)
            + " -}}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )


class ChatML(ConversationFormat):
    """Standard ChatML: ``<|im_start|>role\\n text<|im_end|>\\n``; answer + ``<|im_end|>``
    supervised (LLaVA's ``mpt`` has no ``"\\n"`` after ``<|im_end|>``)."""

    name = "chatml"

    def render(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = False,
        where: str = "sample ?",
    ) -> Rendered:
        system = self.system
        msgs = list(messages)
        if msgs and msgs[0]["role"] == "system":
            system, msgs = msgs[0]["content"], msgs[1:]
        text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        spans = []
        for m in msgs:
            if m["role"] == "system":
                raise DataError(
                    f"{where}: a system turn after the first turn; the chatml format "
                    f"takes one, first"
                )
            text += f"<|im_start|>{m['role']}\n"
            start = len(text)
            text += m["content"] + "<|im_end|>"
            if m["role"] == "assistant":
                spans.append((start, len(text)))
            text += "\n"
        if add_generation_prompt and (not msgs or msgs[-1]["role"] != "assistant"):
            text += "<|im_start|>assistant\n"
        return Rendered(text, spans)

    def jinja(self) -> str:
        return (
            "{%- set fmt = namespace(system=" + json.dumps(self.system or "") + ", start=0) -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set fmt.system = messages[0]['content'] -%}{%- set fmt.start = 1 -%}{%- endif -%}"
            "{%- if fmt.system -%}"
            "{{- '<|im_start|>system\\n' + fmt.system + '<|im_end|>\\n' -}}{%- endif -%}"
            "{%- for m in messages[fmt.start:] -%}"
            "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}"
            "{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
        )


class Plain(ConversationFormat):
    """LLaVA's stage-1 ``plain``: the media placeholder(s), the caption and ``"\\n"``."""

    name = "plain"

    def __init__(
        self,
        system: str | None = None,
        bos: str = "<s>",
        eos: str = "</s>",
        modalities: Sequence[str] = ("image",),
    ) -> None:
        super().__init__(system, bos, eos)
        self.pattern = re.compile("|".join(re.escape(placeholder(m)) for m in modalities) or "$^")

    def render(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = False,
        where: str = "sample ?",
    ) -> Rendered:
        turns = [m for m in messages if m["role"] != "system"]
        generating = add_generation_prompt and len(turns) == 1
        if not (len(turns) == 2 or generating) or turns[0]["role"] != "user":
            raise DataError(
                f"{where}: the plain conversation format takes exactly two turns (a "
                f"user turn with the media placeholder, then the caption); this record "
                f"has {len(turns)} ({', '.join(m['role'] for m in turns)})"
            )
        media = "".join(self.pattern.findall(turns[0]["content"]))
        if not media:
            raise DataError(
                f"{where}: the plain conversation format needs a media placeholder in "
                f"the first turn (the question text is replaced by it); this record's "
                f"first turn has none"
            )
        if generating:
            return Rendered(media)
        text = media + turns[1]["content"] + "\n"
        return Rendered(text, [(len(media), len(text))])

    def jinja(self) -> str:
        pattern = self.pattern.pattern.replace("\\", "")  # "<image>|<audio>" (re.escape undone)
        return (
            "{%- for m in messages if m['role'] != 'system' -%}"
            "{%- if m['role'] == 'user' -%}"
            "{%- for p in " + json.dumps(pattern.split("|")) + " -%}"
            "{{- p * (m['content'].count(p)) -}}{%- endfor -%}"
            "{%- else -%}{{- m['content'] + '\\n' -}}{%- endif -%}"
            "{%- endfor -%}"
        )


CLASSES: dict[str, type[ConversationFormat]] = {
    "vicuna_v1": VicunaV1,
    "llama_2": Llama2,
    "chatml": ChatML,
    "plain": Plain,
}


@dataclass(frozen=True)
class ConversationSpec:
    """A ``conversation`` config node: the format's name and options."""

    name: str = "native"
    system: str | None = None
    image_first: bool = False

    @classmethod
    def from_node(
        cls, node: Mapping[str, Any] | None, key: str = "conversation"
    ) -> ConversationSpec:
        """Read a config node (``None``: native).

        Raises:
            ConfigError: an unknown format or key, naming ``key`` and what is valid.
        """
        if node is None:
            return cls()
        data = dict(node)
        unknown = sorted(set(data) - {"name", "system", "image_first"})
        if unknown:
            raise ConfigError(
                f"{key}.{unknown[0]}: not a key of a conversation format; valid: "
                f"name, system, image_first"
            )
        name = data.get("name", "native")
        if name not in FORMATS:
            raise ConfigError(
                f"{key}.name={name!r}: unknown conversation format; valid: "
                f"{', '.join(FORMATS)} (`conversation=NAME`, conf/conversation/)"
            )
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise ConfigError(f"{key}.system={system!r}: expected a string or null")
        image_first = data.get("image_first", False)
        if not isinstance(image_first, bool):
            raise ConfigError(f"{key}.image_first={image_first!r}: expected true or false")
        if name == "native" and system is not None:
            raise ConfigError(
                f"{key}.system: the native format uses the tokenizer's chat template "
                f"(a system turn in the data sets it); choose another format to set it"
            )
        return cls(name, system, image_first)

    def build(self, tokenizer: Any, modalities: Sequence[str]) -> ConversationFormat | None:
        """The format object for ``tokenizer`` (``None`` for native)."""
        if self.name == "native":
            return None
        bos = getattr(tokenizer, "bos_token", None) or "<s>"
        eos = getattr(tokenizer, "eos_token", None) or "</s>"
        if self.name == "plain":
            return Plain(self.system, bos, eos, modalities)
        return CLASSES[self.name](self.system, bos, eos)


def stage_conversation(cfg: Any, stage: str | None = None) -> tuple[ConversationSpec, str]:
    """The conversation format of ``stage`` (``stages.<stage>.conversation``, else the run's
    ``conversation``, else native) and the key it came from."""
    if stage is not None:
        node = ((cfg.get("stages") or {}).get(stage) or {}).get("conversation")
        if node is not None:
            key = f"stages.{stage}.conversation"
            return ConversationSpec.from_node(node, key), key
    return ConversationSpec.from_node(cfg.get("conversation"), "conversation"), "conversation"
