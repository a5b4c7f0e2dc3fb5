"""Expert pruning: remove whole experts of each mixture-of-experts layer by router statistics.

Lu et al. 2024, "Not All Experts are Equal: Efficient Expert Pruning and Skipping for
Mixture-of-Experts Large Language Models", show that a sparse MoE layer keeps most of its quality
without its least-used experts. ``prune.experts`` scores each expert of each layer on the
calibration data (``state.calib_data``) by what its router sends it, in the routing the layer
itself computes (``potstill.inputs.moe.route``):

* ``importance=frequency`` -- how many tokens select the expert among their top-k (the frequency
  criterion of Lu et al.'s analysis);
* ``importance=weight``    -- the routing weight the expert receives, summed over tokens.

and keeps the highest-scoring ``keep`` fraction (or drops ``drop`` experts) in every layer. The
router's rows of the dropped experts are removed with them, so its softmax runs over the experts
left: a token's routing probabilities renormalise by themselves (its top-k weights are unchanged
where the family renormalises them and no dropped expert was among them). A layer keeps top-k at
most the experts it has left. The student's ``config`` states the new count
(``num_local_experts``, ``num_experts``, ...; listed in ``potstill_nonuniform`` when layers
differ) and the reload record names each layer's kept experts (``removed_blocks``), so
``potstill.load_student`` rebuilds the same shapes; ``metrics["arch"]["experts"]`` holds the
count per layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from potstill.errors import InputError
from potstill.inputs.moe import (
    MOE_ATTR,
    MoeDispatch,
    block_attr,
    expert_counts,
    export_friendly_moe,
    moe_blocks,
    route,
    router_logits,
)
from potstill.passes.importance.base import calibration_batches
from potstill.pipeline import Pass, PassResult, register_pass
from potstill.state import CompileState
from torch import nn

from .width_options import record_arch

IMPORTANCES = ("frequency", "weight")
#: config fields that hold the number of routed experts per layer, across families
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "moe_num_experts", "n_routed_experts")
#: config fields that hold top-k
TOP_K_FIELDS = ("num_experts_per_tok", "moe_topk", "moe_k")


@dataclass(frozen=True)
class ExpertOptions:
    #: fraction of each layer's experts kept, 0 < keep <= 1 (default 0.5 when drop is not given)
    keep: float | None = None
    #: number of experts removed from each layer (instead of keep)
    drop: int | None = None
    #: frequency (tokens routed to the expert) | weight (routing weight it receives, summed)
    importance: Literal["frequency", "weight"] = "frequency"
    #: calibration batches the router statistics are gathered on
    batches: int = 8

    def __post_init__(self) -> None:
        if self.keep is not None and self.drop is not None:
            raise InputError("prune.experts: give keep (a fraction of each layer's experts) or drop (a count), not both")
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise InputError(f"prune.experts: keep={self.keep:g} must lie in (0, 1], the fraction of each layer's "
                             "experts kept, e.g. keep=0.5")
        if self.drop is not None and self.drop < 0:
            raise InputError(f"prune.experts: drop={self.drop} must be 0 or more experts per layer")
        if self.importance not in IMPORTANCES:
            raise InputError(f"prune.experts: importance must be one of {list(IMPORTANCES)}, not {self.importance!r}")
        if self.batches < 1:
            raise InputError(f"prune.experts: batches={self.batches} must be at least 1")


def expert_statistics(model: nn.Module, batches: Sequence[Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Per MoE block of ``model``: ``{"frequency": [E], "weight": [E], "tokens": []}``, the router's
    choices on ``batches`` (padding tokens, where a 2-D ``attention_mask`` marks them, left out)."""
    from potstill.inputs.data import run_with_masks

    blocks = moe_blocks(model)
    stats = {name: {"frequency": torch.zeros(len(b.experts), dtype=torch.float64),  # type: ignore[arg-type]
                    "weight": torch.zeros(len(b.experts), dtype=torch.float64),  # type: ignore[arg-type]
                    "tokens": torch.zeros((), dtype=torch.float64)} for name, b in blocks.items()}  # fmt: skip
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str, block: nn.Module) -> Any:
        def pre(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(hidden, torch.Tensor):
                return
            spec: MoeDispatch = getattr(block, MOE_ATTR)
            weight, index = route(block, spec, router_logits(block, spec, hidden))
            mask = current["mask"]
            if mask is not None and tuple(mask.shape) == tuple(hidden.shape[:-1]):
                keep = mask.reshape(-1).bool()
                weight, index = weight[keep], index[keep]
            s = stats[name]
            s["frequency"].index_add_(0, index.reshape(-1), torch.ones(index.numel(), dtype=torch.float64))
            s["weight"].index_add_(0, index.reshape(-1), weight.reshape(-1).double())
            s["tokens"] += index.shape[0]

        return pre

    handles = [b.register_forward_pre_hook(hook(n, b), with_kwargs=True) for n, b in blocks.items()]
    try:
        run_with_masks(model, batches, lambda mask: current.__setitem__("mask", mask))
    finally:
        for h in handles:
            h.remove()
    return stats


def experts_to_keep(scores: torch.Tensor, n_keep: int) -> list[int]:
    """The ``n_keep`` highest-scoring experts, ascending; ties go to the lower index.

    >>> experts_to_keep(torch.tensor([3.0, 0.0, 5.0, 3.0]), 3)
    [0, 2, 3]
    """
    order = sorted(range(scores.numel()), key=lambda e: (-float(scores[e]), e))
    return sorted(order[:n_keep])


def drop_experts(model: nn.Module, keep: Mapping[str, Sequence[int]]) -> nn.Module:
    """A copy of ``model`` whose MoE blocks (qualified name -> experts kept) hold only the kept
    experts; the router's rows (and a per-expert selection bias) are sliced with them, the blocks'
    expert counts and top-k (at most the experts left) and the Hugging Face config follow.

    The copy shares every tensor it does not slice with ``model`` (``potstill.ir.cow``)."""
    from potstill.ir.cow import TensorSlots, shared_copy
    from potstill.ir.surgery import drop_children

    new = shared_copy(model)
    slots = TensorSlots(new)
    containers: dict[str, set[int]] = {}
    for name, kept_units in keep.items():
        block = new.get_submodule(name)
        spec = getattr(block, MOE_ATTR, None)
        if not isinstance(spec, MoeDispatch):
            raise InputError(f"prune.experts: '{name}' is not a mixture-of-experts block potstill routes")
        n = len(block.experts)  # type: ignore[arg-type]
        kept = sorted({int(e) for e in kept_units})
        if not kept or kept[0] < 0 or kept[-1] >= n:
            raise InputError(f"prune.experts: '{name}' has experts 0..{n - 1}; keep at least one of them")
        idx = torch.tensor(kept, dtype=torch.long)
        linear = block.get_submodule(spec.router_linear)
        for attr in ("weight", "bias"):
            t = getattr(linear, attr, None)
            if isinstance(t, torch.Tensor):
                slots.replace(t, t.detach().index_select(0, idx.to(t.device)).contiguous())
        linear.out_features = len(kept)
        if spec.selection_bias is not None:
            bias = block_attr(block, spec.selection_bias)
            dim = next(d for d in range(bias.dim() - 1, -1, -1) if bias.shape[d] == n)
            slots.replace(bias, bias.detach().index_select(dim, idx.to(bias.device)).contiguous())
        for attr in ("num_experts", "num_local_experts"):
            if isinstance(getattr(block, attr, None), int):
                setattr(block, attr, len(kept))
        k = int(getattr(block, spec.top_k_attr))
        if spec.routing == "sparsemixer" and len(kept) < 2:
            raise InputError(f"prune.experts: '{name}' routes each token to 2 experts ({type(block).__name__}'s "
                             "SparseMixer); keep at least 2 of them")
        if k > len(kept):
            setattr(block, spec.top_k_attr, len(kept))
        dropped = set(range(n)) - set(kept)
        if dropped:
            containers[f"{name}.experts"] = dropped
    drop_children(new, containers, layers=False)
    routed = moe_blocks(new).values()
    _update_config(new, [len(b.experts) for b in routed],  # type: ignore[arg-type]
                   [int(getattr(b, getattr(b, MOE_ATTR).top_k_attr)) for b in routed])
    return new


def _update_config(model: nn.Module, counts: list[int], top_ks: list[int]) -> None:
    config = getattr(model, "config", None)
    if config is None or not counts:
        return
    for field in EXPERT_COUNT_FIELDS:
        if isinstance(getattr(config, field, None), int) and not isinstance(getattr(config, field), bool):
            setattr(config, field, counts[0])
    for field in TOP_K_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > min(top_ks):
            setattr(config, field, min(top_ks))
    if len(set(counts)) > 1 or len(set(top_ks)) > 1:
        nonuniform = list(getattr(config, "potstill_nonuniform", None) or [])
        config.potstill_nonuniform = [*nonuniform, *(["num_experts"] if "num_experts" not in nonuniform else [])]


@register_pass
class ExpertPrunePass(Pass):
    """``prune.experts{keep=0.5,importance=frequency}``: remove each MoE layer's least-routed experts."""

    in_place = False  # builds a new module (potstill.ir.cow): the source is only read

    name: ClassVar[str] = "prune.experts"
    Options: ClassVar[type] = ExpertOptions
    ensures: ClassVar[frozenset[str]] = frozenset({"pruned"})

    def run(self, state: CompileState) -> PassResult:
        o: ExpertOptions = self.options
        student = state.working()
        model = student.module
        export_friendly_moe(model)  # a teacher given as a module: routed here (compiles route at load)
        blocks = moe_blocks(model)
        if not blocks:
            raise InputError("prune.experts: the model has no mixture-of-experts block potstill can route (a module "
                             "with an 'experts' ModuleList, a gate/router Linear to them and a top-k attribute whose "
                             "forward potstill reproduces); remove prune.experts from the pipeline")  # fmt: skip
        plan: dict[str, int] = {}
        for name, block in blocks.items():
            n = len(block.experts)  # type: ignore[arg-type]
            n_keep = n - o.drop if o.drop is not None else max(1, round((0.5 if o.keep is None else o.keep) * n))
            if n_keep < 1:
                raise InputError(f"prune.experts: drop={o.drop} removes every expert of '{name}' ({n}); keep at least one")
            plan[name] = n_keep
        if all(plan[name] == len(b.experts) for name, b in blocks.items()):  # type: ignore[arg-type]
            state.facts.add("pruned")
            return PassResult(state, False)
        stats = expert_statistics(model, calibration_batches(state, o.batches))
        keep = {name: experts_to_keep(stats[name][o.importance], plan[name]) for name in blocks}
        new = drop_experts(model, keep)
        counts = expert_counts(new)
        total = sum(len(b.experts) for b in blocks.values())  # type: ignore[arg-type]
        student.set_module(new, f"prune.experts: kept {sum(counts.values())} of {total} experts ({o.importance})")
        state.facts.discard("importance")
        state.facts.discard("block_importance")
        student.metrics["experts"] = {
            "importance": o.importance,
            "kept": keep,
            "scores": {name: [round(float(v), 6) for v in stats[name][o.importance]] for name in blocks},
            "tokens": {name: int(stats[name]["tokens"]) for name in blocks},
        }
        arch = dict(student.metrics.get("arch") or {})
        arch["experts"] = counts
        student.metrics["arch"] = arch
        record_arch(state, student, {})
        state.facts.add("pruned")
        return PassResult(state, True)
