"""Errors a user can act on. Each names the thing at fault and what to do about it."""

from __future__ import annotations


class PotstillError(Exception):
    """Base class: the CLI prints these without a traceback and exits non-zero."""


class InputError(PotstillError):
    """Bad user input: a file, a field, a teacher spec, a pipeline string."""


class PreconditionError(PotstillError):
    """A pass was run on a state that lacks what it requires."""


class PostconditionError(PotstillError):
    """A pass did not establish what it promised."""


class PassError(PotstillError):
    """A pass failed; the message names the pass and those that ran before it."""


class ParityError(PotstillError):
    """An engine does not compute what the PyTorch student computes (over tolerance)."""


class VerificationError(PotstillError):
    """The IR verifier found an inconsistency (shapes, dangling values, groups)."""


class NumericError(PotstillError):
    """A value became NaN or infinite, or training diverged; the message names where and what to do."""
