"""The retraining-free default for causal language models: width (FLAP), depth (angular) or both,
chosen by held-out perplexity inside the compile.

``prune.width{ratio=R}`` on a ``*ForCausalLM`` with no estimator named (``importance=auto``) and
calibration data comes here. At one budget (R of the MACs; with ``ratio_of=prunable``, R of the MACs
outside the pinned embeddings and LM head) it builds these candidates from the teacher:

* ``width``: FLAP (``flap.py``): heads / KV groups and FFN neurons ranked by standardized weighted
  fluctuation across all layers, removed mean contributions folded into the readers' biases;
* ``width+refit``: the same, with those readers then refitted by least squares to the teacher's
  outputs of each layer, layer after layer (``reconstruct.py``; not with ``reconstruct=false``);
* ``ffn+refit``: FLAP and the refit on the FFN neurons alone, every head kept (where the model has
  both): a grouped-query model's KV group is a third or more of a layer's attention, a coarse unit
  whose loss the fluctuation metric, ranked per unit of MACs, can underrate;
* ``depth``: the run of ``n`` consecutive blocks with the smallest angular distance (Gromov et al.
  2024; ``importance.blocks``), ``n`` the fewest whose MACs meet the budget, and the same with the
  next block refitted by least squares (``heal.py``);
* ``mix``: half of those blocks removed, FLAP for the rest of the budget.

Each is scored by the perplexity ratio ``ppl(student) / ppl(teacher)`` on the held-out batches (the
driver's split, which neither the statistics nor the refit read: ``fit_and_heldout``); the lowest
wins and the table goes to ``metrics["prune"]["decoder"]``. Perplexity is over next tokens whose
position and target the attention mask both keep (left padding excluded).

The embeddings and the LM head are pinned (tied, and the vocabulary is the interface), so a ratio of
the *total* MACs can exceed what pruning can remove; the console says so with the largest reachable
ratio, and ``ratio_of=prunable`` states the ratio on the prunable part instead.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from potstill.errors import InputError
from potstill.inputs.data import Batch, primary_output
from potstill.passes.importance.base import warn
from potstill.pipeline import PassResult
from potstill.state import CompileState, Student
from torch import nn

from .align import channel_multiple
from .allocate import allocate, unit_costs
from .budget import CostModel
from .flap import compensate_bias, flap_scores, rank_scores

if TYPE_CHECKING:
    from potstill.ir.capture import Analysis, CoupledGroup

    from .width_options import WidthOptions

#: the share of the block budget the ``mix`` candidate gives to depth
MIX_DEPTH_SHARE = 0.5


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face decoder with an LM head (``*ForCausalLM``)."""
    return type(model).__name__.endswith("ForCausalLM") and hasattr(model, "config")


def perplexity(model: nn.Module, batches: Sequence[Batch]) -> float:
    """``exp`` of the mean next-token NLL over the positions (and targets) the attention mask keeps."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            ids = b.kwargs.get("input_ids", b.args[0] if b.args else None)
            if not isinstance(ids, torch.Tensor):
                raise InputError("perplexity: the batches carry no input_ids")
            logits = primary_output(b.run(model)).double()
            mask = b.kwargs.get("attention_mask")
            keep = torch.ones_like(ids, dtype=torch.bool) if not isinstance(mask, torch.Tensor) else mask.bool()
            pair = keep[:, :-1] & keep[:, 1:]
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            total += float(nll[pair].sum())
            count += int(pair.sum())
    return math.exp(total / count) if count else float("nan")


@dataclass
class Candidate:
    structure: str
    model: nn.Module
    removed: list[str]
    widths: dict[int, int]
    healed: list[str]
    compensated: list[str]
    ppl_ratio: float = float("nan")

    def row(self, macs: float, chosen: bool) -> dict[str, Any]:
        return {"structure": self.structure, "blocks_removed": self.removed, "healed": self.healed,
                "bias_compensated": len(self.compensated), "macs": macs,
                "heldout_ppl_ratio": self.ppl_ratio, "chosen": chosen}


def _in_blocks(g: CoupledGroup, blocks: Sequence[str]) -> bool:
    return any(m.module == b or m.module.startswith(b + ".") for m in g.members for b in blocks)


def _flap(state: CompileState, source: nn.Module, analysis: Analysis, groups: list[CoupledGroup],
          limit: float, measure: Any, o: WidthOptions, fit: list[Batch]) -> Flap:
    """FLAP on ``groups`` until ``measure(keep) <= limit``."""
    from potstill.ir.surgery import keep_top, prune_width

    if not groups:
        return Flap(source, {}, [], {})
    scores = flap_scores(source, groups, fit)
    costs = unit_costs(groups, measure)
    multiple = channel_multiple(state.profile, o.align or 0)
    alloc = allocate(groups, rank_scores(groups, scores.z, costs), measure, limit, multiple=multiple,
                     comparable=True, floor=o.floor, uniform=o.uniform, best_effort=True)
    keep = {g.id: keep_top(g, scores.z[g.id], alloc.keep[g.id]) for g in groups if alloc.keep[g.id] < g.n_units}
    if not keep:
        return Flap(source, dict(alloc.keep), [], {})
    new = prune_width(source, analysis, keep)
    done = compensate_bias(new, groups, keep, source, scores.stats)
    return Flap(new, dict(alloc.keep), done, keep)


@dataclass
class Flap:
    """A FLAP-pruned copy: its kept units per group (``keep``: indices, for the refit), their
    counts (``widths``) and the readers whose biases took the removed mean contributions."""

    model: nn.Module
    widths: dict[int, int]
    compensated: list[str]
    keep: dict[int, list[int]]


def _refit(source: nn.Module, flap: Flap, analysis: Analysis, fit: list[Batch]) -> tuple[nn.Module, list[str]]:
    """A copy of the FLAP student whose readers of the pruned units (attention output and FFN down
    projections) are refitted by least squares to the source's outputs (``reconstruct.py``: Kwon et
    al.'s layer-wise mask tuning with every kept weight free, the compensated bias as the start)."""
    from .reconstruct import reconstruct

    model = copy.deepcopy(flap.model)
    return model, reconstruct(source, model, analysis, flap.keep, fit)


def _depth(state: CompileState, source: nn.Module, analysis: Analysis, names: list[str], heal: bool,
           fit: list[Batch]) -> tuple[nn.Module, list[str]]:
    """Remove the named blocks from ``source`` (their names are the teacher's) and, with ``heal``,
    refit the block after each removed run."""
    from potstill.ir.surgery import remove_blocks

    from .heal import refit_block

    new = remove_blocks(source, analysis, names)
    if not heal:
        return new, []
    blocks = {b.name: b for b in analysis.blocks}
    gone = sorted(blocks[n].index for n in names)
    container = blocks[names[0]].container
    after = max(gone) + 1
    siblings = list(source.get_submodule(container).children())
    if after >= len(siblings):
        return new, []
    healed = refit_block(state.teacher, state.teacher.get_submodule(container)[after], new,
                         new.get_submodule(container)[after - len(gone)], fit)
    return new, [f"{container}.{after - len(gone)}.{n}" for n in healed]


def prunable_macs(groups: Sequence[CoupledGroup], measure: Any) -> float:
    """What pruning every unit of the groups would remove, by the budget's measure (linear in units)."""
    costs = unit_costs(groups, measure)
    return float(sum(costs[g.id] * g.n_units for g in groups))


def prune_decoder(state: CompileState, student: Student, o: WidthOptions) -> PassResult:
    """Build the candidates of the module docstring, keep the best by held-out perplexity."""
    from potstill.passes.importance.blocks import angular_distances

    from .width_options import _budget, fit_and_heldout, record_arch, select_groups

    analysis = state.analysis(student)
    groups = select_groups(analysis, o)
    if not groups:
        raise InputError("prune.width: this decoder has no prunable heads or FFN neurons")
    cost = CostModel.build(student.module, analysis, state.example_inputs, state.example_kwargs, with_layers=True)
    budget = _budget(state, o, cost, groups)
    full = budget.full
    block_list = [b for b in analysis.blocks if b.macs > 0]
    names = [b.name for b in block_list]
    total_macs = float(analysis.cost.macs) or 1.0
    block_share = {b.name: full * b.macs / total_macs for b in block_list}  # a block's saving, in budget units
    prunable = prunable_macs(groups, budget.measure)
    pinned = max(full - sum(block_share.values()), 0.0)
    limit = budget.limit
    if o.ratio_of == "prunable" and o.ratio is not None:
        limit = full - o.ratio * (full - pinned)
        budget.asked = f"ratio {o.ratio:g} of the prunable {budget.what}"
    reach = 1.0 - (pinned + min(block_share.values(), default=0.0)) / full
    need = full - limit
    note = (f"prune.width: the embeddings and LM head are pinned ({pinned / full:.0%} of the {budget.what}); "
            f"{budget.asked} removes {need / full:.0%} of the total = {need / max(full - pinned, 1e-30):.0%} of "
            f"the prunable part; the most any student here can remove is {reach:.0%} of the total")
    print(note)
    if need > reach * full:
        warn(f"prune.width: {budget.asked} is unreachable: the pinned embeddings and LM head leave at most "
             f"{reach:.0%} of the total {budget.what} to remove; pruning as far as that (give ratio_of=prunable, "
             "CLI --ratio-of prunable, to state the ratio on the prunable part)")
        need = reach * full
        limit = full - need
    fit, heldout = fit_and_heldout(state, o.batches)
    if not heldout:
        heldout = fit[-max(1, len(fit) // 4):]
        fit = fit[: len(fit) - len(heldout)] or heldout
    teacher_ppl = perplexity(state.teacher, heldout)

    def n_blocks(saving: float) -> int:
        share = sorted(block_share.values())
        n, got = 0, 0.0
        while got < saving and n < len(share) - 1:
            got += float(np.mean(share))
            n += 1
        return n

    candidates: list[Candidate] = []
    model = student.module
    flap = _flap(state, model, analysis, groups, limit, budget.measure, o, fit)
    candidates.append(Candidate("width", flap.model, [], flap.widths, [], flap.compensated))
    if flap.keep and o.reconstruct is not False:
        refitted, done = _refit(model, flap, analysis, fit)
        candidates.append(Candidate("width+refit", refitted, [], flap.widths, done, flap.compensated))
        ffn = [g for g in groups if g.kind == "neurons"]
        part = _flap(state, model, analysis, ffn, limit, budget.measure, o, fit) if 0 < len(ffn) < len(groups) else None
        if part is not None and part.keep and budget.measure({**{g.id: g.n_units for g in groups}, **part.widths}) <= limit:
            refitted, done = _refit(model, part, analysis, fit)
            candidates.append(Candidate("ffn+refit", refitted, [], part.widths, done, part.compensated))
    n_depth = n_blocks(need)
    if n_depth >= 1 and names:
        dist = angular_distances(model, names, fit, n_depth)
        start = min(dist, key=lambda s: (dist[s], -s))
        run = names[start:start + n_depth]
        for heal in (False, True):
            new, healed = _depth(state, model, analysis, run, heal, fit)
            candidates.append(Candidate("depth" + ("+heal" if heal else ""), new, run, {}, healed, []))
        n_mix = max(1, round(n_depth * MIX_DEPTH_SHARE))
        if n_mix < n_depth:
            dist = angular_distances(model, names, fit, n_mix)
            start = min(dist, key=lambda s: (dist[s], -s))
            run = names[start:start + n_mix]
            saved = sum(block_share[n] for n in run)
            rest = [g for g in groups if not _in_blocks(g, run)]

            def measure(keep: Mapping[int, int], saved: float = saved) -> float:
                return budget.measure(keep) - saved

            part = _flap(state, model, analysis, rest, limit, measure, o, fit)
            for heal in (False, True):
                new, healed = _depth(state, part.model, analysis, run, heal, fit)
                candidates.append(Candidate("mix" + ("+heal" if heal else ""), new, run, part.widths, healed,
                                            part.compensated))
    for c in candidates:
        c.ppl_ratio = perplexity(c.model, heldout) / teacher_ppl
    finite = [c for c in candidates if math.isfinite(c.ppl_ratio)]
    if not finite:
        raise InputError("prune.width: every decoder candidate has a non-finite held-out perplexity")
    best = min(finite, key=lambda c: c.ppl_ratio)
    # predicted by the budget's measure (the record below measures the kept student itself)
    macs = {id(c): (budget.measure({**{g.id: g.n_units for g in groups}, **c.widths})
                    - sum(block_share[n] for n in c.removed)) for c in candidates}
    student.set_module(best.model, f"prune.width (decoder): {best.structure}")
    arch = dict(student.metrics.get("arch") or {})
    if best.removed:
        arch["removed_blocks"] = [*arch.get("removed_blocks", []), *best.removed]
    student.metrics["arch"] = arch
    labels = _labels(groups)
    record_arch(state, student, {labels[g.id]: {"kind": g.kind, "units": best.widths[g.id], "of": g.n_units,
                                                "channels": best.widths[g.id] * g.unit_channels, "how": "flap"}
                                 for g in groups if g.id in best.widths})
    macs_after = float(student.metrics["arch"]["macs"])
    student.metrics["prune"] = {
        "importance": "flap" if best.widths else "angular", "allocation": "global", "structure": best.structure,
        "macs_before": int(analysis.cost.macs), "macs_after": int(macs_after),
        "budget": {"asked": budget.asked, "what": budget.what, "limit": limit, "full": full,
                   "ratio_of": o.ratio_of, "pinned": pinned, "prunable_width": prunable, "reachable": reach,
                   "measured": macs_after},
        "decoder": {"teacher_heldout_ppl": teacher_ppl,
                    "candidates": [c.row(macs[id(c)], c is best) for c in candidates], "note": note},
        "reconstructed": best.healed, "bias_compensated": best.compensated,
    }
    print("prune.width (decoder): " + "; ".join(
        f"{c.structure} ppl x{c.ppl_ratio:.3f}{' <- kept' if c is best else ''}" for c in candidates))
    state.facts.discard("importance")
    state.facts.discard("block_importance")
    state.facts.add("pruned")
    return PassResult(state, True)


def _labels(groups: Sequence[CoupledGroup]) -> dict[int, str]:
    from .width_options import group_label

    return {g.id: group_label(g) for g in groups}

