"""Data loaders whose position survives a kill: the training order is a pure function of
``(seed, epoch)`` and the position in the epoch is part of Lightning's checkpoint.

Lightning (2.x) stores ``state_dict()`` of every training loader that has one in the
checkpoint (``FitLoop.on_save_checkpoint`` -> ``loops.fit_loop.state_dict.combined_loader``)
and hands it back to ``load_state_dict`` before the first batch of a resumed ``fit``
(``FitLoop._load_combined_loader_states``), so a :class:`~torchdata.stateful_dataloader.
StatefulDataLoader` continues with the batch after the last one trained. Its default
shuffling is not enough for an exact resume: the sampler shares the loader's generator with
the per-iterator base seed, so after a resume every later epoch is drawn from a different
generator state. :class:`EpochShuffle` draws each epoch's permutation from a generator seeded
by ``(seed, epoch)`` (the way ``DistributedSampler`` does), with the epoch set by Lightning
(``set_epoch``) and restored with the position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, RandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from mmbridge.errors import CheckpointError


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator for ``epoch`` of a run seeded with ``seed``: independent streams per epoch
    (NumPy's ``SeedSequence`` mixes the pair, so ``(0, 1)`` and ``(1, 0)`` differ)."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class EpochShuffle(RandomSampler):
    """Shuffles anew each epoch; the order is a function of ``(seed, epoch)`` only.

    A ``RandomSampler`` subclass on purpose: under DDP, Lightning replaces a
    ``RandomSampler`` with a ``DistributedSampler(shuffle=True, seed=<run seed>)`` (an order
    that is a function of seed and epoch too, fast-forwarded by ``StatefulDataLoader`` on
    resume) instead of wrapping it.

    The state (``state_dict``) is ``{"seed", "epoch", "yielded"}``: the generator of the
    epoch is re-derived from ``(seed, epoch)``, and ``yielded`` indices of it are skipped on
    the next pass over that same epoch. A position recorded at the end of an epoch therefore
    yields nothing if that epoch is iterated again, and is dropped once ``set_epoch`` moves on.

    Args:
        data_source: The data set (only its length is used).
        seed: The run's seed.
    """

    def __init__(self, data_source: Sized, seed: int) -> None:
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0
        self.yielded = 0
        self._resume_at: tuple[int, int] | None = None  # (epoch, position) from load_state_dict

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch (``_set_sampler_epoch``)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._resume_at is not None and self._resume_at[0] == self.epoch:
            start = self._resume_at[1]
        self._resume_at = None
        perm = torch.randperm(len(self.data_source), generator=epoch_generator(self.seed, self.epoch))
        self.yielded = start
        for i in perm[start:].tolist():
            self.yielded += 1
            yield i

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise CheckpointError(f"the checkpoint's data order was drawn with seed={state['seed']}, "
                                  f"this run has seed={self.seed}; resume with the run's own config")
        self.epoch = int(state["epoch"])
        self.yielded = int(state["yielded"])
        self._resume_at = (self.epoch, self.yielded)


class ResumableLoader(StatefulDataLoader):
    """``StatefulDataLoader`` that also restores the epoch of a ``DistributedSampler``.

    Under DDP Lightning puts a ``DistributedSampler`` in place of :class:`EpochShuffle`; it has
    no state of its own, so the loader fast-forwards its position, but the permutation it skips
    into depends on the epoch, which Lightning sets only after the resumed iterator exists. The
    epoch is therefore saved with the position and set before the iterator is made. (Checked
    with a two-process CPU ``fit``: resumed mid-epoch and at an epoch's end, every rank's order
    and the weights equal the uninterrupted run's.)
    """

    def _distributed_sampler(self) -> DistributedSampler | None:
        # Lightning rebuilds the batch sampler around its DistributedSampler, so it is found
        # there (``batch_sampler.sampler``) rather than as ``sampler``
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if isinstance(sampler, DistributedSampler):
                return sampler
        return None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if (sampler := self._distributed_sampler()) is not None:
            state = {**state, "distributed_sampler_epoch": int(sampler.epoch)}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        epoch = state.pop("distributed_sampler_epoch", None)
        if epoch is not None and (sampler := self._distributed_sampler()) is not None:
            if state.get("_sampler_iter_state", {}).get("samples_yielded", 0) >= len(sampler):
                # saved at an epoch's last batch: Lightning counts that epoch done and takes the
                # next batches from this loader's next iterator, which must be the next epoch's
                sampler.set_epoch(epoch + 1)
                state = {}
            else:
                sampler.set_epoch(epoch)
        super().load_state_dict(state)


def make_loader(ds: Dataset, batch_size: int, collate: Callable[[list[Any]], Any], *, shuffle: bool,
                seed: int, num_workers: int = 0) -> ResumableLoader:
    """A :class:`ResumableLoader` over ``ds``; shuffled by :class:`EpochShuffle` when ``shuffle``.

    Args:
        ds: A map-style data set.
        batch_size: Samples per batch (the last batch of an epoch may be smaller).
        collate: Builds a batch from a list of samples.
        shuffle: Shuffle each epoch (training) or keep the data set's order (evaluation).
        seed: The run's seed (the shuffle order and the worker seeds derive from it).
        num_workers: Loader processes (``loader.num_workers``); 0 loads in the main process.
    """
    sampler = EpochShuffle(ds, seed) if shuffle else None
    return ResumableLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                              num_workers=num_workers, persistent_workers=num_workers > 0,
                              generator=torch.Generator().manual_seed(seed))
