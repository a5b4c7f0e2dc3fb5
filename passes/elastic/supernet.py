"""The supernet runtime: run a nested model as any of its subnets, without copying weights.

A configuration keeps a prefix of units in some groups and a subset of blocks in some stages.
The supernet runs it on the shared weights with hooks (installed while ``attached``):

* every consumer (conv / linear reading a narrowed group) gets a forward pre-hook that zeroes
  the dropped input channels, ``x ⊙ m``: its output equals the sliced layer's, ``W[:, :k] x[:k]``;
  producers and per-channel ops (BN, residual adds, gates) may leave garbage in the dropped
  channels, but nothing reads it;
* a LayerNorm / RMSNorm over a narrowed hidden dim is recomputed over the kept channels only,
  ``LN(x[..., :k]; w[:k], b[:k])`` with zeros elsewhere (its statistics would otherwise see the
  dropped channels);
* a dropped block returns its input (``output = input``: what removing it from its container does).

So a subnet run here equals the subnet ``extract`` slices out, output for output (tested); the
hooks read ``active`` at call time, so a robust loss's PGD attack, which runs the student again,
attacks the same subnet. Gradients flow only into the kept slices. BatchNorm statistics are shared
by all subnets: ``recalibrate_bn`` re-estimates them for one configuration before it is evaluated
(OFA), and an extracted subnet takes them along.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from potstill.errors import InputError
from potstill.inputs.data import Batch, as_batch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .nest import NestRecord
from .space import ElasticSpace, SubnetConfig


@dataclass
class _Plan:
    """What the hooks do for one configuration."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # consumer module -> input-channel mask
    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # norm module -> kept channel indices
    skipped: set[str] = field(default_factory=set)


class Supernet:
    """A nested model, its analysis and elastic space; runs any ``SubnetConfig``.

    >>> net = Supernet(model, analysis, space)                      # doctest: +SKIP
    >>> with net.configured(space.smallest()):                      # doctest: +SKIP
    ...     y = model(x)      # the smallest subnet's output
    """

    def __init__(self, model: nn.Module, analysis: Any, space: ElasticSpace) -> None:
        self.model = model
        self.analysis = analysis
        self.space = space
        self.active: SubnetConfig | None = None
        self.record = NestRecord()
        #: training records by the elastic.train spec that produced them
        self.trained: dict[str, dict[str, Any]] = {}
        #: the weights before the first training (the nested teacher's), on the CPU: a subnet ships
        #: with them where training lowered its held-out fidelity (``keep``); None until trained
        self.untrained: dict[str, torch.Tensor] | None = None
        self._plans: dict[SubnetConfig, _Plan] = {}
        self._handles: list[RemovableHandle] = []

    def rebind(self, model: nn.Module) -> None:
        """Run on ``model`` instead: a copy with the same structure (e.g. rank 0's, broadcast)."""
        was = bool(self._handles)
        self.detach()
        self.model = model
        self._plans.clear()
        if was:
            self.attach()

    # -- plans --------------------------------------------------------------------------------

    def plan(self, config: SubnetConfig) -> _Plan:
        cached = self._plans.get(config)
        if cached is not None:
            return cached
        self.space.check(config)
        plan = _Plan(skipped=set(self.space.removed_blocks(config)))
        modules = dict(self.model.named_modules())
        for gid, kept in self.space.keep(config).items():
            g = self.analysis.groups[gid]
            for m in g.members:
                if m.role == "in":
                    mod = modules[m.module]
                    width = mod.weight.shape[1]
                    mask = plan.masks.get(m.module)
                    if mask is None:
                        mask = torch.ones(width, dtype=mod.weight.dtype, device=mod.weight.device)
                    drop = sorted(set(range(m.offset, m.offset + g.n_units * m.unit_len)) - set(g.positions(m, kept)))
                    mask[drop] = 0
                    plan.masks[m.module] = mask
                elif m.role == "norm" and not g.exact:
                    mod = modules[m.module]
                    idx = torch.tensor(g.positions(m, kept), device=mod.weight.device)
                    plan.norms[m.module] = idx
        if len(self._plans) > 256:
            self._plans.clear()
        self._plans[config] = plan
        return plan

    # -- hooks --------------------------------------------------------------------------------

    def _current(self) -> _Plan | None:
        return None if self.active is None else self.plan(self.active)

    def _mask_hook(self, name: str, channel_dim: int) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> Any:
            plan = self._current()
            mask = None if plan is None else plan.masks.get(name)
            if mask is None or not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            shape = [1] * x.dim()
            shape[channel_dim] = -1
            return (x * mask.to(x.dtype).view(shape), *args[1:])

        return hook

    def _norm_hook(self, name: str) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            plan = self._current()
            idx = None if plan is None else plan.norms.get(name)
            if idx is None:
                return None
            x = args[0]
            xs = x.index_select(-1, idx)
            weight = mod.weight
            if not isinstance(weight, torch.Tensor):
                return None
            w = weight.index_select(0, idx)
            if isinstance(mod, nn.LayerNorm):
                b = None if mod.bias is None else mod.bias.index_select(0, idx)
                y = F.layer_norm(xs, (idx.numel(),), w, b, mod.eps)
            else:  # RMSNorm: x / sqrt(mean(x²) + eps) · w, in float32 as the HF modules do
                eps = getattr(mod, "variance_epsilon", None) or getattr(mod, "eps", None) or 1e-6
                h = xs.float()
                h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
                y = w * h.to(x.dtype)
            full = torch.zeros(out.shape, dtype=y.dtype, device=y.device)
            return full.index_copy(-1, idx, y)

        return hook

    def _skip_hook(self, name: str) -> Any:
        from potstill.passes.importance.blocks import identity_output

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
            plan = self._current()
            if plan is None or name not in plan.skipped:
                return None
            return identity_output(args, kwargs, out)

        return hook

    def attach(self) -> None:
        """Install the hooks on every module an elastic dim touches (idempotent)."""
        if self._handles:
            return
        modules = dict(self.model.named_modules())
        consumers: dict[str, int] = {}
        norms: set[str] = set()
        for d in self.space.width_dims:
            g = self.analysis.groups[d.group]
            for m in g.members:
                if m.role == "in":
                    mod = modules[m.module]
                    consumers[m.module] = -1 if isinstance(mod, nn.Linear) else 1
                elif m.role == "norm" and not g.exact:
                    norms.add(m.module)
        for name, cdim in consumers.items():
            self._handles.append(modules[name].register_forward_pre_hook(self._mask_hook(name, cdim)))
        for name in norms:
            self._handles.append(modules[name].register_forward_hook(self._norm_hook(name)))
        for dd in self.space.depth_dims:
            for name in dd.order:
                self._handles.append(modules[name].register_forward_hook(self._skip_hook(name), with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.active = None

    @contextlib.contextmanager
    def attached(self) -> Iterator[Supernet]:
        """Hooks installed for the duration (the model deep-copies and exports cleanly outside)."""
        was = bool(self._handles)
        self.attach()
        try:
            yield self
        finally:
            if not was:
                self.detach()

    def use(self, config: SubnetConfig | None) -> None:
        """Make ``config`` the subnet the hooks run (None: the full network)."""
        if config is not None:
            self.plan(config)
        self.active = config

    @contextlib.contextmanager
    def configured(self, config: SubnetConfig | None) -> Iterator[nn.Module]:
        """The model running as ``config`` inside the block."""
        previous = self.active
        with self.attached():
            self.use(config)
            try:
                yield self.model
            finally:
                self.active = previous

    # -- weights before training ---------------------------------------------------------------

    def keep_untrained(self) -> None:
        """Copy the weights (parameters and buffers) as they are now, unless a copy is kept already:
        call it before the first training."""
        if self.untrained is None:
            self.untrained = {k: t.detach().to("cpu", copy=True) for k, t in _tensors(self.model)}

    @contextlib.contextmanager
    def untrained_weights(self) -> Iterator[nn.Module]:
        """The model with the weights ``keep_untrained`` copied, inside the block (a fresh copy of
        them: BatchNorm re-estimation inside does not touch the kept ones); the trained weights after."""
        if self.untrained is None:
            raise InputError("this supernet keeps no weights from before training")
        kept = self.untrained
        saved = []
        with torch.no_grad():
            for name, t in _tensors(self.model):
                saved.append((t, t.data))
                t.data = kept[name].to(t.device, t.dtype, copy=True)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for t, data in saved:
                    t.data = data

    # -- a student for DistillTrainer -----------------------------------------------------------

    def forward(self, module: nn.Module, batch: Batch, config: Any) -> Any:
        """``StudentSpec.forward``: run ``module`` (the supernet, maybe DDP-wrapped) as ``config``.

        The configuration stays active after the call so that losses which run the student
        again (PGD attacks) see the same subnet."""
        self.use(config)
        return batch.run(module)


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer once (a tied weight under its first name)."""
    yield from model.named_parameters()
    yield from model.named_buffers()


def batchnorm_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every BatchNorm running statistic of ``model`` (empty without BatchNorm)."""
    return {f"{n}.{k}": getattr(m, k).detach().clone() for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for k in ("running_mean", "running_var", "num_batches_tracked")}


def restore_stats(model: nn.Module, stats: dict[str, torch.Tensor]) -> None:
    """Write ``batchnorm_stats`` back into ``model`` in place."""
    with torch.no_grad():
        for name, value in stats.items():
            module, _, buffer = name.rpartition(".")
            getattr(model.get_submodule(module), buffer).copy_(value)


def recalibrate_bn(net: Supernet, config: SubnetConfig | None, batches: Iterable[Any], limit: int = 16) -> int:
    """Re-estimate every BatchNorm's running statistics for ``config`` (cumulative average over the
    batches, train-mode forward, no gradients); returns the batches used. Label-free."""
    bns = [m for m in net.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    was = net.model.training
    used = 0
    with net.configured(config), torch.no_grad():
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch weighs the same
        net.model.eval()
        for m in bns:
            m.train()
        try:
            for i, raw in enumerate(batches):
                if i >= limit:
                    break
                as_batch(raw).run(net.model)
                used += 1
        finally:
            for m, (momentum, training) in zip(bns, saved):
                m.momentum = momentum
                m.train(training)
            net.model.train(was)
    return used
