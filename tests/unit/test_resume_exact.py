"""Exact resume: a run killed with SIGKILL and continued with ``resume=RUN_DIR`` ends with the
same weights, test metrics, validation history and sample order as the uninterrupted run.

The fast tests pin the pieces on a real Lightning ``fit`` of a one-weight model: the loader's
order (a function of seed and epoch) and position survive a checkpoint at every step, across
epoch boundaries; ``ResumableCheckpoint`` keeps the validation point of its step; the global
random generators round-trip through a weights-only checkpoint. The slow test runs the real CLI
(``experiment=tiny``) and crashes it with ``MMBRIDGE_DEBUG_SIGKILL_AT`` (see
``mmbridge.training.resume``) in each stage and right after an epoch boundary.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import mmbridge_exe
from safetensors.torch import load_file

from mmbridge.contracts.types import Sample
from mmbridge.errors import CheckpointError, DataError
from mmbridge.training import loader as loader_mod
from mmbridge.training.loader import (
    EpochShuffle,
    ModalityLengthGrouped,
    make_loader,
    modality_lengths,
)
from mmbridge.training.resume import (
    KILL_ENV,
    ResumableCheckpoint,
    rng_state,
    set_rng_state,
    validation_owed,
)


def _ids(batches) -> list[list[int]]:
    return [b.tolist() for b in batches]


def test_epoch_shuffle_order_is_a_function_of_seed_and_epoch():
    s = EpochShuffle(range(10), seed=0)
    e0 = list(s)
    assert sorted(e0) == list(range(10)) and list(s) == e0  # same epoch, same order
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e1) == list(range(10)) and e1 != e0
    assert list(EpochShuffle(range(10), seed=1)) != e0
    other = EpochShuffle(range(10), seed=0)
    other.set_epoch(1)
    assert list(other) == e1


def test_loader_position_resumes_mid_epoch_and_at_the_epoch_end():
    """State after every batch of three epochs (10 samples, batches of 3: 4 per epoch), loaded
    into a fresh loader, continues with exactly the uninterrupted batches; the epoch is set as
    Lightning does (``set_epoch`` before each pass)."""

    def loader():
        return make_loader(list(range(10)), 3, torch.tensor, shuffle=True, seed=7)

    dl, seq, states = loader(), [], []
    for epoch in range(3):
        dl.sampler.set_epoch(epoch)
        for b in dl:
            seq.append(b.tolist())
            states.append((epoch, dl.state_dict()))
    assert [len(b) for b in seq[:4]] == [3, 3, 3, 1]
    for k, (epoch, state) in enumerate(states):
        fresh = loader()
        fresh.load_state_dict(state)
        rest = []
        for e in range(epoch, 3):
            fresh.sampler.set_epoch(e)
            rest += _ids(fresh)
        assert rest == seq[k + 1 :], f"resumed after batch {k}"


def test_loader_refuses_a_state_drawn_with_another_seed():
    dl = make_loader(list(range(10)), 3, torch.tensor, shuffle=True, seed=1)
    next(iter(dl))
    other = make_loader(list(range(10)), 3, torch.tensor, shuffle=True, seed=2)
    other.load_state_dict(dl.state_dict())
    with pytest.raises(CheckpointError, match="seed=1.*seed=2"):
        next(iter(other))


# 14 samples with media (even ids, lengths 2..28) and 9 text-only (odd ids): all lengths distinct
LENGTHS = [(i + 2) if i % 2 == 0 else -(i + 2) for i in range(23)]


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def test_modality_lengths_are_signed_word_counts():
    samples = [
        Sample(
            "a",
            {"image": "/x.png"},
            [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "a red circle"},
            ],
        ),
        Sample("b", {}, [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]),
        Sample("c", {}, [{"from": "human", "value": " "}, {"from": "gpt", "value": ""}]),
    ]
    assert modality_lengths(samples) == [7, -3, -1]


def test_grouped_batches_keep_one_modality_and_similar_lengths():
    """One megabatch per modality (megabatch_mult covers the data): every full batch is a run of
    the modality's samples sorted by length; only the epoch's last batch mixes modalities;
    the order is a function of (seed, epoch)."""
    s = ModalityLengthGrouped(LENGTHS, batch_size=4, seed=0, megabatch_mult=10)
    e0 = list(s)
    assert sorted(e0) == list(range(23)) and list(s) == e0
    by_len = {
        sign: sorted(
            (i for i, v in enumerate(LENGTHS) if v * sign > 0), key=lambda i: -abs(LENGTHS[i])
        )
        for sign in (1, -1)
    }
    # 14 media samples: 3 full batches + 2 left; 9 text-only: 2 full batches + 1 left
    runs = {
        sign: [set(ids[k : k + 4]) for k in range(0, len(ids) // 4 * 4, 4)]
        for sign, ids in by_len.items()
    }
    batches = _batches(e0, 4)
    assert sorted(map(sorted, batches[:5])) == sorted(sorted(r) for rr in runs.values() for r in rr)
    assert len(batches) == 6 and set(batches[5]) == set(by_len[1][12:]) | set(
        by_len[-1][8:]
    )  # 2 + 1
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e1) == list(range(23)) and e1 != e0
    again = ModalityLengthGrouped(LENGTHS, batch_size=4, seed=0, megabatch_mult=10)
    again.set_epoch(1)
    assert list(again) == e1
    assert list(ModalityLengthGrouped(LENGTHS, batch_size=4, seed=1, megabatch_mult=10)) != e0


def test_grouped_megabatches_sort_only_within_themselves():
    """megabatch_mult=1: each global batch is a random draw of one modality, sorted longest
    first."""
    order = list(ModalityLengthGrouped(LENGTHS, batch_size=3, seed=0, megabatch_mult=1))
    for batch in _batches(order, 3)[:-2]:  # the last two hold the incomplete batches
        signs = {LENGTHS[i] > 0 for i in batch}
        assert len(signs) == 1
        assert [abs(LENGTHS[i]) for i in batch] == sorted(
            (abs(LENGTHS[i]) for i in batch), reverse=True
        )
    assert sorted(order) == list(range(23))


def test_grouped_sampler_shards_global_batches_of_one_modality_over_the_ranks(monkeypatch):
    """Under DDP (2 ranks) each rank takes every second index of the global order: the batches
    of one step hold one modality on both ranks, longest first; the shards cover the data."""
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(loader_mod, "_rank_world", lambda r=rank: (r, 2))
        s = ModalityLengthGrouped(LENGTHS, batch_size=2, seed=0, megabatch_mult=2)
        assert len(s) == 12  # 23 samples padded to 24
        shards.append(list(s))
        padded = s.global_order(2) + s.global_order(2)[:1]
        assert shards[-1] == padded[rank::2]
    assert set(shards[0]) | set(shards[1]) == set(range(23))
    for k in range(
        0, 8, 2
    ):  # the first 4 steps: full global batches (14 = 3 x 4 + 2, 9 = 2 x 4 + 1)
        step = shards[0][k : k + 2] + shards[1][k : k + 2]
        assert len({LENGTHS[i] > 0 for i in step}) == 1
        assert (
            abs(LENGTHS[shards[0][k]]) > abs(LENGTHS[shards[1][k]]) > abs(LENGTHS[shards[0][k + 1]])
        )


def test_grouped_loader_position_resumes_mid_epoch_and_at_the_epoch_end():
    """Like the shuffled loader: the state after every batch of three epochs, loaded into a
    fresh grouped loader, continues with exactly the uninterrupted batches."""

    def loader():
        return make_loader(list(range(23)), 4, torch.tensor, shuffle=True, seed=7, lengths=LENGTHS)

    dl, seq, states = loader(), [], []
    assert isinstance(dl.sampler, ModalityLengthGrouped)
    for epoch in range(3):
        dl.sampler.set_epoch(epoch)
        for b in dl:
            seq.append(b.tolist())
            states.append((epoch, dl.state_dict()))
    assert seq[:6] != seq[6:12]
    for k, (epoch, state) in enumerate(states):
        fresh = loader()
        fresh.load_state_dict(state)
        rest = []
        for e in range(epoch, 3):
            fresh.sampler.set_epoch(e)
            rest += _ids(fresh)
        assert rest == seq[k + 1 :], f"resumed after batch {k}"


def test_grouped_loader_refuses_lengths_of_another_data_set():
    with pytest.raises(DataError, match="lengths has 3 entries for 23 samples"):
        make_loader(list(range(23)), 4, torch.tensor, shuffle=True, seed=0, lengths=[1, -2, 3])
    with pytest.raises(DataError, match="non-zero"):
        ModalityLengthGrouped([1, 0, -1], batch_size=2, seed=0)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    torch.save({"rng": rng_state()}, tmp_path / "c.pt")
    first = (torch.rand(4), random.random(), np.random.rand(3))
    set_rng_state(torch.load(tmp_path / "c.pt", weights_only=True)["rng"])
    again = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert np.array_equal(first[2], again[2])


class _Toy(L.LightningModule):
    """One weight, a noisy loss (dropout draws from the global generator), the sample order and
    every validation step recorded and checkpointed like ``BridgeModule`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)
        self.seen: list[list[int]] = []
        self.history: list[int] = []
        self._rng = None

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[:, 0].int().tolist())
        return (torch.nn.functional.dropout(self.lin(batch), 0.5) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        return None

    def on_validation_epoch_end(self) -> None:
        self.history.append(self.global_step)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05)

    def on_save_checkpoint(self, checkpoint) -> None:
        checkpoint["toy"] = {
            "seen": list(self.seen),
            "history": list(self.history),
            "rng": rng_state(),
        }

    def on_load_checkpoint(self, checkpoint) -> None:
        self.seen, self.history = (
            list(checkpoint["toy"]["seen"]),
            list(checkpoint["toy"]["history"]),
        )
        self._rng = checkpoint["toy"]["rng"]

    def on_train_start(self) -> None:
        if self._rng is not None:
            set_rng_state(self._rng)


class _KeepLast(L.Callback):
    """Copies ``last.ckpt`` as it stands when each step starts (``atN.ckpt``) and when the
    validation of step N starts (``valN.ckpt``): what a kill there leaves."""

    def __init__(self, d: Path) -> None:
        self.d = d

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (self.d / "last.ckpt").exists():
            shutil.copy(self.d / "last.ckpt", self.d / f"at{trainer.global_step}.ckpt")

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and (self.d / "last.ckpt").exists():
            shutil.copy(self.d / "last.ckpt", self.d / f"val{trainer.global_step}.ckpt")


# the project's stage checkpoints (the two newest + last.ckpt, as training.checkpoint makes them;
# Lightning postpones a step-monitored save at an epoch's last batch to the next validation)
# and a plain last.ckpt at every step (so a checkpoint at an epoch's last batch exists)
CHECKPOINTS = {
    "two-newest": {"save_top_k": 2, "monitor": "step", "mode": "max"},
    "last-only": {"save_top_k": 0},
}


def _fit(d: Path, kind: str, ckpt_path: Path | None = None) -> _Toy:
    torch.manual_seed(0)
    data = [torch.tensor([float(i)]) for i in range(10)]
    module = _Toy()
    callbacks = [
        ResumableCheckpoint(
            dirpath=d,
            filename="{step}",
            save_last=True,
            every_n_train_steps=1,
            enable_version_counter=False,
            **CHECKPOINTS[kind],
        ),
        _KeepLast(d),
    ]
    trainer = L.Trainer(
        max_steps=12,
        val_check_interval=3,
        check_val_every_n_epoch=None,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    val = make_loader(data, 5, torch.stack, shuffle=False, seed=0)
    trainer.fit(
        module, make_loader(data, 3, torch.stack, shuffle=True, seed=0), val, ckpt_path=ckpt_path
    )
    module.stepped = trainer.fit_loop.epoch_loop._batches_that_stepped  # the loggers' step
    if validation_owed(trainer):  # as runtime.train.fit_stage does
        trainer.validate(module, val, verbose=False)
    return module


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize("kind", sorted(CHECKPOINTS))
def test_lightning_fit_resumes_exactly_from_the_checkpoint_of_every_step(tmp_path, kind):
    """12 steps of 4 batches per epoch, validation every 3 steps: resumed from what a kill leaves
    at each step (mid-epoch, at an epoch's last batch, at a validation step), the sample order,
    the weights and the validation history equal the uninterrupted run's."""
    full = _fit(tmp_path / "full", kind)
    assert [len(b) for b in full.seen[:4]] == [3, 3, 3, 1]  # epoch boundaries at steps 4 and 8
    assert full.seen[:4] != full.seen[4:8]  # each epoch in a new order
    assert full.history == [3, 6, 9, 12]
    for k in range(1, 12):
        snapshot = tmp_path / "full" / f"at{k}.ckpt"
        if kind == "last-only":  # a checkpoint of every step, epoch ends included
            assert torch.load(snapshot, weights_only=True)["global_step"] == k
        resumed = _fit(tmp_path / f"r{k}", kind, ckpt_path=snapshot)
        assert resumed.seen == full.seen, f"sample order after a kill at step {k}"
        assert resumed.history == full.history, f"validation history after a kill at step {k}"
        assert torch.equal(resumed.lin.weight, full.lin.weight) and torch.equal(
            resumed.lin.bias, full.lin.bias
        )


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize("kind", sorted(CHECKPOINTS))
def test_lightning_fit_resumed_from_a_kill_during_validation_keeps_its_point(tmp_path, kind):
    """What a kill during the validation of each validation step leaves (``last.ckpt`` as it
    starts) is, mid-epoch, the checkpoint saved before that validation, without its point
    (two-newest: Lightning postpones the save at an epoch's last batch, steps 4, 8 and 12, to
    after the validation). Resumed from it, the fit runs that validation again (at the last
    step after the fit, :func:`validation_owed`): the history, the sample order, the weights
    and the loggers' step count equal the uninterrupted run's, and the step's checkpoint then
    holds its point."""
    full = _fit(tmp_path / "full", kind)
    assert full.history == [3, 6, 9, 12]
    for k in (3, 6, 9, 12):
        snapshot = tmp_path / "full" / f"val{k}.ckpt"
        saved = torch.load(snapshot, weights_only=True)
        if kind == "last-only" or k % 4:
            assert saved["global_step"] == k and k not in saved["toy"]["history"], k
        d = tmp_path / f"v{k}"  # resumed in place, as resume=RUN does
        d.mkdir()
        shutil.copy(snapshot, d / "last.ckpt")
        resumed = _fit(d, kind, ckpt_path=d / "last.ckpt")
        assert resumed.history == full.history, f"validation history after a kill at {k}"
        assert resumed.seen == full.seen, f"sample order after a kill at {k}"
        assert torch.equal(resumed.lin.weight, full.lin.weight) and torch.equal(
            resumed.lin.bias, full.lin.bias
        )
        if k < 12:
            assert resumed.stepped == full.stepped
            again = torch.load(d / f"at{k}.ckpt", weights_only=True)
            assert again["global_step"] == k and again["toy"]["history"][-1] == k


DDP_SCRIPT = """
import json, os, shutil, sys, torch, lightning as L
from mmbridge.training.loader import make_loader
from mmbridge.training.resume import ResumableCheckpoint
d, ckpt, grouped = (
    sys.argv[1], (sys.argv[2] if sys.argv[2] != "-" else None), sys.argv[3] == "grouped"
)
class M(L.LightningModule):
    def __init__(self):
        super().__init__(); self.lin = torch.nn.Linear(1, 1); self.seen = []
    def training_step(self, b, i):
        self.seen.append(b[:, 0].int().tolist()); return (self.lin(b) ** 2).mean()
    def configure_optimizers(self): return torch.optim.SGD(self.parameters(), lr=0.01)
class Keep(L.Callback):
    def on_train_batch_start(self, t, m, b, i):
        if t.is_global_zero and os.path.exists(f"{d}/last.ckpt"):
            shutil.copy(f"{d}/last.ckpt", f"{d}/at{t.global_step}.ckpt")
torch.manual_seed(0)
m = M()
t = L.Trainer(max_steps=10, strategy="ddp", devices=2, accelerator="cpu", logger=False,
              enable_progress_bar=False, enable_model_summary=False,
              callbacks=[ResumableCheckpoint(dirpath=d, save_last=True, save_top_k=0,
                                             every_n_train_steps=1), Keep()])
data = [torch.tensor([float(i)]) for i in range(20)]
# grouped: even samples with media, odd ones text-only
lengths = [i + 1 if i % 2 == 0 else -(i + 1) for i in range(20)] if grouped else None
t.fit(m, make_loader(data, 3, torch.stack, shuffle=True, seed=0, lengths=lengths), ckpt_path=ckpt)
json.dump({"seen": m.seen, "w": m.lin.weight.item()}, open(f"{d}/rank{t.global_rank}.json", "w"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["shuffle", "grouped"])
def test_ddp_two_cpu_processes_resume_exactly(tmp_path, sampler):
    """Under DDP Lightning shards with a DistributedSampler (a DistributedSamplerWrapper around
    the grouped sampler); each rank's order after a resume mid-epoch (step 3) and at an
    epoch's end (step 4: 10 samples per rank, batches of 3) is the uninterrupted one, and so
    are the weights. Grouped, the first two steps of each epoch (the full global batches of 6)
    give both ranks samples of one modality."""
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)

    def fit(d: Path, ckpt: Path | None = None) -> list[dict]:
        d.mkdir()
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        out = subprocess.run(
            [sys.executable, str(script), str(d), str(ckpt) if ckpt else "-", sampler],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return [json.loads((d / f"rank{r}.json").read_text()) for r in (0, 1)]

    full = fit(tmp_path / "full")
    assert not {i for b in full[0]["seen"][:4] for i in b} & {
        i for b in full[1]["seen"][:4] for i in b
    }
    if sampler == "grouped":
        for step in (0, 1, 4, 5, 8, 9):
            assert len({i % 2 for r in (0, 1) for i in full[r]["seen"][step]}) == 1, step
    for k in (3, 4):
        resumed = fit(tmp_path / f"r{k}", tmp_path / "full" / f"at{k}.ckpt")
        for rank in (0, 1):
            assert resumed[rank]["w"] == full[rank]["w"], (k, rank)
            assert resumed[rank]["seen"][-(10 - k) :] == full[rank]["seen"][k:], (k, rank)


# --- the real CLI --------------------------------------------------------------------------

ARGS = [
    "experiment=tiny",
    "data.n_train=48",
    "data.n_val=8",
    "data.n_test=8",
    "evaluation.max_samples=8",
    "evaluation.val_samples=4",
    "evaluation.batch_size=8",
    "trainer.enable_progress_bar=false",
    "debug.record_sample_ids=true",
]
# 48 samples in batches of 8: an epoch is 6 steps; checkpoints every 3, validation every 6
for _stage in ("align", "instruct"):
    ARGS += [
        f"stages.{_stage}.batch_size=8",
        f"stages.{_stage}.max_steps=12",
        f"stages.{_stage}.val_every=6",
        f"+stages.{_stage}.checkpoint_every=3",
    ]


def _train(root: Path, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMBRIDGE_DISABLE_PLUGINS": "1", "COLUMNS": "200"}
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    return subprocess.run(
        [mmbridge_exe(), "train", *args],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=900,
    )


def _outcome(run: Path) -> tuple[dict, dict, dict]:
    metrics = json.loads((run / "metrics.json").read_text())
    weights = load_file(str(run / "checkpoints" / "final" / "weights.safetensors"))
    ids = {
        s: json.loads((run / "debug" / f"{s}_rank0_ids.json").read_text())["ids"]
        for s in ("align", "instruct")
    }
    return metrics, weights, ids


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_exact")
    run = root / "ref"
    out = _train(root, *ARGS, f"paths.cache_dir={root / 'cache'}", f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    return root, _outcome(run)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at",
    ["align:3", "align:6", "instruct:9"],
    ids=["in-align", "align-epoch-boundary-and-validation", "in-instruct"],
)
def test_sigkill_and_resume_is_bit_identical(uninterrupted, kill_at):
    root, (m0, w0, ids0) = uninterrupted
    stage, step = kill_at.split(":")
    run = root / f"kill_{stage}_{step}"
    out = _train(
        root, *ARGS, f"paths.cache_dir={root / 'cache'}", f"hydra.run.dir={run}", kill_at=kill_at
    )
    assert out.returncode == -9, out.stderr[
        -3000:
    ]  # the process crashed (SIGKILL), not a clean stop
    assert not (run / "metrics.json").exists()
    last = torch.load(
        run / "checkpoints" / stage / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert last["global_step"] == int(step)
    out = _train(root, f"resume={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    m1, w1, ids1 = _outcome(run)
    # the epoch boundary is real: the first 6 align steps see all 48 samples once, the next 6 again
    assert len(set(ids0["align"][:48])) == 48 and set(ids0["align"][48:]) == set(ids0["align"][:48])
    assert ids0["align"][48:] != ids0["align"][:48]
    assert ids1 == ids0  # the same samples in the same order, across the kill
    assert w1.keys() == w0.keys() and w0
    diff = {k: float((w0[k] - w1[k]).abs().max()) for k in w0 if not torch.equal(w0[k], w1[k])}
    assert not diff, f"tensors differ (max |diff|): {diff}"
    assert m1["test"] == m0["test"]
    for s in ("align", "instruct"):
        assert (
            m1["stages"][s]["history"] == m0["stages"][s]["history"]
        )  # every val point, same values
        assert [h["step"] for h in m1["stages"][s]["history"]] == [0.0, 6.0, 12.0]
        assert m1["stages"][s]["steps"] == 12
    assert m1["val_loss_last"] == m0["val_loss_last"]


# validation and a checkpoint every 2 steps of 4: steps 2 and 4 are mid-epoch (an epoch is 6
# steps), so Lightning saves them before their validation (at an epoch's last batch it waits)
VAL_KILL_ARGS = [a for a in ARGS if not a.lstrip("+").startswith("stages.")]
for _stage in ("align", "instruct"):
    VAL_KILL_ARGS += [
        f"stages.{_stage}.batch_size=8",
        f"stages.{_stage}.max_steps=4",
        f"stages.{_stage}.val_every=2",
        f"+stages.{_stage}.checkpoint_every=2",
    ]


@pytest.mark.slow
def test_sigkill_during_validation_and_resume_keeps_the_validation_point(tmp_path):
    """A kill during the validation of a checkpoint step, in the middle of align and at
    instruct's last step, each resumed with ``resume=RUN``: metrics.json's history (every
    point, same values), the test metrics, the sample order and the final weights equal the
    uninterrupted run's, and so does align's CSV log (the steps the loggers count)."""
    common = [*VAL_KILL_ARGS, f"paths.cache_dir={tmp_path / 'cache'}"]
    ref, run = tmp_path / "ref", tmp_path / "killed"
    out = _train(tmp_path, *common, f"hydra.run.dir={ref}")
    assert out.returncode == 0, out.stderr[-3000:]
    m0, w0, ids0 = _outcome(ref)

    def killed_before_the_point(stage: str, step: int) -> None:
        assert out.returncode == -9, out.stderr[-3000:]
        last = torch.load(
            run / "checkpoints" / stage / "last.ckpt", map_location="cpu", weights_only=True
        )
        assert last["global_step"] == step  # saved before the validation the kill came in
        assert step not in [h["step"] for h in last["mmbridge"]["history"]]

    out = _train(tmp_path, *common, f"hydra.run.dir={run}", kill_at="align:2:validation")
    killed_before_the_point("align", 2)
    out = _train(tmp_path, f"resume={run}", kill_at="instruct:4:validation")
    killed_before_the_point("instruct", 4)
    out = _train(tmp_path, f"resume={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    m1, w1, ids1 = _outcome(run)
    assert ids1 == ids0
    assert w1.keys() == w0.keys() and w0
    diff = {k: float((w0[k] - w1[k]).abs().max()) for k in w0 if not torch.equal(w0[k], w1[k])}
    assert not diff, f"tensors differ (max |diff|): {diff}"
    assert m1["test"] == m0["test"]
    for s in ("align", "instruct"):
        assert [h["step"] for h in m0["stages"][s]["history"]] == [0.0, 2.0, 4.0]
        assert m1["stages"][s]["history"] == m0["stages"][s]["history"]
    # (instruct's CSV lacks its step-2 row: Lightning's CSVLogger had not flushed it at the kill)
    csv = Path("logs", "align", "metrics.csv")
    assert (run / csv).read_text() == (ref / csv).read_text()
    assert m1["val_loss_last"] == m0["val_loss_last"]
