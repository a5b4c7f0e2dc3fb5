"""potstill: one teacher in, a family of small, verified students out.

The root package holds the Graph IR (capture, coupled-channel analysis, blocks, cost model,
surgery), the pass infrastructure and the command line. Passes, targets and device profiles live
in ``potstill.passes``, ``potstill.targets`` and ``potstill.profiles``.
"""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # lazy, so ``import potstill`` (and ``potstill --help``) does not import torch
    if name == "load_student":
        from .students_io import load_student

        return load_student
    raise AttributeError(f"module 'potstill' has no attribute {name!r}")
