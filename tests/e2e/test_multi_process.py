"""A real two-process DDP run (CPU, gloo) through the CLI: rank 0 alone writes the run's files,
the checkpoints hold the weights both ranks trained, and the final evaluation is the whole
test split's, equal to what one process's ``mmbridge eval`` of the checkpoint reports."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from helpers import mmbridge_exe
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

N_TEST = 8
FAST = [
    "experiment=tiny",
    "trainer=ddp_cpu",
    "encoder.image_size=32",
    "data.n_train=32",
    "data.n_val=8",
    f"data.n_test={N_TEST}",
    f"evaluation.max_samples={N_TEST}",
    "evaluation.val_samples=4",
    "evaluation.batch_size=8",
    "trainer.enable_progress_bar=false",
    "stages.align.batch_size=4",
    "stages.instruct.batch_size=4",
    "stages.align.max_steps=2",
    "stages.align.val_every=2",
    "stages.instruct.max_steps=2",
    "stages.instruct.val_every=2",
    "debug.record_sample_ids=true",
]
RANK_KEYS = ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")


def cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in RANK_KEYS}
    env.update(HF_HUB_OFFLINE="1", MMBRIDGE_DISABLE_PLUGINS="1", COLUMNS="200")
    return subprocess.run(
        [mmbridge_exe(), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900
    )


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    run = root / "run"
    out = cli("train", *FAST, f"paths.cache_dir={root / 'cache'}", f"hydra.run.dir={run}", cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    # Lightning starts rank 1 with hydra.job.name=train_ddp_process_1: its own log file
    return root, run, out.stderr + "".join(p.read_text() for p in sorted(run.glob("*.log")))


def test_rank_0_alone_evaluates_the_whole_test_split(ddp_run):
    _, run, log = ddp_run
    m = json.loads((run / "metrics.json").read_text())
    assert sorted(s["rank"] for s in m["stages"].values()) == [0, 0]  # written by rank 0
    assert m["test"]["n"] == N_TEST  # the whole split, not one rank's half
    preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    for mode in ("media", "no_media"):
        ids = [p["id"] for p in preds if p["mode"] == mode]
        assert len(ids) == len(set(ids)) == N_TEST  # each answer once: one process wrote them
    assert "rank 1: done; rank 0 evaluates and writes metrics.json" in log
    assert "rank 0: done" not in log


def test_checkpoints_hold_the_weights_both_ranks_trained(ddp_run):
    _, run, _ = ddp_run
    for stage, export in (("align", "align_final"), ("instruct", "final")):
        ranks = [
            load_file(str(run / "debug" / f"{stage}_rank{r}_weights.safetensors")) for r in (0, 1)
        ]
        saved = load_file(str(run / "checkpoints" / export / "weights.safetensors"))
        assert ranks[0].keys() == ranks[1].keys() and ranks[0].keys() <= saved.keys()
        for k in ranks[0]:
            assert torch.equal(ranks[0][k], ranks[1][k]), k  # DDP kept the replicas equal
            assert torch.equal(saved[k], ranks[0][k]), k
    final = load_file(str(run / "checkpoints" / "final" / "weights.safetensors"))
    align = load_file(str(run / "checkpoints" / "align_final" / "weights.safetensors"))
    # the connector trained in align and stays in the final checkpoint (ever trained)
    assert any(k.startswith("branches.image.connector.") for k in final)
    assert align.keys() <= final.keys()


def test_one_process_eval_of_the_checkpoint_gives_the_runs_figures(ddp_run):
    root, run, _ = ddp_run
    out = cli(
        "eval",
        f"checkpoint={run / 'checkpoints' / 'final'}",
        "device=cpu",
        "trainer=cpu",
        f"max_samples={N_TEST}",
        f"out={root / 'eval.json'}",
        cwd=root,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ev = json.loads((root / "eval.json").read_text())
    test = json.loads((run / "metrics.json").read_text())["test"]
    for key in ("n", "exact_match", "no_media/exact_match"):
        assert ev[key] == pytest.approx(test[key]), key
