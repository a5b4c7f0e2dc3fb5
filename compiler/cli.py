"""The ``potstill`` command: compile, inspect, profile, profiles, passes.

Everything heavy (torch, transformers, NNCF, TensorRT) is imported inside the command that needs
it, so ``potstill --help`` starts fast and never imports an optional dependency. A
``PotstillError`` prints its message in red without a traceback and exits with status 2 (``--json``
also prints ``{"error": ...}`` on stdout); Ctrl-C prints one line and exits 130; any other exception
is a bug and propagates with its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from potstill._version import __version__
from potstill.errors import PotstillError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

TEACHER_HELP = "path/to/file.py:FACTORY (FACTORY() returns an nn.Module) or hf:PATH (a Hugging Face model directory)"
SHAPE_HELP = "shape of one float input, e.g. 1x3x224x224; once per input (when the file has no example_inputs())"


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= 2**32 - 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range; give 0 to {2**32 - 1}")
    return value


def _speedups(text: str) -> list[float]:
    """``2`` or ``2,3.5``: speed-up budgets (the range is checked with the other elastic flags)."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers, e.g. 2 or 1.5,2,3") from None


def _size(text: str) -> int:
    from potstill.errors import InputError
    from potstill.inputs.memory import parse_size

    try:
        return parse_size(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout (notes go to stderr)")
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true", help="print only the result and errors")
    loud.add_argument("-v", "--verbose", action="store_true", help="also print per-pass timing tables and engine notes")


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="potstill",
        description="Compile a trained PyTorch teacher into small, verified students for a device.",
    )
    parser.add_argument("--version", action="version", version=f"potstill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    c = sub.add_parser("compile", help="prune / distil / quantize a teacher and lower the students for a profile")
    c.add_argument("teacher", nargs="?", metavar="TEACHER", help=TEACHER_HELP + " (or 'teacher:' in --recipe)")
    c.add_argument("--profile", metavar="NAME", action="append",
                   help="device profile: a built-in name (see 'potstill profiles') or a YAML file; default cpu "
                        "(with --elastic: repeat it for students on several devices from one supernet)")
    c.add_argument("--ratio", type=float, action="append", metavar="R",
                   help="fraction of the MACs to remove (of the latency when the profile has a latency "
                        "table), allocated across layers by importance; repeat for several students (default 0.5); "
                        "the student is named for it: macs50, latency50 (macs50p with --ratio-of prunable)")  # fmt: skip
    c.add_argument("--ratio-of", choices=("total", "prunable"), default=None,
                   help="what --ratio is a fraction of: 'total' (default: the model's MACs) or 'prunable' (the MACs "
                        "outside pinned parts, such as a decoder's embeddings and LM head, which no pruning removes); "
                        "the manifest's prune.budget records which")  # fmt: skip
    c.add_argument("--input-shape", action="append", default=[], metavar="S", help=SHAPE_HELP)
    c.add_argument("--pipeline", metavar="STR",
                   help="pass pipeline, e.g. 'importance.taylor,prune.width{ratio=0.5},distill{epochs=3}'; "
                        "'$ratio' there makes one student per --ratio")  # fmt: skip
    c.add_argument("--recipe", metavar="recipe.yaml", help="YAML with teacher, profile, data, pipeline/stages; flags override it")
    c.add_argument("--data", metavar="FILE.py:FN",
                   help="training data for distillation: FN() yields batches; or a .txt corpus (text models) or a folder of images")  # fmt: skip
    c.add_argument("--calib", metavar="FILE.py:FN",
                   help="calibration data: FN() yields batches; or a .txt corpus (text models) or a folder of "
                        "images (image models); a quarter is held out to measure fidelity")  # fmt: skip
    c.add_argument("--min-fidelity", type=float, default=None, metavar="F",
                   help="fidelity floor (0..1; default: the profile's min_fidelity, else 0.8): students whose "
                        "score against the teacher is lower are flagged (still written)")  # fmt: skip
    depth = c.add_mutually_exclusive_group()
    depth.add_argument("--drop-layers", type=int, metavar="N", help="also remove N blocks (depth pruning)")
    depth.add_argument("--keep-layers", type=int, metavar="N", help="also prune depth down to N blocks")
    c.add_argument("--importance", metavar="NAME", help="importance estimator: magnitude, taylor, fisher, activation, obs "
                                                        "(default: prune.width chooses; mask Fisher with calibration data)")
    el = c.add_argument_group("elastic (one supernet, many students)")
    el.add_argument("--elastic", action="store_true",
                    help="nest the teacher into a supernet, train it (with training data), search each profile's "
                         "Pareto front under its budgets and emit measured students")
    el.add_argument("--students", type=int, metavar="N", help="students per profile along the front (default 3)")
    el.add_argument("--speedup", type=_speedups, action="append", metavar="S",
                    help="budget relative to the teacher: S x faster than its engine, timed against it on this host "
                         "(met within 5%%); repeat or list (2,3) for one student per budget")
    el.add_argument("--latency-ms", type=float, metavar="X",
                    help="absolute latency budget (profiles with a measured latency table; default: the profile's)")
    el.add_argument("--memory-mb", type=float, metavar="Y",
                    help="memory budget: weights + peak activations (default: the profile's)")
    c.add_argument("--target", metavar="T", help="override the profile's target ('potstill passes' lists lower.<target> for each)")
    c.add_argument("--seed", type=_seed, default=None, help="random seed, 0 to 2**32-1 (default 0)")
    c.add_argument("--debug", action="store_true", help="verify the IR after every pass, dump IR before/after under OUT/debug/, show tracebacks")
    c.add_argument("--no-distill", action="store_true",
                   help="do not distil default-pipeline students even when training data is given")
    c.add_argument("--distill-epochs", type=int, default=None, metavar="N",
                   help="epochs of distillation in the default pipeline when training data is given (default 3; >= 1)")
    c.add_argument("--train-minutes", type=float, default=None, metavar="M",
                   help="wall-clock budget of each student's default distillation (with --elastic: of the supernet's "
                        "training), in minutes (training stops when it is spent; the manifest says whether it did)")  # fmt: skip
    c.add_argument("--no-augment", action="store_true",
                   help="do not augment image training data (random crops, flips, colour jitter) in the default "
                        "distillation or the elastic supernet's training")  # fmt: skip
    c.add_argument("--no-cache", action="store_true",
                   help="rebuild every student and clear the teacher-output cache in .OUT.work (by default students of an earlier run into OUT with unchanged inputs are reused)")  # fmt: skip
    c.add_argument("--plugin", action="append", default=[], metavar="MODULE|FILE.py",
                   help="import a module or file that registers passes before planning (repeatable)")
    c.add_argument("--force", action="store_true", help="replace OUT even if potstill did not write it")
    c.add_argument("--resume", action="store_true",
                   help="resume distillation from OUT's work area (automatic when the inputs match)")
    c.add_argument("--max-memory", type=_size, default=None, metavar="SIZE",
                   help="refuse to start when the estimated peak memory exceeds SIZE (e.g. 12G, 1500M); "
                        "the estimate is printed either way, and checked against the memory available")  # fmt: skip
    c.add_argument("--sequence-length", type=int, default=None, metavar="N",
                   help="tokens per example for text teachers: the timing shape and TensorRT's opt shape "
                        "(default: the profile's sequence_length, else 32); engines take any length")  # fmt: skip
    c.add_argument("--trust-remote-code", action="store_true",
                   help="let a Hugging Face folder whose config has auto_map run its own Python code "
                        "(off: that code never runs; a model_type transformers knows is built with its own "
                        "class, said on the console, and an unknown one is refused)")  # fmt: skip
    c.add_argument("--no-teacher-timing", action="store_true",
                   help="do not lower and time the teacher (faster; the students get no speed-ups)")
    c.add_argument("-o", "--output", metavar="OUT", help="output folder (written atomically)")
    _add_output_flags(c)
    c.set_defaults(func=cmd_compile)

    i = sub.add_parser("inspect", help="print a teacher's graph IR, coupled channel groups, blocks and cost")
    i.add_argument("teacher", metavar="TEACHER", help=TEACHER_HELP)
    i.add_argument("--input-shape", action="append", default=[], metavar="S", help=SHAPE_HELP)
    i.add_argument("--no-ops", action="store_true", help="leave out the op-by-op IR listing")
    i.set_defaults(func=cmd_inspect)

    p = sub.add_parser("profile", help="measure a latency table on this machine and write a profile YAML")
    p.add_argument("--profile", default="cpu", metavar="BASE", help="profile to start from (default cpu)")
    p.add_argument("-o", "--output", required=True, metavar="my-device.yaml")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats (a minute, less exact)")
    p.set_defaults(func=cmd_profile)

    ps = sub.add_parser("profiles", help="list the built-in device profiles")
    ps.set_defaults(func=cmd_profiles)

    pa = sub.add_parser("passes", help="list the passes a pipeline can name, or show one pass's options")
    pa.add_argument("name", nargs="?", metavar="NAME", help="a pass: show its options (types, defaults, docs)")
    pa.add_argument("--plugin", action="append", default=[], metavar="MODULE|FILE.py", help="import a plugin first")
    pa.add_argument("--json", action="store_true", help="machine-readable output")
    pa.set_defaults(func=cmd_passes)
    return parser


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_compile(args: argparse.Namespace) -> int:
    from potstill.driver import CompileOptions, compile_teacher
    from potstill.outputs.report import ratio_lines, results_table
    from potstill.threads import fit_threads_to_free_cores

    out, err = _console(), _console(stderr=True)

    def note(msg: str) -> None:
        if args.quiet and not msg.startswith("warning"):
            return
        err.print(msg, style="yellow" if msg.startswith("warning") else "dim", markup=False, soft_wrap=True)

    opts = CompileOptions(
        teacher=args.teacher, out=args.output, profile=(args.profile or [None])[0],
        extra_profiles=tuple((args.profile or [])[1:]), elastic=args.elastic, students=args.students,
        latency_ms=args.latency_ms, memory_mb=args.memory_mb, ratios=tuple(args.ratio or ()), ratio_of=args.ratio_of,
        speedups=tuple(s for group in args.speedup or () for s in group),
        input_shapes=tuple(args.input_shape), pipeline=args.pipeline, recipe=args.recipe, data=args.data,
        calib=args.calib, drop_layers=args.drop_layers, keep_layers=args.keep_layers,
        importance=args.importance, target=args.target, seed=args.seed, debug=args.debug, cache=not args.no_cache,
        distill=not args.no_distill, distill_epochs=args.distill_epochs, plugins=tuple(args.plugin),
        force=args.force, resume=True if args.resume else None, max_memory=args.max_memory, min_fidelity=args.min_fidelity,
        sequence_length=args.sequence_length, trust_remote_code=args.trust_remote_code,
        teacher_timing=not args.no_teacher_timing, progress=not (args.quiet or args.json),
        train_minutes=args.train_minutes, augment=not args.no_augment,
    )  # fmt: skip
    fit_threads_to_free_cores(note)
    result = compile_teacher(opts, note=note)
    if not result.manifest:  # a torchrun rank other than 0: rank 0 reports
        return 0
    if args.json:
        import json

        print(json.dumps(result.manifest, indent=1))
        return 0
    if args.verbose:
        for timing in result.timings:
            if timing.times:
                err.print(timing.table())
    out.print(results_table(result.manifest))
    for line in ratio_lines(result.manifest):  # --ratio asked next to what it achieved
        out.print(line, markup=False, soft_wrap=True, highlight=False)
    if not args.quiet:
        out.print(f"wrote {result.out}/ (manifest.json, report.md, pareto.png, students/)", markup=False, soft_wrap=True)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from potstill.inputs.teacher import load_teacher
    from potstill.ir.capture import analyze
    from potstill.outputs.report import human
    from rich.table import Table

    out = _console()
    teacher = load_teacher(args.teacher, args.input_shape)
    a = analyze(teacher.module, teacher.example_inputs, teacher.example_kwargs)
    if not args.no_ops:
        out.print(a.text(), markup=False)

    groups = Table(title=f"coupled channel groups of {teacher.label}")
    for col in ("id", "kind", "units", "members", "producer", "pinned (reason)"):
        groups.add_column(col, justify="right" if col in ("id", "units", "members") else "left")
    for g in a.groups:
        groups.add_row(str(g.id), g.kind, str(g.n_units), str(len(g.members)), str(g.producer or "—"), g.pinned or "")
    out.print(groups)

    blocks = Table(title="blocks (removable)")
    for col in ("name", "kind", "MACs", "params"):
        blocks.add_column(col, justify="right" if col in ("MACs", "params") else "left")
    for b in a.blocks:
        blocks.add_row(b.name, b.kind, human(b.macs), human(b.params))
    out.print(blocks)

    unknown = getattr(a, "unknown_ops", None) or {}
    if unknown:
        out.print("ops without a coupling rule (their channels are pinned):", style="yellow")
        for op, where in unknown.items():
            out.print(f"  {op}: {', '.join(where[:5])}{' …' if len(where) > 5 else ''}", markup=False)
    c = a.cost
    pinned = sum(1 for g in a.groups if g.pinned)
    out.print(
        f"cost: {human(c.macs)} MACs, {human(c.params)} parameters, peak activation "
        f"{human(c.peak_activation_bytes)}B; {len(a.groups)} groups ({pinned} pinned), {len(a.blocks)} blocks",
        markup=False,
    )
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from potstill.profiles import profile_command

    path = profile_command(args.profile, args.output, args.quick)
    _console().print(f"wrote {path}", markup=False, soft_wrap=True)
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    from potstill.profiles import profiles_table

    out = _console()
    if not out.is_terminal:  # piped or captured: rich would squeeze the wide table into 80 columns
        out.width = max(out.width, 160)
    out.print(profiles_table())
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from potstill.pipeline import available_passes, get_pass
    from potstill.plugins import load_plugins

    load_plugins(args.plugin, note=lambda m: None)
    if args.name is None:
        names = available_passes()
        if args.json:
            import json

            print(json.dumps(names))
        else:
            for name in names:
                print(name)
        return 0
    info = pass_info(get_pass(args.name))
    if args.json:
        import json

        print(json.dumps(info, indent=1))
        return 0
    print(f"{info['name']}: {info['doc']}")
    if info["requires"]:
        print(f"  requires: {', '.join(info['requires'])}")
    if info["ensures"]:
        print(f"  ensures: {', '.join(info['ensures'])}")
    if not info["options"]:
        print("  (no options)")
    for o in info["options"]:
        doc = f"  {o['doc']}" if o["doc"] else ""
        print(f"  {o['name']}: {o['type']} = {o['default']}{doc}")
    return 0


def pass_info(cls: Any) -> dict[str, Any]:
    """Name, doc, requires/ensures and each option's type, default and doc (from ``#:`` comments)."""
    import dataclasses
    import inspect

    from potstill.pipeline import _type_name, describe, option_types, predicates

    comments: dict[str, str] = {}
    try:
        lines = inspect.getsource(cls.Options).splitlines()
    except (OSError, TypeError):
        lines = []
    pending: list[str] = []
    for line in lines:
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
            continue
        name = text.split(":", 1)[0].strip()
        trailing = text.split("#", 1)[1].strip() if "#" in text and ":" in text else ""
        if name.isidentifier():
            doc = " ".join(pending) or trailing
            if doc:
                comments[name] = doc
        pending = []
    hints = option_types(cls.Options)
    options = []
    for f in dataclasses.fields(cls.Options):
        default: Any = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        options.append({"name": f.name, "type": _type_name(hints.get(f.name, Any)), "default": repr(default),
                        "doc": comments.get(f.name, "")})  # fmt: skip
    doc = (inspect.getdoc(cls) or "").strip()
    return {
        "name": cls.name,
        "doc": doc.splitlines()[0] if doc else "",
        "requires": [describe(p) for p in predicates(cls.requires)],
        "ensures": [describe(p) for p in predicates(cls.ensures)],
        "options": options,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status.

    A ``PotstillError`` is one red line and exit 2 (the traceback only with ``--debug``); Ctrl-C
    is one line and exit 130, after the output folder's context has removed its temporary folder.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PotstillError as e:
        err = _console(stderr=True)
        if getattr(args, "debug", False):
            err.print_exception()
        if getattr(args, "json", False):
            import json

            print(json.dumps({"error": str(e), "type": type(e).__name__}))
        err.print(f"error: {e}", style="bold red", markup=False, soft_wrap=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _console(stderr=True).print("interrupted: nothing was written to OUT (its previous contents are kept)",
                                    style="bold red", markup=False)  # fmt: skip
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
