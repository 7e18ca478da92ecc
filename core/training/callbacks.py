"""Lightning callbacks of a run: honest interrupts and progress log lines.

Interrupts: SIGTERM and SIGINT stop training at the end of the current step, write a resumable
checkpoint (through the stage's ``ModelCheckpoint``, so it is the same kind of checkpoint as
the periodic ones) and end the command with status 128 + signal (143 / 130) and one line that
says how to resume. Outside a training step (data, feature cache, evaluation) nothing is half
written (every output is atomic), so a signal there stops at once with the same status. A
second SIGINT aborts at once.
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

import lightning as L
from lightning.pytorch.callbacks import Callback, Timer

from mmbridge.utils.progress import eta

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger("mmbridge.train")


class Interrupted(Exception):  # noqa: N818 - it is not an error: the run was asked to stop
    """The run stopped on a signal; ``exit_status`` is 128 + the signal number."""

    def __init__(
        self,
        signum: int,
        stage: str | None = None,
        step: int | None = None,
        checkpoint: str | None = None,
    ) -> None:
        self.signum, self.stage, self.step, self.checkpoint = signum, stage, step, checkpoint
        where = f" at step {step} of stage {stage}" if stage is not None else ""
        super().__init__(f"interrupted{where} ({signal.Signals(signum).name})")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class InterruptGuard:
    """Signal handling for the length of a run (a context manager; main thread only).

    While ``deferred`` (inside a training stage) a signal is recorded and acted on at the end of
    the current step by :class:`StopOnSignal`; otherwise it raises :class:`Interrupted` at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.getsignal(s)
            self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def install(self) -> None:
        if self._old:
            for s in self.SIGNALS:
                signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            print(
                "mmbridge: second interrupt: aborting now (the last periodic checkpoint is kept)",
                file=sys.stderr,
                flush=True,
            )
            os._exit(128 + signum)
        self.signum = signum
        if not self.deferred:
            raise Interrupted(signum)
        log.warning(
            "%s received: stopping at the end of the current step (again to abort now)",
            signal.Signals(signum).name,
        )


class StopOnSignal(Callback):
    """Acts on a signal recorded by ``guard``: saves a resumable checkpoint at the end of the
    current step and stops the fit; :func:`mmbridge.runtime.train.run_stage` then raises
    :class:`Interrupted`.

    Installed over Lightning's own SIGTERM handler for the length of the fit: Lightning's would
    raise ``SIGTERMException`` (a ``SystemExit`` with status 0) after the step, without a
    checkpoint.
    """

    def __init__(self, guard: InterruptGuard) -> None:
        self.guard = guard
        self.saved_step: int | None = None
        self.checkpoint: str | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.guard.deferred = True
        self.guard.install()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.guard.signum is None or self.saved_step is not None:
            return
        # the stage's checkpointing is a ModelCheckpoint (checkpoint.checkpoint_callback)
        mc = cast("ModelCheckpoint | None", trainer.checkpoint_callback)
        if mc is not None and getattr(mc, "save_last", False):
            mc._save_last_checkpoint(trainer, mc._monitor_candidates(trainer))
            self.checkpoint = str(mc.last_model_path)
        elif mc is not None and mc.dirpath:
            path = os.path.join(mc.dirpath, "last.ckpt")
            trainer.save_checkpoint(path)
            self.checkpoint = path
        self.saved_step = trainer.global_step
        trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.guard.deferred = False

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.guard.deferred = False


class ProgressLog(Callback):
    """A log line every ``every_n`` steps or ``every_s`` seconds, whichever comes first: stage,
    step / total (and minutes / budget under a time budget), loss, seconds per step, time left.
    Used when no progress bar can be drawn (stderr is not a terminal)."""

    def __init__(
        self,
        stage: str,
        total_steps: int,
        budget_s: float | None = None,
        every_n: int = 50,
        every_s: float = 30.0,
    ) -> None:
        self.stage, self.total, self.budget_s = stage, total_steps, budget_s
        self.every_n, self.every_s = every_n, every_s
        self._t_last = 0.0
        self._step_last = 0
        self._t0 = 0.0
        self._times: list[float] = []
        self._t_batch = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = self._t_last = time.monotonic()
        self._step_last = trainer.global_step
        budget = f", budget {self.budget_s / 60:.1f} min" if self.budget_s else ""
        log.info(
            "stage %s: training from step %d (at most %d steps%s)",
            self.stage,
            trainer.global_step,
            self.total,
            budget,
        )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._t_batch = time.monotonic()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.monotonic()
        self._times = (self._times + [now - self._t_batch])[-20:]
        step = trainer.global_step
        if step - self._step_last < self.every_n and now - self._t_last < self.every_s:
            return
        self._t_last, self._step_last = now, step
        log.info(self.line(trainer, outputs))

    def line(self, trainer: L.Trainer, outputs: Any = None) -> str:
        step = trainer.global_step
        s_step = statistics.median(self._times) if self._times else float("nan")
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        loss_s = f"{float(loss):.4f}" if loss is not None else "-"
        left = (self.total - step) * s_step
        parts = [f"stage {self.stage}", f"step {step}/{self.total}"]
        if self.budget_s:
            elapsed = _elapsed(trainer, self._t0)
            parts.append(f"{elapsed / 60:.1f}/{self.budget_s / 60:.1f} min")
            left = min(left, self.budget_s - elapsed)
        parts += [f"loss {loss_s}", f"{s_step:.2f} s/step", f"ETA {eta(left)}"]
        return ", ".join(parts)


def _elapsed(trainer: L.Trainer, t0: float) -> float:
    # Lightning sets Trainer.callbacks in __init__ without declaring it on the class
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)  # type: ignore[attr-defined]
    return float(timer.time_elapsed("train")) if timer is not None else time.monotonic() - t0
