"""``asr``: speech -> text with Whisper (Radford et al., 2212.04356).

The checkpoint is resolved by :func:`mmbridge.registry.assets.resolve_model_path` with the run's
registry (an offline asset name such as ``whisper-tiny.en``, or a path to an openai-whisper ``.pt``
file) and loaded on the first call. Audio is decoded without ffmpeg
(:mod:`mmbridge.utils.media_io`) and handed to ``model.transcribe`` as a 16 kHz array.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from mmbridge.contracts.tools import Tool
from mmbridge.errors import ToolError
from mmbridge.registry import Registry


class ASRTool(Tool):
    """Automatic speech recognition with an openai-whisper checkpoint.

    Args:
        checkpoint: Asset name or path of the checkpoint (config key ``tools.asr.checkpoint``).
        language: Spoken language (``None``: English-only checkpoints use English, multilingual
            ones detect it).
        temperature: Decoding temperature; 0 decodes greedily (deterministic).
        device: Torch device of the model.
        timeout_s: Seconds a call may take (the first call also loads the model).
        registry: The run's registry, which resolves an offline model name in ``checkpoint``
            (given by :func:`mmbridge.config.build.build`, never by the config; ``None`` outside a
            run: a file path only).
    """

    name: ClassVar[str] = "asr"  # the registry sets it to the registered name
    description: ClassVar[str] = "Transcribe the speech in an audio clip to text."
    parameters: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "audio": {
                "type": "string",
                "description": 'the audio clip: "audio" for the user\'s audio',
            }
        },
        "required": ["audio"],
    }
    media_args: ClassVar[dict[str, str]] = {"audio": "audio"}

    def __init__(
        self,
        checkpoint: str = "whisper-tiny.en",
        language: str | None = None,
        temperature: float = 0.0,
        device: str = "cpu",
        timeout_s: float = 120.0,
        registry: Registry | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.language = language
        self.temperature = temperature
        self.device = device
        self.timeout_s = timeout_s
        self._registry = registry
        self._model: Any = None
        # A call that timed out may still be loading; the next one waits instead of loading twice.
        self._lock = threading.Lock()

    @property
    def model(self) -> Any:
        """The Whisper model, loaded on first use."""
        if self._model is None:
            import whisper

            from mmbridge.registry.assets import resolve_model_path

            path = resolve_model_path(self.checkpoint, self._registry, key="tools.asr.checkpoint")
            self._model = whisper.load_model(path, device=self.device)
        return self._model

    def __call__(self, audio: str, **_: Any) -> str:
        from mmbridge.errors import DataError
        from mmbridge.utils.media_io import SAMPLE_RATE, load_audio

        try:
            samples = load_audio(audio, sr=SAMPLE_RATE)
        except DataError as exc:
            raise ToolError(str(exc)) from None
        if samples.size == 0:
            return "(empty audio)"
        with self._lock:
            out = self.model.transcribe(
                samples,
                fp16=False,
                language=self.language,
                temperature=self.temperature,
                condition_on_previous_text=False,
                verbose=None,
            )
        text = str(out.get("text", "")).strip()
        return text or "(no speech found)"


COMPONENTS = {"tool": {"asr": ASRTool}}
