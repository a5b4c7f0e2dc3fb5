"""Distillation methods: one word chooses the objective, and each method has its own options.

``method`` is the only word for *what the student learns*. It names a loss and, where the paper
prescribes one, a training regime. Each method's options are a frozen dataclass, checked when it
is built; an option of another method is an error that lists this method's options.

==========  =======================================================================  ==========================
method      objective (and regime)                                                   options
==========  =======================================================================  ==========================
kd          ``α T² KL(p_t^T || q_s^T) + (1 − α) CE`` (Hinton et al. 2015)            temperature, alpha
hidden      ``mean_i MSE(W_i h^s_i, h^t_{m(i)})`` (FitNets 2015; TinyBERT 1909.10351)  project, MODULES
attention   KL or MSE of attention maps (TinyBERT; MiniLM 2002.10957)               attention_kind, MODULES
cosine      ``1 − cos(W e_s, e_t)`` of mean-pooled embeddings                       pooling, mse_weight
ard         ARD (Goldblum et al. 2020): KD on PGD examples + robust evaluation      alpha, temperature, PGD
rslad       RSLAD (Zi et al. 2021): teacher-soft-label PGD + robust evaluation      adv_weight, PGD
adaspec     AdaSPEC (arXiv 2510.19779): KD on the tokens a KD-trained reference       k, temperature, ref_steps
            finds hard for the student; the reference is trained first
cema        CEMA (ICLR 2024): KD on samples with low teacher entropy, weighted       entropy_fraction,
                                                                                     temperature
==========  =======================================================================  ==========================

MODULES: student_modules, teacher_modules (the layers to match in models that are not Hugging Face
transformers). PGD options: eps, pgd_steps, eval_pgd_steps, clamp, input_min, input_max. The four losses in the
first rows compose with ``+`` (``method=kd+hidden``: ``L = L_kd + L_hidden``, each part with its own
options); the regimes below them do not, because each trains differently. There is no separate
``loss`` word: it used to choose the objective beside ``method``, and the two could disagree.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from potstill.errors import InputError

from .losses import DistillLoss, make_loss


def typed_fields(obj: Any, where: str) -> None:
    """Coerce/check every field of a frozen dataclass against its annotation (int, float, bool,
    str, or ``X | None``); InputError naming the field. Floats must be finite."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        hint = hints[f.name]
        kinds = (
            typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        )
        if value is None:
            if type(None) in kinds:
                continue
            raise InputError(f"{where}: option '{f.name}' must be given")
        object.__setattr__(obj, f.name, _coerce(value, kinds, f.name, where))


def _coerce(value: Any, kinds: tuple[Any, ...], name: str, where: str) -> Any:
    for kind in kinds:
        if typing.get_origin(kind) is tuple and isinstance(value, (list, tuple)):
            inner = typing.get_args(kind)[0]
            if inner is str and all(isinstance(v, str) for v in value):
                return tuple(value)
            if inner is float and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                return tuple(_coerce(v, (float,), name, where) for v in value)
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise InputError(f"{where}: option '{name}' must be a finite number, got {value!r}")
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    names = " or ".join("null" if k is type(None) else _list_name(k) if typing.get_origin(k) is tuple
                        else k.__name__ for k in kinds)  # fmt: skip
    raise InputError(f"{where}: option '{name}' must be {names}, got {value!r}")


def _list_name(kind: Any) -> str:
    return "a list of numbers" if typing.get_args(kind)[0] is float else "a list of names"


def require(ok: bool, where: str, message: str) -> None:
    """InputError ``where: message`` unless ``ok`` (never ``assert``: it vanishes under -O)."""
    if not ok:
        raise InputError(f"{where}: {message}")


def _soft_labels(options: Any) -> None:
    """The ranges shared by every method with softened teacher labels: ``T > 0``, ``α ∈ [0, 1]``."""
    require(options.temperature > 0, "distill", f"temperature must be > 0, got {options.temperature}")
    alpha = getattr(options, "alpha", None)
    require(alpha is None or 0.0 <= alpha <= 1.0, "distill", f"alpha must be in [0, 1], got {alpha}")


@dataclass(frozen=True)
class KDOptions:
    temperature: float = 1.0
    alpha: float = 1.0

    def __post_init__(self) -> None:
        typed_fields(self, "distill{method=kd}")
        _soft_labels(self)


@dataclass(frozen=True)
class HiddenOptions:
    project: bool = True
    #: the layers whose outputs to match, for models that are not Hugging Face transformers
    student_modules: tuple[str, ...] | None = None
    teacher_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        typed_fields(self, "distill{method=hidden}")


@dataclass(frozen=True)
class AttentionOptions:
    attention_kind: str = "kl"
    student_modules: tuple[str, ...] | None = None
    teacher_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        typed_fields(self, "distill{method=attention}")
        require(
            self.attention_kind in ("kl", "mse"),
            "distill",
            f"attention_kind must be kl or mse, got {self.attention_kind!r}",
        )


@dataclass(frozen=True)
class CosineOptions:
    pooling: str = "mean"
    mse_weight: float = 0.0

    def __post_init__(self) -> None:
        typed_fields(self, "distill{method=cosine}")
        require(
            self.pooling in ("mean", "cls"), "distill", f"pooling must be mean or cls, got {self.pooling!r}"
        )
        require(self.mse_weight >= 0, "distill", f"mse_weight must be >= 0, got {self.mse_weight}")


@dataclass(frozen=True)
class PGDOptions:
    """The attack of the robust methods: L∞ PGD, radius ``eps``, step ``eps/4``."""

    eps: float = 8 / 255
    pgd_steps: int = 10
    eval_pgd_steps: int = 20
    clamp: bool = True  # keep attacked inputs in [input_min, input_max]
    input_min: float | None = None  # None: 0.0
    input_max: float | None = None  # None: 1.0

    def __post_init__(self) -> None:
        typed_fields(self, "distill")
        require(self.eps > 0, "distill", f"eps must be > 0, got {self.eps}")
        require(self.pgd_steps >= 1, "distill", f"pgd_steps must be >= 1, got {self.pgd_steps}")
        require(
            self.eval_pgd_steps >= 1, "distill", f"eval_pgd_steps must be >= 1, got {self.eval_pgd_steps}"
        )
        given = [k for k in ("input_min", "input_max") if getattr(self, k) is not None]
        require(
            self.clamp or not given, "distill", f"{', '.join(given)} only apply with clamp=true; drop them"
        )
        require(
            self.bounds[0] < self.bounds[1], "distill", f"input_min must be < input_max, got {self.bounds}"
        )

    @property
    def bounds(self) -> tuple[float, float]:
        return (
            0.0 if self.input_min is None else self.input_min,
            1.0 if self.input_max is None else self.input_max,
        )

    def pgd(self) -> dict[str, Any]:
        return {"eps": self.eps, "step_size": self.eps / 4, "steps": self.pgd_steps,
                "clamp": self.bounds if self.clamp else None}  # fmt: skip


@dataclass(frozen=True)
class ARDOptions(PGDOptions):
    alpha: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _soft_labels(self)


@dataclass(frozen=True)
class RSLADOptions(PGDOptions):
    adv_weight: float = 5 / 6

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            0.0 <= self.adv_weight <= 1.0, "distill", f"adv_weight must be in [0, 1], got {self.adv_weight}"
        )


@dataclass(frozen=True)
class AdaSPECOptions:
    k: float = 0.4
    temperature: float = 1.0
    ref_steps: int | None = None  # None: one epoch

    def __post_init__(self) -> None:
        typed_fields(self, "distill{method=adaspec}")
        require(0 < self.k <= 1, "distill", f"k must be in (0, 1], got {self.k}")
        _soft_labels(self)
        require(
            self.ref_steps is None or self.ref_steps >= 1,
            "distill",
            f"ref_steps must be >= 1, got {self.ref_steps}",
        )


@dataclass(frozen=True)
class CEMAOptions:
    entropy_fraction: float = 0.4
    temperature: float = 1.0

    def __post_init__(self) -> None:
        typed_fields(self, "distill{method=cema}")
        require(
            0 < self.entropy_fraction <= 1,
            "distill",
            f"entropy_fraction must be in (0, 1], got {self.entropy_fraction}",
        )
        _soft_labels(self)


#: losses that add up with '+'
COMPOSABLE: dict[str, type] = {"kd": KDOptions, "hidden": HiddenOptions, "attention": AttentionOptions,
                               "cosine": CosineOptions}  # fmt: skip
#: methods with their own training regime; used alone
REGIMES: dict[str, type] = {
    "ard": ARDOptions,
    "rslad": RSLADOptions,
    "adaspec": AdaSPECOptions,
    "cema": CEMAOptions,
}
METHODS = (*COMPOSABLE, *REGIMES)


def parse_method(method: str) -> tuple[str, ...]:
    """``"kd+hidden"`` -> ``("kd", "hidden")``; InputError for unknown or uncombinable names."""
    parts = tuple(p.strip() for p in str(method).split("+"))
    unknown = [p for p in parts if p not in METHODS]
    if unknown or not all(parts):
        raise InputError(
            f"distill: unknown method {method!r}; methods: {', '.join(METHODS)} "
            f"(the first four add up, e.g. method=kd+hidden)"
        )
    if len(set(parts)) != len(parts):
        raise InputError(f"distill: method {method!r} names a loss twice")
    if len(parts) > 1 and any(p in REGIMES for p in parts):
        raise InputError(
            f"distill: method {method!r}: {', '.join(p for p in parts if p in REGIMES)} has its own training "
            f"regime and does not combine; only {', '.join(COMPOSABLE)} add up with '+'"
        )
    return parts


def schema(method: str) -> dict[str, type]:
    """Each part of ``method`` with its options class."""
    return {p: {**COMPOSABLE, **REGIMES}[p] for p in parse_method(method)}


def option_names(method: str) -> list[str]:
    return [f.name for cls in schema(method).values() for f in dataclasses.fields(cls)]


def all_method_option_names() -> set[str]:
    return {f.name for cls in (*COMPOSABLE.values(), *REGIMES.values()) for f in dataclasses.fields(cls)}


def owners(option: str) -> list[str]:
    """Methods that take ``option``."""
    return [
        m
        for m, cls in {**COMPOSABLE, **REGIMES}.items()
        if option in {f.name for f in dataclasses.fields(cls)}
    ]


def build(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options object of each part of ``method`` from the options the user gave.

    An option that no part takes is an InputError naming the method's options and the methods
    that do take it.
    """
    parts = schema(method)
    allowed = set(option_names(method))
    stray = sorted(k for k in given if k not in allowed)
    if stray:
        where = "; ".join(f"{k} belongs to {', '.join(owners(k)) or 'no method'}" for k in stray)
        raise InputError(
            f"distill{{method={method}}}: option(s) {stray} do not apply to this method ({where}); "
            f"method {method} takes: {', '.join(sorted(allowed)) or 'no options of its own'}"
        )
    built = {}
    for part, cls in parts.items():
        names = {f.name for f in dataclasses.fields(cls)}
        built[part] = cls(**{k: v for k, v in given.items() if k in names})
    return built


def loss_kwargs(part: str, options: Any) -> dict[str, Any]:
    """Constructor arguments of the loss named ``part`` (the losses' own parameter names)."""
    if part == "kd":
        return {"temperature": options.temperature, "alpha": options.alpha}
    modules = {
        k: getattr(options, k) for k in ("student_modules", "teacher_modules") if getattr(options, k, None)
    }
    if part == "hidden":
        return {"project": options.project, **modules}
    if part == "attention":
        return {"kind": options.attention_kind, **modules}
    if part == "cosine":
        return {"pooling": options.pooling, "mse_weight": options.mse_weight}
    if part == "ard":
        return {"alpha": options.alpha, "temperature": options.temperature, **options.pgd()}
    if part == "rslad":
        return {"adv_weight": options.adv_weight, **options.pgd()}
    if part == "cema":
        return {"fraction": options.entropy_fraction, "temperature": options.temperature}
    if part == "adaspec":
        return {"k": options.k, "temperature": options.temperature}
    raise InputError(f"distill: unknown method part {part!r}")


def make_method_loss(method: str, built: dict[str, Any], **extra: Any) -> DistillLoss:
    """The loss of ``method`` (a sum for ``a+b``); ``extra`` goes to a single-part loss (adaspec's
    reference model)."""
    from .losses import SumLoss

    losses = {part: make_loss(part, **loss_kwargs(part, opts), **extra) for part, opts in built.items()}
    return next(iter(losses.values())) if len(losses) == 1 else SumLoss(losses)


def resolved(built: dict[str, Any]) -> dict[str, Any]:
    """All options of the method as they ran (defaults filled in), for the manifest."""
    out: dict[str, Any] = {}
    for opts in built.values():
        out.update(dataclasses.asdict(opts))
        if isinstance(opts, PGDOptions):
            out["input_min"], out["input_max"] = opts.bounds if opts.clamp else (None, None)
    return out
