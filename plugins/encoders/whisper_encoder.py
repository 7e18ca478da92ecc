"""``whisper``: the audio encoder of OpenAI's Whisper (Radford et al., arXiv 2212.04356).

Front end: Whisper's own 80/128-bin log-mel spectrogram of the clip padded to 30 s (10 ms
frames), so features match what the checkpoint was trained on. The encoder's stride-2 conv
gives 50 positions per second (1500 for 30 s).

Short clips do not have to pay for 30 s: with ``trim_input`` only the clip's own frames plus
``trim_margin_s`` of the silence after it (and the two frames the convolutions look ahead) go
through the network, with the fixed positional embedding sliced to that length and attention
restricted to those positions. A clip's features then do not depend on its batch (they can
be cached per file) and the cost falls with duration. The price: positions no longer attend
to the rest of the 30 s of silence that Whisper always saw in training. On Whisper tiny.en
and real speech (1-7 s clips) the mean cosine similarity to the full 30 s run at the real
positions was 0.92-0.98 without a margin and 0.96-0.99 with the default 1 s margin (the
clip's last positions differ most).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmbridge.contracts.encoder import ModalityEncoder
from mmbridge.errors import CheckpointError, ConfigError
from mmbridge.registry import Registry
from mmbridge.utils.media_io import SAMPLE_RATE, chirp, load_audio, write_wav
from mmbridge.utils.nn_utils import masked_avg_pool

HOP_LENGTH = 160  # samples per mel frame at 16 kHz (10 ms)
CONV_LOOKAHEAD = 2  # mel frames past the clip that its last encoder position depends on


class WhisperEncoder(ModalityEncoder):
    """Whisper's audio encoder: a wav/flac clip -> ``[B, N, D]`` features at ``50 / pool`` Hz.

    Args:
        checkpoint: An openai-whisper checkpoint (``{"dims", "model_state_dict"}``): an offline
            asset name (``whisper-tiny.en``) or a file path.
        trim: Cut the output to the longest clip of the batch; ``False`` keeps Whisper's whole
            30 s window (``1500 / pool`` tokens per clip, the silence padding included, as SALMONN
            does).
        trim_input: Run the network on the clip's own frames only (needs ``trim``); a large
            speed-up for short clips.
        pool: Average this many consecutive positions into one (masked).
        trim_margin_s: With ``trim_input``, seconds of the silence after the clip that its
            positions still attend to (features stay closer to the full 30 s run).
        registry: The run's registry, which resolves an offline model name in ``checkpoint``
            (given by :func:`mmbridge.config.build.build`, never by the config; ``None`` outside a
            run: a file path only).
    """

    modality = "audio"

    def __init__(
        self,
        checkpoint: str = "whisper-tiny.en",
        trim: bool = True,
        trim_input: bool = True,
        pool: int = 1,
        trim_margin_s: float = 1.0,
        registry: Registry | None = None,
    ) -> None:
        super().__init__()
        if trim_input and not trim:
            raise ConfigError(
                "encoder.trim_input=true needs encoder.trim=true (a trimmed input "
                "cannot give the full 30 s output); set one of them differently"
            )
        if int(pool) < 1:
            raise ConfigError(f"encoder.pool: must be >= 1, got {pool}")
        if trim_margin_s < 0:
            raise ConfigError(f"encoder.trim_margin_s: must be >= 0, got {trim_margin_s}")
        self.trim, self.trim_input, self.pool = bool(trim), bool(trim_input), int(pool)
        self.margin_frames = round(float(trim_margin_s) * SAMPLE_RATE / HOP_LENGTH)
        self.checkpoint = checkpoint
        self.path = self._resolve(checkpoint, registry)
        self.encoder, self.n_mels, self.n_ctx, self._dim = self._load_encoder(self.path)
        # taken now, before any dtype/device cast, so that it names the checkpoint's weights
        self._fingerprint = _weights_sha256(self.encoder)

    # -- loading ----------------------------------------------------------------------------
    @staticmethod
    def _resolve(checkpoint: str, registry: Registry | None) -> str:
        from mmbridge.registry.assets import resolve_model_path

        path = resolve_model_path(checkpoint, registry, key="encoder.checkpoint")
        if not Path(path).is_file():
            raise CheckpointError(
                f"encoder.checkpoint: '{checkpoint}' is neither an offline model "
                f"name (see `mmbridge assets`) nor a Whisper checkpoint file"
            )
        return path

    @staticmethod
    def _load_encoder(path: str) -> tuple[torch.nn.Module, int, int, int]:
        import whisper

        try:
            model = whisper.load_model(path, device="cpu")
        except Exception as exc:  # torch.load / load_state_dict raise many kinds
            raise CheckpointError(
                f"encoder.checkpoint: cannot load Whisper checkpoint {path}: {exc}"
            ) from exc
        dims = model.dims
        return model.encoder, dims.n_mels, dims.n_audio_ctx, dims.n_audio_state

    @classmethod
    def for_testing(cls, tmp_dir: Path) -> WhisperEncoder:
        """A random 1-layer, 32-wide Whisper saved to ``tmp_dir/tiny.pt`` and loaded back."""
        from whisper.model import ModelDimensions, Whisper

        torch.manual_seed(0)
        dims = ModelDimensions(
            n_mels=80,
            n_audio_ctx=1500,
            n_audio_state=32,
            n_audio_head=2,
            n_audio_layer=1,
            n_vocab=64,
            n_text_ctx=8,
            n_text_state=32,
            n_text_head=2,
            n_text_layer=1,
        )
        path = Path(tmp_dir) / "tiny.pt"
        torch.save({"dims": dims.__dict__, "model_state_dict": Whisper(dims).state_dict()}, path)
        return cls(checkpoint=str(path))

    def example_media(self, tmp_dir: Path, index: int = 0) -> str:
        """A chirp of ``1 + 0.5 * index`` seconds at 22.05 kHz (so loading resamples)."""
        path = Path(tmp_dir) / f"chirp_{index}.wav"
        write_wav(path, chirp(1.0 + 0.5 * index, sr=22050, f0=150.0 * (index + 1)), 22050)
        return str(path)

    # -- pipeline ---------------------------------------------------------------------------
    @property
    def out_dim(self) -> int:
        return self._dim

    def load(self, path: str) -> np.ndarray:
        """Mono float32 ``[T]`` at 16 kHz."""
        return load_audio(path, SAMPLE_RATE)

    def preprocess(self, raw: np.ndarray) -> dict[str, Any]:
        """Audio ``[T]`` (16 kHz) -> ``{"mel": [n_mels, F], "n_frames": int, "n_context": int}``.

        ``F`` is 3000 (30 s); with ``trim_input`` only the clip's frames, the margin and the
        convolutions' look-ahead are kept. ``n_frames`` counts the clip's 10 ms frames,
        ``n_context`` the frames its positions attend to. Clips over 30 s are cut to 30 s.
        """
        import whisper

        audio = torch.as_tensor(np.asarray(raw, dtype=np.float32))
        full = 2 * self.n_ctx
        n_frames = max(1, min(math.ceil(audio.shape[-1] / HOP_LENGTH), full))
        mel = whisper.log_mel_spectrogram(
            whisper.pad_or_trim(audio, whisper.audio.N_SAMPLES), self.n_mels
        )
        if not self.trim_input:
            return {"mel": mel, "n_frames": n_frames, "n_context": full}
        n_context = min(n_frames + self.margin_frames, full)
        # the silence after the clip is real log-mel (Whisper's floor), as in the 30 s input
        return {
            "mel": mel[:, : min(n_context + CONV_LOOKAHEAD, full)].contiguous(),
            "n_frames": n_frames,
            "n_context": n_context,
        }

    def _positions(self, n_frames: int) -> int:
        return math.ceil(n_frames / 2) if self.trim else self.n_ctx

    def num_tokens(self, x: dict[str, Any]) -> int:
        return math.ceil(self._positions(int(x["n_frames"])) / self.pool)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad mels to the longest -> ``{"mel": [B, n_mels, F], "n_frames": [B],
        "n_context": [B]}`` (the padding is never attended to, whatever its value)."""
        f_max = max(x["mel"].shape[-1] for x in items)
        mels = [
            F.pad(x["mel"], (0, f_max - x["mel"].shape[-1]), value=float(x["mel"].min()))
            for x in items
        ]
        return {
            "mel": torch.stack(mels),
            "n_frames": torch.tensor([int(x["n_frames"]) for x in items], dtype=torch.long),
            "n_context": torch.tensor([int(x["n_context"]) for x in items], dtype=torch.long),
        }

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``{"mel": [B, n_mels, F], "n_frames": [B], "n_context": [B]}`` -> ``features [B, N, D]``
        and ``mask [B, N]``; ``N = ceil(max positions / pool)``, 50 positions per second."""
        enc = self.encoder
        mel = batch["mel"].to(enc.conv1.weight.dtype)
        x = F.gelu(enc.conv1(mel))
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)  # [B, ceil(F / 2), D]
        n_pos = x.shape[1]
        if not self.trim_input and n_pos != self.n_ctx:
            raise ValueError(
                f"whisper encoder expects {2 * self.n_ctx} mel frames, got {mel.shape[-1]}"
            )
        x = x + enc.positional_embedding[:n_pos].to(x.dtype)
        steps = torch.arange(n_pos, device=x.device)

        def half(frames: torch.Tensor) -> torch.Tensor:  # positions covering these frames
            return torch.div(frames.to(x.device) + 1, 2, rounding_mode="floor")

        real_pos = half(batch["n_frames"])
        # Trimmed input: a clip attends to its own positions (and margin) only, so that its
        # features do not depend on its batch-mates. Full input: attention over the whole 30 s,
        # exactly as Whisper was trained.
        key_mask = None
        if self.trim_input:
            key_mask = (steps < half(batch["n_context"]).unsqueeze(1))[:, None, None, :]
        for block in enc.blocks:
            x = _block(block, x, key_mask)
        x = enc.ln_post(x)
        if self.trim:
            mask = steps < real_pos.unsqueeze(1)  # [B, P]
            n_keep = int(real_pos.max())
            x, mask = x[:, :n_keep], mask[:, :n_keep]
        else:  # the whole window is content, silence included (SALMONN's use of Whisper)
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return masked_avg_pool(x, mask, self.pool)

    def cache_identity(self) -> dict[str, Any]:
        """Class, arguments and a SHA-256 of the encoder's weights (the decoder's are unused)."""
        ident = super().cache_identity()
        ident.update(
            weights_sha256=self._fingerprint,
            trim=self.trim,
            trim_input=self.trim_input,
            pool=self.pool,
            n_mels=self.n_mels,
            margin_frames=self.margin_frames,
            frontend="whisper.log_mel_spectrogram(pad_or_trim(audio_16k))",
        )
        return ident


def _weights_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _block(block: torch.nn.Module, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Whisper's ``ResidualAttentionBlock`` (self-attention only) with a key padding mask,
    which its own forward does not take. ``x [B, P, D]``, ``key_mask [B, 1, 1, P]``
    (True = attend)."""
    attn = block.attn
    h = block.attn_ln(x)
    b, p, d = h.shape
    heads = attn.n_head

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, p, heads, d // heads).transpose(1, 2)

    q, k, v = split(attn.query(h)), split(attn.key(h)), split(attn.value(h))
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    x = x + attn.out(a.transpose(1, 2).reshape(b, p, d))
    return x + block.mlp(block.mlp_ln(x))


COMPONENTS = {"encoder": {"whisper": WhisperEncoder}}
