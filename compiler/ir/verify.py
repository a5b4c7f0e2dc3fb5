"""The IR verifier: shapes agree, no dangling values, groups consistent.

Run by ``VerifyInstrument`` after every pass that changed the working student (``--debug``).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch
from potstill.errors import VerificationError

if TYPE_CHECKING:
    from potstill.ir.capture import Analysis
    from potstill.state import CompileState


def verify_analysis(analysis: Analysis) -> list[str]:
    """Problems found in an analysis (empty when consistent)."""
    problems: list[str] = []
    g = analysis.ir.graph
    for n, d in g.nodes(data=True):
        for a in d["args"]:
            if a not in g:
                problems.append(f"node {n} reads {a}, which no node defines")
    covered: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
    for grp in analysis.groups:
        if grp.n_units < 1:
            problems.append(f"group {grp.id} has {grp.n_units} units")
        for m in grp.members:
            size = analysis.param_shapes.get(m.param, ())
            if m.dim >= len(size):
                problems.append(f"group {grp.id}: {m.param} has no dim {m.dim}")
                continue
            end = m.offset + grp.n_units * m.unit_len
            if end > size[m.dim] or m.unit_len < 1:
                problems.append(f"group {grp.id}: {m.param} dim {m.dim} span {m.offset}..{end} exceeds size {size[m.dim]}")
            covered.setdefault((m.param, m.dim), []).append((m.offset, end, grp.id))
    for (param, dim), spans in covered.items():
        spans.sort()
        for (_s0, e0, g0), (s1, _e1, g1) in itertools.pairwise(spans):
            if s1 < e0:
                problems.append(f"{param} dim {dim}: groups {g0} and {g1} overlap at {s1}..{e0}")
    return problems


def verify_student(state: CompileState) -> None:
    """Re-export the working student, check its analysis and that it still runs like the teacher's shape."""
    from potstill.inputs.data import primary_output

    student = state.working()
    analysis = state.analysis(student)
    problems = verify_analysis(analysis)
    with torch.no_grad():
        out_s = primary_output(state.run_model(student.module))
        out_t = primary_output(state.run_model(state.teacher))
    if out_s.shape != out_t.shape:
        problems.append(f"student output shape {tuple(out_s.shape)} differs from teacher's {tuple(out_t.shape)}")
    if problems:
        raise VerificationError(f"student '{student.name}': " + "; ".join(problems[:10]))
