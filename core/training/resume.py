"""What an exact resume needs beyond Lightning's own checkpoint: the random number generators,
and a ``last.ckpt`` written after the validation of its step.

Lightning's checkpoint already holds the weights, AdamW's moments, the LR scheduler, the loop
counters and (with :mod:`mmbridge.training.loader`) the training loader's position. Two things
it leaves out:

- **Random generators.** The global torch (CPU and CUDA), NumPy and Python generators are not
  saved; anything drawing from them after a resume (dropout, LoRA dropout, random
  augmentations) would draw a different stream. :func:`rng_state` / :func:`set_rng_state`
  capture and restore all of them, as tensors and plain lists (loadable with
  ``torch.load(weights_only=True)``).
- **The validation point of the checkpoint's step.** ``ModelCheckpoint(every_n_train_steps)``
  saves in ``on_train_batch_end``, before that step's validation runs; Lightning resumes
  after that validation (``TrainingEpochLoop.advance`` fast-forwards it on restart), so its
  result was missing from the history. :class:`ResumableCheckpoint` writes ``last.ckpt`` again
  once the validation of the same step has ended (Lightning's own ``on_validation_end`` skips
  it: "already saved at this step").

Test aid: with ``MMBRIDGE_DEBUG_SIGKILL_AT=STAGE:STEP`` in the environment the process kills
itself with SIGKILL (no clean-up, like a crash or an out-of-memory kill) just before step
``STEP + 1`` of stage ``STAGE`` starts, i.e. once everything of step ``STEP`` (its checkpoint
and validation) is written. ``tests/test_resume_exact.py`` uses it to crash at a known step.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


def rng_state() -> dict[str, Any]:
    """The state of every global random generator (torch CPU and CUDA, NumPy, Python)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (a missing part is left as it is)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "numpy" in state:
        npy = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": "MT19937",
                "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
                "has_gauss": npy["has_gauss"],
                "gauss": npy["gauss"],
            }
        )
    if (
        "cuda" in state
        and torch.cuda.is_available()
        and len(state["cuda"]) == torch.cuda.device_count()
    ):
        torch.cuda.set_rng_state_all(state["cuda"])


#: Environment variable of the crash test aid (``STAGE:STEP``, see the module docstring).
KILL_ENV = "MMBRIDGE_DEBUG_SIGKILL_AT"


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose checkpoint of a validation step includes that validation.

    A step that is both a checkpoint step and a scheduled validation step is saved twice: at
    the end of the step (as ``ModelCheckpoint`` does, so a kill during validation still resumes
    there) and again, over the same files, after its validation, so a resume keeps that
    validation's point in the history. The extra validation Lightning runs when a fit is asked
    to stop (``Trainer.should_stop``, e.g. on a signal) is not scheduled: the checkpoint saved
    before it stays, so the resumed history is the uninterrupted run's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._written: tuple[int, list[str]] = (-1, [])  # (global step, files saved at it)
        self._kill_at = os.environ.get(KILL_ENV, "")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if (
            self._kill_at
            and self.dirpath
            and self._kill_at == f"{Path(self.dirpath).name}:{trainer.global_step}"
        ):
            os.kill(os.getpid(), signal.SIGKILL)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        step, paths = self._written
        self._written = (
            trainer.global_step,
            (paths if step == trainer.global_step else []) + [filepath],
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)

        step, paths = self._written
        if (
            trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and step == trainer.global_step
            and _scheduled_validation(trainer)
        ):
            # every file of this step (``step=N.ckpt`` and ``last.ckpt``), so a fallback from a
            # damaged ``last.ckpt`` to its sibling keeps the point too
            for path in dict.fromkeys(paths):
                if Path(path).exists():
                    super()._save_checkpoint(trainer, path)


def _scheduled_validation(trainer: L.Trainer) -> bool:
    """Whether the validation that just ended was due by ``val_check_interval`` (a step count,
    ``check_val_every_n_epoch=None``) rather than run because the fit was asked to stop."""
    if not trainer.should_stop:
        return True
    every = trainer.val_check_batch
    if trainer.check_val_every_n_epoch is not None or not isinstance(every, int) or every < 1:
        return False
    return (trainer.fit_loop.epoch_loop.total_batch_idx + 1) % every == 0
