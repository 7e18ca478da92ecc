"""The LightningModule: receives an assembled model and a stage config; picks nothing itself."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer

from mmbridge.config.schema import Stage
from mmbridge.model import MultimodalModel
from mmbridge.model.precision import keep_trained_fp32
from mmbridge.training.optimizers import make_optimizer, param_groups
from mmbridge.training.resume import rng_state, set_rng_state


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def progress_warmup_cosine(progress: float, warmup_ratio: float, min_ratio: float) -> float:
    """LR multiplier at ``progress`` in [0, 1] of the stage: linear warm-up over the first
    ``warmup_ratio`` (from 1 %, so the first step learns), then cosine decay to ``min_ratio``."""
    progress = min(1.0, max(0.0, progress))
    if warmup_ratio > 0 and progress < warmup_ratio:
        return max(progress / warmup_ratio, 0.01)
    rest = (progress - warmup_ratio) / max(1e-9, 1 - warmup_ratio)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, rest)))


class BridgeModule(L.LightningModule):
    """Trains the parameters of ``model`` that require grad, with the stage's optimiser.

    Args:
        model: The assembled model, already frozen/unfrozen for the stage.
        stage: The stage (``optimizer``, ``max_steps``).
        evaluator: Optional callable ``(model) -> dict[str, float]`` run after each validation
            (the generation-based exact match on question answering).
    """

    def __init__(self, model: MultimodalModel, stage: Stage, evaluator: Any = None) -> None:
        super().__init__()
        self.model = model
        self.stage = stage
        self.evaluator = evaluator
        self.history: list[dict[str, float]] = []
        self._t_step = 0.0
        self.step_times: list[float] = []
        self.samples_seen = 0
        self.seen_ids: list[str] | None = None  # a list when recording (debug)
        self._rng_to_restore: dict[str, Any] | None = (
            None  # from a checkpoint, until training starts
        )
        #: Seconds of training under a time budget (the LR schedule follows it); None: steps.
        self.time_budget_s: float | None = None
        #: Steps the LR schedule spans: the Trainer's ``max_steps`` once attached (:meth:`setup`).
        self.total_steps = int(stage.max_steps or 1)
        # Checkpoints hold trainable weights only; the frozen rest comes from the config.
        self.strict_loading = False

    def setup(self, stage: str) -> None:
        """Before the strategy wraps the model: under a ``*-mixed`` precision every trained
        parameter becomes an fp32 master weight (:func:`mmbridge.model.precision.keep_trained_fp32`;
        DeepSpeed keeps its own master copy), and the schedule follows the Trainer's
        ``max_steps`` (a stage's ``epochs`` resolved into steps)."""
        trainer = self.trainer
        if int(trainer.max_steps or 0) > 0:
            self.total_steps = int(trainer.max_steps)
        strategy = type(trainer.strategy).__name__.lower()
        if str(trainer.precision).endswith("-mixed") and "deepspeed" not in strategy:
            keep_trained_fp32(self.model)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by the global norm under FSDP too: Lightning refuses norm clipping there (the
        sharded norm needs the root FSDP module), so the root's own ``clip_grad_norm_`` does
        it, which reduces the shards' norms over the ranks. Every other strategy: Lightning's."""
        root: Any = getattr(self.trainer.strategy, "model", None)
        if (
            gradient_clip_val
            and gradient_clip_algorithm in (None, "norm")
            and type(root).__name__ == "FullyShardedDataParallel"
        ):
            root.clip_grad_norm_(float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._t_step = time.perf_counter()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.model(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["ids"]))
        self.samples_seen += len(batch["ids"])
        if self.seen_ids is not None:
            self.seen_ids.extend(batch["ids"])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.step_times.append(time.perf_counter() - self._t_step)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.model(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["ids"]))
        return loss

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        record = {"step": float(self.global_step)}
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            record["val_loss"] = float(loss)
        if self.evaluator is not None:
            for k, v in self.evaluator(self.model).items():
                self.log(f"val/{k}", v, sync_dist=True)
                record[k] = v
        self.history.append(record)

    def configure_optimizers(self) -> Any:
        opt_cfg = self.stage.optimizer
        groups = param_groups(self.model, opt_cfg)  # per component and weight decay
        opt = make_optimizer(groups, opt_cfg, key="stages.optimizer")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_multiplier)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_multiplier(self, step: int) -> float:
        """The stage's warm-up + cosine schedule at ``step``; under a time budget
        (``time_budget_s``) it follows the share of the budget used, or of ``max_steps`` when
        that is larger, so the learning rate has decayed when the time is up."""
        opt_cfg = self.stage.optimizer
        total = self.total_steps
        warmup_ratio, min_ratio = float(opt_cfg.warmup_ratio), float(opt_cfg.min_lr_ratio)
        if not self.time_budget_s:
            return warmup_cosine(step, total, int(round(warmup_ratio * total)), min_ratio)
        # Lightning sets Trainer.callbacks in __init__ without declaring it on the class
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)  # type: ignore[attr-defined]
        elapsed = float(timer.time_elapsed("train")) if timer is not None else 0.0
        return progress_warmup_cosine(
            max(step / max(1, total), elapsed / self.time_budget_s), warmup_ratio, min_ratio
        )

    # Checkpoints: trainable weights only (a frozen 135M LLM need not be saved every time),
    # with what an exact resume needs beyond Lightning's own state (resume.py).
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {f"model.{k}" for k in self.model.trainable_state_dict()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        extra: dict[str, Any] = {
            "samples_seen": self.samples_seen,
            "history": self.history,
            "rng": rng_state(),
        }
        if self.seen_ids is not None:
            extra["seen_ids"] = list(self.seen_ids)
        checkpoint["mmbridge"] = extra

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("mmbridge", {})
        self.samples_seen = extra.get("samples_seen", 0)
        self.history = list(extra.get("history", []))
        if self.seen_ids is not None:
            self.seen_ids = list(extra.get("seen_ids", []))
        # applied when training starts: nothing between the restore and the first step may draw
        self._rng_to_restore = extra.get("rng")

    def on_train_start(self) -> None:
        self.restore_rng()

    def restore_rng(self) -> None:
        """Set the global random generators to the loaded checkpoint's (once; no-op without
        one). Lightning calls it as training starts; a fit resumed at its last step ends before
        that, and :func:`mmbridge.runtime.train.fit_stage` calls it itself."""
        state, self._rng_to_restore = self._rng_to_restore, None
        if state is not None:
            set_rng_state(state)
