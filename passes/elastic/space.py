"""The elastic search space of a nested supernet: which dims can shrink, and to what.

Three kinds of elastic dimension (Once-for-All, arXiv 1908.09791; Nemotron Elastic, arXiv 2511.16664):

* **width** — a coupled group that crosses blocks (stage channels, attention heads / KV groups,
  the hidden size): keep the first ``k`` of its ``n`` units;
* **expansion** — a group whose members all live inside one block (an FFN's neurons, an inverted
  residual's or bottleneck's hidden channels): the block's expansion ratio ``k / n``;
* **depth** — a container of removable blocks (a stage, a transformer's layer list): keep the ``d``
  most important blocks (the order is fixed at nesting time), drop the rest.

Width choices are ``align_units(r·n)`` for each ratio ``r`` the user allows, aligned to the
profile's channel multiple (``passes/prune/align.py``), so every subnet runs on fast shapes. A
configuration is a :class:`SubnetConfig`; a *genome* is the vector of choice indices the search
mutates.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from potstill.errors import InputError
from potstill.passes.prune.align import align_units
from torch import nn

if TYPE_CHECKING:
    from potstill.ir.capture import Analysis, CoupledGroup

#: progressive unlocking order (OFA / ProARD): width first, then depth, then expansion
PHASES = ("width", "depth", "expansion")


@dataclass(frozen=True)
class WidthDim:
    """An elastic coupled group: ``choices`` are kept unit counts, ascending, the last is ``n_units``."""

    group: int
    kind: str  # "width" | "expansion"
    choices: tuple[int, ...]
    unit_channels: int
    label: str
    #: the block an expansion dim lives in (its width means nothing once the block is dropped)
    block: str | None = None


@dataclass(frozen=True)
class DepthDim:
    """An elastic stage: ``order`` lists its blocks most important first; keep the first ``d``."""

    container: str
    order: tuple[str, ...]
    choices: tuple[int, ...]

    @property
    def kind(self) -> str:
        return "depth"


@dataclass(frozen=True)
class SubnetConfig:
    """One subnet: kept units per elastic group and kept blocks per elastic stage."""

    widths: tuple[tuple[int, int], ...]
    depths: tuple[tuple[str, int], ...] = ()

    def width(self, group: int) -> int | None:
        return dict(self.widths).get(group)

    def depth(self, container: str) -> int | None:
        return dict(self.depths).get(container)

    def to_dict(self) -> dict[str, Any]:
        return {"widths": {str(g): k for g, k in self.widths}, "depths": dict(self.depths)}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> SubnetConfig:
        widths = tuple(sorted((int(g), int(k)) for g, k in dict(d.get("widths", {})).items()))
        depths = tuple(sorted((str(c), int(n)) for c, n in dict(d.get("depths", {})).items()))
        return SubnetConfig(widths, depths)


def _ratio_choices(n_units: int, unit_channels: int, ratios: Sequence[float], multiple: int) -> tuple[int, ...]:
    return tuple(sorted({align_units(r * n_units, n_units, unit_channels, multiple) for r in ratios} | {n_units}))


_NORMS_BY_NAME = ("LayerNorm", "RMSNorm")


def _norm_overridable(module: nn.Module) -> bool:
    """Norms whose statistics the supernet can recompute over a prefix (see ``supernet``)."""
    if isinstance(module, nn.LayerNorm):
        return len(module.normalized_shape) == 1
    name = type(module).__name__
    return "RMSNorm" in name and isinstance(getattr(module, "weight", None), nn.Parameter)


def _consumer_ok(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1


def elastic_reason(model: nn.Module, group: CoupledGroup) -> str | None:
    """Why ``group`` cannot be elastic (None when it can): the supernet must be able to run every
    prefix of it exactly as the sliced subnet computes it."""
    if group.pinned:
        return f"pinned: {group.pinned}"
    modules = dict(model.named_modules())
    for m in group.members:
        mod = modules.get(m.module)
        if m.role == "in" and (mod is None or not _consumer_ok(mod) or m.dim != 1):
            return f"{m.module} reads these channels in a way the supernet cannot mask"
    if not group.exact:
        norms = [modules.get(m.module) for m in group.members if m.role == "norm"]
        if group.kind != "hidden" or not norms or not all(n is not None and _norm_overridable(n) for n in norms):
            return f"statistics over the channels ({group.inexact_reason}) differ between prefix and full width"
    return None


def _enclosing_block(group: CoupledGroup, block_names: Sequence[str]) -> str | None:
    for b in block_names:
        if all(m.module == b or m.module.startswith(b + ".") for m in group.members):
            return b
    return None


@dataclass
class ElasticSpace:
    """Every elastic dimension of a supernet, and the configurations they span."""

    width_dims: list[WidthDim] = field(default_factory=list)
    depth_dims: list[DepthDim] = field(default_factory=list)
    fixed: dict[int, str] = field(default_factory=dict)  # group id -> why it is not elastic

    # -- the extremes and sampling --------------------------------------------------------------

    def dims(self) -> list[WidthDim | DepthDim]:
        return [*self.width_dims, *self.depth_dims]

    def config(self, genome: Sequence[int]) -> SubnetConfig:
        dims = self.dims()
        if len(genome) != len(dims):
            raise ValueError(f"genome of {len(genome)} genes for {len(dims)} elastic dims")
        widths = tuple(sorted((d.group, d.choices[i]) for d, i in zip(self.width_dims, genome)))
        depths = tuple(sorted((d.container, d.choices[i]) for d, i in zip(self.depth_dims, genome[len(self.width_dims):])))
        return SubnetConfig(widths, depths)

    def canonical(self, genome: Sequence[int]) -> tuple[int, ...]:
        """The genome with the genes of dropped blocks' expansion dims set to full: configurations
        that differ only there are the same subnet."""
        removed = set(self.removed_blocks(self.config(genome)))
        return tuple(len(d.choices) - 1 if isinstance(d, WidthDim) and d.block in removed else g
                     for g, d in zip(genome, self.dims()))

    def genome(self, config: SubnetConfig) -> list[int]:
        out = [d.choices.index(config.width(d.group) or d.choices[-1]) for d in self.width_dims]
        out += [d.choices.index(config.depth(d.container) or d.choices[-1]) for d in self.depth_dims]
        return out

    def largest(self) -> SubnetConfig:
        return self.config([len(d.choices) - 1 for d in self.dims()])

    def smallest(self, unlocked: Sequence[str] = PHASES) -> SubnetConfig:
        return self.config([0 if d.kind in unlocked else len(d.choices) - 1 for d in self.dims()])

    def sample(self, rng: random.Random, unlocked: Sequence[str] = PHASES) -> SubnetConfig:
        """A uniformly random configuration over the unlocked kinds (the others at full size)."""
        return self.config([rng.randrange(len(d.choices)) if d.kind in unlocked else len(d.choices) - 1
                            for d in self.dims()])

    def size(self) -> int:
        return math.prod(len(d.choices) for d in self.dims())

    # -- what a configuration keeps ------------------------------------------------------------

    def keep(self, config: SubnetConfig) -> dict[int, list[int]]:
        """Kept unit indices (prefixes) of every group the configuration narrows."""
        out = {}
        for d in self.width_dims:
            k = config.width(d.group)
            if k is not None and k < d.choices[-1]:
                out[d.group] = list(range(k))
        return out

    def removed_blocks(self, config: SubnetConfig) -> list[str]:
        out: list[str] = []
        for d in self.depth_dims:
            keep = config.depth(d.container) or len(d.order)
            out.extend(d.order[keep:])
        return out

    def check(self, config: SubnetConfig) -> None:
        """Raise InputError unless every value of ``config`` is one of the space's choices."""
        for d in self.width_dims:
            k = config.width(d.group)
            if k is not None and k not in d.choices:
                raise InputError(f"elastic group {d.label}: width {k} is not a choice ({list(d.choices)})")
        for dd in self.depth_dims:
            n = config.depth(dd.container)
            if n is not None and n not in dd.choices:
                raise InputError(f"elastic stage {dd.container}: depth {n} is not a choice ({list(dd.choices)})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": [{"group": d.group, "kind": d.kind, "label": d.label, "choices": list(d.choices),
                       "unit_channels": d.unit_channels} for d in self.width_dims],
            "depth": [{"container": d.container, "order": list(d.order), "choices": list(d.choices)}
                      for d in self.depth_dims],
            "fixed": {str(g): why for g, why in self.fixed.items()},
            "size": self.size(),
        }


def build_space(
    model: nn.Module,
    analysis: Analysis,
    *,
    width_ratios: Sequence[float],
    expansion_ratios: Sequence[float],
    multiple: int,
    block_order: Mapping[str, Sequence[str]] | None = None,
    min_depth: int = 1,
) -> ElasticSpace:
    """The elastic dims of a nested ``model``; ``block_order`` maps a container to its blocks most
    important first (None or empty: no elastic depth)."""
    space = ElasticSpace()
    block_names = [b.name for b in analysis.blocks]
    # every item of a container that holds removable blocks, the first block of each stage (which
    # changes the width or the resolution, so it cannot be dropped) included: a group inside one
    # is that block's own expansion, as in Once-for-All's space, where every block's is elastic
    stage_items = [f"{c}.{name}" if c else name for c in dict.fromkeys(b.container for b in analysis.blocks)
                   for name, _ in model.get_submodule(c).named_children()]
    for g in analysis.groups:
        why = elastic_reason(model, g)
        if why is not None:
            space.fixed[g.id] = why
            continue
        block = _enclosing_block(g, block_names)
        inside = block is not None or _enclosing_block(g, stage_items) is not None
        kind = "expansion" if g.kind in ("neurons", "channels") and inside else "width"
        ratios = expansion_ratios if kind == "expansion" else width_ratios
        choices = _ratio_choices(g.n_units, g.unit_channels, ratios, multiple)
        if len(choices) < 2:
            space.fixed[g.id] = "one aligned width only"
            continue
        space.width_dims.append(WidthDim(g.id, kind, choices, g.unit_channels, g.describe(), block))
    for container, order in (block_order or {}).items():
        lo = max(1, min(min_depth, len(order)))
        choices = tuple(range(lo, len(order) + 1))
        if len(choices) > 1:
            space.depth_dims.append(DepthDim(container, tuple(order), choices))
    return space
