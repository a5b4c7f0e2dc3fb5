"""Mixture-of-experts blocks that ``torch.export`` can capture: a dense-equivalent expert dispatch.

Hugging Face's sparse MoE blocks (Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE, PhiMoE, Jamba, ...) send
each token to its top-k experts with a loop that gathers an expert's tokens by
``torch.where(expert_mask[e])``: a shape that depends on the data, on which ``torch.export``
raises ``GuardOnDataDependentSymNode``. ``export_friendly_moe`` gives each such block a forward
that computes the same routing weights as a dense ``[tokens, experts]`` matrix (zero where a token
did not select the expert), runs every expert on every token and sums the experts' outputs scaled
by their column: the dense form of the top-k mixture (Shazeer et al. 2017, "Outrageously Large
Neural Networks"; Fedus et al. 2022 for the single-expert case), which has only static shapes.
It costs every expert on every token (``E / k`` times the sparse dispatch's expert FLOPs) and
computes the same output.

A block is found by its structure, not its class name: an ``experts`` ``nn.ModuleList`` of E
modules, a router (a child ``gate`` or ``router`` that is, or holds exactly one, ``nn.Linear`` from
the hidden size to E) and a top-k attribute (``top_k``, ``num_experts_per_tok``, ...); shared
experts (``shared_expert`` / ``shared_experts`` / ``shared_mlp``, with a sigmoid
``shared_expert_gate`` where there is one) are added as the families add them. The routing rule
is one of ``ROUTINGS``, and the one a block uses is *checked*: the new forward is kept only when it
reproduces the block's own forward on a random probe (outputs and router logits, to 1e-5 of their
scale), as ``potstill.outputs.students_io.program.plain_mask_module`` checks its causal-mask
wrapper. A block no rule reproduces keeps its forward (and ``torch.export`` says why it fails).
In training mode the block runs its own forward (jitter, sampled routing): only eval is rewritten.

    >>> blocks = export_friendly_moe(model)   # {"model.layers.0.block_sparse_moe": MoeDispatch(...)}
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MOE_ATTR",
    "ROUTINGS",
    "MoeDispatch",
    "block_attr",
    "dense_forward",
    "dense_moe",
    "expert_counts",
    "export_friendly_moe",
    "find_moe_blocks",
    "is_routed",
    "moe_blocks",
    "route",
    "router_logits",
    "routing_weights",
]

#: attribute that holds a patched block's :class:`MoeDispatch`
MOE_ATTR = "_potstill_moe"
#: routing rules: ``softmax_topk`` (softmax over the router logits in float32, the top-k probabilities,
#: renormalised to sum 1 where the family does: Mixtral always, Qwen-MoE/OLMoE by ``norm_topk_prob``;
#: selected on ``probs + e_score_correction_bias`` where the block has one, as Ernie 4.5) and
#: ``sparsemixer`` (PhiMoE's top-2 SparseMixer, Liu et al. 2024, in its deterministic eval form)
ROUTINGS = ("softmax_topk", "sparsemixer")
#: block attributes that hold the number of experts each token goes to
TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "moe_topk", "moe_k", "router_top_k")
ROUTER_NAMES = ("gate", "router")
SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
SHARED_GATE_NAMES = ("shared_expert_gate",)
#: a per-expert bias added to the probabilities for the choice of experts only (Ernie 4.5's ``moe_statics``)
SELECTION_BIAS = "e_score_correction_bias"
#: relative tolerance of the check against the block's own forward
CHECK_RTOL = 1e-5


@dataclass(frozen=True)
class MoeDispatch:
    """How a sparse MoE block is computed densely (names are relative to the block)."""

    #: the child the block calls for its router logits (``gate``, ``router``)
    router: str
    #: the ``nn.Linear`` inside it whose rows are the experts (``gate``, ``gate.wg``)
    router_linear: str
    #: the block attribute holding top-k
    top_k_attr: str
    #: one of ROUTINGS
    routing: str = "softmax_topk"
    #: renormalise the top-k probabilities to sum 1 (``softmax_topk``)
    normalize: bool = True
    #: shared expert run on every token, and its sigmoid gate, if any
    shared: str | None = None
    shared_gate: str | None = None
    #: parameter/buffer of a per-expert selection bias, if any
    selection_bias: str | None = None
    #: the block returns ``(hidden, router_logits)`` rather than ``hidden``
    returns_logits: bool = True


def _find_router(block: nn.Module, n_experts: int) -> tuple[str, str] | None:
    for name in ROUTER_NAMES:
        child = getattr(block, name, None)
        if not isinstance(child, nn.Module):
            continue
        if isinstance(child, nn.Linear):
            return (name, name) if child.out_features == n_experts else None
        linears = [sub for sub, m in child.named_modules() if isinstance(m, nn.Linear) and m.out_features == n_experts]
        if len(linears) == 1 and linears[0]:
            return name, f"{name}.{linears[0]}"
    return None


def _top_k_attr(block: nn.Module, n_experts: int) -> str | None:
    for attr in TOP_K_ATTRS:
        value = getattr(block, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= n_experts:
            return attr
    return None


def _selection_bias(block: nn.Module, n_experts: int) -> str | None:
    for name, t in [*block.named_parameters(), *block.named_buffers()]:
        if name.rsplit(".", 1)[-1] == SELECTION_BIAS and t.numel() == n_experts and not name.startswith("experts."):
            return name
    return None


def find_moe_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module, MoeDispatch]]:
    """Every module shaped like a sparse MoE block, with its layout (the routing rule not yet checked)."""
    for name, block in model.named_modules():
        experts = getattr(block, "experts", None)
        if not isinstance(experts, nn.ModuleList) or len(experts) < 2:
            continue
        n = len(experts)
        router, top_k = _find_router(block, n), _top_k_attr(block, n)
        if router is None or top_k is None:
            continue
        shared = next((s for s in SHARED_NAMES if isinstance(getattr(block, s, None), nn.Module)), None)
        gate = next((g for g in SHARED_GATE_NAMES if isinstance(getattr(block, g, None), nn.Linear)), None)
        yield name, block, MoeDispatch(router=router[0], router_linear=router[1], top_k_attr=top_k, shared=shared,
                                       shared_gate=gate if shared else None, selection_bias=_selection_bias(block, n))


def expert_counts(model: nn.Module) -> dict[str, int]:
    """Qualified name of each sparse MoE block (by structure) -> the number of experts it holds."""
    return {name: len(block.experts) for name, block, _ in find_moe_blocks(model)}  # type: ignore[arg-type]


def moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The blocks :func:`export_friendly_moe` rewrote: qualified name -> block."""
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, MOE_ATTR, None), MoeDispatch)}


# ---------------------------------------------------------------------------------------------
# Routing


def block_attr(block: nn.Module, name: str) -> Any:
    """The submodule, parameter or attribute at dotted ``name`` inside ``block``."""
    owner, _, leaf = name.rpartition(".")
    return getattr(block.get_submodule(owner) if owner else block, leaf)


def router_logits(block: nn.Module, spec: MoeDispatch, hidden: torch.Tensor) -> torch.Tensor:
    """``[tokens, experts]`` logits, computed as the block computes them (in the router's dtype)."""
    weight = block_attr(block, f"{spec.router_linear}.weight")
    logits = block_attr(block, spec.router)(hidden.to(weight.dtype))
    return logits.reshape(-1, logits.shape[-1])


def _sparsemixer(scores: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's top-2 SparseMixer (``transformers.models.phimoe.modeling_phimoe.sparsemixer``) at
    inference: each of the two experts is the arg-max of the scores left, weighted by its softmax
    over the scores within ``2 * jitter_eps`` (relative) of it."""
    weights, chosen = [], []
    masked = scores
    for _ in range(2):
        top, index = masked.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=top)
        far = ((top - scores) / factor) > (2 * jitter_eps)
        gates = torch.softmax(masked.masked_fill(far, float("-inf")), dim=-1)
        weights.append(gates.gather(-1, index))
        chosen.append(index)
        masked = torch.scatter(scores, -1, index, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(chosen, dim=-1)


def route(block: nn.Module, spec: MoeDispatch, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, experts)``, both ``[tokens, k]``: the experts each token goes to and their
    routing weights (float32), as the block's family computes them in eval mode."""
    if spec.routing == "sparsemixer":
        weight, index = _sparsemixer(logits, float(getattr(block, "router_jitter_noise", 0.0) or 0.0))
        return weight.float(), index
    k = int(getattr(block, spec.top_k_attr))
    probs = F.softmax(logits, dim=-1, dtype=torch.float)
    scores = probs
    if spec.selection_bias is not None:
        scores = probs + block_attr(block, spec.selection_bias).reshape(-1).to(probs.dtype)
    index = torch.topk(scores, min(k, logits.shape[-1]), dim=-1).indices
    weight = probs.gather(-1, index)
    if spec.normalize:
        norm_min = getattr(block, "norm_min", None)
        total = weight.sum(dim=-1, keepdim=True)
        weight = weight / (total.clamp(min=float(norm_min)) if isinstance(norm_min, float) else total)
    return weight, index


def routing_weights(block: nn.Module, spec: MoeDispatch, logits: torch.Tensor) -> torch.Tensor:
    """The dense ``[tokens, experts]`` routing weights (float32): zero where a token does not go."""
    weight, index = route(block, spec, logits)
    return torch.zeros(logits.shape, dtype=weight.dtype, device=logits.device).scatter(-1, index, weight)


def dense_moe(block: nn.Module, spec: MoeDispatch, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output, router_logits)`` of a sparse MoE block, computed with every expert on every token."""
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    logits = router_logits(block, spec, hidden_states)
    weights = routing_weights(block, spec, logits).to(x.dtype)
    out = torch.zeros_like(x)
    for e, expert in enumerate(block_attr(block, "experts")):
        out = out + expert(x) * weights[:, e : e + 1]
    if spec.shared is not None:
        shared = block_attr(block, spec.shared)(x)
        if spec.shared_gate is not None:
            shared = torch.sigmoid(block_attr(block, spec.shared_gate)(x)) * shared
        out = out + shared
    return out.reshape(shape), logits


def dense_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The forward a routed block is given (bound to it as ``block.forward``): the dense dispatch in
    eval mode, the family's own forward in training (jitter, sampled routing) or with other arguments.

    A bound function (``torch.export`` reads a root module's ``forward.__code__``) named
    ``forward``: a pickled block comes back with its class's forward, and ``export_friendly_moe``
    routes it again; a deep copy (a student) keeps it, bound to the copy."""
    if self.training or args or kwargs:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    spec: MoeDispatch = getattr(self, MOE_ATTR)
    out, logits = dense_moe(self, spec, hidden_states)
    return (out, logits) if spec.returns_logits else out


dense_forward.__name__ = "forward"


def is_routed(block: nn.Module) -> bool:
    """True when ``block`` runs the dense dispatch."""
    forward = vars(block).get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is dense_forward and forward.__self__ is block


# ---------------------------------------------------------------------------------------------
# The check against the block's own forward


def _candidates(block: nn.Module, spec: MoeDispatch) -> list[MoeDispatch]:
    norm = getattr(block, "norm_topk_prob", None)
    flags = [norm] if isinstance(norm, bool) else [True, False]
    out = [replace(spec, routing="softmax_topk", normalize=f) for f in flags]
    if int(getattr(block, spec.top_k_attr)) == 2 and spec.selection_bias is None:
        out.append(replace(spec, routing="sparsemixer", normalize=False))
    return out


def _close(a: Any, b: Any) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return False
    scale = float(a.detach().abs().max()) if a.numel() else 0.0
    return scale > 0 and float((a.detach().float() - b.detach().float()).abs().max()) <= CHECK_RTOL * scale


def _probe(block: nn.Module, spec: MoeDispatch, tokens: int = 16) -> torch.Tensor:
    linear = block_attr(block, spec.router_linear)
    param = next(iter(block_attr(block, "experts")[0].parameters()), linear.weight)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, tokens // 2, linear.in_features, generator=gen)
    return x.to(device=param.device, dtype=param.dtype)


def check_dispatch(block: nn.Module, spec: MoeDispatch) -> MoeDispatch | None:
    """The first candidate routing that reproduces ``block``'s own eval forward on a random probe."""
    if any(p.is_meta for p in block.parameters()):
        return None
    was_training = block.training
    block.eval()
    try:
        with torch.no_grad():
            x = _probe(block, spec)
            try:
                ref = type(block).forward(block, x.clone())
            except Exception:  # a block that does not run on a [batch, seq, hidden] input
                return None
            ref_out, ref_logits = (ref[0], ref[1]) if isinstance(ref, tuple) and len(ref) == 2 else (ref, None)
            for cand in _candidates(block, spec):
                cand = replace(cand, returns_logits=ref_logits is not None)
                try:
                    out, logits = dense_moe(block, cand, x.clone())
                except Exception:
                    continue
                if _close(ref_out, out) and (ref_logits is None or _close(ref_logits, logits)):
                    return cand
    finally:
        block.train(was_training)
    return None


def export_friendly_moe(model: nn.Module) -> dict[str, MoeDispatch]:
    """Give every sparse MoE block of ``model`` the dense dispatch (in place; idempotent).

    Returns the blocks rewritten by this call (qualified name -> layout); a block already rewritten
    (a student copied from a rewritten teacher) is left as it is, one no routing rule reproduces too.
    """
    done: dict[str, MoeDispatch] = {}
    for name, block, spec in list(find_moe_blocks(model)):
        if is_routed(block) and isinstance(getattr(block, MOE_ATTR, None), MoeDispatch):
            continue
        checked = check_dispatch(block, spec)
        if checked is None:
            continue
        setattr(block, MOE_ATTR, checked)
        block.forward = types.MethodType(dense_forward, block)  # type: ignore[method-assign]
        done[name] = checked
    return done
