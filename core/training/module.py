"""The LightningModule: receives an assembled model and a stage config; picks nothing itself."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from mmbridge.model import MultimodalModel


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class BridgeModule(L.LightningModule):
    """Trains the parameters of ``model`` that require grad, with the stage's optimiser.

    Args:
        model: The assembled model, already frozen/unfrozen for the stage.
        stage: The stage config (``optimizer``, ``max_steps``).
        evaluator: Optional callable ``(model) -> dict[str, float]`` run after each validation
            (the generation-based exact match on question answering).
    """

    def __init__(self, model: MultimodalModel, stage: DictConfig, evaluator: Any = None) -> None:
        super().__init__()
        self.model = model
        self.stage = stage
        self.evaluator = evaluator
        self.history: list[dict[str, float]] = []
        self._t_step = 0.0
        self.step_times: list[float] = []
        self.samples_seen = 0
        self.seen_ids: list[str] | None = None  # a list when recording (debug)
        # Checkpoints hold trainable weights only; the frozen rest comes from the config.
        self.strict_loading = False

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model(batch)

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
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": float(opt_cfg.weight_decay)},
                  {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=float(opt_cfg.lr),
                                betas=tuple(opt_cfg.betas))
        total = int(self.stage.max_steps)
        warmup = int(round(float(opt_cfg.warmup_ratio) * total))
        min_ratio = float(opt_cfg.min_lr_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, total, warmup, min_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # Checkpoints: trainable weights only (a frozen 135M LLM need not be saved every time).
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {f"model.{k}" for k in self.model.trainable_state_dict()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["mmbridge"] = {"samples_seen": self.samples_seen, "history": self.history}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("mmbridge", {})
        self.samples_seen = extra.get("samples_seen", 0)
        self.history = list(extra.get("history", []))
