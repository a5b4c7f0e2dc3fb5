"""Pass infrastructure: passes with frozen options, a lazy registry, pipeline strings, a manager.

A pass is a small object with a ``name``, an ``Options`` frozen dataclass, the predicates on the
state it ``requires`` and ``ensures`` (as in onnx-ir's ``PassBase``), and one method
``run(state) -> PassResult``. Passes register with ``@register_pass``; built-in passes are listed
in ``BUILTIN_PASSES`` by module path and imported only when a pipeline names them, so
``potstill --help`` never imports NNCF or TensorRT. A name is registered once: a plugin cannot
silently replace a built-in.

A plain function becomes a pass with ``@function_pass``::

    @function_pass("my.scale", options=ScaleOptions)
    def scale(state, opts):
        ...
        return True   # changed

Pipeline strings name passes with options: ``importance.magnitude,prune.width{ratio=0.5}``.
Option values are typed by the options dataclass's annotations (``typing.get_type_hints``).
The ``PassManager`` appends each pass it ran to every student's history.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import yaml
from potstill.errors import InputError, PassError, PostconditionError, PreconditionError

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
    is a fact name). The base class checks them around ``run``.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    requires: ClassVar[Iterable[str | Predicate]] = ()
    ensures: ClassVar[Iterable[str | Predicate]] = ()
    #: runs on every rank under torchrun (training); other passes run on rank 0 only
    collective: ClassVar[bool] = False
    #: may write into the students' tensors in place (training, refits). Students share the
    #: teacher's tensors until such a pass runs (``potstill.ir.cow``): before it, each student gets
    #: its own copy of what it still shares. Passes that only read weights or build new modules
    #: (importance, surgery, lowering, recording) set False and keep the sharing.
    in_place: ClassVar[bool] = True

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

    def spec(self) -> str:
        """The pipeline-string form of this pass with its non-default options."""
        if not dataclasses.is_dataclass(self.options):
            return self.name
        parts = []
        for f in dataclasses.fields(self.options):
            value = getattr(self.options, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            if value != default:
                parts.append(f"{f.name}={_format_value(value)}")
        return f"{self.name}{{{','.join(parts)}}}" if parts else self.name

    def __repr__(self) -> str:
        return f"<pass {self.spec()}>"


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if hasattr(value, "model_dump"):  # a pydantic record: YAML flow mapping, read back by parse_pipeline
        dumped = value.model_dump(exclude_defaults=True)
        return "{" + ", ".join(f"{k}: {_format_value(v)}" for k, v in dumped.items()) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def option_types(options_cls: type) -> dict[str, Any]:
    """Field name -> annotated type of an options dataclass (string annotations resolved)."""
    module = sys.modules.get(options_cls.__module__)
    try:
        return typing.get_type_hints(options_cls, vars(module) if module else None)
    except (NameError, TypeError):  # an annotation that cannot be resolved: fall back to no coercion
        return {f.name: Any for f in dataclasses.fields(options_cls)}


def build_options(options_cls: type, values: dict[str, Any], pass_name: str = "") -> Any:
    """Build a frozen options dataclass from a dict, with errors that name the field."""
    if not dataclasses.is_dataclass(options_cls):
        raise TypeError(f"{options_cls!r} is not a dataclass")
    known = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(
            f"pass '{pass_name}': unknown option(s) {unknown}; it takes {sorted(known) or 'no options'}"
        )
    hints = option_types(options_cls)
    converted = {key: _coerce(value, key, hints.get(key, Any), pass_name) for key, value in values.items()}
    try:
        return options_cls(**converted)
    except (TypeError, ValueError) as e:
        raise InputError(f"pass '{pass_name}': bad options {values}: {e}") from e


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _type_name(kind: Any) -> str:
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if typing.get_origin(kind) is typing.Literal:
        return " or ".join(repr(a) for a in args)
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _convert(value: Any, kind: Any) -> Any:
    """``value`` as ``kind`` (an annotation); raises ValueError/TypeError when it is not one."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any or kind is object:
        return tuple(value) if isinstance(value, list) else value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"one of {list(args)}")
        return value
    if origin in (tuple, list) or kind in (tuple, list):
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(items):
                raise ValueError(f"{len(args)} items")
            return tuple(_convert(v, a) for v, a in zip(items, args))
        inner = args[0] if args else Any
        return tuple(_convert(v, inner) for v in items)
    if isinstance(kind, type) and hasattr(kind, "model_validate"):
        return value if isinstance(value, kind) else kind.model_validate(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(value)
        return str(value)
    if value is None:
        raise ValueError("None")
    return value


def _coerce(value: Any, name: str, kind: Any, pass_name: str) -> Any:
    try:
        return _convert(value, kind)
    except (TypeError, ValueError) as e:
        raise InputError(
            f"pass '{pass_name}': option '{name}' must be {_type_name(kind)}, got {value!r}"
        ) from e


# ---------------------------------------------------------------------------------------------
# Registry

#: Built-in passes: name -> module that defines (and registers) it. Imported on first use.
BUILTIN_PASSES: dict[str, str] = {
    "importance.magnitude": "potstill.passes.importance.magnitude",
    "importance.taylor": "potstill.passes.importance.taylor",
    "importance.fisher": "potstill.passes.importance.fisher",
    "importance.activation": "potstill.passes.importance.activation",
    "importance.obs": "potstill.passes.importance.obs",
    "importance.blocks": "potstill.passes.importance.blocks",
    "prune.width": "potstill.passes.prune.width",
    "prune.depth": "potstill.passes.prune.depth",
    "bn.recalibrate": "potstill.passes.prune.bn_recalibrate",
    "fidelity": "potstill.fidelity",
    "distill": "potstill.passes.distill.pass_",
    "elastic.nest": "potstill.passes.elastic.pass_",
    "elastic.train": "potstill.passes.elastic.pass_",
    "elastic.search": "potstill.passes.elastic.pass_",
    "distill.progressive": "potstill.passes.distill.progressive_pass",
    "quantize.int8": "potstill.targets.lowering",
    "record": "potstill.targets.recording",
    "record.teacher": "potstill.targets.recording",
}

#: Pass families: a name prefix -> the module whose ``family_pass(rest)`` builds and registers the
#: pass ``prefix + rest`` on first use, and whose ``family_names()`` lists them: ``lower.<target>``
#: exists for every registered target (``potstill.targets.registry``), a plugin's included.
PASS_FAMILIES: dict[str, str] = {
    "lower.": "potstill.targets.lowering",
}

_REGISTRY: dict[str, type[Pass]] = {}


def _family(name: str) -> str | None:
    """The module of the family ``name`` belongs to (None: no family)."""
    return next((module for prefix, module in PASS_FAMILIES.items() if name.startswith(prefix)), None)


def _origin(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to pipelines under ``cls.name``.

    A name is taken once. Registering another class under a taken name (or under a built-in
    name from another module) raises ``InputError`` naming both; re-running the module that
    defined the pass (a reload) replaces it.
    """
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}.Options must be a frozen dataclass")
    predicates(cls.requires)  # type-checks the declarations now rather than at the first run
    predicates(cls.ensures)
    builtin = BUILTIN_PASSES.get(cls.name) or _family(cls.name)
    if builtin is not None and cls.__module__ != builtin:
        raise InputError(f"pass name '{cls.name}' is a built-in pass ({builtin}); {_origin(cls)} must use another name")
    old = _REGISTRY.get(cls.name)
    if old is not None and _origin(old) != _origin(cls):
        raise InputError(
            f"pass name '{cls.name}' is taken by {_origin(old)}; {_origin(cls)} must use another name"
        )
    _REGISTRY[cls.name] = cls
    return cls


def function_pass(
    name: str,
    options: type = NoOptions,
    requires: Iterable[str | Predicate] = (),
    ensures: Iterable[str | Predicate] = (),
) -> Callable[[Callable[[CompileState, Any], bool]], type[Pass]]:
    """Turn ``fn(state, options) -> changed`` into a registered pass class."""

    def wrap(fn: Callable[[CompileState, Any], bool]) -> type[Pass]:
        def run(self: Pass, state: CompileState) -> PassResult:
            return PassResult(state, bool(fn(state, self.options)))

        cls = type(
            f"{fn.__name__}_pass",
            (Pass,),
            {
                "name": name,
                "Options": options,
                "requires": predicates(requires),
                "ensures": predicates(ensures),
                "run": run,
                "__doc__": fn.__doc__,
                "__module__": fn.__module__,
                "__qualname__": f"{fn.__qualname__}_pass",
            },
        )
        return register_pass(cls)

    return wrap


def get_pass(name: str) -> type[Pass]:
    """Look a pass up by name, importing its module if it is a built-in not yet loaded."""
    if name not in _REGISTRY and name in BUILTIN_PASSES:
        module = BUILTIN_PASSES[name]
        if module in sys.modules:  # imported, but its entry was dropped (a test restored the registry): re-run it
            importlib.reload(sys.modules[module])
        else:
            importlib.import_module(module)
    family = _family(name)
    if name not in _REGISTRY and family is not None:
        prefix = next(p for p in PASS_FAMILIES if name.startswith(p))
        importlib.import_module(family).family_pass(name[len(prefix):])
    if name not in _REGISTRY:
        known = available_passes()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise InputError(f"unknown pass '{name}'{hint}; known passes: {', '.join(known)}")
    return _REGISTRY[name]


def available_passes() -> list[str]:
    """Every pass a pipeline can name: registered, built-in and each family's members."""
    families = {n for module in PASS_FAMILIES.values() for n in importlib.import_module(module).family_names()}
    return sorted(set(_REGISTRY) | set(BUILTIN_PASSES) | families)


# ---------------------------------------------------------------------------------------------
# Pipeline strings


def _split_top(text: str, sep: str, what: str) -> list[str]:
    """Split on ``sep`` outside braces and brackets; an empty item is an error naming ``what``."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                raise InputError(f"pipeline '{text}': unbalanced '{ch}'")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise InputError(f"pipeline '{text}': unbalanced braces")
    parts.append("".join(cur))
    parts = [p.strip() for p in parts]
    if parts == [""]:
        return []
    if "" in parts:
        raise InputError(f"{what} '{text}': empty item (a stray '{sep}'); remove it")
    return parts


def parse_pipeline(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse ``a{k=v},b`` into ``[("a", {"k": v}), ("b", {})]``; values are YAML scalars/lists.

    Empty items (``a,,b``) and an option given twice (``a{k=1,k=2}``) are errors.
    """
    steps = []
    for item in _split_top(text, ",", "pipeline"):
        if "{" in item:
            if not item.endswith("}"):
                raise InputError(f"pipeline step '{item}': options must end with '}}'")
            name, body = item.split("{", 1)
            body = body[:-1]
        else:
            name, body = item, ""
        if not name.strip():
            raise InputError(f"pipeline step '{item}': no pass name before the options")
        opts: dict[str, Any] = {}
        for kv in _split_top(body, ",", f"options of '{name.strip()}'"):
            if "=" not in kv:
                raise InputError(f"pipeline step '{item}': option '{kv}' is not key=value")
            k, v = (part.strip() for part in kv.split("=", 1))
            if k in opts:
                raise InputError(f"pipeline step '{item}': option '{k}' is given twice; keep one")
            try:
                opts[k] = yaml.safe_load(v)
            except yaml.YAMLError as e:
                raise InputError(f"pipeline step '{item}': cannot read value '{v}'") from e
        steps.append((name.strip(), opts))
    return steps


def build_pipeline(spec: str | Sequence[str | Pass]) -> list[Pass]:
    """Passes from a pipeline string or a list of strings / pass objects."""
    items: list[str | Pass] = [spec] if isinstance(spec, str) else list(spec)
    passes: list[Pass] = []
    for item in items:
        if isinstance(item, Pass):
            passes.append(item)
            continue
        for name, opts in parse_pipeline(item):
            passes.append(get_pass(name)(**opts))
    return passes


# ---------------------------------------------------------------------------------------------
# Instruments and the manager


class PassInstrument:
    """Hooks around each pass. Timing, dumps and verification live here, never in passes."""

    def should_run(self, p: Pass, state: CompileState) -> bool:
        return True

    def before_pass(self, p: Pass, state: CompileState) -> None:
        return None

    def after_pass(self, p: Pass, state: CompileState, result: PassResult) -> None:
        return None

    def end(self, state: CompileState) -> None:
        return None


@dataclass
class TimingInstrument(PassInstrument):
    """Records wall time per pass; ``table()`` renders it for the console."""

    times: list[tuple[str, float, bool]] = field(default_factory=list)
    _t0: float = 0.0

    def before_pass(self, p: Pass, state: CompileState) -> None:
        self._t0 = time.perf_counter()

    def after_pass(self, p: Pass, state: CompileState, result: PassResult) -> None:
        self.times.append((p.spec(), time.perf_counter() - self._t0, result.changed))

    def table(self) -> Any:
        from rich.table import Table

        t = Table(title="passes")
        t.add_column("pass")
        t.add_column("seconds", justify="right")
        t.add_column("changed")
        for name, sec, changed in self.times:
            t.add_row(name, f"{sec:.2f}", "yes" if changed else "no")
        return t


@dataclass
class SkipInstrument(PassInstrument):
    """Skips the named passes."""

    skip: frozenset[str] = frozenset()

    def should_run(self, p: Pass, state: CompileState) -> bool:
        return p.name not in self.skip


@dataclass
class DumpIRInstrument(PassInstrument):
    """Writes the working model's IR text before each pass and after it when it changed."""

    directory: Any = None
    _count: int = 0

    def _dump(self, state: CompileState, tag: str) -> None:
        from pathlib import Path

        from potstill.outputs.atomic import atomic_write_text

        directory = Path(self.directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / f"{self._count:02d}-{tag}.txt", state.ir_text())

    def before_pass(self, p: Pass, state: CompileState) -> None:
        self._count += 1
        self._dump(state, f"before-{p.name}")

    def after_pass(self, p: Pass, state: CompileState, result: PassResult) -> None:
        if result.changed:
            self._dump(result.state, f"after-{p.name}")


@dataclass
class VerifyInstrument(PassInstrument):
    """Runs the IR verifier (``check``, default ``verify.verify_student``) after every pass that
    changed the working model."""

    check: Callable[[CompileState], None] | None = None

    def after_pass(self, p: Pass, state: CompileState, result: PassResult) -> None:
        if not result.changed:
            return
        if self.check is None:
            from potstill.ir.verify import verify_student

            self.check = verify_student
        self.check(result.state)


class PassManager:
    """Runs passes in order with instruments; a failure names the pass and those before it.

    After each pass it appends the pass's spec to ``state.pipeline`` and to the history of every
    student, so a pass never records itself.
    """

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[PassInstrument] = ()) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments)

    def run(self, state: CompileState) -> PassResult:
        done: list[str] = []
        changed_any = False
        for p in self.passes:
            if not all(i.should_run(p, state) for i in self.instruments):
                continue
            for inst in self.instruments:
                inst.before_pass(p, state)
            try:
                result = p(state)
            except Exception as e:
                before = ", ".join(done) if done else "none"
                raise PassError(f"pass '{p.spec()}' failed (passes before it: {before}): {e}") from e
            for inst in self.instruments:
                inst.after_pass(p, state, result)
            state = result.state
            spec = p.spec()
            state.pipeline.append(spec)
            for student in state.students:
                student.history.append(spec)
            changed_any |= result.changed
            done.append(spec)
        for inst in self.instruments:
            inst.end(state)
        return PassResult(state, changed_any)
