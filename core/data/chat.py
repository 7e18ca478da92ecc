"""Conversations -> token ids, labels and placeholder slots, with the tokenizer's chat template
or a named conversation format (:mod:`mmbridge.data.conversation`).

Labels cover the assistant answers only (their end-of-turn tokens included, so the model learns
to stop); everything else is ``-100``. Each ``<image>`` / ``<audio>`` placeholder becomes
``out_tokens(N)`` slot positions that the connector's tokens later fill.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmbridge.contracts.prefix import PREFIX_SLOT
from mmbridge.contracts.types import ROLES, check_placeholders, placeholder
from mmbridge.data.conversation import (
    ConversationFormat,
    ConversationSpec,
    Rendered,
    move_media_first,
)
from mmbridge.errors import DataError

IGNORE = -100

#: Used when a tokenizer has no chat template of its own.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% elif m['role'] == 'tool' %}Tool: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def to_messages(conversations: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """LLaVA turns (``from``/``value``) -> chat messages (``role``/``content``)."""
    out = []
    for k, turn in enumerate(conversations):
        role = ROLES.get(turn.get("from", ""))
        if role is None:
            raise DataError(
                f"turn {k}: unknown role {turn.get('from')!r}; valid: {', '.join(sorted(ROLES))}"
            )
        out.append({"role": role, "content": str(turn.get("value", ""))})
    return out


@dataclass
class Encoded:
    """One tokenized sample: ``input_ids``, ``labels`` and per-position slot modality (or "").

    ``cut_labels`` counts the supervised (answer) tokens that ``max_length`` cut away; the
    labels kept are ``sum(l != IGNORE for l in labels)``.
    """

    input_ids: list[int]
    labels: list[int]
    slot_modality: list[str]
    cut_labels: int = 0

    @property
    def supervised(self) -> int:
        """Answer tokens kept (positions with a label)."""
        return sum(label != IGNORE for label in self.labels)


class ChatEncoder:
    """Renders conversations with a tokenizer's chat template and expands placeholders.

    Args:
        tokenizer: A Hugging Face tokenizer.
        modalities: The placeholders to expand (``["image"]`` -> ``<image>``).
        max_length: Longest sequence kept (``loader.max_text_tokens``). A training sample
            longer than that is cut at the end (never inside the media slots: such a sample is
            an error naming its id) and says how many answer tokens were cut
            (:attr:`Encoded.cut_labels`); a generation prompt longer than that is an error,
            since cutting it would cut the question away.
        prefix_tokens: Slots of a sequence prefix (AlignGPT), put after the start tokens.
        meta_keys: Sample metadata keys the prefix reads.
        conversation: The conversation format (``None``: ``native``, the tokenizer's chat
            template). A named format renders the text and says which characters are supervised
            (a token is supervised when it overlaps them); the text starts with the tokens the
            tokenizer adds at the start of a text (Llama's BOS), as LLaVA tokenizes.
    """

    def __init__(
        self,
        tokenizer: Any,
        modalities: Sequence[str],
        max_length: int = 512,
        prefix_tokens: int = 0,
        meta_keys: Sequence[str] = (),
        conversation: ConversationSpec | None = None,
    ) -> None:
        self.spec = conversation or ConversationSpec()
        self.format: ConversationFormat | None = self.spec.build(tokenizer, modalities)
        self.prefix_tokens = prefix_tokens
        self.meta_keys = tuple(meta_keys)
        self.tokenizer = tokenizer
        #: The Jinja chat template of the format (what an export writes): the tokenizer's own for
        #: native, else the named format's (:meth:`ConversationFormat.jinja`).
        self.template = (
            self.format.jinja()
            if self.format is not None
            else getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE
        )
        self.modalities = list(modalities)
        self.max_length = max_length
        alternatives = "|".join(re.escape(placeholder(m)) for m in self.modalities)
        self._split = re.compile(f"({alternatives})") if alternatives else None
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.start_ids = start_ids(tokenizer) if self.format is not None else []

    def with_conversation(self, conversation: ConversationSpec) -> ChatEncoder:
        """The same encoder with another conversation format (a stage's own)."""
        if conversation == self.spec:
            return self
        return ChatEncoder(
            self.tokenizer,
            self.modalities,
            self.max_length,
            self.prefix_tokens,
            self.meta_keys,
            conversation,
        )

    def prepare(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The messages as the format sees them (placeholders moved first with ``image_first``)."""
        return move_media_first(messages, self.modalities) if self.spec.image_first else messages

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The text of ``messages`` (after :meth:`prepare`), without the start tokens."""
        return self._rendered(self.prepare(messages), add_generation_prompt).text

    def _rendered(
        self, messages: list[dict[str, str]], add_generation_prompt: bool, sample_id: str = "?"
    ) -> Rendered:
        if self.format is not None:
            return self.format.render(messages, add_generation_prompt, where=f"sample {sample_id}")
        return Rendered(
            self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        )

    def _answer_spans(self, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._rendered(messages[:k], add_generation_prompt=True).text
            start = len(prompt)
            end = len(self._rendered(messages[: k + 1], add_generation_prompt=False).text)
            if text[:start] != prompt:
                raise DataError(
                    "the chat template does not render conversation prefixes as "
                    "prefixes; cannot locate the assistant answers"
                )
            spans.append((start, end))
        return spans

    def encode(
        self,
        messages: list[dict[str, str]],
        slots: Mapping[str, int | Sequence[int]],
        add_generation_prompt: bool = False,
        sample_id: str = "?",
    ) -> Encoded:
        """Tokenize; ``slots[modality]`` = how many positions its placeholder expands to, or one
        count per placeholder (a sample with several files of the modality: the k-th count is
        the k-th placeholder's, in text order).

        Raises:
            DataError: the placeholders break the rule of
                :func:`~mmbridge.contracts.types.check_placeholders`; the media slots end beyond
                ``max_length``; a generation prompt is longer than ``max_length``.
        """
        per_item = {m: [n] if isinstance(n, int) else list(n) for m, n in slots.items()}
        messages = self.prepare(messages)
        check_placeholders(
            ((m["role"], m["content"]) for m in messages),
            {m: len(v) for m, v in per_item.items()},
            self.modalities,
            f"sample {sample_id}",
        )
        seen = dict.fromkeys(per_item, 0)
        generating = add_generation_prompt and messages[-1]["role"] != "assistant"
        rendered = self._rendered(messages, add_generation_prompt, sample_id)
        text = rendered.text
        native = self.format is None
        if native:
            spans = [] if generating else self._answer_spans(messages, text)
        else:
            spans = [] if generating else rendered.spans
        ids: list[int] = list(self.start_ids)
        labels: list[int] = [IGNORE] * len(ids)
        where: list[str] = [""] * len(ids)
        pos = 0
        pieces = self._split.split(text) if self._split else [text]
        for piece in pieces:
            if not piece:
                continue
            modality = piece[1:-1] if self._split and self._split.fullmatch(piece) else None
            if modality is not None:
                if seen[modality] >= len(per_item[modality]):
                    raise DataError(
                        f"sample {sample_id}: the chat template rendered more "
                        f"{piece} placeholders than the messages hold"
                    )
                n = per_item[modality][seen[modality]]
                seen[modality] += 1
                ids += [self.pad_id] * n
                labels += [IGNORE] * n
                where += [modality] * n
            else:
                enc = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
                for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
                    c = pos + a
                    if native:  # the token starts inside an answer
                        supervised = any(s <= c < e for s, e in spans)
                    else:  # the token overlaps an answer ("▁a" after "ASSISTANT:" counts)
                        supervised = any(c < e and pos + max(b, a + 1) > s for s, e in spans)
                    ids.append(tid)
                    labels.append(tid if supervised else IGNORE)
                    where.append("")
            pos += len(piece)
        if self.prefix_tokens:
            # Right after BOS when the template starts with one (AlignGPT's position), else first.
            at = 1 if ids and ids[0] == self.tokenizer.bos_token_id else 0
            n = self.prefix_tokens
            ids[at:at] = [self.pad_id] * n
            labels[at:at] = [IGNORE] * n
            where[at:at] = [PREFIX_SLOT] * n
        cut = 0
        if len(ids) > self.max_length and generating:
            raise DataError(
                f"sample {sample_id}: the prompt is {len(ids)} tokens, longer than "
                f"loader.max_text_tokens={self.max_length}; cutting it would cut the "
                f"question away: shorten the prompt or raise loader.max_text_tokens"
            )
        if len(ids) > self.max_length:
            last_slot = max((i for i, w in enumerate(where) if w), default=-1)
            if last_slot >= self.max_length:
                raise DataError(
                    f"sample {sample_id}: media slots end at position {last_slot + 1}, "
                    f"beyond loader.max_text_tokens={self.max_length}; raise it"
                )
            cut = sum(label != IGNORE for label in labels[self.max_length :])
            ids, labels, where = (
                ids[: self.max_length],
                labels[: self.max_length],
                where[: self.max_length],
            )
        return Encoded(ids, labels, where, cut_labels=cut)


def start_ids(tokenizer: Any) -> list[int]:
    """The ids a tokenizer puts before a text's own (Llama's BOS; none for GPT-2-style ones)."""
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a")["input_ids"])
    for k in range(len(full) - len(bare) + 1):
        if full[k : k + len(bare)] == bare:
            return full[:k]
    return []
