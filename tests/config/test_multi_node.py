"""``trainer=slurm_ddp``: DDP across nodes with the processes started by ``srun``. Under a SLURM
allocation (its environment variables, as srun sets them for one task) the preset takes the GPUs
per node and the nodes from it, and Lightning detects SLURM and gives the task its ranks."""

from __future__ import annotations

import os

import lightning as L
import pytest
from helpers import shared_registry
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only

from mmbridge.config import compose
from mmbridge.config.validation import config_errors
from mmbridge.runtime.config import RunConfig
from mmbridge.training.distributed import global_rank
from mmbridge.training.trainer import PrecisionDecision, trainer_kwargs

#: Task 13 of a 2 nodes x 8 GPUs job: the 6th GPU (local id 5) of the second node.
SLURM_TASK = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "mmbridge",
    "SLURM_NTASKS": "16",
    "SLURM_NTASKS_PER_NODE": "8",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NNODES": "2",
    "SLURM_PROCID": "13",
    "SLURM_LOCALID": "5",
    "SLURM_NODEID": "1",
    "SLURM_NODELIST": "gpu[017-018]",
}
LAUNCHER_KEYS = ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: The launcher variables as the session started (none outside a launcher).
BEFORE = {k: os.environ.get(k) for k in (*LAUNCHER_KEYS, *SLURM_TASK)}


@pytest.fixture
def no_launcher(monkeypatch):
    """No launcher variables during the test, and the environment as it was afterwards: Lightning's
    SLURMEnvironment writes MASTER_ADDR / MASTER_PORT into ``os.environ`` itself (monkeypatch does
    not undo that), and a leaked ``MASTER_ADDR=gpu017`` hangs every later multi-process test.
    Likewise the Trainer of task 13 sets ``rank_zero_only.rank = 13`` process-wide, which would
    silence every later rank-zero-only logger call: restored too."""
    saved, rank = dict(os.environ), getattr(rank_zero_only, "rank", 0)
    for key in (*LAUNCHER_KEYS, *SLURM_TASK):
        monkeypatch.delenv(key, raising=False)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)
    rank_zero_only.rank = rank


def test_outside_slurm_the_preset_is_one_gpu_on_one_node(no_launcher):
    cfg = compose(["experiment=tiny", "trainer=slurm_ddp"], shared_registry())
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.strategy) == (1, 1, "ddp")
    assert config_errors(cfg, shared_registry()) == []


def test_under_srun_lightning_takes_the_allocation_and_the_task_ranks(no_launcher):
    for key, value in SLURM_TASK.items():
        no_launcher.setenv(key, value)
    cfg = compose(["experiment=tiny", "trainer=slurm_ddp"], shared_registry())
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (8, 2)  # ints, from the allocation
    assert config_errors(cfg, shared_registry()) == []
    run = RunConfig.parse(cfg)
    kw = trainer_kwargs(run.trainer, run.device, PrecisionDecision("32-true", "float32", "test"))
    assert kw["precision"] == "32-true" and kw["strategy"] == "ddp"
    kw["accelerator"] = "cpu"  # no GPU here: the same process layout on CPU processes
    trainer = L.Trainer(**kw, logger=False, enable_checkpointing=False)
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.creates_processes_externally
    assert env.main_address == "gpu017"  # the first node of the allocation hosts rank 0
    assert (
        trainer.world_size,
        trainer.num_nodes,
        trainer.global_rank,
        trainer.local_rank,
        trainer.node_rank,
    ) == (16, 2, 13, 5, 1)
    assert global_rank() == 13 and not trainer.is_global_zero  # this task writes nothing


def test_the_slurm_test_leaves_no_launcher_variable_behind():
    """Runs after the two above (file order): nothing of the fake task is left in the
    environment for the multi-process tests that start later in the same session."""
    assert {k: os.environ.get(k) for k in (*LAUNCHER_KEYS, *SLURM_TASK)} == BEFORE
    assert getattr(rank_zero_only, "rank", 0) == 0
