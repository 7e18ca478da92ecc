"""One training run: stages in order, each a Lightning ``fit`` on its data
(:func:`~mmbridge.runtime.stage.prepare_stage`); then the test-split evaluation and
``metrics.json``. ``resume`` continues a killed run from its last checkpoint.

Under ``budget_minutes`` the run is bounded by wall-clock time instead of steps: the stages
share what is left of the budget when each starts (by ``stages.<name>.budget_fraction``), each
ends with its checkpoint, and the evaluation follows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from safetensors.torch import save_file
from torchdata.stateful_dataloader import StatefulDataLoader

from mmbridge.config.schema import Loader, Stage
from mmbridge.config.sections import trainer_arg
from mmbridge.data.dataset import Collator, ConversationDataset
from mmbridge.errors import ConfigError
from mmbridge.evaluation.runner import ValQuestions
from mmbridge.registry import Registry
from mmbridge.reporting.run_metrics import PrecisionRecord, RunMetrics, StageMetrics
from mmbridge.reporting.run_report import report_at_end
from mmbridge.reporting.runs import retire_error
from mmbridge.runtime.config import RunConfig
from mmbridge.runtime.evaluate import evaluate_session
from mmbridge.runtime.session import Session, open_session
from mmbridge.runtime.stage import prepare_stage
from mmbridge.training.callbacks import Interrupted, InterruptGuard, ProgressLog, StopOnSignal
from mmbridge.training.checkpoint import (
    SafeCheckpointIO,
    checkpoint_callback,
    load_weights,
    read_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
)
from mmbridge.training.distributed import (
    barrier,
    gather_weights,
    global_rank,
    is_fsdp,
    is_global_zero,
    is_zero3,
    unsharded_model,
)
from mmbridge.training.init_from import load_init_weights
from mmbridge.training.loader import make_loader, modality_lengths
from mmbridge.training.loggers import make_loggers
from mmbridge.training.module import BridgeModule
from mmbridge.training.resume import ResumableCheckpoint, validation_owed
from mmbridge.training.stages import (
    configure_trainable,
    data_parallel_size,
    stage_steps,
)
from mmbridge.training.strategies import shards_parameters
from mmbridge.training.trainer import (
    peak_memory_mb,
    resolve_auto_dtypes,
    tidy_lightning_output,
    trainer_kwargs,
)
from mmbridge.utils.io import atomic_write_json, atomic_write_text
from mmbridge.utils.progress import interactive

log = logging.getLogger("mmbridge.train")

#: Steps whose time is left out of the reported step time (kernel selection, allocator warm-up).
WARMUP_STEPS = 3
#: Below this many seconds of training a stage's budget share is too small to be useful.
MIN_STAGE_SECONDS = 10.0


def _loader(
    ds: ConversationDataset,
    batch_size: int,
    collate: Collator,
    shuffle: bool,
    loader: Loader,
    seed: int,
) -> StatefulDataLoader:
    """A resumable loader (:mod:`mmbridge.training.loader`): Lightning checkpoints its position."""
    lengths = modality_lengths(ds.samples) if shuffle and loader.group_by_length else None
    return make_loader(
        ds,
        batch_size,
        collate,
        shuffle=shuffle,
        seed=seed,
        num_workers=loader.num_workers,
        lengths=lengths,
    )


def run_stage(
    session: Session,
    name: str,
    out_dir: Path,
    resume: bool,
    guard: InterruptGuard | None = None,
    deadline: float | None = None,
) -> tuple[StageMetrics, dict[str, torch.Tensor]]:
    """Train stage ``name``: its data (:func:`~mmbridge.runtime.stage.prepare_stage`), a
    Lightning ``fit`` (:func:`build_trainer`, :func:`fit_stage`) from the stage's last
    checkpoint when ``resume``; stops at ``max_steps`` or, with ``deadline`` (a
    ``time.monotonic()`` value), when the time is up. Raises :class:`Interrupted` when ``guard``
    recorded a signal (after a resumable checkpoint was written).

    Returns the stage's figures and its trained weights, gathered whole on global rank 0 under
    FSDP / ZeRO-3 (:func:`mmbridge.training.distributed.gather_weights`; every rank calls it)."""
    run, model = session.run, session.model
    stage = run.stages[name]
    configure_trainable(model, stage)
    data = prepare_stage(session, name)
    epochs = stage.epochs
    if epochs is not None:  # epochs -> steps, now that the data's length is known
        steps = stage_steps(
            stage,
            len(data.train_ds),
            data_parallel_size(run.trainer),
            int(trainer_arg(run.trainer, "accumulate_grad_batches") or 1),
        )
        # the steps the stage's module and Trainer run (build_trainer, fit_stage read them)
        stage = run.stages[name] = dataclasses.replace(stage, max_steps=steps)
        log.info(
            "stage %s: %g epoch(s) of %d samples = %d steps",
            name,
            float(epochs),
            len(data.train_ds),
            steps,
        )
    seed, bs = run.seed, int(stage.batch_size)
    loader, collate = session.run.loader, data.batcher.collator
    train_dl = _loader(data.train_ds, bs, collate, True, loader, seed)
    val_dl = _loader(data.val_ds, bs, collate, False, loader, seed) if len(data.val_ds) else None
    ev = session.run.evaluation
    sharded = shards_parameters(run.trainer)  # FSDP / ZeRO-3: no generation outside the forward
    # questions asked in the run's conversation format (a stage's own, e.g. plain, drops them)
    evaluator = (
        None
        if sharded
        else ValQuestions(
            data.val_samples, session.batcher(), ev.val_samples, ev.max_new_tokens, ev.batch_size
        )
    )
    ckpt_dir = out_dir / "checkpoints" / name
    found = (
        resumable_checkpoint(ckpt_dir) if resume else None
    )  # last.ckpt, else the newest good one
    ckpt_path = str(found) if found is not None else None
    t0 = time.perf_counter()
    module = BridgeModule(model, stage, evaluator=evaluator)
    record = session.run.debug.record_sample_ids
    if record:
        module.seen_ids = []
    if (
        ckpt_path is None and val_dl is not None and not sharded
    ):  # the starting point of the val curve
        _trainer(session, out_dir, stage, [], False).validate(module, val_dl, verbose=False)
    val_s = time.perf_counter() - t0
    budget_s = None
    if deadline is not None:
        # keep time for the closing validation, as long as the opening one took
        budget_s = deadline - time.monotonic() - (val_s if val_dl is not None else 0.0)
        if budget_s < MIN_STAGE_SECONDS:
            log.warning(
                "stage %s: only %.0f s of the budget left; training %.0f s anyway",
                name,
                budget_s,
                MIN_STAGE_SECONDS,
            )
            budget_s = MIN_STAGE_SECONDS
        module.time_budget_s = budget_s
    trainer, stopper = build_trainer(session, name, out_dir, guard, budget_s)
    figures, weights = fit_stage(
        session, name, trainer, module, train_dl, val_dl, ckpt_path, stopper
    )
    figures.wall_s = time.perf_counter() - t0
    if record:
        _write_debug(out_dir, name, trainer.global_rank, module)
    return figures, weights


def build_trainer(
    session: Session,
    name: str,
    out_dir: Path,
    guard: InterruptGuard | None = None,
    budget_s: float | None = None,
) -> tuple[L.Trainer, StopOnSignal | None]:
    """The Lightning ``Trainer`` of stage ``name``: its step checkpoints (the two newest and
    ``last.ckpt``), the progress bar on a terminal or log lines without one, the loggers, and
    a stopper on ``guard``'s signals (returned too: it says whether a signal stopped the fit).
    """
    stage = session.run.stages[name]
    max_steps = _max_steps(stage)
    ckpt_dir = out_dir / "checkpoints" / name
    callbacks: list[Callback] = [
        checkpoint_callback(
            ckpt_dir, int(stage.checkpoint_every or stage.val_every), ResumableCheckpoint
        )
    ]
    tty = interactive()
    if tty and trainer_arg(session.run.trainer, "enable_progress_bar"):
        callbacks.append(RichProgressBar())
    stopper = StopOnSignal(guard) if guard is not None else None
    if stopper is not None:
        callbacks.append(stopper)
    if not tty:
        every = session.run.root.progress_every
        callbacks.append(ProgressLog(name, max_steps, budget_s, every_n=every))
    loggers = make_loggers(session.run.root, out_dir, name)
    tidy_lightning_output()
    return _trainer(session, out_dir, stage, callbacks, loggers, budget_s), stopper


def fit_stage(
    session: Session,
    name: str,
    trainer: L.Trainer,
    module: BridgeModule,
    train_dl: StatefulDataLoader,
    val_dl: StatefulDataLoader | None,
    ckpt_path: str | None,
    stopper: StopOnSignal | None = None,
) -> tuple[StageMetrics, dict[str, torch.Tensor]]:
    """Run ``trainer.fit`` for stage ``name`` (from ``ckpt_path`` when given); close the val
    curve where a time budget stopped it; gather the trained weights. Returns the stage's
    figures (without ``wall_s``) and the weights."""
    max_steps = _max_steps(session.run.stages[name])
    trainer.fit(module, train_dl, val_dl, ckpt_path=ckpt_path)
    if stopper is not None and stopper.saved_step is not None:
        # a step was saved because the stopper's guard caught a signal
        raise Interrupted(
            cast(int, stopper.guard.signum), name, stopper.saved_step, stopper.checkpoint
        )
    ended_early = int(trainer.global_step) < max_steps
    last_val = module.history[-1]["step"] if module.history else -1
    owed = validation_owed(trainer)  # resumed at the last step, saved before its validation
    if (ended_early or owed) and val_dl is not None and last_val != trainer.global_step:
        # stopped by the budget between two validations: close the val curve where it ended;
        # or killed during the last step's validation: run it (Lightning's fit ended at once)
        module.restore_rng()  # as the fit would have before it (a no-op once it has)
        trainer.validate(module, val_dl, verbose=False)
    weights = gather_weights(
        session.model, trainer.strategy.model
    )  # a collective under FSDP / ZeRO-3
    session.model.to(session.device)  # Lightning's teardown moves the model back to the CPU
    if ended_early:
        log.info(
            "stage %s: time budget reached at step %d of %d", name, trainer.global_step, max_steps
        )
    times = module.step_times[WARMUP_STEPS:] or module.step_times
    bs = int(session.run.stages[name].batch_size)
    step = statistics.median(times) if times else math.nan
    return StageMetrics(
        history=module.history,
        step_time_s=step,
        samples_per_s=bs / step,
        steps=int(trainer.global_step),
        max_steps=max_steps,
        budget_s=module.time_budget_s,
        rank=trainer.global_rank,
    ), weights


def _trainer(
    session: Session,
    out_dir: Path,
    stage: Stage,
    callbacks: list[Callback],
    loggers: Any,
    budget_s: float | None = None,
) -> L.Trainer:
    kw = trainer_kwargs(
        session.run.trainer,
        session.run.device,
        session.precision,
        session.device,
        interactive=interactive(),
        model=session.model,
    )
    if not callbacks:  # a bare validation: no checkpoints, no progress bar
        kw["enable_progress_bar"] = False
    return L.Trainer(
        max_steps=_max_steps(stage),
        val_check_interval=int(stage.val_every),
        check_val_every_n_epoch=None,
        callbacks=callbacks,
        logger=loggers,
        enable_checkpointing=bool(callbacks),
        num_sanity_val_steps=0,
        enable_model_summary=False,
        default_root_dir=str(out_dir),
        plugins=[SafeCheckpointIO()],  # resume loads weights-only, always
        max_time=timedelta(seconds=budget_s) if budget_s else None,
        **kw,
    )


def _max_steps(stage: Stage) -> int:
    """The stage's optimiser steps (``epochs`` are resolved into ``max_steps`` by
    :func:`run_stage`)."""
    if stage.max_steps is None:
        raise ConfigError("max_steps and epochs are both null; set one")
    return int(stage.max_steps)


def _write_debug(out_dir: Path, stage: str, rank: int, module: BridgeModule) -> None:
    d = out_dir / "debug"
    d.mkdir(exist_ok=True)
    atomic_write_json(d / f"{stage}_rank{rank}_ids.json", {"ids": module.seen_ids})
    state = {k: v.contiguous().cpu() for k, v in module.model.trainable_state_dict().items()}
    save_file(state, str(d / f"{stage}_rank{rank}_weights.safetensors"))


def unsharded_session(
    session: Session,
    stages_done: list[str],
    weights: dict[str, torch.Tensor],
    broadcast: bool = False,
) -> Session:
    """``session`` with a plain copy of its model holding ``weights`` (gathered on rank 0;
    with ``broadcast`` every rank calls and gets them): after an FSDP / ZeRO-3 stage, for the
    next stage (every rank) and for the final evaluation (rank 0)
    (:func:`mmbridge.training.distributed.unsharded_model`)."""
    run = session.run
    model = unsharded_model(
        resolve_auto_dtypes(run.model, run.scheduled, run.trainer, session.precision.weight_dtype),
        session.registry,
        session.device,
        [run.stages[n] for n in stages_done],
        weights,
        broadcast=broadcast,
    )
    out = dataclasses.replace(session, model=model)
    out.run = run  # the same parsed sections (a stage's epochs resolved into steps included)
    return out


def stage_fractions(stages: Mapping[str, Stage], names: list[str]) -> dict[str, float]:
    """Each stage's share of the time budget: ``stages.<name>.budget_fraction`` normalised over
    ``names`` (equal shares where none is set)."""
    raw = {n: stages[n].budget_fraction for n in names}
    if all(v is None for v in raw.values()):
        return {n: 1.0 / len(names) for n in names}
    missing = [n for n, v in raw.items() if v is None]
    if missing:
        raise ConfigError(
            f"budget_minutes: stages.{missing[0]}.budget_fraction is not set while "
            f"other stages set theirs; set it for every scheduled stage"
        )
    given = {n: float(v) for n, v in raw.items() if v is not None}  # every one, checked above
    total = sum(given.values())
    return {n: v / total for n, v in given.items()}


def train(
    run: RunConfig, registry: Registry, out_dir: Path, resume: bool = False
) -> dict[str, Any]:
    """Run every scheduled stage of ``run`` (a validated config, parsed: the run's entry,
    :func:`mmbridge.runtime.task.run_task`, checks it), evaluate on the test split, write
    metrics.json; return it.

    Raises:
        Interrupted: on SIGTERM / SIGINT (after a resumable checkpoint was written when it came
            during a training step).
    """
    t_start = time.perf_counter()
    m_start = time.monotonic()
    budget_s = run.root.budget_minutes * 60 if run.root.budget_minutes else None
    L.seed_everything(run.root.seed, workers=True, verbose=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_global_zero():  # rank 0 alone writes the run's files (mmbridge.training.distributed)
        atomic_write_text(out_dir / "config.yaml", run.to_yaml())
    with InterruptGuard() as guard:
        session = open_session(
            run, registry, run_dir=out_dir if is_global_zero() else None
        )  # rank 0 lists drops
        model = session.model
        # init_from=RUN_DIR[:STAGE]
        loaded = load_init_weights(model, run.root, run.scheduled, session.registry)
        if loaded:
            log.info("init_from=%s: %d tensors loaded", run.init_from, len(loaded))
        done: list[str] = []
        stage_metrics: dict[str, StageMetrics] = {}
        weights: dict[str, torch.Tensor] | None = None  # the last stage's, whole on rank 0
        state_file = out_dir / "state.json"
        state = json.loads(state_file.read_text()) if resume and state_file.is_file() else {}
        todo = [n for n in run.schedule if n not in state.get("stages_done", [])]
        fractions = stage_fractions(run.stages, todo) if budget_s and todo else {}
        for name in run.schedule:
            export = out_dir / "checkpoints" / f"{name}_final"
            if name in state.get("stages_done", []) and (export / "weights.safetensors").is_file():
                # same structure (LoRA) as when it ran
                configure_trainable(model, run.stages[name])
                _, weights, _ = read_checkpoint(export)
                load_weights(model, weights, str(export))
                done.append(name)
                stage_metrics[name] = StageMetrics.from_dict(
                    state.get("stage_metrics", {}).get(name, {})
                )
                log.info("stage %s: already done, loaded %s", name, export)
                continue
            deadline = None
            if budget_s:
                left = budget_s - (time.monotonic() - m_start)
                share = fractions[name] / sum(fractions[n] for n in todo[todo.index(name) :])
                deadline = time.monotonic() + max(0.0, left) * share
                log.info(
                    "stage %s: %.1f min of the %.1f min budget",
                    name,
                    max(0.0, left) * share / 60,
                    budget_s / 60,
                )
            stage_metrics[name], weights = run_stage(
                session, name, out_dir, resume, guard, deadline
            )
            done.append(name)
            if is_global_zero():
                save_checkpoint(  # the config as composed: the checkpoint stores it
                    model, run.composed, export, done, registry=session.registry, weights=weights
                )
                atomic_write_json(
                    state_file,
                    {
                        "stages_done": done,
                        "stage_metrics": {
                            k: dataclasses.asdict(v) for k, v in stage_metrics.items()
                        },
                    },
                )
            barrier()  # every rank sees the stage's checkpoint before the next stage starts
            if (is_fsdp(model) or is_zero3(model)) and name != run.schedule[-1]:
                # sharded in place: the next stage (its own trainable set, LoRA) gets a plain copy
                session = unsharded_session(session, done, weights, broadcast=True)
                model = session.model
        final = out_dir / "checkpoints" / "final"
        rank0 = is_global_zero()
        sharded = is_fsdp(model) or is_zero3(model)
        if rank0:
            save_checkpoint(
                model, run.composed, final, done, registry=session.registry, weights=weights
            )
            if sharded and weights is not None:  # evaluate (and count) an unsharded copy
                session = unsharded_session(session, done, weights)
        else:  # no barrier: a long evaluation would outlast the process group's timeout
            log.info("rank %d: done; rank 0 evaluates and writes metrics.json", global_rank())
        dec = session.precision
        metrics = RunMetrics(
            stages=stage_metrics,
            checkpoint=str(final),
            seed=run.seed,
            parameters=session.model.parameter_counts(),
            visual_tokens=visual_tokens(session),
            cache=session.cache_stats,
            precision=PrecisionRecord(
                dec.precision, dec.weight_dtype, dec.reason, str(session.device)
            ),
        )
        if rank0:
            metrics.test = evaluate_session(session, predictions=out_dir / "predictions.jsonl")
    metrics.peak_memory_mb = peak_memory_mb()
    metrics.wall_s = time.perf_counter() - t_start
    if done:
        metrics.step_time_s = stage_metrics[done[-1]].step_time_s
        metrics.samples_per_s = stage_metrics[done[-1]].samples_per_s
    losses = metrics.val_losses()
    if losses:
        metrics.val_loss_first, metrics.val_loss_last = losses[0], losses[-1]
    out = metrics.as_dict()
    if rank0:
        atomic_write_json(out_dir / "metrics.json", out)
        retire_error(out_dir)  # an earlier attempt's error.txt no longer describes the run
        report_at_end(out_dir, session)  # report.html (never raises)
    return out


def visual_tokens(session: Session) -> dict[str, float]:
    """Tokens per media item that each connector adds to the sequence (or as context)."""
    out: dict[str, float] = {}
    for modality, branch in session.model.branches.items():
        table = session.tables.get(modality)
        if table is not None and len(table.lengths):
            n = int(table.lengths.float().mean().round())
        else:
            s = next((x for v in session.splits.values() for x in v if modality in x.media), None)
            if s is None:
                continue
            _, n, _, _ = session.batcher(use_cache=False).reader.read(
                modality, s.paths(modality)[0]
            )
        c = branch.connector
        out[modality] = c.out_tokens(n) if c.in_sequence else c.context_tokens
    return out
