"""Run calibration data through a model one block at a time, holding one block's activations.

SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774, §4 and its reference code's ``Catcher``) and
FLAP (An et al. 2024, arXiv 2312.11983) process a large decoder layer by layer: the calibration
batches run up to the first block, whose inputs are captured (a pre-hook that stops the forward);
then for each block ``i`` in order

    X_{i+1} = [ block_i(x) for x in X_i ]

with the caller's ``visit(i, block, X_i)`` run first — it may hook the block's submodules to
gather statistics (activation importance), or refit the block's weights on ``X_i``
(reconstruction). Only ``X_i`` and the block are live; with ``device`` set, each block is moved
there for its turn and back afterwards, so a model larger than the device fits.

The blocks must be applied in sequence with the hidden state as the first argument (or the
``hidden_states`` keyword) and everything else (masks, rotary position embeddings) unchanged
between blocks — true of Hugging Face decoder and encoder stacks.

    run_layerwise(model, model.model.layers, batches, visit=lambda i, block, xs: ...)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from potstill.inputs.data import as_batch
from torch import nn

#: one block's call: (positional args, keyword args)
BlockInput = tuple[tuple[Any, ...], dict[str, Any]]


class StopForward(Exception):
    """Raised by a hook to end a forward pass once what is needed is captured."""


def run_hooked(model: nn.Module, batch: Any, handles: Sequence[Any]) -> None:
    """Run ``model`` on ``batch`` without gradients (until a hook raises ``StopForward``, if one
    does), then remove ``handles``."""
    try:
        with torch.no_grad():
            batch.run(model)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's largest ``nn.ModuleList`` by parameter count (a transformer's layers) and its
    qualified name; None when it has none."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return None
    sizes = [sum(p.numel() for p in m.parameters()) for _, m in lists]
    return lists[sizes.index(max(sizes))]


class _Captured(Exception):
    """Raised by the pre-hook on the first block: the rest of the forward is not needed."""


#: block keyword arguments that carry a key/value cache: replaced by "no cache", so running a block
#: again (as the layer-by-layer passes do) never attends to keys an earlier run appended
_CACHE_KWARGS = {"past_key_values": None, "past_key_value": None, "layer_past": None, "use_cache": False}


def _without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: _CACHE_KWARGS.get(k, v) for k, v in kwargs.items()}


def first_block_inputs(model: nn.Module, first: nn.Module, batches: Iterable[Any]) -> list[BlockInput]:
    """The (args, kwargs) the first block receives for each batch (the model runs only up to it);
    a key/value cache among the kwargs is replaced by none."""
    captured: list[BlockInput] = []

    def stop(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((tuple(args), _without_cache(dict(kwargs))))
        raise _Captured

    handle = first.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            for raw in batches:
                try:
                    as_batch(raw).run(model)
                except _Captured:
                    continue
                raise ValueError(f"{type(first).__name__}: the model's forward did not call this block")
    finally:
        handle.remove()
    return captured


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (
            a is b or (a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or bool(a == b)


def blocks_share_inputs(model: nn.Module, blocks: Sequence[nn.Module], batch: Any) -> bool:
    """Whether, on ``batch``, every block receives the same arguments but the hidden state — what
    running the blocks in sequence on captured first-block inputs assumes. False where layers get
    their own masks or rotary tables (sliding-window and global layers alternating) or a block is
    skipped."""
    seen: list[BlockInput] = []

    def record(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((tuple(args[1:]), {k: v for k, v in _without_cache(kwargs).items() if k != "hidden_states"}))

    handles = [b.register_forward_pre_hook(record, with_kwargs=True) for b in blocks]
    try:
        with torch.no_grad():
            as_batch(batch).run(model)
    finally:
        for h in handles:
            h.remove()
    return len(seen) == len(blocks) and all(_same(s, seen[0]) for s in seen[1:])


def block_output(out: Any) -> torch.Tensor:
    """The hidden state a block returns (older Hugging Face layers return a tuple)."""
    return out if isinstance(out, torch.Tensor) else out[0]  # older HF layers return (hidden, ...)


def with_hidden(inp: BlockInput, hidden: torch.Tensor) -> BlockInput:
    """The block input ``inp`` with its hidden state replaced (the next block's input)."""
    args, kwargs = inp
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _move(value: Any, device: torch.device | str) -> Any:
    """Tensors inside tuples, lists and dicts moved to ``device`` (rotary (cos, sin) pairs, masks)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def run_layerwise(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    batches: Iterable[Any],
    visit: Callable[[int, nn.Module, list[BlockInput]], None] | None = None,
    *,
    device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """Feed ``batches`` through ``blocks`` one block at a time; returns the last block's outputs.

    ``visit(i, block, inputs)`` runs before block ``i`` processes ``inputs`` (hooks it adds on the
    block see that pass). With ``device``, block ``i`` and its inputs move there for the turn.
    """
    if not blocks:
        raise ValueError("run_layerwise needs at least one block")
    inputs = first_block_inputs(model, blocks[0], batches)
    outputs: list[torch.Tensor] = []
    for i, block in enumerate(blocks):
        home = next((p.device for p in block.parameters()), None)
        if device is not None:
            block.to(device)
            inputs = [(_move(a, device), _move(k, device)) for a, k in inputs]
        if visit is not None:
            visit(i, block, inputs)
        with torch.no_grad():
            outputs = [block_output(block(*a, **k)) for a, k in inputs]
        inputs = [with_hidden(inp, out) for inp, out in zip(inputs, outputs)]
        if device is not None and home is not None:
            block.to(home)
    return outputs
