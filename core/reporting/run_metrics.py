"""``metrics.json``: what one training run measured, as a typed record.

:func:`mmbridge.runtime.train.train` writes it (:meth:`RunMetrics.as_dict`); the sweep tables
(:mod:`mmbridge.reporting.results`) and the reports read it back (:meth:`RunMetrics.from_dict`). The
file stays plain JSON: keys another writer adds are kept in :attr:`RunMetrics.extra`, and a
file from an older run reads with ``None`` (not measured) where a key is missing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class StageMetrics:
    """One stage's figures (``metrics.json``'s ``stages.<name>``)."""

    #: One entry per validation: ``step``, ``val_loss``, the evaluator's figures.
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float | None = None
    #: Median step time without the warm-up steps (NaN without steps), and the samples per
    #: second it gives.
    step_time_s: float | None = None
    samples_per_s: float | None = None
    steps: int | None = None
    max_steps: int | None = None
    #: The stage's share of ``budget_minutes`` in seconds (``None``: step-based).
    budget_s: float | None = None
    rank: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageMetrics:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class PrecisionRecord:
    """The run's precision decision (``metrics.json``'s ``precision``)."""

    trainer: str = ""
    weights: str = ""
    reason: str = ""
    device: str = ""


@dataclass
class RunMetrics:
    """The whole ``metrics.json`` of a run."""

    stages: dict[str, StageMetrics] = field(default_factory=dict)
    #: The final checkpoint's directory.
    checkpoint: str = ""
    seed: int = 0
    #: ``total`` / ``trainable`` parameter counts.
    parameters: dict[str, int] = field(default_factory=dict)
    #: Tokens each connector adds per media item, by modality.
    visual_tokens: dict[str, float] = field(default_factory=dict)
    #: The feature cache's figures by modality.
    cache: dict[str, dict[str, Any]] = field(default_factory=dict)
    precision: PrecisionRecord = field(default_factory=PrecisionRecord)
    #: The test-split evaluation (:func:`mmbridge.runtime.evaluate.evaluate_session`); empty
    #: on ranks other than 0.
    test: dict[str, Any] = field(default_factory=dict)
    peak_memory_mb: float | None = None
    wall_s: float | None = None
    #: The last stage's step time and throughput.
    step_time_s: float | None = None
    samples_per_s: float | None = None
    #: The first and last validation loss over all stages (absent without validation).
    val_loss_first: float | None = None
    val_loss_last: float | None = None
    #: Keys this record does not know (another writer's), kept as they are.
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON object of ``metrics.json`` (``val_loss_*`` left out when unset)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out["stages"] = {k: asdict(v) for k, v in self.stages.items()}
        out["precision"] = asdict(self.precision)
        for k in ("val_loss_first", "val_loss_last"):
            if out[k] is None:
                del out[k]
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunMetrics:
        """A record from a ``metrics.json`` object (older files: missing keys at defaults)."""
        known = {f.name for f in fields(cls)} - {"extra"}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in known}
        stages, precision = d.get("stages") or {}, d.get("precision") or {}
        kw["stages"] = {str(k): StageMetrics.from_dict(v) for k, v in stages.items()}
        keys = {f.name for f in fields(PrecisionRecord)}
        kw["precision"] = PrecisionRecord(**{k: str(v) for k, v in precision.items() if k in keys})
        kw["extra"] = {k: v for k, v in d.items() if k not in known}
        return cls(**kw)

    def val_losses(self) -> list[float]:
        """Every validation loss of every stage, in order."""
        return [h["val_loss"] for s in self.stages.values() for h in s.history if "val_loss" in h]
