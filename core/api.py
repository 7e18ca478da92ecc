"""The Python API for notebooks and scripts: :func:`load` a trained model, :func:`train` one.

::

    import mmbridge

    run = mmbridge.train(["experiment=tiny", "stages.align.max_steps=20"])
    model = mmbridge.load(run.checkpoint, device="cpu")
    model.generate("What colour is the shape?", image="shape.png")
    model.chat([{"role": "user", "content": "What colour is the shape?"}], image="shape.png")

Prompts are encoded exactly as ``mmbridge generate`` encodes them (placeholders first, the
tokenizer's chat template, left padding), so a single prompt gets the same answer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from mmbridge.errors import ConfigError
from mmbridge.registry import Registry
from mmbridge.types import Sample, placeholder

#: Media keyword arguments, in the order their placeholders precede a prompt.
MEDIA = ("image", "audio", "video")
Media = str | Path | Sequence[str | Path | None] | None
Messages = Sequence[Mapping[str, str]]


def _per_row(value: Media, n: int, name: str) -> list[str | None]:
    """One media path (or None) per row of a batch of ``n``."""
    if value is None or isinstance(value, str | Path):
        return [None if value is None else str(value)] * n
    rows = [None if v is None else str(v) for v in value]
    if len(rows) != n:
        raise ConfigError(f"{name}=: {len(rows)} files for a batch of {n} prompts; give one per prompt")
    return rows


class Model:
    """A trained mmbridge model, ready to answer (made by :func:`load`).

    Attributes:
        session: The rebuilt run session (``.model``, ``.chat``, ``.cfg``, ``.device``).
        meta: The checkpoint metadata (stages, components).
    """

    def __init__(self, session: Any, meta: dict[str, str], path: Path) -> None:
        self.session = session
        self.meta = meta
        self.path = path
        #: Prompts -> generation batches on the model's device (no feature cache: media are
        #: read live).
        self.batcher = session.batcher(use_cache=False)

    @property
    def modalities(self) -> list[str]:
        """The media this model takes (``["image"]``, ``["audio", "image"]``, ...)."""
        return list(self.session.model.branches)

    @property
    def tokenizer(self) -> Any:
        return self.session.chat.tokenizer

    # -- encoding ------------------------------------------------------------------------------
    def _sample(self, conversation: list[dict[str, str]], media: dict[str, str], k: int) -> Sample:
        missing = [m for m in media if m not in self.session.model.branches]
        if missing:
            raise ConfigError(f"{missing[0]}=...: this model has no {missing[0]} encoder; it takes: "
                              f"{', '.join(self.modalities)}")
        for m, p in media.items():
            if not Path(p).expanduser().is_file():
                raise ConfigError(f"{m}={p}: no such file")
        media = {m: str(Path(p).expanduser().resolve()) for m, p in media.items()}
        return Sample(id=f"prompt-{k}", media=media, conversations=conversation)

    def encode(self, conversations: Sequence[list[dict[str, str]]],
               media: Sequence[dict[str, str]]) -> dict[str, Any]:
        """A left-padded generation batch (on the model's device) of LLaVA-style conversations
        (``from``/``value`` turns, placeholders included) and their media paths."""
        samples = [self._sample(list(c), dict(m), k) for k, (c, m) in enumerate(zip(conversations, media))]
        return self.batcher.batch(samples, generation=True)

    def _prompt_batch(self, prompt: str | Sequence[str], media: Mapping[str, Media]) -> tuple[list, list, bool]:
        single = isinstance(prompt, str)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        rows = {m: _per_row(media.get(m), len(prompts), m) for m in MEDIA}
        convs, medias = [], []
        for k, text in enumerate(prompts):
            have = {m: rows[m][k] for m in MEDIA if rows[m][k] is not None}
            # as `mmbridge generate` writes it: one placeholder line per medium, then the prompt
            full = "".join(placeholder(m) + "\n" for m in have) + text
            convs.append([{"from": "human", "value": full}])
            medias.append(have)
        return convs, medias, single

    def _decode(self, batch: dict[str, Any], max_new_tokens: int, kwargs: dict[str, Any]) -> list[str]:
        new = self.session.model.generate(batch, max_new_tokens=max_new_tokens, **kwargs)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]

    # -- answering -----------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[str], image: Media = None, audio: Media = None,
                 video: Media = None, max_new_tokens: int = 48, **generation_kwargs: Any) -> str | list[str]:
        """Answer a prompt about its media, as ``mmbridge generate`` does (greedy by default).

        Args:
            prompt: One prompt, or a list (a batch: then each medium is one path for all
                prompts, or a list with one path or None per prompt).
            image, audio, video: Media file paths.
            max_new_tokens: Longest answer.
            **generation_kwargs: Hugging Face generation options (``do_sample=True``,
                ``temperature=0.7``, ``num_beams=3``, ...).

        Returns:
            The answer (a list of answers for a list of prompts).
        """
        convs, medias, single = self._prompt_batch(prompt, {"image": image, "audio": audio, "video": video})
        answers = self._decode(self.encode(convs, medias), max_new_tokens, generation_kwargs)
        return answers[0] if single else answers

    def chat(self, messages: Messages | Sequence[Messages], image: Media = None, audio: Media = None,
             video: Media = None, max_new_tokens: int = 48, **generation_kwargs: Any) -> str | list[str]:
        """The assistant's next turn after ``messages`` (``{"role", "content"}`` dicts; roles
        ``system``, ``user``, ``assistant``, ``tool``), or one per conversation of a list.

        A medium's placeholder (``<image>``) may be written in a user turn; where it is not,
        it is put at the start of the first user turn.
        """
        single = bool(messages) and isinstance(messages[0], Mapping)
        # single: `messages` is one conversation (its items are turns), else a list of them
        batch = cast(list[Messages], [messages] if single else list(messages))
        rows = {m: _per_row(v, len(batch), m) for m, v in (("image", image), ("audio", audio), ("video", video))}
        convs, medias = [], []
        for k, msgs in enumerate(batch):
            if not msgs or msgs[-1].get("role") == "assistant":
                raise ConfigError(f"chat: conversation {k} must end with a user (or tool) turn")
            have = {m: p for m in MEDIA if (p := rows[m][k]) is not None}
            turns = [{"from": str(t["role"]), "value": str(t["content"])} for t in msgs]
            first_user = next((i for i, t in enumerate(turns) if t["from"] in ("user", "human")), None)
            for m in have:
                if not any(placeholder(m) in t["value"] for t in turns) and first_user is not None:
                    turns[first_user]["value"] = placeholder(m) + "\n" + turns[first_user]["value"]
            convs.append(turns)
            medias.append(have)
        answers = self._decode(self.encode(convs, medias), max_new_tokens, generation_kwargs)
        return answers[0] if single else answers

    @torch.no_grad()
    def logits(self, prompt: str | Sequence[str], image: Media = None, audio: Media = None,
               video: Media = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits ``[B, T, V]`` over the encoded generation prompt (left padded) and
        its attention mask ``[B, T]``: what :meth:`generate`'s first step sees."""
        convs, medias, _ = self._prompt_batch(prompt, {"image": image, "audio": audio, "video": video})
        batch = self.encode(convs, medias)
        model = self.session.model
        try:
            hidden = model.llm.hidden(model.embed(batch), batch["attention_mask"])
        finally:
            model.clear_context()
        return model.llm.logits(hidden).float(), batch["attention_mask"]


def load(path: str | Path, device: str | torch.device | None = None, overrides: Sequence[str] = (),
         registry: Registry | None = None) -> Model:
    """Load a trained model: a run's ``checkpoints/final`` (or its weights file) or a
    ``format=bundle`` export.

    Args:
        path: The checkpoint or bundle.
        device: ``cpu``, ``cuda``, ``cuda:N`` (default: the config's ``device``, else CUDA when
            available).
        overrides: ``key=value`` changes to the stored config (e.g. ``llm.dtype=float32``).
        registry: The component registry (default: built-ins and installed plugins).
    """
    from mmbridge.export.source import open_model

    session, meta = open_model(path, list(overrides), registry=registry, device=device)
    return Model(session, meta, Path(path).expanduser())


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def checkpoint(self) -> Path:
        """The final checkpoint (``checkpoints/final``): pass it to :func:`load`."""
        return self.run_dir / "checkpoints" / "final"


def train(overrides: Sequence[str] = (), run_dir: str | Path | None = None,
          registry: Registry | None = None) -> TrainResult:
    """Train as ``mmbridge train OVERRIDES`` would, in this process.

    Args:
        overrides: Hydra overrides (``["experiment=tiny", "connector=linear"]``).
        run_dir: The run directory (default: ``paths.output_root/run_name/<time>``, as the CLI).
        registry: The component registry (default: built-ins and installed plugins).

    Returns:
        The run directory and its metrics (``metrics.json``).
    """
    from mmbridge.commands.train import run_task
    from mmbridge.config import compose
    from mmbridge.plugin_manager import load_registry

    registry = registry or load_registry()
    overrides = list(overrides)
    cfg = compose(overrides, registry)
    if cfg.get("resume"):  # the resumed run continues in its own directory
        out = Path(str(cfg.resume))
    elif run_dir is not None:
        out = Path(run_dir)
    else:
        out = Path(str(cfg.paths.output_root)) / str(cfg.run_name) / time.strftime("%Y-%m-%d_%H-%M-%S")
    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    metrics = run_task(cfg, out, overrides, registry=registry)
    return TrainResult(out, metrics)
