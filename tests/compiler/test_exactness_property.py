"""Exactness invariant over random architectures.

For every prunable group whose pruning is exact, the physically pruned student computes what the
teacher computes with the dropped units zeroed in every member — to float tolerance — and the
student is smaller. The verifier finds nothing wrong with the analysis of either model.
"""

from __future__ import annotations

import random

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from potstill.ir.capture import analyze
from potstill.ir.surgery import masked_reference, prune_width
from potstill.ir.verify import verify_analysis

from .archgen import conv_programs, token_programs

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _random_keep(analysis, seed: int) -> dict[int, list[int]]:
    rng = random.Random(seed)
    keep = {}
    for g in analysis.prunable():
        if not g.exact:
            continue
        k = rng.randint(1, g.n_units)
        keep[g.id] = sorted(rng.sample(range(g.n_units), k))
    return keep


def _check(model, inputs, seed: int) -> None:
    torch.manual_seed(seed)
    a = analyze(model, inputs)
    assert verify_analysis(a) == []
    keep = _random_keep(a, seed)
    student = prune_width(model, a, keep)
    reference = masked_reference(model, a, keep)
    with torch.no_grad():
        out_s = student(*inputs)
        out_r = reference(*inputs)
        out_t = model(*inputs)
    assert out_s.shape == out_t.shape
    scale = max(1.0, out_r.abs().max().item())
    torch.testing.assert_close(out_s, out_r, atol=2e-5 * scale, rtol=1e-4)
    dropped = any(len(v) < a.groups[g].n_units for g, v in keep.items())
    n_t = sum(p.numel() for p in model.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    assert (n_s < n_t) == dropped
    # the student is itself a valid model with consistent groups, runnable at another batch size
    a2 = analyze(student, tuple(torch.cat([x, x]) for x in inputs))
    assert verify_analysis(a2) == []


@SETTINGS
@given(model=conv_programs(), seed=st.integers(0, 2**16))
def test_conv_architectures_prune_exactly(model, seed):
    x = torch.randn(2, model.in_ch, 6, 6, generator=torch.Generator().manual_seed(seed))
    _check(model, (x,), seed)


@SETTINGS
@given(model=token_programs(), seed=st.integers(0, 2**16))
def test_token_architectures_prune_exactly(model, seed):
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(seed))
    _check(model, (ids,), seed)
