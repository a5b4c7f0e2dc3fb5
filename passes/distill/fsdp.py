"""FSDP2 for students too large to train whole on one device: each rank keeps a shard of every tensor.

``torch.distributed.fsdp.fully_shard`` (FSDP2, per-parameter sharding over ``DTensor``) splits
every parameter along dim 0 across the ranks; a sharded module all-gathers a block's parameters
just before its forward and backward and frees them after, and reduce-scatters the gradients
(averaged), so parameters, gradients and optimizer state each take ``1/world`` of their size per
rank, plus one block's gathered parameters (Zhao et al., "PyTorch FSDP", arXiv 2304.11277).
Sharding each repeated block first and the root last makes those the units of gathering.

It runs on CPU with gloo as well as on CUDA with NCCL (checked with torch 2.13). The teacher is not
sharded here: it is frozen, so it can run replicated in bf16, or be replaced by a
``teacher_cache.TeacherCache``.

The trainer (``TrainConfig(parallel="fsdp")``) never shards the user's module itself: FSDP2 turns a
module into an ``FSDPModule`` with DTensor parameters and hooks, which ``torch.export`` and ONNX must
not see. It trains a sharded *replica* instead and copies the trained weights back:

    replica = sharded_replica(student, device)   # under torchrun; built on "meta", then filled
    ... train replica: loss.backward(); clip_grad_norm(params, 1.0); optimizer.step() ...
    gather_into(replica, student)                # the plain student holds the full weights, every rank

The replica is built on the meta device and only its shards are allocated, so the device never holds
the whole student; the plain student stays where it was (the host, typically).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from potstill.ir.layerwise import layer_stack
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The items of the model's largest ``nn.ModuleList`` (a transformer's layers), else its children."""
    stack = layer_stack(module)
    if stack is not None:
        return list(stack[1])
    return [c for c in module.children() if any(True for _ in c.parameters())]


def shard_student(module: nn.Module, blocks: list[nn.Module] | None = None, *, reshard_after_forward: bool = True) -> nn.Module:
    """Apply ``fully_shard`` to each block (``repeated_blocks`` by default) and then to ``module``.

    Needs an initialised process group; returns ``module`` (now an ``FSDPModule``), sharded in place.
    """
    from torch.distributed.fsdp import fully_shard

    for block in repeated_blocks(module) if blocks is None else blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    fully_shard(module, reshard_after_forward=reshard_after_forward)
    return module


def sharded_replica(module: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``module``, sharded by ``shard_student``, holding ``module``'s weights; ``module`` is untouched.

    The copy's parameters start on the meta device (no second full copy anywhere), are sharded,
    allocated on ``device`` (``to_empty``: only this rank's shard) and filled from ``module``'s full
    state dict (``set_model_state_dict`` keeps each rank's rows). Buffers, which FSDP does not
    shard, are copied whole — the non-persistent ones too (rotary ``inv_freq``), which no state
    dict carries.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    memo: dict[int, Any] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in module.parameters()
    }  # deepcopy maps each parameter (shared ones once) to its meta stand-in
    replica = copy.deepcopy(module, memo)
    shard_student(replica)
    replica.to_empty(device=device)
    set_model_state_dict(replica, module.state_dict(), options=StateDictOptions(full_state_dict=True))
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            replica.get_buffer(name).copy_(buffer)
    return replica


def _full(value: Any) -> Any:
    """A DTensor's whole tensor on the host (a collective: every rank calls it in the same order)."""
    if isinstance(value, DTensor):
        return value.full_tensor().detach().cpu()
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value


def iter_full_state(module: nn.Module) -> Iterator[tuple[str, Any]]:
    """``module``'s state dict one unsharded host tensor at a time (at most one gathered at once)."""
    for name, value in module.state_dict().items():
        yield name, _full(value)


def full_state_dict(module: nn.Module) -> dict[str, Any]:
    """The unsharded weights (``DTensor.full_tensor``) on every rank, on the host, for saving or comparing."""
    return dict(iter_full_state(module))


def gather_into(replica: nn.Module, module: nn.Module) -> None:
    """Copy the sharded ``replica``'s full weights into the plain ``module`` (same names), on every rank."""
    target = module.state_dict()
    with torch.no_grad():
        for name, value in iter_full_state(replica):
            target[name].copy_(value)


def load_full_state(replica: nn.Module, state: dict[str, Any]) -> None:
    """Load a full (unsharded) state dict into a sharded module: each rank keeps its rows."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(replica, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor (AdamW's moments) made whole."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: _full(v) for k, v in s.items()} for i, s in state["state"].items()}
    return state


def shard_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Inverse of ``full_optimizer_state`` for this optimizer: a state tensor shaped like its sharded
    parameter is distributed like it; ``optimizer.load_state_dict`` takes the result."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def shard(value: Any, p: torch.Tensor) -> Any:
        if isinstance(p, DTensor) and isinstance(value, torch.Tensor) and value.shape == p.shape:
            return distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        return value

    out = dict(state)
    out["state"] = {i: {k: shard(v, params[int(i)]) for k, v in s.items()} for i, s in state["state"].items()}
    return out


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """The global 2-norm of the gradients, sharded (DTensor) or not; scaled down to ``max_norm`` when above.

    ``torch.nn.utils.clip_grad_norm_`` refuses a mix of DTensor gradients (an FSDP student) and
    plain ones (a loss's learned projections); the norm is ``‖(‖g_sharded‖, ‖g_plain‖)‖₂`` — a
    DTensor norm is already reduced over the ranks — and each gradient's local part is scaled by
    ``min(1, max_norm / (norm + 1e-6))``, as ``clip_grad_norm_`` does.
    """
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if not sharded:  # the plain case stays torch's own, bit for bit
        if max_norm:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.nn.utils.get_total_norm(grads)
    plain = [g for g in grads if not isinstance(g, DTensor)]
    norms = [torch.nn.utils.get_total_norm(group) for group in (sharded, plain) if group]
    whole = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]
    total = torch.linalg.vector_norm(torch.stack([n.to(whole[0].device) for n in whole]))
    if max_norm:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        with torch.no_grad():
            for g in grads:
                local = g.to_local() if isinstance(g, DTensor) else g
                local.mul_(coef.to(local.device))
    return total
