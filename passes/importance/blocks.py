"""Block (depth) importance: which residual blocks / transformer layers matter least.

Three estimators over the IR's removable blocks (``analysis.blocks``), higher = keep:

* ``bi`` -- Block Importance (Minitron, arXiv 2407.14679; ShortGPT):
  ``BI_j = 1 - mean_{b,t} cos(h_in[b,t,:], h_out[b,t,:])`` with forward hooks on the block
  (channel dim: last for sequences, 1 for feature maps).
* ``mse`` -- the normalised output error with the block removed (Nemotron Elastic,
  arXiv 2511.16664): ``e_j = sum_b ||z - z_{-j}||^2 / sum_b ||z||^2`` over the calibration batches,
  iterative: drop the block with the smallest ``e``, re-score the rest with it dropped, and so on.
* ``dp`` -- AmoebaLLM's dynamic programme (``potstill.passes.prune.depth_dp``) over
  ``state.metric`` (or, without one, ``-e`` of the blocks removed together), giving the best mask
  for every removal count in one run.
* ``angular`` -- Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers" (arXiv
  2403.17887): for ``n`` blocks to remove, the *contiguous* run starting at ``l`` whose input and
  output are closest, ``d(l, n) = mean_t arccos(cos(h_l[t], h_{l+n}[t])) / pi`` over the tokens the
  mask keeps (``angular_distances``); a block's score is ``d`` of the single-block run (n = 1).

Removing a block is simulated with a forward hook that returns the block's input (the block
computes ``x + f(x)``, so removal makes it the identity); no surgery is needed to score.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from potstill.errors import InputError
from potstill.inputs.data import Batch, primary_output
from potstill.ir.layerwise import run_hooked
from potstill.pipeline import Pass, PassResult, register_pass
from potstill.state import CompileState
from torch import nn

from .base import DEFAULT_CALIB_BATCHES, calibration_batches

if TYPE_CHECKING:
    from potstill.passes.prune.depth_dp import DepthDPResult

METHODS = ("bi", "mse", "dp", "angular")


def _block_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("hidden_states", "x", "input"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    raise RuntimeError("block called without a tensor input")


def _block_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return primary_output(out)


def identity_output(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    """What a skipped block returns: its input in place of its output (a tuple keeps its extras)."""
    x = _block_input(args, kwargs)
    if isinstance(out, torch.Tensor):
        return x
    if isinstance(out, tuple):
        return (x, *out[1:])
    raise RuntimeError(f"cannot skip a block returning {type(out).__name__}")


@contextlib.contextmanager
def skipped(model: nn.Module, names: Iterable[str]) -> Iterator[nn.Module]:
    """The model with the named blocks acting as the identity (their output replaced by their input)."""

    def identity(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        return identity_output(args, kwargs, out)

    handles = [model.get_submodule(n).register_forward_hook(identity, with_kwargs=True) for n in names]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _run_all(model: nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [primary_output(b.run(model)).float() for b in batches]


def block_influence(model: nn.Module, names: Sequence[str], batches: Sequence[Batch]) -> dict[str, float]:
    """Minitron's Block Importance ``1 - mean cos(h_in, h_out)`` of every named block."""
    sums = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)
    handles = []
    for name in names:

        def hook(
            _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, name: str = name
        ) -> None:
            x, y = _block_input(args, kwargs).float(), _block_output(out).float()
            cdim = -1 if x.dim() <= 3 else 1
            cos = torch.nn.functional.cosine_similarity(x, y, dim=cdim, eps=1e-8)
            sums[name] += float(cos.sum())
            counts[name] += cos.numel()

        handles.append(model.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    try:
        _run_all(model, batches)
    finally:
        for h in handles:
            h.remove()
    return {n: 1.0 - sums[n] / max(counts[n], 1) for n in names}


def _stream(model: nn.Module, names: Sequence[str], batch: Batch) -> list[torch.Tensor]:
    """``[h_0, ..., h_N]``: the input of each named block (in order) and the output of the last,
    at the tokens the batch's attention mask keeps, as ``[tokens, hidden]``."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, name: str = name) -> None:
            seen[name] = _block_input(args, kwargs).detach().float()
            seen[name + "/out"] = _block_output(out).detach().float()

        handles.append(model.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    run_hooked(model, batch, handles)
    states = [seen[n] for n in names] + [seen[names[-1] + "/out"]]
    mask = batch.kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and states[0].dim() == 3 \
            and tuple(states[0].shape[:2]) == tuple(mask.shape):
        return [h[mask.bool()] for h in states]
    return [h.reshape(-1, h.shape[-1]) if h.dim() == 3 else h.flatten(1) for h in states]


def angular_distances(model: nn.Module, names: Sequence[str], batches: Sequence[Batch], n: int) -> dict[int, float]:
    """``{l: d(l, n)}`` for every start ``l`` of a run of ``n`` consecutive named blocks (Gromov et al.)."""
    if not 1 <= n <= len(names):
        raise InputError(f"angular distance: a run of {n} blocks among {len(names)}")
    sums = dict.fromkeys(range(len(names) - n + 1), 0.0)
    count = 0
    for b in batches:
        h = _stream(model, names, b)
        for start in sums:
            cos = torch.nn.functional.cosine_similarity(h[start], h[start + n], dim=-1, eps=1e-8)
            sums[start] += float(torch.arccos(cos.clamp(-1.0, 1.0)).sum() / torch.pi)
        count += h[0].shape[0]
    return {start: total / max(count, 1) for start, total in sums.items()}


def angular_run(model: nn.Module, names: Sequence[str], batches: Sequence[Batch], n: int) -> list[str]:
    """The ``n`` consecutive blocks with the smallest angular distance between their input and output."""
    dist = angular_distances(model, names, batches, n)
    start = min(dist, key=lambda s: (dist[s], -s))  # ties: the later run (deeper layers are more redundant)
    return list(names[start:start + n])


def output_error(
    model: nn.Module, removed: Iterable[str], batches: Sequence[Batch], reference: Sequence[torch.Tensor]
) -> float:
    """``sum_b ||z - z_removed||^2 / sum_b ||z||^2`` against the reference outputs ``z``."""
    with skipped(model, removed):
        outs = _run_all(model, batches)
    num = sum(float(((z - o) ** 2).sum()) for z, o in zip(reference, outs))
    den = sum(float((z**2).sum()) for z in reference)
    return num / max(den, 1e-30)


def iterative_output_error(
    model: nn.Module, names: Sequence[str], batches: Sequence[Batch], rounds: int | None = None
) -> list[tuple[str, float]]:
    """Drop the block whose removal hurts the output least, re-score, repeat ``rounds`` times.

    Returns the removal order with the error at which each block went."""
    reference = _run_all(model, batches)
    dropped: list[tuple[str, float]] = []
    left = list(names)
    for _ in range(len(names) if rounds is None else min(rounds, len(names))):
        gone = [n for n, _ in dropped]
        errors = {n: output_error(model, [*gone, n], batches, reference) for n in left}
        best = min(left, key=errors.__getitem__)
        dropped.append((best, errors[best]))
        left.remove(best)
    return dropped


def dp_masks(
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence[Batch],
    max_removed: int,
    metric: Callable[[nn.Module], float] | None = None,
) -> DepthDPResult:
    """AmoebaLLM's programme over ``metric(model)`` (default: minus the output error)."""
    from potstill.passes.prune.depth_dp import depth_dp

    reference = _run_all(model, batches) if metric is None else []

    def evaluate(removed: frozenset[str]) -> float:
        if metric is None:
            return -output_error(model, removed, batches, reference)
        with skipped(model, removed):
            return float(metric(model))

    return depth_dp(list(names), evaluate, max_removed)


@dataclass(frozen=True)
class BlockImportanceOptions:
    #: "bi" | "mse" | "dp" | "angular"
    method: str = "bi"
    batches: int = DEFAULT_CALIB_BATCHES
    #: dp: the largest removal count to solve for (0 = all but one block)
    max_removed: int = 0


class BlockImportance:
    """The three block estimators behind one call; ``scores`` returns ``{block: importance}``."""

    def __init__(self, method: str = "bi", max_removed: int = 0) -> None:
        if method not in METHODS:
            raise InputError(f"block importance method must be one of {METHODS}, not {method!r}")
        self.method = method
        self.max_removed = max_removed
        self.dp_result: DepthDPResult | None = None

    def scores(
        self,
        model: nn.Module,
        names: Sequence[str],
        batches: Sequence[Batch],
        metric: Callable[[nn.Module], float] | None = None,
    ) -> dict[str, float]:
        if self.method == "bi":
            return block_influence(model, names, batches)
        if self.method == "angular":
            dist = angular_distances(model, names, batches, 1)
            return {name: dist[i] for i, name in enumerate(names)}
        if self.method == "mse":
            order = iterative_output_error(model, names, batches)
            scores, running = {}, 0.0
            for rank, (name, err) in enumerate(order):
                running = max(running, err)  # removal order must read as increasing importance
                scores[name] = running + 1e-9 * rank
            return scores
        limit = self.max_removed or max(len(names) - 1, 0)
        self.dp_result = dp_masks(model, names, batches, limit, metric)
        return self.dp_result.importance(names)


@register_pass
class BlockImportancePass(Pass):
    """``importance.blocks{method=bi}``: score the working student's removable blocks."""

    in_place = False  # reads weights only

    name: ClassVar[str] = "importance.blocks"
    Options: ClassVar[type] = BlockImportanceOptions
    ensures: ClassVar[frozenset[str]] = frozenset({"block_importance"})

    def run(self, state: CompileState) -> PassResult:
        o = self.options
        student = state.working()
        names = [b.name for b in state.analysis(student).blocks]
        est = BlockImportance(o.method, o.max_removed)
        batches = calibration_batches(state, o.batches)
        student.block_importance = est.scores(student.module, names, batches, state.metric)
        student.metrics["block_importance_method"] = o.method
        if est.dp_result is not None:
            student.metrics["depth_dp"] = {
                "masks": {m: list(v) for m, v in est.dp_result.masks.items()},
                "values": dict(est.dp_result.values),
                "evaluations": est.dp_result.evaluations,
            }
        state.facts.add("block_importance")
        return PassResult(state, False)
