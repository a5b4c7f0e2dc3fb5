"""potstill: one teacher in, a family of small, verified students out.

The root package holds the Graph IR (capture, coupled-channel analysis, blocks, cost model,
surgery), the pass infrastructure and the command line. Passes, targets and device profiles live
in ``potstill.passes``, ``potstill.targets`` and ``potstill.profiles``.

``potstill.compile(teacher, out=..., ratios=[...])`` runs a whole compilation from Python (see
``potstill.api``); ``potstill.CompileState.from_teacher`` builds a state to run passes on.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__

__all__ = ["CompileState", "Compiled", "__version__", "compile", "load_student"]


def __getattr__(name: str) -> Any:
    # lazy, so ``import potstill`` (and ``potstill --help``) does not import torch
    if name in ("compile", "Compiled", "CompiledStudent"):
        from potstill import api

        return getattr(api, name)
    if name == "CompileState":
        from potstill.state import CompileState

        return CompileState
    if name == "load_student":
        from potstill.outputs.students_io import load_student

        return load_student
    raise AttributeError(f"module 'potstill' has no attribute {name!r}")
