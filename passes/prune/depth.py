"""Depth pruning: remove whole residual blocks / transformer layers.

The blocks to remove are the least important by a block importance (``importance.blocks``):

* ``importance=bi``  -- Block Importance ``1 - mean cos(h_in, h_out)`` (Minitron), one pass;
* ``importance=mse`` -- normalised output error with the block removed, iterative: drop the
  least harmful block, re-score the rest with it gone, ``drop`` rounds (Nemotron Elastic);
* ``importance=angular`` -- the run of ``drop`` consecutive blocks whose input and output are
  closest in angle (Gromov et al. 2024, ``angular_run``); with ``heal=true`` the block after the run
  is refitted by least squares (``potstill.passes.prune.heal``);
* ``importance=dp``  -- AmoebaLLM's dynamic programme over ``state.metric`` (or the output error
  when there is none): the mask it finds for exactly ``drop`` removals.

``drop=N`` removes N blocks, ``keep=N`` keeps N of the removable ones. ``potstill.ir.surgery.
remove_blocks`` builds the student and renumbers what depends on layer indices; a Hugging Face
student's ``config.num_hidden_layers`` follows (checked here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from potstill.errors import InputError
from potstill.passes.importance.base import calibration_batches
from potstill.passes.importance.blocks import (
    METHODS,
    angular_run,
    block_influence,
    dp_masks,
    iterative_output_error,
)
from potstill.pipeline import Pass, PassResult, register_pass
from potstill.state import CompileState

from .width_options import record_arch


@dataclass(frozen=True)
class DepthOptions:
    #: number of blocks to remove
    drop: int = 0
    #: number of removable blocks to keep (instead of drop)
    keep: int = 0
    #: block importance: bi | mse | dp | angular
    importance: str = "bi"
    #: least-squares refit of the block after each removed run (on when calibration data exists)
    heal: bool | None = None
    #: calibration batches
    batches: int = 8
    #: reuse block_importance already on the student (from an importance.blocks pass)
    reuse: bool = True


def choose_blocks(state: CompileState, names: list[str], n_drop: int, o: DepthOptions) -> list[str]:
    """The ``n_drop`` blocks to remove, by the chosen importance."""
    student = state.working()
    model = student.module
    if o.reuse and student.block_importance and set(names) <= set(student.block_importance) \
            and student.metrics.get("block_importance_method") == o.importance:
        dp = student.metrics.get("depth_dp")
        if o.importance == "dp" and dp and n_drop in dp["masks"]:
            return list(dp["masks"][n_drop])
        if o.importance != "dp":
            return sorted(names, key=student.block_importance.__getitem__)[:n_drop]
    batches = calibration_batches(state, o.batches)
    if o.importance == "bi":
        scores = block_influence(model, names, batches)
        return sorted(names, key=scores.__getitem__)[:n_drop]
    if o.importance == "angular":
        return angular_run(model, names, batches, n_drop)
    if o.importance == "mse":
        return [n for n, _ in iterative_output_error(model, names, batches, rounds=n_drop)]
    return list(dp_masks(model, names, batches, n_drop, state.metric).masks[n_drop])


@register_pass
class DepthPrunePass(Pass):
    """``prune.depth{drop=2,importance=bi}``: remove whole blocks."""

    in_place = False  # builds a new, smaller module (potstill.ir.cow): the source is only read

    name: ClassVar[str] = "prune.depth"
    Options: ClassVar[type] = DepthOptions
    ensures: ClassVar[frozenset[str]] = frozenset({"pruned"})

    def run(self, state: CompileState) -> PassResult:
        from potstill.ir.surgery import remove_blocks

        o: DepthOptions = self.options
        if o.importance not in METHODS:
            raise InputError(f"prune.depth: importance must be one of {METHODS}, not {o.importance!r}")
        if o.drop and o.keep:
            raise InputError("prune.depth: give drop or keep, not both")
        student = state.working()
        analysis = state.analysis(student)
        names = [b.name for b in analysis.blocks]
        n_drop = o.drop if o.drop else (len(names) - o.keep if o.keep else 0)
        if n_drop <= 0:
            state.facts.add("pruned")
            return PassResult(state, False)
        if not names:
            raise InputError("prune.depth: the model has no removable blocks (see `potstill inspect`)")
        if n_drop >= len(names):
            raise InputError(f"prune.depth: cannot remove {n_drop} of {len(names)} removable blocks; keep one")
        drop = choose_blocks(state, names, n_drop, o)
        config = getattr(student.module, "config", None)
        layers_before = getattr(config, "num_hidden_layers", None)
        new = remove_blocks(student.module, analysis, drop)
        new_config = getattr(new, "config", None)
        if isinstance(layers_before, int) and new_config is not None:
            expected = layers_before - len(drop)
            if getattr(new_config, "num_hidden_layers", None) != expected:
                raise InputError(
                    f"prune.depth: after removing {drop} the config says num_hidden_layers="
                    f"{getattr(new_config, 'num_hidden_layers', None)}, expected {expected}"
                )
        student.set_module(new, f"prune.depth: removed {', '.join(drop)} ({o.importance})")
        state.facts.discard("importance")
        state.facts.discard("block_importance")
        arch = dict(student.metrics.get("arch") or {})
        arch["removed_blocks"] = [*arch.get("removed_blocks", []), *drop]
        student.metrics["arch"] = arch
        record_arch(state, student, {})
        state.facts.add("pruned")
        return PassResult(state, True)
