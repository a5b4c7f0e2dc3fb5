"""Extraction: a subnet configuration → a standalone, physically smaller ``nn.Module``.

Zero-shot (no retraining): slice the kept prefix of every narrowed group with
``potstill.ir.surgery.prune_width`` (which also updates module attributes, head counts and Hugging
Face config fields), then drop the configuration's blocks with ``remove_blocks``. Widths first,
because block removal renames the parameters the analysis refers to. The result computes what the
supernet computes when run as that configuration (``Supernet.configured``), BatchNorm statistics
included, and is lowered and parity-checked like any other student. It owns every tensor: the
surgery shares unsliced tensors with its source (``potstill.ir.cow``), and the supernet's BatchNorm
statistics are re-estimated in place for the next configuration, which would otherwise rewrite an
extracted student's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from potstill.ir.cow import unshare
from potstill.ir.surgery import prune_width, remove_blocks
from torch import nn

from .space import SubnetConfig
from .supernet import Supernet


@dataclass
class Extracted:
    module: nn.Module
    config: SubnetConfig
    seconds: float


def extract(net: Supernet, config: SubnetConfig) -> Extracted:
    """The subnet ``config`` of ``net`` as its own module (the supernet is left untouched)."""
    net.space.check(config)
    t0 = time.perf_counter()
    with _detached(net):
        keep = net.space.keep(config)
        module = prune_width(net.model, net.analysis, keep)
        removed = net.space.removed_blocks(config)
        if removed:
            # the copy is ours: empty the dropped blocks first so remove_blocks' own copy skips their weights
            for name in removed:
                parent, _, child = name.rpartition(".")
                module.get_submodule(parent).register_module(child, nn.Identity())
            module = remove_blocks(module, net.analysis, removed)
        unshare(module, net.model)
    module.eval()
    return Extracted(module, config, time.perf_counter() - t0)


class _detached:
    """Hooks off while copying (a deep copy would otherwise carry them into the student)."""

    def __init__(self, net: Supernet) -> None:
        self.net = net
        self.had = False
        self.active: SubnetConfig | None = None

    def __enter__(self) -> None:
        self.had = bool(self.net._handles)
        self.active = self.net.active
        if self.had:
            self.net.detach()

    def __exit__(self, *exc: object) -> None:
        if self.had:
            self.net.attach()
            self.net.active = self.active
