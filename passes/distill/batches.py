"""Seeded, epoch-aware batching, so a resumed run sees the data in the same order.

``TensorBatches(x, y, batch_size=32, seed=0)`` is a re-iterable source; ``epoch_batches(source,
seed, epoch)`` yields an epoch's batches from any source. Before each epoch the trainer seeds
torch / NumPy / Python with ``seed + epoch`` (so a ``DataLoader(shuffle=True)`` or a user
generator drawing random numbers is reproducible) and passes ``epoch=`` to sources that accept it:
the order is a pure function of ``(seed, epoch)`` and resuming can skip consumed batches.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

import torch
from potstill.inputs.data import Batch, as_batch

from .checkpoint import seed_everything


class TensorBatches:
    """Mini-batches of aligned tensors, reshuffled per epoch with a ``(seed, epoch)`` generator."""

    def __init__(self, *tensors: torch.Tensor, batch_size: int = 32, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        if not tensors or any(t.shape[0] != tensors[0].shape[0] for t in tensors):
            raise ValueError("TensorBatches needs tensors with the same leading dim")
        self.tensors, self.batch_size, self.shuffle = tensors, batch_size, shuffle
        self.seed, self.drop_last, self.epoch = seed, drop_last, 0

    def __len__(self) -> int:
        n = self.tensors[0].shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __call__(self, epoch: int = 0) -> Iterator[Any]:
        self.epoch = epoch
        return iter(self)

    def __iter__(self) -> Iterator[Any]:
        n = self.tensors[0].shape[0]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            parts = tuple(t[idx] for t in self.tensors)
            yield parts[0] if len(parts) == 1 else parts


def _accepts_epoch(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "epoch" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def epoch_batches(source: Callable[..., Iterable[Any]] | Iterable[Any], seed: int, epoch: int) -> Iterator[Any]:
    """The raw items of one epoch, in an order fixed by ``(seed, epoch)``."""
    seed_everything(seed * 1_000_003 + epoch)
    if isinstance(source, TensorBatches):
        return source(epoch)
    if callable(source) and not inspect.isgenerator(source):
        data = source(epoch=epoch) if _accepts_epoch(source) else source()
    else:
        data = source
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = torch.utils.data.DataLoader(data, batch_size=32)
    return iter(data)


def count_batches(source: Callable[..., Iterable[Any]] | Iterable[Any], seed: int) -> int:
    """Batches per epoch: ``len()`` when the source has one, else one counting pass."""
    if isinstance(source, Sized):
        return len(source)
    return sum(1 for _ in epoch_batches(source, seed, 0))


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts) if first.dim() > 0 else first
    return first


class Rebatched:
    """Re-cut a source's batches into batches of exactly ``batch_size`` rows (the last may be short)."""

    def __init__(self, source: Callable[..., Iterable[Any]] | Iterable[Any], batch_size: int) -> None:
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.source, self.batch_size = source, batch_size

    def __call__(self, epoch: int = 0) -> Iterator[Any]:
        pending: list[Batch] = []
        rows = 0
        for raw in _raw(self.source, epoch):
            b = as_batch(raw)
            pending.append(b)
            rows += b.size
            while rows >= self.batch_size:
                merged = _merge(pending)
                yield _take(merged, 0, self.batch_size)
                rest = _take(merged, self.batch_size, merged.size)
                pending, rows = ([rest], rest.size) if rest.size else ([], 0)
        if pending and rows:
            yield _merge(pending)


def _raw(source: Callable[..., Iterable[Any]] | Iterable[Any], epoch: int) -> Iterable[Any]:
    if isinstance(source, TensorBatches):
        return source(epoch)
    if callable(source) and not inspect.isgenerator(source):
        return source(epoch=epoch) if _accepts_epoch(source) else source()
    return source


def _merge(parts: list[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    args = tuple(_concat([p.args[i] for p in parts]) for i in range(len(parts[0].args)))
    kwargs = {k: _concat([p.kwargs[k] for p in parts]) for k in parts[0].kwargs}
    targets = [p.target for p in parts if p.target is not None]
    target = torch.cat(targets) if len(targets) == len(parts) else None
    return Batch(args, kwargs, target)


def _take(b: Batch, lo: int, hi: int) -> Batch:
    n = b.size

    def cut(x: Any) -> Any:
        return x[lo:hi] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n else x

    return Batch(tuple(cut(a) for a in b.args), {k: cut(v) for k, v in b.kwargs.items()}, cut(b.target))


class Without:
    """A source without the batches of ``exclude`` (compared by content, ``teacher_cache.batch_key``):
    training data that also calibrated never trains on the held-out batches fidelity is measured on."""

    def __init__(self, source: Callable[..., Iterable[Any]] | Iterable[Any], exclude: Iterable[Any]) -> None:
        from .teacher_cache import batch_key

        self.source, self._key = source, batch_key
        self.keys = {batch_key(as_batch(b)) for b in exclude}

    def __call__(self, epoch: int = 0) -> Iterator[Any]:
        for raw in _raw(self.source, epoch):
            if self._key(as_batch(raw)) not in self.keys:
                yield raw
