"""Several processes, one run directory (mmbridge.training.distributed): which process writes,
and the trained weights gathered whole from FSDP shards on rank 0.

Lightning's ``FSDPStrategy`` (FSDP1) refuses a CPU accelerator and FSDP1 itself needs an
accelerator device (torch: "FSDP needs a non-CPU accelerator device"), so the Lightning FSDP
run is a ``gpu`` test (tests/e2e/test_gpu.py). FSDP2 (``fully_shard``) runs on CPU processes
with gloo, and the gather goes through the same ``get_model_state_dict(full_state_dict=True,
cpu_offload=True)`` for both: that is tested here, with two real processes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import shared_registry, stage_of
from safetensors.torch import load_file

from mmbridge.config import compose
from mmbridge.model import assemble
from mmbridge.model.precision import resolve_auto_dtypes
from mmbridge.runtime.config import RunConfig
from mmbridge.training.checkpoint import _weights_to_save, load_weights
from mmbridge.training.distributed import (
    barrier,
    clean_name,
    gather_weights,
    global_rank,
    is_fsdp,
    is_global_zero,
    saved_names,
    unsharded_model,
)
from mmbridge.training.stages import configure_trainable

BASE = ["experiment=tiny", "encoder.image_size=32", "stages.instruct.train.llm=lora"]
RANK_KEYS = ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK")


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),  # one process
        ({"LOCAL_RANK": "1"}, 1),  # a process Lightning started on node 0
        ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, -1),  # node 1 without a global rank: not rank 0
        ({"SLURM_PROCID": "5", "LOCAL_RANK": "1"}, 5),  # srun's task id is the global rank
        ({"RANK": "3", "SLURM_PROCID": "5"}, 3),  # torchrun's RANK first
    ],
)
def test_global_rank_before_the_process_group_comes_from_the_launcher(monkeypatch, env, rank):
    for key in RANK_KEYS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert global_rank() == rank
    assert is_global_zero() == (rank == 0)
    barrier()  # one process: returns at once


def test_clean_name_drops_the_wrappers_parts():
    assert (
        clean_name("llm.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.w")
        == "llm.layers.0.mlp.w"
    )
    assert clean_name("branches.image.connector.0.weight") == "branches.image.connector.0.weight"


def test_one_process_gathers_exactly_what_a_checkpoint_saves_and_rebuilds_an_equal_model():
    cfg = compose(BASE, shared_registry())
    torch.manual_seed(0)
    model = assemble(cfg, shared_registry())
    configure_trainable(model, stage_of(cfg, "align"))
    configure_trainable(model, stage_of(cfg, "instruct"))  # connector (align) + LoRA (instruct)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # not the zeros of a fresh injection
    saved = _weights_to_save(model)
    got = gather_weights(model)
    assert not is_fsdp(model)
    assert got.keys() == saved.keys() == saved_names(model)
    assert any("lora_B" in k for k in got) and any(
        k.startswith("branches.image.connector.") for k in got
    )
    for k in saved:
        assert torch.equal(got[k], saved[k]), k
    run = RunConfig.parse(cfg)
    plain = unsharded_model(
        resolve_auto_dtypes(run.model, run.scheduled, run.trainer, "float32"),
        shared_registry(),
        torch.device("cpu"),
        [run.stages["align"], run.stages["instruct"]],
        got,
    )
    assert not plain.training
    own = dict(plain.named_parameters())
    for k, v in saved.items():
        assert torch.equal(own[k], v), k
    load_weights(plain, got, "again")  # the same names and shapes a checkpoint load checks


def test_unsharded_session_keeps_the_session_and_swaps_in_a_model_with_the_weights(tmp_path):
    from mmbridge.runtime.session import open_session
    from mmbridge.runtime.train import unsharded_session

    cfg = compose([*BASE, "trainer=fp32", f"paths.cache_dir={tmp_path}"], shared_registry())
    session = open_session(cfg, shared_registry(), with_data=False)
    configure_trainable(session.model, stage_of(cfg, "align"))
    with torch.no_grad():
        for p in session.model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    weights = gather_weights(session.model)
    for broadcast in (False, True):  # one process: the broadcast is rank 0's own load
        copy = unsharded_session(session, ["align"], weights, broadcast=broadcast)
        assert (
            copy.model is not session.model
            and copy.chat is session.chat
            and copy.cfg is session.cfg
        )
        own = dict(copy.model.named_parameters())
        assert set(weights) == saved_names(copy.model)
        for k, v in weights.items():
            assert torch.equal(own[k], v), k


WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from torch import nn
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from mmbridge.config import compose
    from mmbridge.model import assemble
    from mmbridge.model.precision import resolve_auto_dtypes
    from mmbridge.registry.plugin_manager import load_registry
    from mmbridge.runtime.config import RunConfig
    from mmbridge.training.stages import configure_trainable
    from mmbridge.training.strategies import block_classes
    from mmbridge.training.distributed import gather_weights, is_fsdp, saved_names, unsharded_model

    class Root(nn.Module):  # what Lightning wraps: a module holding the model
        def __init__(self, model):
            super().__init__()
            self.model = model

    def main(rank, port, out):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        dist.init_process_group("gloo", rank=rank, world_size=2)
        torch.set_num_threads(1)
        reg = load_registry(autoload=False)
        cfg = compose({base!r}, reg)
        torch.manual_seed(0)  # the same model on both ranks
        model = assemble(cfg, reg)
        run = RunConfig.parse(cfg)
        stages = [run.stages["align"], run.stages["instruct"]]
        for stage in stages:
            configure_trainable(model, stage)
        names = sorted(saved_names(model))
        before = {{n: p.detach().clone() for n, p in model.named_parameters() if n in names}}
        mesh = init_device_mesh("cpu", (2,))
        root = Root(model)
        for m in list(root.modules()):
            if type(m) in block_classes(model):
                fully_shard(m, mesh=mesh)
        fully_shard(root, mesh=mesh)
        local = {{n: p.to_local().shape for n, p in model.named_parameters()}}
        with torch.no_grad():  # each rank changes its own shard: only a gather sees all of it
            for p in root.parameters():
                p.to_local().add_(1.0 + rank)
        got = gather_weights(model, root)
        if rank == 0:
            save_file(
                {{k: v.contiguous() for k, v in got.items()}}, f"{{out}}/gathered.safetensors"
            )
            save_file(before, f"{{out}}/before.safetensors")
            sharded = [n for n in names if local[n] != before[n].shape]
            open(f"{{out}}/rank0.txt", "w").write(f"{{is_fsdp(model)}} {{len(sharded)}}")
        else:
            open(f"{{out}}/rank1.txt", "w").write(str(len(got)))
        # the next stage's plain copy on every rank: rank 0's gathered weights broadcast
        model_cfg = resolve_auto_dtypes(run.model, run.scheduled, run.trainer, "float32")
        fresh = unsharded_model(
            model_cfg, reg, torch.device("cpu"), stages, got, broadcast=True
        )
        own = dict(fresh.named_parameters())
        save_file(
            {{n: own[n].detach().contiguous() for n in names}}, f"{{out}}/fresh{{rank}}.safetensors"
        )
        dist.destroy_process_group()

    if __name__ == "__main__":
        torch.multiprocessing.spawn(main, args=(sys.argv[1], sys.argv[2]), nprocs=2)
""").format(base=BASE)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.slow
def test_fsdp_shards_on_two_cpu_processes_are_gathered_whole_on_rank_0(tmp_path):
    """Two gloo processes shard the tiny model per decoder / encoder block (FSDP2); each adds
    ``1 + rank`` to its own shards; rank 0 gathers: every saved tensor has the full shape, the
    first half of each flat tensor +1 and the second half +2. Then both ranks rebuild a plain
    model from rank 0's weights (broadcast), as a run does before its next stage."""
    script = tmp_path / "fsdp_worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in RANK_KEYS}
    env.update(HF_HUB_OFFLINE="1", MMBRIDGE_DISABLE_PLUGINS="1")
    out = subprocess.run(
        [sys.executable, str(script), _free_port(), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    fsdp, n_sharded = (tmp_path / "rank0.txt").read_text().split()
    assert fsdp == "True" and int(n_sharded) > 0  # the shards really were partial on each rank
    assert (tmp_path / "rank1.txt").read_text() == "0"  # cpu_offload: only rank 0 holds them
    got = load_file(str(tmp_path / "gathered.safetensors"))
    before = load_file(str(tmp_path / "before.safetensors"))
    assert got.keys() == before.keys()
    assert any("lora_B" in k for k in got) and any(
        k.startswith("branches.image.connector.") for k in got
    )
    for r in (0, 1):  # both ranks go on with a plain copy holding rank 0's gathered weights
        fresh = load_file(str(tmp_path / f"fresh{r}.safetensors"))
        assert fresh.keys() == got.keys()
        for k in got:
            assert torch.equal(fresh[k], got[k]), (r, k)
    for k, b in before.items():
        assert got[k].shape == b.shape, k
        rows = b.shape[0] if b.dim() else 1
        half = (rows + 1) // 2  # FSDP2 shards dim 0, rank 0 holds the first ceil(rows / 2) rows
        delta = (got[k] - b).reshape(rows, -1)
        torch.testing.assert_close(delta[:half], torch.full_like(delta[:half], 1.0), msg=k)
        torch.testing.assert_close(delta[half:], torch.full_like(delta[half:], 2.0), msg=k)


@pytest.mark.parametrize(
    ("preset", "sharded"),
    [
        ("fsdp", True),
        ("deepspeed_zero3", True),
        ("deepspeed_zero2", False),
        ("gpu_ddp", False),
        ("slurm_ddp", False),
        ("ddp_cpu", False),
        ("cpu", False),
    ],
)
def test_the_presets_that_shard_parameters_in_place(preset, sharded):
    from mmbridge.training.strategies import shards_parameters

    assert (
        shards_parameters(compose([*BASE, f"trainer={preset}"], shared_registry()).trainer)
        is sharded
    )
