"""``aligngpt``: AlignGPT's alignment-level indicators and their gate (Zhao et al., 2405.14129).

``N`` learned indicator embeddings ``H_1..H_N`` (``H_N``: the best-aligned level, the *global*
alignment; ``H_1..H_{N-1}``: the *local* levels) make one token right after BOS; its label is
ignored (the collator's prefix slot). Per stage (``stages.<name>.prefix.mode``):

* ``level`` -- §3.2, alignment level-aware pre-training: each pair conditions on its own
  level's indicator, ``h = H_{l+1}`` with ``l = meta["align_level"]`` in ``0..N-1`` (from the
  ``align_levels`` recipe, ``N-1`` = best; a sample without a level gets ``H_N``). The indicators
  train (with the connector, as the stage says); the gate does not.
* ``gate`` -- §3.3, adaptive alignment-based instruction tuning: the indicators are frozen
  and a gate weighs the local levels per instruction, the global one always added::

      a = softmax(G(x)) in R^{N-1},     h = H_N + sum_{i<N} a_i H_i

  At inference the gate decides. ``G`` is a 2-layer GELU MLP, as in the reference code.

Variants (ablations): ``local_only`` -- ``h = sum_{i<N} a_i H_i`` (no global term);
``uniform`` -- ``h = H_N + 1/(N-1) sum_{i<N} H_i`` (equal weights instead of the gate);
``global_only`` -- ``h = H_N``.

Gate input ``x`` (two changes from the reference code, which dots each of 576 CLIP tokens with
the mean text embedding, answers included during training): the mean of the input
embeddings over the *prompt* positions, ``x = sum_t m_t e_t / sum_t m_t`` with ``m`` the
prompt mask. It holds the media tokens whatever their number (any connector, any token count)
and never the answer tokens, in training as at inference. (A connector whose tokens are not in
the sequence, Flamingo's cross-attention, leaves the gate the text prompt only.)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from mmbridge.contracts.prefix import SequencePrefix
from mmbridge.errors import ConfigError, DataError

if TYPE_CHECKING:
    from mmbridge.config.schema import Stage

MODES: tuple[str, ...] = ("level", "gate", "local_only", "uniform", "global_only")
#: Modes whose gate learns (by default, the stages running them train it).
GATED: tuple[str, ...] = ("gate", "local_only")
LEVEL_KEY = "align_level"
SETTINGS: tuple[str, ...] = ("mode", "train_indicators", "train_gate")
log = logging.getLogger(__name__)


class AlignGPTPrefix(SequencePrefix):
    """AlignGPT's alignment indicator token (one position, after BOS).

    Args:
        dim: ``D_llm`` (injected).
        levels: ``N``, the number of alignment levels (>= 2); the ``align_levels`` recipe
            follows it.
        gate_hidden: Hidden width of the gate MLP ``D -> gate_hidden -> N-1`` (reference: 256).
        mode: The mode of a stage that sets no ``prefix.mode`` (one of :data:`MODES`).

    Stage settings (``stages.<name>.prefix``): ``mode``; optionally ``train_indicators`` and
    ``train_gate`` (defaults: indicators train in ``level`` mode only, the gate in ``gate``
    and ``local_only`` modes only).
    """

    meta_keys: ClassVar[tuple[str, ...]] = (LEVEL_KEY,)

    def __init__(
        self, dim: int, levels: int = 8, gate_hidden: int = 256, mode: str = "gate"
    ) -> None:
        super().__init__(dim)
        if isinstance(levels, bool) or int(levels) < 2:
            raise ConfigError(
                f"alignment.levels: {levels!r} must be an integer >= 2 (one global level "
                f"and at least one local level)"
            )
        _check_mode(mode, "alignment.mode")
        self.levels = int(levels)
        # Xavier-uniform, as the reference code initialises its indicators.
        self.indicators = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.levels, self.dim)))
        self.gate = nn.Sequential(
            nn.Linear(self.dim, int(gate_hidden)),
            nn.GELU(),
            nn.Linear(int(gate_hidden), self.levels - 1),
        )
        self.default_mode = mode
        self.mode = mode
        self._warned = False

    @property
    def n_tokens(self) -> int:
        return 1

    def configure(self, stage: Stage) -> None:
        settings = stage.prefix or {}
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ConfigError(
                f"stages.<stage>.prefix.{unknown[0]}: not a setting of the aligngpt prefix; "
                f"valid: {', '.join(SETTINGS)}"
            )
        mode = settings.get("mode", self.default_mode)
        _check_mode(mode, "stages.<stage>.prefix.mode")
        self.mode = mode
        self.indicators.requires_grad_(bool(settings.get("train_indicators", mode == "level")))
        self.gate.requires_grad_(bool(settings.get("train_gate", mode in GATED)))

    # -- the parts ------------------------------------------------------------------------------
    def gate_weights(self, embeds: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """``a = softmax(G(x))`` ``[B, N-1]`` from the mean prompt embedding ``x`` ``[B, D]``."""
        m = prompt_mask.unsqueeze(-1).to(embeds.dtype)  # [B, T, 1]
        pooled = (embeds * m).sum(1) / m.sum(1).clamp(min=1)  # [B, D]
        logits = self.gate(pooled.to(self.indicators.dtype))
        return torch.softmax(logits.float(), dim=-1).to(self.indicators.dtype)

    def levels_of(self, batch: Mapping[str, Any], b: int, device: torch.device) -> torch.Tensor:
        """Each sample's level ``[B]`` (``-1`` -> the global level ``N-1``)."""
        meta = batch.get("meta") or {}
        lv = meta.get(LEVEL_KEY)
        if lv is None:
            lv = torch.full((b,), -1, dtype=torch.long)
        lv = lv.to(device=device, dtype=torch.long)
        bad = (lv < -1) | (lv >= self.levels)
        if bool(bad.any()):
            raise DataError(
                f"meta.{LEVEL_KEY}={int(lv[bad][0])} is outside 0..{self.levels - 1}: the "
                f"data's levels do not match alignment.levels={self.levels}"
            )
        if self.training and not self._warned and bool((lv < 0).all()):
            self._warned = True  # a stage-1 recipe that does not annotate: say so once
            log.warning(
                "aligngpt prefix in 'level' mode but the batch has no meta.%s: every sample "
                "gets the global level; use the align_levels recipe for this stage",
                LEVEL_KEY,
            )
        return torch.where(lv < 0, torch.full_like(lv, self.levels - 1), lv)

    def forward(
        self, embeds: torch.Tensor, prompt_mask: torch.Tensor, batch: Mapping[str, Any]
    ) -> torch.Tensor:
        """The indicator token ``[B, 1, D]`` of the current mode (formulas in the module doc)."""
        b = embeds.shape[0]
        h_local, h_global = self.indicators[:-1], self.indicators[-1]  # [N-1, D], [D]
        lv = a = None
        if self.mode == "level":
            lv = self.levels_of(batch, b, embeds.device)
            out = self.indicators[lv]
        elif self.mode in GATED:
            a = self.gate_weights(embeds, prompt_mask)  # [B, N-1]
            out = a @ h_local if self.mode == "local_only" else h_global + a @ h_local
        elif self.mode == "uniform":
            out = (h_global + h_local.mean(0)).expand(b, -1)
        else:  # global_only
            out = h_global.expand(b, -1)
        self.last_info = None if self.training else self._describe(b, lv, a)
        return out.unsqueeze(1)

    def _describe(
        self, b: int, lv: torch.Tensor | None, a: torch.Tensor | None
    ) -> list[dict[str, Any]]:
        """Per-sample record of a forward: mode, level or gate weights (evaluation only: it
        copies to the host, which a training step should not wait for)."""
        info: list[dict[str, Any]] = [{"mode": self.mode} for _ in range(b)]
        for d, level in zip(info, lv.tolist() if lv is not None else []):
            d["level"] = level
        for d, w in zip(info, a.float().tolist() if a is not None else []):
            d["gate"] = [round(x, 4) for x in w]
        return info


def _check_mode(mode: Any, key: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"{key}: '{mode}' is not one of {', '.join(MODES)}")


COMPONENTS = {"prefix": {"aligngpt": AlignGPTPrefix}}
