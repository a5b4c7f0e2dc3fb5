"""Parity of an engine against the PyTorch module on held-out inputs.

Held-out inputs are the example itself plus random inputs of the same shape, dtype and value range
(integer inputs such as token ids keep their range; masks are kept as given), and, when the engine
has a dynamic batch, inputs at another batch size. Errors: ``max_abs = max|engine − torch|`` and
``rel = max_abs / max|torch|`` (the error against the output's scale), maxima over all inputs.
An engine passes when ``max_abs <= tolerance.max_abs`` or ``rel <= tolerance.rel``.

Mask-aware: when an input carries an ``attention_mask`` ``[B, S]`` and the output is ``[B, S, ...]``
(three or more dims, so a pooled ``[B, H]`` with ``H == S`` is never mistaken for one), only the
positions the mask keeps are compared, and ``max|torch|`` is taken over them. The outputs at padded
positions are undefined: a left-padded decoder (Llama) gives logits there that PyTorch and its ONNX
export disagree on by tens while kept positions agree to ~1e-4. The record counts ``positions``:
``{"compared": n, "masked": m}`` over all inputs.

NaN-aware: a NaN or infinity at a compared position, in the engine's output or in PyTorch's, fails parity and the
record says where (``nonfinite``), because NaN compares false with everything: ``max(0.0, nan)`` is
``0.0`` and would have reported a NaN engine as exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from potstill.errors import ParityError
from potstill.inputs.data import primary_output

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def _like(x: Any, batch: int | None, gen: torch.Generator, name: str = "") -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    shape = list(x.shape)
    if batch is not None and shape:
        shape[0] = batch
    if "mask" in name or x.dtype == torch.bool or x.numel() == 0:
        return _tile(x, batch)
    if x.is_floating_point():
        lo, hi = float(x.min()), float(x.max())
        if hi - lo < 1e-6:
            return torch.randn(shape, generator=gen, dtype=x.dtype)
        return torch.rand(shape, generator=gen, dtype=x.dtype) * (hi - lo) + lo
    lo_i, hi_i = int(x.min()), int(x.max())
    return torch.randint(lo_i, hi_i + 1, shape, generator=gen, dtype=x.dtype)


def _tile(x: torch.Tensor, batch: int | None) -> torch.Tensor:
    if batch is None or x.dim() == 0 or x.shape[0] == batch:
        return x.clone()
    reps = -(-batch // x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:batch].clone()


def held_out_inputs(
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    n_random: int = 2,
    other_batch: int | None = None,
    seed: int = 0,
) -> list[Inputs]:
    """The example, ``n_random`` random look-alikes, and one at ``other_batch`` when given."""
    kwargs = kwargs or {}
    gen = torch.Generator().manual_seed(seed)
    out: list[Inputs] = [(tuple(args), dict(kwargs))]
    batches: list[int | None] = [None] * n_random + ([other_batch] if other_batch else [])
    for batch in batches:
        out.append(
            (
                tuple(_like(a, batch, gen) for a in args),
                {k: _like(v, batch, gen, k) for k, v in kwargs.items()},
            )
        )
    return out


def batch_size(args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> int:
    for x in (*args, *(kwargs or {}).values()):
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return int(x.shape[0])
    return 1


def torch_reference(module: torch.nn.Module, inputs: Inputs) -> np.ndarray:
    with torch.inference_mode():
        out = primary_output(module(*inputs[0], **inputs[1]))
    return out.detach().float().cpu().numpy()


def kept_positions(inputs: Inputs, shape: Sequence[int]) -> np.ndarray | None:
    """``[B, S]`` booleans of the positions ``inputs``' ``attention_mask`` keeps, when an output of
    ``shape`` is per position (``[B, S, ...]``, three or more dims); ``None`` otherwise (compare all)."""
    mask = inputs[1].get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or len(shape) < 3:
        return None
    if tuple(shape[:2]) != tuple(mask.shape):
        return None
    return np.asarray(mask.detach().cpu().numpy() != 0)


def errors(engine: np.ndarray, reference: np.ndarray, keep: np.ndarray | None = None) -> tuple[float, float]:
    """(max_abs, rel) of ``engine`` against ``reference`` at the positions ``keep`` marks (all when
    ``None``); shapes must agree.

    ``nan`` when either holds a NaN or an infinity there, ``inf`` when the shapes differ: both fail
    every tolerance (compare with ``<=``, never keep a worst case with ``max``).
    """
    engine = np.asarray(engine, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if engine.shape != reference.shape:
        return float("inf"), float("inf")
    if keep is not None:
        engine, reference = engine[keep], reference[keep]
    if not (np.isfinite(engine).all() and np.isfinite(reference).all()):
        return float("nan"), float("nan")
    max_abs = float(np.max(np.abs(engine - reference))) if engine.size else 0.0
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    return max_abs, (max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf")))


def within(max_abs: float, rel: float, tolerance: Any) -> bool:
    """Whether errors pass ``tolerance``; NaN never does."""
    if math.isnan(max_abs) or math.isnan(rel):
        return False
    return max_abs <= tolerance.max_abs or rel <= tolerance.rel


def _nonfinite(x: np.ndarray) -> int:
    return int(np.size(x) - np.count_nonzero(np.isfinite(np.asarray(x, dtype=np.float64))))


def check_parity(
    module: torch.nn.Module,
    run_engine: Callable[[Inputs], np.ndarray],
    inputs: Sequence[Inputs],
    tolerance: Any,
    output: str = "output",
) -> dict[str, Any]:
    """Run torch and the engine on each input; ``{"max_abs", "rel", "ok", "n_inputs", "output"}``.

    With a NaN or infinity at a compared position the record also has ``nonfinite``: ``{"engine": n,
    "torch": n, "input": i}`` (counts of non-finite values and the first held-out input that had
    them). With an attention mask over a per-position output it has ``positions``: ``{"compared":
    n, "masked": m}``, summed over the inputs.
    """
    worst_abs, worst_rel = 0.0, 0.0
    nonfinite: dict[str, int] = {}
    compared = masked = 0
    for i, item in enumerate(inputs):
        engine, reference = run_engine(item), torch_reference(module, item)
        keep = kept_positions(item, np.shape(reference)) if np.shape(engine) == np.shape(reference) else None
        if keep is not None:
            compared, masked = compared + int(keep.sum()), masked + int(keep.size - keep.sum())
        bad = {
            "engine": _nonfinite(engine if keep is None else np.asarray(engine)[keep]),
            "torch": _nonfinite(reference if keep is None else reference[keep]),
        }
        if any(bad.values()) and not nonfinite:
            nonfinite = bad | {"input": i}
        max_abs, rel = errors(engine, reference, keep)
        # keep NaN: max() would drop it (max(0.0, nan) == 0.0)
        worst_abs = max_abs if math.isnan(max_abs) or math.isnan(worst_abs) else max(worst_abs, max_abs)
        worst_rel = rel if math.isnan(rel) or math.isnan(worst_rel) else max(worst_rel, rel)
    record: dict[str, Any] = {
        "max_abs": worst_abs,
        "rel": worst_rel,
        "ok": within(worst_abs, worst_rel, tolerance) and not nonfinite,
        "n_inputs": len(inputs),
        "output": output,
    }
    if compared or masked:
        record["positions"] = {"compared": compared, "masked": masked}
    if nonfinite:
        record["nonfinite"] = nonfinite
    return record


def raise_if_failed(parity: dict[str, Any], engine: Any, tolerance: Any) -> None:
    """``ParityError`` naming the engine, its output, its errors and the tolerance, when not ok."""
    if parity.get("ok", False):
        return
    output = parity.get("output", "output")
    bad = parity.get("nonfinite")
    if bad:
        where = []
        if bad.get("engine"):
            where.append(f"the engine gave {bad['engine']} NaN/inf values")
        if bad.get("torch"):
            where.append(f"the PyTorch student gave {bad['torch']} NaN/inf values")
        fix = (
            "the student's weights or inputs are not finite: check the training data and the passes before lowering"
            if bad.get("torch")
            else "the engine overflows or computes something else: check the export for ops that change numerics"
        )
        raise ParityError(
            f"{engine}: output '{output}' is not finite on held-out input {bad.get('input', 0)} of "
            f"{parity.get('n_inputs')}: {'; '.join(where)}; {fix}"
        )
    positions = parity.get("positions")
    kept = f" at the {positions['compared']} positions the attention mask keeps" if positions else ""
    raise ParityError(
        f"{engine}: output '{output}' does not match PyTorch on {parity.get('n_inputs')} held-out inputs{kept}: "
        f"max_abs={parity['max_abs']:.3g} (tolerance {tolerance.max_abs:g}), "
        f"rel={parity['rel']:.3g} (tolerance {tolerance.rel:g}); check the export for ops that "
        "change numerics, or loosen the profile's tolerance if this precision is expected"
    )
