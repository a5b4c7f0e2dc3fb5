"""Pass infrastructure: passes with frozen options, a lazy registry, pipeline strings, a manager.

A pass is a small object with a ``name``, an ``Options`` frozen dataclass, the facts it
``requires`` and ``ensures``, and one method ``run(state) -> PassResult``. Passes register with
``@register_pass``; built-in passes are listed in ``BUILTIN_PASSES`` by module path and imported
only when a pipeline names them, so ``potstill --help`` never imports NNCF or TensorRT.

A plain function becomes a pass with ``@function_pass``::

    @function_pass("my.scale", options=ScaleOptions)
    def scale(state, opts):
        ...
        return True   # changed

Pipeline strings name passes with options: ``importance.magnitude,prune.width{ratio=0.5}``.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import yaml

from .errors import InputError, PassError, PostconditionError, PreconditionError

if TYPE_CHECKING:
    from .state import CompileState


@dataclass(frozen=True)
class NoOptions:
    """Options of a pass that takes none."""


@dataclass(frozen=True)
class PassResult:
    """What a pass did: the state it leaves and whether it changed anything."""

    state: CompileState
    changed: bool


class Pass:
    """Base class of every pass. Subclasses set ``name`` and ``Options`` and implement ``run``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    requires: ClassVar[frozenset[str]] = frozenset()
    ensures: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("give either an options object or keyword options, not both")
        self.options = options if options is not None else build_options(self.Options, kwargs, self.name)

    def run(self, state: CompileState) -> PassResult:
        raise NotImplementedError

    def __call__(self, state: CompileState) -> PassResult:
        missing = self.requires - state.facts
        if missing:
            raise PreconditionError(
                f"pass '{self.name}' requires {sorted(missing)}; run a pass that provides it first "
                f"(state has {sorted(state.facts)})"
            )
        result = self.run(state)
        if not isinstance(result, PassResult):
            raise PostconditionError(f"pass '{self.name}' returned {type(result).__name__}, not PassResult")
        unmet = self.ensures - result.state.facts
        if unmet:
            raise PostconditionError(f"pass '{self.name}' promised {sorted(unmet)} but did not provide it")
        return result

    def spec(self) -> str:
        """The pipeline-string form of this pass with its non-default options."""
        if not dataclasses.is_dataclass(self.options):
            return self.name
        parts = []
        for f in dataclasses.fields(self.options):
            value = getattr(self.options, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            if value != default:
                parts.append(f"{f.name}={_format_value(value)}")
        return f"{self.name}{{{','.join(parts)}}}" if parts else self.name

    def __repr__(self) -> str:
        return f"<pass {self.spec()}>"


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    return str(value)


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
    converted = {}
    for key, value in values.items():
        converted[key] = _coerce(value, known[key], pass_name)
    try:
        return options_cls(**converted)
    except (TypeError, ValueError) as e:
        raise InputError(f"pass '{pass_name}': bad options {values}: {e}") from e


def _coerce(value: Any, f: dataclasses.Field, pass_name: str) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else None
    if default is None or value is None:
        return tuple(value) if isinstance(value, list) else value
    kind = type(default)
    try:
        if kind is bool and isinstance(value, str):
            if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(value)
            return value.lower() in {"true", "1", "yes"}
        if kind is tuple:
            return tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if kind in (int, float, str, bool) and not isinstance(value, kind):
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return kind(value)
    except (TypeError, ValueError) as e:
        raise InputError(
            f"pass '{pass_name}': option '{f.name}' must be {kind.__name__}, got {value!r}"
        ) from e
    return value


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
    "distill": "potstill.passes.distill.pass_",
    "quantize.int8": "potstill.targets.int8",
    "lower.onnx": "potstill.targets.lower",
    "lower.onnxruntime": "potstill.targets.lower",
    "lower.tensorrt": "potstill.targets.lower",
    "lower.aoti": "potstill.targets.lower",
}

_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to pipelines under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}.Options must be a frozen dataclass")
    _REGISTRY[cls.name] = cls
    return cls


def function_pass(
    name: str,
    options: type = NoOptions,
    requires: Iterable[str] = (),
    ensures: Iterable[str] = (),
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
                "requires": frozenset(requires),
                "ensures": frozenset(ensures),
                "run": run,
                "__doc__": fn.__doc__,
                "__module__": fn.__module__,
            },
        )
        return register_pass(cls)

    return wrap


def get_pass(name: str) -> type[Pass]:
    """Look a pass up by name, importing its module if it is a built-in not yet loaded."""
    if name not in _REGISTRY and name in BUILTIN_PASSES:
        importlib.import_module(BUILTIN_PASSES[name])
    if name not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(BUILTIN_PASSES))
        raise InputError(f"unknown pass '{name}'; known passes: {', '.join(known)}")
    return _REGISTRY[name]


def available_passes() -> list[str]:
    return sorted(set(_REGISTRY) | set(BUILTIN_PASSES))


# ---------------------------------------------------------------------------------------------
# Pipeline strings


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside braces and brackets."""
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
    return [p.strip() for p in parts if p.strip()]


def parse_pipeline(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse ``a{k=v},b`` into ``[("a", {"k": v}), ("b", {})]``; values are YAML scalars/lists."""
    steps = []
    for item in _split_top(text, ","):
        if "{" in item:
            if not item.endswith("}"):
                raise InputError(f"pipeline step '{item}': options must end with '}}'")
            name, body = item.split("{", 1)
            body = body[:-1]
        else:
            name, body = item, ""
        opts: dict[str, Any] = {}
        for kv in _split_top(body, ","):
            if "=" not in kv:
                raise InputError(f"pipeline step '{item}': option '{kv}' is not key=value")
            k, v = kv.split("=", 1)
            try:
                opts[k.strip()] = yaml.safe_load(v.strip())
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

        from .atomic import atomic_write_text

        directory = Path(self.directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / f"{self._count:02d}-{tag}.txt", state.ir_text())

    def before_pass(self, p: Pass, state: CompileState) -> None:
        self._count += 1
        self._dump(state, f"before-{p.name}")

    def after_pass(self, p: Pass, state: CompileState, result: PassResult) -> None:
        if result.changed:
            self._dump(result.state, f"after-{p.name}")


class VerifyInstrument(PassInstrument):
    """Runs the IR verifier on the working model after every pass that changed it."""

    def after_pass(self, p: Pass, state: CompileState, result: PassResult) -> None:
        if result.changed:
            result.state.verify()


class PassManager:
    """Runs passes in order with instruments; a failure names the pass and those before it."""

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
            state.pipeline.append(p.spec())
            changed_any |= result.changed
            done.append(p.spec())
        for inst in self.instruments:
            inst.end(state)
        return PassResult(state, changed_any)
