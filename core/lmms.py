"""The lmms-eval model backend: ``lmms-eval --model mmbridge --model_args checkpoint=PATH``.

lmms-eval (the optional extra ``eval``) finds the backend through the entry-point group
``lmms_eval.models`` (:func:`manifest`, declared in ``pyproject.toml``), so its own CLI and
``simple_evaluate`` run mmbridge checkpoints with no launcher. This is the only module that
imports ``lmms_eval``.

A request's visuals (PIL images, audio dicts ``{"array", "sampling_rate"}`` or media file paths)
become the media of an mmbridge :class:`~mmbridge.contracts.types.Sample`, one item per modality,
placed before the prompt as their placeholders unless the prompt already holds them (as
``mmbridge generate`` does); in-memory visuals are written once per document to a temporary
directory, which the :class:`~mmbridge.data.batcher.Batcher` reads like any media file.
"""

from __future__ import annotations

import logging
import mimetypes
import tempfile
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lmms_eval.api.instance import GenerationResult, Instance, unwrap_generation_output
from lmms_eval.api.model import lmms
from lmms_eval.utils import Collator as RequestOrder
from PIL import Image

from mmbridge.contracts.types import Sample, placeholder
from mmbridge.data.chat import IGNORE
from mmbridge.errors import ConfigError, DataError
from mmbridge.registry.plugin_manager import load_registry

log = logging.getLogger(__name__)

#: lmms-eval generation options that mean the same to mmbridge's ``generate``; others are ignored.
GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample")
#: ``model_args`` that lmms-eval itself adds and this backend does not use.
IGNORED_ARGS = ("max_batch_size",)


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point: model id ``mmbridge`` -> :class:`MMBridgeLMM`.

    A function (lmms-eval accepts one) so that importing this module never initialises
    lmms-eval's model registry, whose initialisation imports this module in turn.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="mmbridge", simple_class_path="mmbridge.lmms.MMBridgeLMM")


class MMBridgeLMM(lmms):
    """An mmbridge checkpoint as an lmms-eval model (single process).

    Args:
        checkpoint: A checkpoint directory (``mmbridge train``'s ``checkpoint/``).
        device: Where the model runs (``cpu``, ``cuda``, ``cuda:N``; default: the trainer's
            accelerator of the checkpoint's config).
        batch_size: Requests per forward pass; requests are sorted by length first.
        max_new_tokens: Generation length for tasks whose ``generation_kwargs`` give none.

    Raises:
        ConfigError: an unknown ``model_args`` key or a ``batch_size`` that is not a number.
    """

    is_simple = True

    def __init__(
        self,
        checkpoint: str,
        device: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(kwargs) - set(IGNORED_ARGS))
        if unknown:
            raise ConfigError(
                f"lmms-eval --model_args {unknown[0]}=...: unknown to the mmbridge "
                f"backend; it takes checkpoint, device, batch_size, max_new_tokens"
            )
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise ConfigError(
                f"lmms-eval batch_size={batch_size}: the mmbridge backend takes a "
                f"number of requests per batch (no 'auto')"
            ) from None
        if self.batch_size < 1:
            raise ConfigError(f"lmms-eval batch_size={batch_size}: must be at least 1")
        self.max_new_tokens = int(max_new_tokens)

        # lmms-eval imports this module for every model it lists (the entry point): the session
        # layer (Lightning, seconds) loads only when an mmbridge model is built
        from mmbridge.runtime.session import session_from_checkpoint

        session, _ = session_from_checkpoint(
            str(checkpoint), with_data=False, registry=load_registry(), device=device
        )
        self.session = session
        self.model = session.model
        self.chat = session.chat
        self.batcher = session.batcher(use_cache=False)  # right padded: loglikelihood's rows
        self._end_of_turn = self._end_of_turn_ids()
        self._ignored: set[str] = set()

    # -- requests -> samples --------------------------------------------------------------------
    def _end_of_turn_ids(self) -> list[int]:
        """Token ids the chat template puts after an assistant message's text (e.g.
        ``<|end|>\\n``); they are supervised in training but are no part of a continuation."""
        mark = "\u2063mmbridge\u2063"
        text = self.chat.render(
            [{"role": "user", "content": "?"}, {"role": "assistant", "content": mark}]
        )
        tail = text[text.rindex(mark) + len(mark) :]
        return (
            list(self.chat.tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else []
        )

    def _media(self, visuals: Any, where: str, folder: Path) -> dict[str, str]:
        """Modality -> media file of one document's visuals (written to ``folder`` when they are
        in memory)."""
        if visuals is None:
            return {}
        items = list(visuals) if isinstance(visuals, list | tuple) else [visuals]
        media: dict[str, str] = {}
        for k, v in enumerate(items):
            if v is None:
                continue
            if isinstance(v, Image.Image):
                modality, path = "image", folder / f"{k}.png"
                v.save(path)
            elif isinstance(v, dict) and "array" in v and "sampling_rate" in v:
                modality, path = "audio", folder / f"{k}.wav"
                write_audio(path, np.asarray(v["array"]), int(v["sampling_rate"]))
            elif isinstance(v, str | Path):
                kind = (mimetypes.guess_type(str(v))[0] or "").split("/")[0]
                if kind not in ("image", "audio", "video"):
                    raise DataError(
                        f"{where}: visual {k} is {v!r}, not an image, audio or video "
                        f"file by its extension"
                    )
                modality, path = kind, Path(v)
            else:
                raise DataError(
                    f"{where}: visual {k} is a {type(v).__name__}; the mmbridge "
                    f"backend reads PIL images, audio dicts (array, sampling_rate) "
                    f"and media file paths"
                )
            if modality in media:
                raise DataError(
                    f"{where}: more than one {modality}; an mmbridge sample holds "
                    f"one item per modality"
                )
            if modality not in self.model.branches:
                raise DataError(
                    f"{where}: has {modality} input, but this checkpoint's model "
                    f"takes: {', '.join(self.model.branches)}"
                )
            media[modality] = str(path)
        return media

    def _sample(
        self,
        args: tuple,
        folder: Path,
        cache: dict[tuple, dict[str, str]],
        answer: str | None = None,
    ) -> Sample:
        """The mmbridge sample of one request: media placeholders + context as the user turn,
        ``answer`` (a continuation to score) as the assistant turn."""
        context = args[0]
        media: dict[str, str] = {}
        if len(args) >= 6:  # (context, x, doc_to_visual, doc_id, task, split); unconditional: 2
            doc_to_visual, doc_id, task, split = args[2:6]
            key = (task, split, doc_id)
            if key not in cache:
                sub = folder / str(len(cache))
                sub.mkdir()
                doc = self.task_dict[task][split][doc_id]
                cache[key] = self._media(
                    doc_to_visual(doc), f"task {task} ({split}) doc {doc_id}", sub
                )
            media = cache[key]
        text = (
            "".join(placeholder(m) + "\n" for m in media if placeholder(m) not in context) + context
        )
        turns = [{"from": "human", "value": text}]
        if answer is not None:
            turns.append({"from": "gpt", "value": answer})
        return Sample(
            id=f"{args[4]}/{args[3]}" if len(args) >= 6 else "unconditional",
            media=media,
            conversations=turns,
        )

    # -- lmms-eval API --------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or sampled, if the task asks) answers, cut at the first ``until`` string.

        Requests are grouped by their generation options, sorted longest first and answered
        ``batch_size`` at a time (left padded).
        """
        order = RequestOrder([r.args for r in requests], lambda a: -len(a[0]), grouping=True)
        out: list[str] = []
        tok = self.chat.tokenizer
        with tempfile.TemporaryDirectory(prefix="mmbridge-lmms-") as tmp:
            cache: dict[tuple, dict[str, str]] = {}
            for chunk in order.get_batched(n=self.batch_size):
                options, until = self._generation_options(chunk[0][1])
                batch = self.batcher.batch(
                    [self._sample(a, Path(tmp), cache) for a in chunk], generation=True
                )
                new = self.model.generate(batch, **options)
                out += [
                    cut_at(tok.decode(row, skip_special_tokens=True), until).strip() for row in new
                ]
        return order.get_original(out)

    def _generation_options(self, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """lmms-eval ``generation_kwargs`` -> ``(options for MultimodalModel.generate, until)``."""
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        options = {k: kw[k] for k in GENERATION_KEYS if kw.get(k) is not None}
        options.setdefault("max_new_tokens", self.max_new_tokens)
        temperature = float(options.get("temperature", 0) or 0)
        if temperature > 0:
            options.setdefault("do_sample", True)
        else:  # lmms-eval's temperature 0 means greedy
            options.pop("temperature", None)
            if not options.get("do_sample"):
                options.pop("top_p", None)
                options.pop("top_k", None)
        if int(options.get("num_beams", 1)) == 1:
            options.pop("num_beams", None)
        ignored = sorted(set(kw) - set(GENERATION_KEYS) - self._ignored)
        if ignored:
            log.warning("generation options %s are not used by the mmbridge backend", ignored)
            self._ignored |= set(ignored)
        return options, [u for u in until if u]

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[Any]:
        """``(-log P(continuation | context, visuals), whether greedy decoding gives it)``.

        The first value is the negative log-likelihood summed over the continuation's tokens:
        lmms-eval 0.7 picks a multiple-choice answer by the *smallest* first value (its own
        models return their loss there), so ``acc`` is the most probable option and
        ``acc_norm`` the most probable per character. The continuation is the assistant's
        message after the context's user turn, as in training: its leading whitespace (the
        task's ``target_delimiter``) is dropped, and the chat template's end-of-turn tokens
        after it are not scored. Each pair goes through :func:`as_response`.
        """
        args = [self._continuation(r.args) for r in requests]
        order = RequestOrder(args, lambda a: -(len(a[0]) + len(a[1])))
        out: list[tuple[float, bool]] = []
        with tempfile.TemporaryDirectory(prefix="mmbridge-lmms-") as tmp:
            cache: dict[tuple, dict[str, str]] = {}
            for chunk in order.get_batched(n=self.batch_size):
                items = []
                for a in chunk:
                    item = self.batcher.encode(
                        self._sample(a, Path(tmp), cache, answer=a[1].lstrip())
                    )
                    item["labels"] = self._continuation_labels(item["labels"], a)
                    items.append(item)
                scored = score_continuations(
                    self.model, self.batcher.to_device(self.batcher.collate(items))
                )
                out += [as_response((-lp, greedy)) for lp, greedy in scored]
        return order.get_original(out)

    def _continuation(self, args: tuple) -> tuple:
        """Request args with the continuation as a string (a task may give ``doc_to_target``)."""
        cont = args[1]
        if callable(cont):
            doc_id, task, split = args[3:6]
            cont = cont(self.task_dict[task][split][doc_id])
        return (args[0], str(cont), *args[2:])

    def _continuation_labels(self, labels: list[int], args: tuple) -> list[int]:
        """The assistant turn's labels without the end-of-turn tokens: the continuation's."""
        at = [i for i, t in enumerate(labels) if t != IGNORE]
        n = len(self._end_of_turn)
        if n and [labels[i] for i in at[-n:]] != self._end_of_turn:
            raise DataError(
                f"continuation {args[1]!r}: the chat template's end-of-turn tokens "
                f"{self._end_of_turn} do not end the encoded answer; cannot tell the "
                f"continuation's tokens apart"
            )
        keep = set(at[: len(at) - n])
        if not keep:
            raise DataError(f"continuation {args[1]!r}: no tokens to score")
        return [t if i in keep else IGNORE for i, t in enumerate(labels)]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the mmbridge lmms-eval backend does not run multi-round tasks")


def score_continuations(model: Any, batch: dict[str, Any]) -> list[tuple[float, bool]]:
    """Per row: summed log-probability of the supervised tokens and whether each is the argmax.

    Args:
        model: A :class:`~mmbridge.model.MultimodalModel`.
        batch: A right-padded batch whose ``labels [B, T]`` mark the tokens to score.

    Returns:
        ``[(logprob, is_greedy)] * B``.
    """
    try:
        embeds = model.embed(batch)  # the labels keep the answer hidden from a sequence prefix
        hidden = model.llm.hidden(embeds, batch["attention_mask"])  # [B, T, D]
    finally:
        model.clear_context()
    targets = batch["labels"][:, 1:]  # [B, T-1]: token t+1 is predicted at position t
    keep = targets != IGNORE
    logits = model.llm.logits(hidden[:, :-1][keep]).float()  # [K, V], only where scored
    picked = targets[keep]
    token_lp = F.log_softmax(logits, dim=-1).gather(-1, picked[:, None])[:, 0]  # [K]
    greedy = logits.argmax(-1) == picked  # [K]
    rows = keep.nonzero()[:, 0]  # [K]
    b = keep.shape[0]
    total = torch.zeros(b, dtype=token_lp.dtype, device=token_lp.device).index_add_(
        0, rows, token_lp
    )
    misses = torch.zeros(b, dtype=torch.long, device=rows.device).index_add_(
        0, rows, (~greedy).long()
    )
    return [(float(lp), bool(m == 0)) for lp, m in zip(total.tolist(), misses.tolist())]


def as_response(pair: tuple[float, bool]) -> Any:
    """A loglikelihood result in the form lmms-eval keeps as it is.

    lmms-eval 0.7.3's evaluator passes every model output through ``unwrap_generation_output``,
    which turns a ``(float, bool)`` tuple into its string, so that ``multiple_choice`` fails
    ("too many values to unpack"); a :class:`GenerationResult` is kept as its ``text``. Where
    the installed version keeps tuples, the tuple is returned.
    """
    if unwrap_generation_output(pair)[0] == pair:
        return pair
    return GenerationResult(text=pair)  # its text (the tuple) is passed on untouched


def cut_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string in ``until``."""
    ends = [text.find(u) for u in until if u in text]
    return text[: min(ends)] if ends else text


def write_audio(path: Path, audio: np.ndarray, sr: int) -> None:
    """An audio array ``[T]`` or ``[T, C]`` as a wav file: 32-bit float through ``soundfile``
    when it is installed (lossless), else 16-bit PCM through the standard library."""
    try:
        import soundfile
    except ImportError:
        soundfile = None
    if soundfile is not None:
        soundfile.write(str(path), audio.astype(np.float32), sr, subtype="FLOAT")
        return
    # x 32768, the inverse of the 16-bit readers' k / 32768: a clip read from 16-bit PCM round-trips
    pcm = np.clip(np.round(audio.astype(np.float64) * 32768.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1 if pcm.ndim == 1 else pcm.shape[1])
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes(pcm.tobytes())
