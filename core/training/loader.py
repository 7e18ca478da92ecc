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

from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, RandomSampler, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from mmbridge.contracts.types import Sample
from mmbridge.errors import CheckpointError, ConfigError, DataError


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator for ``epoch`` of a run seeded with ``seed``: independent streams per epoch
    (NumPy's ``SeedSequence`` mixes the pair, so ``(0, 1)`` and ``(1, 0)`` differ)."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class _EpochPosition:
    """The resumable part of a sampler whose epoch order is a function of ``(seed, epoch)``.

    The state (``state_dict``) is ``{"seed", "epoch", "yielded"}``: the order of the epoch is
    re-derived from ``(seed, epoch)`` (:meth:`_order`), and ``yielded`` indices of it are
    skipped on the next pass over that same epoch. A position recorded at the end of an epoch
    therefore yields nothing if that epoch is iterated again, and is dropped once ``set_epoch``
    moves on.
    """

    seed: int
    epoch: int
    yielded: int
    _resume_at: tuple[int, int] | None

    def _start(self, seed: int) -> None:
        self.seed = int(seed)
        self.epoch = 0
        self.yielded = 0
        self._resume_at = None  # (epoch, position) from load_state_dict

    def _order(self) -> list[int]:
        """The indices of epoch ``self.epoch``, in the order they are drawn."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch (``_set_sampler_epoch``)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._resume_at is not None and self._resume_at[0] == self.epoch:
            start = self._resume_at[1]
        self._resume_at = None
        order = self._order()
        self.yielded = start
        for i in order[start:]:
            self.yielded += 1
            yield i

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise CheckpointError(
                f"the checkpoint's data order was drawn with seed={state['seed']}, "
                f"this run has seed={self.seed}; resume with the run's own config"
            )
        self.epoch = int(state["epoch"])
        self.yielded = int(state["yielded"])
        self._resume_at = (self.epoch, self.yielded)


class EpochShuffle(_EpochPosition, RandomSampler):
    """Shuffles anew each epoch; the order is a function of ``(seed, epoch)`` only.

    A ``RandomSampler`` subclass on purpose: under DDP, Lightning replaces a
    ``RandomSampler`` with a ``DistributedSampler(shuffle=True, seed=<run seed>)`` (an order
    that is a function of seed and epoch too, fast-forwarded by ``StatefulDataLoader`` on
    resume) instead of wrapping it. The position is kept as :class:`_EpochPosition` says.

    Args:
        data_source: The data set (only its length is used).
        seed: The run's seed.
    """

    def __init__(self, data_source: Sized, seed: int) -> None:
        RandomSampler.__init__(self, data_source)
        self._start(seed)

    def _order(self) -> list[int]:
        return torch.randperm(
            len(self.data_source), generator=epoch_generator(self.seed, self.epoch)
        ).tolist()


def modality_lengths(samples: Iterable[Sample]) -> list[int]:
    """LLaVA's ``modality_lengths``: per sample the number of words of its conversation,
    positive for a sample with media and negative for a text-only one (never 0).

    Words, not tokens: the grouping only needs to rank samples by length, and counting words
    costs no tokenizer pass over the data set.
    """
    out = []
    for s in samples:
        n = max(1, sum(len(t["value"].split()) for t in s.conversations))
        out.append(n if s.media else -n)
    return out


def _rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ModalityLengthGrouped(_EpochPosition, DistributedSampler):
    """LLaVA's ``group_by_modality_length`` (``loader.group_by_length``): batches of similar
    length, samples with media and text-only samples never in the same batch but the last.

    Each epoch (an order that is a function of ``(seed, epoch)``, resumable like
    :class:`EpochShuffle`): per modality (sign of ``lengths``) the indices are shuffled, cut into
    megabatches of ``megabatch_mult`` global batches, each megabatch sorted by length (longest
    first) and cut into global batches (``batch_size`` x world size samples); the global
    batches of both modalities are then shuffled together. The two incomplete global batches
    (one per modality) come last, so only the epoch's last batch can mix the two.

    It shards itself: rank ``r`` takes every world-size-th index of the global order from
    ``r`` (padded like ``DistributedSampler``), so each global batch becomes one batch per rank,
    all of one modality and, the global batch being sorted, of similar lengths. Rank and world
    size are read when an epoch starts and by ``len`` (DDP is set up by then). A
    ``DistributedSampler`` subclass on purpose: Lightning would otherwise wrap it in a
    ``DistributedSamplerWrapper`` that shuffles the order again for training (breaking the
    groups); a ``DistributedSampler`` it leaves as it is.

    Args:
        lengths: Per sample, its length; > 0 with media, < 0 text-only
            (:func:`modality_lengths`).
        batch_size: Samples per batch (per process).
        seed: The run's seed.
        megabatch_mult: Global batches per length-sorted megabatch (Hugging Face's
            ``LengthGroupedSampler`` uses 50): larger groups lengths more tightly, smaller
            keeps more randomness.

    Raises:
        DataError: for a length of 0.
        ConfigError: for a batch size or multiplier below 1.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int, megabatch_mult: int = 50
    ) -> None:
        # DistributedSampler.__init__ is not called: it needs the process group, which Lightning
        # creates after the loaders; rank and world size are read when they are needed
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if (self.lengths == 0).any():
            raise DataError(
                f"modality lengths must be non-zero "
                f"(sample {int(np.flatnonzero(self.lengths == 0)[0])})"
            )
        if batch_size < 1 or megabatch_mult < 1:
            raise ConfigError(
                f"batch_size ({batch_size}) and megabatch_mult ({megabatch_mult}) must be >= 1"
            )
        self.batch_size = int(batch_size)
        self.megabatch_mult = int(megabatch_mult)
        self.shuffle, self.drop_last = True, False
        self._start(seed)

    # read when needed (the process group exists only after the loaders are built); nothing
    # assigns them, so DistributedSampler's plain attributes can be read-only properties here
    @property
    def rank(self) -> int:  # type: ignore[override]
        return _rank_world()[0]

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        return _rank_world()[1]

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.num_replicas)

    def _order(self) -> list[int]:
        rank, world = _rank_world()
        order = self.global_order(world)
        if world > 1:
            order += order[
                : -len(order) % world
            ]  # padded to a multiple, as DistributedSampler does
            order = order[rank::world]
        return order

    def global_order(self, world: int = 1) -> list[int]:
        """The epoch's order over all ranks (``world`` of them), before sharding."""
        g = epoch_generator(self.seed, self.epoch)
        step = self.batch_size * world
        mega = step * self.megabatch_mult
        full: list[np.ndarray] = []
        rest: list[np.ndarray] = []
        for sign in (1, -1):
            idx = np.flatnonzero(self.lengths * sign > 0)
            if not len(idx):
                continue
            size = np.abs(self.lengths[idx])
            perm = torch.randperm(len(idx), generator=g).numpy()
            # a stable sort of the shuffled megabatch: equal lengths keep the random order
            ordered = np.concatenate(
                [
                    c[np.argsort(-size[c], kind="stable")]
                    for c in np.array_split(perm, range(mega, len(perm), mega))
                ]
            )
            ordered = idx[ordered]
            n_full = len(ordered) // step * step
            full += np.split(ordered[:n_full], n_full // step) if n_full else []
            if n_full < len(ordered):
                rest.append(ordered[n_full:])
        batches = [full[i] for i in torch.randperm(len(full), generator=g).tolist()] + rest
        return np.concatenate(batches).tolist() if batches else []


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
            # ModalityLengthGrouped keeps its epoch and position itself, as EpochShuffle does
            if isinstance(sampler, DistributedSampler) and not isinstance(sampler, _EpochPosition):
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


def make_loader(
    ds: Dataset,
    batch_size: int,
    collate: Callable[[list[Any]], Any],
    *,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    lengths: Sequence[int] | None = None,
) -> ResumableLoader:
    """A :class:`ResumableLoader` over ``ds``; shuffled by :class:`EpochShuffle` when
    ``shuffle``, or grouped by :class:`ModalityLengthGrouped` when ``lengths`` are given too.

    Args:
        ds: A map-style data set.
        batch_size: Samples per batch (the last batch of an epoch may be smaller).
        collate: Builds a batch from a list of samples.
        shuffle: Shuffle each epoch (training) or keep the data set's order (evaluation).
        seed: The run's seed (the shuffle order and the worker seeds derive from it).
        num_workers: Loader processes (``loader.num_workers``); 0 loads in the main process.
        lengths: Per sample of ``ds``, its signed length (:func:`modality_lengths`), to batch
            samples of one modality and similar length together (``loader.group_by_length``);
            only used when ``shuffle``.

    Raises:
        DataError: when ``lengths`` does not have one entry per sample.
    """
    sampler: Sampler[int] | None = None
    if shuffle and lengths is not None:
        n = len(ds)  # type: ignore[arg-type]
        if len(lengths) != n:
            raise DataError(
                f"loader.group_by_length: lengths has {len(lengths)} entries for {n} samples"
            )
        sampler = ModalityLengthGrouped(lengths, batch_size, seed)
    elif shuffle:
        sampler = EpochShuffle(ds, seed)  # type: ignore[arg-type]
    return ResumableLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
