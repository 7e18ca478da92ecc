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
  it: "already saved at this step"). A kill *during* that validation leaves the checkpoint
  saved before it; that checkpoint says so (``validation_owed`` in the callback's state), and
  a resume from it runs the validation again before training on: Lightning's own path for a
  fit restarted mid-evaluation. At the fit's last step Lightning ends such a fit at once, so
  the caller runs the owed validation (:func:`validation_owed`, as
  :func:`mmbridge.runtime.train.fit_stage` does).

Test aid: with ``MMBRIDGE_DEBUG_SIGKILL_AT=STAGE:STEP`` in the environment the process kills
itself with SIGKILL (no clean-up, like a crash or an out-of-memory kill) just before step
``STEP + 1`` of stage ``STAGE`` starts, i.e. once everything of step ``STEP`` (its checkpoint
and validation) is written; with ``STAGE:STEP:validation`` it kills itself when the first batch
of step ``STEP``'s validation starts (inside the fit: not the opening validation of step 0).
``tests/unit/test_resume_exact.py`` uses it to crash at a known point.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any, cast

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


#: Environment variable of the crash test aid (``STAGE:STEP`` or ``STAGE:STEP:validation``, see
#: the module docstring).
KILL_ENV = "MMBRIDGE_DEBUG_SIGKILL_AT"


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose checkpoint of a validation step includes that validation.

    A step that is both a checkpoint step and a scheduled validation step is saved twice: at
    the end of the step (as ``ModelCheckpoint`` does, so a kill during validation still resumes
    there) and again, over the same files, after its validation, so a resume keeps that
    validation's point in the history. The extra validation Lightning runs when a fit is asked
    to stop (``Trainer.should_stop``, e.g. on a signal) is not scheduled: the checkpoint saved
    before it stays, so the resumed history is the uninterrupted run's.

    The first save of such a step records ``validation_owed`` in the callback's state; a fit
    resumed from it (a kill during the validation) runs that validation again first (see the
    module docstring), then saves the step's files again as above.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._written: tuple[int, list[str]] = (-1, [])  # (global step, files saved at it)
        self._kill_at = os.environ.get(KILL_ENV, "")
        #: The step whose scheduled validation the resumed checkpoint was saved before, until
        #: that validation has run again (``None``: nothing owed).
        self.owed_step: int | None = None
        self._val_total: dict[str, int] | None = None  # the val loop's counters to put back

    @property
    def _dirname(self) -> str:
        return Path(self.dirpath).name if self.dirpath else ""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._kill_at and self._kill_at == f"{self._dirname}:{trainer.global_step}":
            os.kill(os.getpid(), signal.SIGKILL)

    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if (
            self._kill_at
            and batch_idx == 0
            and trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and self._kill_at == f"{self._dirname}:{trainer.global_step}:validation"
        ):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is not None:
            state["validation_owed"] = _saved_before_validation(trainer)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint saved before its step's scheduled validation: the loop state Lightning
        is about to restore becomes that of a fit killed as that validation started (its val
        loop counters one batch started, none done), so ``TrainingEpochLoop.advance`` goes
        back and runs it instead of fast-forwarding past it; the counters are put back when
        it starts (:meth:`on_validation_start`)."""
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        state = checkpoint.get("callbacks", {}).get(self.state_key) or {}
        loops = checkpoint.get("loops", {}).get("fit_loop", {})
        val = loops.get("epoch_loop.val_loop.batch_progress")
        stepped = loops.get("epoch_loop.state_dict", {})
        if (
            not state.get("validation_owed")
            or trainer.state.fn != TrainerFn.FITTING
            or not isinstance(val, dict)
            or "_batches_that_stepped" not in stepped
        ):
            return
        step = int(checkpoint["global_step"])
        self.owed_step = step
        if 0 < trainer.max_steps <= step:
            return  # the fit ends at once: its caller runs the validation (validation_owed)
        self._val_total = dict(val["total"])
        done = int(val["total"]["completed"])
        val["total"] = {
            "ready": done + 1,
            "started": done + 1,
            "processed": done,
            "completed": done,
        }
        val["current"] = {"ready": 0, "started": 0, "processed": 0, "completed": 0}
        val["is_last_batch"] = False
        # Lightning counts the step once on restoring a checkpoint of a batch's end and again
        # after the validation it goes back to (which an uninterrupted fit counts once)
        stepped["_batches_that_stepped"] = int(stepped["_batches_that_stepped"]) - 1
        # the files of this step, saved again once its validation has run (on_validation_end)
        best = state.get("best_k_models") or {}
        files = [str(p) for p, score in best.items() if score is not None and score == step]
        files += [str(trainer.ckpt_path)] if trainer.ckpt_path else []
        if self.save_last and self.dirpath:
            files.append(
                os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
            )
        if self.dirpath:
            ours = Path(self.dirpath).resolve()
            self._written = (step, [f for f in files if Path(f).resolve().parent == ours])

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        if self._val_total is not None and trainer.state.fn == TrainerFn.FITTING:
            # the owed validation starts: its counters as the uninterrupted fit had them
            trainer.fit_loop.epoch_loop.val_loop.batch_progress.total.load_state_dict(
                self._val_total
            )
            self._val_total = None

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
        if trainer.state.fn == TrainerFn.FITTING and self.owed_step == trainer.global_step:
            self.owed_step = None


def validation_owed(trainer: L.Trainer) -> bool:
    """Whether ``trainer``'s fit resumed from a checkpoint saved before the scheduled validation
    of its step and that validation has not run again: a fit resumed at its last step ends at
    once, so its caller runs it (``trainer.validate``)."""
    cb = trainer.checkpoint_callback
    return isinstance(cb, ResumableCheckpoint) and cb.owed_step == trainer.global_step


def _validation_due(trainer: L.Trainer) -> bool:
    """Whether ``val_check_interval`` (a step count, ``check_val_every_n_epoch=None``) schedules
    a validation after the current training batch."""
    every = trainer.val_check_batch
    if trainer.check_val_every_n_epoch is not None or not isinstance(every, int) or every < 1:
        return False
    return (trainer.fit_loop.epoch_loop.total_batch_idx + 1) % every == 0


def _saved_before_validation(trainer: L.Trainer) -> bool:
    """Whether a checkpoint saved now is saved at the end of a training batch (Lightning counts
    it processed, not yet completed) whose scheduled validation is still to run."""
    if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or trainer.validating:
        return False
    # a _ProcessedTracker at run time (the annotation says its base, _ReadyCompletedTracker)
    progress = cast(Any, trainer.fit_loop.epoch_loop.batch_progress.total)
    at_batch_end = (
        progress.processed == progress.ready and progress.completed == progress.processed - 1
    )
    return at_batch_end and trainer.enable_validation and _validation_due(trainer)


def _scheduled_validation(trainer: L.Trainer) -> bool:
    """Whether the validation that just ended was due by ``val_check_interval`` (a step count,
    ``check_val_every_n_epoch=None``) rather than run because the fit was asked to stop."""
    return not trainer.should_stop or _validation_due(trainer)
