"""The Python API for notebooks and scripts: :func:`load` a trained model, :func:`train` one.

::

    import mmbridge

    run = mmbridge.train(["experiment=tiny", "stages.align.max_steps=20"])
    model = mmbridge.load(run.checkpoint, device="cpu")
    model.generate("What colour is the shape?", image="shape.png")
    model.chat([{"role": "user", "content": "What colour is the shape?"}], image="shape.png")
    model.chat([{"role": "user", "content": [{"type": "image", "image": pil_image},
                                             {"type": "text", "text": "What colour is it?"}]}])

Prompts are encoded exactly as ``mmbridge generate`` encodes them (placeholders first, the
tokenizer's chat template, left padding), so a single prompt gets the same answer. Media may be a
path, a ``PIL.Image``, a numpy array, encoded bytes, a ``data:`` URL or (audio) ``(array,
sampling_rate)`` (:mod:`mmbridge.data.inputs`): each gives the answer its file would.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from mmbridge.config import compose
from mmbridge.contracts.types import Sample, placeholder
from mmbridge.data.inputs import MediaError, MediaFiles
from mmbridge.errors import ConfigError
from mmbridge.registry import Registry
from mmbridge.registry.plugin_manager import load_registry

#: Media keyword arguments, in the order their placeholders precede a prompt.
MEDIA = ("image", "audio", "video")
#: One media item (a path, PIL image, array, bytes, data: URL, (array, sr)), or a list of them
#: (one per prompt of a batch, None where a prompt has none).
Media = Any
Messages = Sequence[Mapping[str, Any]]


def _per_row(value: Media, n: int, name: str) -> list[Any]:
    """One media item (or None) per row of a batch of ``n``: a ``list`` is per row, anything
    else (a path, an image, an array, an ``(array, sampling_rate)`` tuple) is for every row."""
    per_row = isinstance(value, list) or (
        isinstance(value, tuple) and not (len(value) == 2 and isinstance(value[1], int))
    )
    if not per_row:
        return [value] * n
    rows = list(value)
    if len(rows) != n:
        raise ConfigError(
            f"{name}=: {len(rows)} files for a batch of {n} prompts; give one per prompt"
        )
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
    def check_modality(self, modality: str) -> None:
        """Raise :class:`~mmbridge.data.inputs.MediaError` when the model has no ``modality``
        encoder."""
        if modality not in self.session.model.branches:
            raise MediaError(
                f"{modality}=...: this model has no {modality} encoder; it takes: "
                f"{', '.join(self.modalities)}"
            )

    def _sample(
        self, conversation: list[dict[str, str]], media: Mapping[str, str | list[str]], k: int
    ) -> Sample:
        for m in media:
            self.check_modality(m)
        full: dict[str, str | list[str]] = {}
        for m, value in media.items():
            paths = [value] if isinstance(value, str | Path) else list(value)
            for p in paths:
                if not Path(p).expanduser().is_file():
                    raise ConfigError(f"{m}={p}: no such file")
            resolved = [str(Path(p).expanduser().resolve()) for p in paths]
            full[m] = resolved[0] if len(resolved) == 1 else resolved
        return Sample(id=f"prompt-{k}", media=full, conversations=conversation)

    def encode(
        self,
        conversations: Sequence[list[dict[str, str]]],
        media: Sequence[Mapping[str, str | list[str]]],
    ) -> dict[str, Any]:
        """A left-padded generation batch (on the model's device) of LLaVA-style conversations
        (``from``/``value`` turns, placeholders included) and their media paths (a list where a
        conversation holds several items of a modality, in placeholder order)."""
        samples = [
            self._sample(list(c), m, k) for k, (c, m) in enumerate(zip(conversations, media))
        ]
        return self.batcher.batch(samples, generation=True)

    def _prompt_batch(
        self, prompt: str | Sequence[str], media: Mapping[str, Media], files: MediaFiles
    ) -> tuple[list, list, bool]:
        single = isinstance(prompt, str)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        rows = {m: _per_row(media.get(m), len(prompts), m) for m in MEDIA}
        convs, medias = [], []
        for k, text in enumerate(prompts):
            have = {m: rows[m][k] for m in MEDIA if rows[m][k] is not None}
            for m in have:
                self.check_modality(m)
            # as `mmbridge generate` writes it: one placeholder line per medium, then the prompt
            full = "".join(placeholder(m) + "\n" for m in have) + text
            convs.append([{"from": "human", "value": full}])
            medias.append({m: files.media(m, v) for m, v in have.items()})
        return convs, medias, single

    def conversations(
        self, batch: Sequence[Messages], media: Mapping[str, Media], files: MediaFiles
    ) -> tuple[list[list[dict[str, str]]], list[dict[str, Any]]]:
        """Chat messages (string content or content parts) and per-row media keywords -> the
        LLaVA-style turns and media files of :meth:`encode`."""
        rows = {m: _per_row(v, len(batch), m) for m, v in media.items()}
        convs, medias = [], []
        for k, msgs in enumerate(batch):
            if not msgs or msgs[-1].get("role") == "assistant":
                raise ConfigError(f"chat: conversation {k} must end with a user (or tool) turn")
            turns: list[dict[str, str]] = []
            parts: dict[str, list[str]] = {}
            for i, t in enumerate(msgs):
                if "role" not in t or "content" not in t:
                    raise MediaError(f"messages[{i}]: a message needs 'role' and 'content'")
                text, found = files.content(t["content"], f"messages[{i}]")
                turns.append({"from": str(t["role"]), "value": text})
                for m, paths in found.items():
                    parts.setdefault(m, []).extend(paths)
            have = {m: p for m in MEDIA if (p := rows.get(m, [None] * len(batch))[k]) is not None}
            if parts and have:
                raise ConfigError(
                    f"chat: conversation {k} gives media both as content parts and "
                    f"as {', '.join(have)}=; give them one way"
                )
            for m in [*parts, *have]:
                self.check_modality(m)
            first_user = next(
                (i for i, t in enumerate(turns) if t["from"] in ("user", "human")), None
            )
            for m in have:
                if not any(placeholder(m) in t["value"] for t in turns) and first_user is not None:
                    turns[first_user]["value"] = placeholder(m) + "\n" + turns[first_user]["value"]
            convs.append(turns)
            files_k: dict[str, Any] = {m: files.media(m, v) for m, v in have.items()}
            files_k.update({m: p[0] if len(p) == 1 else p for m, p in parts.items()})
            medias.append(files_k)
        return convs, medias

    def _decode(
        self, batch: dict[str, Any], max_new_tokens: int, kwargs: dict[str, Any]
    ) -> list[str]:
        new = self.session.model.generate(batch, max_new_tokens=max_new_tokens, **kwargs)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]

    # -- answering -----------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[str],
        image: Media = None,
        audio: Media = None,
        video: Media = None,
        max_new_tokens: int = 48,
        **generation_kwargs: Any,
    ) -> str | list[str]:
        """Answer a prompt about its media, as ``mmbridge generate`` does (greedy by default).

        Args:
            prompt: One prompt, or a list (a batch: then each medium is one path for all
                prompts, or a list with one path or None per prompt).
            image, audio, video: Media: a path, ``PIL.Image``, numpy array, encoded bytes,
                ``data:`` URL, or (audio) ``(array, sampling_rate)``.
            max_new_tokens: Longest answer.
            **generation_kwargs: Hugging Face generation options (``do_sample=True``,
                ``temperature=0.7``, ``num_beams=3``, ...).

        Returns:
            The answer (a list of answers for a list of prompts).
        """
        with MediaFiles() as files:
            convs, medias, single = self._prompt_batch(
                prompt, {"image": image, "audio": audio, "video": video}, files
            )
            batch = self.encode(convs, medias)
        answers = self._decode(batch, max_new_tokens, generation_kwargs)
        return answers[0] if single else answers

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        image: Media = None,
        audio: Media = None,
        video: Media = None,
        max_new_tokens: int = 48,
        **generation_kwargs: Any,
    ) -> str | list[str]:
        """The assistant's next turn after ``messages`` (``{"role", "content"}`` dicts; roles
        ``system``, ``user``, ``assistant``, ``tool``), or one per conversation of a list.

        A message's ``content`` is a string or a list of OpenAI / Hugging Face content parts
        (``{"type": "text"}``, ``{"type": "image_url", "image_url": {"url": "data:..."}}``,
        ``{"type": "input_audio"}``, ``{"type": "image", "image": PIL_or_path}``): each media part
        becomes its placeholder where it stands, the parts joined by newlines; a message may
        hold several images. Media given as ``image=`` instead go where the user turn writes
        their placeholder (``<image>``), else at the start of the first user turn.
        """
        single = bool(messages) and isinstance(messages[0], Mapping)
        # single: `messages` is one conversation (its items are turns), else a list of them
        batch = cast(list[Messages], [messages] if single else list(messages))
        with MediaFiles() as files:
            convs, medias = self.conversations(
                batch, {"image": image, "audio": audio, "video": video}, files
            )
            encoded = self.encode(convs, medias)
        answers = self._decode(encoded, max_new_tokens, generation_kwargs)
        return answers[0] if single else answers

    @torch.no_grad()
    def logits(
        self,
        prompt: str | Sequence[str],
        image: Media = None,
        audio: Media = None,
        video: Media = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits ``[B, T, V]`` over the encoded generation prompt (left padded) and
        its attention mask ``[B, T]``: what :meth:`generate`'s first step sees."""
        with MediaFiles() as files:
            convs, medias, _ = self._prompt_batch(
                prompt, {"image": image, "audio": audio, "video": video}, files
            )
            batch = self.encode(convs, medias)
        model = self.session.model
        try:
            hidden = model.llm.hidden(model.embed(batch), batch["attention_mask"])
        finally:
            model.clear_context()
        return model.llm.logits(hidden).float(), batch["attention_mask"]


def load(
    path: str | Path,
    device: str | torch.device | None = None,
    overrides: Sequence[str] = (),
    registry: Registry | None = None,
) -> Model:
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


def train(
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
    registry: Registry | None = None,
) -> TrainResult:
    """Train as ``mmbridge train OVERRIDES`` would, in this process.

    Args:
        overrides: Hydra overrides (``["experiment=tiny", "connector=linear"]``).
        run_dir: The run directory (default: ``paths.output_root/run_name/<time>``, as the CLI).
        registry: The component registry (default: built-ins and installed plugins).

    Returns:
        The run directory and its metrics (``metrics.json``).

    Raises:
        RunExistsError: ``run_dir`` holds a run, finished or started (continue it with
            ``resume=DIR`` among the overrides, or give another directory).
    """
    from mmbridge.runtime.task import run_task  # the run layer: `import mmbridge` stays light

    registry = registry or load_registry()
    overrides = list(overrides)
    cfg = compose(overrides, registry)
    if cfg.get("resume"):  # the resumed run continues in its own directory
        out = Path(str(cfg.resume))
    elif run_dir is not None:
        out = Path(run_dir)
    else:
        out = (
            Path(str(cfg.paths.output_root))
            / str(cfg.run_name)
            / time.strftime("%Y-%m-%d_%H-%M-%S")
        )
    out = (
        out.expanduser().resolve()
    )  # run_task checks it can be written (ConfigError) and creates it
    metrics = run_task(cfg, out, overrides, registry=registry, run_dir_key="run_dir")
    return TrainResult(out, metrics)
