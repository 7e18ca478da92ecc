"""Several processes, one run directory: who writes, and the trained weights gathered whole.

Under DDP, FSDP or DeepSpeed every process runs :func:`mmbridge.runtime.train.train`. The rule:

- **global rank 0 alone writes** the run's files (``metrics.json``, ``state.json``, the mmbridge
  checkpoints, predictions, reports); the other ranks wait at a :func:`barrier` where a later
  step reads what rank 0 wrote;
- **the trained weights are gathered before they are written**: under FSDP and ZeRO-3 a
  process holds only a shard of each parameter, so :func:`gather_weights` asks every rank for
  its shards (a collective: every rank calls it) and rank 0 gets the full tensors, on the CPU;
- **the final evaluation runs on rank 0 alone, on the whole test split**, with an unsharded
  model (:func:`unsharded_model` where training sharded it); the other ranks finish without
  waiting for it (a long evaluation would outlast the process group's collective timeout);
- **after a sharded stage the next one starts from a plain copy** (:func:`unsharded_model`
  with ``broadcast``): rank 0's gathered weights broadcast to a freshly assembled model.
  Sharding the evaluation set and gathering the answers would be faster on many GPUs, but
  generation is a small share of a run and one process keeps the figures exactly those of
  ``mmbridge eval`` on the same checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

from mmbridge.config.model_spec import ModelConfig
from mmbridge.config.schema import Stage
from mmbridge.model import MultimodalModel, assemble
from mmbridge.training.checkpoint import load_weights
from mmbridge.training.stages import configure_trainable

if TYPE_CHECKING:
    from mmbridge.registry import Registry

log = logging.getLogger(__name__)

#: Name parts that FSDP and activation checkpointing insert into the wrapped modules' names.
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def global_rank() -> int:
    """This process's global rank: the process group's once it exists, before that what the
    launcher put in the environment (``RANK``, SLURM's ``SLURM_PROCID``, or Lightning's
    ``NODE_RANK`` / ``LOCAL_RANK`` for the processes it starts); 0 for a single process.

    A process whose node rank is not 0 but whose global rank is unknown reports ``-1`` (not
    rank 0: it must not write)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    return local if int(os.environ.get("NODE_RANK", "0") or 0) == 0 else -1


def is_global_zero() -> bool:
    """Whether this process writes the run's files (:func:`global_rank` is 0)."""
    return global_rank() == 0


def world_size() -> int:
    """Processes in the process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (a no-op for a single process or without a process group)."""
    if world_size() > 1:
        dist.barrier()


def clean_name(name: str) -> str:
    """A parameter name without the wrappers' parts (``llm.layers.0._fsdp_wrapped_module.w``
    -> ``llm.layers.0.w``): the name the unwrapped model and its checkpoints use."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def saved_names(model: MultimodalModel) -> set[str]:
    """The (clean) names of the parameters a checkpoint holds: those that train now and those
    that trained in an earlier stage (``model.ever_trained``)."""
    return {
        clean_name(n)
        for n, p in model.named_parameters()
        if p.requires_grad or clean_name(n) in model.ever_trained or n in model.ever_trained
    }


def is_fsdp(model: nn.Module) -> bool:
    """Whether FSDP (``FullyShardedDataParallel``, which wraps modules in place, or FSDP2's
    ``fully_shard``, which shards them in place) sharded some of ``model``'s modules."""
    return any(isinstance(m, FullyShardedDataParallel | FSDPModule) for m in model.modules())


def is_zero3(model: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitioned ``model``'s parameters (they carry a ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _prefix(root: nn.Module, model: nn.Module) -> str:
    """The clean name of ``model`` inside ``root`` plus a dot (``""`` when they are one)."""
    for name, m in root.named_modules():
        if m is model:
            name = clean_name(name + ".") if name else ""
            return name
    raise ValueError("the model is not a submodule of the wrapped root module")


def gather_weights(
    model: MultimodalModel, root: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds (:func:`saved_names`), whole, on global rank 0.

    Under FSDP this is a collective (every rank must call it): the full state dict is gathered
    with ``torch.distributed.checkpoint.state_dict.get_model_state_dict(root,
    full_state_dict=True, cpu_offload=True)``, which leaves the full tensors on rank 0's CPU
    and an empty dict on the other ranks. Under DeepSpeed ZeRO-3 the partitioned parameters
    are gathered with ``deepspeed.zero.GatheredParameters`` (every rank calls). Otherwise
    (one process, DDP, ZeRO-1/2: every rank holds the whole model) the model's own tensors.

    Args:
        model: The model that trained (FSDP wraps its submodules in place).
        root: The module the strategy wrapped (``trainer.strategy.model``: the FSDP root
            around the LightningModule); needed under FSDP, where it holds the root's shards.

    Returns:
        Clean parameter name -> tensor (``[same shape as the unwrapped parameter]``); empty on
        ranks other than 0 under FSDP and ZeRO-3.
    """
    names = saved_names(model)
    if is_fsdp(model):
        if root is None:
            raise ValueError("gather_weights: an FSDP model needs the wrapped root module")
        full = get_model_state_dict(
            root, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        prefix = _prefix(root, model)
        # a model's state dict holds tensors only (the DCP types allow containers in general)
        return {
            k[len(prefix) :]: cast(torch.Tensor, v)
            for k, v in full.items()
            if k.startswith(prefix) and k[len(prefix) :] in names
        }
    if is_zero3(model):
        import deepspeed  # type: ignore[import-not-found]  # only ZeRO-3 runs reach here: installed there

        params = {clean_name(n): p for n, p in model.named_parameters() if clean_name(n) in names}
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return (
                {n: p.detach().cpu().clone() for n, p in params.items()} if is_global_zero() else {}
            )
    return {
        clean_name(n): p.detach() for n, p in model.named_parameters() if clean_name(n) in names
    }


def broadcast_weights(model: MultimodalModel, weights: dict[str, torch.Tensor]) -> None:
    """Load rank 0's ``weights`` into every rank's ``model`` (a collective: every rank calls).

    Rank 0 loads them (:func:`~mmbridge.training.checkpoint.load_weights` checks names and
    shapes), then each saved parameter is broadcast in place, one tensor at a time (no rank
    holds a second copy of the model); the other ranks' ``weights`` are ignored (empty)."""
    if is_global_zero():
        load_weights(model, weights, "the weights gathered from the ranks")
    if world_size() == 1:
        return
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(saved_names(model)):
            dist.broadcast(own[name].data, src=0)


def unsharded_model(
    model_cfg: ModelConfig,
    registry: Registry,
    device: torch.device,
    stages_done: Sequence[Stage],
    weights: dict[str, torch.Tensor],
    broadcast: bool = False,
) -> MultimodalModel:
    """A plain (not sharded) copy of the trained model: assembled from ``model_cfg`` as
    ``mmbridge eval`` assembles it from a checkpoint, configured for ``stages_done`` (LoRA
    layers), with the gathered ``weights``.

    FSDP and ZeRO-3 shard the model's modules in place, and a later stage changes which
    parameters train (LoRA layers injected into wrapped blocks would escape the sharding), so
    after a sharded stage the run goes on with such a copy: on rank 0 alone for the final
    evaluation, on every rank (``broadcast``) before the next stage.

    Args:
        model_cfg: The run's component nodes with their ``dtype: auto`` decided
            (:func:`mmbridge.model.precision.resolve_auto_dtypes`).
        registry: The run's registry.
        device: Where the model lives (this rank's device).
        stages_done: The stages that trained, in order.
        weights: :func:`gather_weights` on rank 0 (empty on the other ranks).
        broadcast: Every rank calls and gets rank 0's weights (:func:`broadcast_weights`).
    """
    model = assemble(model_cfg, registry).to(device)
    for stage in stages_done:
        configure_trainable(model, stage)
    if broadcast:
        broadcast_weights(model, weights)
    else:
        load_weights(model, weights, "the weights gathered from the ranks")
    return model.eval()
