"""``Pass``: a name, frozen ``Options``, the predicates it ``requires`` and ``ensures``, one ``run``.

The contract follows onnx-ir's ``PassBase``: the base class checks ``requires`` before ``run`` and
``ensures`` after it (``PreconditionError`` / ``PostconditionError``), and ``run`` returns a
``PassResult(state, changed)`` as torch.fx's ``PassResult`` does. A predicate is a callable on the
state; a plain string in ``requires`` is the fact of that name (``Fact``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from potstill.errors import PostconditionError, PreconditionError

from .options import build_options, format_value

if TYPE_CHECKING:
    from potstill.state import CompileState


@dataclass(frozen=True)
class NoOptions:
    """Options of a pass that takes none."""


@dataclass(frozen=True)
class PassResult:
    """What a pass did: the state it leaves and whether it changed anything."""

    state: CompileState
    changed: bool


# ---------------------------------------------------------------------------------------------
# Predicates on the state (requires / ensures)


@dataclass(frozen=True)
class Fact:
    """The predicate "``name`` is among ``state.facts``"; a plain string in ``requires`` means this."""

    name: str

    def __call__(self, state: CompileState) -> bool:
        return self.name in state.facts

    def __str__(self) -> str:
        return self.name


Predicate = Callable[["CompileState"], bool]


def predicates(items: Iterable[str | Predicate]) -> tuple[Predicate, ...]:
    """Normalise ``requires``/``ensures``: fact names become :class:`Fact`, callables stay."""
    out: list[Predicate] = []
    for item in items:
        if isinstance(item, str):
            out.append(Fact(item))
        elif callable(item):
            out.append(item)
        else:
            raise TypeError(f"requires/ensures items are fact names or callables on the state, got {item!r}")
    return tuple(out)


def describe(pred: Predicate) -> str:
    """A readable name of a predicate for error messages."""
    if isinstance(pred, Fact):
        return pred.name
    doc = (getattr(pred, "__doc__", None) or "").strip().splitlines()
    return getattr(pred, "__name__", None) or (doc[0] if doc else repr(pred))


def needs_fact(pass_cls: type[Pass], name: str) -> bool:
    """Whether ``pass_cls`` requires the fact ``name``."""
    return Fact(name) in predicates(pass_cls.requires)


class Pass:
    """Base class of every pass. Subclasses set ``name`` and ``Options`` and implement ``run``.

    ``requires`` / ``ensures``: predicates on the state (callables ``state -> bool``; a string
    is a fact name). The base class checks them around ``run``. A pass class declares them (and
    ``collective``, ``in_place``) as class attributes; a ``PassManager`` object sets its own from the
    passes it runs, so they are read from the object.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    requires: Iterable[str | Predicate] = ()
    ensures: Iterable[str | Predicate] = ()
    #: runs on every rank under torchrun (training); other passes run on rank 0 only
    collective: bool = False
    #: may write into the students' tensors in place (training, refits). Students share the
    #: teacher's tensors until such a pass runs (``potstill.ir.cow``): before it, each student gets
    #: its own copy of what it still shares. Passes that only read weights or build new modules
    #: (importance, surgery, lowering, recording) set False and keep the sharing.
    in_place: bool = True

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("give either an options object or keyword options, not both")
        self.options = options if options is not None else build_options(self.Options, kwargs, self.name)

    def run(self, state: CompileState) -> PassResult:
        raise NotImplementedError

    def __call__(self, state: CompileState) -> PassResult:
        missing = [describe(p) for p in predicates(self.requires) if not p(state)]
        if missing:
            raise PreconditionError(
                f"pass '{self.name}' requires {missing}; run a pass that provides it first "
                f"(state has {sorted(state.facts)})"
            )
        if self.in_place and state.students:
            state.unshare_students()
        result = self.run(state)
        if not isinstance(result, PassResult):
            raise PostconditionError(f"pass '{self.name}' returned {type(result).__name__}, not PassResult")
        unmet = [describe(p) for p in predicates(self.ensures) if not p(result.state)]
        if unmet:
            raise PostconditionError(f"pass '{self.name}' promised {unmet} but did not provide it")
        return result

    def given(self) -> dict[str, Any]:
        """The options that differ from their defaults, as values (what ``spec`` writes as text):
        ``type(p)(**p.given())`` builds the same pass."""
        if not dataclasses.is_dataclass(self.options):
            return {}
        out = {}
        for f in dataclasses.fields(self.options):
            value = getattr(self.options, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            if value != default:
                out[f.name] = value
        return out

    def spec(self) -> str:
        """The pipeline-string form of this pass with its non-default options."""
        parts = [f"{k}={format_value(v)}" for k, v in self.given().items()]
        return f"{self.name}{{{','.join(parts)}}}" if parts else self.name

    def __repr__(self) -> str:
        return f"<pass {self.spec()}>"
