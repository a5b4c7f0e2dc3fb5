"""Planning ``potstill compile --elastic``: one plan per device profile, one supernet for all.

    potstill compile TEACHER --elastic --students N [--speedup S | --latency-ms X] [--memory-mb Y] --profile A [--profile B]

Each profile gets the plan ``[importance.E,] elastic.nest, [elastic.train{epochs=K},]
elastic.search{students=N, speedup=[S..] | latency_ms=X, memory_mb=Y}`` followed by that profile's lowering and
``record``. The plans of one compilation share the nested, trained supernet (``elastic.nest`` and
``elastic.train`` reuse what the first plan built, through ``state.shared``), so the supernet is
trained once and searched once per device. Widths are aligned to one channel multiple for all of
them: when the devices' multiples differ, every plan nests with ``channel_multiple=L``, their least
common multiple (a width aligned to 16 is aligned to 8 too), else each device would nest and train a
supernet of its own. Flags that configure the per-ratio pipeline do not apply
and are errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from potstill.errors import InputError
from potstill.pipeline import Pass, get_pass


def check_elastic_flags(opts: Any) -> None:
    """``--students/--latency-ms/--memory-mb`` and several ``--profile`` need ``--elastic``; with it,
    the per-ratio flags are moot."""
    elastic_only = [flag for flag, value in (
        ("--students", opts.students), ("--latency-ms", opts.latency_ms), ("--memory-mb", opts.memory_mb),
        ("--speedup", opts.speedups or None), ("a second --profile", opts.extra_profiles or None),
    ) if value is not None]  # fmt: skip
    if not opts.elastic:
        if elastic_only:
            raise InputError(f"{', '.join(elastic_only)} without --elastic: these configure the elastic search; "
                             "add --elastic (or drop them)")
        return
    moot = [flag for flag, value in (
        ("--ratio", opts.ratios or None), ("--drop-layers", opts.drop_layers), ("--keep-layers", opts.keep_layers),
        ("--pipeline", opts.pipeline),
    ) if value is not None]  # fmt: skip
    if moot:
        raise InputError(f"{', '.join(moot)} with --elastic: the elastic search chooses widths and depths itself; "
                         "give budgets (--speedup, --memory-mb) and --students instead")
    if opts.students is not None and opts.students < 1:
        raise InputError(f"--students {opts.students}: must be at least 1")
    for flag, value in (("--latency-ms", opts.latency_ms), ("--memory-mb", opts.memory_mb)):
        if value is not None and not value > 0:
            raise InputError(f"{flag} {value}: must be a positive number")
    for s in opts.speedups:
        if not 1 <= s < float("inf"):
            raise InputError(f"--speedup {s:g}: a budget is how many times faster than the teacher, a finite "
                             "number >= 1 (e.g. --speedup 2)")
    if len(set(opts.speedups)) != len(opts.speedups):
        raise InputError(f"--speedup {' '.join(f'{s:g}' for s in opts.speedups)}: a budget is given twice")
    if opts.speedups and opts.latency_ms is not None:
        raise InputError("--speedup with --latency-ms: give a budget relative to the teacher (--speedup) or an "
                         "absolute one (--latency-ms, on a profile with a measured latency table), not both")
    if len(opts.speedups) > 1 and opts.students is not None and opts.students != len(opts.speedups):
        raise InputError(f"--students {opts.students} with {len(opts.speedups)} --speedup budgets: several budgets "
                         "make one student each; drop --students, or give one --speedup for N students")
    if opts.latency_ms is not None:
        from potstill.profiles import DEFAULT_PROFILE, load_profile

        from .search import absolute_budget_error

        for name in (opts.profile or DEFAULT_PROFILE, *opts.extra_profiles):
            profile = load_profile(name)
            if profile.latency_table is None:
                raise InputError(absolute_budget_error(profile, opts.latency_ms))


def shared_channel_multiple(profiles: Sequence[str]) -> int | None:
    """The least common multiple of the profiles' channel multiples, when they differ (None: they
    agree, and each plan's own profile gives the same one)."""
    import math

    from potstill.passes.prune.align import channel_multiple
    from potstill.profiles import load_profile

    multiples = {channel_multiple(load_profile(p)) for p in profiles}
    return math.lcm(*multiples) if len(multiples) > 1 else None


def train_pass(epochs: int, augment: bool = True, minutes: float | None = None) -> Pass:
    """``elastic.train`` for ``epochs`` epochs (0: its own step budget, or until ``minutes`` are spent
    when given: ``--train-minutes``); ``augment=False`` (``--no-augment``) trains on the images as given."""
    options: dict[str, Any] = {"epochs": epochs} if epochs else {}
    if minutes is not None:
        options["minutes"] = minutes
    if not augment:
        options["augment"] = False
    return get_pass("elastic.train")(**options)


def elastic_pipelines(
    profiles: Sequence[str],
    *,
    students: int | None,
    latency_ms: float | None,
    speedups: Sequence[float] = (),
    memory_mb: float | None,
    train_epochs: int | None,  # None: no training; 0: elastic.train's own step budget
    importance: str | None,
) -> list[tuple[str, str, str]]:
    """``(plan name, profile, pipeline string)`` for each device."""
    search = [f"students={students}"] if students is not None else []
    if speedups:
        search.append(f"speedup=[{','.join(f'{s:g}' for s in speedups)}]")
    if latency_ms is not None:
        search.append(f"latency_ms={latency_ms:g}")
    if memory_mb is not None:
        search.append(f"memory_mb={memory_mb:g}")
    head = []
    if importance:
        head.append(importance if "." in importance else f"importance.{importance}")
    multiple = shared_channel_multiple(profiles)
    head.append(f"elastic.nest{{channel_multiple={multiple}}}" if multiple is not None else "elastic.nest")
    if train_epochs is not None:
        head.append(train_pass(train_epochs).spec())
    out = []
    seen: set[str] = set()
    for profile in profiles:
        name = "elastic-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in profile.rsplit("/", 1)[-1].removesuffix(".yaml"))
        if name in seen:
            raise InputError(f"--profile {profile} given twice")
        seen.add(name)
        options = f"{{{','.join(search)}}}" if search else ""
        out.append((name, profile, ",".join([*head, f"elastic.search{options}"])))
    return out
